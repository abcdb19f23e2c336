"""`credits history` with lots, `credits top-up|refund|expire`, and `credits diagnose`'s lifecycle checks, as a
support engineer runs them (the real command in a subprocess, a real database)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg.types.json import Jsonb

from checks.diagnose import Check, Diagnosis, diagnose, lifecycle_checks, lifecycle_facts
from ledger.config import CreditsConfig
from tests.audit_cases import paid_user
from tests.cli_helpers import run_cli
from tests.factories import make_user
from tests.invariants import assert_consistent


def _grant(conn: psycopg.Connection, uid: uuid.UUID, amount: int, key: str, *, expires_at: datetime | None = None,
           priority: int | None = None, terms: dict | None = None) -> int:
    return conn.execute("SELECT transaction_id FROM public.add_points(%s, %s, 'adjustment', 'test grant', %s, %s, %s, %s)",
                        (uid, amount, key, Jsonb({"lot": terms} if terms else {}), expires_at, priority)).fetchone()[0]


def _deduct(conn: psycopg.Connection, uid: uuid.UUID, amount: int, key: str) -> int:
    return conn.execute("SELECT transaction_id FROM public.deduct_points(%s, %s, 'generation_deduction', 'gen', %s)",
                        (uid, amount, key)).fetchone()[0]


def test_history_shows_lots_their_expiry_and_what_drew_on_them(db_url: str, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn, "lots@example.com")
    soon = datetime.now(timezone.utc) + timedelta(days=2)
    forever = _grant(conn, sid, 30, "a")
    expiring = _grant(conn, sid, 20, "b", expires_at=soon,
                      terms={"rollover_cap": 5, "rollover_until": (soon + timedelta(days=30)).isoformat()})
    first = _grant(conn, sid, 10, "c", priority=10)
    gen = _deduct(conn, sid, 25, "g1")  # 10 from the priority lot, 15 from the expiring one
    doc = run_cli(db_url, "history", str(bid), "--json")
    assert doc.code == 0, doc.stderr
    d = doc.json()
    assert d["user_id"] == str(sid) and d["balance"] == 35 and d["open_lots_total"] == 35
    lots = {lot["lot_id"]: lot for lot in d["lots"]}
    assert [lot["lot_id"] for lot in d["lots"]] == [first, expiring, forever]  # newest first
    assert (lots[first]["remaining"], lots[first]["priority"]) == (0, 10)
    assert lots[expiring]["remaining"] == 5 and lots[expiring]["rollover"]["cap"] == 5
    assert lots[expiring]["expires_at"].startswith(soon.date().isoformat()) and not lots[expiring]["expiry_due"]
    assert lots[forever]["expires_at"] is None and lots[forever]["draws"] == []
    assert [(x["transaction_id"], x["amount"]) for x in lots[expiring]["draws"]] == [(gen, 15)]
    assert [t["amount"] for t in d["transactions"]] == [-25, 10, 20, 30]

    text = run_cli(db_url, "history", "lots@example.com")
    assert text.code == 0, text.stderr
    assert f"#{gen} generation_deduction 15" in text.stdout and "rollover up to 5" in text.stdout
    assert "ledger of" in text.stdout and "never" in text.stdout
    plain = run_cli(db_url, "history", str(sid), "--no-lots", "--json")
    assert plain.code == 0 and plain.json()["lots"] is None and len(plain.json()["transactions"]) == 4


def test_top_up_refund_and_expire(db_url: str, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn, "buyer@example.com")
    r = run_cli(db_url, "top-up", "buyer@example.com", "small", "--payment-id", "pay_1", "--json")
    assert r.code == 0, r.stderr
    assert (r.json()["amount"], r.json()["new_balance"], r.json()["duplicate"]) == (500, 500, False)
    again = run_cli(db_url, "top-up", str(bid), "small", "--payment-id", "pay_1", "--json")
    assert again.code == 0 and again.json()["duplicate"] is True and again.json()["new_balance"] == 500
    lot = conn.execute("SELECT source_type, priority, expires_at::date - now()::date FROM public.points_lots "
                       "WHERE user_id = %s", (sid,)).fetchall()
    assert lot == [("top_up", 50, 365)]

    unknown = run_cli(db_url, "top-up", str(bid), "huge", "--payment-id", "pay_2")
    assert unknown.code == 3 and "huge" in unknown.stderr and "large, small" in unknown.stderr

    gen = _deduct(conn, sid, 40, "gen-1")
    part = run_cli(db_url, "refund", str(gen), "--amount", "15", "--json")
    assert part.code == 0, part.stderr
    assert (part.json()["refunded"], part.json()["new_balance"]) == (15, 475)
    second = run_cli(db_url, "refund", str(gen), "--amount", "10")  # once per deduction
    assert second.code == 4 and "refund refused" in second.stderr
    over = run_cli(db_url, "refund", str(_deduct(conn, sid, 5, "gen-2")), "--amount", "6")
    assert over.code == 4 and "refund refused" in over.stderr
    grant_row = conn.execute("SELECT id FROM public.points_transactions WHERE user_id = %s AND amount > 0 "
                             "ORDER BY id LIMIT 1", (sid,)).fetchone()[0]
    assert run_cli(db_url, "refund", str(grant_row)).code == 4  # not a deduction
    assert run_cli(db_url, "refund", "0").code == 3
    assert conn.execute("SELECT balance FROM public.points_balances WHERE user_id = %s", (sid,)).fetchone()[0] == 470

    # one user's expiry, then the sweep: each writes once
    past = conn.execute("SELECT now() - interval '1 hour'").fetchone()[0]
    _, other = make_user(conn, "other@example.com")
    _grant(conn, sid, 7, "old-1", expires_at=past, priority=90)
    _grant(conn, other, 9, "old-2", expires_at=past)
    one = run_cli(db_url, "expire", "--user", "buyer@example.com", "--json")
    assert one.code == 0, one.stderr
    assert (one.json()["lots"], one.json()["credits"]) == (1, 7)
    sweep = run_cli(db_url, "expire", "--json")
    assert sweep.code == 0 and (sweep.json()["users"], sweep.json()["credits"]) == (1, 9)
    assert run_cli(db_url, "expire", "--json").json()["credits"] == 0
    assert run_cli(db_url, "expire", "--user", str(sid), "--json").json()["credits"] == 0
    assert conn.execute("SELECT count(*) FROM public.points_transactions WHERE transaction_type = 'expiry'"
                        ).fetchone()[0] == 2
    assert_consistent(conn)


def test_history_marks_credits_past_expiry_without_writing_them_off(db_url: str, conn: psycopg.Connection) -> None:
    _, sid = make_user(conn, "late@example.com")
    past = conn.execute("SELECT now() - interval '1 minute'").fetchone()[0]
    _grant(conn, sid, 12, "late", expires_at=past)
    r = run_cli(db_url, "history", "late@example.com", "--json")
    assert r.code == 0, r.stderr
    assert [lot["expiry_due"] for lot in r.json()["lots"]] == [True]
    text = run_cli(db_url, "history", "late@example.com")
    assert "past their expiry" in text.stdout and "(due)" in text.stdout
    assert conn.execute("SELECT count(*) FROM public.points_transactions WHERE transaction_type = 'expiry'"
                        ).fetchone()[0] == 0  # looking changes nothing


def _checks(doc: dict) -> dict[str, dict]:
    return {c["check"]: c for c in doc["checks"]}


def _paid(conn: psycopg.Connection) -> tuple[str, uuid.UUID, uuid.UUID]:
    """A paid user with the current period granted (800): every non-lifecycle check passes."""
    case = paid_user(conn)
    return str(case["bid"]), case["bid"], case["pid"]


def _verdicts(db_url: str, config: CreditsConfig, ref: str, bid: uuid.UUID, pid: uuid.UUID
              ) -> tuple[int, dict[str, str], dict[str, Check]]:
    """diagnose() in process (the CLI's code, without a process start per call): exit code, failing checks,
    and the verdicts of the per-user lifecycle SQL alone (as when the audit's rule is not registered)."""
    dx = diagnose(db_url, config, ref)
    alone = {c.name: c for c in lifecycle_checks(lifecycle_facts(db_url, str(pid), str(bid)), {}, ref)}
    return dx.exit_code, {c.name: c.status for c in dx.checks if c.status == "fail"}, alone


def test_diagnose_lifecycle_checks(db_url: str, conn: psycopg.Connection, config: CreditsConfig) -> None:
    """A healthy user with lots passes and sees what expires next; an overdue lot is a warning with the command
    that writes it off; a refund over its deduction is critical; an upgrade without its grant is a warning --
    from the audit's rules and from the per-user SQL alone alike."""
    fine, fine_bid, sid = _paid(conn)
    soon = conn.execute("SELECT date_trunc('second', now()) + interval '5 days'").fetchone()[0]
    _grant(conn, sid, 20, "fine-b", expires_at=soon)
    gen = _deduct(conn, sid, 10, "fine-gen")  # the soonest expiry first
    conn.execute("SELECT * FROM public.refund_generation(%s, 4)", (gen,))

    late, late_bid, late_pid = _paid(conn)
    _grant(conn, late_pid, 8, "late-due", expires_at=conn.execute("SELECT now() - interval '2 hours'").fetchone()[0])

    over, over_bid, over_pid = _paid(conn)
    tx = _deduct(conn, over_pid, 10, "over-gen")
    for key in ("r1", "r2"):  # as a buggy caller would: two refunds of one deduction, 16 of its 10
        conn.execute("SELECT * FROM public.add_points(%s, 8, 'refund', 'refund', %s, %s)",
                     (over_pid, key, Jsonb({"refund_of": tx})))

    up, up_bid, up_pid = _paid(conn)
    now = conn.execute("SELECT now()").fetchone()[0]
    conn.execute("""INSERT INTO public.subscription_plan_changes (subscription_id, bestauth_user_id, user_id,
                        period_start, period_end, from_tier, from_cycle, to_tier, to_cycle, kind, changed_at,
                        effective_at, credits, idempotency_key)
                    VALUES (%s, %s, %s, %s, %s, 'pro', 'monthly', 'pro_plus', 'monthly', 'upgrade', %s, %s, 600, %s)""",
                 (uuid.uuid4(), up_bid, up_pid, now - timedelta(days=3), now + timedelta(days=27), now, now,
                  f"plan_change:test:{up_pid}"))

    ok = run_cli(db_url, "diagnose", fine, "--json")
    assert ok.code == 0, ok.stdout + ok.stderr
    c = _checks(ok.json())
    assert {c[n]["status"] for n in ("lots match ledger", "expiry applied", "refunds bounded")} == {"pass"}
    assert c["next expiry"]["status"] == "pass" and "14 credit(s) expire" in c["next expiry"]["detail"]
    assert ok.json()["user"]["open_lots"] == 2
    code, failing, alone = _verdicts(db_url, config, fine, fine_bid, sid)
    assert (code, failing) == (0, {}) and {x.status for x in alone.values()} == {"pass", "skip"}
    assert "1 deduction(s) refunded (4 credits)" in alone["refunds bounded"].detail

    code, failing, alone = _verdicts(db_url, config, late, late_bid, late_pid)
    assert (code, failing) == (1, {"expiry applied": "fail"})
    assert alone["expiry applied"].status == "fail" and alone["expiry applied"].fix == f"credits expire --user {late}"
    assert conn.execute("SELECT count(*) FROM public.points_transactions WHERE user_id = %s AND "
                        "transaction_type = 'expiry'", (late_pid,)).fetchone()[0] == 0  # diagnosing changes nothing
    text = run_cli(db_url, "diagnose", late)
    assert text.code == 1 and "expiry applied" in text.stdout and "FAIL" in text.stdout

    code, failing, alone = _verdicts(db_url, config, over, over_bid, over_pid)
    assert code == 2 and "refunds bounded" in failing
    assert alone["refunds bounded"].status == "fail" and f"'refund_of': {tx}" in alone["refunds bounded"].detail
    assert Diagnosis(over, {}, [alone["refunds bounded"]]).status == "CRITICAL"

    code, failing, alone = _verdicts(db_url, config, up, up_bid, up_pid)
    assert (code, failing) == (1, {"upgrade grants": "fail"})
    assert alone["upgrade grants"].status == "fail" and "600" in alone["upgrade grants"].detail
    assert Diagnosis(up, {}, [alone["upgrade grants"]]).status == "WARNING"
