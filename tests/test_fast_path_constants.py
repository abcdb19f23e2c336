"""deduct_points' fast path reads the per-operation maximum and the debit types from two compiled SQL
functions (sql/019). They must follow ledger_settings and ledger_transaction_types at once, also in a
session whose plan for the fast path is already cached; the tables stay the truth."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from ledger.config import CreditsConfig, LimitsConfig
from ledger.migrate import migrate
from tests.audit_cases import add

DEDUCT = "SELECT * FROM public.deduct_points(%s, %s, %s, 'test', %s)"


def _ledger_rows(conn: psycopg.Connection, uid: uuid.UUID) -> int:
    return conn.execute("SELECT count(*) FROM public.points_transactions WHERE user_id = %s", (uid,)).fetchone()[0]


def test_the_compiled_constants_are_the_tables(conn: psycopg.Connection) -> None:
    max_amount = conn.execute("SELECT value::bigint FROM public.ledger_settings "
                              "WHERE name = 'max_operation_amount'").fetchone()[0]
    assert conn.execute("SELECT public.ledger_max_operation_amount()").fetchone()[0] == max_amount
    rows = conn.execute("SELECT name, direction, public.ledger_is_debit_type(name) "
                        "FROM public.ledger_transaction_types").fetchall()
    assert {name: ok for name, _, ok in rows} == {name: direction in (0, -1) for name, direction, _ in rows}
    assert "generation_deduction" in [name for name, _, ok in rows if ok]
    assert conn.execute("SELECT public.ledger_is_debit_type('no_such_type')").fetchone()[0] is False


def test_a_lowered_maximum_holds_in_a_session_with_a_warm_plan(db_url: str, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    add(conn, uid, 1000)
    with psycopg.connect(db_url, autocommit=True) as app:
        for i in range(8):  # past plpgsql's five custom plans: the generic plan is cached in this session
            app.execute(DEDUCT, (uid, 10, "generation_deduction", f"warm:{i}"))
        migrate(conn, CreditsConfig(limits=LimitsConfig(max_operation_amount=5)))
        assert conn.execute("SELECT public.ledger_max_operation_amount()").fetchone()[0] == 5
        before = _ledger_rows(conn, uid)
        with pytest.raises(psycopg.Error, match="exceeds the per-operation maximum of 5") as exc:
            app.execute(DEDUCT, (uid, 10, "generation_deduction", "over"))
        assert exc.value.sqlstate == "CR003"
        assert _ledger_rows(conn, uid) == before
        assert app.execute(DEDUCT, (uid, 5, "generation_deduction", "at")).fetchone()[0] == 1000 - 80 - 5
    # and back up: the raised maximum takes a 10-credit deduction again
    migrate(conn, CreditsConfig())
    with psycopg.connect(db_url, autocommit=True) as app:
        assert app.execute(DEDUCT, (uid, 10, "generation_deduction", "again")).fetchone()[0] == 1000 - 95


def test_a_debit_type_added_later_is_taken_and_a_credit_type_refused(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    add(conn, uid, 100)
    conn.execute(DEDUCT, (uid, 1, "generation_deduction", "warm"))
    conn.execute("INSERT INTO public.ledger_transaction_types (name, direction) VALUES ('video_render', -1)")
    assert conn.execute("SELECT public.ledger_is_debit_type('video_render')").fetchone()[0] is True
    assert conn.execute(DEDUCT, (uid, 2, "video_render", "v")).fetchone()[0] == 97
    before = _ledger_rows(conn, uid)
    with pytest.raises(psycopg.Error, match="cannot be used to deduct") as exc:
        conn.execute(DEDUCT, (uid, 2, "subscription_grant", "credit-type"))
    assert exc.value.sqlstate == "CR004"
    assert _ledger_rows(conn, uid) == before
    conn.execute("DELETE FROM public.ledger_transaction_types WHERE name = 'video_render'")
    assert conn.execute("SELECT public.ledger_is_debit_type('video_render')").fetchone()[0] is False


def test_a_missing_maximum_sends_every_call_to_the_slow_path(conn: psycopg.Connection) -> None:
    """No setting compiles to 0, which no amount passes: the call goes down the slow path, which answers
    from the table as it always has (ledger_validate applies no maximum it cannot read)."""
    uid = uuid.uuid4()
    add(conn, uid, 100)
    with conn.transaction():
        conn.execute("DELETE FROM public.ledger_settings WHERE name = 'max_operation_amount'")
        assert conn.execute("SELECT public.ledger_max_operation_amount()").fetchone()[0] == 0
        new_balance, tx, duplicate = conn.execute(DEDUCT, (uid, 7, "generation_deduction", "no-max")).fetchone()
        assert (new_balance, duplicate) == (93, False)
        assert conn.execute("SELECT amount FROM public.points_transactions WHERE id = %s", (tx,)).fetchone() == (-7,)
        raise psycopg.Rollback()
    assert conn.execute("SELECT public.ledger_max_operation_amount()").fetchone()[0] > 0
    assert _ledger_rows(conn, uid) == 1
