"""The money invariants, checked in SQL against the real tables (issue 5's tests share these).

For every user (or the given ones): balance = sum(ledger) = lifetime_earned - lifetime_spent,
balance >= 0, reserved = the user's active holds, 0 <= reserved <= balance (spendable >= 0), and each
ledger row's balance_after follows from the one before, and (issue 6) the lots agree: the sum of open lots
= balance, each lot's granted - remaining = what drew on it, every draw was covered by a lot. One row per idempotency key is a UNIQUE
constraint; ``duplicate_keys`` double-checks it in case a later migration loosens the table.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

_PROBLEMS_SQL = """
WITH l AS (
    SELECT t.user_id, sum(t.amount) AS s, count(*) AS n,
           count(*) FILTER (WHERE t.balance_after <> t.running) AS chain_breaks
      FROM (SELECT x.user_id, x.amount, x.balance_after,
                   sum(x.amount) OVER (PARTITION BY x.user_id ORDER BY x.id) AS running
              FROM public.points_transactions x
             WHERE %(users)s::uuid[] IS NULL OR x.user_id = ANY (%(users)s::uuid[])) t
     GROUP BY t.user_id
), h AS (
    SELECT r.user_id, sum(r.amount) AS held FROM public.points_reservations r
     WHERE r.status = 'active' AND (%(users)s::uuid[] IS NULL OR r.user_id = ANY (%(users)s::uuid[]))
     GROUP BY r.user_id
), lots AS (
    SELECT x.user_id, sum(x.remaining) AS open_sum,
           count(*) FILTER (WHERE x.granted - x.remaining - x.consumed_before
                                  <> coalesce(c.drawn, 0)) AS lot_breaks,
           sum(x.remaining) FILTER (WHERE x.expires_at <= now()) AS expired_open
      FROM public.points_lots x
      LEFT JOIN (SELECT k.lot_id, sum(k.amount) AS drawn FROM public.points_lot_draws k
                  WHERE k.lot_id IS NOT NULL GROUP BY k.lot_id) c ON c.lot_id = x.id
     WHERE %(users)s::uuid[] IS NULL OR x.user_id = ANY (%(users)s::uuid[])
     GROUP BY x.user_id
), uncovered AS (
    SELECT k.user_id, sum(k.amount) AS n FROM public.points_lot_draws k
     WHERE k.lot_id IS NULL AND (%(users)s::uuid[] IS NULL OR k.user_id = ANY (%(users)s::uuid[]))
     GROUP BY k.user_id
), b AS (
    SELECT * FROM public.points_balances x
     WHERE %(users)s::uuid[] IS NULL OR x.user_id = ANY (%(users)s::uuid[])
)
SELECT coalesce(b.user_id, l.user_id, h.user_id) AS user_id, b.balance, b.lifetime_earned, b.lifetime_spent,
       b.reserved, l.s AS ledger_sum, l.chain_breaks, h.held AS active_holds, lots.open_sum, lots.lot_breaks,
       lots.expired_open, u.n AS uncovered
  FROM b FULL JOIN l ON l.user_id = b.user_id FULL JOIN h ON h.user_id = coalesce(b.user_id, l.user_id)
  LEFT JOIN lots ON lots.user_id = coalesce(b.user_id, l.user_id, h.user_id)
  LEFT JOIN uncovered u ON u.user_id = coalesce(b.user_id, l.user_id, h.user_id)
 WHERE coalesce(b.balance, 0) <> coalesce(l.s, 0)
    OR coalesce(b.balance, 0) <> coalesce(b.lifetime_earned, 0) - coalesce(b.lifetime_spent, 0)
    OR coalesce(b.balance, 0) < 0
    OR coalesce(b.reserved, 0) <> coalesce(h.held, 0)
    OR coalesce(b.reserved, 0) > coalesce(b.balance, 0)
    OR coalesce(l.chain_breaks, 0) > 0
    OR coalesce(lots.open_sum, 0) <> coalesce(b.balance, 0)
    OR coalesce(lots.lot_breaks, 0) > 0
    OR coalesce(u.n, 0) > 0
"""


def integrity_problems(conn: psycopg.Connection, users: Sequence[uuid.UUID] | None = None) -> list[tuple[Any, ...]]:
    """Rows of users that break an invariant (empty when everything holds)."""
    return conn.execute(_PROBLEMS_SQL, {"users": list(users) if users is not None else None}).fetchall()


def duplicate_keys(conn: psycopg.Connection) -> list[tuple[str, int]]:
    return conn.execute("""SELECT idempotency_key, count(*) FROM public.points_transactions
                            GROUP BY idempotency_key HAVING count(*) > 1""").fetchall()


def assert_consistent(conn: psycopg.Connection, users: Sequence[uuid.UUID] | None = None) -> None:
    problems = integrity_problems(conn, users)
    assert problems == [], f"integrity problems: {problems}"
    assert duplicate_keys(conn) == []


def period_grant_counts(conn: psycopg.Connection) -> dict[str, int]:
    """How many ledger rows carry each subscription period (must all be 1)."""
    rows = conn.execute(
        """SELECT (metadata ->> 'subscription_id') || ':' || left(metadata ->> 'period_start', 10), count(*)
             FROM public.points_transactions WHERE transaction_type = 'subscription_grant'
            GROUP BY 1""").fetchall()
    return {k: int(n) for k, n in rows}
