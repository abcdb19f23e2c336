"""The fast health check (`credits monitor`): a few counting queries, no pandas, no GE.

For cron and alerting: seconds on a million users, the same status scale and exit codes as the
audit. It counts indicators, it does not explain them: `credits audit` (every rule, every user, with
findings and fixes) is the authority, and `credits diagnose` explains one user.

What each count means, and where it is cheaper than the audit's rule:
- paid_unfunded: active/trialing paid subscriptions whose current period has no grant under the period
  key or naming the period in its metadata, for the user's resolved id (the paid_users_funded rule).
- unmapped_users: BestAuth users without a user_id_mapping row (mapping_present).
- failed_deductions_last_hour / users_over_threshold: refused deductions in the last hour.
- integrity_issues: balance rows whose balance disagrees with lifetime_earned - lifetime_spent (a cache
  moved without its ledger row: the drift the old bugs caused), and ledger users without a balance row.
  Comparing every balance with the ledger itself, and the balance_after chain, takes the audit's full
  pass over the ledger (checking each balance against its latest ledger row alone cost ~6 s per million
  users: not a monitor's budget).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger import db
from ledger.config import CreditsConfig

_QUERY = """
WITH paid AS (
    -- the app's resolution for paid subscriptions only; coalesce stops at the mapping for almost everyone
    SELECT s.id, s.current_period_start,
           coalesce(m.supabase_user_id,
                    public.uuid_or_null(s.metadata ->> 'resolved_supabase_user_id'),
                    public.uuid_or_null(s.metadata ->> 'supabase_user_id'),
                    public.uuid_or_null(s.metadata ->> 'original_userId'),
                    s.user_id) AS user_id,
           -- public.subscription_grant_key, spelled inline (a function with SET search_path is never inlined)
           'subscription_grant:' || s.id::text || ':'
               || to_char(s.current_period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS period_key
      FROM public.subscriptions_consolidated s
      LEFT JOIN public.user_id_mapping m ON m.bestauth_user_id = s.user_id
     WHERE s.status IN ('active', 'trialing') AND s.tier <> 'free'
)
SELECT
  (SELECT count(*) FROM paid p
    WHERE p.current_period_start IS NULL
       OR (NOT EXISTS (SELECT 1 FROM public.points_transactions t
                        WHERE t.idempotency_key = p.period_key AND t.user_id = p.user_id)
           AND NOT EXISTS (SELECT 1 FROM public.points_transactions t
                            WHERE t.user_id = p.user_id AND t.transaction_type = 'subscription_grant'
                              AND t.metadata ->> 'subscription_id' = p.id::text
                              AND left(t.metadata ->> 'period_start', 10)
                                  = to_char(p.current_period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD')))
  ) AS paid_unfunded,
  (SELECT count(*) FROM paid) AS paid_users,
  (SELECT count(*) FROM public.bestauth_users u
    WHERE NOT EXISTS (SELECT 1 FROM public.user_id_mapping m WHERE m.bestauth_user_id = u.id)) AS unmapped_users,
  (SELECT count(*) FROM public.bestauth_users) AS users,
  (SELECT count(*) FROM public.points_deduction_failures f
    WHERE f.created_at > now() - interval '1 hour') AS failed_deductions_last_hour,
  (SELECT count(*) FROM (SELECT f.user_id FROM public.points_deduction_failures f
                          WHERE f.created_at > now() - interval '1 hour'
                          GROUP BY f.user_id HAVING count(*) >= %(threshold)s) x) AS users_over_threshold,
  (SELECT count(*) FROM public.points_balances b
    WHERE b.balance <> b.lifetime_earned - b.lifetime_spent) AS balance_mismatches,
  (SELECT count(*) FROM (SELECT DISTINCT t.user_id FROM public.points_transactions t) u
    WHERE NOT EXISTS (SELECT 1 FROM public.points_balances b WHERE b.user_id = u.user_id)) AS missing_balance_rows,
  now() AS taken_at
"""


@dataclass
class MonitorReport:
    status: str
    counts: dict[str, int]
    taken_at: datetime
    seconds: float
    threshold: int
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"HEALTHY": 0, "WARNING": 1, "CRITICAL": 2}[self.status]

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "counts": self.counts, "problems": self.problems,
                "taken_at": self.taken_at.isoformat(), "seconds": round(self.seconds, 3),
                "failed_deductions_threshold": self.threshold}


def monitor(url: str, config: CreditsConfig) -> MonitorReport:
    t0 = time.perf_counter()
    threshold = config.audit.failed_deductions_per_hour
    with db.connect(url, autocommit=True) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        cur = conn.execute(_QUERY, {"threshold": max(threshold, 1)})
        names = [d.name for d in cur.description]
        row = dict(zip(names, cur.fetchone(), strict=True))
        conn.execute("ROLLBACK")
    taken_at = row.pop("taken_at")
    counts = {k: int(v) for k, v in row.items()}
    if threshold <= 0:
        counts["users_over_threshold"] = 0
    counts["integrity_issues"] = counts["balance_mismatches"] + counts["missing_balance_rows"]
    problems = []
    if counts["paid_unfunded"]:
        problems.append(f"{counts['paid_unfunded']} paid user(s) without their current period's grant")
    if counts["integrity_issues"]:
        problems.append(f"{counts['integrity_issues']} balance(s) disagreeing with the ledger")
    if counts["unmapped_users"]:
        problems.append(f"{counts['unmapped_users']} user(s) without an id mapping")
    if counts["users_over_threshold"]:
        problems.append(f"{counts['users_over_threshold']} user(s) with >= {threshold} failed deductions in the "
                        f"last hour ({counts['failed_deductions_last_hour']} failures in all)")
    if counts["paid_unfunded"] or counts["integrity_issues"]:
        status = "CRITICAL"
    elif counts["unmapped_users"] or counts["users_over_threshold"]:
        status = "WARNING"
    else:
        status = "HEALTHY"
    return MonitorReport(status, counts, taken_at, time.perf_counter() - t0, threshold, problems)
