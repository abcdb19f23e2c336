"""sql/022: reserved >= 0 moved from the balance table's CHECK to the column's type, the refunds' own
partial index dropped, and points_lots.spent a plain column the functions keep in step with remaining.
What the tables refuse, what the audit reads and which lots a draw sees must stay as they were."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.audit_cases import add, deduct

OPEN_LOTS_SQL = "SELECT id, remaining, spent FROM public.points_lots WHERE user_id = %s ORDER BY id"


@pytest.mark.parametrize("assignment, constraint", [
    ("reserved = -1", "points_balances_reserved_check"),          # the domain
    ("reserved = balance + 1", "points_balances_balance_check"),  # the table: reserved <= balance
    ("balance = -1", "points_balances_balance_check"),            # balance >= 0 follows from both
])
def test_the_balance_row_refuses_what_it_refused(conn: psycopg.Connection, assignment: str,
                                                 constraint: str) -> None:
    uid = uuid.uuid4()
    add(conn, uid, 10)
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        conn.execute(f"UPDATE public.points_balances SET {assignment} WHERE user_id = %s", (uid,))
    assert exc.value.diag.constraint_name == constraint
    assert conn.execute("SELECT balance, reserved FROM public.points_balances WHERE user_id = %s",
                        (uid,)).fetchone() == (10, 0)


def test_reserved_reads_back_as_bigint(conn: psycopg.Connection) -> None:
    """current_balance returns the column through RETURN QUERY, which wants its declared types exactly;
    clients see the domain as its base type."""
    uid = uuid.uuid4()
    add(conn, uid, 50)
    conn.execute("SELECT * FROM public.reserve_points(%s, 20, %s)", (uid, f"job-{uid}"))
    cur = conn.execute("SELECT reserved, spendable FROM public.current_balance(%s)", (uid,))
    assert cur.fetchone() == (20, 30)
    assert [d.type_code for d in cur.description] == [20, 20]  # int8 (bigint)
    assert conn.execute("SELECT count(*) FROM public.reserved_mismatches WHERE user_id = %s",
                        (uid,)).fetchone()[0] == 0


def test_the_refunds_read_keeps_an_index(conn: psycopg.Connection) -> None:
    conn.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in conn.execute(
        "EXPLAIN SELECT id FROM public.points_transactions WHERE transaction_type = 'refund' "
        "AND metadata ? 'refund_of' AND created_at <= now()"))
    assert "points_transactions_type_created_idx" in plan
    assert conn.execute("SELECT to_regclass('public.points_transactions_refunds_idx')").fetchone()[0] is None


def test_spent_follows_remaining_through_draws_refunds_and_a_taken_key(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    add(conn, uid, 10)
    add(conn, uid, 10)
    first, second = (r[0] for r in conn.execute(OPEN_LOTS_SQL, (uid,)).fetchall())
    deduct(conn, uid, 10, f"a:{uid}")                     # the first lot, exactly
    assert conn.execute(OPEN_LOTS_SQL, (uid,)).fetchall() == [(first, 0, True), (second, 10, False)]
    _, tx, _ = deduct(conn, uid, 4, f"b:{uid}")           # the second lot, in part
    assert conn.execute(OPEN_LOTS_SQL, (uid,)).fetchall() == [(first, 0, True), (second, 6, False)]
    # a taken key: the draw is made, then undone -- the lot is open again with what it had
    assert deduct(conn, uid, 4, f"b:{uid}")[2] is True
    assert conn.execute(OPEN_LOTS_SQL, (uid,)).fetchall() == [(first, 0, True), (second, 6, False)]
    deduct(conn, uid, 6, f"c:{uid}")                      # everything: both spent
    assert conn.execute(OPEN_LOTS_SQL, (uid,)).fetchall() == [(first, 0, True), (second, 0, True)]
    # a refund back into the lot it came from opens it again, and the next draw finds it
    conn.execute("SELECT * FROM public.refund_generation(%s)", (tx,))
    assert conn.execute(OPEN_LOTS_SQL, (uid,)).fetchall() == [(first, 0, True), (second, 4, False)]
    assert deduct(conn, uid, 4, f"d:{uid}")[0] == 0
    assert conn.execute(OPEN_LOTS_SQL, (uid,)).fetchall() == [(first, 0, True), (second, 0, True)]


def test_a_walk_by_the_trigger_and_an_expiry_set_spent(conn: psycopg.Connection) -> None:
    """Rows written by other paths (here the owner, directly) are drawn by the lots trigger's walk."""
    uid = uuid.uuid4()
    add(conn, uid, 5)
    add(conn, uid, 5)
    conn.execute("""INSERT INTO public.points_transactions (user_id, amount, balance_after, transaction_type,
                                                            description, idempotency_key)
                    VALUES (%s, -7, 3, 'adjustment', 'by hand', %s)""", (uid, f"hand:{uid}"))
    lots = conn.execute(OPEN_LOTS_SQL, (uid,)).fetchall()
    assert [(n, s) for _, n, s in lots] == [(0, True), (3, False)]
    conn.execute("""INSERT INTO public.points_transactions (user_id, amount, balance_after, transaction_type,
                                                            description, idempotency_key, metadata)
                    VALUES (%s, -3, 0, 'expiry', 'expired', %s, jsonb_build_object('lot_id', %s::bigint))""",
                 (uid, f"exp:{uid}", lots[1][0]))
    assert [(n, s) for _, n, s in conn.execute(OPEN_LOTS_SQL, (uid,)).fetchall()] == [(0, True), (0, True)]
