"""Webhook events with ids and times: retried (no-op), stale (nothing changes, and says so), refused
(clear error + recorded), and plan changes inside a period (upgrade prorated, downgrade at period end)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from fractions import Fraction

import psycopg
import pytest

from ledger import ConfigError, CreditsConfig, IdempotencyConflict, Ledger, SubscriptionEvent, UnknownUser
from ledger.config import LifecycleConfig, TierConfig
from tests.factories import count_rows, ledger_sum, make_user
from tests.invariants import assert_consistent

NOW = datetime.now(timezone.utc).replace(microsecond=0)
START = NOW - timedelta(days=10)
END = START + timedelta(days=30)


def _event(bid: uuid.UUID, **kw: object) -> SubscriptionEvent:
    base = dict(bestauth_user_id=bid, tier="pro", billing_cycle="monthly", status="active",
                current_period_start=START, current_period_end=END, event_id=f"evt_{uuid.uuid4().hex[:12]}",
                event_time=START)
    base.update(kw)
    return SubscriptionEvent(**base)  # type: ignore[arg-type]


def _sub(conn: psycopg.Connection, bid: uuid.UUID) -> tuple:
    return conn.execute("""SELECT tier, billing_cycle, status, current_period_start, metadata
                             FROM public.subscriptions_consolidated WHERE user_id = %s""", (bid,)).fetchone()


def test_retried_event_is_answered_from_its_record(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn)
    first = ledger.handle_subscription_event(_event(bid, event_id="evt_same"))
    rows = count_rows(conn, "points_transactions")
    again = ledger.handle_subscription_event(_event(bid, event_id="evt_same"))
    assert again.replayed and again.duplicate and not first.replayed
    assert (again.granted, again.transaction_id, again.subscription_id) == (800, first.transaction_id,
                                                                             first.subscription_id)
    assert count_rows(conn, "points_transactions") == rows == 1 and ledger_sum(conn, sid) == 800
    rec = conn.execute("SELECT outcome, event_time, received_at FROM public.subscription_events "
                       "WHERE event_id = 'evt_same'").fetchone()
    assert rec[0] == "applied" and rec[1] == START and rec[2] > START  # event time kept apart from receipt
    # the same id for another user is a caller bug, never a replay
    other, _ = make_user(conn)
    with pytest.raises(IdempotencyConflict):
        ledger.handle_subscription_event(_event(other, event_id="evt_same"))


def test_stale_event_changes_nothing_and_says_so(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn)
    nxt = END
    renewal = _event(bid, current_period_start=nxt, current_period_end=nxt + timedelta(days=30),
                     event_time=nxt + timedelta(minutes=1))
    ledger.handle_subscription_event(renewal)
    before = _sub(conn, bid)
    # the older period's event arrives late: it would move the subscription back a period
    late = _event(bid, event_time=START + timedelta(minutes=5))
    res = ledger.handle_subscription_event(late)
    assert res.stale and res.granted == 0 and not res.duplicate and "stale" in res.detail
    assert _sub(conn, bid) == before and ledger_sum(conn, sid) == 800
    assert conn.execute("SELECT outcome FROM public.subscription_events WHERE event_id = %s",
                        (late.event_id,)).fetchone() == ("stale",)
    # a late cancellation is stale too; a newer one applies
    cancel_old = _event(bid, status="canceled", event_time=START + timedelta(days=1))
    assert ledger.handle_subscription_event(cancel_old).stale and _sub(conn, bid)[2] == "active"
    cancel_new = _event(bid, status="canceled", current_period_start=nxt, current_period_end=nxt + timedelta(days=30),
                        event_time=nxt + timedelta(days=2))
    assert not ledger.handle_subscription_event(cancel_new).stale and _sub(conn, bid)[2] == "canceled"
    # the stale one replayed: still a no-op, still stale
    again = ledger.handle_subscription_event(late)
    assert again.replayed and again.stale
    assert_consistent(conn)


def test_events_without_time_are_never_stale(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn)
    ledger.handle_subscription_event(_event(bid, current_period_start=END, current_period_end=END + timedelta(days=30),
                                            event_time=END))
    res = ledger.handle_subscription_event(_event(bid, event_time=None))  # older period, no time: applied
    assert not res.stale and res.granted == 800 and ledger_sum(conn, sid) == 1600


def test_refused_events_raise_and_are_recorded(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, _ = make_user(conn)
    ghost = uuid.uuid4()
    with pytest.raises(UnknownUser, match=str(ghost)):
        ledger.handle_subscription_event(_event(ghost, event_id="evt_ghost"))
    with pytest.raises(ConfigError, match="enterprise"):
        ledger.handle_subscription_event(_event(bid, tier="enterprise", event_id="evt_enterprise"))
    lean = Ledger(ledger.pool, CreditsConfig(tiers={"pro": TierConfig(monthly=800, yearly=9600)}), ledger.url)
    with pytest.raises(ConfigError, match="pro_plus"):  # a real tier, missing from this deployment's config
        lean.handle_subscription_event(_event(bid, tier="pro_plus", event_id="evt_no_plus"))
    rows = conn.execute("""SELECT event_id, bestauth_ref, reason, message, payload ->> 'tier', event_time
                             FROM public.subscription_event_refusals ORDER BY id""").fetchall()
    assert [(r[0], r[2]) for r in rows] == [("evt_ghost", "unknown_user"), ("evt_enterprise", "unknown_tier"),
                                            ("evt_no_plus", "unknown_tier")]
    assert rows[0][1] == str(ghost) and str(ghost) in rows[0][3] and rows[1][4] == "enterprise"
    assert rows[0][5] == START
    assert count_rows(conn, "points_transactions") == count_rows(conn, "subscription_events") == 0
    # a refused event was not processed: once the cause is fixed, the same event applies
    assert ledger.handle_subscription_event(_event(bid, event_id="evt_no_plus", tier="pro_plus")).granted == 2000


def _ledger_with(ledger: Ledger, rounding: str = "down") -> Ledger:
    return Ledger(ledger.pool, CreditsConfig(lifecycle=LifecycleConfig(proration_rounding=rounding)), ledger.url)


def test_upgrade_mid_period_grants_the_prorated_difference_once(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn)
    ledger.handle_subscription_event(_event(bid))
    at = START + timedelta(days=10)  # 2/3 of the period left
    up = _event(bid, tier="pro_plus", event_time=at)
    res = ledger.handle_subscription_event(up)
    assert (res.plan_change, res.granted, res.duplicate) == ("upgrade", 800, False)  # (2000 - 800) x 2/3
    row = conn.execute("""SELECT amount, transaction_type, idempotency_key, metadata FROM public.points_transactions
                           WHERE id = %s""", (res.transaction_id,)).fetchone()
    period = START.date().isoformat()
    assert row[:3] == (800, "plan_change", f"plan_change:{res.subscription_id}:{period}:pro.monthly>pro_plus.monthly")
    assert row[3]["fraction_left"] == "2/3" and row[3]["lot"]["priority"] == 50
    assert _sub(conn, bid)[:3] == ("pro_plus", "monthly", "active") and ledger_sum(conn, sid) == 1600
    # the same upgrade delivered again under another id: nothing more
    again = ledger.handle_subscription_event(_event(bid, tier="pro_plus", event_time=at + timedelta(seconds=1)))
    assert again.plan_change is None and again.duplicate and ledger_sum(conn, sid) == 1600
    change = conn.execute("""SELECT kind, from_tier, to_tier, fraction_left, proration, credits, transaction_id
                               FROM public.subscription_plan_changes""").fetchall()
    assert change == [("upgrade", "pro", "pro_plus", "2/3", {"exact": "800/1", "granted": 800}, 800,
                       res.transaction_id)]
    # the period's own grant stays the period's: no duplicate period grant for the audit to find
    assert conn.execute("SELECT count(*) FROM public.points_transactions WHERE transaction_type = "
                        "'subscription_grant'").fetchone()[0] == 1
    assert_consistent(conn)


@pytest.mark.parametrize("rounding,expected", [("down", 171), ("half_even", 171), ("up", 172)])
def test_upgrade_rounding_policy(ledger: Ledger, conn: psycopg.Connection, rounding: str, expected: int) -> None:
    bid, _ = make_user(conn)
    start = NOW - timedelta(days=6)
    led = _ledger_with(ledger, rounding)
    led.handle_subscription_event(_event(bid, current_period_start=start, current_period_end=start + timedelta(days=7),
                                         event_time=start))
    res = led.handle_subscription_event(_event(bid, tier="pro_plus", current_period_start=start,
                                               current_period_end=start + timedelta(days=7),
                                               event_time=start + timedelta(days=6)))
    assert res.granted == expected  # 1200 x 1/7 = 171.43


def test_downgrade_waits_for_the_period_end(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn)
    ledger.handle_subscription_event(_event(bid, tier="pro_plus"))
    down = ledger.handle_subscription_event(_event(bid, tier="pro", event_time=START + timedelta(days=5)))
    assert (down.plan_change, down.granted) == ("downgrade", 0) and "period's end" in down.detail
    tier, cycle, status, start, meta = _sub(conn, bid)
    assert (tier, cycle, status, start) == ("pro_plus", "monthly", "active", START)  # unchanged until the end
    assert meta["pending_plan"]["tier"] == "pro" and meta["pending_plan"]["effective_at"] == END.isoformat()
    assert ledger_sum(conn, sid) == 2000
    # the next period arrives at the lower plan: granted at it, and nothing is pending any more
    nxt = ledger.handle_subscription_event(_event(bid, tier="pro", current_period_start=END,
                                                  current_period_end=END + timedelta(days=30), event_time=END))
    assert nxt.granted == 800 and ledger_sum(conn, sid) == 2800
    assert "pending_plan" not in _sub(conn, bid)[4] and _sub(conn, bid)[0] == "pro"


def test_confirming_the_current_plan_cancels_a_pending_downgrade(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn)
    ledger.handle_subscription_event(_event(bid, tier="pro_plus"))
    ledger.handle_subscription_event(_event(bid, tier="pro", event_time=START + timedelta(days=1)))
    res = ledger.handle_subscription_event(_event(bid, tier="pro_plus", event_time=START + timedelta(days=2)))
    assert res.duplicate and res.granted == 2000 and ledger_sum(conn, sid) == 2000
    assert "pending_plan" not in _sub(conn, bid)[4]
    kinds = [r[0] for r in conn.execute("SELECT kind FROM public.subscription_plan_changes ORDER BY id")]
    assert kinds == ["downgrade", "downgrade_canceled"]


def test_monthly_to_yearly_follows_the_same_rules(ledger: Ledger, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn)
    ledger.handle_subscription_event(_event(bid))
    year_end = START + timedelta(days=365)
    # same period start, the plan is now yearly: 9600 - 800 prorated over the yearly period (355 of 365 days)
    res = ledger.handle_subscription_event(_event(bid, billing_cycle="yearly", current_period_end=year_end,
                                                  event_time=START + timedelta(days=10)))
    assert res.plan_change == "upgrade" and res.granted == int(Fraction(8800 * 355, 365))
    assert _sub(conn, bid)[:2] == ("pro", "yearly")
    # and back to monthly inside the year: a downgrade, at the period's end
    back = ledger.handle_subscription_event(_event(bid, current_period_end=year_end,
                                                   event_time=START + timedelta(days=20)))
    assert back.plan_change == "downgrade" and back.granted == 0
    assert ledger_sum(conn, sid) == 800 + res.granted


def test_several_upgrades_in_one_period_round_once(ledger: Ledger, conn: psycopg.Connection) -> None:
    """pro -> pro_plus at 1/7 left, with a custom middle tier: the period's prorated total is rounded once."""
    cfg = CreditsConfig(tiers={"pro": TierConfig(monthly=800, yearly=9600),
                               "pro_plus": TierConfig(monthly=2001, yearly=24000)})
    led = Ledger(ledger.pool, cfg, ledger.url)
    bid, sid = make_user(conn)
    start = NOW - timedelta(days=6)
    kw = dict(current_period_start=start, current_period_end=start + timedelta(days=7))
    led.handle_subscription_event(_event(bid, **kw, event_time=start))
    up = led.handle_subscription_event(_event(bid, tier="pro_plus", **kw, event_time=start + timedelta(days=6)))
    assert up.granted == 171  # floor(1201 / 7) = 171 (171.57)
    assert ledger_sum(conn, sid) == 800 + 171
