"""The snapshot frames of the credit-lifecycle rules (issue 6), computed set-based in SQL.

They are read by ``checks.snapshot.take_snapshot`` in the same REPEATABLE READ snapshot as the
contract's frames (same COPY path, same ``as_of`` cut: rows created after it are not seen). What leaves
the server is bounded:

- ``lots_by_user``: one row per points id holding lots (or an uncovered draw): lot counts and credit
  sums, the lots that break their invariant and the lots past expiry spelled out only for the users
  that have any. Per lot, ``granted - remaining - consumed_before = sum(draws)`` is checked in SQL: the
  draws are summed per lot on the server (the ledger's draws never reach pandas).
  With ``as_of`` the lots' ``remaining`` column (which has no history) is replaced by what the draws up
  to that instant leave in the lot.
- ``refunds``: one row per refunded deduction (refund rows naming ``metadata.refund_of``: the ledger id,
  or the deduction's idempotency key as older refunds wrote it) with the count and sum of its refunds.
- ``plan_change_grants``: one row per recorded upgrade with credits > 0, with the ledger row found for
  it (by its ``transaction_id``, else by its idempotency key).

Each query carries ``/*users:…*/`` markers where a per-user filter goes (``credits diagnose`` and
``audit --user`` read only those users' rows).
"""

from __future__ import annotations

LOTS_BY_USER_COLUMNS = {
    "user_id": "str", "lots": "int64", "open_lots": "int64", "lots_remaining": "int64", "bad_lots": "int64",
    "bad_lot_detail": "str", "due_lots": "int64", "due_credits": "int64", "rollable_credits": "int64",
    "due_lot_ids": "str", "held": "int64", "uncovered_draws": "int64", "uncovered_credits": "int64",
    "uncovered_ids": "str",
}

# per lot: rem is the lot's remaining as the snapshot sees it (the column live; what the draws up to
# as_of leave otherwise), derived what its draws say it must be. A lot is bad when it is overdrawn
# (derived < 0), holds more than it granted (a refund returned more than was drawn), or (live) its
# column disagrees with its draws. Due: credits left in a lot whose expiry has passed. Rollable: what
# the lot's rollover policy may still keep past that expiry (an upper bound: the cap is shared by the
# period's lots, so a due lot is reported only when even the whole cap could not keep it).
_LOTS_BY_USER = """
WITH draws AS (
    SELECT x.lot_id, sum(x.amount) AS drawn
      FROM public.points_lot_draws x
     WHERE x.lot_id IS NOT NULL AND x.created_at <= %(as_of)s /*users:draws*/
     GROUP BY x.lot_id
), lots AS (
    SELECT l.id, l.user_id, l.granted, l.remaining, l.consumed_before, l.expires_at, l.period_end,
           l.rollover_cap, l.rollover_until, coalesce(d.drawn, 0) AS drawn,
           l.granted - l.consumed_before - coalesce(d.drawn, 0) AS derived
      FROM public.points_lots l
      LEFT JOIN draws d ON d.lot_id = l.id
     WHERE l.created_at <= %(as_of)s /*users:lots*/
), judged AS (
    SELECT o.id, o.user_id, o.granted, o.remaining, o.consumed_before, o.drawn, o.derived, o.rem,
           (o.derived < 0 OR o.derived > o.granted OR o.rem <> o.derived) AS bad,
           (o.rem > 0 AND o.expires_at <= %(as_of)s) AS due,
           CASE WHEN o.rem > 0 AND o.expires_at <= %(as_of)s AND o.rollover_cap IS NOT NULL
                     AND o.period_end IS NULL AND o.rollover_until > o.expires_at
                THEN least(o.rem, o.rollover_cap) ELSE 0 END AS rollable
      FROM (SELECT s.*, CASE WHEN %(live)s THEN s.remaining ELSE s.derived END AS rem FROM lots s) o
), per_user AS (
    SELECT j.user_id, count(*) AS lots, count(*) FILTER (WHERE j.rem > 0) AS open_lots,
           sum(j.rem) AS lots_remaining,
           count(*) FILTER (WHERE j.bad) AS bad_lots,
           string_agg(j.id::text || ':' || j.granted::text || ':' || j.rem::text || ':' || j.consumed_before::text
                      || ':' || j.drawn::text, ' ' ORDER BY j.id) FILTER (WHERE j.bad) AS bad_lot_detail,
           count(*) FILTER (WHERE j.due) AS due_lots,
           coalesce(sum(j.rem) FILTER (WHERE j.due), 0) AS due_credits,
           coalesce(sum(j.rollable), 0) AS rollable_credits,
           string_agg(j.id::text, ' ' ORDER BY j.id) FILTER (WHERE j.due) AS due_lot_ids
      FROM judged j
     GROUP BY j.user_id
), uncovered AS (
    SELECT c.user_id, count(*) AS uncovered_draws, sum(c.amount) AS uncovered_credits,
           string_agg(c.transaction_id::text, ' ' ORDER BY c.transaction_id) AS uncovered_ids
      FROM public.points_lot_consumptions c
     WHERE c.lot_id IS NULL AND c.created_at <= %(as_of)s /*users:uncovered*/
     GROUP BY c.user_id
), held AS (
    SELECT r.user_id, sum(r.amount) AS held
      FROM public.points_reservations r
     WHERE r.created_at <= %(as_of)s AND (r.settled_at IS NULL OR r.settled_at > %(as_of)s) /*users:held*/
     GROUP BY r.user_id
)
SELECT coalesce(p.user_id, u.user_id)::text AS user_id, coalesce(p.lots, 0) AS lots,
       coalesce(p.open_lots, 0) AS open_lots, coalesce(p.lots_remaining, 0) AS lots_remaining,
       coalesce(p.bad_lots, 0) AS bad_lots, p.bad_lot_detail, coalesce(p.due_lots, 0) AS due_lots,
       coalesce(p.due_credits, 0) AS due_credits, coalesce(p.rollable_credits, 0) AS rollable_credits,
       p.due_lot_ids, coalesce(h.held, 0) AS held, coalesce(u.uncovered_draws, 0) AS uncovered_draws,
       coalesce(u.uncovered_credits, 0) AS uncovered_credits, u.uncovered_ids
  FROM per_user p
  FULL JOIN uncovered u ON u.user_id = p.user_id
  LEFT JOIN held h ON h.user_id = coalesce(p.user_id, u.user_id)
"""

REFUNDS_COLUMNS = {
    "refund_group": "str", "deduction_id": "Int64", "user_id": "str", "deduction_user_id": "str",
    "deduction_type": "str", "charged": "int64", "refunds": "int64", "refunded": "int64", "refund_ids": "str",
}

# refund_of names the deduction by ledger id (a JSON number, or digits) or, in refunds written before
# refund_generation, by its idempotency key. A refund naming nothing the ledger holds (as of the cut)
# is a group of its own with charged = 0. The refund ids are spelled only for groups that break a bound.
_REFUNDS = """
WITH r AS (
    SELECT t.id, t.user_id, t.amount, t.metadata -> 'refund_of' AS ref
      FROM public.points_transactions t
     WHERE t.transaction_type = 'refund' AND t.metadata ? 'refund_of' AND t.created_at <= %(as_of)s
           /*users:refunds*/
), k AS (
    SELECT r.id, r.user_id, r.amount,
           CASE WHEN jsonb_typeof(r.ref) IN ('number', 'string') AND (r.ref #>> '{}') ~ '^[0-9]{1,18}$'
                THEN (r.ref #>> '{}')::bigint END AS ref_id,
           CASE WHEN jsonb_typeof(r.ref) = 'string' AND (r.ref #>> '{}') !~ '^[0-9]{1,18}$'
                THEN r.ref #>> '{}' END AS ref_key
      FROM r
), m AS (
    SELECT k.id, k.user_id, k.amount, d.id AS deduction_id, d.user_id AS deduction_user_id,
           d.transaction_type AS deduction_type, greatest(-d.amount, 0) AS charged
      FROM k
      LEFT JOIN public.points_transactions d
             ON d.id = coalesce(k.ref_id, (SELECT x.id FROM public.points_transactions x
                                            WHERE x.idempotency_key = k.ref_key))
            AND d.created_at <= %(as_of)s
)
SELECT coalesce(m.deduction_id::text, 'refund:' || min(m.id)::text) AS refund_group, m.deduction_id,
       min(m.user_id::text) AS user_id, min(m.deduction_user_id::text) AS deduction_user_id,
       min(m.deduction_type) AS deduction_type, coalesce(max(m.charged), 0) AS charged,
       count(*) AS refunds, sum(m.amount) AS refunded,
       CASE WHEN count(*) > 1 OR sum(m.amount) > coalesce(max(m.charged), 0)
            THEN string_agg(m.id::text || ':' || m.amount::text, ' ' ORDER BY m.id) END AS refund_ids
  FROM m
 GROUP BY m.deduction_id, CASE WHEN m.deduction_id IS NULL THEN m.id END
"""

PLAN_CHANGE_COLUMNS = {
    "plan_change_id": "int64", "subscription_id": "str", "bestauth_user_id": "str", "user_id": "str",
    "from_tier": "str", "from_cycle": "str", "to_tier": "str", "to_cycle": "str", "fraction_left": "str",
    "event_id": "str", "credits": "int64", "idempotency_key": "str", "recorded_transaction_id": "Int64",
    "grant_id": "Int64", "grant_amount": "Int64", "grant_user_id": "str", "grant_type": "str",
}
PLAN_CHANGE_DATES = ["period_start", "period_end", "changed_at"]

_PLAN_CHANGE_GRANTS = """
SELECT c.id AS plan_change_id, c.subscription_id::text AS subscription_id,
       c.bestauth_user_id::text AS bestauth_user_id, c.user_id::text AS user_id, c.period_start, c.period_end,
       c.changed_at, c.from_tier, c.from_cycle, c.to_tier, c.to_cycle, c.fraction_left, c.event_id, c.credits,
       c.idempotency_key, c.transaction_id AS recorded_transaction_id,
       g.id AS grant_id, g.amount AS grant_amount, g.user_id::text AS grant_user_id, g.transaction_type AS grant_type
  FROM public.subscription_plan_changes c
  LEFT JOIN public.points_transactions a ON a.id = c.transaction_id AND a.created_at <= %(as_of)s
  LEFT JOIN public.points_transactions b ON b.idempotency_key = c.idempotency_key AND b.created_at <= %(as_of)s
 CROSS JOIN LATERAL (SELECT CASE WHEN a.id IS NOT NULL THEN a.id ELSE b.id END AS id,
                            CASE WHEN a.id IS NOT NULL THEN a.amount ELSE b.amount END AS amount,
                            CASE WHEN a.id IS NOT NULL THEN a.user_id ELSE b.user_id END AS user_id,
                            CASE WHEN a.id IS NOT NULL THEN a.transaction_type ELSE b.transaction_type END
                                AS transaction_type) g
 WHERE c.kind = 'upgrade' AND c.credits > 0 AND c.created_at <= %(as_of)s /*users:plan_changes*/
"""

# name -> (SQL, {column: dtype}, [timestamp columns]), the shape of checks.snapshot._QUERIES
QUERIES: dict[str, tuple[str, dict[str, str], list[str]]] = {
    "lots_by_user": (_LOTS_BY_USER, LOTS_BY_USER_COLUMNS, []),
    "refunds": (_REFUNDS, REFUNDS_COLUMNS, []),
    "plan_change_grants": (_PLAN_CHANGE_GRANTS, PLAN_CHANGE_COLUMNS, PLAN_CHANGE_DATES),
}
FRAMES: tuple[str, ...] = tuple(QUERIES)

# the per-user filter at each marker (%(uids)s: every points id the users' credits may be under)
_UIDS = "%(uids)s::uuid[]"
_FILTERS: dict[str, str] = {
    "draws": f"AND x.user_id = ANY({_UIDS}) "
             f"AND x.lot_id IN (SELECT l2.id FROM public.points_lots l2 WHERE l2.user_id = ANY({_UIDS}))",
    "lots": f"AND l.user_id = ANY({_UIDS})",
    "uncovered": f"AND c.user_id = ANY({_UIDS})",
    "held": f"AND r.user_id = ANY({_UIDS})",
    "refunds": f"AND t.user_id = ANY({_UIDS})",
    "plan_changes": f"AND (c.user_id = ANY({_UIDS}) OR c.bestauth_user_id = ANY(%(bids)s::uuid[]))",
}


def filtered(name: str) -> str:
    """The frame's query restricted to the snapshot's users (every marker filled in)."""
    query = QUERIES[name][0]
    for marker, condition in _FILTERS.items():
        query = query.replace(f"/*users:{marker}*/", condition)
    assert "/*users:" not in query, name
    return query
