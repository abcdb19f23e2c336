"""add_points / deduct_points in one session: results, balance_after, refusals that write nothing."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from tests.factories import balance_row, count_rows, ledger_sum

ADD = "SELECT * FROM public.add_points(%s, %s, %s, %s, %s)"
DEDUCT = "SELECT * FROM public.deduct_points(%s, %s, %s, %s, %s)"


def test_first_grant_creates_balance_row_and_chain(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    assert balance_row(conn, uid) is None
    bal, tx1, dup = conn.execute(ADD, (uid, 100, "subscription_grant", "p1", "k1")).fetchone()
    assert (bal, dup) == (100, False)
    bal, tx2, dup = conn.execute(DEDUCT, (uid, 30, "generation_deduction", "img", "k2")).fetchone()
    assert (bal, dup) == (70, False) and tx2 > tx1
    bal, _, _ = conn.execute(ADD, (uid, 5, "refund", "r", "k3")).fetchone()
    assert bal == 75
    rows = conn.execute("SELECT amount, balance_after, transaction_type FROM public.points_transactions "
                        "WHERE user_id = %s ORDER BY id", (uid,)).fetchall()
    assert rows == [(100, 100, "subscription_grant"), (-30, 70, "generation_deduction"), (5, 75, "refund")]
    assert balance_row(conn, uid) == (75, 105, 30)
    assert ledger_sum(conn, uid) == 75


def test_duplicate_key_returns_first_result_and_writes_nothing(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    first = conn.execute(ADD, (uid, 50, "adjustment", "a", "same")).fetchone()
    conn.execute(ADD, (uid, 7, "adjustment", "b", "other"))
    again = conn.execute(ADD, (uid, 50, "adjustment", "a", "same")).fetchone()
    assert again == (first[0], first[1], True)
    assert balance_row(conn, uid)[0] == 57
    assert count_rows(conn, "points_transactions") == 2


@pytest.mark.parametrize("args", [
    ("other_user", 50, "adjustment"),
    ("same_user", 51, "adjustment"),
    ("same_user", 50, "refund"),
])
def test_key_reused_for_another_write_is_refused(conn: psycopg.Connection, args: tuple) -> None:
    uid = uuid.uuid4()
    conn.execute(ADD, (uid, 50, "adjustment", "a", "k"))
    who, amount, ttype = args
    target = uid if who == "same_user" else uuid.uuid4()
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(ADD, (target, amount, ttype, "a", "k"))
    assert exc.value.sqlstate == "CR002"
    assert count_rows(conn, "points_transactions") == 1
    assert balance_row(conn, uid)[0] == 50


def test_insufficient_credits_has_own_sqlstate_and_leaves_balance(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    conn.execute(ADD, (uid, 10, "adjustment", "a", "k1"))
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(DEDUCT, (uid, 11, "generation_deduction", "x", "k2"))
    assert exc.value.sqlstate == "CR001"
    assert balance_row(conn, uid) == (10, 10, 0)
    assert count_rows(conn, "points_transactions") == 1
    # a user with no balance row at all is refused the same way
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(DEDUCT, (uuid.uuid4(), 1, "generation_deduction", "x", "k3"))
    assert exc.value.sqlstate == "CR001"


@pytest.mark.parametrize("fn,user,amount,ttype,key,state", [
    ("add_points", "u", 0, "adjustment", "k", "CR003"),
    ("add_points", "u", -5, "adjustment", "k", "CR003"),
    ("add_points", "u", None, "adjustment", "k", "CR003"),
    ("add_points", "u", 1_000_001, "adjustment", "k", "CR003"),
    ("add_points", "u", 9_000_000_000_000_000_000, "adjustment", "k", "CR003"),
    ("add_points", "u", 10**20, "adjustment", "k", "42883"),  # beyond bigint: no such function signature
    ("add_points", None, 5, "adjustment", "k", "CR004"),
    ("add_points", "u", 5, "no_such_type", "k", "CR004"),
    ("add_points", "u", 5, None, "k", "CR004"),
    ("add_points", "u", 5, "generation_deduction", "k", "CR004"),  # a debit type cannot add
    ("deduct_points", "u", 5, "subscription_grant", "k", "CR004"),  # a credit type cannot deduct
    ("add_points", "u", 5, "adjustment", "", "CR004"),
    ("add_points", "u", 5, "adjustment", "x" * 600, "CR004"),
    ("deduct_points", "u", 0, "generation_deduction", "k", "CR003"),
])
def test_bad_arguments_refused_with_nothing_written(conn: psycopg.Connection, fn: str, user: str | None,
                                                    amount: int | None, ttype: str | None, key: str,
                                                    state: str) -> None:
    uid = uuid.uuid4()
    conn.execute(ADD, (uid, 100, "adjustment", "seed", "seed"))
    target = uid if user == "u" else None
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(f"SELECT * FROM public.{fn}(%s, %s, %s, %s, %s)", (target, amount, ttype, "x", key))
    assert exc.value.sqlstate == state
    assert count_rows(conn, "points_transactions") == 1
    assert balance_row(conn, uid) == (100, 100, 0)


def test_malformed_user_id_refused_by_type(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM public.add_points('not-a-uuid', 5, 'adjustment', 'x', 'k')")
    assert exc.value.sqlstate == "22P02"
    assert count_rows(conn, "points_transactions") == 0


def test_max_amount_follows_settings(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    conn.execute("UPDATE public.ledger_settings SET value = '100' WHERE name = 'max_operation_amount'")
    conn.execute(ADD, (uid, 100, "adjustment", "ok", "k1"))
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(ADD, (uid, 101, "adjustment", "too much", "k2"))
    assert exc.value.sqlstate == "CR003"


def test_ledger_rows_cannot_be_updated_or_deleted(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    conn.execute(ADD, (uid, 10, "adjustment", "a", "k1"))
    for stmt in ("UPDATE public.points_transactions SET amount = 99",
                 "DELETE FROM public.points_transactions",
                 "TRUNCATE public.points_transactions"):
        with pytest.raises(psycopg.Error) as exc:
            conn.execute(stmt)
        assert exc.value.sqlstate == "CR010"
    assert ledger_sum(conn, uid) == 10


def test_null_key_gets_a_generated_one(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    conn.execute(ADD, (uid, 10, "adjustment", "a", None))
    conn.execute(ADD, (uid, 10, "adjustment", "a", None))  # no key: two distinct writes
    keys = [r[0] for r in conn.execute("SELECT idempotency_key FROM public.points_transactions").fetchall()]
    assert len(set(keys)) == 2 and all(k.startswith("auto:") for k in keys)
