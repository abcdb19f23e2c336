"""sql/017: a lot's write-once terms are checked by a trigger on the columns that hold them instead of
four CHECK constraints (which PostgreSQL re-evaluated on every draw). The table must refuse exactly what
it refused before, with the same SQLSTATE, whoever writes it -- including the owner, directly."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from ledger import Ledger
from tests.invariants import assert_consistent


def _lot(conn: psycopg.Connection, uid: uuid.UUID, key: str, amount: int = 10) -> int:
    return conn.execute("SELECT transaction_id FROM public.add_points(%s, %s, 'adjustment', 't', %s)",
                        (uid, amount, key)).fetchone()[0]


@pytest.mark.parametrize("column, value", [("granted", 0), ("granted", -5), ("expired", -1),
                                           ("consumed_before", -1), ("rollover_cap", -1)])
def test_a_bad_term_is_refused_on_update_and_insert(conn: psycopg.Connection, column: str, value: int) -> None:
    uid = uuid.uuid4()
    lot = _lot(conn, uid, "g")
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        conn.execute(f"UPDATE public.points_lots SET {column} = %s WHERE id = %s", (value, lot))
    assert exc.value.diag.constraint_name == "points_lots_terms"
    row = {"granted": 5, "expired": 0, "consumed_before": 0, "rollover_cap": None, column: value}
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            """INSERT INTO public.points_lots (id, user_id, source_type, granted, remaining, expired,
                                               consumed_before, rollover_cap, created_at)
               VALUES (-1, %s, 'adjustment', %s, 0, %s, %s, %s, now())""",
            (uid, row["granted"], row["expired"], row["consumed_before"], row["rollover_cap"]))
    assert conn.execute("SELECT granted, expired, consumed_before, rollover_cap FROM public.points_lots "
                        "WHERE id = %s", (lot,)).fetchone() == (10, 0, 0, None)
    assert conn.execute("SELECT count(*) FROM public.points_lots WHERE id = -1").fetchone()[0] == 0


def test_good_terms_pass_and_remaining_is_still_a_check_constraint(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    lot = _lot(conn, uid, "g")
    # NULL rollover_cap passes (as it did under the CHECK); zero terms pass
    conn.execute("UPDATE public.points_lots SET rollover_cap = NULL, expired = 0, consumed_before = 0 "
                 "WHERE id = %s", (lot,))
    conn.execute("UPDATE public.points_lots SET rollover_cap = 0 WHERE id = %s", (lot,))
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        conn.execute("UPDATE public.points_lots SET remaining = -1 WHERE id = %s", (lot,))
    assert exc.value.diag.constraint_name == "points_lots_remaining_check"
    # a term and remaining in one statement: refused either way
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE public.points_lots SET remaining = remaining - 1, expired = -1 WHERE id = %s", (lot,))
    assert conn.execute("SELECT remaining, expired FROM public.points_lots WHERE id = %s", (lot,)).fetchone() == (10, 0)


def test_draws_expiry_and_refunds_still_write_their_terms(ledger: Ledger, conn: psycopg.Connection) -> None:
    """The writers that set the checked columns (expiry sets expired) keep working through the trigger."""
    uid = uuid.uuid4()
    for i in range(3):
        _lot(conn, uid, f"g{i}", 20)
    conn.execute("""SELECT * FROM public.add_points(%s, 15, 'adjustment', 't', 'soon', '{}'::jsonb,
                                                    now() + interval '1 second', 90)""", (uid,))
    tx = ledger.deduct(uid, 35, idempotency_key="d1").transaction_id   # crosses lots g0, g1
    ledger.deduct(uid, 1, idempotency_key="d2")                        # one lot
    conn.execute("SELECT pg_sleep(1.1)")
    conn.execute("SELECT * FROM public.expire_lots(%s)", (uid,))
    conn.execute("SELECT * FROM public.refund_generation(%s, 5)", (tx,))
    # the 15 credits of the lot that expired are written off through an UPDATE OF expired
    assert conn.execute("SELECT sum(expired) FROM public.points_lots WHERE user_id = %s", (uid,)).fetchone()[0] == 15
    assert ledger.balance(uid).balance == 75 - 36 - 15 + 5
    assert_consistent(conn)
