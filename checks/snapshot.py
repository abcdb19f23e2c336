"""Consistent, set-based reads of the five tables into pandas frames.

Why this shape:

- One moment. Every frame is read inside REPEATABLE READ, READ ONLY transactions that share one
  exported snapshot (``pg_export_snapshot``), so rules never compare a balance read before a write with
  a ledger read after it, while the two heavy reads still run on two server cores at once.
- Server-side work. The ledger (millions of rows) never leaves the server row by row: it arrives
  aggregated per user (sums, lifetime totals, ``balance_after`` chain breaks via a window) and per
  subscription period (grant counts). Metadata ids are validated as UUIDs in SQL.
- Binary COPY into Arrow. Each frame is one query read through ADBC's PostgreSQL driver
  (``checks.frame_reader``): ``COPY ... (FORMAT binary)`` decoded into Arrow arrays in C, with no Python
  object per row, on one reader connection per core.

These are plain functions so the Dagster assets can wrap them one frame per asset.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from checks import frame_reader
from checks.lifecycle_frames import FRAMES as LIFECYCLE_FRAMES
from checks.lifecycle_frames import QUERIES as LIFECYCLE_QUERIES
from checks.lifecycle_frames import filtered as lifecycle_filtered
from ledger import db
from ledger.errors import InvalidArgument

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SNAPSHOT_TABLES: tuple[str, ...] = (
    "bestauth_users", "user_id_mapping", "subscriptions", "points_balances",
    "ledger_by_user", "period_grants", "failed_deductions",
) + LIFECYCLE_FRAMES  # the credit-lifecycle rules' frames (checks/lifecycle_frames.py)

# public.uuid_or_null's test. Applied client-side with Arrow's vectorised RE2 (subscriptions_ids): in SQL,
# uuid_or_null (a SET search_path function, never inlined) or an inline regex cost ~2 us a call, three
# calls a subscription, more than the rest of the subscription read together
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
                  left(s.metadata ->> 'resolved_supabase_user_id', 100) AS meta_resolved_raw,
                  left(s.metadata ->> 'supabase_user_id', 100) AS meta_supabase_raw,
                  left(s.metadata ->> 'original_userId', 100) AS meta_original_raw
             FROM public.subscriptions_consolidated s""",
        {"subscription_id": "str", "bestauth_user_id": "str", "tier": "str", "billing_cycle": "str",
         "status": "str", "period_date": "str", "meta_resolved_raw": "str", "meta_supabase_raw": "str",
         "meta_original_raw": "str"},
        ["current_period_start", "current_period_end"],
    ),
    # users, their mapping and their subscription in one read (a full snapshot's way to the three frames
    # above: a third of the rows to stream and parse; the foreign keys make every mapping and subscription
    # hang off a user, and a user has at most one of each)
    "identity": (
        """SELECT u.id::text AS bestauth_user_id, u.email, m.supabase_user_id::text AS mapped_user_id,
                  s.id::text AS subscription_id, s.tier, s.billing_cycle,
                  s.status, s.current_period_start, s.current_period_end,
                  to_char(s.current_period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS period_date,
                  left(s.metadata ->> 'resolved_supabase_user_id', 100) AS meta_resolved_raw,
                  left(s.metadata ->> 'supabase_user_id', 100) AS meta_supabase_raw,
                  left(s.metadata ->> 'original_userId', 100) AS meta_original_raw
             FROM public.bestauth_users u
             LEFT JOIN public.user_id_mapping m ON m.bestauth_user_id = u.id
             LEFT JOIN public.subscriptions_consolidated s ON s.user_id = u.id""",
        {"bestauth_user_id": "str", "email": "str", "mapped_user_id": "str", "subscription_id": "str",
         "tier": "str", "billing_cycle": "str", "status": "str", "period_date": "str",
         "meta_resolved_raw": "str", "meta_supabase_raw": "str", "meta_original_raw": "str"},
        ["current_period_start", "current_period_end"],
    ),
    "points_balances": (
        """SELECT b.user_id::text AS user_id, b.balance, b.lifetime_earned, b.lifetime_spent, b.reserved
             FROM public.points_balances b""",
        {"user_id": "str", "balance": "int64", "lifetime_earned": "int64", "lifetime_spent": "int64",
         "reserved": "int64"}, [],
    ),
    # per-user ledger aggregates; a chain break is a row whose balance_after is not the previous row's
    # balance_after plus its amount (the first row: its amount), in write (id) order. The chain pass is an
    # index-only scan of points_transactions_user_idx (sql/016 covers amount, balance_after, created_at),
    # already in (user_id, id) order: no sort of the ledger.
    #
    # Every grant (and every audit reversal of a duplicate) comes as one typed row of grant_ledger, from
    # which period_grants is built client-side (_period_grants); those rows are read from the grant and fix
    # rows only (the partial (transaction_type, created_at) index of sql/014). A row belongs to the period
    # its key names (subscription_grant:<sub>:<date>), else to the one its metadata names (subscription_id +
    # period_start: a webhook retry under another key); rows naming neither get no subscription and no
    # period. Spaces and '|' are stripped from the key parts (as when the rows travelled as '|'-separated
    # tokens), so a key reads as the same period it did then.
    "ledger_by_user": (
        """SELECT c.user_id::text AS user_id, c.ledger_rows, c.ledger_sum, c.ledger_earned, c.ledger_spent, c.chain_breaks,
                  c.first_break_id, c.last_balance_after, c.last_transaction_id
             FROM (SELECT t.user_id, count(*) AS ledger_rows, sum(t.amount) AS ledger_sum,
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
                    GROUP BY t.user_id) c""",
        {"user_id": "str", "ledger_rows": "int64", "ledger_sum": "int64", "ledger_earned": "int64",
         "ledger_spent": "int64", "chain_breaks": "int64", "first_break_id": "Int64",
         "last_balance_after": "int64", "last_transaction_id": "int64"}, [],
    ),
    # the grant and reversal rows (see above), read on their own: once, not once per half of the ledger
    # pass (each half read every grant row's page and kept its half). Typed columns, one row per ledger
    # row, sorted so that each period's rows are adjacent (user, subscription, period, then id; "C" order
    # is memcmp, and any order keeps equal keys together): _period_grants then groups by runs, with no
    # hash of string keys (Arrow's group_by on the three took ~1 s at 1M users). They came as one
    # "sub|period|id|..." token string per user before, split again on the client: building the strings
    # was most of the query (3.6-4.0 s against 2.0-2.4 s for these rows, EXPLAIN ANALYZE at 1M users).
    # OFFSET 0 keeps the inner query a query of its own: flattened, the planner copied each key part's
    # expression into every place that names it (the canonical test, the sort keys), 4-5 evaluations.
    "grant_ledger": (
        """SELECT r.user_id::text AS user_id, nullif(r.sub, '') AS subscription_id, nullif(r.per, '') AS period_date,
                  r.id, r.amount, r.kind = 'g' AS is_grant,
                  coalesce(r.idempotency_key = 'subscription_grant:' || r.sub || ':' || r.per, false) AS canonical,
                  r.reverses
             FROM (SELECT p.user_id, p.id, p.amount, p.idempotency_key, k.kind, g.sub, g.per,
                          CASE WHEN k.kind = 'r' AND p.metadata ->> 'reverses_transaction_id' ~ '^[0-9]{1,19}$'
                               THEN p.metadata ->> 'reverses_transaction_id' END AS reverses
                     FROM public.points_transactions p
                    CROSS JOIN LATERAL (
                          SELECT CASE WHEN p.transaction_type = 'subscription_grant' THEN 'g'
                                      WHEN p.transaction_type = 'reconciliation_fix'
                                           AND p.metadata ? 'reverses_transaction_id' THEN 'r' END AS kind) k
                    CROSS JOIN LATERAL (
                          SELECT CASE WHEN p.idempotency_key LIKE 'subscription_grant:%%'
                                      THEN replace(replace(lower(split_part(p.idempotency_key, ':', 2)), ' ', ''), '|', '')
                                      WHEN p.metadata ->> 'subscription_id' ~* %(uuid)s
                                      THEN lower(p.metadata ->> 'subscription_id') END AS sub,
                                 CASE WHEN p.idempotency_key LIKE 'subscription_grant:%%'
                                      THEN replace(replace(split_part(p.idempotency_key, ':', 3), ' ', ''), '|', '')
                                      WHEN p.metadata ->> 'period_start' ~ %(iso)s
                                      THEN to_char((p.metadata ->> 'period_start')::timestamptz
                                                   AT TIME ZONE 'UTC', 'YYYY-MM-DD') END AS per) g
                    WHERE p.created_at <= %(as_of)s
                      AND p.transaction_type IN ('subscription_grant', 'reconciliation_fix') AND k.kind IS NOT NULL
                   OFFSET 0) r
            ORDER BY r.user_id, nullif(r.sub, '') COLLATE "C", nullif(r.per, '') COLLATE "C", r.id""",
        {"user_id": "str", "subscription_id": "str", "period_date": "str", "id": "int64", "amount": "int64",
         "is_grant": "bool", "canonical": "bool", "reverses": "str"}, [],
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


_QUERIES.update(LIFECYCLE_QUERIES)  # %(live)s: no as_of (the lots' remaining column is compared)


# one user's (or a few users') rows only: diagnose and `audit --user`. %(bids)s BestAuth ids, %(uids)s
# every points id that may hold their credits; both text arrays cast server-side.
_FILTERS: dict[str, str] = {
    "bestauth_users": "u.id = ANY(%(bids)s::uuid[])",
    "user_id_mapping": "(m.bestauth_user_id = ANY(%(bids)s::uuid[]) OR m.supabase_user_id = ANY(%(uids)s::uuid[]))",
    "subscriptions": "s.user_id = ANY(%(bids)s::uuid[])",
    "points_balances": "b.user_id = ANY(%(uids)s::uuid[])",
    "ledger_by_user": "p.user_id = ANY(%(uids)s::uuid[])",
    "grant_ledger": "p.user_id = ANY(%(uids)s::uuid[])",
    "failed_deductions": "f.user_id = ANY(%(uids)s::uuid[])",
}
_WHERE_ANCHORS: dict[str, tuple[str, str]] = {  # where the filter goes: (text to find, 'after'|'where')
    "bestauth_users": ("FROM public.bestauth_users u", "where"),
    "user_id_mapping": ("FROM public.user_id_mapping m", "where"),
    "subscriptions": ("FROM public.subscriptions_consolidated s", "where"),
    "points_balances": ("FROM public.points_balances b", "where"),
    "ledger_by_user": ("WHERE p.created_at <= %(as_of)s", "and"),
    "grant_ledger": ("WHERE p.created_at <= %(as_of)s", "and"),
    "failed_deductions": ("AND f.created_at <= %(ref)s", "and"),
}


def _filtered(name: str) -> str:
    if name in LIFECYCLE_QUERIES:
        return lifecycle_filtered(name)
    query = _QUERIES[name][0]
    anchor, how = _WHERE_ANCHORS[name]
    assert anchor in query, name
    extra = f" WHERE {_FILTERS[name]}" if how == "where" else f" AND {_FILTERS[name]}"
    return query.replace(anchor, anchor + extra)

# the two heavy reads go first, one per server core; the light ones follow on whichever finishes first
_ORDER = ("ledger_by_user", "grant_ledger", "lots_by_user", "identity", "subscriptions", "bestauth_users", "user_id_mapping",
          "points_balances", "failed_deductions", "refunds", "plan_change_grants")

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
    # frames still being read in the background (take_snapshot(background=...)): (frame, seconds)
    pending: dict[str, "Future[tuple[pd.DataFrame, float]]"] = field(default_factory=dict)

    def table(self, name: str) -> "pd.DataFrame":
        if name not in self.frames and name in self.pending:
            frame, seconds = self.pending.pop(name).result()  # waits; a read error is raised here
            self.frames[name] = frame
            self.timings[name] = seconds
        try:
            return self.frames[name]
        except KeyError:
            raise KeyError(f"snapshot has no frame {name!r} (has: {', '.join(self.frames)})") from None

    def wait(self) -> None:
        """Every background frame read (or its error raised)."""
        for name in list(self.pending):
            self.table(name)

    @property
    def cutoff(self) -> datetime:
        """The instant the ledger was read up to."""
        return self.as_of or self.taken_at

    def counts(self) -> dict[str, int]:
        self.wait()
        return {name: len(frame) for name, frame in self.frames.items()}


# The ledger window is the snapshot's heaviest step (every ledger row in user and id order). Split by
# user id range, its halves run on two server cores at once; each half is an index-only scan of the
# covering (user_id, id) index (sql/016: 2.0 s per half at 1M users against 7.6 s for the sequential
# scan and in-memory sort it replaced).
LEDGER_PARTS: tuple[str, ...] = ("p.user_id < '80000000-0000-0000-0000-000000000000'::uuid",
                                 "p.user_id >= '80000000-0000-0000-0000-000000000000'::uuid")
_LEDGER_ANCHOR = "WHERE p.created_at <= %(as_of)s"

# The identity read (users, mapping, subscription: a million rows, most of it parsing on the client) in
# two halves by BestAuth id, one per connection, each joining only its half of the three tables: the
# other connection would otherwise wait idle once the ledger halves and the small frames are read.
_HALF = "'80000000-0000-0000-0000-000000000000'::uuid"
IDENTITY_PARTS: tuple[str, ...] = (f"< {_HALF}", f">= {_HALF}")
_IDENTITY_ANCHORS = ("FROM public.bestauth_users u", "ON m.bestauth_user_id = u.id", "ON s.user_id = u.id")


def _with_part(name: str, query: str, part: str) -> str:
    """The frame's query restricted to one part of the users (LEDGER_PARTS, IDENTITY_PARTS)."""
    if name == "ledger_by_user":
        return query.replace(_LEDGER_ANCHOR, f"{_LEDGER_ANCHOR} AND {part}")
    _, mapping, subs = _IDENTITY_ANCHORS
    for anchor in _IDENTITY_ANCHORS:
        assert anchor in query, anchor
    return (query.replace(mapping, f"{mapping} AND m.bestauth_user_id {part}")
            .replace(subs, f"{subs} AND s.user_id {part}") + f" WHERE u.id {part}")


_PARTS: dict[str, tuple[str, ...]] = {"ledger_by_user": LEDGER_PARTS, "identity": IDENTITY_PARTS}


PERIOD_GRANT_COLUMNS = ("user_id", "subscription_id", "period_date", "grants", "granted", "reversals", "reversed",
                        "canonical", "grant_rows", "reversed_ids")


def _period_grants(rows: "pd.DataFrame") -> "pd.DataFrame":
    """Grants (and audit reversals) per (points id, subscription, period), from the grant_ledger rows.

    grants/granted: count and credits of subscription_grant rows; reversals/reversed: the audit's
    reversal rows and the credits they took back; canonical: a row under the period's own key.
    grant_rows ("id:amount:canonical" per grant) and reversed_ids are spelled out only for periods with
    more than one grant or any reversal: the only ones a rule looks into.

    The rows arrive sorted by (user, subscription, period, id), so a period is a run of adjacent rows:
    a new run starts wherever a key differs from the row before (a missing subscription or period is a
    key of its own), and the sums are ``reduceat`` over the runs.
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    if rows.empty:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("grants", "granted", "reversals", "reversed")
                                          else "bool" if c == "canonical" else "str") for c in PERIOD_GRANT_COLUMNS})
    keys = ["user_id", "subscription_id", "period_date"]
    n = len(rows)
    key_arrays = {k: frame_reader.arrow_strings(rows[k], pa.string()) for k in keys}
    starts_mask = np.zeros(n, dtype=bool)
    starts_mask[0] = True
    for arr in key_arrays.values():
        # '' never occurs (the query turns it into NULL), so it stands for the missing key
        filled = pc.fill_null(arr, "")
        starts_mask[1:] |= pc.not_equal(filled[1:], filled[:-1]).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(starts_mask)
    is_grant = rows["is_grant"].to_numpy(dtype=bool)
    amount = rows["amount"].to_numpy(dtype="int64")
    canon = rows["canonical"].to_numpy(dtype=bool)
    grants = np.add.reduceat(is_grant.astype("int64"), starts)
    reversals = np.add.reduceat((~is_grant).astype("int64"), starts)
    granted = np.add.reduceat(np.where(is_grant, amount, 0), starts)
    reversed_ = np.add.reduceat(np.where(is_grant, 0, -amount), starts)
    canonical = np.logical_or.reduceat(canon, starts)
    at = pa.array(starts)
    frame = pa.table({k: arr.take(at) for k, arr in key_arrays.items()}).to_pandas()
    frame["grants"], frame["granted"], frame["reversals"], frame["reversed"] = grants, granted, reversals, reversed_
    frame["canonical"] = canonical
    grant_rows: list[str | None] = [None] * len(starts)
    reversed_ids: list[str | None] = [None] * len(starts)
    ends = np.append(starts[1:], n)
    detail = np.flatnonzero((grants > 1) | (reversals > 0))
    if len(detail):
        # only the rows of those periods become Python values
        ids, revs = rows["id"].to_numpy(), rows["reverses"]
        for g in detail:
            lo, hi = int(starts[g]), int(ends[g])
            spelled = [f"{ids[i]}:{amount[i]}:{1 if canon[i] else 0}" for i in range(lo, hi) if is_grant[i]]
            undone = [r for i, r in zip(range(lo, hi), revs.iloc[lo:hi], strict=True)
                      if not is_grant[i] and isinstance(r, str) and r]
            grant_rows[g] = " ".join(spelled) or None
            reversed_ids[g] = " ".join(undone) or None
    frame["grant_rows"] = pd.Series(grant_rows, dtype="object")
    frame["reversed_ids"] = pd.Series(reversed_ids, dtype="object")
    return frame[list(PERIOD_GRANT_COLUMNS)]


def _subscription_ids(frame: "pd.DataFrame") -> "pd.DataFrame":
    """The metadata's id keys as validated, lower-cased UUIDs (None when absent or not a UUID), the
    app's rule; ``meta_resolved_raw`` keeps the raw value only where it is not a UUID (for findings)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for raw, out in (("meta_resolved_raw", "meta_resolved_id"), ("meta_supabase_raw", "meta_supabase_id"),
                     ("meta_original_raw", "meta_original_id")):
        arr = frame_reader.arrow_strings(frame[raw], pa.string())
        # lower-cased first (ASCII only: a UUID has no other letters, and anything else fails the test
        # anyway), then tested case-sensitively: ~3x less time than an ignore-case test and a lower-casing
        # of every value (1M subscriptions: ~0.4 against ~1.2 s for the three columns)
        lower = pc.ascii_lower(arr)
        ok = pc.fill_null(pc.match_substring_regex(lower, _UUID_RE), False)
        frame[out] = pc.if_else(ok, lower, pa.scalar(None, pa.string())).to_pandas()
        if raw == "meta_resolved_raw":
            frame[raw] = pc.if_else(ok, pa.scalar(None, pa.string()), arr).to_pandas()
    return frame.drop(columns=["meta_supabase_raw", "meta_original_raw"])


_POST = {"subscriptions": _subscription_ids, "identity": _subscription_ids}
_IDENTITY_FRAMES = ("bestauth_users", "user_id_mapping", "subscriptions")


def _split_identity(frame: "pd.DataFrame") -> dict[str, "pd.DataFrame"]:
    """The three frames, as their own queries would have returned them, from the joined read."""
    subs = [c for c in frame.columns if c not in ("email", "mapped_user_id")]
    has_sub = frame["subscription_id"].notna()
    return {
        "bestauth_users": frame[["bestauth_user_id", "email"]],
        "user_id_mapping": frame.loc[frame["mapped_user_id"].notna(), ["bestauth_user_id", "mapped_user_id"]]
        .reset_index(drop=True),
        "subscriptions": frame.loc[has_sub, ["subscription_id", *[c for c in subs if c != "subscription_id"]]]
        .reset_index(drop=True),
    }


def use_system_allocator() -> None:
    """Arrow buffers from malloc rather than Arrow's jemalloc pool: the pool keeps freed memory for
    reuse by Arrow alone, while the audit's later stages allocate through numpy; with malloc, the
    memory one stage frees (and ``release_memory`` trims) is there for the next one."""
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


def _frame_sql(cur: psycopg.ClientCursor[Any], name: str, params: dict[str, Any], part: str | None = None) -> str:
    """The frame's query as the reader sends it: typed columns, parameters bound as literals by psycopg
    (as its COPY always bound them, client-side), restricted to ``part`` or to the filtered users."""
    query, dtypes, dates = _QUERIES[name]
    if "bids" in params:
        query = _filtered(name)
    if part is not None:
        query = _with_part(name, query, part)
    return cur.mogrify(frame_reader.typed(query, dtypes, dates), params)


def _read_frame(conn: Any, name: str, query: str) -> "pd.DataFrame":
    """One frame over a reader connection (frame_reader), as Arrow-backed pandas columns: strings stay
    in Arrow (no Python object per id, which is what makes a million-user frame fit and join quickly)."""
    use_system_allocator()
    _, dtypes, _ = _QUERIES[name]
    settings = FRAME_SETTINGS.get(name, {})
    saved = {k: frame_reader.read_table(conn, f"SELECT current_setting({_text(k)}) AS v").column(0)[0].as_py()
             for k in settings}
    for k, v in settings.items():
        frame_reader.execute(conn, f"SELECT set_config({_text(k)}, {_text(v)}, true)")
    table = frame_reader.read_table(conn, query)
    for k, v in saved.items():
        frame_reader.execute(conn, f"SELECT set_config({_text(k)}, {_text(v)}, true)")
    frame = table.to_pandas()
    del table
    for col, typ in dtypes.items():
        if typ in ("int64", "Int64") and frame[col].dtype != typ:
            frame[col] = frame[col].astype(typ)  # nullable ints arrive as float
    post = _POST.get(name)
    return post(frame) if post else frame


def _text(value: str) -> str:
    """A SQL string literal, quoted by psycopg (the reader connections are not psycopg's)."""
    return sql.Literal(value).as_string()


WORK_MEM = "512MB"  # per sort/hash node of the snapshot's queries: each ledger half sorts in memory
# Planner settings for one frame's query, set for it alone (set_config(..., true), put back after it).
# lots_by_user sums every single-lot draw (8.7M ledger rows at 1M users); those rows' columns are all in
# the covering ledger index that the ledger pass has just read, but with the default random_page_cost
# (4, a spinning disk's) the planner read them by a sequential scan of the 2.7 GB heap (6.4-7.1 s)
# instead of an index-only scan of the 0.7 GB index (3.9-4.3 s). Set for every frame, the same setting
# made the identity and ledger reads slower (snapshot 19.6 -> 22.1-23.3 s), hence per frame.
FRAME_SETTINGS: dict[str, dict[str, str]] = {"lots_by_user": {"random_page_cost": "1.1"}}


def _begin(conn: Any, snapshot_id: str | None = None) -> None:
    """Open a reader connection's transaction, on the exported snapshot when one is given."""
    frame_reader.execute(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    if snapshot_id is not None:  # must come before any query of the transaction
        frame_reader.execute(conn, f"SET TRANSACTION SNAPSHOT {_text(snapshot_id)}")
    frame_reader.execute(conn, f"SET LOCAL work_mem = {_text(WORK_MEM)}")
    # the snapshot already reads on `workers` connections at once (one per core here): a parallel plan's
    # extra processes only compete with them (lots_by_user's parallel scan of the ledger took 3x its
    # serial CPU for 1.5x less wall, while the other connection's ledger pass waited)
    frame_reader.execute(conn, "SET LOCAL max_parallel_workers_per_gather = 0")


def take_snapshot(url: str, *, as_of: datetime | None = None, tables: Iterable[str] | None = None,
                  progress: Progress | None = None, workers: int = 2,
                  users: "UserFilter | None" = None, background: Iterable[str] = ()) -> Snapshot:
    """Read the named frames (default: all of SNAPSHOT_TABLES) as of one database moment.

    ``as_of`` cuts the ledger and the failure window at that instant (rows created after it are not
    seen); the other tables hold no history and are read as they are now. ``users`` restricts every
    frame to those users' rows (same queries, one more condition).

    ``background`` names frames that need not be there when this returns: one of the connections reads
    them (same transaction, so the same moment) once the others are read, while the caller goes on, and
    ``Snapshot.table`` waits for them. The audit reads the lifecycle rules' frames this way: they are
    mostly server work (lots_by_user sums every draw per lot), which then runs while the client builds
    the user state on the other core instead of before it.
    """
    names = list(SNAPSHOT_TABLES if tables is None else tables)
    unknown = [n for n in names if n not in _QUERIES and n != "period_grants"]
    if unknown:
        raise InvalidArgument(f"unknown snapshot frame(s): {', '.join(unknown)} (known: {', '.join(SNAPSHOT_TABLES)})")
    if as_of is not None and as_of.tzinfo is None:
        raise InvalidArgument("as_of must be timezone-aware")
    # period_grants is built from the grant and fix rows (grant_ledger)
    wanted = set(names) | ({"grant_ledger"} if "period_grants" in names else set())
    if users is None and wanted & set(_IDENTITY_FRAMES):
        wanted = (wanted - set(_IDENTITY_FRAMES)) | {"identity"}
    later = {n for n in background if n in names and n in _QUERIES
             and n not in (*_IDENTITY_FRAMES, "ledger_by_user", "grant_ledger")}
    ordered = [n for n in _ORDER if n in wanted and n in _QUERIES and n not in later]
    ordered += [n for n in _ORDER if n in later]  # the queue runs in this order: the background ones last
    main = db.connect(url, autocommit=True)  # exports the snapshot and binds the parameters
    conns: list[Any] = []  # the reader connections (frame_reader), one per worker thread
    started = 0  # connections handed to a worker thread (which closes it)
    try:
        main.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snap_id, taken_at = main.execute("SELECT pg_export_snapshot(), now()").fetchone()
        cutoff = as_of or taken_at
        params: dict[str, Any] = {"as_of": cutoff, "ref": cutoff, "iso": _ISO_RE, "uuid": _UUID_RE,
                                  "live": as_of is None}
        if users is not None:
            params["bids"] = sorted(users.bestauth_ids)
            params["uids"] = sorted(users.points_ids | users.bestauth_ids)

        n_workers = max(1, min(workers if users is None else 1, len(ordered)))
        for _ in range(n_workers):
            reader = frame_reader.connect(url)
            conns.append(reader)
            _begin(reader, snap_id)
        binder = psycopg.ClientCursor(main)
        def parts_of(n: str) -> tuple[str | None, ...]:
            return _PARTS.get(n, (None,)) if users is None else (None,)

        queries = {(n, part): _frame_sql(binder, n, params, part) for n in ordered for part in parts_of(n)}
        main.execute("ROLLBACK")  # the readers hold the snapshot now
        main.close()
        snapshot = Snapshot(taken_at=taken_at, as_of=as_of)

        # each worker thread owns one connection and pulls (frame, part) tasks from a shared queue
        import queue

        import pandas as pd

        todo: queue.SimpleQueue[tuple[str, int, str | None]] = queue.SimpleQueue()
        n_parts: dict[str, int] = {}
        for n in ordered:
            if n in later:
                continue
            parts = parts_of(n)
            n_parts[n] = len(parts)
            for i, part in enumerate(parts):
                todo.put((n, i, part))
        # the background frames: on one connection, once the others are read (measured at 1M users: 33 s
        # for the audit against 38 s when they start as soon as a connection is free, and 37 s on both
        # connections: then they slow down the reads the caller waits for, rather than take the core its
        # single-threaded work leaves free)
        later_todo = [(n, 0, None) for n in ordered if n in later]
        lock = threading.Lock()
        results: list[tuple[str, int, Any, float]] = []
        errors: list[BaseException] = []
        core_left = [sum(n_parts.values())]  # reads the caller waits for (n_parts counts only those)
        core_done = threading.Event()
        futures: dict[str, Future[tuple[Any, float]]] = {n: Future() for n in later}
        if not core_left[0]:
            core_done.set()

        def work(conn: Any, first: bool) -> None:
            tail = iter(later_todo if first else ())
            try:
                while not errors:
                    try:
                        name, i, part = todo.get_nowait()
                    except queue.Empty:
                        task = next(tail, None)
                        if task is None:
                            return
                        core_done.wait()
                        if errors:
                            return
                        name, i, part = task
                    t0 = time.perf_counter()
                    try:
                        frame = _read_frame(conn, name, queries[(name, part)])
                    except BaseException as exc:  # noqa: BLE001 -- handed to whoever waits for it
                        if frame_reader.is_connection_error(exc):
                            from ledger.errors import DatabaseUnavailable
                            exc = DatabaseUnavailable(f"snapshot read failed on {db.describe_url(url)}: {exc}")
                        if name in futures:
                            futures[name].set_exception(exc)
                            continue
                        with lock:
                            errors.append(exc)
                        core_done.set()
                        return
                    elapsed = time.perf_counter() - t0
                    log.debug("snapshot frame %s[%d]: %d rows in %.2fs", name, i, len(frame), elapsed)
                    if name in futures:
                        futures[name].set_result((frame, elapsed))
                        if progress:
                            progress(name, len(frame), elapsed)
                        continue
                    with lock:
                        results.append((name, i, frame, elapsed))
                        n_parts[name] -= 1
                        last = n_parts[name] == 0
                        core_left[0] -= 1
                        if core_left[0] == 0:
                            core_done.set()
                    if progress and last:
                        for shown in (_IDENTITY_FRAMES if name == "identity" else (name,)):
                            progress(shown, len(frame), elapsed)
            finally:
                for name, fut in futures.items():  # a worker stopped by an error: nobody reads the rest
                    if errors and not fut.done():
                        fut.set_exception(errors[0])
                _close_reader(conn)

        threads = [threading.Thread(target=work, args=(c, k == 0), name=f"snapshot-{k}", daemon=True)
                   for k, c in enumerate(conns)]
        for t in threads:
            t.start()
            started += 1
        core_done.wait()
        if errors:
            for t in threads:
                t.join()
            raise errors[0]
        snapshot.pending = {n: futures[n] for n in ordered if n in later}
        pieces: dict[str, list[tuple[int, Any]]] = {}
        with lock:  # the worker threads outlive this call (background reads): keep no frame of theirs alive
            done_reads = list(results)
            results.clear()
        for name, i, piece, elapsed in done_reads:
            pieces.setdefault(name, []).append((i, piece))
            snapshot.timings[name] = snapshot.timings.get(name, 0.0) + elapsed
        piece = done_reads = None  # the pieces are referenced from `pieces` only
        for name in list(pieces):
            frames = [f for _, f in sorted(pieces.pop(name), key=lambda x: x[0])]
            snapshot.frames[name] = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
            del frames  # the halves, once concatenated
        if "identity" in snapshot.frames:
            for frame_name, frame in _split_identity(snapshot.frames.pop("identity")).items():
                snapshot.frames[frame_name] = frame
            snapshot.timings.update({n: snapshot.timings.get("identity", 0.0) for n in _IDENTITY_FRAMES})
            from checks.state import release_memory

            release_memory()  # the joined read is gone: hand its memory back before the grants are built
        if "grant_ledger" in snapshot.frames:
            # built here, once the identity read's memory is back, not by the reader thread right after its
            # read: that overlaps the build's temporaries with the identity read's (a higher peak RSS)
            t0 = time.perf_counter()
            snapshot.frames["period_grants"] = _period_grants(snapshot.frames.pop("grant_ledger"))
            # the rows' read and what is built from them
            snapshot.timings["period_grants"] = time.perf_counter() - t0 + snapshot.timings.pop("grant_ledger", 0.0)
            if progress:
                progress("period_grants", len(snapshot.frames["period_grants"]), snapshot.timings["period_grants"])
        snapshot.frames = {n: snapshot.frames[n] for n in names if n not in later}
        snapshot.timings = {n: t for n, t in snapshot.timings.items() if n in names}
        from checks.state import release_memory

        release_memory()  # the read buffers are gone; give their heap back before the joins
        return snapshot
    except Exception as exc:
        if isinstance(exc, psycopg.OperationalError) or frame_reader.is_connection_error(exc):
            from ledger.errors import DatabaseUnavailable
            raise DatabaseUnavailable(f"snapshot read failed on {db.describe_url(url)}: {exc}") from None
        raise
    finally:
        if not main.closed:
            main.close()
        for c in conns[started:]:  # the workers close their own
            _close_reader(c)


def _close_reader(conn: Any) -> None:
    try:
        frame_reader.execute(conn, "ROLLBACK")
    except Exception:  # noqa: BLE001 -- a broken connection is closed all the same
        pass
    conn.close()
