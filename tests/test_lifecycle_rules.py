"""The four credit-lifecycle audit rules (expiry_applied, lots_consistent, refunds_bounded,
plan_change_grants) against hand-built cases: each planted fault found by its rule, none of the healthy
look-alikes flagged, the fixable ones fixed by a live run, and a second live run applying nothing."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from checks.audit import audit_and_fix, run_audit
from checks.fixes import apply_fixes
from checks.rules import RULES
from ledger import CreditsConfig, Ledger, SubscriptionEvent
from tests.factories import ledger_sum, make_subscription, make_user

LIFECYCLE = ["expiry_applied", "lots_consistent", "refunds_bounded", "plan_change_grants"]


def _add(conn: psycopg.Connection, uid: Any, amount: int, type_: str = "adjustment", *, key: str | None = None,
         meta: dict[str, Any] | None = None, expires_at: datetime | None = None) -> int:
    return conn.execute("SELECT transaction_id FROM public.add_points(%s, %s, %s, 'test', %s, %s, %s)",
                        (uid, amount, type_, key or f"t:{uuid.uuid4()}", Jsonb(meta or {}), expires_at)).fetchone()[0]


def _deduct(conn: psycopg.Connection, uid: Any, amount: int, key: str | None = None) -> int:
    return conn.execute("SELECT transaction_id FROM public.deduct_points(%s, %s, 'generation_deduction', 'gen', %s)",
                        (uid, amount, key or f"generation:{uuid.uuid4()}")).fetchone()[0]


def _now(conn: psycopg.Connection) -> datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def _event(bid: uuid.UUID, start: datetime, **kw: Any) -> SubscriptionEvent:
    base = dict(bestauth_user_id=bid, tier="pro", billing_cycle="monthly", status="active",
                current_period_start=start, current_period_end=start + timedelta(days=30),
                event_id=f"evt_{uuid.uuid4().hex[:12]}", event_time=start)
    base.update(kw)
    return SubscriptionEvent(**base)  # type: ignore[arg-type]


def build(conn: psycopg.Connection, ledger: Ledger) -> tuple[dict[str, tuple[uuid.UUID, uuid.UUID]], datetime]:
    """Every case in one database; returns name -> (BestAuth id, points id) and an instant before the
    last write (the second refund of 'refunded_twice')."""
    users: dict[str, tuple[uuid.UUID, uuid.UUID]] = {}

    def user(name: str) -> uuid.UUID:
        bid, pid = make_user(conn, f"{name}@example.com")
        users[name] = (bid, pid)  # type: ignore[assignment]
        return pid  # type: ignore[return-value]

    # look-alike first (it needs a couple of seconds to pass its expiry): a top-up whose credits are all
    # held by an active reservation placed before the lot expired
    held = user("held_past_expiry")
    held_expiry = _now(conn) + timedelta(seconds=2)
    _add(conn, held, 300, "top_up", expires_at=held_expiry)
    conn.execute("SELECT * FROM public.reserve_points(%s, 300, 'job-held', 3600)", (held,))

    past, future = _now(conn) - timedelta(days=2), _now(conn) + timedelta(days=28)
    # fault: a top-up past its expiry never written off (nobody touched the user, no sweep ran)
    _add(conn, user("expired_unwritten"), 200, "adjustment")  # credits that never expire stay
    _add(conn, users["expired_unwritten"][1], 500, "top_up", expires_at=past)
    # look-alike: a period's credits rolled over within the cap (the lazy path ran: 300 expired, 200 kept)
    rolled = user("rolled_over")
    _add(conn, rolled, 500, "subscription_grant",
         meta={"lot": {"expires_at": past.isoformat(), "rollover_cap": 200, "rollover_until": future.isoformat()}})
    conn.execute("SELECT * FROM public.current_balance(%s)", (rolled,))
    # look-alike: due but wholly within its rollover cap, the lazy path not run yet: nothing would expire
    _add(conn, user("rollover_pending"), 150, "subscription_grant",
         meta={"lot": {"expires_at": past.isoformat(), "rollover_cap": 200, "rollover_until": future.isoformat()}})
    # look-alike: a top-up that expires in the future
    _add(conn, user("top_up_future"), 500, "top_up", expires_at=future)

    # fault: a lot whose remaining disagrees with its draws (and the lots no longer sum to the ledger)
    drift = user("lot_drift")
    _add(conn, drift, 100)
    _deduct(conn, drift, 30)
    conn.execute("UPDATE public.points_lots SET remaining = remaining + 5 WHERE user_id = %s", (drift,))
    # fault: a draw no lot covered (the lot was emptied behind the ledger's back, then a deduction came)
    uncovered = user("uncovered_draw")
    _add(conn, uncovered, 50)
    conn.execute("UPDATE public.points_lots SET remaining = 0 WHERE user_id = %s", (uncovered,))
    _deduct(conn, uncovered, 20)

    # fault: refunded more than it charged (a legacy refund row naming the deduction)
    over = user("over_refunded")
    _add(conn, over, 100)
    d_over = _deduct(conn, over, 20)
    _add(conn, over, 25, "refund", meta={"refund_of": d_over})
    # look-alikes: a partial refund through refund_generation; a legacy refund naming the deduction's key
    partial = user("partial_refund")
    _add(conn, partial, 100)
    conn.execute("SELECT * FROM public.refund_generation(%s, 10)", (_deduct(conn, partial, 30),))
    legacy = user("legacy_refund")
    _add(conn, legacy, 100)
    _deduct(conn, legacy, 30, key="generation:job_legacy")
    _add(conn, legacy, 30, "refund", key="refund:generation:job_legacy", meta={"refund_of": "generation:job_legacy"})

    # plan changes: a healthy upgrade and a pending downgrade through the webhook handler ...
    start = (_now(conn) - timedelta(days=10)).replace(microsecond=0)
    up_bid, _ = users.setdefault("upgraded", make_user(conn, "upgraded@example.com"))  # type: ignore[arg-type]
    ledger.handle_subscription_event(_event(up_bid, start))
    ledger.handle_subscription_event(_event(up_bid, start, tier="pro_plus", event_time=start + timedelta(days=5)))
    down_bid, _ = users.setdefault("downgrade_pending", make_user(conn, "down@example.com"))  # type: ignore[arg-type]
    ledger.handle_subscription_event(_event(down_bid, start, tier="pro_plus"))
    ledger.handle_subscription_event(_event(down_bid, start, tier="pro", event_time=start + timedelta(days=5)))
    # ... and a fault: an upgrade recorded without its grant
    nb = user("upgrade_without_grant")
    bid = users["upgrade_without_grant"][0]
    sub = make_subscription(conn, bid, tier="pro_plus", period_start=start)
    key = f"plan_change:{sub['id']}:{start.date().isoformat()}:pro.monthly>pro_plus.monthly"
    conn.execute("""SELECT public.record_plan_change(%s, %s, %s, %s, %s, 'pro', 'monthly', 'pro_plus', 'monthly',
                           'upgrade', %s, %s, '2/3', %s, 800, NULL, %s, 'evt_lost')""",
                 (sub["id"], bid, nb, sub["start"], sub["end"], start + timedelta(days=10), start + timedelta(days=10),
                  Jsonb({"exact": "800/1", "granted": 800}), key))

    # fault: a deduction refunded twice (refund_generation, then a support refund naming it) -- last
    twice = user("refunded_twice")
    _add(conn, twice, 100)
    d_twice = _deduct(conn, twice, 30)
    conn.execute("SELECT * FROM public.refund_generation(%s)", (d_twice,))
    before_last = _now(conn)
    _add(conn, twice, 30, "refund", meta={"refund_of": d_twice})

    wait = (held_expiry - _now(conn)).total_seconds() + 0.2
    if wait > 0:
        time.sleep(wait)
    return users, before_last


FAULTS = {"expiry_applied": {"expired_unwritten"}, "lots_consistent": {"lot_drift", "uncovered_draw"},
          "refunds_bounded": {"over_refunded", "refunded_twice"}, "plan_change_grants": {"upgrade_without_grant"}}


def test_registered_after_the_contract_rules() -> None:
    assert list(RULES)[7:] == LIFECYCLE
    assert {r: (RULES[r].severity, RULES[r].fixable) for r in LIFECYCLE} == {
        "expiry_applied": ("warning", True), "lots_consistent": ("critical", False),
        "refunds_bounded": ("critical", False), "plan_change_grants": ("warning", True)}
    assert all(RULES[r].suite_name == f"credit_recon.lifecycle.{r}" for r in LIFECYCLE)


def test_lifecycle_rules_find_faults_spare_lookalikes_and_fix(db_url: str, conn: psycopg.Connection,
                                                              ledger: Ledger, config: CreditsConfig) -> None:
    users, before_last = build(conn, ledger)
    name_of = {str(b): n for n, (b, _) in users.items()}

    report = run_audit(db_url, config, rules=LIFECYCLE)
    found = {r: {name_of.get(f.bestauth_user_id or "", f.bestauth_user_id) for f in res.findings}
             for r, res in report.results.items()}
    # lots_consistent must also report every user whose open lots do not sum to the ledger, or with a lot
    # holding more than it granted, whatever wrote them (a refund beyond the bounds returns credits to
    # lots the trigger does not cap today), judged here independently of the rule's SQL
    off = {name_of[str(b)] for (b,) in conn.execute(
        """SELECT m.bestauth_user_id FROM public.user_id_mapping m
            WHERE (SELECT coalesce(sum(remaining), 0) FROM public.points_lots l WHERE l.user_id = m.supabase_user_id)
               <> (SELECT coalesce(sum(amount), 0) FROM public.points_transactions t
                    WHERE t.user_id = m.supabase_user_id)
               OR EXISTS (SELECT 1 FROM public.points_lots l
                           WHERE l.user_id = m.supabase_user_id AND l.remaining > l.granted)""").fetchall()}
    assert off <= FAULTS["lots_consistent"] | FAULTS["refunds_bounded"]
    assert found == FAULTS | {"lots_consistent": FAULTS["lots_consistent"] | off}, [(f.rule, name_of.get(f.bestauth_user_id or ""), f.found) for f in report.findings]
    assert report.status == "CRITICAL"
    by = {(f.rule, name_of[f.bestauth_user_id]): f for f in report.findings}

    exp = by[("expiry_applied", "expired_unwritten")]
    assert exp.fix == "expire_lots" and exp.found["unexpired_credits"] == 500 and exp.expected["unexpired_credits"] == 0
    assert by[("lots_consistent", "lot_drift")].found["open_lots_remaining"] == 75
    assert by[("lots_consistent", "lot_drift")].found["ledger_balance"] == 70
    assert by[("lots_consistent", "uncovered_draw")].found["uncovered_draws"]["credits"] == 20
    assert by[("refunds_bounded", "over_refunded")].found["refunded"] == 25
    assert by[("refunds_bounded", "refunded_twice")].found["refunds"] == 2
    assert all(f.fix is None and f.reason for f in report.findings if f.rule in ("lots_consistent", "refunds_bounded"))
    grant = by[("plan_change_grants", "upgrade_without_grant")]
    assert grant.fix == "grant_plan_change" and grant.expected["credits"] == 800
    assert {r: res.checked for r, res in report.results.items()}["plan_change_grants"] == 2  # the handler's too
    assert {p.action for p in report.plan} == {"expire_lots", "grant_plan_change"}

    # one user's audit (diagnose, `audit --user`) reads only that user's rows and finds the same
    one = run_audit(db_url, config, rules=LIFECYCLE, users=["refunded_twice@example.com", "lot_drift@example.com"])
    assert {(f.rule, name_of[f.bestauth_user_id]) for f in one.findings} == {
        (f.rule, name_of[f.bestauth_user_id]) for f in report.findings
        if name_of[f.bestauth_user_id] in ("refunded_twice", "lot_drift")}

    # as of an instant before the second refund, that deduction was refunded once: not a finding then
    past = run_audit(db_url, config, rules=["refunds_bounded"], as_of=before_last)
    assert {name_of[f.bestauth_user_id] for f in past.findings} == {"over_refunded"}

    # dry run: nothing written
    rows = conn.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0]
    dry = apply_fixes(db_url, config, report.plan, live=False, max_fixes=10, actor="test")
    assert dry.applied == 0 and conn.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0] == rows

    live = audit_and_fix(db_url, config, live=True, max_fixes=10, rules=LIFECYCLE, actor="test:live")
    assert live.fixes and all(f.applied and not f.error for f in live.fixes)
    after = {(f.rule, name_of[f.bestauth_user_id]) for f in live.after.findings}
    assert after == {(r, n) for r in ("lots_consistent", "refunds_bounded") for n in FAULTS[r]} | {
        ("lots_consistent", n) for n in off}
    expired_pid = users["expired_unwritten"][1]
    assert ledger_sum(conn, expired_pid) == 200
    assert conn.execute("SELECT balance FROM public.points_balances WHERE user_id = %s",
                        (expired_pid,)).fetchone()[0] == 200
    row = conn.execute("""SELECT amount, transaction_type, metadata FROM public.points_transactions
                           WHERE idempotency_key LIKE 'plan_change:%%' AND user_id = %s""",
                       (users["upgrade_without_grant"][1],)).fetchone()
    assert row[0] == 800 and row[1] == "plan_change" and row[2]["to_plan"] == "pro_plus.monthly" and "lot" in row[2]
    logged = conn.execute("SELECT rule, action FROM public.audit_fix_log WHERE run_id = %s ORDER BY 1",
                          (live.run_id,)).fetchall()
    assert logged == [("expiry_applied", "expire_lots"), ("plan_change_grants", "grant_plan_change")]
    # the look-alikes are untouched: the held top-up still holds its credits
    assert ledger_sum(conn, users["held_past_expiry"][1]) == 300

    again = audit_and_fix(db_url, config, live=True, max_fixes=10, rules=LIFECYCLE, actor="test:again")
    assert not again.fixes and again.after is None
    replay = apply_fixes(db_url, config, report.plan, live=True, max_fixes=10, actor="test:replay")
    assert replay.applied == 0 and replay.failed == 0  # the old plan again: each fix already done


def test_lots_join_matches_pandas_outer_merge() -> None:
    """lots_consistent's join of users and lots equals pandas' outer merge on user_id: the same rows,
    order (by user id), dtypes (a missing int is NaN) and index, with users or lots on one side only."""
    import random

    import numpy as np
    import pandas as pd

    from checks.rules.lots_consistent import _outer_join

    rng = random.Random(7)
    ids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(3000)]
    left_ids, right_ids = ids[:2000], ids[500:2500]
    rng.shuffle(left_ids)
    rng.shuffle(right_ids)
    users = pd.DataFrame({"user_id": pd.array(left_ids, dtype="str"), "ledger_sum": np.arange(2000)},
                         index=np.arange(2000) * 3)  # a filtered state keeps its own index
    lots = pd.DataFrame({"user_id": pd.array(right_ids, dtype="str"), "lots": np.arange(2000),
                         "bad_lot_detail": pd.array([None if i % 3 else f"d{i}" for i in range(2000)], dtype="str")})
    cases = [(users, lots), (users, lots[lots["user_id"].isin(users["user_id"])]),
             (users.iloc[0:0], lots), (users, lots.iloc[0:0])]
    for left, right in cases:
        pd.testing.assert_frame_equal(_outer_join(left, right), left.merge(right, on="user_id", how="outer"))
