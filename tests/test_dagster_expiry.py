"""The daily expiry sweep as the pipeline runs it (in process, a real database): lots past their expiry are
written off once -- a rollover keeps its cap -- lots not yet due and credits that never expire stay, and a
second run writes nothing."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import psycopg
from dagster import DagsterInstance
from psycopg.types.json import Jsonb

from tests.dagster_helpers import instance  # noqa: F401 (fixture)
from tests.dagster_helpers import metadata, output, run_job, today
from tests.invariants import assert_consistent


def _grant(conn: psycopg.Connection, uid: uuid.UUID, amount: int, key: str, expires_at: datetime | None,
           terms: dict | None = None) -> int:
    return conn.execute("SELECT transaction_id FROM public.add_points(%s, %s, 'subscription_grant', 'period', %s, %s, %s)",
                        (uid, amount, key, Jsonb({"lot": terms} if terms else {}), expires_at)).fetchone()[0]


def _expiry_rows(conn: psycopg.Connection) -> list[tuple[uuid.UUID, int, str]]:
    return conn.execute("""SELECT user_id, amount, metadata ->> 'lot_id' FROM public.points_transactions
                            WHERE transaction_type = 'expiry' ORDER BY id""").fetchall()


def _balance(conn: psycopg.Connection, uid: uuid.UUID) -> int:
    return conn.execute("SELECT balance FROM public.points_balances WHERE user_id = %s", (uid,)).fetchone()[0]


def test_expire_credits_job_writes_each_expiry_once(db_url: str, conn: psycopg.Connection,
                                                    instance: DagsterInstance) -> None:
    now = conn.execute("SELECT now()").fetchone()[0]
    rolled, plain, later = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    rolled_lot = _grant(conn, rolled, 20, "r", now - timedelta(hours=2),
                        {"rollover_cap": 5, "rollover_until": (now + timedelta(days=28)).isoformat()})
    _grant(conn, plain, 4, "p-forever", None)  # first: a write after the past-due grant would expire it lazily
    plain_lot = _grant(conn, plain, 9, "p", now - timedelta(minutes=5))
    _grant(conn, later, 7, "l", now + timedelta(days=3))

    first = run_job("expire_credits", db_url, instance, partition=today())
    assert first.success
    meta = metadata(first, "expired_credits")
    assert (meta["users"], meta["lots"], meta["credits_expired"], meta["credits_rolled_over"]) == (2, 2, 24, 5)
    assert meta["still_due_users"] == 0
    assert output(first, "expired_credits")["next_expiry"] is not None  # the lot due in 3 days
    assert sorted(_expiry_rows(conn), key=str) == sorted([(rolled, -15, str(rolled_lot)), (plain, -9, str(plain_lot))],
                                                         key=str)
    assert (_balance(conn, rolled), _balance(conn, plain), _balance(conn, later)) == (5, 4, 7)
    assert conn.execute("SELECT rolled_over, period_end IS NOT NULL FROM public.points_lots WHERE id = %s",
                        (rolled_lot,)).fetchone() == (5, True)
    assert_consistent(conn)

    again = run_job("expire_credits", db_url, instance, partition=today())
    assert again.success
    meta = metadata(again, "expired_credits")
    assert (meta["users"], meta["lots"], meta["credits_expired"], meta["credits_rolled_over"]) == (0, 0, 0, 0)
    assert len(_expiry_rows(conn)) == 2
    assert (_balance(conn, rolled), _balance(conn, plain), _balance(conn, later)) == (5, 4, 7)


def test_a_small_batch_sweeps_every_user(db_url: str, conn: psycopg.Connection, instance: DagsterInstance) -> None:
    """The sweep loops over batches until nothing is due; max_batches stops early and says what is left."""
    now = conn.execute("SELECT now()").fetchone()[0]
    users = [uuid.uuid4() for _ in range(5)]
    for i, uid in enumerate(users):
        _grant(conn, uid, 3, f"u{i}", now - timedelta(minutes=1))
    capped = run_job("expire_credits", db_url, instance, partition=today(),
                     run_config={"ops": {"expired_credits": {"config": {"batch": 2, "max_batches": 1}}}})
    meta = metadata(capped, "expired_credits")
    assert (meta["users"], meta["still_due_users"]) == (2, 3)
    rest = run_job("expire_credits", db_url, instance, partition=today(),
                   run_config={"ops": {"expired_credits": {"config": {"batch": 2}}}})
    meta = metadata(rest, "expired_credits")
    assert (meta["users"], meta["credits_expired"], meta["still_due_users"]) == (3, 9, 0)
    assert len(_expiry_rows(conn)) == 5
    assert_consistent(conn)
