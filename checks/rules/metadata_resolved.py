"""metadata_resolved [warning]: every subscription's metadata.resolved_supabase_user_id is a UUID equal
to the mapped id.

Only the resolved key counts: a legacy ``supabase_user_id`` / ``original_userId`` alone is a finding
(the app reads keys in order, and legacy keys have pointed at stale ids). The fix writes the resolved key
with the mapped id (for an unmapped user: the id its mapping fix will create). A wrong resolved id that
itself holds credits is a conflict a person must settle: which account is the user's is not ours to guess.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from checks.findings import Finding
from checks.gx_adapter import expectations as gxe
from checks.rules.base import Rule, opt

if TYPE_CHECKING:
    import pandas as pd

UNRESOLVED = "(unresolved)"


class MetadataResolved(Rule):
    frame_columns = ("orphan", "has_subscription", "meta_resolved_id", "mapping_candidate", "bestauth_user_id",
                     "user_id")
    columns = ("orphan", "has_subscription", "bestauth_user_id", "user_id", "subscription_id", "meta_resolved_id",
               "meta_resolved_raw", "meta_supabase_id", "meta_original_id", "mapping_candidate",
               "mapping_problem")

    def frame(self, state: "pd.DataFrame", snapshot: Any, config: Any) -> "pd.DataFrame":
        subs = state[state["has_subscription"] & ~state["orphan"]]
        return subs.assign(meta_resolved_cmp=subs["meta_resolved_id"].fillna(""),
                           expected_user_id=subs["mapping_candidate"].fillna(UNRESOLVED))

    def expectations(self, config: Any, snapshot: Any = None) -> list:
        g = gxe()
        return [g.ExpectColumnValuesToNotBeNull(column="meta_resolved_id"),
                g.ExpectColumnPairValuesToBeEqual(column_A="meta_resolved_cmp", column_B="expected_user_id")]

    def findings_for(self, rows: "pd.DataFrame", failed: dict[int, list[str]], config: Any,
                     snapshot: Any) -> list[Finding]:
        named = set(rows["meta_resolved_id"].dropna())
        bal, led = snapshot.table("points_balances")["user_id"], snapshot.table("ledger_by_user")["user_id"]
        holders = set(bal[bal.isin(named)]) | set(led[led.isin(named)])
        out = []
        for row in rows.to_dict("records"):
            expected_id = row["expected_user_id"]
            current = opt(row.get("meta_resolved_id"))
            found = {"resolved_supabase_user_id": opt(row.get("meta_resolved_raw")) or current,
                     "supabase_user_id": opt(row.get("meta_supabase_id")),
                     "original_userId": opt(row.get("meta_original_id"))}
            found = {k: v for k, v in found.items() if v is not None} or None
            base = {**row, "user_id": expected_id if expected_id != UNRESOLVED else row["user_id"]}
            if expected_id == UNRESOLVED:
                out.append(self.finding(base, expected={"resolved_supabase_user_id": "the mapped id"}, found=found,
                                        fix=None, reason="the user's points id is not settled: "
                                        + (opt(row.get("mapping_problem")) or "no mapping")))
            elif current and current != expected_id and current in holders:
                out.append(self.finding(base, expected={"resolved_supabase_user_id": expected_id}, found=found,
                                        fix=None, reason=f"metadata names {current}, which holds credits of its "
                                        f"own, while the mapping says {expected_id}: conflicting ids"))
            else:
                out.append(self.finding(base, expected={"resolved_supabase_user_id": expected_id}, found=found,
                                        fix="write_resolved_metadata",
                                        params={"subscription_id": row["subscription_id"],
                                                "resolved_supabase_user_id": expected_id,
                                                "previous": current}))
        return out


RULE = MetadataResolved(id="metadata_resolved", severity="warning", family="identity", fixable=True,
                        description="every subscription's metadata.resolved_supabase_user_id equals the mapped id")
