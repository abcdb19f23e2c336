"""Reservations (two-phase charges): SQL functions, refusals, expiry, races, and ``Ledger.hold()``."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from ledger import ExpiredRelease, InsufficientCredits, InvalidAmount, InvalidArgument, Ledger, ReservationError
from ledger.errors import IdempotencyConflict
from tests.factories import count_rows, ledger_sum
from tests.invariants import assert_consistent


def _fund(conn: psycopg.Connection, uid: uuid.UUID, amount: int) -> None:
    conn.execute("SELECT * FROM public.add_points(%s, %s, 'subscription_grant', 'p', %s)", (uid, amount, f"fund:{uid}"))


def _state(conn: psycopg.Connection, uid: uuid.UUID) -> tuple[int, int]:
    row = conn.execute("SELECT balance, reserved FROM public.points_balances WHERE user_id = %s", (uid,)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _sqlstate(conn: psycopg.Connection, query: str, params: tuple) -> str | None:
    try:
        conn.execute(query, params)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def _expire(conn: psycopg.Connection, job_id: str) -> None:
    """Move a hold's expiry into the past (as time passing would; the guard trigger allows only this)."""
    conn.execute("UPDATE public.points_reservations SET expires_at = now() - interval '1 second' WHERE job_id = %s",
                 (job_id,))


def test_reserve_capture_release_lifecycle(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    _fund(conn, uid, 100)
    rid, spendable, dup = conn.execute("SELECT * FROM public.reserve_points(%s, 60, 'job-1')", (uid,)).fetchone()
    assert (spendable, dup) == (40, False)
    assert _state(conn, uid) == (100, 60)
    # a retry of the same hold answers with the first one
    assert conn.execute("SELECT * FROM public.reserve_points(%s, 60, 'job-1')", (uid,)).fetchone() == (rid, 40, True)
    # held credits are not spendable by a deduction (CR001, balance untouched)
    assert _sqlstate(conn, "SELECT * FROM public.deduct_points(%s, 41, 'generation_deduction', 'x', 'd1')",
                     (uid,)) == "CR001"
    assert _state(conn, uid) == (100, 60)

    # capture part of the hold: one generation_deduction row, the rest freed
    new_balance, tx, dup = conn.execute("SELECT * FROM public.capture_reservation('job-1', 45)").fetchone()
    assert (new_balance, dup) == (55, False)
    assert _state(conn, uid) == (55, 0)
    row = conn.execute("SELECT amount, transaction_type, idempotency_key, metadata ->> 'job_id' "
                       "FROM public.points_transactions WHERE id = %s", (tx,)).fetchone()
    assert row == (-45, "generation_deduction", "capture:job-1", "job-1")
    # the same capture again: the first answer; another amount: refused
    assert conn.execute("SELECT * FROM public.capture_reservation('job-1', 45)").fetchone() == (55, tx, True)
    assert _sqlstate(conn, "SELECT * FROM public.capture_reservation('job-1', 50)", ()) == "CR005"
    assert _sqlstate(conn, "SELECT * FROM public.capture_reservation('job-1')", ()) == "CR005"  # default = all 60
    assert conn.execute("SELECT released FROM public.release_reservation('job-1')").fetchone() == (False,)

    # release: frees the hold, charges nothing; a second release says false; capture after it is refused
    conn.execute("SELECT * FROM public.reserve_points(%s, 30, 'job-2')", (uid,))
    assert conn.execute("SELECT released FROM public.release_reservation('job-2')").fetchone() == (True,)
    assert conn.execute("SELECT released FROM public.release_reservation('job-2')").fetchone() == (False,)
    assert _sqlstate(conn, "SELECT * FROM public.capture_reservation('job-2')", ()) == "CR005"
    assert _state(conn, uid) == (55, 0)
    assert count_rows(conn, "points_transactions") == 2
    statuses = dict(conn.execute("SELECT job_id, status FROM public.points_reservations").fetchall())
    assert statuses == {"job-1": "captured", "job-2": "released"}
    assert_consistent(conn)


def test_refusals_have_their_own_sqlstates_and_write_nothing(conn: psycopg.Connection) -> None:
    uid, other = uuid.uuid4(), uuid.uuid4()
    _fund(conn, uid, 50)
    _fund(conn, other, 50)
    conn.execute("SELECT * FROM public.reserve_points(%s, 20, 'job')", (uid,))
    cases = [
        ("SELECT * FROM public.reserve_points(%s, 21, 'job')", (uid,), "CR002"),     # same job, other amount
        ("SELECT * FROM public.reserve_points(%s, 20, 'job')", (other,), "CR002"),   # same job, other user
        ("SELECT * FROM public.reserve_points(%s, 31, 'job-b')", (uid,), "CR001"),   # 30 spendable
        ("SELECT * FROM public.reserve_points(%s, 5, 'job-c')", (uuid.uuid4(),), "CR001"),  # no balance row
        ("SELECT * FROM public.reserve_points(%s, 0, 'job-d')", (uid,), "CR003"),
        ("SELECT * FROM public.reserve_points(%s, 10000000, 'job-d')", (uid,), "CR003"),  # over the maximum
        ("SELECT * FROM public.reserve_points(NULL, 5, 'job-d')", (), "CR004"),
        ("SELECT * FROM public.reserve_points(%s, 5, '')", (uid,), "CR004"),
        ("SELECT * FROM public.reserve_points(%s, 5, %s)", (uid, "j" * 481), "CR004"),
        ("SELECT * FROM public.reserve_points(%s, 5, 'job-d', 0)", (uid,), "CR004"),
        ("SELECT * FROM public.reserve_points(%s, 5, 'job-d', 604801)", (uid,), "CR004"),
        ("SELECT * FROM public.capture_reservation('job', 21)", (), "CR003"),         # more than held
        ("SELECT * FROM public.capture_reservation('job', 0)", (), "CR003"),
        ("SELECT * FROM public.capture_reservation('no-such-job')", (), "CR005"),
        ("SELECT * FROM public.release_reservation('no-such-job')", (), "CR005"),
        ("SELECT * FROM public.capture_reservation(NULL)", (), "CR004"),
    ]
    for query, params, expected in cases:
        assert _sqlstate(conn, query, params) == expected, query
    assert _state(conn, uid) == (50, 20)
    assert count_rows(conn, "points_reservations") == 1
    assert count_rows(conn, "points_transactions") == 2


def test_expired_hold_cannot_be_captured_and_is_freed_by_the_sweep(conn: psycopg.Connection) -> None:
    users = [uuid.uuid4() for _ in range(3)]
    for i, u in enumerate(users):
        _fund(conn, u, 100)
        conn.execute("SELECT * FROM public.reserve_points(%s, 40, %s)", (u, f"old-{i}"))
        conn.execute("SELECT * FROM public.reserve_points(%s, 10, %s)", (u, f"fresh-{i}"))
        _expire(conn, f"old-{i}")
    stale = conn.execute("SELECT job_id, amount FROM public.stale_reservations ORDER BY job_id").fetchall()
    assert stale == [("old-0", 40), ("old-1", 40), ("old-2", 40)]

    assert _sqlstate(conn, "SELECT * FROM public.capture_reservation('old-0')", ()) == "CR005"
    assert _state(conn, users[0]) == (100, 50)  # the refusal changed nothing

    # the daily sweep: every user's expired holds, nothing else
    assert conn.execute("SELECT released, credits FROM public.release_expired_reservations()").fetchone() == (3, 120)
    assert conn.execute("SELECT count(*) FROM public.stale_reservations").fetchone()[0] == 0
    for u in users:
        assert _state(conn, u) == (100, 10)
    assert conn.execute("SELECT released FROM public.release_reservation('old-1')").fetchone() == (False,)
    assert _sqlstate(conn, "SELECT * FROM public.capture_reservation('old-1')", ()) == "CR005"
    assert conn.execute("SELECT released, credits FROM public.release_expired_reservations()").fetchone() == (0, 0)
    assert_consistent(conn)


def test_expired_holds_are_freed_lazily_when_spendable_runs_short(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    _fund(conn, uid, 100)
    conn.execute("SELECT * FROM public.reserve_points(%s, 70, 'stale-1')", (uid,))
    conn.execute("SELECT * FROM public.reserve_points(%s, 20, 'stale-2')", (uid,))
    _expire(conn, "stale-1")
    _expire(conn, "stale-2")
    # a deduction that fits beside the holds leaves them to the sweep (nothing extra on the hot path)
    conn.execute("SELECT * FROM public.deduct_points(%s, 5, 'generation_deduction', 'x', 'small')", (uid,))
    assert _state(conn, uid) == (95, 90)
    # one that does not fit frees the user's expired holds first, then succeeds
    conn.execute("SELECT * FROM public.deduct_points(%s, 50, 'generation_deduction', 'x', 'big')", (uid,))
    assert _state(conn, uid) == (45, 0)
    statuses = dict(conn.execute("SELECT job_id, status FROM public.points_reservations").fetchall())
    assert statuses == {"stale-1": "expired", "stale-2": "expired"}

    # the same for a new hold
    conn.execute("SELECT * FROM public.reserve_points(%s, 40, 'stale-3')", (uid,))
    _expire(conn, "stale-3")
    assert conn.execute("SELECT spendable_after FROM public.reserve_points(%s, 30, 'new')", (uid,)).fetchone() == (15,)
    # and a refusal still refuses when even the freed credits do not cover it (nothing changes)
    conn.execute("SELECT * FROM public.reserve_points(%s, 10, 'stale-4')", (uid,))
    _expire(conn, "stale-4")
    assert _sqlstate(conn, "SELECT * FROM public.deduct_points(%s, 16, 'generation_deduction', 'x', 'too-big')",
                     (uid,)) == "CR001"
    assert _state(conn, uid) == (45, 40)
    assert_consistent(conn)


def test_settled_holds_are_evidence(conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    _fund(conn, uid, 10)
    conn.execute("SELECT * FROM public.reserve_points(%s, 5, 'j')", (uid,))
    for stmt in ("UPDATE public.points_reservations SET amount = 1",
                 "DELETE FROM public.points_reservations",
                 "TRUNCATE public.points_reservations"):
        assert _sqlstate(conn, stmt, ()) == "CR010", stmt
    conn.execute("SELECT * FROM public.capture_reservation('j')")
    assert _sqlstate(conn, "UPDATE public.points_reservations SET status = 'released'", ()) == "CR010"
    assert conn.execute("SELECT status FROM public.points_reservations").fetchone() == ("captured",)


def _race(url: str, clients: int, work) -> list:  # type: ignore[no-untyped-def]
    barrier = threading.Barrier(clients)

    def run(n: int):  # type: ignore[no-untyped-def]
        with psycopg.connect(url, autocommit=True) as c:
            barrier.wait()
            return work(c, n)

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(run, range(clients)))


def test_concurrent_jobs_reserve_exactly_what_the_balance_covers(db_url: str, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    _fund(conn, uid, 75)  # covers 7 holds of 10

    def work(c: psycopg.Connection, n: int) -> str:
        try:
            c.execute("SELECT * FROM public.reserve_points(%s, 10, %s)", (uid, f"job-{n}"))
            return "held"
        except psycopg.Error as exc:
            return exc.sqlstate or "?"

    outcomes = _race(db_url, 16, work)
    assert Counter(outcomes) == Counter({"held": 7, "CR001": 9})
    assert _state(conn, uid) == (75, 70)
    held = [n for n, o in enumerate(outcomes) if o == "held"]
    # settle them from as many clients at once: captures (some partial) and releases
    def settle(c: psycopg.Connection, i: int) -> int:
        job = f"job-{held[i]}"
        if i % 3 == 0:
            c.execute("SELECT released FROM public.release_reservation(%s)", (job,))
            return 0
        amount = 10 if i % 3 == 1 else 4
        c.execute("SELECT * FROM public.capture_reservation(%s, %s)", (job, amount))
        return amount

    charged = sum(_race(db_url, len(held), settle))
    assert _state(conn, uid) == (75 - charged, 0)
    assert ledger_sum(conn, uid) == 75 - charged
    assert_consistent(conn)


def test_one_job_from_many_clients_holds_once(db_url: str, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    _fund(conn, uid, 100)
    answers = _race(db_url, 12, lambda c, n: c.execute(
        "SELECT * FROM public.reserve_points(%s, 30, 'same-job')", (uid,)).fetchone())
    assert len({a[0] for a in answers}) == 1
    assert sum(1 for a in answers if not a[2]) == 1
    assert _state(conn, uid) == (100, 30)

    # capture and release of that job raced from 12 clients: one settles it, the others see it settled
    def settle(c: psycopg.Connection, n: int) -> str:
        try:
            if n % 2:
                return "released" if c.execute("SELECT released FROM public.release_reservation('same-job')"
                                                ).fetchone()[0] else "not-released"
            return "dup" if c.execute("SELECT duplicate FROM public.capture_reservation('same-job')").fetchone()[0] \
                else "captured"
        except psycopg.Error as exc:
            return exc.sqlstate or "?"

    outcomes = Counter(_race(db_url, 12, settle))
    assert outcomes["captured"] + outcomes["released"] == 1, outcomes
    bal, reserved = _state(conn, uid)
    assert reserved == 0 and bal == (70 if outcomes["captured"] else 100)
    assert_consistent(conn)


# ------------------------------------------------------------------------------------------ the module

def test_module_reserve_capture_release_and_typed_errors(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    ledger.grant(uid, 100, idempotency_key="g")
    r = ledger.reserve(uid, 30, job_id="video-1", metadata={"kind": "video"})
    assert (r.spendable_after, r.duplicate) == (70, False)
    assert ledger.spendable(uid) == 70
    assert ledger.reserve(uid, 30, job_id="video-1").duplicate
    with pytest.raises(IdempotencyConflict):
        ledger.reserve(uid, 31, job_id="video-1")
    with pytest.raises(InsufficientCredits) as exc:
        ledger.reserve(uid, 71, job_id="video-2")
    assert (exc.value.balance, exc.value.requested) == (70, 71)
    # recorded for the failed_deductions rule, like a refused deduction
    assert conn.execute("SELECT idempotency_key FROM public.points_deduction_failures").fetchall() == [("reserve:video-2",)]
    write = ledger.capture("video-1", 25)
    assert (write.new_balance, write.duplicate) == (75, False)
    assert ledger.capture("video-1", 25).duplicate
    with pytest.raises(ReservationError, match="already captured"):
        ledger.capture("video-1", 30)
    assert ledger.release("video-1") is False
    state = ledger.reservation("video-1")
    assert state is not None and (state.status, state.captured_amount, state.transaction_id) == (
        "captured", 25, write.transaction_id)
    with pytest.raises(ReservationError, match="no reservation"):
        ledger.release("never-reserved")
    with pytest.raises(InvalidAmount):
        ledger.capture("video-1", 0)
    for bad in ("", "x" * 481, "a\x00b", None, 42):
        with pytest.raises(InvalidArgument):
            ledger.reserve(uid, 1, job_id=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        ledger.reserve(uid, 1, job_id="ttl", ttl_seconds=0)
    ledger.reserve(uid, 10, job_id="short", ttl_seconds=60)
    _expire(conn, "short")
    assert ledger.spendable(uid) == 65
    assert ledger.release_expired(uid) == ExpiredRelease(1, 10)
    assert ledger.release_expired(uid) == ExpiredRelease(0, 0)
    assert ledger.spendable(uid) == 75
    assert_consistent(conn)


def test_release_expired_from_the_module_frees_everyone(ledger: Ledger, conn: psycopg.Connection) -> None:
    users = [uuid.uuid4() for _ in range(4)]
    for i, u in enumerate(users):
        ledger.grant(u, 50, idempotency_key=f"g{i}")
        ledger.reserve(u, 20, job_id=f"j{i}")
        if i % 2 == 0:
            _expire(conn, f"j{i}")
    result = ledger.release_expired()
    assert (result.released, result.credits) == (2, 40)
    assert [ledger.spendable(u) for u in users] == [50, 30, 50, 30]
    assert_consistent(conn)


def test_hold_charges_on_capture_and_frees_on_failure(ledger: Ledger, conn: psycopg.Connection) -> None:
    uid = uuid.uuid4()
    ledger.grant(uid, 50, idempotency_key="g")

    with ledger.hold(uid, 20, "img-1") as h:
        assert ledger.spendable(uid) == 30  # held while the image is generated
        h.capture(15)                       # the real cost, at most the hold
    assert ledger.balance(uid).balance == 35 and ledger.spendable(uid) == 35

    class GenerationFailed(Exception):
        pass

    with pytest.raises(GenerationFailed):
        with ledger.hold(uid, 20, "img-2"):
            raise GenerationFailed("the model timed out")
    assert ledger.reservation("img-2").status == "released"
    assert ledger.balance(uid).balance == 35 and ledger.spendable(uid) == 35

    with ledger.hold(uid, 20, "img-3"):
        pass  # no capture: nothing charged
    assert ledger.reservation("img-3").status == "released" and ledger.balance(uid).balance == 35

    with pytest.raises(InsufficientCredits):
        with ledger.hold(uid, 36, "img-4"):
            pytest.fail("the block must not run without the credits held")
    assert ledger.reservation("img-4") is None

    # two images started at once on credits for one: the second hold is refused before it generates
    with ledger.hold(uid, 30, "img-5") as first:
        with pytest.raises(InsufficientCredits):
            with ledger.hold(uid, 30, "img-6"):
                pass
        first.capture()
    assert ledger.balance(uid).balance == 5
    assert [t.amount for t in ledger.history(uid)] == [-30, -15, 50]
    assert_consistent(conn)


def test_may_generate_counts_only_spendable_credits(ledger: Ledger, conn: psycopg.Connection) -> None:
    from tests.factories import make_subscription, make_user

    bid, sid = make_user(conn)
    make_subscription(conn, bid, tier="pro")
    ledger.grant(sid, 15, idempotency_key="g")
    assert ledger.may_generate(bid, "image").allowed  # 15 >= 10
    ledger.reserve(sid, 10, job_id="running-video")
    check = ledger.may_generate(bid, "image")
    assert not check.allowed and check.balance == 5


def test_cli_lists_holds_and_frees_expired_ones(db_url: str, conn: psycopg.Connection) -> None:
    from tests.cli_helpers import run_cli
    from tests.factories import make_user

    _, sid = make_user(conn, "vid@example.com")
    _fund(conn, sid, 100)
    conn.execute("SELECT * FROM public.reserve_points(%s, 30, 'render-1')", (sid,))
    conn.execute("SELECT * FROM public.reserve_points(%s, 20, 'render-2')", (sid,))
    _expire(conn, "render-1")
    listed = run_cli(db_url, "holds", "list", "vid@example.com", "--json")
    assert listed.code == 0, listed.stderr
    doc = listed.json()
    assert doc["spendable"] == 50
    assert {(h["job_id"], h["status"], h["stale"]) for h in doc["holds"]} == {
        ("render-1", "active", True), ("render-2", "active", False)}
    freed = run_cli(db_url, "holds", "release-expired", "--json")
    assert freed.code == 0 and freed.json() == {"released": 1, "credits": 30}
    assert _state(conn, sid) == (100, 20)
