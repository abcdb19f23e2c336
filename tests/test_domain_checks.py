"""sql/021: the single-column CHECKs of the tables a deduction writes are constraints of the columns'
types (domains), which PostgreSQL plans once per backend instead of once per statement. The tables must
refuse exactly what they refused, with the same SQLSTATE and constraint names, whoever writes them -- the
owner directly included; and deduct_points' fast path, which now catches a taken key as the unique
index's refusal instead of ON CONFLICT, must let every other refusal through."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.audit_cases import add
from tests.factories import balance_row

LEDGER_INSERT = """INSERT INTO public.points_transactions (user_id, amount, balance_after, transaction_type,
                                                          description, idempotency_key, lot_id)
                   VALUES (%s, %s, 0, 'adjustment', %s, %s, %s)"""


def test_the_checks_are_on_the_column_types_not_the_tables(conn: psycopg.Connection) -> None:
    rows = conn.execute(
        """SELECT a.attrelid::regclass::text, a.attname, a.atttypid::regtype::text, c.conname, c.convalidated
             FROM pg_attribute a JOIN pg_constraint c ON c.contypid = a.atttypid
            WHERE a.attrelid IN ('public.points_transactions'::regclass, 'public.points_lots'::regclass)
              AND NOT a.attisdropped ORDER BY 1, 2""").fetchall()
    assert rows == [
        ("points_lots", "remaining", "lot_remaining", "points_lots_remaining_check", True),
        ("points_transactions", "amount", "ledger_amount", "points_transactions_amount_check", True),
        ("points_transactions", "description", "ledger_description", "points_transactions_description_length",
         False),
    ]
    table_checks = conn.execute(
        """SELECT conrelid::regclass::text, conname FROM pg_constraint
            WHERE contype = 'c' AND conrelid IN ('public.points_transactions'::regclass,
                                                 'public.points_lots'::regclass)""").fetchall()
    assert table_checks == []


@pytest.mark.parametrize("amount, description, constraint", [
    (0, "ok", "points_transactions_amount_check"),
    (5, "x" * 1001, "points_transactions_description_length"),
])
def test_a_direct_ledger_insert_is_refused_by_the_domain(conn: psycopg.Connection, amount: int,
                                                          description: str, constraint: str) -> None:
    uid = uuid.uuid4()
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        conn.execute(LEDGER_INSERT, (uid, amount, description, f"direct:{uid}", -1))
    assert exc.value.diag.constraint_name == constraint
    assert conn.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0] == 0
    # the limits themselves still pass: a signed amount, exactly 1,000 characters, no description
    conn.execute(LEDGER_INSERT, (uid, -1, "x" * 1000, f"edge:{uid}", -1))
    conn.execute(LEDGER_INSERT, (uid, 1, None, f"null:{uid}", -1))


def test_a_negative_remaining_is_refused_on_insert_and_on_a_draw(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    add(conn, uid, 10)
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        conn.execute("""INSERT INTO public.points_lots (id, user_id, source_type, granted, remaining, created_at)
                        VALUES (-1, %s, 'adjustment', 5, -1, now())""", (uid,))
    assert exc.value.diag.constraint_name == "points_lots_remaining_check"
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        conn.execute("UPDATE public.points_lots SET remaining = remaining - 11 WHERE user_id = %s", (uid,))
    assert exc.value.diag.constraint_name == "points_lots_remaining_check"
    assert conn.execute("SELECT remaining, spent FROM public.points_lots WHERE user_id = %s",
                        (uid,)).fetchall() == [(10, False)]


def test_the_fast_path_lets_other_refusals_of_the_ledger_through(conn: psycopg.Connection) -> None:
    """Only a taken idempotency key is a duplicate: a refusal by any other constraint of the ledger row
    (here the primary key, taken by a row written with the identity's next value) is an error, and the
    balance and lots stay as they were."""
    uid = uuid.uuid4()
    add(conn, uid, 50)
    next_id = conn.execute("SELECT nextval(pg_get_serial_sequence('public.points_transactions', 'id')) + 1"
                           ).fetchone()[0]
    conn.execute("""INSERT INTO public.points_transactions (id, user_id, amount, balance_after, transaction_type,
                                                            idempotency_key, lot_id)
                    OVERRIDING SYSTEM VALUE VALUES (%s, %s, 1, 0, 'adjustment', 'taken-id', -1)""",
                 (next_id, uuid.uuid4()))
    with pytest.raises(psycopg.errors.UniqueViolation) as exc:
        conn.execute("SELECT * FROM public.deduct_points(%s, 5, 'generation_deduction', 'g', 'job-1')", (uid,))
    assert exc.value.diag.constraint_name == "points_transactions_pkey"
    assert balance_row(conn, uid) == (50, 50, 0)
    assert conn.execute("SELECT sum(remaining) FROM public.points_lots WHERE user_id = %s", (uid,)).fetchone()[0] == 50
    # the next call gets the next id and goes through (a taken key's answer: test_ledger_fast_path)
    assert conn.execute("SELECT new_balance, duplicate FROM public.deduct_points(%s, 5, 'generation_deduction', "
                        "'g', 'job-1')", (uid,)).fetchone() == (45, False)
    assert balance_row(conn, uid) == (45, 50, 5)
    assert conn.execute("SELECT sum(remaining) FROM public.points_lots WHERE user_id = %s", (uid,)).fetchone()[0] == 45
