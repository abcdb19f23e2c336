"""The ledger functions under real concurrency: many sessions, one user, one key."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from tests.factories import balance_row, count_rows, ledger_sum


def _race(url: str, clients: int, work) -> list:  # type: ignore[no-untyped-def]
    """Run ``work(conn, client_no)`` in ``clients`` threads, each on its own connection, released together."""
    barrier = threading.Barrier(clients)

    def run(n: int):  # type: ignore[no-untyped-def]
        with psycopg.connect(url, autocommit=True) as c:
            barrier.wait()
            return work(c, n)

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(run, range(clients)))


def test_exactly_n_one_credit_deductions_succeed_under_16_clients(db_url: str, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    conn.execute("SELECT * FROM public.add_points(%s, 1000, 'subscription_grant', 'p', 'grant')", (uid,))
    attempts_per_client = 70  # 16 * 70 = 1120 attempts for 1000 credits

    def work(c: psycopg.Connection, n: int) -> Counter:
        outcome: Counter = Counter()
        for i in range(attempts_per_client):
            try:
                c.execute("SELECT * FROM public.deduct_points(%s, 1, 'generation_deduction', 'img', %s)",
                          (uid, f"d:{n}:{i}"))
                outcome["ok"] += 1
            except psycopg.Error as exc:
                outcome[exc.sqlstate] += 1
        return outcome

    total = sum(_race(db_url, 16, work), Counter())
    assert total == Counter({"ok": 1000, "CR001": 120})
    assert balance_row(conn, uid) == (0, 1000, 1000)
    assert ledger_sum(conn, uid) == 0
    chain_ok = conn.execute(
        """SELECT bool_and(balance_after = running) FROM (
               SELECT balance_after, sum(amount) OVER (ORDER BY id) AS running
                 FROM public.points_transactions WHERE user_id = %s) s""", (uid,)).fetchone()[0]
    assert chain_ok


@pytest.mark.parametrize("fn", ["add_points", "deduct_points"])
def test_same_key_from_20_clients_writes_one_row_and_answers_everyone(db_url: str, conn: psycopg.Connection,
                                                                       fn: str) -> None:
    uid = uuid.uuid4()
    conn.execute("SELECT * FROM public.add_points(%s, 500, 'adjustment', 'seed', 'seed')", (uid,))
    ttype = "adjustment"

    def work(c: psycopg.Connection, n: int):  # type: ignore[no-untyped-def]
        return c.execute(f"SELECT new_balance, transaction_id, duplicate FROM public.{fn}(%s, 25, %s, 'x', 'K')",
                         (uid, ttype)).fetchone()

    answers = _race(db_url, 20, work)  # any error would propagate out of the pool and fail the test
    firsts = [a for a in answers if not a[2]]
    assert len(firsts) == 1
    assert {a[1] for a in answers} == {firsts[0][1]}  # everyone got the same ledger row
    assert {a[0] for a in answers} == {firsts[0][0]}  # and the first result's balance
    assert count_rows(conn, "points_transactions") == 2
    expected = 525 if fn == "add_points" else 475
    assert balance_row(conn, uid)[0] == expected == ledger_sum(conn, uid)


def test_same_key_for_different_users_races_to_one_winner_and_conflicts(db_url: str, conn: psycopg.Connection) -> None:
    users = [uuid.uuid4() for _ in range(8)]

    def work(c: psycopg.Connection, n: int) -> str:
        try:
            c.execute("SELECT * FROM public.add_points(%s, 10, 'adjustment', 'x', 'shared-key')", (users[n],))
            return "ok"
        except psycopg.Error as exc:
            return exc.sqlstate or "?"

    outcomes = Counter(_race(db_url, 8, work))
    assert outcomes == Counter({"ok": 1, "CR002": 7})
    assert count_rows(conn, "points_transactions") == 1
    # the losers' balance rows (if created) hold nothing: the ledger and the cache agree for everyone
    for u in users:
        row = balance_row(conn, u)
        assert (row[0] if row else 0) == ledger_sum(conn, u)


def test_concurrent_grants_and_deductions_keep_cache_equal_to_ledger(db_url: str, conn: psycopg.Connection) -> None:
    users = [uuid.uuid4() for _ in range(3)]
    for u in users:
        conn.execute("SELECT * FROM public.add_points(%s, 50, 'adjustment', 's', %s)", (u, f"seed:{u}"))

    def work(c: psycopg.Connection, n: int) -> None:
        for i in range(60):
            u = users[(n + i) % len(users)]
            try:
                if i % 3 == 0:
                    c.execute("SELECT * FROM public.add_points(%s, 3, 'refund', 'r', %s)", (u, f"a:{n}:{i}"))
                else:
                    c.execute("SELECT * FROM public.deduct_points(%s, 2, 'generation_deduction', 'g', %s)",
                              (u, f"d:{n}:{i}"))
            except psycopg.Error as exc:
                assert exc.sqlstate == "CR001"

    _race(db_url, 12, work)
    for u in users:
        bal, earned, spent = balance_row(conn, u)
        assert bal == ledger_sum(conn, u) == earned - spent
        assert bal >= 0
