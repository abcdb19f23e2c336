"""The webhook flow: upsert, map, record the resolved id, grant under the period key, never twice."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from ledger import ConfigError, InvalidArgument, Ledger, SubscriptionEvent, UnknownUser
from tests.factories import count_rows, ledger_sum, make_user

START = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _event(bid: uuid.UUID, **kw: object) -> SubscriptionEvent:
    base = dict(bestauth_user_id=bid, tier="pro", billing_cycle="monthly", status="active",
                current_period_start=START, current_period_end=START + timedelta(days=30), event_id="evt_1")
    base.update(kw)
    return SubscriptionEvent(**base)  # type: ignore[arg-type]


def test_event_for_unmapped_user_maps_records_and_grants(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, _ = make_user(conn, mapped_to=False)
    legacy = uuid.uuid4()
    res = ledger.handle_subscription_event(_event(bid, metadata={"original_userId": str(legacy)}))
    assert (res.user_id, res.granted, res.duplicate, res.new_balance) == (legacy, 800, False, 800)
    assert conn.execute("SELECT supabase_user_id FROM public.user_id_mapping WHERE bestauth_user_id = %s",
                        (bid,)).fetchone() == (legacy,)
    meta = conn.execute("SELECT id, metadata FROM public.subscriptions_consolidated WHERE user_id = %s",
                        (bid,)).fetchone()
    assert meta[1]["resolved_supabase_user_id"] == str(legacy)
    key = conn.execute("SELECT idempotency_key FROM public.points_transactions WHERE user_id = %s",
                       (legacy,)).fetchone()[0]
    assert key == f"subscription_grant:{meta[0]}:2026-11-01"


def test_retried_event_grants_once_and_renewal_grants_next_period(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn)
    first = ledger.handle_subscription_event(_event(bid))
    retry = ledger.handle_subscription_event(_event(bid, event_id="evt_1_retry"))
    assert retry.duplicate and retry.transaction_id == first.transaction_id
    assert ledger_sum(conn, sid) == 800
    nxt = START + timedelta(days=30)
    renewal = ledger.handle_subscription_event(_event(bid, current_period_start=nxt,
                                                      current_period_end=nxt + timedelta(days=30), event_id="evt_2"))
    assert not renewal.duplicate and renewal.new_balance == 1600
    assert count_rows(conn, "points_transactions") == 2


def test_yearly_pro_plus_uses_config_allocation(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn)
    res = ledger.handle_subscription_event(_event(bid, tier="pro_plus", billing_cycle="yearly",
                                                  current_period_end=START + timedelta(days=365)))
    assert res.granted == 24000 == ledger_sum(conn, sid)


@pytest.mark.parametrize("status", ["canceled", "expired", "past_due"])
def test_unpaid_states_update_but_grant_nothing(ledger: Ledger, conn: psycopg.Connection, status: str) -> None:
    bid, _ = make_user(conn)
    res = ledger.handle_subscription_event(_event(bid, status=status))
    assert res.granted == 0
    assert count_rows(conn, "points_transactions") == 0
    assert conn.execute("SELECT status FROM public.subscriptions_consolidated WHERE user_id = %s",
                        (bid,)).fetchone() == (status,)


def test_failures_are_loud_and_write_nothing(ledger: Ledger, conn: psycopg.Connection,
                                             caplog: pytest.LogCaptureFixture) -> None:
    bid, _ = make_user(conn)
    caplog.set_level(logging.CRITICAL, logger="ledger.subscriptions")
    with pytest.raises(UnknownUser):
        ledger.handle_subscription_event(_event(uuid.uuid4()))
    with pytest.raises(ConfigError):
        ledger.handle_subscription_event(_event(bid, tier="enterprise"))
    with pytest.raises(InvalidArgument):
        ledger.handle_subscription_event(_event(bid, current_period_end=START))  # end before start
    with pytest.raises(InvalidArgument):
        ledger.handle_subscription_event(_event("not-a-uuid"))
    assert count_rows(conn, "points_transactions") == 0
    assert count_rows(conn, "subscriptions_consolidated") == 0
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 4 and all("period" in r.getMessage() for r in critical)


def test_grant_failure_rolls_back_subscription_change(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, _ = make_user(conn)
    conn.execute("UPDATE public.ledger_settings SET value = '100' WHERE name = 'max_operation_amount'")
    from ledger import InvalidAmount

    with pytest.raises(InvalidAmount):
        ledger.handle_subscription_event(_event(bid))  # 800 > the database's per-operation maximum
    assert count_rows(conn, "subscriptions_consolidated") == 0
    assert count_rows(conn, "user_id_mapping") == 1  # the pre-existing mapping only
