"""sql/008's deduct_points fast path answers exactly as 002's deduct_points did.

The 002 definition is loaded next to the live one as ``deduct_points_002``; both run the same calls
on the same state (each in a rolled-back transaction) over a matrix of users, keys, amounts and
types, and must agree on the result or the error (SQLSTATE, message, detail), the balance row and
the ledger rows. The races that touch the fast path's own conflict handling run with real threads.
"""

from __future__ import annotations

import itertools
import re
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from ledger.migrate import SQL_DIR
from tests.factories import balance_row, count_rows, ledger_sum

MAX = 1_000_000  # CreditsConfig's default max_operation_amount, synced by migrate


def _install_reference(conn: psycopg.Connection) -> None:
    text = (SQL_DIR / "002_ledger_functions.sql").read_text(encoding="utf-8")
    m = re.search(r"CREATE FUNCTION public\.deduct_points\(.*?END \$\$;", text, re.S)
    assert m, "002 no longer defines deduct_points the way this test reads it"
    conn.execute(m.group(0).replace("public.deduct_points(", "public.deduct_points_002(", 1))


def _reserve(conn: psycopg.Connection, uid: uuid.UUID, amount: int) -> None:
    """Hold credits the way the installed schema does it (003's reserve_points when present)."""
    has_reserve = conn.execute("SELECT to_regprocedure('public.reserve_points(uuid,bigint,text,integer,jsonb)')"
                               ).fetchone()[0]
    if has_reserve:
        conn.execute("SELECT * FROM public.reserve_points(%s, %s, %s)", (uid, amount, f"hold:{uid}"))
    else:
        conn.execute("UPDATE public.points_balances SET reserved = %s WHERE user_id = %s", (amount, uid))


def _snapshot(conn: psycopg.Connection, users: list[uuid.UUID]) -> tuple[Any, Any]:
    balances = conn.execute(
        """SELECT user_id, balance, lifetime_earned, lifetime_spent, reserved FROM public.points_balances
            WHERE user_id = ANY(%s) ORDER BY user_id""", (users,)).fetchall()
    rows = conn.execute(
        """SELECT user_id, amount, balance_after, transaction_type, description,
                  CASE WHEN idempotency_key LIKE 'auto:%%' THEN 'auto:' ELSE idempotency_key END, metadata
             FROM public.points_transactions WHERE user_id = ANY(%s) ORDER BY id""", (users,)).fetchall()
    if not _has_lots(conn):
        return balances, rows
    # what each lot holds, and what each ledger row drew from which lot (sql/011+: itemised on the row
    # or in points_lot_consumptions, whichever the writer chose -- the view shows both the same way)
    lots = conn.execute("SELECT id, remaining FROM public.points_lots WHERE user_id = ANY(%s) ORDER BY id",
                        (users,)).fetchall()
    draws = conn.execute(
        """SELECT CASE WHEN t.idempotency_key LIKE 'auto:%%' THEN 'auto:' ELSE t.idempotency_key END,
                  d.lot_id, d.amount
             FROM public.points_lot_draws d JOIN public.points_transactions t ON t.id = d.transaction_id
            WHERE t.user_id = ANY(%s) ORDER BY t.id, d.lot_id NULLS LAST, d.amount""", (users,)).fetchall()
    return balances, rows, lots, draws


def _has_lots(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('public.points_lots') IS NOT NULL").fetchone()[0]


def _call(conn: psycopg.Connection, fn: str, args: tuple, prior: tuple | None,
          users: list[uuid.UUID]) -> tuple[Any, Any]:
    """Outcome of one call, in a transaction that is rolled back afterwards."""
    with conn.transaction(force_rollback=True):
        if prior is not None:  # an earlier write with this key (always through the 002 function)
            try:
                with conn.transaction():
                    conn.execute("SELECT * FROM public.deduct_points_002(%s, %s, %s, %s, %s, %s)", prior)
            except psycopg.Error:
                pass
        try:
            with conn.transaction():
                row = conn.execute(f"SELECT * FROM public.{fn}(%s, %s, %s, %s, %s, %s)", args).fetchone()
            # transaction ids differ between the runs (sequences do not roll back): name the row instead
            key = conn.execute("SELECT idempotency_key, user_id, amount FROM public.points_transactions "
                               "WHERE id = %s", (row[1],)).fetchone()
            if key and key[0].startswith("auto:"):
                key = ("auto:", key[1], key[2])
            outcome: Any = ("ok", row[0], key, row[2])
        except psycopg.Error as exc:
            outcome = ("error", exc.sqlstate, exc.diag.message_primary, exc.diag.message_detail)
        return outcome, _snapshot(conn, users)


@pytest.fixture
def world(conn: psycopg.Connection) -> dict[str, Any]:
    """Users in every state the fast path must tell apart, and a key another user already holds."""
    _install_reference(conn)
    users = {name: uuid.uuid4() for name in ("none", "funded", "reserved", "broke", "rich", "other")}
    for name, amount in (("funded", 100), ("reserved", 100), ("broke", 5), ("rich", MAX), ("rich", MAX),
                         ("other", 50)):
        conn.execute("SELECT * FROM public.add_points(%s, %s, 'adjustment', 'seed', %s)",
                     (users[name], amount, f"seed:{name}:{uuid.uuid4()}"))
    _reserve(conn, users["reserved"], 60)
    if _has_lots(conn):
        # several small lots in a consumption order that is not the grant order (priority, then soonest
        # expiry, then oldest): 10 takes one lot, 40 and 41 cross two or three, 100 is more than all 75
        users["lots"] = uuid.uuid4()
        for amount, days, priority in ((20, None, 50), (30, 10, 10), (25, 5, 50)):
            conn.execute("SELECT * FROM public.add_points(%s, %s, 'adjustment', 'seed', %s, '{}'::jsonb, "
                         "now() + make_interval(days => %s), %s)",
                         (users["lots"], amount, f"seed:lots:{uuid.uuid4()}", days, priority))
    conn.execute("SELECT * FROM public.deduct_points_002(%s, 10, 'generation_deduction', 'taken', 'k-taken')",
                 (users["other"],))
    return users


AMOUNTS = [10, 40, 41, 100, 101, 0, -5, None, MAX + 1]
TYPES = ["generation_deduction", "adjustment", "subscription_grant", "nope", None]
KEYS = ["new", "retry", "retry_other_amount", "retry_other_type", "taken", None, "", "x" * 513]


def test_fast_path_agrees_with_002_on_every_case(conn: psycopg.Connection, world: dict[str, Any]) -> None:
    states = ["none", "funded", "reserved", "broke", "rich", None]  # rich: covers more than the maximum
    if "lots" in world:
        states.append("lots")  # draws crossing lots (sql/017 draws them in deduct_points itself)
    checked = Counter()
    for state, amount, ttype, key in itertools.product(states, AMOUNTS, TYPES, KEYS):
        uid = world[state] if state else None
        watch = [u for u in world.values()]
        meta = Jsonb({"case": f"{state}:{amount}:{ttype}"})
        prior = None
        k = key
        if key in ("new", "retry", "retry_other_amount", "retry_other_type"):
            k = f"k-{key}"
        elif key == "taken":
            k = "k-taken"
        if key == "retry":
            prior = (uid, amount, ttype, "d", k, meta)
        elif key == "retry_other_amount":
            prior = (uid, 7, "generation_deduction", "d", k, meta)
        elif key == "retry_other_type":
            prior = (uid, amount, "adjustment", "d", k, meta)
        args = (uid, amount, ttype, "d", k, meta)
        ref = _call(conn, "deduct_points_002", args, prior, watch)
        new = _call(conn, "deduct_points", args, prior, watch)
        assert new == ref, f"state={state} amount={amount} type={ttype} key={key!r}"
        checked[ref[0][0] if ref[0][0] == "ok" else ref[0][1]] += 1
    # the matrix reaches the fast path, its conflict handling and every refusal
    assert checked["ok"] >= 40 and {"CR001", "CR002", "CR003", "CR004"} <= set(checked), checked


def test_draws_across_many_lots_and_lots_that_run_out_agree_with_002(conn: psycopg.Connection) -> None:
    """deduct_points draws the lots after the first one statement each (sql/019; 018 took four at a time)
    until the amount is covered; lots that run out (holding less than the balance) leave the uncovered rest
    itemised. Both must leave the lots and the draws exactly as the reference path (002: ledger_apply and
    the lots trigger) does, retries included."""
    if not _has_lots(conn):
        pytest.skip("no lots in this schema")
    _install_reference(conn)
    small, drifted = uuid.uuid4(), uuid.uuid4()
    # seven lots of 3 credits, consumption order unlike grant order (priorities 10/50/90 in turn)
    for i in range(7):
        conn.execute("SELECT * FROM public.add_points(%s, 3, 'adjustment', 'seed', %s, '{}'::jsonb, NULL, %s)",
                     (small, f"seed:small:{i}", (10, 50, 90)[i % 3]))
    for i in range(3):
        conn.execute("SELECT * FROM public.add_points(%s, 5, 'adjustment', 'seed', %s)", (drifted, f"seed:drift:{i}"))
    # the drifted user's lots hold 4 credits fewer than the balance (what lots_consistent reports)
    conn.execute("UPDATE public.points_lots SET remaining = remaining - 4 "
                 "WHERE id = (SELECT max(id) FROM public.points_lots WHERE user_id = %s)", (drifted,))
    watch = [small, drifted]
    checked = Counter()
    for uid, amount, key in itertools.product(watch, (1, 3, 4, 9, 12, 13, 15, 21, 22), ("new", "retry")):
        k = f"k-{key}-{amount}"
        args = (uid, amount, "generation_deduction", "d", k, Jsonb({}))
        prior = args if key == "retry" else None
        ref = _call(conn, "deduct_points_002", args, prior, watch)
        new = _call(conn, "deduct_points", args, prior, watch)
        assert new == ref, f"user={'small' if uid == small else 'drifted'} amount={amount} key={key}"
        checked[ref[0][0] if ref[0][0] == "ok" else ref[0][1]] += 1
        if ref[0][0] == "ok" and key == "new":
            lots_drawn = {lot for row_key, lot, _n in ref[1][3] if row_key == k}
            checked["lots:" + str(len(lots_drawn))] += 1
    assert checked["ok"] >= 14, checked
    # reached: one lot, several (3, 5 and all 7), an uncovered rest
    assert checked["lots:1"] and checked["lots:3"] and checked["lots:5"] and checked["lots:7"], checked
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT * FROM public.deduct_points(%s, 15, 'generation_deduction', 'd', 'k-drift')",
                     (drifted,))
        uncovered = conn.execute("SELECT sum(amount) FROM public.points_lot_draws WHERE user_id = %s "
                                 "AND lot_id IS NULL", (drifted,)).fetchone()[0]
    assert uncovered == 4


def test_retry_on_the_fast_path_leaves_balance_and_ledger_as_they_were(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    conn.execute("SELECT * FROM public.add_points(%s, 100, 'subscription_grant', 's', 's')", (uid,))
    first = conn.execute("SELECT * FROM public.deduct_points(%s, 30, 'generation_deduction', 'g', 'job-1')",
                         (uid,)).fetchone()
    again = conn.execute("SELECT * FROM public.deduct_points(%s, 30, 'generation_deduction', 'g', 'job-1')",
                         (uid,)).fetchone()
    assert first[2] is False and again == (first[0], first[1], True)
    assert balance_row(conn, uid) == (70, 100, 30)
    assert count_rows(conn, "points_transactions") == 2
    with pytest.raises(psycopg.Error) as exc:  # same key, other amount: a caller bug
        conn.execute("SELECT * FROM public.deduct_points(%s, 31, 'generation_deduction', 'g', 'job-1')", (uid,))
    assert exc.value.sqlstate == "CR002"
    assert balance_row(conn, uid) == (70, 100, 30)


def test_reserved_credits_are_not_spendable(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    conn.execute("SELECT * FROM public.add_points(%s, 100, 'subscription_grant', 's', 's')", (uid,))
    _reserve(conn, uid, 80)
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM public.deduct_points(%s, 21, 'generation_deduction', 'g', 'd1')", (uid,))
    assert exc.value.sqlstate == "CR001"
    bal = conn.execute("SELECT * FROM public.deduct_points(%s, 20, 'generation_deduction', 'g', 'd2')",
                       (uid,)).fetchone()[0]
    assert bal == 80


def test_same_key_for_different_funded_users_deducting_at_once(db_url: str, conn: psycopg.Connection) -> None:
    """Every racer passes the fast UPDATE; the unique key picks one winner, the rest undo and get CR002."""
    users = [uuid.uuid4() for _ in range(8)]
    for u in users:
        conn.execute("SELECT * FROM public.add_points(%s, 100, 'adjustment', 's', %s)", (u, f"seed:{u}"))
    barrier = threading.Barrier(len(users))

    def run(n: int) -> str:
        with psycopg.connect(db_url, autocommit=True) as c:
            barrier.wait()
            try:
                c.execute("SELECT * FROM public.deduct_points(%s, 10, 'generation_deduction', 'x', 'shared')",
                          (users[n],))
                return "ok"
            except psycopg.Error as exc:
                return exc.sqlstate or "?"

    with ThreadPoolExecutor(len(users)) as pool:
        outcomes = Counter(pool.map(run, range(len(users))))
    assert outcomes == Counter({"ok": 1, "CR002": 7})
    for u in users:
        bal, earned, spent = balance_row(conn, u)
        assert bal == ledger_sum(conn, u) == earned - spent
    assert sorted(balance_row(conn, u)[0] for u in users) == [90] + [100] * 7


# ------------------------------------------------------------------ the module's write path (Ledger._fetchone)


def test_one_pooled_connection_serves_refusals_conflicts_and_writes_in_turn(db_url: str,
                                                                          conn: psycopg.Connection) -> None:
    """The reused cursor carries nothing from one call to the next, errors included."""
    from ledger import IdempotencyConflict, InsufficientCredits, Ledger
    from ledger.config import CreditsConfig

    uid = uuid.uuid4()
    with Ledger.connect(db_url, CreditsConfig(), migrate=False, max_size=1) as led:
        assert led.grant(uid, 10, idempotency_key="g").new_balance == 10
        with pytest.raises(InsufficientCredits):
            led.deduct(uid, 11, idempotency_key="d1")
        first = led.deduct(uid, 4, idempotency_key="d2", metadata={"job_id": "j"})
        with pytest.raises(IdempotencyConflict):
            led.deduct(uid, 5, idempotency_key="d2")
        assert led.deduct(uid, 4, idempotency_key="d2") == type(first)(6, first.transaction_id, True)
        assert led.balance(uid).balance == 6
    assert conn.execute("SELECT count(*) FROM public.points_deduction_failures").fetchone()[0] == 1
    assert conn.execute("SELECT metadata FROM public.points_transactions WHERE idempotency_key = 'd2'"
                        ).fetchone()[0] == {"job_id": "j"}
    assert conn.execute("SELECT metadata FROM public.points_transactions WHERE idempotency_key = 'g'"
                        ).fetchone()[0] == {}


def test_a_killed_connection_fails_one_call_and_the_next_gets_a_new_one(db_url: str,
                                                                        conn: psycopg.Connection) -> None:
    from ledger import DatabaseUnavailable, Ledger
    from ledger.config import CreditsConfig

    uid = uuid.uuid4()
    with Ledger.connect(db_url, CreditsConfig(), migrate=False, max_size=1) as led:
        led.grant(uid, 10, idempotency_key="g")
        led.retry_attempts = 1  # retries off: this is about the pool's recovery (tests/test_faults.py: the retry)
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        # the driver's error (AdminShutdown, 57P01) or DatabaseUnavailable, as before the fast path
        with pytest.raises((psycopg.Error, DatabaseUnavailable)):
            led.deduct(uid, 1, idempotency_key="d1")
        assert led.deduct(uid, 1, idempotency_key="d1").new_balance == 9  # retry on a fresh connection
    assert ledger_sum(conn, uid) == 9


def test_a_non_autocommit_pool_still_commits_each_write(db_url: str, conn: psycopg.Connection) -> None:
    from psycopg_pool import ConnectionPool

    from ledger import Ledger
    from ledger.config import CreditsConfig

    uid = uuid.uuid4()
    pool = ConnectionPool(db_url, min_size=1, max_size=1, open=True)  # autocommit off
    try:
        led = Ledger(pool, CreditsConfig(), db_url)
        led.grant(uid, 10, idempotency_key="g")
        led.deduct(uid, 3, idempotency_key="d")
        with pool.connection() as c:
            assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    finally:
        pool.close()
    assert balance_row(conn, uid) == (7, 10, 3)  # seen from another session: committed
