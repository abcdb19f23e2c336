"""sql/023: deduct_points' fast path runs in one exception block (a taken key rolls back the balance and
the draws instead of undoing them), every draw it makes says so in lots_drawn, and the lots trigger's WHEN
tests lots_drawn alone. The rows written, the answers and what the trigger walks must stay as they were."""

from __future__ import annotations

import uuid

import psycopg

from tests.audit_cases import add, deduct
from tests.factories import balance_row

LOTS_SQL = "SELECT id, remaining, spent FROM public.points_lots WHERE user_id = %s ORDER BY id"
ROW_SQL = """SELECT lot_id, lots_drawn, lot_ids, lot_amounts FROM public.points_transactions
              WHERE idempotency_key = %s"""
CONSUMED_SQL = """SELECT lot_id, amount FROM public.points_lot_consumptions WHERE user_id = %s
                  ORDER BY transaction_id, lot_id NULLS LAST"""


def _state(conn: psycopg.Connection, uid: uuid.UUID) -> tuple[object, ...]:
    ledger = conn.execute("SELECT count(*), sum(amount) FROM public.points_transactions WHERE user_id = %s",
                          (uid,)).fetchone()
    return (balance_row(conn, uid), ledger, conn.execute(LOTS_SQL, (uid,)).fetchall(),
            conn.execute(CONSUMED_SQL, (uid,)).fetchall())


def test_every_draw_of_the_fast_path_says_it_drew(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    add(conn, uid, 10)
    add(conn, uid, 10)
    first, second = (r[0] for r in conn.execute(LOTS_SQL, (uid,)).fetchall())
    deduct(conn, uid, 4, f"one:{uid}")                    # inside the first lot
    assert conn.execute(ROW_SQL, (f"one:{uid}",)).fetchone() == (first, True, None, None)
    deduct(conn, uid, 10, f"two:{uid}")                   # the first lot's 6, then 4 of the second
    assert conn.execute(ROW_SQL, (f"two:{uid}",)).fetchone() == (None, True, [first, second], [6, 4])
    assert conn.execute(LOTS_SQL, (uid,)).fetchall() == [(first, 0, True), (second, 6, False)]
    assert conn.execute(CONSUMED_SQL, (uid,)).fetchall() == []  # both draws live on their ledger rows


def test_a_draw_past_the_last_lot_itemises_the_uncovered_rest(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    add(conn, uid, 10)
    add(conn, uid, 10)
    first, second = (r[0] for r in conn.execute(LOTS_SQL, (uid,)).fetchall())
    # a hand repair that left the lots short of the balance: the second lot holds 2 of its 10
    conn.execute("UPDATE public.points_lots SET remaining = 2 WHERE id = %s", (second,))
    new_balance, tx, duplicate = deduct(conn, uid, 15, f"short:{uid}")
    assert (new_balance, duplicate) == (5, False)
    assert conn.execute(ROW_SQL, (f"short:{uid}",)).fetchone() == (None, True, None, None)
    assert conn.execute(CONSUMED_SQL, (uid,)).fetchall() == [(first, 10), (second, 2), (None, 3)]


def test_a_user_with_no_open_lot_is_left_to_the_trigger(conn: psycopg.Connection) -> None:
    """No lot drawn by the function: lot_id and lots_drawn stay NULL, and the trigger records the draw as
    uncovered, as before sql/023."""
    uid = uuid.uuid4()
    add(conn, uid, 10)
    conn.execute("UPDATE public.points_lots SET remaining = 0, spent = true WHERE user_id = %s", (uid,))
    assert deduct(conn, uid, 3, f"none:{uid}")[0] == 7
    assert conn.execute(ROW_SQL, (f"none:{uid}",)).fetchone() == (None, None, None, None)
    assert conn.execute(CONSUMED_SQL, (uid,)).fetchall() == [(None, 3)]


def test_a_taken_key_rolls_back_a_draw_on_several_lots(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    for _ in range(3):
        add(conn, uid, 5)
    first = deduct(conn, uid, 7, f"k:{uid}")
    before = _state(conn, uid)
    again = deduct(conn, uid, 7, f"k:{uid}")             # the same key: would draw 3 more lots' worth
    assert again == (first[0], first[1], True)
    assert _state(conn, uid) == before                   # balance, ledger, lots and consumptions as they were
    assert deduct(conn, uid, 7, f"k:{uid}") == again     # and a third time
    assert _state(conn, uid) == before


def test_a_taken_key_on_a_single_lot_answers_with_the_first_row(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    add(conn, uid, 50)
    first = deduct(conn, uid, 5, f"s:{uid}")
    before = _state(conn, uid)
    assert deduct(conn, uid, 5, f"s:{uid}") == (first[0], first[1], True)
    assert _state(conn, uid) == before


def test_a_row_naming_its_lot_is_not_walked_again(conn: psycopg.Connection) -> None:
    """Rows with a lot_id and lots_drawn NULL (deduct_points before sql/023, the seed's bulk load) were
    drawn by their writer: the trigger leaves the lots alone, as its old WHEN did."""
    uid = uuid.uuid4()
    add(conn, uid, 10)
    (lot, _, _), = conn.execute(LOTS_SQL, (uid,)).fetchall()
    conn.execute("UPDATE public.points_lots SET remaining = 6 WHERE id = %s", (lot,))
    conn.execute("""INSERT INTO public.points_transactions (user_id, amount, balance_after, transaction_type,
                                                            description, idempotency_key, lot_id)
                    VALUES (%s, -4, 6, 'generation_deduction', 'drawn by its writer', %s, %s)""",
                 (uid, f"old:{uid}", lot))
    assert conn.execute(LOTS_SQL, (uid,)).fetchall() == [(lot, 6, False)]
    assert conn.execute(CONSUMED_SQL, (uid,)).fetchall() == []
