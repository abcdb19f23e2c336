"""ledger_integrity [critical]: for every points user, balance = sum of ledger amounts = lifetime_earned
- lifetime_spent (and each lifetime total matches the ledger), balance >= 0, and each ledger row's
balance_after follows from the row before it (the first row: its own amount).

The ledger wins. A drifted cache is rebuilt from the ledger (``audit_rebuild_balance``, before and after
recorded in the fix log). A broken ``balance_after`` chain is history: ledger rows are never rewritten,
so it is reported for a person, with the first offending row.

With ``as_of`` the cache (which has no history) cannot be compared with a past ledger; only the chain
and the ledger's own sums are checked then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from checks.findings import Finding
from checks.gx_adapter import expectations as gxe
from checks.rules.base import Rule, opt

if TYPE_CHECKING:
    import pandas as pd


class LedgerIntegrity(Rule):
    frame_columns = ("has_balance_row", "ledger_rows", "user_id", "bestauth_user_id", "balance", "lifetime_earned",
                     "lifetime_spent", "ledger_sum", "ledger_earned", "ledger_spent", "chain_breaks")
    columns = ("bestauth_user_id", "user_id", "has_balance_row", "balance", "lifetime_earned", "lifetime_spent",
               "reserved", "ledger_rows", "ledger_sum", "ledger_earned", "ledger_spent", "chain_breaks",
               "first_break_id")

    def frame(self, state: "pd.DataFrame", snapshot: Any, config: Any) -> "pd.DataFrame":
        rows = state[state["has_balance_row"] | (state["ledger_rows"] > 0)]
        rows = rows.drop_duplicates("user_id")  # two BestAuth users resolving to one id: check the id once
        return rows.assign(cache_net=rows["lifetime_earned"] - rows["lifetime_spent"],
                           ledger_net=rows["ledger_earned"] - rows["ledger_spent"])

    def expectations(self, config: Any, snapshot: Any = None) -> list:
        g = gxe()
        exps = [g.ExpectColumnValuesToBeBetween(column="ledger_sum", min_value=0),
                g.ExpectColumnPairValuesToBeEqual(column_A="ledger_sum", column_B="ledger_net"),
                g.ExpectColumnValuesToBeBetween(column="chain_breaks", max_value=0)]
        if snapshot is None or snapshot.as_of is None:
            exps += [g.ExpectColumnValuesToBeInSet(column="has_balance_row", value_set=[True]),
                     g.ExpectColumnValuesToBeBetween(column="balance", min_value=0),
                     g.ExpectColumnPairValuesToBeEqual(column_A="balance", column_B="ledger_sum"),
                     g.ExpectColumnPairValuesToBeEqual(column_A="balance", column_B="cache_net"),
                     g.ExpectColumnPairValuesToBeEqual(column_A="lifetime_earned", column_B="ledger_earned"),
                     g.ExpectColumnPairValuesToBeEqual(column_A="lifetime_spent", column_B="ledger_spent")]
        return exps

    def findings_for(self, rows: "pd.DataFrame", failed: dict[int, list[str]], config: Any,
                     snapshot: Any) -> list[Finding]:
        live = snapshot.as_of is None
        out = []
        for i, row in enumerate(rows.to_dict("records")):
            cache = ({"balance": int(row["balance"]), "lifetime_earned": int(row["lifetime_earned"]),
                      "lifetime_spent": int(row["lifetime_spent"])} if row["has_balance_row"] else None)
            ledger = {"balance": int(row["ledger_sum"]), "lifetime_earned": int(row["ledger_earned"]),
                      "lifetime_spent": int(row["ledger_spent"])}
            found: dict[str, Any] = {"cache": cache, "ledger": ledger, "ledger_rows": int(row["ledger_rows"])}
            expected: dict[str, Any] = {"cache": ledger if live else "(not compared as of a past instant)",
                                        "chain_breaks": 0}
            breaks = int(row["chain_breaks"])
            if breaks:
                found["chain_breaks"] = breaks
                found["first_break_transaction_id"] = opt(row.get("first_break_id"))
            cache_wrong = live and (cache is None or cache != ledger)
            notes = []
            if breaks:
                notes.append(f"ledger row {opt(row.get('first_break_id'))}'s balance_after does not follow the "
                             f"row before it ({breaks} break(s)); ledger rows are never rewritten: review them")
            fix, params = None, None
            if row["ledger_sum"] < 0:
                notes.append("the ledger sums below zero: a person must review it")
            elif cache_wrong and row["reserved"] > row["ledger_sum"]:
                notes.append(f"{int(row['reserved'])} credits are reserved but the ledger holds "
                             f"{int(row['ledger_sum'])}: a person must decide")
            elif cache_wrong:
                fix = "rebuild_balance"
                params = {"user_id": row["user_id"], "before": cache, "after": ledger}
            out.append(self.finding(row, expected=expected, found=found, fix=fix,
                                    reason="; ".join(notes) or None, params=params))
        return out


RULE = LedgerIntegrity(id="ledger_integrity", severity="critical", family="integrity", fixable=True,
                       description="balance = sum(ledger) = earned - spent, balance >= 0, balance_after chain")
