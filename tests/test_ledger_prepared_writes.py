"""The module's prepared write route (ledger.service._exec_fast) answers as the cursor route does.

Writes without metadata on a UTF8 autocommit connection go through a statement the Ledger prepares
once per session and sends with libpq directly; every other connection takes psycopg's cursor. The
same calls run on both routes (a pool with ``prepare_threshold = None`` forces the cursor one) and
must give the same rows, the same typed errors and the same failure record.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from ledger import IdempotencyConflict, InsufficientCredits, InvalidAmount, InvalidArgument, Ledger
from ledger.config import CreditsConfig
from ledger.service import LedgerWrite
from tests.factories import balance_row, ledger_sum

NAMES = {"credit_recon_add_points", "credit_recon_deduct_points"}


def _named_statements(led: Ledger) -> set[str]:
    """The Ledger's own prepared statements in the session of its (only) connection."""
    with led.connection() as c:
        return {r[0] for r in c.execute(
            "SELECT name FROM pg_prepared_statements WHERE name LIKE 'credit\\_recon\\_%'").fetchall()}


def _one_connection_ledger(db_url: str, **kwargs: object) -> Ledger:
    pool = ConnectionPool(db_url, min_size=1, max_size=1, open=True, name="prepared-writes",
                          kwargs={"autocommit": True, **kwargs})  # type: ignore[dict-item]
    return Ledger(pool, CreditsConfig(), db_url)


@pytest.fixture(params=["prepared", "cursor"])
def route(request: pytest.FixtureRequest, db_url: str) -> Iterator[tuple[str, Ledger]]:
    led = _one_connection_ledger(db_url, prepare_threshold=None if request.param == "cursor" else 5)
    try:
        yield request.param, led
    finally:
        led.close()


def test_both_routes_give_the_same_rows_errors_and_records(route: tuple[str, Ledger],
                                                           conn: psycopg.Connection) -> None:
    name, led = route
    uid = uuid.uuid4()
    first = led.grant(uid, 10, idempotency_key="g")
    assert first == LedgerWrite(10, first.transaction_id, False)
    assert led.grant(uid, 10, idempotency_key="g") == LedgerWrite(10, first.transaction_id, True)

    with pytest.raises(InsufficientCredits) as refused:
        led.deduct(uid, 11, idempotency_key="too-much")
    assert (refused.value.user_id, refused.value.balance, refused.value.requested) == (str(uid), 10, 11)
    assert getattr(refused.value.__cause__, "sqlstate", None) == "CR001"  # the driver's error kept as the cause
    with pytest.raises(IdempotencyConflict):
        led.deduct(uid, 1, idempotency_key="g")  # the grant's key for another write
    with pytest.raises(InvalidArgument, match="unknown transaction type"):  # refused by SQL (CR004)
        led.deduct(uid, 1, idempotency_key="d0", transaction_type="gift")

    # text beyond ASCII, a NULL description and a big id all survive the bytes the route sends
    key, text = "ключ:☃:" + "x" * 400, "café ☕ 'quoted' \\ back"
    d1 = led.deduct(uid, 4, idempotency_key=key, description=text)
    assert d1 == LedgerWrite(6, d1.transaction_id, False) and d1.transaction_id > first.transaction_id
    assert led.deduct(uid, 4, idempotency_key=key, description=text) == LedgerWrite(6, d1.transaction_id, True)
    d2 = led.deduct(str(uid).upper(), 1, idempotency_key="d2")  # a str id, parsed to the same user
    assert (d2.new_balance, d2.duplicate) == (5, False)
    rows = conn.execute("SELECT idempotency_key, description, amount, user_id FROM public.points_transactions "
                        "WHERE user_id = %s ORDER BY id", (uid,)).fetchall()
    assert rows == [("g", None, 10, uid), (key, text, -4, uid), ("d2", None, -1, uid)]
    assert balance_row(conn, uid) == (5, 10, 5) and ledger_sum(conn, uid) == 5
    assert conn.execute("SELECT user_id, amount, balance, idempotency_key FROM public.points_deduction_failures"
                        ).fetchall() == [(uid, 11, 10, "too-much")]
    assert _named_statements(led) == (NAMES if name == "prepared" else set())


def test_a_deallocated_statement_is_prepared_again(db_url: str, conn: psycopg.Connection) -> None:
    """DEALLOCATE ALL / DISCARD ALL (e.g. a pool's reset) drop the session's statements; the next
    write prepares its statement again instead of failing, and is written once."""
    uid = uuid.uuid4()
    led = _one_connection_ledger(db_url)
    try:
        led.grant(uid, 10, idempotency_key="g")
        led.deduct(uid, 1, idempotency_key="d1")
        assert _named_statements(led) == NAMES
        for command in ("DEALLOCATE ALL", "DISCARD ALL"):
            with led.connection() as c:
                c.execute(command)
            assert _named_statements(led) == set()
            led.deduct(uid, 1, idempotency_key=f"after {command}")
            assert _named_statements(led) == {"credit_recon_deduct_points"}
        assert led.grant(uid, 5, idempotency_key="g2").new_balance == 12
    finally:
        led.close()
    assert balance_row(conn, uid) == (12, 15, 3) and ledger_sum(conn, uid) == 12


def test_a_non_utf8_connection_takes_the_cursor_route(db_url: str, conn: psycopg.Connection) -> None:
    """The prepared route sends UTF-8 bytes, so a LATIN1 session gets psycopg's own encoding instead."""
    uid = uuid.uuid4()
    led = _one_connection_ledger(db_url, client_encoding="LATIN1")
    try:
        led.grant(uid, 10, idempotency_key="g")
        assert led.deduct(uid, 3, idempotency_key="d-é", description="café").new_balance == 7
        assert _named_statements(led) == set()
    finally:
        led.close()
    assert conn.execute("SELECT description FROM public.points_transactions WHERE idempotency_key = 'd-é'"
                        ).fetchone() == ("café",)


def test_bad_input_is_refused_before_any_statement_is_prepared(db_url: str, conn: psycopg.Connection) -> None:
    led = _one_connection_ledger(db_url)
    try:
        for bad in ({"amount": 0}, {"amount": -1}, {"amount": 10**6 + 1}, {"amount": True}, {"amount": 1.0},
                    {"idempotency_key": ""}, {"idempotency_key": "k\x00"}, {"idempotency_key": "\ud800"},
                    {"description": "x" * 1001}, {"description": "a\x00"}, {"user_id": "not-a-uuid"}):
            call = {"user_id": uuid.uuid4(), "amount": 1, "idempotency_key": "k", **bad}
            with pytest.raises(InvalidAmount if "amount" in bad else InvalidArgument):
                led.deduct(call.pop("user_id"), call.pop("amount"), **call)  # type: ignore[arg-type]
        assert _named_statements(led) == set()  # nothing reached SQL
    finally:
        led.close()
    assert conn.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0] == 0


def test_ctrl_c_during_a_prepared_write_cancels_it_on_the_server(db_url: str, conn: psycopg.Connection) -> None:
    """Ctrl-C while a deduction waits in the server (here on the user's balance row, held by another
    session): the call raises KeyboardInterrupt, as psycopg's cursor does, after asking the server to
    cancel it. Without the cancel the server would go on, take the row once it is free and write the
    deduction nobody is waiting for; with it nothing is written, and the same key can be sent again."""
    uid = uuid.uuid4()
    led = _one_connection_ledger(db_url)
    blocker = psycopg.connect(db_url)  # in a transaction: holds the row lock until rollback
    try:
        led.grant(uid, 10, idempotency_key="g")
        blocker.execute("SELECT 1 FROM public.points_balances WHERE user_id = %s FOR UPDATE", (uid,))
        main = threading.main_thread().ident
        assert main == threading.get_ident()  # the signal must reach the thread that waits
        timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT))
        timer.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            led.deduct(uid, 3, idempotency_key="interrupted")
        timer.join()
        assert time.monotonic() - started < 5  # the wait on the lock ended with the cancel
        waiting = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                               "AND query LIKE '%deduct_points%'").fetchone()[0]
        blocker.rollback()
        assert waiting == 0
        time.sleep(0.2)  # a statement left running would now take the row and commit
        assert balance_row(conn, uid) == (10, 10, 0) and ledger_sum(conn, uid) == 10
        assert led.deduct(uid, 3, idempotency_key="interrupted") == LedgerWrite(7, _tx(conn, "interrupted"), False)
    finally:
        blocker.close()
        led.close()


def _tx(conn: psycopg.Connection, key: str) -> int:
    return int(conn.execute("SELECT id FROM public.points_transactions WHERE idempotency_key = %s",
                            (key,)).fetchone()[0])
