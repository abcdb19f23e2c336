"""refunds_bounded [critical, report only]: no deduction refunded more than once, nor for more than it
charged.

A refund names its deduction in ``metadata.refund_of``: the ledger id (``refund_generation`` writes it,
under the key ``refund:<deduction id>``, once), or the deduction's idempotency key (refunds written
before refund_generation existed). Refund rows are grouped by the deduction they name (``refunds``
frame, SQL); a refund naming no ledger row (as of the snapshot) charged nothing and breaks the bound
on its own. A refund that is not a ``refund`` row, or names nothing, is not one this rule can judge.

Report only: taking credits back from a user is a decision for a person (the finding lists the refunds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from checks.findings import Finding
from checks.gx_adapter import expectations as gxe
from checks.rules.base import Rule, opt
from checks.rules.lifecycle_common import FAMILY, owners, words

if TYPE_CHECKING:
    import pandas as pd


class RefundsBounded(Rule):
    frame_columns = ("user_id", "bestauth_user_id")
    id_columns = ("refund_group",)
    state_rows = False

    def frame(self, state: "pd.DataFrame", snapshot: Any, config: Any) -> "pd.DataFrame":
        frame = snapshot.table("refunds").copy()
        frame["bestauth_user_id"] = None
        bad = ((frame["refunds"] > 1) | (frame["refunded"] > frame["charged"])).to_numpy()
        if bad.any():
            frame.loc[bad, "bestauth_user_id"] = frame.loc[bad, "user_id"].map(
                owners(state, set(frame.loc[bad, "user_id"])))
        return frame

    def expectations(self, config: Any, snapshot: Any = None) -> list:
        g = gxe()
        return [g.ExpectColumnValuesToBeBetween(column="refunds", max_value=1),
                g.ExpectColumnPairValuesAToBeGreaterThanB(column_A="charged", column_B="refunded", or_equal=True)]

    def findings_for(self, rows: "pd.DataFrame", failed: dict[int, list[str]], config: Any,
                     snapshot: Any) -> list[Finding]:
        out = []
        for row in rows.to_dict("records"):
            refunds = []
            for part in words(row["refund_ids"]):
                tx, amount = part.split(":")
                refunds.append({"transaction_id": int(tx), "amount": int(amount)})
            deduction = opt(row["deduction_id"])
            found = {"deduction_id": int(deduction) if deduction is not None else None,
                     "charged": int(row["charged"]), "refunds": int(row["refunds"]),
                     "refunded": int(row["refunded"]), "refund_rows": refunds}
            if deduction is None:
                found["note"] = "refund_of names no ledger row"
            expected = {"refunds": "at most 1", "refunded": f"<= {int(row['charged'])}"}
            over = int(row["refunded"]) - int(row["charged"])
            reason = (f"{over} credit(s) refunded beyond what the deduction charged" if over > 0
                      else f"deduction refunded {int(row['refunds'])} times")
            out.append(self.finding(row, expected=expected, found=found, fix=None,
                                    reason=reason + ": taking credits back is a decision for a person"))
        return out


RULE = RefundsBounded(id="refunds_bounded", severity="critical", family=FAMILY, fixable=False,
                      description="no deduction refunded more than once or for more than it charged")
