"""plan_change_grants [warning, fixable]: every recorded upgrade with credits > 0 has its prorated
``plan_change`` grant in the ledger, for that amount, to that points id.

The grant is found by the plan change's ``transaction_id`` or, failing that, by its idempotency key
(the handler writes the ledger row under the plan change's own key). A pending downgrade grants
nothing (credits = 0) and is not checked here.

The fix writes a missing grant through ``add_points`` under the plan change's key, with the row the
webhook handler writes (``ledger.subscriptions.upgrade_grant_row``: same metadata, same lot terms),
so the handler replaying the event later finds it done. A grant present with another amount or user is
reported for a person: the key is taken, and which amount is right is not for the audit to guess.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from checks.findings import Finding
from checks.gx_adapter import expectations as gxe
from checks.rules.base import Rule, opt
from checks.rules.lifecycle_common import FAMILY

if TYPE_CHECKING:
    import pandas as pd


class PlanChangeGrants(Rule):
    frame_columns = ("user_id",)
    id_columns = ("plan_change_id",)
    state_rows = False

    def frame(self, state: "pd.DataFrame", snapshot: Any, config: Any) -> "pd.DataFrame":
        frame = snapshot.table("plan_change_grants").copy()
        present = frame["grant_id"].notna()
        frame["grant_ok"] = (present & (frame["grant_amount"].fillna(-1) == frame["credits"])
                             & (frame["grant_type"].fillna("") == "plan_change")
                             & (frame["grant_user_id"].fillna("") == frame["user_id"])).astype(bool)
        return frame

    def expectations(self, config: Any, snapshot: Any = None) -> list:
        g = gxe()
        return [g.ExpectColumnValuesToNotBeNull(column="grant_id"),
                g.ExpectColumnValuesToBeInSet(column="grant_ok", value_set=[True])]

    def findings_for(self, rows: "pd.DataFrame", failed: dict[int, list[str]], config: Any,
                     snapshot: Any) -> list[Finding]:
        from ledger.subscriptions import upgrade_grant_row

        out = []
        for row in rows.to_dict("records"):
            plan = f"{row['from_tier']}.{row['from_cycle']} -> {row['to_tier']}.{row['to_cycle']}"
            expected = {"plan_change": plan, "credits": int(row["credits"]), "key": row["idempotency_key"]}
            grant = opt(row["grant_id"])
            fix, reason, params = None, None, None
            if grant is None:
                found: dict[str, Any] = {"grant": None, "recorded_transaction_id": opt(row["recorded_transaction_id"])}
                try:
                    description, meta = upgrade_grant_row(
                        config, subscription_id=row["subscription_id"], bestauth_user_id=row["bestauth_user_id"],
                        period_start=row["period_start"].to_pydatetime(), period_end=row["period_end"].to_pydatetime(),
                        from_tier=row["from_tier"], from_cycle=row["from_cycle"], to_tier=row["to_tier"],
                        to_cycle=row["to_cycle"], fraction_left=opt(row["fraction_left"]), event_id=opt(row["event_id"]))
                except Exception as exc:  # a tier gone from the config: its lot terms are unknown
                    reason = f"cannot build the grant's lot terms ({exc}): a person must decide"
                else:
                    fix = "grant_plan_change"
                    params = {"plan_change_id": int(row["plan_change_id"]), "user_id": row["user_id"],
                              "amount": int(row["credits"]), "key": row["idempotency_key"],
                              "description": description + " (audit fix: missing plan change grant)",
                              "metadata": meta}
            else:
                found = {"grant": {"transaction_id": int(grant), "amount": int(row["grant_amount"]),
                                   "user_id": opt(row["grant_user_id"]), "type": opt(row["grant_type"])}}
                reason = ("a ledger row under the plan change's key or id differs from the recorded upgrade: "
                          "a person must decide which is right")
            out.append(self.finding(row, expected=expected, found=found, fix=fix, reason=reason, params=params))
        return out


RULE = PlanChangeGrants(id="plan_change_grants", severity="warning", family=FAMILY, fixable=True,
                        description="every recorded upgrade with credits has its prorated plan_change grant")
