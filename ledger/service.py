"""The app's live operations on the ledger: resolve, grant, deduct, balance, history, generate.

Every write goes through the SQL ledger functions, so the Python module and an app in any other
language share one implementation of the money rules. This module only validates early, maps
SQLSTATEs to typed errors, and records what the database cannot (a refused deduction).
"""

from __future__ import annotations

import logging
import random
import select
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import psycopg
import psycopg.errors
from psycopg import pq
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from ledger import db
from ledger.checkout import checkout_for
from ledger.lots import LotsMixin
from ledger.config import PAID_STATUSES, CreditsConfig, load_config
from ledger.errors import (
    DatabaseUnavailable,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    UnknownUser,
    translate,
)
from ledger.ids import check_text, is_uuid, normalize_email, parse_uuid
from ledger.reservations import ReservationsMixin

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 512

# Fixed texts per writer, which psycopg prepares server-side after a few uses on each connection.
# Without metadata the call leaves p_metadata to its declared DEFAULT '{}': dumping a Jsonb per call
# cost ~10 us of CPU (and 6% throughput) with 8 threads.
_WRITE_SQL = {fn: f"SELECT new_balance, transaction_id, duplicate FROM public.{fn}(%s, %s, %s, %s, %s, %s)"
              for fn in ("add_points", "deduct_points")}
_WRITE_SQL_NO_METADATA = {
    fn: f"SELECT new_balance, transaction_id, duplicate FROM public.{fn}(%s, %s, %s, %s, %s)"
    for fn in ("add_points", "deduct_points")}
_CURSOR_ATTR = "_credit_recon_cursor"

# The same writes without psycopg's query machinery. On a UTF8 autocommit connection a write without
# metadata runs as a statement prepared once per connection under a fixed name, sent with libpq's
# PQsendQueryPrepared (``pgconn.send_query_prepared``) and read back as psycopg's own generators read
# it. cursor.execute spends ~30 us of Python per call on what this skips -- query conversion, dumping
# each parameter, the prepare cache, the generator-driven wait, loading the row -- and the uuid goes as
# its 16 bytes instead of its text. A refused call raises what psycopg raises
# (psycopg.errors.error_from_result), so translation, retries and the failure record are those of the
# cursor route, which every other call still takes.
_FAST_WRITE = {fn: (f"credit_recon_{fn}".encode(),
                    f"SELECT new_balance, transaction_id, duplicate FROM public.{fn}($1, $2, $3, $4, $5)".encode())
               for fn in ("add_points", "deduct_points")}
_FAST_TYPES = (2950, 20, 25, 25, 25)  # uuid, bigint, then text for type, description and key
_FAST_FORMATS = (1, 0, 0, 0, 0)  # binary uuid, the rest as text
_PREPARED_ATTR = "_credit_recon_prepared"  # on the connection: the names prepared in its session
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR
_SQLSTATE = pq.DiagnosticField.SQLSTATE
_error_from_result = getattr(psycopg.errors, "error_from_result", None)  # absent: the cursor route only
# transaction types the write path need not check again (the defaults of grant/deduct): exact str
# instances only, so a str subclass with its own __eq__/__hash__ still gets the full check
_PLAIN_TYPES = frozenset({"adjustment", "generation_deduction"})

# Errors after which the same call may simply be sent again: the connection was lost (no SQLSTATE),
# the server shut the session down (57P01-57P03), or PostgreSQL rolled the transaction back to resolve
# a conflict (40001 serialization, 40P01 deadlock). Safe because every write carries an idempotency key
# (or a job id): a write that did commit before the connection died is answered as a duplicate.
RETRYABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "40001", "40P01"})


def is_retryable(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it was raised from) is a transient fault worth one more attempt."""
    from psycopg_pool import PoolTimeout

    for _ in range(4):  # typed errors wrap the driver's error in __cause__
        if exc is None:
            return False
        if isinstance(exc, PoolTimeout):
            return False  # the pool already waited its full timeout
        if isinstance(exc, psycopg.Error):
            sqlstate = getattr(exc, "sqlstate", None)
            if sqlstate in RETRYABLE_SQLSTATES:
                return True
            return isinstance(exc, psycopg.OperationalError) and not sqlstate
        exc = exc.__cause__
    return False


def _cursor(conn: psycopg.Connection) -> psycopg.Cursor:
    """The connection's own reused cursor (see ``Ledger._fetchone``)."""
    cur = getattr(conn, _CURSOR_ATTR, None)
    if cur is None:
        cur = conn.cursor()
        setattr(conn, _CURSOR_ATTR, cur)
    return cur


class _FastState:
    """What a connection keeps for ``_exec_fast``: the statements prepared in its session and a poll
    object on its socket (created once: the socket of a psycopg connection never changes)."""

    __slots__ = ("prepared", "poll")

    def __init__(self, pgconn: Any) -> None:
        self.prepared: set[bytes] = set()
        self.poll = select.poll()
        self.poll.register(pgconn.socket, select.POLLIN)


def _exec_fast(conn: psycopg.Connection, fn: str, values: tuple[bytes | None, ...]) -> tuple[int, int, bool] | None:
    """``fn``'s row through its named prepared statement (see ``_FAST_WRITE``), preparing it first
    on a connection that has not; raises what psycopg's cursor would for the same failure."""
    pgconn = conn.pgconn
    name, query = _FAST_WRITE[fn]
    state: _FastState | None = getattr(conn, _PREPARED_ATTR, None)
    if state is None:
        state = _FastState(pgconn)
        setattr(conn, _PREPARED_ATTR, state)
    prepared = state.prepared
    if name not in prepared:
        pgconn.send_prepare(name, query, _FAST_TYPES)
        _expect(_results(pgconn, state.poll), _COMMAND_OK)
        prepared.add(name)
    pgconn.send_query_prepared(name, values, _FAST_FORMATS)
    res = _results(pgconn, state.poll)
    if res.status != _TUPLES_OK:
        if res.error_field(_SQLSTATE) != b"26000":
            raise _fast_error(res)
        # invalid_sql_statement_name: a DEALLOCATE ALL or DISCARD ALL on this connection dropped it
        prepared.discard(name)
        pgconn.send_prepare(name, query, _FAST_TYPES)
        _expect(_results(pgconn, state.poll), _COMMAND_OK)
        prepared.add(name)
        pgconn.send_query_prepared(name, values, _FAST_FORMATS)
        res = _expect(_results(pgconn, state.poll), _TUPLES_OK)
    if not res.ntuples:
        return None
    value = res.get_value
    return int(value(0, 0)), int(value(0, 1)), value(0, 2) == b"t"  # type: ignore[arg-type]


def _results(pgconn: Any, poll: Any) -> Any:
    """The first result of the query just sent, read to the end as psycopg's generators do
    (``psycopg.generators.send`` and ``fetch_many``: flush, wait, consume, keep the first error when
    the server closes the connection after it), waiting in ``poll.poll()``, which releases the GIL."""
    while pgconn.flush():  # the socket buffer is full (a non-blocking connection): rare
        ready = select.select([pgconn.socket], [pgconn.socket], [])[0]
        if ready:
            pgconn.consume_input()
    first = None
    while True:
        try:
            while pgconn.is_busy():
                try:
                    poll.poll()
                except KeyboardInterrupt:
                    _cancel_and_drain(pgconn, poll)
                    raise
                pgconn.consume_input()
            res = pgconn.get_result()
        except psycopg.DatabaseError:
            if first is not None and first.status == _FATAL_ERROR:
                break  # e.g. 57P01: the server said why before it closed the connection
            raise
        if res is None:
            break
        if first is None:
            first = res
    while n := pgconn.notifies():  # as psycopg's fetch does; no Ledger connection listens
        if pgconn.notify_handler:
            pgconn.notify_handler(n)
    if first is None:
        raise psycopg.InternalError("got no result from the query")
    return first


def _cancel_and_drain(pgconn: Any, poll: Any) -> None:
    """Ctrl-C while the server runs the call: ask the server to cancel it and read what it answers, as
    psycopg does for its own queries (``Connection.wait``), so the statement stops rather than running
    on unseen and the connection is idle again. A second interrupt, or a failure here, leaves the
    connection busy, and the pool closes a busy connection it gets back instead of reusing it."""
    deadline = time.monotonic() + 5.0  # psycopg's own wait for a cancelled query
    try:
        pgconn.get_cancel().cancel()
        while True:
            while pgconn.is_busy():
                if time.monotonic() > deadline:
                    return
                poll.poll(500)
                pgconn.consume_input()
            if pgconn.get_result() is None:
                return
    except psycopg.Error:
        return  # the connection is gone or broken: the pool drops it


def _expect(res: Any, status: Any) -> Any:
    if res.status != status:
        raise _fast_error(res)
    return res


def _fast_error(res: Any) -> psycopg.Error:
    """The exception psycopg raises for this result: its SQLSTATE's class (``error_from_result``);
    without a SQLSTATE (libpq's own failure), an OperationalError as the cursor raises."""
    if not res.error_field(_SQLSTATE):
        message = (res.get_error_message("utf-8") or "").strip() or f"unexpected result status {res.status}"
        return psycopg.OperationalError(message)
    assert _error_from_result is not None
    return _error_from_result(res, encoding="utf-8")


@dataclass(frozen=True)
class LedgerWrite:
    """What a ledger function answered: the balance after the write and its ledger row."""

    new_balance: int
    transaction_id: int
    duplicate: bool


@dataclass(frozen=True)
class Balance:
    user_id: uuid.UUID
    balance: int
    lifetime_earned: int
    lifetime_spent: int
    updated_at: datetime | None


@dataclass(frozen=True)
class Transaction:
    id: int
    user_id: uuid.UUID
    amount: int
    balance_after: int
    transaction_type: str
    description: str | None
    idempotency_key: str
    metadata: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class Resolution:
    bestauth_user_id: uuid.UUID
    user_id: uuid.UUID
    source: str  # mapping | metadata | bestauth_id


@dataclass(frozen=True)
class GenerationCheck:
    allowed: bool
    tier: str
    cost: int
    balance: int | None  # paid tiers
    remaining_today: int | None  # free tier
    reason: str


@dataclass(frozen=True)
class GenerationCharge:
    tier: str
    cost: int
    duplicate: bool
    new_balance: int | None
    transaction_id: int | None
    used_today: int | None


def check_amount(amount: object, config: CreditsConfig) -> int:
    """Refuse before the database does, with the same rules (the SQL functions check again)."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(f"amount must be a whole number of credits, got {amount!r}")
    if amount <= 0:
        raise InvalidAmount(f"amount must be positive, got {amount}")
    if amount > config.limits.max_operation_amount:
        raise InvalidAmount(
            f"amount {amount} exceeds the per-operation maximum of {config.limits.max_operation_amount}"
        )
    return amount


def check_key(key: object) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise InvalidArgument(f"idempotency key must be a string of 1 to {MAX_KEY_LENGTH} characters")
    return check_text(key, "idempotency key")


MAX_DESCRIPTION_LENGTH = 1000  # sql/015 enforces the same in the table


class Ledger(ReservationsMixin, LotsMixin):
    """A pooled handle on the ledger. Thread-safe; share one per process."""

    # writes are retried this many times in all on a transient fault (see is_retryable), sleeping
    # RETRY_BACKOFF[i] seconds (plus up to 50% jitter) before retry i+1
    retry_attempts: int = 4
    retry_backoff: tuple[float, ...] = (0.05, 0.2, 0.8)

    def __init__(self, pool: ConnectionPool, config: CreditsConfig, url: str) -> None:
        self.pool = pool
        self.config = config
        self.url = url
        # every connection the Ledger uses goes through this lock-free checkout (ledger.checkout), shared
        # by all Ledgers on the same pool, so none of them ever waits on connections another one hoards
        self._checkout = checkout_for(pool)

    @classmethod
    def connect(cls, url: str | None = None, config: CreditsConfig | None = None, *,
                migrate: bool = True, max_size: int | None = None) -> "Ledger":
        """Open a pool on ``url`` ($DATABASE_URL, else the embedded server), migrating first by default."""
        config = config or load_config()
        url = db.resolve_url(config, url)
        if migrate:
            from ledger.migrate import migrate as run_migrations

            with db.connect(url, autocommit=True) as conn:
                run_migrations(conn, config)
        pool = db.open_pool(url, max_size=max_size or config.database.pool_max_size)
        return cls(pool, config, url)

    def close(self) -> None:
        self._checkout.close()  # idle connections back to the pool first, which then closes them all
        self.pool.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection with driver errors translated to typed ones.

        Taken from the Ledger's checkout (as ``_fetchone``'s are) and used as ``pool.connection()``
        would: committed on success, rolled back on error (both no-ops on db.open_pool's autocommit
        connections), then kept for the next call if idle and healthy, else given to the pool.
        """
        checkout = self._checkout
        try:
            conn, deadline = checkout.get()
            try:
                with conn:  # belongs to the pool (conn._pool), so __exit__ commits/rolls back, never closes
                    yield conn
            finally:
                checkout.put(conn, deadline)
        except psycopg.Error as exc:
            self._raise_translated(exc)

    def _raise_translated(self, exc: psycopg.Error) -> NoReturn:
        if isinstance(exc, psycopg.OperationalError) and not getattr(exc, "sqlstate", None):
            raise DatabaseUnavailable(f"lost the database at {db.describe_url(self.url)}: {exc}") from exc
        translated = translate(exc)
        if translated is exc:
            raise exc
        raise translated from exc

    def _fetchone(self, query: str, params: tuple[Any, ...],
                  fast: tuple[str, tuple[bytes | None, ...]] | None = None) -> Any:
        """One autocommit statement on a pooled connection: the writes' hot path.

        Same checkout, same error translation as ``connection()``, without its two generator-based
        context managers and with the connection's cursor reused: together about a third of the
        module's CPU per deduction with 8 threads (benchmarks/ledger_throughput.py). The cursor lives
        on its connection (a checked-out connection, and so its cursor, serves one thread at a time)
        and goes with it when the pool drops the connection. The deque pop below is the checkout's
        fast path inlined (``ConnectionCheckout.get``).

        ``fast``: the writer (``_FAST_WRITE``) and the same parameters as bytes, for ``_exec_fast``
        when the connection allows it (autocommit, UTF8, server-side prepares not switched off with
        ``prepare_threshold = None``, e.g. behind a transaction-pooling PgBouncer); else ``query``.
        """
        checkout = self._checkout
        idle = checkout.idle
        attempt = 1
        while True:
            try:
                try:
                    conn, deadline = idle.pop()
                except IndexError:
                    conn, deadline = checkout._borrow()
                try:
                    if conn.autocommit:  # db.open_pool's connections: the call is its own transaction
                        if (fast is not None and conn.pgconn.parameter_status(b"client_encoding") == b"UTF8"
                                and conn.prepare_threshold is not None):
                            return _exec_fast(conn, fast[0], fast[1])
                        return _cursor(conn).execute(query, params).fetchone()
                    with conn.transaction():  # a caller's non-autocommit pool: commit, as connection() would
                        return _cursor(conn).execute(query, params).fetchone()
                finally:
                    checkout.put(conn, deadline)  # a broken or busy connection goes to the pool, which discards it
            except psycopg.Error as exc:
                if attempt < self.retry_attempts and is_retryable(exc):
                    self._before_retry(exc, attempt, query)
                    attempt += 1
                    continue
                self._raise_translated(exc)

    def _before_retry(self, exc: BaseException, attempt: int, what: str) -> None:
        """Back off, and after a lost connection drop the pool's other dead connections."""
        cause = exc
        while not isinstance(cause, psycopg.Error) and cause.__cause__ is not None:
            cause = cause.__cause__
        sqlstate = getattr(cause, "sqlstate", None)
        delay = self.retry_backoff[min(attempt - 1, len(self.retry_backoff) - 1)] * (1 + random.random() / 2)
        log.warning("transient database fault (%s) at %s on %s; retry %d of %d in %.2fs",
                    sqlstate or "connection lost", db.describe_url(self.url), what.split("(", 1)[0][:80],
                    attempt, self.retry_attempts - 1, delay)
        time.sleep(delay)
        if sqlstate is None or sqlstate.startswith("57P"):
            # the checkout's idle connections first: they died too, and pool.check() tests them there
            self._checkout.drop_idle()
            try:
                self.pool.check()  # a restarted server killed every pooled connection, not just this one
            except Exception:  # the server may still be down; the next attempt will tell
                log.debug("pool check failed", exc_info=True)

    # ---------------------------------------------------------------- id resolution

    def resolve_user_ids(self, bestauth_ids: Iterable[uuid.UUID | str]) -> dict[uuid.UUID, Resolution]:
        """The contract's three layers for many users in one query; unknown ids are absent from the result."""
        ids = [parse_uuid(i, "BestAuth user id") for i in bestauth_ids]
        if not ids:
            return {}
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT bestauth_user_id, user_id, source FROM public.resolve_user_ids(%s::uuid[])", (ids,)
            ).fetchall()
        return {r[0]: Resolution(r[0], r[1], r[2]) for r in rows}

    def resolve_user_id(self, bestauth_id: uuid.UUID | str) -> Resolution:
        bid = parse_uuid(bestauth_id, "BestAuth user id")
        found = self.resolve_user_ids([bid]).get(bid)
        if found is None:
            raise UnknownUser(f"no BestAuth user with id {bid}")
        return found

    def find_user(self, ref: str) -> Resolution:
        """A user by email, BestAuth id or points (Supabase) id; UnknownUser when none matches."""
        if not isinstance(ref, str) or not ref.strip():
            raise InvalidArgument("a user email or id is required")
        if "@" in ref:
            email = normalize_email(ref)
            with self.connection() as conn:
                row = conn.execute("SELECT id FROM public.bestauth_users WHERE email = %s", (email,)).fetchone()
            if row is None:
                raise UnknownUser(f"no user with email {email}")
            return self.resolve_user_id(row[0])
        if not is_uuid(ref):
            raise InvalidArgument(f"not an email or a UUID: {ref[:80]!r}")
        uid = parse_uuid(ref)
        with self.connection() as conn:
            row = conn.execute(
                """SELECT r.bestauth_user_id, r.user_id, r.source FROM public.user_id_resolution r
                    WHERE r.bestauth_user_id = %(id)s
                   UNION ALL
                   SELECT r.bestauth_user_id, r.user_id, r.source FROM public.user_id_resolution r
                    WHERE r.user_id = %(id)s
                   LIMIT 1""",
                {"id": uid},
            ).fetchone()
            if row is None:
                has_ledger = conn.execute(
                    """SELECT 1 FROM public.points_balances WHERE user_id = %(id)s
                       UNION ALL SELECT 1 FROM public.points_transactions WHERE user_id = %(id)s LIMIT 1""",
                    {"id": uid},
                ).fetchone()
                if has_ledger:
                    return Resolution(uid, uid, "points_only")
                raise UnknownUser(f"no user with id {uid} (neither a BestAuth id nor a points user id)")
        return Resolution(row[0], row[1], row[2])

    def ensure_mapping(self, bestauth_id: uuid.UUID | str, supabase_id: uuid.UUID | str | None = None) -> uuid.UUID:
        """Make sure the user has a mapping row; returns the mapped points id.

        Without ``supabase_id`` the contract's resolution picks it. A conflicting existing mapping
        is never overwritten.
        """
        from ledger.subscriptions import ensure_mapping_in

        bid = parse_uuid(bestauth_id, "BestAuth user id")
        sid = parse_uuid(supabase_id, "Supabase user id") if supabase_id is not None else None
        with self.connection() as conn, conn.transaction():
            return ensure_mapping_in(conn, bid, sid)

    # ---------------------------------------------------------------- writes

    def _write(self, fn: str, user_id: uuid.UUID | str, amount: int, transaction_type: str,
               description: str | None, idempotency_key: str, metadata: dict[str, Any] | None) -> LedgerWrite:
        uid = parse_uuid(user_id)
        amount = check_amount(amount, self.config)
        key = check_key(idempotency_key)
        if description is not None:
            if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_LENGTH:
                raise InvalidArgument(f"description must be text of at most {MAX_DESCRIPTION_LENGTH} characters")
            check_text(description, "description")
        if type(transaction_type) is not str or transaction_type not in _PLAIN_TYPES:  # the defaults: known good
            if not isinstance(transaction_type, str):
                raise InvalidArgument("transaction type must be a string")
            check_text(transaction_type, "transaction type")
        try:
            if metadata:
                row = self._fetchone(_WRITE_SQL[fn], (uid, amount, transaction_type, description, key,
                                                      Jsonb(metadata)))
            else:  # check_text made every text encodable (str.encode: a subclass's own encode is not asked);
                # the amount fits a bigint (at most 10**12)
                row = self._fetchone(
                    _WRITE_SQL_NO_METADATA[fn], (uid, amount, transaction_type, description, key),
                    (fn, (uid.bytes, b"%d" % amount, str.encode(transaction_type),
                          None if description is None else str.encode(description), str.encode(key)))
                    if _error_from_result is not None else None)
        except InsufficientCredits:
            self._record_failure(uid, amount, key)
            raise
        assert row is not None
        return LedgerWrite(int(row[0]), int(row[1]), bool(row[2]))

    def _record_failure(self, uid: uuid.UUID, amount: int, key: str | None) -> None:
        log.warning("deduction refused: user %s asked for %s credits (key %s)", uid, amount, key)
        try:
            with self.connection() as conn:
                conn.execute("SELECT public.record_failed_deduction(%s, %s, %s, %s)",
                             (uid, amount, "insufficient_credits", key))
        except Exception:  # the refusal stands; losing its record must not mask it
            log.exception("could not record the failed deduction for user %s", uid)

    def grant(self, user_id: uuid.UUID | str, amount: int, *, idempotency_key: str,
              transaction_type: str = "adjustment", description: str | None = None,
              metadata: dict[str, Any] | None = None) -> LedgerWrite:
        """Add credits to a points user (the resolved id) under an idempotency key."""
        return self._write("add_points", user_id, amount, transaction_type, description, idempotency_key, metadata)

    def deduct(self, user_id: uuid.UUID | str, amount: int, *, idempotency_key: str,
               transaction_type: str = "generation_deduction", description: str | None = None,
               metadata: dict[str, Any] | None = None) -> LedgerWrite:
        """Take credits; InsufficientCredits (recorded for the audit) when the balance does not cover it."""
        return self._write("deduct_points", user_id, amount, transaction_type, description, idempotency_key, metadata)

    # ---------------------------------------------------------------- reads

    def balance(self, user_id: uuid.UUID | str) -> Balance:
        """The user's balance, after what is due to expire is written off (never shows expired credits)."""
        uid = parse_uuid(user_id)
        row = self._fetchone("SELECT balance, lifetime_earned, lifetime_spent, updated_at "
                             "FROM public.current_balance(%s)", (uid,))  # one call: expire what is due, read
        if row is None:
            return Balance(uid, 0, 0, 0, None)
        return Balance(uid, int(row[0]), int(row[1]), int(row[2]), row[3])

    def history(self, user_id: uuid.UUID | str, limit: int = 50) -> list[Transaction]:
        uid = parse_uuid(user_id)
        if not isinstance(limit, int) or not 0 < limit <= 10_000:
            raise InvalidArgument("limit must be between 1 and 10000")
        with self.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(
                """SELECT id, user_id, amount, balance_after, transaction_type, description,
                          idempotency_key, metadata, created_at
                     FROM public.points_transactions WHERE user_id = %s ORDER BY id DESC LIMIT %s""",
                (uid, limit),
            ).fetchall()
        return [Transaction(**r) for r in rows]

    def subscription_of(self, bestauth_id: uuid.UUID) -> dict[str, Any] | None:
        with self.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                """SELECT id, tier, billing_cycle, status, current_period_start, current_period_end, metadata
                     FROM public.subscriptions_consolidated WHERE user_id = %s""",
                (bestauth_id,),
            ).fetchone()

    # ---------------------------------------------------------------- generations

    def _paid_tier(self, bestauth_id: uuid.UUID) -> str:
        sub = self.subscription_of(bestauth_id)
        if sub and sub["status"] in PAID_STATUSES and sub["tier"] != "free":
            if sub["tier"] not in self.config.tiers:
                from ledger.errors import ConfigError

                raise ConfigError(f"user {bestauth_id} has tier {sub['tier']!r}, which the configuration lacks")
            return sub["tier"]
        return "free"

    def may_generate(self, bestauth_id: uuid.UUID | str, kind: str) -> GenerationCheck:
        """Whether the user may start a generation of ``kind`` now (checked where the data is)."""
        res = self.resolve_user_id(bestauth_id)
        cost = self.config.generation_cost(kind)
        tier = self._paid_tier(res.bestauth_user_id)
        if tier == "free":
            limit = self.config.free.daily_limit
            with self.connection() as conn:
                used = conn.execute(
                    """SELECT count(*) FROM public.free_generation_claims
                        WHERE user_id = %s AND day = (now() AT TIME ZONE 'UTC')::date""",
                    (res.user_id,),
                ).fetchone()[0]
            remaining = max(limit - int(used), 0)
            return GenerationCheck(remaining > 0, tier, 0, None, remaining,
                                   "within the free daily limit" if remaining else "free daily limit reached")
        bal = self.spendable(res.user_id)  # credits held for running jobs are not spendable
        ok = bal >= cost
        return GenerationCheck(ok, tier, cost, bal, None,
                               "enough credits" if ok else f"needs {cost} credits, has {bal} spendable")

    def charge_generation(self, bestauth_id: uuid.UUID | str, kind: str, job_id: str) -> GenerationCharge:
        """Charge one generation: the configured cost for paid tiers, a daily-limit claim for free users.

        Idempotent per job id: a retried job is charged once.
        """
        res = self.resolve_user_id(bestauth_id)
        key = check_key(job_id)
        cost = self.config.generation_cost(kind)
        tier = self._paid_tier(res.bestauth_user_id)
        if tier == "free":
            with self.connection() as conn:
                allowed, used, limit, dup = conn.execute(
                    "SELECT allowed, used_today, daily_limit, duplicate FROM public.claim_free_generation(%s, %s)",
                    (res.user_id, key),
                ).fetchone()
            if not allowed:
                self._record_failure(res.user_id, 1, f"free:{key}")
                raise InsufficientCredits(f"free daily limit of {limit} generations reached",
                                          user_id=str(res.user_id), balance=0, requested=1)
            return GenerationCharge(tier, 0, bool(dup), None, None, int(used))
        write = self.deduct(res.user_id, cost, idempotency_key=f"generation:{key}",
                            description=f"{kind} generation", metadata={"job_id": key, "kind": kind})
        return GenerationCharge(tier, cost, write.duplicate, write.new_balance, write.transaction_id, None)

    # ---------------------------------------------------------------- subscriptions

    def handle_subscription_event(self, event: "SubscriptionEvent") -> "SubscriptionEventResult":
        """The webhook's entry point; see ledger.subscriptions."""
        from ledger.subscriptions import handle_subscription_event

        attempt = 1
        while True:  # the period key makes a repeat a no-op, so a transient fault is retried like a write
            try:
                return handle_subscription_event(self, event)
            except Exception as exc:
                if attempt >= self.retry_attempts or not is_retryable(exc):
                    raise
                self._before_retry(exc, attempt, "handle_subscription_event")
                attempt += 1


from ledger.subscriptions import SubscriptionEvent, SubscriptionEventResult  # noqa: E402  (type names only)
