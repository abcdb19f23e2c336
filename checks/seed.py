"""A realistic demo population with planted faults of every audit rule, and healthy look-alikes.

Why it exists: the audit is only believable if it finds every planted fault and flags no healthy user
that merely *looks* odd (a paid user who spent everything, a renewal, a canceled subscription, legacy
metadata). So the population is laid out from *profiles*: each user gets one, chosen deterministically
from (seed, user number), and every profile says exactly what the user's rows look like.

How it is written, and why that way:

- Set-based. The plan (users, periods, ledger events, failed attempts) is built in temporary tables by a
  handful of SQL statements over ``generate_series``; then one statement writes each table. No per-user
  round trips: 2,000 users seed in a few seconds, the benchmark's 1,000,000 in minutes.
- Ledger rows go through ``add_points``/``deduct_points``, in per-user order inside one statement, as the
  app would write them (``mode="functions"``, the default). Faults that the real bug would have written
  past the functions are written past them, as the table owner and within the append-only rule:
  a chain-breaking ledger row is INSERTed directly (never UPDATE/DELETE; the immutability trigger
  stays on), and a drifted balance cache is an UPDATE of ``points_balances``.
- ``mode="bulk"`` writes the very same rows with ``balance_after`` computed by a window sum instead of
  calling the functions once per row, and their credit lots and draws set-based with the per-row lots
  trigger off for that INSERT (the benchmark's 10M rows; the tests check both modes agree, and that the
  set-based lots are the trigger's).
- Deterministic: every choice is a hash of (seed, user number, purpose); ids are md5-derived. The only
  input besides the seed is ``now`` (the periods are laid out around it; pass it to reproduce exactly).
- Safe: seeding refuses a database that already holds users, and a reset refuses a database that holds
  anything but seeded demo users (see ``check_resettable``).

The manifest (which user carries which fault) goes to ``demo_seed_manifest`` (sql/007).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import sql

from ledger import db
from ledger.config import CreditsConfig
from ledger.errors import ConfigError, CreditError

log = logging.getLogger(__name__)

DEMO_EMAIL_DOMAIN = "demo.example.com"
SEED_FORMAT = 4  # bumped whenever the same (seed, users, rate) would generate other data
MAX_SEED = 2**40
_SEED_LOCK = 7_262_011_007  # advisory lock: one seeding at a time per database
RULE_IDS = ("mapping_present", "metadata_resolved", "paid_users_funded", "ledger_integrity",
            "duplicate_grants", "balance_matches_tier", "failed_deductions",
            "expiry_applied", "lots_consistent", "refunds_bounded", "plan_change_grants")


class SeedRefused(CreditError):
    """The target database holds data the seed must not touch (or mix with)."""


# ------------------------------------------------------------------------------------------ profiles


@dataclass(frozen=True)
class Profile:
    """What one user's rows look like. Faults name their rule; look-alikes their category."""

    name: str
    rule: str | None = None          # fault: the audit rule that must find this user
    category: str | None = None      # healthy look-alike category (listed in the manifest)
    weight: float = 0.0              # share among randomly drawn healthy users
    tier: str = "paid"               # free | paid (paid: pro or pro_plus, drawn per user)
    subscription: bool = True        # has a subscriptions_consolidated row
    mapping: bool = True             # has a user_id_mapping row
    status: str = "active"
    period: str = "current"          # current (now inside it) | ended (before now) | trial (14 days)
    prev: tuple[int, int] = (0, 0)   # previous periods, all granted (renewals), drawn in this range
    grant_current: bool = True       # the current period's grant is in the ledger
    metadata: str = "resolved"       # resolved | resolved_legacy | none | legacy_only | wrong_id
    duplicate: bool = False          # current period granted a second time under a webhook-retry key
    spend: bool = True               # generation deductions (and the odd refund) in granted periods
    target: str | None = None        # final balance: zero | below_alloc | below_video
    adjustment: str | None = None    # huge (paid) | free_credits (free user holding credits)
    drift: bool = False              # points_balances no longer equals the ledger
    chain_break: bool = False        # a ledger row whose balance_after does not follow
    fails_recent: str | None = None  # burst (>= threshold in the last hour) | few (1-2)
    fails_old: bool = False          # failed attempts hours ago (outside the audit's hour)
    life: str | None = None          # a credit-lifecycle story (see _LIFECYCLE)

    @property
    def variant(self) -> str:
        return self.name.split("/", 1)[1] if "/" in self.name else self.name


FAULTS: tuple[Profile, ...] = (
    Profile("mapping_present/no_mapping", rule="mapping_present", mapping=False),
    Profile("mapping_present/no_mapping_legacy_meta", rule="mapping_present", mapping=False,
            metadata="legacy_only"),
    Profile("metadata_resolved/missing_key", rule="metadata_resolved", metadata="none"),
    Profile("metadata_resolved/legacy_only", rule="metadata_resolved", metadata="legacy_only"),
    Profile("metadata_resolved/wrong_id", rule="metadata_resolved", metadata="wrong_id"),
    Profile("paid_users_funded/never_granted", rule="paid_users_funded", grant_current=False, spend=False),
    Profile("paid_users_funded/previous_not_current", rule="paid_users_funded", prev=(1, 1),
            grant_current=False),
    Profile("paid_users_funded/trialing_not_granted", rule="paid_users_funded", status="trialing",
            period="trial", grant_current=False, spend=False),
    Profile("ledger_integrity/balance_drift", rule="ledger_integrity", prev=(0, 1), drift=True),
    Profile("ledger_integrity/chain_break", rule="ledger_integrity", chain_break=True),
    Profile("duplicate_grants/retry_key", rule="duplicate_grants", duplicate=True),
    Profile("duplicate_grants/retry_key_spent", rule="duplicate_grants", duplicate=True, target="below_alloc"),
    Profile("balance_matches_tier/huge_paid_balance", rule="balance_matches_tier", adjustment="huge"),
    Profile("balance_matches_tier/free_with_credits", rule="balance_matches_tier", tier="free", spend=False,
            adjustment="free_credits"),
    Profile("failed_deductions/burst", rule="failed_deductions", target="below_video", fails_recent="burst"),
    Profile("expiry_applied/expired_top_up", rule="expiry_applied", life="expired_top_up"),
    Profile("lots_consistent/lot_drift", rule="lots_consistent", life="lot_drift"),
    Profile("refunds_bounded/refunded_twice", rule="refunds_bounded", life="refunded_twice"),
    Profile("plan_change_grants/upgrade_without_grant", rule="plan_change_grants", life="upgrade_without_grant"),
)

HEALTHY: tuple[Profile, ...] = (
    Profile("no_subscription", category="no_subscription", weight=0.10, tier="free", subscription=False,
            spend=False),
    Profile("free", category="free", weight=0.33, tier="free", spend=False),
    Profile("paid_new", weight=0.16),
    Profile("renewed", category="renewed", weight=0.16, prev=(1, 2)),
    Profile("spent_all", category="spent_all", weight=0.04, prev=(0, 1), target="zero"),
    Profile("legacy_metadata", category="legacy_metadata", weight=0.04, prev=(0, 1), metadata="resolved_legacy"),
    Profile("trialing", category="trialing", weight=0.03, status="trialing", period="trial"),
    Profile("past_due", category="past_due", weight=0.03, status="past_due", prev=(1, 1), grant_current=False),
    Profile("canceled_ended", category="canceled", weight=0.03, status="canceled", period="ended", prev=(0, 1)),
    Profile("canceled_unpaid", category="canceled", weight=0.03, status="canceled", prev=(1, 1),
            grant_current=False),
    Profile("expired", category="expired", weight=0.03, status="expired", period="ended"),
    Profile("few_failed_deductions", category="few_failed_deductions", weight=0.005, target="below_video",
            fails_recent="few", fails_old=True),
    Profile("old_failed_deductions", weight=0.015, fails_old=True),
    Profile("rolled_over", category="rolled_over", weight=0.01, prev=(1, 1), life="rolled_over"),
    Profile("downgrade_pending", category="downgrade_pending", weight=0.01, life="downgrade_pending"),
    Profile("partial_refund", category="partial_refund", weight=0.01, life="partial_refund"),
    Profile("top_up_future", category="top_up_future", weight=0.01, life="top_up_future"),
    Profile("held_past_expiry", category="held_past_expiry", weight=0.005, target="zero", life="held_past_expiry"),
)


def _profile_rows(fault_rate: float) -> list[dict[str, Any]]:
    """The profiles as rows for the plan's temporary table, with forced positions and weight ranges.

    Users 1..k are *forced*: one per fault profile (when faults are on), then one per healthy profile, so
    even a tiny population carries every fault and every look-alike. The rest are drawn.
    """
    rows: list[dict[str, Any]] = []
    order = 0
    total = sum(p.weight for p in HEALTHY)
    cum = 0.0
    for idx, p in enumerate(FAULTS + HEALTHY):
        is_fault = p.rule is not None
        forced = None
        if not is_fault or fault_rate > 0:
            order += 1
            forced = order
        lo = hi = None
        if not is_fault:
            lo = cum
            cum += p.weight / total
            hi = cum
        row = {f.name: getattr(p, f.name) for f in fields(Profile)}
        row.update(id=idx, variant=p.variant, kind="fault" if is_fault else "healthy", forced_order=forced,
                   fault_index=idx if is_fault else None, cum_lo=lo, cum_hi=hi,
                   prev_lo=p.prev[0], prev_hi=p.prev[1])
        del row["prev"]
        rows.append(row)
    rows[-1]["cum_hi"] = 1.0 + 1e-9  # the last healthy profile takes the rounding remainder
    return rows


# ------------------------------------------------------------------------------------------ manifest


@dataclass
class SeedManifest:
    """Who carries which planted fault, and which healthy users were planted to look suspicious."""

    users: int
    faults: dict[str, list[str]]                   # rule id -> BestAuth user ids injected with it
    healthy_lookalikes: dict[str, list[str]]       # category -> BestAuth user ids (must not be flagged)
    variants: dict[str, str] = field(default_factory=dict)  # BestAuth id -> fault variant
    stats: dict[str, Any] = field(default_factory=dict)     # rows written, seconds

    @property
    def faulted(self) -> set[str]:
        return {uid for ids in self.faults.values() for uid in ids}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_manifest(conn: psycopg.Connection) -> SeedManifest:
    """The manifest as stored by the last seeding of this database."""
    faults: dict[str, list[str]] = defaultdict(list)
    variants: dict[str, str] = {}
    for rule, bid, variant in conn.execute(
            "SELECT rule, bestauth_user_id::text, variant FROM public.demo_seed_manifest ORDER BY rule, 2"):
        faults[rule].append(bid)
        variants[bid] = variant
    looks: dict[str, list[str]] = defaultdict(list)
    for cat, bid in conn.execute(
            "SELECT category, bestauth_user_id::text FROM public.demo_seed_lookalikes ORDER BY 1, 2"):
        looks[cat].append(bid)
    users = conn.execute("SELECT count(*) FROM public.bestauth_users").fetchone()[0]
    return SeedManifest(int(users), dict(faults), dict(looks), variants)


# ------------------------------------------------------------------------------------------ the plan

_HELPERS = """
CREATE FUNCTION pg_temp.sr(p_seed bigint, p_i bigint, p_tag integer) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- one hash function per (seed, purpose): hashes of adjacent inputs under one seed are correlated
    -- (a user's fault draw skewed its variant draw), hashes under different seeds are not
    SELECT ((hashint8extended(p_i, p_seed * 1000003 + p_tag) >> 11) & 9007199254740991)::double precision
           / 9007199254740992.0
$$;
CREATE FUNCTION pg_temp.suuid(p_seed bigint, p_tag text, p_i bigint, p_j bigint DEFAULT 0) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT md5(p_seed::text || ':' || p_tag || ':' || p_i::text || ':' || p_j::text)::uuid
$$;
CREATE FUNCTION pg_temp.iso(p_ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(p_ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')
$$;
"""

_PROFILE_COLUMNS = ("id", "name", "kind", "rule", "variant", "category", "forced_order", "fault_index",
                    "cum_lo", "cum_hi", "tier", "subscription", "mapping", "status", "period", "prev_lo",
                    "prev_hi", "grant_current", "metadata", "duplicate", "spend", "target", "adjustment",
                    "drift", "chain_break", "fails_recent", "fails_old", "life")

_PROFILES_TABLE = """
CREATE TEMP TABLE seed_profiles (
    id integer PRIMARY KEY, name text, kind text, rule text, variant text, category text,
    forced_order integer, fault_index integer, cum_lo double precision, cum_hi double precision,
    tier text, subscription boolean, mapping boolean, status text, period text, prev_lo integer,
    prev_hi integer, grant_current boolean, metadata text, duplicate boolean, spend boolean, target text,
    adjustment text, drift boolean, chain_break boolean, fails_recent text, fails_old boolean, life text
) ON COMMIT DROP
"""

# One row per user: the profile drawn for it and every per-user random choice.
_USERS = """
CREATE TEMP TABLE seed_users ON COMMIT DROP AS
WITH draw AS (
    SELECT g.i, pg_temp.sr(%(seed)s, g.i, 1) AS r_fault, pg_temp.sr(%(seed)s, g.i, 2) AS r_variant,
           pg_temp.sr(%(seed)s, g.i, 3) AS r_profile
      FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g(i)
), chosen AS (
    SELECT d.i, p.*
      FROM draw d
      JOIN seed_profiles p ON CASE
               WHEN d.i <= %(n_forced)s THEN p.forced_order = d.i
               WHEN d.r_fault < %(rate)s THEN p.fault_index = floor(d.r_variant * %(n_faults)s)::integer
               ELSE p.kind = 'healthy' AND d.r_profile >= p.cum_lo AND d.r_profile < p.cum_hi
           END
), typed AS (
    SELECT c.*,
           CASE WHEN c.tier = 'free' THEN 'free'
                WHEN c.life = 'upgrade_without_grant' THEN 'pro'
                WHEN c.life = 'downgrade_pending' THEN 'pro_plus'
                WHEN pg_temp.sr(%(seed)s, c.i, 4) < 0.7 THEN 'pro' ELSE 'pro_plus' END AS plan_tier,
           CASE WHEN c.tier = 'free' THEN NULL
                WHEN c.period = 'trial' OR pg_temp.sr(%(seed)s, c.i, 5) < 0.8 THEN 'monthly'
                ELSE 'yearly' END AS cycle,
           c.prev_lo + floor(pg_temp.sr(%(seed)s, c.i, 6) * (c.prev_hi - c.prev_lo + 1))::integer AS prev_periods,
           pg_temp.sr(%(seed)s, c.i, 7) AS r_offset,
           floor(pg_temp.sr(%(seed)s, c.i, 8) * 24)::integer AS hour,
           date_trunc('day', %(anchor)s::timestamptz, 'UTC') AS day0
      FROM chosen c
), timed AS (
    SELECT t.*,
           CASE WHEN t.period = 'trial' THEN interval '14 days'
                WHEN t.cycle = 'yearly' THEN interval '1 year' ELSE interval '1 month' END AS len,
           CASE WHEN t.period = 'trial' THEN floor(t.r_offset * 13)::integer
                WHEN t.period = 'ended' THEN floor(t.r_offset * 40)::integer
                WHEN t.cycle = 'yearly' THEN floor(t.r_offset * 361)::integer
                ELSE floor(t.r_offset * 27)::integer END AS offset_days
      FROM typed t
)
SELECT x.i, x.id AS profile_id, x.name AS profile, x.kind, x.rule, x.variant, x.category,
       x.plan_tier AS tier, x.cycle, x.status, x.subscription AS has_sub, x.mapping AS has_mapping,
       x.grant_current, x.metadata AS meta_kind, x.duplicate, x.spend, x.target, x.adjustment, x.drift,
       x.chain_break, x.fails_recent, x.fails_old, x.life,
       CASE WHEN x.plan_tier = 'free' THEN 0 ELSE x.prev_periods END AS prev_periods,
       x.len,
       pg_temp.suuid(%(seed)s, 'bestauth', x.i) AS bid,
       pg_temp.suuid(%(seed)s, 'points', x.i) AS pid,
       pg_temp.suuid(%(seed)s, 'subscription', x.i) AS sub_id,
       'user' || lpad(x.i::text, 7, '0') || '@' || %(domain)s AS email,
       x.day0 - (45 + floor(pg_temp.sr(%(seed)s, x.i, 9) * 700)::integer) * interval '1 day'
           + floor(pg_temp.sr(%(seed)s, x.i, 10) * 86400)::integer * interval '1 second' AS user_created_at,
       CASE WHEN x.plan_tier = 'free' THEN NULL
            WHEN x.period = 'ended' THEN x.day0 - (x.offset_days + 2) * interval '1 day' - x.len
                                         + x.hour * interval '1 hour'
            ELSE x.day0 - (x.offset_days + 1) * interval '1 day' + x.hour * interval '1 hour' END AS cur_start,
       CASE x.plan_tier WHEN 'pro' THEN CASE x.cycle WHEN 'yearly' THEN %(pro_y)s ELSE %(pro_m)s END
                        WHEN 'pro_plus' THEN CASE x.cycle WHEN 'yearly' THEN %(plus_y)s ELSE %(plus_m)s END
                        ELSE 0 END::bigint AS alloc,
       pg_temp.sr(%(seed)s, x.i, 11) AS r_meta,
       pg_temp.sr(%(seed)s, x.i, 12) AS r_refund,
       pg_temp.sr(%(seed)s, x.i, 13) AS r_misc
  FROM timed x
"""

# A user signs up before their first billing period starts.
_SIGNUP_BEFORE_FIRST_PERIOD = """
UPDATE seed_users
   SET user_created_at = LEAST(user_created_at, cur_start - len * prev_periods - interval '1 day')
 WHERE cur_start IS NOT NULL
"""

# Every period of every paid subscription up to the current one (k periods back; phase 0 = oldest).
_PERIODS = """
CREATE TEMP TABLE seed_periods ON COMMIT DROP AS
SELECT u.i, k.k, u.prev_periods - k.k AS phase,
       u.cur_start - u.len * k.k AS p_start,
       u.cur_start - u.len * (k.k - 1) AS p_end,
       (k.k > 0 OR u.grant_current) AS granted
  FROM seed_users u
 CROSS JOIN LATERAL generate_series(u.prev_periods, 0, -1) AS k(k)
 WHERE u.has_sub AND u.tier <> 'free'
"""

_EVENTS_TABLE = """
CREATE TEMP TABLE seed_events (
    i bigint NOT NULL, seq integer NOT NULL, user_id uuid NOT NULL, amount bigint NOT NULL,
    transaction_type text NOT NULL, description text, idempotency_key text NOT NULL, metadata jsonb NOT NULL,
    raw_offset bigint NOT NULL DEFAULT 0,   -- <> 0: written past the functions, balance_after off by this
    stage smallint NOT NULL DEFAULT 1       -- 1 functions, 2 direct rows, 3 functions after those
) ON COMMIT DROP
"""

# Period grants (the webhook's key and metadata) and the webhook-retry duplicates.
_GRANTS = """
INSERT INTO seed_events (i, seq, user_id, amount, transaction_type, description, idempotency_key, metadata)
SELECT p.i, p.phase * 1000 + d.dup, u.pid, u.alloc, 'subscription_grant',
       u.tier || ' ' || u.cycle || ' credits',
       CASE WHEN d.dup = 0 THEN public.subscription_grant_key(u.sub_id, p.p_start)
            ELSE 'stripe_webhook:evt_' || left(md5(%(seed)s::text || ':retry:' || p.i), 24) END,
       jsonb_build_object('subscription_id', u.sub_id, 'bestauth_user_id', u.bid, 'tier', u.tier,
                          'billing_cycle', u.cycle, 'period_start', pg_temp.iso(p.p_start),
                          'period_end', pg_temp.iso(p.p_end),
                          'event_id', 'evt_' || left(md5(%(seed)s::text || ':evt:' || p.i || ':' || p.k
                                                         || ':' || d.dup), 24))
       || CASE WHEN u.life = 'rolled_over' AND p.k = 1
               THEN jsonb_build_object('lot', jsonb_build_object(
                        'expires_at', pg_temp.iso(p.p_end), 'rollover_cap', u.alloc,
                        'rollover_until', pg_temp.iso(p.p_end + u.len)))
               ELSE '{}'::jsonb END
  FROM seed_periods p
  JOIN seed_users u USING (i)
 CROSS JOIN LATERAL (SELECT 0 AS dup UNION ALL SELECT 1 WHERE u.duplicate AND p.k = 0) d
 WHERE p.granted
"""

# Generations paid from each granted period: a few to a dozen, images mostly, within a budget of
# 15-90% of one period's grant (so no deduction can fail and no healthy balance grows past its tier).
_DEDUCTIONS = """
INSERT INTO seed_events (i, seq, user_id, amount, transaction_type, description, idempotency_key, metadata)
WITH cand AS (
    SELECT p.i, p.phase, j.j, u.pid,
           CASE WHEN pg_temp.sr(%(seed)s, p.i, 100 + p.phase * 50 + j.j) < 0.2 THEN 'video' ELSE 'image' END AS kind,
           floor(u.alloc * (0.15 + 0.75 * pg_temp.sr(%(seed)s, p.i, 20 + p.phase)) / %(image)s)::bigint
               * %(image)s AS budget
      FROM seed_periods p
      JOIN seed_users u USING (i)
     CROSS JOIN LATERAL generate_series(0, 2 + floor(pg_temp.sr(%(seed)s, p.i, 30 + p.phase) * 17)::integer) AS j(j)
     WHERE p.granted AND u.spend
), priced AS (
    SELECT c.*, CASE c.kind WHEN 'video' THEN %(video)s ELSE %(image)s END::bigint AS cost FROM cand c
), running AS (
    SELECT r.*, sum(r.cost) OVER (PARTITION BY r.i, r.phase ORDER BY r.j) AS spent FROM priced r
)
SELECT r.i, r.phase * 1000 + 10 + 2 * r.j, r.pid, -r.cost, 'generation_deduction', r.kind || ' generation',
       'generation:job_' || pg_temp.suuid(%(seed)s, 'job', r.i, r.phase * 100 + r.j)::text,
       jsonb_build_object('job_id', 'job_' || pg_temp.suuid(%(seed)s, 'job', r.i, r.phase * 100 + r.j)::text,
                          'kind', r.kind)
  FROM running r
 WHERE r.spent <= r.budget
"""

# A failed generation refunded: the first job of the current period, for about one spender in seven.
_REFUNDS = """
INSERT INTO seed_events (i, seq, user_id, amount, transaction_type, description, idempotency_key, metadata)
SELECT e.i, e.seq + 1, e.user_id, -e.amount, 'refund', 'refund: ' || e.description,
       'refund:' || e.idempotency_key,
       jsonb_build_object('job_id', e.metadata ->> 'job_id', 'refund_of', e.idempotency_key,
                          'reason', 'generation failed')
  FROM seed_events e
  JOIN seed_users u USING (i)
 WHERE e.transaction_type = 'generation_deduction' AND e.seq = u.prev_periods * 1000 + 10
   AND u.r_refund < 0.15 AND u.life IS NULL
"""

# Support adjustments: the implausible ones (a typo'd goodwill credit; credits given to a free user).
_ADJUSTMENTS = """
INSERT INTO seed_events (i, seq, user_id, amount, transaction_type, description, idempotency_key, metadata)
SELECT u.i, u.prev_periods * 1000 + 900, u.pid,
       CASE u.adjustment WHEN 'huge' THEN u.alloc * (%(plausible)s + 7) ELSE %(free_max)s + 500 END,
       'adjustment', 'goodwill credit (support)',
       'support:' || pg_temp.suuid(%(seed)s, 'support', u.i)::text,
       jsonb_build_object('via', 'support console', 'ticket', 'T-' || (10000 + u.i))
  FROM seed_users u
 WHERE u.adjustment IS NOT NULL
"""

# A legacy admin script that wrote a ledger row itself, with a stale balance_after (off by 30) while
# keeping the cache in step; the next generation, written by deduct_points, follows the cache.
_CHAIN_BREAK = """
INSERT INTO seed_events (i, seq, user_id, amount, transaction_type, description, idempotency_key, metadata,
                         raw_offset, stage)
SELECT u.i, u.prev_periods * 1000 + s.seq, u.pid, s.amount, s.type, s.description,
       s.prefix || pg_temp.suuid(%(seed)s, 'chain', u.i, s.seq)::text, s.metadata, s.raw_offset, s.stage
  FROM seed_users u
 CROSS JOIN (VALUES
     (950, 50::bigint, 'adjustment', 'manual correction (legacy admin script)', 'legacy_admin:',
      '{"via": "legacy_admin_script"}'::jsonb, 30::bigint, 2::smallint),
     (960, -%(image)s::bigint, 'generation_deduction', 'image generation', 'generation:job_',
      '{"kind": "image"}'::jsonb, 0::bigint, 3::smallint)
 ) AS s(seq, amount, type, description, prefix, metadata, raw_offset, stage)
 WHERE u.chain_break
"""

# Users whose story ends at a given balance: spent everything, spent a duplicate grant, or ran out
# just before a burst of video attempts. One last deduction brings them there.
_TARGETS = """
INSERT INTO seed_events (i, seq, user_id, amount, transaction_type, description, idempotency_key, metadata)
SELECT u.i, u.prev_periods * 1000 + 990, u.pid, -(coalesce(s.total, 0) - t.target), 'generation_deduction',
       'batch generation', 'generation:job_' || pg_temp.suuid(%(seed)s, 'target', u.i)::text,
       jsonb_build_object('job_id', 'job_' || pg_temp.suuid(%(seed)s, 'target', u.i)::text, 'kind', 'batch')
  FROM seed_users u
  LEFT JOIN (SELECT e.i, sum(e.amount) AS total FROM seed_events e GROUP BY e.i) s USING (i)
 CROSS JOIN LATERAL (SELECT CASE u.target WHEN 'zero' THEN 0
                                          WHEN 'below_alloc' THEN (u.alloc * 3 / 10 / %(image)s) * %(image)s
                                          ELSE (%(video)s * 2 / 5 / %(image)s) * %(image)s END::bigint AS target) t
 WHERE u.target IS NOT NULL AND coalesce(s.total, 0) > t.target
"""

# Failed deduction attempts: a burst in the last hour (fault), one or two (look-alike), or hours ago.
_FAILURES = """
CREATE TEMP TABLE seed_failures ON COMMIT DROP AS
SELECT u.i, u.pid AS user_id, %(video)s::bigint AS amount,
       'generation:job_' || pg_temp.suuid(%(seed)s, 'failed', u.i, n.n)::text AS idempotency_key,
       n.recent, n.n
  FROM seed_users u
 CROSS JOIN LATERAL (
     SELECT true AS recent, g AS n
       FROM generate_series(1, CASE u.fails_recent
                                   WHEN 'burst' THEN %(threshold)s + 3 + floor(u.r_misc * 8)::integer
                                   WHEN 'few' THEN 1 + floor(u.r_misc * 2)::integer ELSE 0 END) g
     UNION ALL
     SELECT false, 100 + g FROM generate_series(1, CASE WHEN u.fails_old THEN 2 + floor(u.r_misc * 5)::integer
                                                        ELSE 0 END) g
 ) n
"""

_WRITE_USERS = ("""
INSERT INTO public.bestauth_users (id, email, created_at)
SELECT bid, email, user_created_at FROM seed_users ORDER BY i
""", """
INSERT INTO public.user_id_mapping (bestauth_user_id, supabase_user_id, created_at)
SELECT bid, pid, user_created_at FROM seed_users WHERE has_mapping ORDER BY i
""", """
INSERT INTO public.subscriptions_consolidated
    (id, user_id, tier, billing_cycle, status, current_period_start, current_period_end, metadata,
     created_at, updated_at)
SELECT u.sub_id, u.bid, u.tier, u.cycle, u.status, u.cur_start, u.cur_start + u.len,
       CASE u.meta_kind
           WHEN 'resolved' THEN jsonb_build_object('resolved_supabase_user_id', u.pid)
           WHEN 'resolved_legacy' THEN jsonb_build_object('resolved_supabase_user_id', u.pid,
                   CASE WHEN u.r_meta < 0.5 THEN 'supabase_user_id' ELSE 'original_userId' END, u.pid)
           WHEN 'legacy_only' THEN jsonb_build_object(
                   CASE WHEN u.r_meta < 0.5 THEN 'supabase_user_id' ELSE 'original_userId' END, u.pid)
           WHEN 'wrong_id' THEN jsonb_build_object('resolved_supabase_user_id',
                                                   pg_temp.suuid(%(seed)s, 'wrong', u.i))
           ELSE '{}'::jsonb END
       || CASE WHEN u.tier = 'free' THEN '{}'::jsonb
               ELSE jsonb_build_object('stripe_subscription_id', 'sub_' || left(md5(%(seed)s::text || ':stripe:' || u.i), 14))
          END,
       coalesce(f.first_start, u.user_created_at),
       coalesce(u.cur_start, u.user_created_at)
  FROM seed_users u
  LEFT JOIN (SELECT p.i, min(p.p_start) AS first_start FROM seed_periods p GROUP BY p.i) f USING (i)
 WHERE u.has_sub
 ORDER BY u.i
""")

# The app's path: every ledger row of a stage through add_points/deduct_points, in per-user order,
# in one statement (the ORDER BY'd subquery feeds the calls one by one; CASE calls one function).
_APPLY_FUNCTIONS = """
SELECT count(*) AS calls,
       count(*) FILTER (WHERE w.tx IS NOT NULL) AS written
  FROM (SELECT CASE WHEN e.amount > 0
                    THEN (SELECT a.transaction_id FROM public.add_points(e.user_id, e.amount, e.transaction_type,
                              e.description, e.idempotency_key, e.metadata) a WHERE NOT a.duplicate)
                    ELSE (SELECT d.transaction_id FROM public.deduct_points(e.user_id, -e.amount,
                              e.transaction_type, e.description, e.idempotency_key, e.metadata) d
                           WHERE NOT d.duplicate)
               END AS tx
          FROM (SELECT * FROM seed_events WHERE stage = %(stage)s ORDER BY i, seq) e) w
"""

# The bug's path: rows written past the functions (as the owner; INSERT only), cache kept in step.
_APPLY_RAW = """
WITH prior AS (
    SELECT e.*, b.balance AS before
      FROM seed_events e JOIN public.points_balances b ON b.user_id = e.user_id
     WHERE e.stage = 2
), ins AS (
    INSERT INTO public.points_transactions
        (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata)
    SELECT p.user_id, p.amount, p.before + p.amount + p.raw_offset, p.transaction_type, p.description,
           p.idempotency_key, p.metadata
      FROM prior p ORDER BY p.i, p.seq
    RETURNING user_id, amount
)
UPDATE public.points_balances b
   SET balance = b.balance + s.amount,
       lifetime_earned = b.lifetime_earned + greatest(s.amount, 0),
       lifetime_spent = b.lifetime_spent + greatest(-s.amount, 0),
       updated_at = now()
  FROM (SELECT user_id, sum(amount) AS amount FROM ins GROUP BY user_id) s
 WHERE b.user_id = s.user_id
"""

# Bulk: the same rows, balance_after from a running sum (plus the planted offset on direct rows).
# Written in time order across users (a user's n-th event after everyone's earlier ones), as a real
# ledger is laid out on disk: one user's rows are scattered, not adjacent (which would flatter any
# per-user read). Ids still increase along each user's own sequence, so the chain order holds.
#
# The credit lots (sql/011) are built set-based beside them, not by the per-row lots trigger (which
# made 10M rows take hours): the ids are drawn from the ledger's sequence first (in that time order), so
# every positive row's lot and every draw can be computed before the rows are written. Draws follow the
# trigger's consumption order (priority, then soonest expiry, none last, then oldest); the bulk plan's
# lots are consumed in grant order (checked below), where that order makes a user's draws a cumulative
# interval match: draw j covers [D_j - d_j, D_j) of the user's drawn credits, lot k the interval
# [C_k - g_k, C_k) of the granted ones, and the overlap is what j took from k. A draw on one lot carries
# it in its own lot_id (as deduct_points' fast path writes it), a draw on several has consumption rows.
# The lots trigger is off for this one INSERT (see _bulk_insert_ledger); tests compare the result with
# the trigger's on the same plan (bulk_lots="trigger") and with the function path.
_BULK_LEDGER = """
CREATE TEMP TABLE seed_ledger ON COMMIT DROP AS
SELECT nextval(%(id_seq)s::regclass) AS id, x.*
  FROM (SELECT e.i, e.seq, e.user_id, e.amount, e.transaction_type, e.description, e.idempotency_key,
               e.metadata, sum(e.amount) OVER (PARTITION BY e.i ORDER BY e.seq) + e.raw_offset AS balance_after
          FROM seed_events e ORDER BY e.seq, e.i) x
"""

# every positive row is a lot, with the trigger's terms (points_lot_terms, sql/017: the same function)
_BULK_LOTS = """
CREATE TEMP TABLE seed_lots ON COMMIT DROP AS
SELECT t.*, sum(t.granted) OVER w AS c_end, row_number() OVER w AS by_order,
       row_number() OVER (PARTITION BY t.user_id ORDER BY t.id) AS by_id
  FROM (SELECT l.id, l.user_id, l.transaction_type AS source_type, l.amount AS granted,
               x.priority, x.expires_at, x.rollover_cap, x.rollover_until
          FROM seed_ledger l
         CROSS JOIN LATERAL public.points_lot_terms(l.metadata -> 'lot') x
         WHERE l.amount > 0) t
WINDOW w AS (PARTITION BY t.user_id ORDER BY t.priority, t.expires_at, t.id)
"""

# per user in ledger order: drawn so far (d_end), the running sum (what the lots written so far still
# hold after this row), and what the interval match cannot stand for
_BULK_WALK = """
CREATE TEMP TABLE seed_walk ON COMMIT DROP AS
SELECT l.id, l.user_id, l.amount, sum(greatest(-l.amount, 0)) OVER w AS d_end, sum(l.amount) OVER w AS run,
       coalesce(l.seq < lag(l.seq) OVER w, false) AS out_of_order,
       (l.amount > 0 AND l.transaction_type = 'refund' AND jsonb_typeof(l.metadata -> 'refund_of') = 'number')
       OR (l.amount < 0 AND l.transaction_type = 'expiry' AND jsonb_typeof(l.metadata -> 'lot_id') = 'number')
           AS targeted
  FROM seed_ledger l
WINDOW w AS (PARTITION BY l.user_id ORDER BY l.id)
"""

_BULK_CHECK = """
SELECT (SELECT count(*) FROM seed_walk WHERE out_of_order) AS out_of_order,
       (SELECT count(*) FROM seed_walk WHERE targeted) AS targeted,
       (SELECT count(*) FROM seed_walk WHERE amount < 0 AND run < 0) AS uncovered,
       (SELECT count(*) FROM seed_lots WHERE by_order <> by_id) AS reordered
"""

_BULK_DRAWS = """
CREATE TEMP TABLE seed_draw_lots ON COMMIT DROP AS
SELECT w.id AS transaction_id, o.id AS lot_id, w.user_id,
       least(w.d_end, o.c_end) - greatest(w.d_end + w.amount, o.c_end - o.granted) AS amount,
       count(*) OVER (PARTITION BY w.id) AS lots
  FROM seed_walk w
  JOIN seed_lots o ON o.user_id = w.user_id AND o.c_end > w.d_end + w.amount AND o.c_end - o.granted < w.d_end
 WHERE w.amount < 0
"""

_BULK_INSERT_LEDGER = """
INSERT INTO public.points_transactions
    (id, user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata, lot_id)
OVERRIDING SYSTEM VALUE
SELECT l.id, l.user_id, l.amount, l.balance_after, l.transaction_type, l.description, l.idempotency_key,
       l.metadata, d.lot_id
  FROM seed_ledger l
  LEFT JOIN seed_draw_lots d ON d.transaction_id = l.id AND d.lots = 1
 ORDER BY l.id
"""

_BULK_INSERT_LOTS = """
INSERT INTO public.points_lots (id, user_id, source_type, granted, remaining, spent, priority, expires_at,
                                rollover_cap, rollover_until, created_at)
SELECT o.id, o.user_id, o.source_type, o.granted, o.granted - coalesce(d.drawn, 0),
       o.granted = coalesce(d.drawn, 0), o.priority, o.expires_at, o.rollover_cap, o.rollover_until, now()
  FROM seed_lots o
  LEFT JOIN (SELECT x.lot_id, sum(x.amount) AS drawn FROM seed_draw_lots x GROUP BY x.lot_id) d ON d.lot_id = o.id
 ORDER BY o.id;
INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
SELECT d.transaction_id, d.lot_id, d.user_id, d.amount, now()
  FROM seed_draw_lots d WHERE d.lots > 1
 ORDER BY d.transaction_id, d.lot_id;
INSERT INTO public.points_balances (user_id, balance, lifetime_earned, lifetime_spent, next_expiry)
SELECT e.user_id, sum(e.amount),
       coalesce(sum(e.amount) FILTER (WHERE e.amount > 0), 0),
       coalesce(-sum(e.amount) FILTER (WHERE e.amount < 0), 0),
       min(x.next_expiry)
  FROM seed_events e
  LEFT JOIN (SELECT l.user_id, min(l.expires_at) AS next_expiry
               FROM seed_lots o JOIN public.points_lots l ON l.id = o.id
              WHERE o.expires_at IS NOT NULL AND l.remaining > 0
              GROUP BY l.user_id) x ON x.user_id = e.user_id
 GROUP BY e.user_id;
"""

# The test oracle for the above: the same rows in the same order with the lots trigger on (per row).
_APPLY_BULK_TRIGGER = """
INSERT INTO public.points_transactions
    (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata)
SELECT x.user_id, x.amount, x.balance_after, x.transaction_type, x.description, x.idempotency_key, x.metadata
  FROM (SELECT e.*, sum(e.amount) OVER (PARTITION BY e.i ORDER BY e.seq) + e.raw_offset AS balance_after
          FROM seed_events e) x
 ORDER BY x.seq, x.i;
INSERT INTO public.points_balances (user_id, balance, lifetime_earned, lifetime_spent)
SELECT e.user_id, sum(e.amount),
       coalesce(sum(e.amount) FILTER (WHERE e.amount > 0), 0),
       coalesce(-sum(e.amount) FILTER (WHERE e.amount < 0), 0)
  FROM seed_events e
 GROUP BY e.user_id;
"""

_LOTS_TRIGGER = "points_transactions_lots"


def _apply_bulk(conn: psycopg.Connection, cur: psycopg.Cursor) -> None:
    """The plan's ledger rows, their lots and draws, and the balances, set-based (see _BULK_LEDGER)."""
    id_seq = cur.execute("SELECT pg_get_serial_sequence('public.points_transactions', 'id')").fetchone()[0]
    cur.execute(_BULK_LEDGER, {"id_seq": id_seq})
    for stmt in (_BULK_LOTS, _BULK_WALK):
        cur.execute(stmt)
    out_of_order, targeted, uncovered, reordered = cur.execute(_BULK_CHECK).fetchone()
    if out_of_order or targeted or uncovered or reordered:
        # the interval match would not be what the trigger writes: refuse rather than write other lots
        raise CreditError(
            "bulk seed: the lots cannot be built set-based for this plan (rows out of per-user order: "
            f"{out_of_order}, refunds/expiry naming their lot: {targeted}, draws beyond the lots written before "
            f"them: {uncovered}, lots not consumed in grant order: {reordered}); use mode='functions'")
    cur.execute(_BULK_DRAWS)
    _bulk_insert_ledger(conn, cur)
    cur.execute(_BULK_INSERT_LOTS)
    cur.execute("DROP TABLE seed_draw_lots, seed_walk, seed_lots, seed_ledger")


def _bulk_insert_ledger(conn: psycopg.Connection, cur: psycopg.Cursor) -> None:
    """INSERT the ledger rows with the lots trigger off (their lots are written next, in this transaction).

    ``session_replication_role = replica`` skips the trigger for this session only, so chunks written by
    parallel connections do not wait for each other; it needs a superuser (or the SET privilege), and it
    would skip every trigger, so it is used only while the lots trigger is the table's only INSERT
    trigger. Otherwise ``ALTER TABLE ... DISABLE TRIGGER`` (the owner may), which holds a lock that makes
    other writers of the ledger wait until this transaction ends. Both end with the transaction's own
    scope: the trigger is back on before anyone else can write.
    """
    others = [r[0] for r in cur.execute(
        """SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.points_transactions'::regclass
            AND tgenabled <> 'D' AND (tgtype & 4) <> 0 AND tgname <> %s""", (_LOTS_TRIGGER,)).fetchall()]
    role = cur.execute("SELECT current_setting('session_replication_role')").fetchone()[0]
    if not others:
        try:
            with conn.transaction():
                cur.execute("SELECT set_config('session_replication_role', 'replica', true)")
        except psycopg.errors.InsufficientPrivilege:
            pass
        else:
            cur.execute(_BULK_INSERT_LEDGER)
            cur.execute("SELECT set_config('session_replication_role', %s, true)", (role,))
            return
    table = sql.Identifier("public", "points_transactions")
    cur.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(table, sql.Identifier(_LOTS_TRIGGER)))
    cur.execute(_BULK_INSERT_LEDGER)
    cur.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER {}").format(table, sql.Identifier(_LOTS_TRIGGER)))


# The drifted cache: the balance moved without a ledger row (+70 or -30; lifetime totals untouched).
_DRIFT = """
UPDATE public.points_balances b
   SET balance = b.balance + CASE WHEN u.r_misc < 0.5 OR b.balance < 30 THEN 70 ELSE -30 END
  FROM seed_users u
 WHERE u.drift AND b.user_id = u.pid
"""

_FAILURES_RECENT_FUNCTIONS = """
SELECT count(public.record_failed_deduction(f.user_id, f.amount, 'insufficient_credits', f.idempotency_key))
  FROM (SELECT * FROM seed_failures WHERE recent ORDER BY i, n) f
"""

# Old attempts (and, in bulk mode, the recent ones too): backdated rows, which only a direct insert can
# write (record_failed_deduction stamps now()). This table is a log, not the ledger.
_FAILURES_DIRECT = """
INSERT INTO public.points_deduction_failures (user_id, amount, balance, reason, idempotency_key, created_at)
SELECT f.user_id, f.amount, b.balance, 'insufficient_credits', f.idempotency_key,
       now() - CASE WHEN f.recent THEN (f.n * 97 %% 3000) * interval '1 second'
                    ELSE interval '2 hours' + (f.n * 7919 %% 172800) * interval '1 second' END
  FROM seed_failures f
  LEFT JOIN public.points_balances b ON b.user_id = f.user_id
 WHERE NOT f.recent OR %(bulk)s
 ORDER BY f.i, f.n
"""

# The credit-lifecycle stories (issue 6), written after the ledger rows the same way in both modes: through
# the functions the app calls (add_points with lot terms, refund_generation, record_plan_change,
# expire_lots), and past them for what only a bug (or history) writes. Each is the user's last write, so
# no later operation's lazy expiry touches it.
_DEDUCTION_OF = """
    SELECT u.i, u.life, u.pid, t.id, t.amount, t.idempotency_key
      FROM seed_users u
      JOIN public.points_transactions t
        ON t.idempotency_key = 'generation:job_' || pg_temp.suuid(%(seed)s, 'job', u.i, u.prev_periods * 100)::text
     WHERE u.life IN ('partial_refund', 'refunded_twice')
     ORDER BY u.i"""
_LIFECYCLE = (
    # plan changes: an upgrade recorded without its prorated grant (fault), a downgrade pending at the
    # period's end (look-alike); the subscription as the handler leaves it
    """
    CREATE TEMP TABLE seed_plan_changes ON COMMIT DROP AS
    SELECT u.i, u.life, u.sub_id, u.bid, u.pid, u.cycle, u.cur_start, u.cur_start + u.len AS cur_end, c.at,
           extract(epoch FROM u.cur_start + u.len - c.at)::bigint AS left_s,
           extract(epoch FROM u.len + u.cur_start - u.cur_start)::bigint AS len_s,
           'evt_' || left(md5(%(seed)s::text || ':plan:' || u.i), 24) AS event_id
      FROM seed_users u
     CROSS JOIN LATERAL (SELECT date_trunc('second', u.cur_start + (%(anchor)s::timestamptz - u.cur_start) / 2) AS at) c
     WHERE u.life IN ('upgrade_without_grant', 'downgrade_pending') AND u.has_sub
    """,
    """
    SELECT count(public.record_plan_change(
               p.sub_id, p.bid, p.pid, p.cur_start, p.cur_end,
               CASE WHEN up THEN 'pro' ELSE 'pro_plus' END, p.cycle, CASE WHEN up THEN 'pro_plus' ELSE 'pro' END,
               p.cycle, CASE WHEN up THEN 'upgrade' ELSE 'downgrade' END, p.at,
               CASE WHEN up THEN p.at ELSE p.cur_end END,
               CASE WHEN up THEN p.left_s || '/' || p.len_s END,
               CASE WHEN up THEN jsonb_build_object('exact', cr.credits || '/1', 'granted', cr.credits) END,
               CASE WHEN up THEN cr.credits ELSE 0 END, NULL,
               'plan_change:' || p.sub_id || ':' || to_char(p.cur_start AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ':'
               || CASE WHEN up THEN 'pro.' || p.cycle || '>pro_plus.' || p.cycle
                       ELSE 'pro_plus.' || p.cycle || '>pro.' || p.cycle || ':downgrade:' || p.event_id END,
               p.event_id))
      FROM (SELECT x.*, x.life = 'upgrade_without_grant' AS up FROM seed_plan_changes x ORDER BY x.i) p
     CROSS JOIN LATERAL (SELECT (CASE p.cycle WHEN 'yearly' THEN %(plus_y)s - %(pro_y)s ELSE %(plus_m)s - %(pro_m)s END
                                 * p.left_s / p.len_s)::bigint AS credits) cr
    """,
    """
    UPDATE public.subscriptions_consolidated s
       SET tier = CASE WHEN p.life = 'upgrade_without_grant' THEN 'pro_plus' ELSE s.tier END,
           metadata = s.metadata || CASE WHEN p.life = 'downgrade_pending' THEN jsonb_build_object('pending_plan',
               jsonb_build_object('tier', 'pro', 'billing_cycle', p.cycle, 'effective_at', pg_temp.iso(p.cur_end),
                                  'requested_at', pg_temp.iso(p.at), 'event_id', p.event_id)) ELSE '{}'::jsonb END
      FROM seed_plan_changes p
     WHERE s.id = p.sub_id
    """,
    # top-up packs: one past its expiry never written off (fault), one expiring in the future, one past
    # its expiry whose credits a running generation holds (look-alikes)
    """
    SELECT count(a.transaction_id)
      FROM (SELECT * FROM seed_users WHERE life IN ('expired_top_up', 'top_up_future', 'held_past_expiry')
             ORDER BY i) u
     CROSS JOIN LATERAL public.add_points(
           u.pid, 500, 'top_up', 'top-up pack small',
           'top_up:seed_' || pg_temp.suuid(%(seed)s, 'topup', u.i)::text,
           jsonb_build_object('pack', 'small', 'price_id', 'price_topup_500',
                              'payment_id', 'seed_' || pg_temp.suuid(%(seed)s, 'topup', u.i)::text),
           CASE u.life WHEN 'expired_top_up' THEN %(anchor)s::timestamptz - interval '5 days'
                       WHEN 'held_past_expiry' THEN %(anchor)s::timestamptz - interval '5 minutes'
                       ELSE %(anchor)s::timestamptz + interval '300 days' END) a
    """,
    # the hold was placed before the pack expired (reserve_points would refuse expired credits now)
    """
    WITH r AS (
        INSERT INTO public.points_reservations (job_id, user_id, amount, status, metadata, created_at, expires_at)
        SELECT 'job_' || pg_temp.suuid(%(seed)s, 'held', u.i)::text, u.pid, 500, 'active',
               jsonb_build_object('kind', 'video'), %(anchor)s::timestamptz - interval '10 minutes',
               now() + interval '1 hour'
          FROM seed_users u WHERE u.life = 'held_past_expiry' ORDER BY u.i
        RETURNING user_id, amount
    )
    UPDATE public.points_balances b SET reserved = b.reserved + r.amount FROM r WHERE b.user_id = r.user_id
    """,
    # refunds: a partial refund (look-alike); a refund through refund_generation and another by the support
    # console naming the same deduction by its key, the way refunds were written before (fault)
    f"""
    SELECT count(r.transaction_id)
      FROM ({_DEDUCTION_OF}) d
     CROSS JOIN LATERAL public.refund_generation(d.id, CASE WHEN d.life = 'partial_refund' THEN -d.amount / 2 END) r
    """,
    f"""
    SELECT count(a.transaction_id)
      FROM ({_DEDUCTION_OF}) d
     CROSS JOIN LATERAL public.add_points(
           d.pid, -d.amount, 'refund', 'refund (support console)',
           'support_refund:' || pg_temp.suuid(%(seed)s, 'support_refund', d.i)::text,
           jsonb_build_object('refund_of', d.idempotency_key, 'via', 'support console')) a
     WHERE d.life = 'refunded_twice'
    """,
    # rolled over within the cap: the functions path rolled it at the user's first write after the
    # period's end; bulk writes ran no lazy expiry, so roll it here (a no-op when already done)
    """
    SELECT count(e.lots) FROM (SELECT pid FROM seed_users WHERE life = 'rolled_over' ORDER BY i) u
     CROSS JOIN LATERAL public.expire_lots(u.pid) e
    """,
    # a lot whose remaining no longer agrees with its draws (a bug that updated it behind the ledger)
    """
    UPDATE public.points_lots l SET remaining = l.remaining + 25, spent = false
      FROM seed_users u
     WHERE u.life = 'lot_drift' AND l.id = (SELECT max(x.id) FROM public.points_lots x WHERE x.user_id = u.pid)
    """,
)

_MANIFEST = """
INSERT INTO public.demo_seed_manifest (rule, bestauth_user_id, variant)
SELECT rule, bid, variant FROM seed_users WHERE kind = 'fault';
INSERT INTO public.demo_seed_lookalikes (category, bestauth_user_id)
SELECT category, bid FROM seed_users WHERE kind = 'healthy' AND category IS NOT NULL;
"""


def _params(config: CreditsConfig, *, seed: int, lo: int, hi: int, fault_rate: float,
            anchor: datetime, bulk: bool) -> dict[str, Any]:
    try:
        pro_m, pro_y = config.allocation("pro", "monthly"), config.allocation("pro", "yearly")
        plus_m, plus_y = config.allocation("pro_plus", "monthly"), config.allocation("pro_plus", "yearly")
        image, video = config.generation_cost("image"), config.generation_cost("video")
    except ConfigError as exc:
        raise ConfigError(f"the demo seed needs tiers pro and pro_plus and costs image and video: {exc}") from None
    rows = _profile_rows(fault_rate)
    return {
        "seed": seed, "lo": lo, "hi": hi, "rate": fault_rate, "anchor": anchor, "domain": DEMO_EMAIL_DOMAIN,
        "n_forced": sum(1 for r in rows if r["forced_order"] is not None), "n_faults": len(FAULTS),
        "pro_m": pro_m, "pro_y": pro_y, "plus_m": plus_m, "plus_y": plus_y, "image": image, "video": video,
        "plausible": config.audit.plausible_periods, "free_max": config.audit.free_max_balance,
        "threshold": config.audit.failed_deductions_per_hour, "bulk": bulk,
    }


def seed_range(conn: psycopg.Connection, config: CreditsConfig, *, lo: int, hi: int, fault_rate: float,
               seed: int, anchor: datetime, mode: str = "functions", bulk_lots: str = "set") -> dict[str, int]:
    """Plan and write users lo..hi (inclusive) inside the caller's transaction; returns row counts.

    Users are numbered globally, so ranges written by parallel connections make the same population
    as one call (the benchmark splits a million users this way). ``bulk_lots="trigger"`` has bulk mode
    leave the lots to the per-row trigger: the reference the set-based lots are tested against.
    """
    if mode not in ("functions", "bulk"):
        raise ValueError(f"mode must be 'functions' or 'bulk', got {mode!r}")
    if bulk_lots not in ("set", "trigger"):
        raise ValueError(f"bulk_lots must be 'set' or 'trigger', got {bulk_lots!r}")
    if not 0.0 <= fault_rate <= 1.0:
        raise ValueError(f"fault rate must be between 0 and 1, got {fault_rate}")
    params = _params(config, seed=seed, lo=lo, hi=hi, fault_rate=fault_rate, anchor=anchor, bulk=mode == "bulk")
    counts: dict[str, int] = {}
    with conn.cursor() as cur:
        cur.execute("SET LOCAL work_mem = '256MB'")
        cur.execute(_HELPERS)
        cur.execute(_PROFILES_TABLE)
        cur.executemany(
            sql.SQL("INSERT INTO seed_profiles ({}) VALUES ({})").format(
                sql.SQL(", ").join(map(sql.Identifier, _PROFILE_COLUMNS)),
                sql.SQL(", ").join(sql.Placeholder(c) for c in _PROFILE_COLUMNS)),
            _profile_rows(fault_rate))
        for stmt in (_USERS, _SIGNUP_BEFORE_FIRST_PERIOD, _PERIODS, _EVENTS_TABLE, _GRANTS, _DEDUCTIONS, _REFUNDS, _ADJUSTMENTS,
                     _CHAIN_BREAK, _TARGETS, _FAILURES):
            t0 = time.perf_counter()
            cur.execute(stmt, params)
            log.debug("seed plan step %s: %.2f s", stmt.split("\n", 2)[1][:60], time.perf_counter() - t0)
        cur.execute("ANALYZE seed_users; ANALYZE seed_events")
        for stmt in _WRITE_USERS:
            cur.execute(stmt, params)
        counts["events"] = cur.execute("SELECT count(*) FROM seed_events").fetchone()[0]
        if mode == "functions":
            for stage in (1, 2, 3):
                if stage == 2:
                    cur.execute(_APPLY_RAW)
                    continue
                calls, written = cur.execute(_APPLY_FUNCTIONS, {"stage": stage}).fetchone()
                if calls != written:
                    raise CreditError(f"seed stage {stage}: {calls - written} of {calls} ledger calls were "
                                      "answered as duplicates; the plan repeats a key")
        elif bulk_lots == "trigger":
            cur.execute(_APPLY_BULK_TRIGGER)
        else:
            _apply_bulk(conn, cur)
        cur.execute(_DRIFT)
        for stmt in _LIFECYCLE:
            cur.execute(stmt, params)
        if mode == "functions":
            cur.execute(_FAILURES_RECENT_FUNCTIONS)
        cur.execute(_FAILURES_DIRECT, params)
        cur.execute(_MANIFEST)
        counts["users"] = hi - lo + 1
        counts["failures"] = cur.execute("SELECT count(*) FROM seed_failures").fetchone()[0]
        counts["faults"] = cur.execute("SELECT count(*) FROM seed_users WHERE kind = 'fault'").fetchone()[0]
        cur.execute("DROP TABLE seed_plan_changes, seed_failures, seed_events, seed_periods, seed_users, "
                    "seed_profiles")
    return counts


# ------------------------------------------------------------------------------------------ safety


def demo_data_check(conn: psycopg.Connection) -> tuple[int, int, int]:
    """(users, users not written by the seed, ledger rows) of the database behind ``conn``."""
    users, foreign = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE email NOT LIKE %s) FROM public.bestauth_users",
        ("%@" + DEMO_EMAIL_DOMAIN,)).fetchone()
    ledger_rows = conn.execute("SELECT count(*) FROM (SELECT 1 FROM public.points_transactions LIMIT 1) t").fetchone()[0]
    return int(users), int(foreign), int(ledger_rows)


def check_resettable(conn: psycopg.Connection) -> None:
    """Refuse to wipe a database holding anything but demo users (or ledger rows without any users)."""
    users, foreign, ledger_rows = demo_data_check(conn)
    if foreign:
        raise SeedRefused(f"refusing to reset {describe(conn)}: it holds {foreign} user(s) not written by the "
                          "demo seed; point DATABASE_URL at an empty database")
    if users == 0 and ledger_rows:
        raise SeedRefused(f"refusing to reset {describe(conn)}: it holds ledger rows but no users; "
                          "point DATABASE_URL at an empty database")


def describe(conn: psycopg.Connection) -> str:
    info = conn.info
    return f"{info.host or 'local socket'}:{info.port}/{info.dbname}"


def reset_database(url: str, config: CreditsConfig) -> None:
    """Drop and recreate the database behind ``url`` (demo data only, see check_resettable), then migrate.

    A whole database, not a schema: later migrations may add schemas, and the ledger refuses TRUNCATE.
    """
    from ledger.migrate import migrate

    name = _dbname(url)
    maintenance = db.with_database(url, "template1" if name == "postgres" else "postgres")
    with db.connect(maintenance, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if exists:  # a database that does not exist yet has nothing to protect
        with db.connect(url, autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('public.bestauth_users')").fetchone()[0] is not None:
                check_resettable(conn)
    try:
        with db.connect(maintenance, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise SeedRefused(f"could not recreate database {name!r} ({str(exc).strip().splitlines()[0]}); "
                          "create an empty database yourself and point DATABASE_URL at it") from None
    with db.connect(url, autocommit=True) as conn:
        migrate(conn, config)
    log.info("reset database %s and applied the migrations", db.describe_url(url))


def _dbname(url: str) -> str:
    from urllib.parse import urlsplit

    name = urlsplit(url).path.lstrip("/")
    if not name:
        raise SeedRefused("the database URL names no database")
    return name


# ------------------------------------------------------------------------------------------ seed()


def seed(url: str, config: CreditsConfig, *, users: int, fault_rate: float = 0.05, seed: int = 42,
         now: datetime | None = None, mode: str = "functions", bulk_lots: str = "set") -> SeedManifest:
    """Write a demo population of ``users`` users into the (migrated, user-less) database at ``url``.

    ``fault_rate`` is the share of users drawn with a planted fault (besides one forced user per fault
    variant and per look-alike). ``now`` anchors the billing periods (default: the current time).
    One transaction: either the whole population is there, or nothing.
    """
    if users < 1:
        raise ValueError("users must be at least 1")
    if not -MAX_SEED <= seed <= MAX_SEED:
        raise ValueError(f"seed must be between -2**40 and 2**40, got {seed}")
    anchor = now or datetime.now(timezone.utc)
    if anchor.tzinfo is None:
        anchor = anchor.replace(tzinfo=timezone.utc)
    started = time.perf_counter()
    with db.connect(url) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SEED_LOCK,))
            if conn.execute("SELECT to_regclass('public.demo_seed_manifest')").fetchone()[0] is None:
                raise SeedRefused(f"{describe(conn)} is not migrated (run `credits migrate`)")
            existing, foreign, _ = demo_data_check(conn)
            if existing:
                what = "earlier demo seed" if not foreign else f"{foreign} real user(s)"
                raise SeedRefused(f"{describe(conn)} already holds {existing} user(s) ({what}); seed an empty "
                                  "database" + ("" if foreign else " or reset it first (`credits seed --reset`)"))
            counts = seed_range(conn, config, lo=1, hi=users, fault_rate=fault_rate, seed=seed, anchor=anchor,
                                mode=mode, bulk_lots=bulk_lots)
            conn.execute("""INSERT INTO public.demo_seed_runs (users, fault_rate, seed, anchor, mode)
                            VALUES (%s, %s, %s, %s, %s)""", (users, fault_rate, seed, anchor, mode))
        manifest = read_manifest(conn)
        ledger_rows = conn.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0]
    manifest.stats = {**counts, "ledger_rows": int(ledger_rows),
                      "seconds": round(time.perf_counter() - started, 3), "mode": mode, "seed": seed,
                      "fault_rate": fault_rate, "anchor": anchor.isoformat()}
    log.info("seeded %s users (%s ledger rows, %s faulted) into %s in %.1f s", users, ledger_rows,
             counts["faults"], db.describe_url(url), manifest.stats["seconds"])
    return manifest
