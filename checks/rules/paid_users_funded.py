"""paid_users_funded [critical]: every active or trialing paid subscription has a balance row and its
*current period's* grant in the ledger.

About the grant, not the balance: a paid user who spent every credit is healthy; a canceled, expired or
past-due subscription is not owed a grant; a user whose previous period was granted but not the
current one is not funded. The current period's grant is the ledger row under the period key
(``subscription_grant:<subscription>:<period start>``) or one whose metadata names this subscription
and period (a webhook that used its own key), net of reversals, to the user's resolved points id.

The fix grants the tier's allocation under the period key, so neither a later webhook nor a second run
can grant the period twice. No fix when the period already went to another points id, the tier is not
configured or the user's id is not settled: a person decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from checks.findings import Finding
from checks.gx_adapter import expectations as gxe
from checks.rules.base import Rule, opt

if TYPE_CHECKING:
    import pandas as pd


def grant_key(subscription_id: str, period_date: str) -> str:
    """The contract's period key (same spelling as public.subscription_grant_key)."""
    return f"subscription_grant:{subscription_id}:{period_date}"


class PaidUsersFunded(Rule):
    frame_columns = ("orphan", "paid_current", "tier", "current_period_start", "has_balance_row", "current_grants",
                     "bestauth_user_id", "user_id")
    columns = ("orphan", "paid_current", "bestauth_user_id", "user_id", "subscription_id", "tier", "billing_cycle",
               "status", "current_period_start", "current_period_end", "period_date", "allocation",
               "tier_configured", "has_balance_row", "balance", "current_grants", "current_grants_elsewhere",
               "current_key_used", "mapping_candidate", "mapping_problem")

    def frame(self, state: "pd.DataFrame", snapshot: Any, config: Any) -> "pd.DataFrame":
        return state[state["paid_current"] & ~state["orphan"]]

    def expectations(self, config: Any, snapshot: Any = None) -> list:
        g = gxe()
        return [g.ExpectColumnValuesToBeInSet(column="tier", value_set=sorted(config.tiers)),
                g.ExpectColumnValuesToNotBeNull(column="current_period_start"),
                g.ExpectColumnValuesToBeInSet(column="has_balance_row", value_set=[True]),
                g.ExpectColumnValuesToBeBetween(column="current_grants", min_value=1)]

    def findings_for(self, rows: "pd.DataFrame", failed: dict[int, list[str]], config: Any,
                     snapshot: Any) -> list[Finding]:
        out = []
        for i, row in enumerate(rows.to_dict("records")):
            period = opt(row.get("period_date"))
            expected = {"period": period, "grant": row["allocation"] or None, "balance_row": True}
            found = {"current_period_grants": int(row["current_grants"]), "balance_row": bool(row["has_balance_row"]),
                     "balance": int(row["balance"]) if row["has_balance_row"] else None,
                     "status": row["status"], "tier": row["tier"], "billing_cycle": opt(row.get("billing_cycle"))}
            cand = opt(row.get("mapping_candidate"))
            fix, reason, params = None, None, None
            if row["current_grants"] >= 1:  # granted; only the balance row is missing (cannot happen via functions)
                reason = "the period is granted but the balance row is missing: ledger_integrity rebuilds it"
            elif not row["tier_configured"] or not row["allocation"]:
                reason = f"tier {row['tier']!r} / cycle {row.get('billing_cycle')!r} has no allocation in the config"
            elif period is None:
                reason = "the subscription has no current period start"
            elif row["current_grants_elsewhere"] > 0 or row["current_key_used"]:
                reason = "this period's grant went to another points id: a person must move it"
            elif cand is None:
                reason = "the user's points id is not settled: " + (opt(row.get("mapping_problem")) or "no mapping")
            else:
                fix = "grant_period"
                params = {"subscription_id": row["subscription_id"], "period_date": period,
                          "period_start": row["current_period_start"].isoformat(),
                          "period_end": opt(row.get("current_period_end")) and row["current_period_end"].isoformat(),
                          "amount": int(row["allocation"]), "tier": row["tier"],
                          "billing_cycle": row["billing_cycle"], "user_id": cand,
                          "key": grant_key(row["subscription_id"], period)}
            out.append(self.finding({**row, "user_id": cand or row["user_id"]}, expected=expected, found=found,
                                    fix=fix, reason=reason, params=params))
        return out


RULE = PaidUsersFunded(id="paid_users_funded", severity="critical", family="funding", fixable=True,
                       description="every active or trialing paid subscription has its current period's grant")
