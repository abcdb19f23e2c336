"""The Python module: typed errors, id resolution layers, generations, failure records."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from ledger import (
    ConfigError,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    Ledger,
    UnknownUser,
)
from ledger.config import CreditsConfig
from tests.factories import count_rows, make_subscription, make_user


def test_grant_deduct_balance_history(ledger: Ledger) -> None:
    uid = uuid.uuid4()
    w1 = ledger.grant(uid, 100, idempotency_key="g1", transaction_type="subscription_grant")
    w2 = ledger.deduct(uid, 40, idempotency_key="d1")
    assert (w1.new_balance, w2.new_balance, w2.duplicate) == (100, 60, False)
    assert ledger.deduct(uid, 40, idempotency_key="d1") == type(w2)(60, w2.transaction_id, True)
    bal = ledger.balance(uid)
    assert (bal.balance, bal.lifetime_earned, bal.lifetime_spent) == (60, 100, 40)
    hist = ledger.history(uid)
    assert [t.amount for t in hist] == [-40, 100]


@pytest.mark.parametrize("amount", [0, -1, 1.5, "10", True, None, 10**7])
def test_bad_amounts_refused_before_the_database(ledger: Ledger, conn: psycopg.Connection, amount: object) -> None:
    with pytest.raises(InvalidAmount):
        ledger.grant(uuid.uuid4(), amount, idempotency_key="k")  # type: ignore[arg-type]
    assert count_rows(conn, "points_transactions") == 0


@pytest.mark.parametrize("user", ["nope", "'; DROP TABLE points_balances; --", "", 42, "1234" * 30])
def test_malformed_user_ids_refused(ledger: Ledger, user: object) -> None:
    with pytest.raises(InvalidArgument):
        ledger.grant(user, 5, idempotency_key="k")  # type: ignore[arg-type]


def test_typed_errors_from_sqlstates(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    ledger.grant(uid, 10, idempotency_key="k")
    with pytest.raises(IdempotencyConflict):
        ledger.grant(uid, 11, idempotency_key="k")
    with pytest.raises(InvalidArgument, match="unknown transaction type"):
        ledger.grant(uid, 1, idempotency_key="k2", transaction_type="gift")
    with pytest.raises(InsufficientCredits) as exc:
        ledger.deduct(uid, 11, idempotency_key="k3")
    assert (exc.value.balance, exc.value.requested) == (10, 11)
    # the refusal is recorded for the audit, the balance untouched
    failures = conn.execute("SELECT user_id, amount, balance FROM public.points_deduction_failures").fetchall()
    assert failures == [(uid, 11, 10)]
    assert ledger.balance(uid).balance == 10


def test_resolution_layers_in_one_batch(ledger: Ledger, conn: psycopg.Connection) -> None:
    mapped, sid = make_user(conn)
    via_meta, _ = make_user(conn, mapped_to=False)
    meta_id = uuid.uuid4()
    make_subscription(conn, via_meta, metadata={"resolved_supabase_user_id": "garbage",
                                                "supabase_user_id": str(meta_id)})
    legacy, _ = make_user(conn, mapped_to=False)
    legacy_id = uuid.uuid4()
    make_subscription(conn, legacy, metadata={"original_userId": str(legacy_id)})
    bare, _ = make_user(conn, mapped_to=False)
    # the mapping wins over metadata
    make_subscription(conn, mapped, metadata={"resolved_supabase_user_id": str(uuid.uuid4())})

    got = ledger.resolve_user_ids([mapped, via_meta, legacy, bare, uuid.uuid4()])
    assert {k: (v.user_id, v.source) for k, v in got.items()} == {
        mapped: (sid, "mapping"),
        via_meta: (meta_id, "metadata"),
        legacy: (legacy_id, "metadata"),
        bare: (bare, "bestauth_id"),
    }
    with pytest.raises(UnknownUser):
        ledger.resolve_user_id(uuid.uuid4())


def test_find_user_by_email_bestauth_id_and_points_id(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn, "Someone@Example.com".lower())
    assert ledger.find_user("  SOMEONE@example.com ").user_id == sid
    assert ledger.find_user(str(bid)).user_id == sid
    assert ledger.find_user(str(sid)).bestauth_user_id == bid
    with pytest.raises(UnknownUser):
        ledger.find_user("nobody@example.com")
    with pytest.raises(UnknownUser):
        ledger.find_user(str(uuid.uuid4()))
    for bad in ("not an email@", "a@b", "x' OR '1'='1@example.com", "é@例え.jp"):
        with pytest.raises(InvalidArgument):
            ledger.find_user(bad)


def test_ensure_mapping_creates_once_and_refuses_conflicts(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, _ = make_user(conn, mapped_to=False)
    hint = uuid.uuid4()
    make_subscription(conn, bid, metadata={"supabase_user_id": str(hint)})
    assert ledger.ensure_mapping(bid) == hint
    assert ledger.ensure_mapping(bid, uuid.uuid4()) == hint  # an existing mapping is never overwritten
    other, _ = make_user(conn, mapped_to=False)
    from ledger import AmbiguousUser

    with pytest.raises(AmbiguousUser):
        ledger.ensure_mapping(other, hint)  # already somebody else's points id


def test_paid_generation_charges_configured_cost_once_per_job(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn)
    make_subscription(conn, bid, tier="pro")
    ledger.grant(sid, 105, idempotency_key="g", transaction_type="subscription_grant")
    check = ledger.may_generate(bid, "video")
    assert check.allowed and check.cost == 100 and check.tier == "pro"
    charge = ledger.charge_generation(bid, "video", "job-1")
    assert (charge.cost, charge.new_balance, charge.duplicate) == (100, 5, False)
    assert ledger.charge_generation(bid, "video", "job-1").duplicate  # a retried job is charged once
    assert not ledger.may_generate(bid, "image").allowed  # 5 < 10
    with pytest.raises(InsufficientCredits):
        ledger.charge_generation(bid, "image", "job-2")
    with pytest.raises(ConfigError):
        ledger.may_generate(bid, "audio")


def test_free_daily_limit_counted_in_the_database(db_url: str, conn: psycopg.Connection) -> None:
    from ledger.config import FreeTierConfig

    cfg = CreditsConfig(free=FreeTierConfig(daily_limit=2))
    with Ledger.connect(db_url, cfg) as ledger:  # migrate syncs the limit into ledger_settings
        bid, _ = make_user(conn)
        assert ledger.may_generate(bid, "image").remaining_today == 2
        ledger.charge_generation(bid, "image", "f1")
        assert ledger.charge_generation(bid, "image", "f1").duplicate
        ledger.charge_generation(bid, "image", "f2")
        assert not ledger.may_generate(bid, "image").allowed
        with pytest.raises(InsufficientCredits, match="daily limit"):
            ledger.charge_generation(bid, "image", "f3")
    assert count_rows(conn, "points_transactions") == 0


def test_unknown_tier_in_database_is_a_config_error(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, _ = make_user(conn)
    make_subscription(conn, bid, tier="pro_plus")
    cfg = CreditsConfig(tiers={"pro": CreditsConfig().tiers["pro"]})
    narrow = Ledger(ledger.pool, cfg, ledger.url)
    with pytest.raises(ConfigError, match="pro_plus"):
        narrow.may_generate(bid, "image")
