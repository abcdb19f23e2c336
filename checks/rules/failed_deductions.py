"""failed_deductions [warning, report only]: per user, failed deduction attempts in the hour before the
snapshot stay under ``audit.failed_deductions_per_hour`` (0 turns the rule off).

A burst of refusals means a user is retrying against an empty balance, often because a grant is missing
or credits sit under another id. Counted from ``points_deduction_failures`` (written by every refused
deduction); nothing to fix here, the cause is found by the other rules or by ``credits diagnose``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from checks.findings import Finding
from checks.gx_adapter import expectations as gxe
from checks.rules.base import Rule

if TYPE_CHECKING:
    import pandas as pd


class FailedDeductions(Rule):
    frame_columns = ("user_id", "bestauth_user_id", "failures_last_hour")
    columns = ("bestauth_user_id", "user_id", "email", "balance", "failures_last_hour", "failed_amount")

    def frame(self, state: "pd.DataFrame", snapshot: Any, config: Any) -> "pd.DataFrame":
        return state.drop_duplicates("user_id")

    def expectations(self, config: Any, snapshot: Any = None) -> list:
        threshold = config.audit.failed_deductions_per_hour
        if threshold <= 0:
            return []
        return [gxe().ExpectColumnValuesToBeBetween(column="failures_last_hour", max_value=threshold - 1)]

    def findings_for(self, rows: "pd.DataFrame", failed: dict[int, list[str]], config: Any,
                     snapshot: Any) -> list[Finding]:
        threshold = config.audit.failed_deductions_per_hour
        return [self.finding(row, expected={"failures_last_hour": f"< {threshold}"},
                             found={"failures_last_hour": int(row["failures_last_hour"]),
                                    "failed_amount": int(row["failed_amount"]), "balance": int(row["balance"])},
                             fix=None, reason=f"report only: run `credits diagnose {row.get('email') or row['user_id']}`")
                for row in rows.to_dict("records")]


RULE = FailedDeductions(id="failed_deductions", severity="warning", family="plausibility", fixable=False,
                        description="failed deduction attempts in the last hour stay under a threshold")
