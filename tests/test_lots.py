"""Grants as lots (issue 6): consumption order, where each credit went, expiry at the boundary, rollover
caps, holds under expiry, refunds back to their lots -- on the real database, invariants after each."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from ledger import InsufficientCredits, Ledger, RefundRefused
from tests.invariants import assert_consistent

NOW = datetime.now(timezone.utc)


def grant(conn: psycopg.Connection, uid: uuid.UUID, amount: int, key: str, *, expires_at: datetime | None = None,
          priority: int | None = None, terms: dict | None = None, kind: str = "adjustment") -> int:
    meta = psycopg.types.json.Jsonb({"lot": terms}) if terms else psycopg.types.json.Jsonb({})
    return conn.execute("SELECT transaction_id FROM public.add_points(%s, %s, %s, 'test', %s, %s, %s, %s)",
                        (uid, amount, kind, key, meta, expires_at, priority)).fetchone()[0]


def lots(conn: psycopg.Connection, uid: uuid.UUID) -> dict[int, tuple[int, int]]:
    """lot id -> (remaining, expired)"""
    return {i: (r, e) for i, r, e in conn.execute(
        "SELECT id, remaining, expired FROM public.points_lots WHERE user_id = %s", (uid,))}


def draws(conn: psycopg.Connection, tx: int) -> dict[int | None, int]:
    return {lot: n for lot, n in conn.execute(
        "SELECT lot_id, amount FROM public.points_lot_draws WHERE transaction_id = %s", (tx,))}


def test_every_grant_is_a_lot_and_draws_follow_priority_expiry_age(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    never = grant(conn, uid, 10, "a")                                        # priority 50, no expiry
    later = grant(conn, uid, 10, "b", expires_at=NOW + timedelta(days=20))  # expires later
    soon = grant(conn, uid, 10, "c", expires_at=NOW + timedelta(days=2))    # expires first
    first = grant(conn, uid, 10, "d", priority=10)                           # lower priority number: first
    old_never = never
    w = ledger.deduct(uid, 15, idempotency_key="g1")
    assert draws(conn, w.transaction_id) == {first: 10, soon: 5}
    w = ledger.deduct(uid, 12, idempotency_key="g2")
    assert draws(conn, w.transaction_id) == {soon: 5, later: 7}
    w = ledger.deduct(uid, 5, idempotency_key="g3")
    assert draws(conn, w.transaction_id) == {later: 3, old_never: 2}
    assert lots(conn, uid) == {never: (8, 0), later: (0, 0), soon: (0, 0), first: (0, 0)}
    assert ledger.balance(uid).balance == 8
    assert_consistent(conn)


def test_oldest_first_among_equals(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    ids = [grant(conn, uid, 3, f"k{i}") for i in range(4)]
    w = ledger.deduct(uid, 7, idempotency_key="d")
    assert draws(conn, w.transaction_id) == {ids[0]: 3, ids[1]: 3, ids[2]: 1}
    assert_consistent(conn)


def test_expiry_at_the_boundary_second(ledger: Ledger, conn: psycopg.Connection) -> None:
    """Credits are spendable before expires_at and gone at it: the first operation after the boundary
    writes them off as an `expiry` row and the deduction is refused."""
    uid = uuid.uuid4()
    boundary = conn.execute("SELECT date_trunc('second', clock_timestamp()) + interval '2 seconds'").fetchone()[0]
    lot = grant(conn, uid, 10, "short", expires_at=boundary)
    grant(conn, uid, 3, "forever")
    ledger.deduct(uid, 1, idempotency_key="before")  # draws the expiring lot first
    assert lots(conn, uid)[lot] == (9, 0)
    conn.execute("SELECT pg_sleep_until(%s)", (boundary,))
    with pytest.raises(InsufficientCredits):
        ledger.deduct(uid, 4, idempotency_key="after")
    assert ledger.balance(uid).balance == 3
    rows = conn.execute("""SELECT amount, idempotency_key, metadata ->> 'lot_id' FROM public.points_transactions
                            WHERE user_id = %s AND transaction_type = 'expiry'""", (uid,)).fetchall()
    assert rows == [(-9, f"expiry:{lot}:9", str(lot))]
    assert lots(conn, uid)[lot] == (0, 9)
    ledger.deduct(uid, 3, idempotency_key="rest")
    assert_consistent(conn)


def test_expiry_is_idempotent_and_the_sweep_finds_everyone(ledger: Ledger, conn: psycopg.Connection) -> None:
    users = [uuid.uuid4() for _ in range(5)]
    for i, uid in enumerate(users):
        grant(conn, uid, 1, f"keep-{i}")
        grant(conn, uid, 10 + i, f"old-{i}", expires_at=NOW - timedelta(hours=1))  # written late
    # expired but not yet written off: nothing has touched these users
    assert conn.execute("SELECT count(*) FROM public.points_balances WHERE next_expiry <= now()").fetchone()[0] == 5
    n, totals = ledger.expire_due_lots(batch=2)
    assert (n, totals.lots, totals.credits) == (5, 5, sum(10 + i for i in range(5)))
    assert ledger.expire_due_lots()[0] == 0
    for uid in users:
        assert ledger.expire_lots(uid).credits == 0
        assert ledger.balance(uid).balance == 1
    assert_consistent(conn)


def test_balance_read_never_shows_expired_credits(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    grant(conn, uid, 10, "x", expires_at=NOW - timedelta(seconds=1))
    assert ledger.balance(uid).balance == 0
    assert ledger.spendable(uid) == 0


@pytest.mark.parametrize("cap,remaining,kept", [(0, 40, 0), (25, 40, 25), (100, 40, 40)])
def test_rollover_keeps_up_to_the_cap_once(ledger: Ledger, conn: psycopg.Connection, cap: int, remaining: int,
                                           kept: int) -> None:
    uid = uuid.uuid4()
    end = conn.execute("SELECT clock_timestamp() + interval '1.5 seconds'").fetchone()[0]
    until = end + timedelta(days=30)
    lot = grant(conn, uid, 100, "period", kind="subscription_grant",
                terms={"expires_at": end.isoformat(), "rollover_cap": cap, "rollover_until": until.isoformat()})
    grant(conn, uid, 1, "other")
    ledger.deduct(uid, 100 - remaining, idempotency_key="spend")  # drawn from the period's lot (it expires)
    conn.execute("SELECT pg_sleep_until(%s)", (end,))
    e = ledger.expire_lots(uid)
    assert (e.credits, e.rolled_over) == (remaining - kept, kept)
    row = conn.execute("SELECT remaining, expired, expires_at, period_end, rolled_over FROM public.points_lots "
                       "WHERE id = %s", (lot,)).fetchone()
    assert row[0:2] == (kept, remaining - kept)
    if kept:
        assert (row[2], row[3], row[4]) == (until, end, kept)
    assert ledger.balance(uid).balance == kept + 1
    assert ledger.expire_lots(uid).credits == 0  # rolled credits wait for their new expiry
    assert_consistent(conn)


def test_rollover_cap_is_shared_by_the_periods_lots(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    end = conn.execute("SELECT clock_timestamp() + interval '1 second'").fetchone()[0]
    terms = {"expires_at": end.isoformat(), "rollover_cap": 30, "rollover_until": (end + timedelta(days=30)).isoformat()}
    grant(conn, uid, 20, "grant", kind="subscription_grant", terms=terms)
    grant(conn, uid, 20, "upgrade", kind="plan_change", terms=terms)
    conn.execute("SELECT pg_sleep_until(%s)", (end,))
    e = ledger.expire_lots(uid)
    assert (e.credits, e.rolled_over) == (10, 30)
    assert ledger.balance(uid).balance == 30
    assert_consistent(conn)


def test_held_credits_do_not_expire_under_their_hold(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    boundary = conn.execute("SELECT clock_timestamp() + interval '1.5 seconds'").fetchone()[0]
    lot = grant(conn, uid, 10, "lot", expires_at=boundary)
    ledger.reserve(uid, 6, job_id="job-1")
    conn.execute("SELECT pg_sleep_until(%s)", (boundary,))
    assert ledger.balance(uid).balance == 6  # 4 expired, the 6 held stay
    assert ledger.spendable(uid) == 0
    ledger.capture("job-1", 5)
    assert ledger.balance(uid).balance == 0  # the hold's unused 1 expires once the hold is settled
    assert lots(conn, uid)[lot] == (0, 5)
    assert_consistent(conn)


def test_refund_returns_credits_to_their_lots_once(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    a = grant(conn, uid, 5, "a", priority=1)
    b = grant(conn, uid, 10, "b", expires_at=NOW + timedelta(days=3))
    w = ledger.deduct(uid, 8, idempotency_key="gen")
    assert draws(conn, w.transaction_id) == {a: 5, b: 3}
    r = ledger.refund_generation(w.transaction_id)
    assert (r.refunded, r.duplicate, r.new_balance) == (8, False, 15)
    assert draws(conn, r.transaction_id) == {a: -5, b: -3}
    assert lots(conn, uid) == {a: (5, 0), b: (10, 0)}
    again = ledger.refund_generation(w.transaction_id)
    assert (again.duplicate, again.transaction_id, ledger.balance(uid).balance) == (True, r.transaction_id, 15)
    with pytest.raises(RefundRefused):
        ledger.refund_generation(w.transaction_id, 3)  # a second, different refund
    assert_consistent(conn)


def test_refunds_are_bounded(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    g = grant(conn, uid, 10, "g")
    w = ledger.deduct(uid, 4, idempotency_key="gen")
    with pytest.raises(RefundRefused):
        ledger.refund_generation(w.transaction_id, 5)  # over what it charged
    with pytest.raises(RefundRefused):
        ledger.refund_generation(g)  # a grant is not a generation
    with pytest.raises(RefundRefused):
        ledger.refund_generation(10**12)  # no such row
    partial = ledger.refund_generation(w.transaction_id, 3)
    assert (partial.refunded, ledger.balance(uid).balance) == (3, 9)
    assert conn.execute("SELECT count(*) FROM public.points_transactions WHERE transaction_type = 'refund'"
                        ).fetchone()[0] == 1
    assert_consistent(conn)


def test_concurrent_refunds_of_one_deduction_refund_once(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    grant(conn, uid, 50, "g")
    w = ledger.deduct(uid, 20, idempotency_key="gen")
    results: list[object] = []

    def refund() -> None:
        try:
            results.append(ledger.refund_generation(w.transaction_id))
        except Exception as exc:  # noqa: BLE001 - asserted below
            results.append(exc)

    threads = [threading.Thread(target=refund) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not isinstance(r, Exception) for r in results), results
    assert sorted(r.duplicate for r in results) == [False] + [True] * 7
    assert ledger.balance(uid).balance == 50
    assert_consistent(conn)


def test_top_up_is_a_lot_under_its_payment_key(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    pack = next(iter(ledger.config.top_ups))
    cfg = ledger.config.top_ups[pack]
    w = ledger.top_up(uid, pack, payment_id="pi_123")
    again = ledger.top_up(uid, pack, payment_id="pi_123")
    assert (again.duplicate, again.transaction_id) == (True, w.transaction_id)
    row = conn.execute("SELECT source_type, granted, priority, expires_at IS NOT NULL FROM public.points_lots "
                       "WHERE id = %s", (w.transaction_id,)).fetchone()
    assert row == ("top_up", cfg.credits, cfg.priority, cfg.expiry_days is not None)
    assert conn.execute("SELECT idempotency_key FROM public.points_transactions WHERE id = %s",
                        (w.transaction_id,)).fetchone()[0] == "top_up:pi_123"
    assert_consistent(conn)


def test_concurrent_deductions_across_many_lots_never_overdraw(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    for i in range(20):
        grant(conn, uid, 10, f"lot-{i}", expires_at=NOW + timedelta(days=i + 1) if i % 2 else None,
              priority=i % 3)
    ok: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for j in range(30):
            try:
                ledger.deduct(uid, 1, idempotency_key=f"w{n}-{j}")
            except InsufficientCredits:
                continue
            with lock:
                ok.append(1)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 200 and ledger.balance(uid).balance == 0
    assert conn.execute("SELECT count(*) FROM public.points_lots WHERE user_id = %s AND remaining > 0",
                        (uid,)).fetchone()[0] == 0
    assert_consistent(conn)


def test_history_shows_lots_and_their_draws(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    a = grant(conn, uid, 5, "a")
    w = ledger.deduct(uid, 2, idempotency_key="gen")
    [lot] = ledger.lots(uid)
    assert (lot.id, lot.granted, lot.remaining, lot.consumed) == (a, 5, 3, 2)
    assert [(d.transaction_id, d.amount, d.transaction_type) for d in lot.draws] == \
        [(w.transaction_id, 2, "generation_deduction")]
    # a deduction across lots (recorded on its ledger row since sql/018) shows on every lot it drew
    b, c = grant(conn, uid, 4, "b"), grant(conn, uid, 4, "c")
    x = ledger.deduct(uid, 9, idempotency_key="gen-across")
    assert conn.execute("SELECT lot_ids, lot_amounts FROM public.points_transactions WHERE id = %s",
                        (x.transaction_id,)).fetchone() == ([a, b, c], [3, 4, 2])
    by_id = {lot.id: lot for lot in ledger.lots(uid)}
    assert {i: (by_id[i].remaining, [(d.transaction_id, d.amount) for d in by_id[i].draws if
                                     d.transaction_id == x.transaction_id]) for i in (a, b, c)} == \
        {a: (0, [(x.transaction_id, 3)]), b: (0, [(x.transaction_id, 4)]), c: (2, [(x.transaction_id, 2)])}


def test_bad_lot_terms_are_refused(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    with pytest.raises(psycopg.Error):
        grant(conn, uid, 5, "p", priority=5000)
    with pytest.raises(psycopg.Error):
        conn.execute("SELECT * FROM public.add_points(%s, 5, 'adjustment', 'x', 'k', '{\"lot\": 3}')", (uid,))
    assert conn.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0] == 0


def test_a_refund_into_an_expired_lot_expires_again_at_once(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    boundary = conn.execute("SELECT clock_timestamp() + interval '1 second'").fetchone()[0]
    lot = grant(conn, uid, 10, "short", expires_at=boundary)
    keep = grant(conn, uid, 2, "keep")
    w = ledger.deduct(uid, 6, idempotency_key="gen")  # drawn from the expiring lot
    conn.execute("SELECT pg_sleep_until(%s)", (boundary,))
    r = ledger.refund_generation(w.transaction_id)
    assert r.refunded == 6
    assert lots(conn, uid) == {lot: (0, 10), keep: (2, 0)}  # 4 expired first, the 6 returned expired after
    kinds = [k for (k,) in conn.execute("SELECT transaction_type FROM public.points_transactions "
                                        "WHERE user_id = %s ORDER BY id", (uid,))]
    assert kinds == ["adjustment", "adjustment", "generation_deduction", "expiry", "refund", "expiry"]
    assert ledger.balance(uid).balance == 2
    assert_consistent(conn)


def test_refund_rows_written_around_refund_generation_keep_the_lots_true(ledger: Ledger,
                                                                         conn: psycopg.Connection) -> None:
    """A refund row written straight through add_points (metadata.refund_of, no once-only check): a second
    refund of the same deduction returns nothing more to its lots, and credits beyond what it drew become a
    lot of their own -- the lots still sum to the ledger; refunds_bounded is what reports the excess."""
    uid = uuid.uuid4()
    a = grant(conn, uid, 100, "a")
    w = ledger.deduct(uid, 30, idempotency_key="gen")
    meta = psycopg.types.json.Jsonb({"refund_of": w.transaction_id})
    first = conn.execute("SELECT transaction_id FROM public.add_points(%s, 30, 'refund', 'r1', 'r1', %s)",
                         (uid, meta)).fetchone()[0]
    second = conn.execute("SELECT transaction_id FROM public.add_points(%s, 50, 'refund', 'r2', 'r2', %s)",
                          (uid, meta)).fetchone()[0]
    assert draws(conn, first) == {a: -30}
    assert draws(conn, second) == {}  # nothing left to return to lot a
    assert lots(conn, uid) == {a: (100, 0), second: (50, 0)}
    assert conn.execute("SELECT granted FROM public.points_lots WHERE id = %s", (second,)).fetchone()[0] == 50
    over = conn.execute("SELECT transaction_id FROM public.add_points(%s, 40, 'refund', 'r3', 'r3', %s)",
                        (uid, psycopg.types.json.Jsonb({"refund_of": ledger.deduct(uid, 20, idempotency_key="g2")
                                                        .transaction_id}))).fetchone()[0]
    assert conn.execute("SELECT granted, remaining FROM public.points_lots WHERE id = %s", (over,)).fetchone() == (20, 20)
    assert_consistent(conn)
