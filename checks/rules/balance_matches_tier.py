"""balance_matches_tier [warning, report only]: no balance is implausible for its tier.

A paid tier's balance above ``audit.plausible_periods`` periods' allocation, or a free user (or one
without a subscription) holding more than ``audit.free_max_balance``, usually means a mistyped manual
grant or a grant to the wrong id. Nothing here is provably wrong, so nothing is changed: a person looks.
Canceled and expired subscriptions keep their tier's limit (their leftover credits are theirs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from checks.findings import Finding
from checks.gx_adapter import expectations as gxe
from checks.rules.base import Rule

if TYPE_CHECKING:
    import pandas as pd


class BalanceMatchesTier(Rule):
    frame_columns = ("orphan", "has_balance_row", "paid_tier", "allocation", "balance", "bestauth_user_id",
                     "user_id")
    columns = ("orphan", "has_balance_row", "paid_tier", "allocation", "balance", "tier", "billing_cycle",
               "bestauth_user_id", "user_id")

    def frame(self, state: "pd.DataFrame", snapshot: Any, config: Any) -> "pd.DataFrame":
        rows = state[~state["orphan"] & state["has_balance_row"]
                     & (~state["paid_tier"] | (state["allocation"] > 0))]
        limit = (rows["allocation"] * config.audit.plausible_periods).where(
            rows["paid_tier"], config.audit.free_max_balance)
        return rows.assign(max_plausible=limit.astype("int64"))

    def expectations(self, config: Any, snapshot: Any = None) -> list:
        return [gxe().ExpectColumnPairValuesAToBeGreaterThanB(column_A="max_plausible", column_B="balance",
                                                              or_equal=True)]

    def findings_for(self, rows: "pd.DataFrame", failed: dict[int, list[str]], config: Any,
                     snapshot: Any) -> list[Finding]:
        out = []
        for row in rows.to_dict("records"):
            what = (f"{config.audit.plausible_periods} x {row['allocation']} ({row['tier']} {row['billing_cycle']})"
                    if row["paid_tier"] else f"free tier limit {config.audit.free_max_balance}")
            out.append(self.finding(row, expected={"max_balance": int(row["max_plausible"]), "rule": what},
                                    found={"balance": int(row["balance"]), "tier": row["tier"]}, fix=None,
                                    reason="report only: review the user's recent grants and adjustments"))
        return out


RULE = BalanceMatchesTier(id="balance_matches_tier", severity="warning", family="plausibility", fixable=False,
                          description="no balance is implausible for its tier (report only)")
