"""Consistent, set-based reads of the five tables into pandas frames.

Why this shape:

- One moment. Every frame is read inside REPEATABLE READ, READ ONLY transactions that share one
  exported snapshot (``pg_export_snapshot``), so rules never compare a balance read before a write with
  a ledger read after it, while the two heavy reads still run on two server cores at once.
- Server-side work. The ledger (millions of rows) never leaves the server row by row: it arrives
  aggregated per user (sums, lifetime totals, ``balance_after`` chain breaks via a window) and per
  subscription period (grant counts). Metadata ids are validated as UUIDs in SQL.
- COPY. Each frame is one ``COPY (SELECT ...) TO STDOUT`` in CSV, parsed by pandas' C reader: the
  fastest path from PostgreSQL into a DataFrame available here (no per-row Python objects).

These are plain functions so the Dagster assets can wrap them one frame per asset.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from ledger import db
from ledger.errors import InvalidArgument

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SNAPSHOT_TABLES: tuple[str, ...] = (
    "bestauth_users", "user_id_mapping", "subscriptions", "points_balances",
    "ledger_by_user", "period_grants", "failed_deductions",
)

# public.uuid_or_null's test, inlined: that function (SET search_path) cannot be inlined by the planner
# and cost ~2 us a call, three calls a subscription
_UUID_RE = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

# an ISO timestamp or date we can cast without risking an error that would abort the snapshot
_ISO_RE = (r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
           r"([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)?)?$")

# name -> (SQL, {column: dtype}, [timestamp columns]). %(as_of)s is the ledger cut-off (the snapshot's
# own now() when not given), %(ref)s the end of the failure window.
_QUERIES: dict[str, tuple[str, dict[str, str], list[str]]] = {
    "bestauth_users": (
        "SELECT u.id::text AS bestauth_user_id, u.email FROM public.bestauth_users u",
        {"bestauth_user_id": "str", "email": "str"}, [],
    ),
    "user_id_mapping": (
        """SELECT m.bestauth_user_id::text AS bestauth_user_id, m.supabase_user_id::text AS mapped_user_id
             FROM public.user_id_mapping m""",
        {"bestauth_user_id": "str", "mapped_user_id": "str"}, [],
    ),
    "subscriptions": (
        """SELECT s.id::text AS subscription_id, s.user_id::text AS bestauth_user_id, s.tier, s.billing_cycle,
                  s.status, s.current_period_start, s.current_period_end,
                  to_char(s.current_period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS period_date,
                  CASE WHEN s.metadata ->> 'resolved_supabase_user_id' !~* %(uuid)s  -- kept only when not an id
                       THEN left(s.metadata ->> 'resolved_supabase_user_id', 100) END AS meta_resolved_raw,
                  CASE WHEN s.metadata ->> 'resolved_supabase_user_id' ~* %(uuid)s
                       THEN lower(s.metadata ->> 'resolved_supabase_user_id') END AS meta_resolved_id,
                  CASE WHEN s.metadata ->> 'supabase_user_id' ~* %(uuid)s
                       THEN lower(s.metadata ->> 'supabase_user_id') END AS meta_supabase_id,
                  CASE WHEN s.metadata ->> 'original_userId' ~* %(uuid)s
                       THEN lower(s.metadata ->> 'original_userId') END AS meta_original_id
             FROM public.subscriptions_consolidated s""",
        {"subscription_id": "str", "bestauth_user_id": "str", "tier": "str", "billing_cycle": "str",
         "status": "str", "period_date": "str", "meta_resolved_raw": "str", "meta_resolved_id": "str",
         "meta_supabase_id": "str", "meta_original_id": "str"},
        ["current_period_start", "current_period_end"],
    ),
    "points_balances": (
        """SELECT b.user_id::text AS user_id, b.balance, b.lifetime_earned, b.lifetime_spent, b.reserved
             FROM public.points_balances b""",
        {"user_id": "str", "balance": "int64", "lifetime_earned": "int64", "lifetime_spent": "int64",
         "reserved": "int64"}, [],
    ),
    # per-user ledger aggregates; a chain break is a row whose balance_after is not the previous row's
    # balance_after plus its amount (the first row: its amount), in write (id) order
    "ledger_by_user": (
        """SELECT t.user_id::text AS user_id, count(*) AS ledger_rows, sum(t.amount) AS ledger_sum,
                  coalesce(sum(t.amount) FILTER (WHERE t.amount > 0), 0) AS ledger_earned,
                  coalesce(-sum(t.amount) FILTER (WHERE t.amount < 0), 0) AS ledger_spent,
                  count(*) FILTER (WHERE t.balance_after <> coalesce(t.prev_after, 0) + t.amount) AS chain_breaks,
                  min(t.id) FILTER (WHERE t.balance_after <> coalesce(t.prev_after, 0) + t.amount) AS first_break_id,
                  max(t.balance_after) FILTER (WHERE t.next_id IS NULL) AS last_balance_after,
                  max(t.id) AS last_transaction_id
             FROM (SELECT p.user_id, p.id, p.amount, p.balance_after,
                          lag(p.balance_after) OVER w AS prev_after, lead(p.id) OVER w AS next_id
                     FROM public.points_transactions p
                    WHERE p.created_at <= %(as_of)s
                   WINDOW w AS (PARTITION BY p.user_id ORDER BY p.id)) t
            GROUP BY t.user_id""",
        {"user_id": "str", "ledger_rows": "int64", "ledger_sum": "int64", "ledger_earned": "int64",
         "ledger_spent": "int64", "chain_breaks": "int64", "first_break_id": "Int64",
         "last_balance_after": "int64", "last_transaction_id": "int64"}, [],
    ),
    # grants (and the audit's own reversals of duplicates) per subscription period. A row belongs to the
    # period its key names (subscription_grant:<sub>:<date>), else to the one its metadata names
    # (subscription_id + period_start: a webhook retry under another key); rows naming neither form a
    # group with empty subscription and period. grant_rows: "id:amount:canonical" per grant, in id order.
    "period_grants": (
        """SELECT t.user_id::text AS user_id, g.subscription_id, g.period_date,
                  count(*) FILTER (WHERE t.transaction_type = 'subscription_grant') AS grants,
                  coalesce(sum(t.amount) FILTER (WHERE t.transaction_type = 'subscription_grant'), 0) AS granted,
                  count(*) FILTER (WHERE t.transaction_type = 'reconciliation_fix') AS reversals,
                  coalesce(-sum(t.amount) FILTER (WHERE t.transaction_type = 'reconciliation_fix'), 0) AS reversed,
                  coalesce(bool_or(t.idempotency_key = 'subscription_grant:' || g.subscription_id || ':'
                                   || g.period_date), false) AS canonical,
                  string_agg(t.id::text || ':' || t.amount::text || ':'
                             || CASE WHEN t.idempotency_key LIKE 'subscription_grant:%%' THEN '1' ELSE '0' END,
                             ' ' ORDER BY t.id) FILTER (WHERE t.transaction_type = 'subscription_grant') AS grant_rows,
                  string_agg(t.metadata ->> 'reverses_transaction_id', ' ')
                      FILTER (WHERE t.transaction_type = 'reconciliation_fix') AS reversed_ids
             FROM public.points_transactions t
            CROSS JOIN LATERAL (
                  SELECT CASE WHEN t.idempotency_key LIKE 'subscription_grant:%%'
                              THEN lower(split_part(t.idempotency_key, ':', 2))
                              WHEN t.metadata ->> 'subscription_id' ~* %(uuid)s
                              THEN lower(t.metadata ->> 'subscription_id') END
                             AS subscription_id,
                         CASE WHEN t.idempotency_key LIKE 'subscription_grant:%%'
                              THEN split_part(t.idempotency_key, ':', 3)
                              WHEN t.metadata ->> 'period_start' ~ %(iso)s
                              THEN to_char((t.metadata ->> 'period_start')::timestamptz AT TIME ZONE 'UTC',
                                           'YYYY-MM-DD') END AS period_date) g
            WHERE (t.transaction_type = 'subscription_grant'
                   OR (t.transaction_type = 'reconciliation_fix' AND t.metadata ? 'reverses_transaction_id'))
              AND t.created_at <= %(as_of)s
            GROUP BY t.user_id, g.subscription_id, g.period_date""",
        {"user_id": "str", "subscription_id": "str", "period_date": "str", "grants": "int64",
         "granted": "int64", "reversals": "int64", "reversed": "int64", "canonical": "bool",
         "grant_rows": "str", "reversed_ids": "str"}, [],
    ),
    "failed_deductions": (
        """SELECT f.user_id::text AS user_id, count(*) AS failures_last_hour, sum(f.amount) AS failed_amount,
                  max(f.created_at) AS last_failure_at
             FROM public.points_deduction_failures f
            WHERE f.created_at > %(ref)s::timestamptz - interval '1 hour' AND f.created_at <= %(ref)s
            GROUP BY f.user_id""",
        {"user_id": "str", "failures_last_hour": "int64", "failed_amount": "int64"}, ["last_failure_at"],
    ),
}


# one user's (or a few users') rows only: diagnose and `audit --user`. %(bids)s BestAuth ids, %(uids)s
# every points id that may hold their credits; both text arrays cast server-side.
_FILTERS: dict[str, str] = {
    "bestauth_users": "u.id = ANY(%(bids)s::uuid[])",
    "user_id_mapping": "(m.bestauth_user_id = ANY(%(bids)s::uuid[]) OR m.supabase_user_id = ANY(%(uids)s::uuid[]))",
    "subscriptions": "s.user_id = ANY(%(bids)s::uuid[])",
    "points_balances": "b.user_id = ANY(%(uids)s::uuid[])",
    "ledger_by_user": "p.user_id = ANY(%(uids)s::uuid[])",
    "period_grants": "t.user_id = ANY(%(uids)s::uuid[])",
    "failed_deductions": "f.user_id = ANY(%(uids)s::uuid[])",
}
_WHERE_ANCHORS: dict[str, tuple[str, str]] = {  # where the filter goes: (text to find, 'after'|'where')
    "bestauth_users": ("FROM public.bestauth_users u", "where"),
    "user_id_mapping": ("FROM public.user_id_mapping m", "where"),
    "subscriptions": ("FROM public.subscriptions_consolidated s", "where"),
    "points_balances": ("FROM public.points_balances b", "where"),
    "ledger_by_user": ("WHERE p.created_at <= %(as_of)s", "and"),
    "period_grants": ("AND t.created_at <= %(as_of)s", "and"),
    "failed_deductions": ("AND f.created_at <= %(ref)s", "and"),
}


def _filtered(name: str) -> str:
    query = _QUERIES[name][0]
    anchor, how = _WHERE_ANCHORS[name]
    assert anchor in query, name
    extra = f" WHERE {_FILTERS[name]}" if how == "where" else f" AND {_FILTERS[name]}"
    return query.replace(anchor, anchor + extra, 1)

# the two heavy reads go first, one per server core; the light ones follow on whichever finishes first
_ORDER = ("ledger_by_user", "period_grants", "subscriptions", "bestauth_users", "user_id_mapping",
          "points_balances", "failed_deductions")

Progress = Callable[[str, int, float], None]  # (frame name, rows, seconds)


@dataclass(frozen=True)
class UserFilter:
    """Whose rows a filtered snapshot reads: BestAuth ids, and every points id their credits may be under."""

    bestauth_ids: frozenset[str]
    points_ids: frozenset[str]


def user_filter_for(url: str, refs: Iterable[str]) -> UserFilter:
    """Resolve emails / BestAuth ids / points ids to a UserFilter (UnknownUser when one matches nothing).

    The points ids are every id the evidence names: mapping, metadata keys, resolution, BestAuth id.
    """
    from ledger.errors import UnknownUser
    from ledger.ids import is_uuid, normalize_email, parse_uuid

    bids: set[str] = set()
    orphans: set[str] = set()
    with db.connect(url, autocommit=True) as conn:
        for ref in refs:
            ref = (ref or "").strip()
            if "@" in ref:
                email = normalize_email(ref)
                row = conn.execute("SELECT id::text FROM public.bestauth_users WHERE email = %s", (email,)).fetchone()
                if row is None:
                    raise UnknownUser(f"no user with email {email}")
                bids.add(row[0])
            elif is_uuid(ref):
                rows = conn.execute(
                    """SELECT r.bestauth_user_id::text FROM public.user_id_resolution r
                        WHERE r.bestauth_user_id = %(id)s OR r.user_id = %(id)s OR r.mapped_user_id = %(id)s
                           OR r.metadata_user_id = %(id)s""", {"id": ref}).fetchall()
                if rows:
                    bids.update(r[0] for r in rows)
                elif conn.execute("""SELECT 1 FROM public.points_balances WHERE user_id = %(id)s UNION ALL
                                     SELECT 1 FROM public.points_transactions WHERE user_id = %(id)s LIMIT 1""",
                                  {"id": ref}).fetchone():
                    orphans.add(str(parse_uuid(ref)))  # credits under an id no BestAuth user resolves to
                else:
                    raise UnknownUser(f"no BestAuth user or points user with id {ref}")
            else:
                raise InvalidArgument(f"not an email or a UUID: {ref[:80]!r}")
        rows = conn.execute(
            """SELECT r.user_id::text, r.mapped_user_id::text,
                      public.uuid_or_null(s.metadata ->> 'resolved_supabase_user_id')::text,
                      public.uuid_or_null(s.metadata ->> 'supabase_user_id')::text,
                      public.uuid_or_null(s.metadata ->> 'original_userId')::text
                 FROM public.user_id_resolution r
                 LEFT JOIN public.subscriptions_consolidated s ON s.user_id = r.bestauth_user_id
                WHERE r.bestauth_user_id = ANY(%s::uuid[])""", (sorted(bids),)).fetchall()
    pids = {v for row in rows for v in row if v} | orphans
    return UserFilter(frozenset(bids), frozenset(pids))


@dataclass
class Snapshot:
    """The frames one audit sees, all as of the same database moment."""

    taken_at: datetime
    as_of: datetime | None
    frames: dict[str, "pd.DataFrame"] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def table(self, name: str) -> "pd.DataFrame":
        try:
            return self.frames[name]
        except KeyError:
            raise KeyError(f"snapshot has no frame {name!r} (has: {', '.join(self.frames)})") from None

    @property
    def cutoff(self) -> datetime:
        """The instant the ledger was read up to."""
        return self.as_of or self.taken_at

    def counts(self) -> dict[str, int]:
        return {name: len(frame) for name, frame in self.frames.items()}


_ARROW_TYPES = {"str": "string", "int64": "int64", "Int64": "int64", "bool": "bool_"}


# The ledger window is the snapshot's heaviest step (a sort of every ledger row by user and id). Split
# by user id range, its halves run on two server cores at once; each half is a sequential scan plus an
# in-memory sort, which beats walking the (user_id, id) index into randomly placed heap rows ~2x.
LEDGER_PARTS: tuple[str, ...] = ("p.user_id < '80000000-0000-0000-0000-000000000000'::uuid",
                                 "p.user_id >= '80000000-0000-0000-0000-000000000000'::uuid")
_LEDGER_ANCHOR = "WHERE p.created_at <= %(as_of)s"


def use_system_allocator() -> None:
    """Arrow buffers from malloc rather than Arrow's jemalloc pool: the pool keeps freed memory for
    reuse by Arrow alone, while the audit's later stages allocate through numpy; with malloc, the
    memory one stage frees (and ``release_memory`` trims) is there for the next one."""
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


def _read_frame(conn: psycopg.Connection, name: str, params: dict[str, Any],
                part: str | None = None) -> "pd.DataFrame":
    """One COPY into memory, parsed by pyarrow's multithreaded CSV reader (strings stay Arrow-backed:
    no Python object per id, which is what makes a million-user frame fit and join quickly)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    use_system_allocator()
    query, dtypes, dates = _QUERIES[name]
    if "bids" in params:
        query = _filtered(name)
    if part is not None:
        query = query.replace(_LEDGER_ANCHOR, f"{_LEDGER_ANCHOR} AND {part}", 1)
        conn.execute("SET LOCAL enable_indexscan = off")
    buf = io.BytesIO()
    with conn.cursor() as cur:
        copy_sql = f"COPY ({query}) TO STDOUT WITH (FORMAT csv, HEADER true)"
        with cur.copy(copy_sql, params) as copy:  # psycopg binds COPY parameters client-side
            for chunk in copy:
                buf.write(chunk)
    buf.seek(0)
    types = {c: getattr(pa, _ARROW_TYPES[t])() for c, t in dtypes.items()}
    types |= {c: pa.timestamp("us", tz="UTC") for c in dates}
    if part is not None:
        conn.execute("SET LOCAL enable_indexscan = on")
    table = pacsv.read_csv(buf, convert_options=pacsv.ConvertOptions(
        column_types=types, strings_can_be_null=True, true_values=["t"], false_values=["f"]))
    frame = table.to_pandas()
    for col, typ in dtypes.items():
        if typ in ("int64", "Int64") and frame[col].dtype != typ:
            frame[col] = frame[col].astype(typ)  # nullable ints arrive as float
    return frame


WORK_MEM = "256MB"  # per sort/hash node of the snapshot's queries: the ledger window sorts in memory


def _begin(conn: psycopg.Connection, snapshot_id: str | None = None) -> None:
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    if snapshot_id is not None:  # must come before any query of the transaction
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_id)))
    conn.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(WORK_MEM)))


def take_snapshot(url: str, *, as_of: datetime | None = None, tables: Iterable[str] | None = None,
                  progress: Progress | None = None, workers: int = 2,
                  users: "UserFilter | None" = None) -> Snapshot:
    """Read the named frames (default: all of SNAPSHOT_TABLES) as of one database moment.

    ``as_of`` cuts the ledger and the failure window at that instant (rows created after it are not
    seen); the other tables hold no history and are read as they are now. ``users`` restricts every
    frame to those users' rows (same queries, one more condition).
    """
    names = list(SNAPSHOT_TABLES if tables is None else tables)
    unknown = [n for n in names if n not in _QUERIES]
    if unknown:
        raise InvalidArgument(f"unknown snapshot frame(s): {', '.join(unknown)} (known: {', '.join(SNAPSHOT_TABLES)})")
    if as_of is not None and as_of.tzinfo is None:
        raise InvalidArgument("as_of must be timezone-aware")
    ordered = [n for n in _ORDER if n in names]
    main = db.connect(url, autocommit=True)
    others: list[psycopg.Connection] = []
    try:
        _begin(main)
        snap_id, taken_at = main.execute("SELECT pg_export_snapshot(), now()").fetchone()
        cutoff = as_of or taken_at
        params: dict[str, Any] = {"as_of": cutoff, "ref": cutoff, "iso": _ISO_RE, "uuid": _UUID_RE}
        if users is not None:
            params["bids"] = sorted(users.bestauth_ids)
            params["uids"] = sorted(users.points_ids | users.bestauth_ids)

        n_workers = max(1, min(workers if users is None else 1, len(ordered)))
        conns = [main]
        for _ in range(n_workers - 1):
            extra = db.connect(url, autocommit=True)
            others.append(extra)
            _begin(extra, snap_id)
            conns.append(extra)
        snapshot = Snapshot(taken_at=taken_at, as_of=as_of)

        # each worker thread owns one connection and pulls (frame, part) tasks from a shared queue
        import queue

        import pandas as pd

        todo: queue.SimpleQueue[tuple[str, int, str | None]] = queue.SimpleQueue()
        for n in ordered:
            parts: tuple[str | None, ...] = LEDGER_PARTS if (n == "ledger_by_user" and users is None) else (None,)
            for i, part in enumerate(parts):
                todo.put((n, i, part))

        def work(conn: psycopg.Connection) -> list[tuple[str, int, Any, float]]:
            done = []
            while True:
                try:
                    name, i, part = todo.get_nowait()
                except queue.Empty:
                    return done
                t0 = time.perf_counter()
                frame = _read_frame(conn, name, params, part)
                elapsed = time.perf_counter() - t0
                done.append((name, i, frame, elapsed))
                log.debug("snapshot frame %s[%d]: %d rows in %.2fs", name, i, len(frame), elapsed)
                if progress and (part is None or i == len(LEDGER_PARTS) - 1):
                    progress(name, len(frame), elapsed)

        with ThreadPoolExecutor(max_workers=len(conns), thread_name_prefix="snapshot") as pool:
            results = [item for done in pool.map(work, conns) for item in done]
        pieces: dict[str, list[tuple[int, Any]]] = {}
        for name, i, frame, elapsed in results:
            pieces.setdefault(name, []).append((i, frame))
            snapshot.timings[name] = snapshot.timings.get(name, 0.0) + elapsed
        for name, parts_read in pieces.items():
            frames = [f for _, f in sorted(parts_read, key=lambda x: x[0])]
            snapshot.frames[name] = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        snapshot.frames = {n: snapshot.frames[n] for n in names}
        from checks.state import release_memory

        release_memory()  # the COPY text buffers are gone; give their heap back before the joins
        return snapshot
    except psycopg.OperationalError as exc:
        from ledger.errors import DatabaseUnavailable
        raise DatabaseUnavailable(f"snapshot read failed on {db.describe_url(url)}: {exc}") from None
    finally:
        for c in [*others, main]:
            try:
                c.execute("ROLLBACK")
            except psycopg.Error:
                pass
            c.close()
