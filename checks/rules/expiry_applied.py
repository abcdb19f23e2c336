"""expiry_applied [warning, fixable]: no lot whose expiry has passed (as of the snapshot) still holds
credits that an active hold does not protect: their `expiry` ledger rows are missing.

Expiry is written lazily (before any operation of the user) and by the daily sweep, so a user nobody
touched since a lot expired, with the sweep not run, still shows those credits in the balance. What
the fix would write off per user (``overdue``) is computed like ``public.expire_lots`` does: the due
lots' credits, less what their rollover policy may keep (counted generously: a due lot is reported only
when even its whole cap could not keep it), at most the credits no active reservation holds (held
credits do not expire under the hold). A lot already rolled over carries its new expiry and is not due.

The fix calls ``public.expire_lots(user)`` (idempotent: keys ``expiry:<lot>:<credits so far>``), which
also rolls over what the policy keeps; a second run finds nothing due.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from checks.findings import Finding
from checks.gx_adapter import expectations as gxe
from checks.rules.base import Rule
from checks.rules.lifecycle_common import FAMILY, owners, words

if TYPE_CHECKING:
    import pandas as pd


class ExpiryApplied(Rule):
    frame_columns = ("user_id", "bestauth_user_id")
    id_columns = ("user_id",)
    state_rows = False

    def frame(self, state: "pd.DataFrame", snapshot: Any, config: Any) -> "pd.DataFrame":
        import numpy as np

        lots = snapshot.table("lots_by_user")
        lots = lots[lots["lots"] > 0]
        due = (lots["due_credits"] - lots["rollable_credits"]).to_numpy()
        spendable = (lots["lots_remaining"] - lots["held"]).to_numpy()
        frame = lots[["user_id", "due_lots", "due_credits", "rollable_credits", "held", "lots_remaining",
                      "due_lot_ids"]].copy()
        frame["overdue"] = np.maximum(0, np.minimum(due, spendable))
        frame["bestauth_user_id"] = None
        bad = frame["overdue"].to_numpy() > 0
        if bad.any():
            frame.loc[bad, "bestauth_user_id"] = frame.loc[bad, "user_id"].map(
                owners(state, set(frame.loc[bad, "user_id"])))
        return frame

    def expectations(self, config: Any, snapshot: Any = None) -> list:
        return [gxe().ExpectColumnValuesToBeBetween(column="overdue", max_value=0)]

    def findings_for(self, rows: "pd.DataFrame", failed: dict[int, list[str]], config: Any,
                     snapshot: Any) -> list[Finding]:
        out = []
        for row in rows.to_dict("records"):
            lot_ids = [int(x) for x in words(row["due_lot_ids"])]
            found = {"lots_past_expiry": lot_ids, "credits_past_expiry": int(row["due_credits"]),
                     "held_by_reservations": int(row["held"]), "unexpired_credits": int(row["overdue"])}
            if row["rollable_credits"]:
                found["rollover_may_keep"] = int(row["rollable_credits"])
            expected = {"unexpired_credits": 0, "as_of": snapshot.cutoff.isoformat()}
            params = {"user_id": row["user_id"], "due_lot_ids": " ".join(map(str, lot_ids)),
                      "credits": int(row["overdue"])}
            out.append(self.finding(row, expected=expected, found=found, fix="expire_lots", params=params))
        return out


RULE = ExpiryApplied(id="expiry_applied", severity="warning", family=FAMILY, fixable=True,
                     description="no lot past its expiry still holds credits no active hold protects "
                                 "(its expiry rows are missing)")
