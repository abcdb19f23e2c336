"""The Ledger's lock-free connection checkout (ledger.checkout) against a real server: no deadlock with
more threads than connections, dead sessions never reused, hoarded connections given back."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from ledger import Ledger
from ledger.checkout import ConnectionCheckout
from ledger.config import CreditsConfig
from ledger.errors import DatabaseUnavailable, InsufficientCredits, InvalidArgument
from ledger.ids import check_text
from tests.factories import balance_row, count_rows, ledger_sum


@pytest.fixture
def small(db_url: str, config: CreditsConfig) -> Iterator[Ledger]:
    """A Ledger on a pool of 4 whose waits fail within 10 s instead of 30 (a deadlock fails fast)."""
    with Ledger.connect(db_url, config, migrate=False, max_size=4) as led:
        led.pool.timeout = 10.0
        yield led


@pytest.fixture
def no_sweeper(db_url: str, config: CreditsConfig, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ledger]:
    """As ``small``, with the once-a-second sweeper parked: only the call path's own hand-off to waiting
    callers can keep 16 threads on 4 connections going (else they wait out the 10 s pool timeout)."""
    monkeypatch.setattr(ConnectionCheckout, "sweep_interval", 3600.0)
    with Ledger.connect(db_url, config, migrate=False, max_size=4) as led:
        led.pool.timeout = 10.0
        yield led


def _hoard(led: Ledger, n: int) -> list[int]:
    """Make the Ledger borrow ``n`` connections at once (n threads inside connection() together); their pids."""
    barrier = threading.Barrier(n)

    def hold(_: int) -> int:
        with led.connection() as c:
            barrier.wait(timeout=20)
            return c.info.backend_pid

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(hold, range(n)))


def _idle_pids(led: Ledger) -> set[int]:
    return {c.info.backend_pid for c, _ in list(led._checkout.idle)}


def _wait_until(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.mark.parametrize("pool_queue_visible", [True, False], ids=["pool-queue", "no-private-attr"])
def test_16_threads_on_4_connections_finish_with_exact_results(no_sweeper: Ledger, conn: psycopg.Connection,
                                                                pool_queue_visible: bool) -> None:
    small = no_sweeper
    if not pool_queue_visible:  # as with a psycopg_pool without ``_waiting``: the Ledger's own tokens must do
        small._checkout.pool_waiting = ()
    uid, other = uuid.uuid4(), uuid.uuid4()
    small.grant(uid, 1000, idempotency_key="seed")
    small.grant(other, 10_000, idempotency_key="seed-other")
    barrier = threading.Barrier(16)

    def work(n: int) -> Counter:
        out: Counter = Counter()
        barrier.wait(timeout=20)
        for i in range(70):  # 16 * 70 = 1120 one-credit deductions for 1000 credits
            try:
                small.deduct(uid, 1, idempotency_key=f"d:{n}:{i}")
                out["ok"] += 1
            except InsufficientCredits:  # recorded through connection(), while others wait on the pool
                out["refused"] += 1
            if i % 10 == 0:  # the other paths that take a connection, mixed in
                small.balance(other)
                small.history(other, limit=5)
                with small.hold(other, 2, job_id=f"job:{n}:{i}") as h:
                    h.capture(1)
                small.spendable(other)
        return out

    with ThreadPoolExecutor(16) as ex:
        futures = [ex.submit(work, n) for n in range(16)]
        total = sum((f.result(timeout=120) for f in futures), Counter())

    assert total == Counter({"ok": 1000, "refused": 120})
    assert balance_row(conn, uid) == (0, 1000, 1000)
    assert ledger_sum(conn, uid) == 0
    assert small.balance(other).balance == 10_000 - 16 * 7
    assert count_rows(conn, "points_deduction_failures") == 120
    # every connection is accounted for: idle in the checkout or in the pool, none lost or doubled
    stats = small.pool.get_stats()
    assert len(small._checkout.idle) + stats["pool_available"] == stats["pool_size"] <= 4
    assert len({id(c) for c, _ in small._checkout.idle}) == len(small._checkout.idle)


def test_a_connection_is_never_used_by_two_threads_at_once(no_sweeper: Ledger) -> None:
    small = no_sweeper
    busy: set[int] = set()
    guard = threading.Lock()
    clashes: list[int] = []

    def work(n: int) -> None:
        for _ in range(40):
            with small.connection() as c:
                with guard:
                    if id(c) in busy:
                        clashes.append(id(c))
                    busy.add(id(c))
                c.execute("SELECT pg_sleep(0.001)")
                with guard:
                    busy.discard(id(c))

    with ThreadPoolExecutor(12) as ex:
        for f in [ex.submit(work, n) for n in range(12)]:
            f.result(timeout=120)
    assert clashes == []


def test_non_ledger_code_on_the_same_pool_is_served_while_the_ledger_hoards_everything(small: Ledger) -> None:
    assert len(set(_hoard(small, 4))) == 4
    assert len(small._checkout.idle) == 4  # the Ledger now holds every connection of the pool, idle

    t0 = time.monotonic()
    taken = [small.pool.getconn(timeout=8) for _ in range(4)]  # a quiet Ledger: only the sweeper can help
    assert time.monotonic() - t0 < 8
    assert len(small._checkout.idle) == 0
    for c in taken:
        small.pool.putconn(c)

    # and both at once: 8 Ledger threads and 4 plain pool users on 4 connections
    uid = uuid.uuid4()
    small.grant(uid, 5000, idempotency_key="seed")

    def ledger_work(n: int) -> None:
        for i in range(50):
            small.deduct(uid, 1, idempotency_key=f"m:{n}:{i}")

    def plain_work(n: int) -> None:
        for _ in range(30):
            with small.pool.connection(timeout=8) as c:
                c.execute("SELECT 1")

    with ThreadPoolExecutor(12) as ex:
        futures = [ex.submit(ledger_work, n) for n in range(8)] + [ex.submit(plain_work, n) for n in range(4)]
        for f in futures:
            f.result(timeout=120)
    assert small.balance(uid).balance == 5000 - 8 * 50


def test_ledgers_on_one_pool_share_one_checkout(small: Ledger, config: CreditsConfig) -> None:
    other = Ledger(small.pool, config, small.url)
    assert other._checkout is small._checkout
    _hoard(small, 4)
    assert other.balance(uuid.uuid4()).balance == 0  # served from the shared hoard, no pool wait


def test_a_terminated_session_is_not_reused(small: Ledger, pg_admin_url: str) -> None:
    uid = uuid.uuid4()
    small.grant(uid, 100, idempotency_key="seed")
    _hoard(small, 4)
    top = small._checkout.idle[-1][0].info.backend_pid  # the next call's connection (LIFO)
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (top,)).fetchone()[0]
        assert _wait_until(lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                                     (top,)).fetchone())
    small.retry_attempts = 1  # no retry: the call on the dead connection fails ...
    with pytest.raises((DatabaseUnavailable, psycopg.errors.AdminShutdown)):  # 57P01, or the socket's EOF
        small.balance(uid)
    assert top not in _idle_pids(small)  # ... and the dead connection went to the pool, which dropped it
    assert small.balance(uid).balance == 100  # so the next call, still without retries, works
    assert top not in _idle_pids(small)


def test_after_a_lost_connection_the_retry_drops_every_dead_idle_connection(small: Ledger, pg_admin_url: str) -> None:
    """A restarted server kills every session at once: one retry must be enough, not one per hoarded connection."""
    uid = uuid.uuid4()
    small.grant(uid, 100, idempotency_key="seed")
    pids = _hoard(small, 4)
    assert _idle_pids(small) == set(pids)
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
        assert _wait_until(lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)",
                                                     (pids,)).fetchone())
    small.retry_attempts = 2
    small.retry_backoff = (0.01,)
    assert small.deduct(uid, 1, idempotency_key="after-kill").new_balance == 99
    assert not _idle_pids(small) & set(pids)
    small.retry_attempts = 1
    for i in range(4):  # without retries: nothing dead is left anywhere, idle or in the pool
        with small.connection() as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        assert small.balance(uid).balance == 99


def test_hoarded_connections_go_back_to_the_pool_after_the_bound(small: Ledger,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = small._checkout
    _hoard(small, 4)
    assert len(checkout.idle) == 4
    monkeypatch.setattr(ConnectionCheckout, "max_hold", 0.3)  # for connections borrowed from now on
    checkout.drop_idle()
    _hoard(small, 4)  # borrowed again, now under the 0.3 s bound
    assert len(checkout.idle) == 4
    stats = small.pool.get_stats()
    assert stats["pool_available"] == 0
    # the Ledger stays quiet: the sweeper alone must hand them back (within max_hold + sweep_interval)
    assert _wait_until(lambda: not checkout.idle, timeout=5)
    assert small.pool.get_stats()["pool_available"] == small.pool.get_stats()["pool_size"]

    # on the call path: a connection past its bound is not kept after the call
    monkeypatch.setattr(ConnectionCheckout, "max_hold", 0.0)
    checkout.sweep_interval = 3600.0  # keep the sweeper out of this part (it picks this up after its next wake)
    time.sleep(ConnectionCheckout.sweep_interval * 1.2)
    for _ in range(5):
        small.balance(uuid.uuid4())
        assert not checkout.idle


def test_close_closes_the_hoarded_connections(db_url: str, config: CreditsConfig) -> None:
    led = Ledger.connect(db_url, config, migrate=False, max_size=3)
    _hoard(led, 3)
    held = [c for c, _ in led._checkout.idle]
    assert len(held) == 3
    led.retry_attempts = 1
    led.close()
    assert all(c.closed for c in held)
    assert not led._checkout.idle
    with pytest.raises(Exception, match="closed"):
        led.balance(uuid.uuid4())


def test_non_autocommit_pool_connection_commits_or_rolls_back(db_url: str, config: CreditsConfig,
                                                                conn: psycopg.Connection) -> None:
    """connection() on a caller's non-autocommit pool behaves as pool.connection(): commit on success,
    roll back on error, and an open transaction is never kept for the next call."""
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(db_url, min_size=1, max_size=2, open=True)
    led = Ledger(pool, config, db_url)
    try:
        conn.execute("CREATE TABLE public.checkout_probe (n int)")
        with led.connection() as c:
            c.execute("INSERT INTO public.checkout_probe VALUES (1)")
        with pytest.raises(RuntimeError):
            with led.connection() as c:
                c.execute("INSERT INTO public.checkout_probe VALUES (2)")
                raise RuntimeError("boom")
        assert conn.execute("SELECT array_agg(n) FROM public.checkout_probe").fetchone()[0] == [1]
        assert all(c.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE for c, _ in led._checkout.idle)
        uid = uuid.uuid4()
        assert led.grant(uid, 5, idempotency_key="k").new_balance == 5  # _fetchone commits too
        assert balance_row(conn, uid) == (5, 5, 0)
    finally:
        led.close()


@pytest.mark.parametrize("value,message", [
    ("ab\x00c", "must not contain NUL characters"),
    ("é\x00", "must not contain NUL characters"),
    ("a\ud800b", "is not valid Unicode text"),
])
def test_check_text_refusals_unchanged(value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_text(value, "thing")
    assert check_text("plain ascii", "thing") == "plain ascii"
    assert check_text("naïve", "thing") == "naïve"


def test_default_and_custom_transaction_types_still_checked(ledger: Ledger) -> None:
    uid = uuid.uuid4()
    ledger.grant(uid, 10, idempotency_key="g")

    class Odd(str):  # equal to the default, but not a plain str: must still go through the full check
        pass

    assert ledger.deduct(uid, 1, idempotency_key="d1", transaction_type=Odd("generation_deduction")).new_balance == 9
    with pytest.raises(InvalidArgument, match="transaction type must not contain NUL"):
        ledger.deduct(uid, 1, idempotency_key="d2", transaction_type="generation_deduction\x00")
    with pytest.raises(InvalidArgument, match="transaction type must be a string"):
        ledger.deduct(uid, 1, idempotency_key="d3", transaction_type=5)  # type: ignore[arg-type]
    assert ledger.balance(uid).balance == 9
