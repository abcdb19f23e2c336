"""mapping_present [warning]: every BestAuth user has a user_id_mapping row.

Without one the app falls back to metadata or the BestAuth id, so credits can land under one id and be
looked for under another. The fix creates the mapping from unambiguous evidence only (see
``checks.state._mapping_evidence``); conflicting evidence is left for a person.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from checks.findings import Finding
from checks.gx_adapter import expectations as gxe
from checks.rules.base import Rule, opt

if TYPE_CHECKING:
    import pandas as pd


class MappingPresent(Rule):
    frame_columns = ("orphan", "mapped_user_id", "bestauth_user_id", "user_id")
    columns = ("orphan", "bestauth_user_id", "user_id", "mapped_user_id", "mapping_candidate", "mapping_evidence",
               "mapping_problem", "resolution_source")

    def expectations(self, config: Any, snapshot: Any = None) -> list:
        return [gxe().ExpectColumnValuesToNotBeNull(column="mapped_user_id")]

    def findings_for(self, rows: "pd.DataFrame", failed: dict[int, list[str]], config: Any,
                     snapshot: Any) -> list[Finding]:
        out = []
        for row in rows.to_dict("records"):
            cand = opt(row.get("mapping_candidate"))
            expected = {"user_id_mapping": cand or "one points id (evidence conflicts)"}
            found = {"user_id_mapping": None, "app_resolves_to": row["user_id"],
                     "via": row["resolution_source"]}
            if cand:
                out.append(self.finding({**row, "user_id": cand}, expected=expected, found=found,
                                        fix="create_mapping", reason=f"evidence: {row.get('mapping_evidence')}",
                                        params={"supabase_user_id": cand,
                                                "evidence": opt(row.get("mapping_evidence"))}))
            else:
                out.append(self.finding(row, expected=expected, found=found, fix=None,
                                        reason=opt(row.get("mapping_problem")) or "no unambiguous evidence"))
        return out


RULE = MappingPresent(id="mapping_present", severity="warning", family="identity", fixable=True,
                      description="every BestAuth user has a user_id_mapping row")
