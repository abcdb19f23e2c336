"""Hostile input: quotes, SQL fragments, Unicode, NUL, very long strings, wrong types -- through the CLI,
the module and the config file. Each is refused with a clear message and writes nothing, or (where it
is legitimate data, like a key or a description) is stored verbatim and changes nothing else."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import psycopg
import pytest

from ledger import (
    ConfigError,
    IdempotencyConflict,
    InvalidAmount,
    InvalidArgument,
    Ledger,
    SubscriptionEvent,
    UnknownUser,
)
from ledger.config import load_config
from tests.cli_helpers import run_cli
from tests.factories import count_rows, make_user
from tests.invariants import assert_consistent

SQL_FRAGMENTS = [
    "x' OR 1=1 --",
    "'; DROP TABLE points_balances; --",
    "Robert'); DELETE FROM points_transactions; --",
    "1; UPDATE points_balances SET balance = 1000000",
    "' UNION SELECT user_id, balance FROM points_balances --",
    "$$; DROP TABLE points_transactions; $$",
    "%s %(id)s {} \\' \\\\",
]
UNICODE = ["zoë@exämple.com", "用户@例子.中国", "🔑🔑🔑", "\u202egnp.exe", "ǅ\u0301\u200b"]
LONG = "\u00e9\u4e2d" * 500  # 1,000 characters of 2- and 3-byte UTF-8: the longest description allowed


def _tables(conn: psycopg.Connection) -> tuple[int, ...]:
    return tuple(count_rows(conn, t) for t in ("points_transactions", "points_balances", "points_reservations",
                                                "bestauth_users", "user_id_mapping", "subscriptions_consolidated"))


# ------------------------------------------------------------------------------------------ module

# (cases loop inside one test each: one database per test, not per case)

def test_user_references_are_refused_before_sql(ledger: Ledger, conn: psycopg.Connection) -> None:
    make_user(conn, "real@example.com")
    before = _tables(conn)
    for ref in SQL_FRAGMENTS + UNICODE + [LONG, "a\x00b@example.com", " ", "", "%", "_@_._"]:
        with pytest.raises((InvalidArgument, UnknownUser)) as exc:
            ledger.find_user(ref)
        assert len(str(exc.value)) < 200, ref[:80]  # the echo of a 100k string is cut short
        with pytest.raises(InvalidArgument):
            ledger.grant(ref, 5, idempotency_key="k")
        with pytest.raises(InvalidArgument):
            ledger.reserve(ref, 5, job_id="j")
    for bad in (None, 42, 4.2, b"bytes", ["list"], uuid.uuid4().hex * 3):
        with pytest.raises(InvalidArgument):
            ledger.balance(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            ledger.deduct(bad, 1, idempotency_key="k")  # type: ignore[arg-type]
    assert _tables(conn) == before


def test_hostile_amounts_are_refused(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    for amount in ("10; DROP TABLE points_balances", "1e3", 2**70, float("inf"), math.nan, -0.0, True, None, [10]):
        for call in (lambda: ledger.grant(uid, amount, idempotency_key="k"),  # type: ignore[arg-type]
                     lambda: ledger.deduct(uid, amount, idempotency_key="k"),  # type: ignore[arg-type]
                     lambda: ledger.reserve(uid, amount, job_id="j")):  # type: ignore[arg-type]
            with pytest.raises(InvalidAmount):
                call()
    assert count_rows(conn, "points_transactions") == 0


def test_sql_and_unicode_in_keys_descriptions_and_metadata_are_stored_verbatim(
        ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    texts = SQL_FRAGMENTS + UNICODE
    for i, text in enumerate(texts):
        ledger.grant(uid, 10, idempotency_key=text, description=text, metadata={"note": text, text: [text]})
        ledger.reserve(uid, 1, job_id=text, metadata={"prompt": text})
        ledger.capture(text)
    ledger.grant(uid, 1, idempotency_key="long-description", description=LONG)
    rows = conn.execute("SELECT idempotency_key, description, metadata FROM public.points_transactions "
                        "WHERE transaction_type = 'adjustment' ORDER BY id").fetchall()
    assert [r[0] for r in rows[:-1]] == texts and [r[1] for r in rows[:-1]] == texts
    assert all(r[2]["note"] == t and r[2][t] == [t] for r, t in zip(rows, texts))
    assert rows[-1][1] == LONG
    captures = conn.execute("SELECT idempotency_key FROM public.points_transactions "
                            "WHERE transaction_type = 'generation_deduction' ORDER BY id").fetchall()
    assert [r[0] for r in captures] == [f"capture:{t}" for t in texts]
    # a replay of a hostile key is still just a replay
    assert ledger.grant(uid, 10, idempotency_key=texts[1], description=texts[1]).duplicate
    with pytest.raises(IdempotencyConflict):
        ledger.grant(uid, 11, idempotency_key=texts[1])
    assert ledger.balance(uid).balance == 10 * len(texts) - len(texts) + 1
    assert count_rows(conn, "points_balances") == 1  # nothing but this user was touched
    assert_consistent(conn)


def test_text_postgres_cannot_store_is_refused_with_a_typed_error(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    for field, value in [
        ("idempotency_key", "k\x00ey"), ("idempotency_key", "\ud800"), ("idempotency_key", "k" * 513),
        ("idempotency_key", ""), ("description", "nul\x00here"), ("description", "\udfff"),
        ("metadata", {"x": "nul\x00"}), ("metadata", {"x": float("nan")}), ("metadata", {"x": "\ud800"}),
        ("transaction_type", "adjustment' OR 'x'='x"), ("transaction_type", "ADJUSTMENT"),
        ("transaction_type", "adjustment\x00"), ("transaction_type", 7),
    ]:
        kwargs = {"idempotency_key": "ok-key", field: value}
        with pytest.raises(InvalidArgument):
            ledger.grant(uid, 5, **kwargs)  # type: ignore[arg-type]
    assert count_rows(conn, "points_transactions") == 0
    ledger.grant(uid, 10, idempotency_key="g")
    for job in ("j\x00b", "\ud800", "j" * 481, ""):
        for call in (lambda: ledger.reserve(uid, 1, job_id=job), lambda: ledger.capture(job),
                     lambda: ledger.release(job)):
            with pytest.raises(InvalidArgument):
                call()
    with pytest.raises(InvalidArgument):
        ledger.reserve(uid, 1, job_id="j", metadata={"prompt": "nul\x00"})
    assert count_rows(conn, "points_reservations") == 0


def test_hostile_subscription_metadata_cannot_redirect_a_grant(ledger: Ledger, conn: psycopg.Connection) -> None:
    from datetime import datetime, timedelta, timezone

    bid, _ = make_user(conn, mapped_to=False)
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    event = SubscriptionEvent(
        bestauth_user_id=bid, tier="pro", billing_cycle="monthly", status="active", current_period_start=start,
        current_period_end=start + timedelta(days=30), event_id="evt'; DROP TABLE points_transactions; --",
        metadata={"original_userId": "'; DROP TABLE user_id_mapping; --", "supabase_user_id": "not-a-uuid",
                  "note": "\u202e🔑"})
    result = ledger.handle_subscription_event(event)
    assert result.user_id == bid  # no valid UUID in the metadata: the BestAuth id itself
    assert result.granted == 800
    stored = conn.execute("SELECT metadata FROM public.subscriptions_consolidated").fetchone()[0]
    assert stored["original_userId"] == "'; DROP TABLE user_id_mapping; --" and stored["note"] == "\u202e🔑"
    assert count_rows(conn, "user_id_mapping") == 1
    assert_consistent(conn)


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("text,key", [
    ("[reservations]\nttl_seconds = '1h'\n", "reservations.ttl_seconds"),
    ("[reservations]\nttl_seconds = 0\n", "reservations.ttl_seconds"),
    ("[reservations]\nttl_seconds = 99999999999\n", "reservations.ttl_seconds"),
    ("[reservations]\nttl_seconds = 3600.0\n", "reservations.ttl_seconds"),
    ("[database]\npool_max_size = 1.5\n", "database.pool_max_size"),
    ("[database]\nservice_role = \"" + "r" * 64 + "\"\n", "database.service_role"),
    ("[database]\nservice_role = \"rôle\"\n", "database.service_role"),
    ("[database]\nservice_role = \"Robert'); DROP ROLE postgres; --\"\n", "database.service_role"),
    ("[database]\nservice_role = 7\n", "database.service_role"),
    ("tiers = 'pro'\n", "tiers"),
    ("[tiers.\"pro'; DROP\"]\nmonthly = 1\nyearly = 1\n", "tiers"),
    ("[generation_costs]\nimage = '10'\n", "generation_costs.image"),
    ("[limits]\nmax_operation_amount = [1]\n", "limits.max_operation_amount"),
    ("[free]\ndaily_limit = -1\n", "free.daily_limit"),
    ("reservations = 5\n", "reservations"),
    ("[reservation]\nttl_seconds = 5\n", "reservation"),
])
def test_config_with_wrong_types_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    file = tmp_path / "credits.toml"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_config(file)
    assert key in str(exc.value)


def test_config_that_is_not_text(tmp_path: Path) -> None:
    file = tmp_path / "credits.toml"
    file.write_bytes(b"\xff\xfe[tiers]\x00")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(file)


# ------------------------------------------------------------------------------------------ CLI

def test_cli_refuses_hostile_arguments_with_exit_3_and_writes_nothing(db_url: str, conn: psycopg.Connection,
                                                                       tmp_path: Path) -> None:
    make_user(conn, "ann@example.com")
    before = _tables(conn)
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[tiers.pro]\nmonthly = \"800; DROP TABLE x\"\nyearly = 1\n")
    cases = [
        (("balance", "x' OR 1=1 --"), "not an email or a UUID", None),
        (("balance", "'; DROP TABLE points_balances; --@example.com"), "not a valid email", None),
        (("grant", "zoë@exämple.com", "10"), "not a valid email", None),
        (("grant", "a" * 5000 + "@example.com", "10"), "not a valid email", None),
        (("grant", "ann@example.com", "10; DROP TABLE points_balances"), "whole number", None),
        (("grant", "ann@example.com", "10", "--type", "adjustment' OR '1'='1"), "unknown transaction type", None),
        (("grant", "ann@example.com", "10", "--key", "k" * 600), "idempotency key", None),
        (("history", "ann@example.com", "-n", "1; DROP TABLE x"), "valid integer", None),
        (("grant", "ann@example.com", "10"), "tiers.pro.monthly", {"CREDITS_CONFIG": str(bad_config)}),
    ]
    for args, message, env in cases:
        r = run_cli(db_url, *args, env=env)
        assert r.code == 3, (args, r.stdout, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr) < 600, (args, r.stderr)
    assert _tables(conn) == before


def test_cli_stores_a_hostile_reason_and_key_verbatim(db_url: str, conn: psycopg.Connection) -> None:
    make_user(conn, "bob@example.com")
    reason, key = "Robert'); DROP TABLE points_transactions; --", "🔑'; --"
    r = run_cli(db_url, "grant", "bob@example.com", "25", "--reason", reason, "--key", key, "--json")
    assert r.code == 0, r.stderr
    assert conn.execute("SELECT description, idempotency_key FROM public.points_transactions").fetchall() == [
        (reason, key)]
    assert run_cli(db_url, "grant", "bob@example.com", "25", "--reason", reason, "--key", key, "--json"
                   ).json()["duplicate"] is True


def test_oversized_descriptions_are_refused_by_module_and_table(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    ledger.grant(uid, 10, idempotency_key="ok", description="x" * 1000)
    with pytest.raises(InvalidArgument, match="1000 characters"):
        ledger.grant(uid, 10, idempotency_key="big", description="x" * 1001)
    # the app calling the function directly (RPC) meets the same limit, on the fast path too
    for sql_call in ("SELECT * FROM public.add_points(%s, 5, 'adjustment', %s, 'rpc-add')",
                     "SELECT * FROM public.deduct_points(%s, 5, 'generation_deduction', %s, 'rpc-deduct')"):
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(sql_call, (uid, "y" * 5000))
    assert conn.execute("SELECT count(*), sum(amount) FROM public.points_transactions").fetchone() == (1, 10)
    assert ledger.balance(uid).balance == 10
