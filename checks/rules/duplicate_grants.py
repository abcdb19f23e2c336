"""duplicate_grants [critical]: no subscription period is granted more than once.

A period's grants are the rows under its period key plus rows whose metadata names the same
subscription and period (a webhook retry under its own key); a renewal granting the *next* period is
another period and never a duplicate. The audit's own reversals (``reconciliation_fix`` rows naming
``reverses_transaction_id``) count against their period, so a reversed duplicate stops being one.

The fix reverses the extra grant(s) with a ``reconciliation_fix`` row each (the one under the period
key is kept: it blocks future re-grants), only while the user still holds the duplicated credits. A
duplicate already spent is left for a person: taking it back would overdraw the user.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from checks.findings import Finding
from checks.gx_adapter import expectations as gxe
from checks.rules.base import Rule, opt

if TYPE_CHECKING:
    import pandas as pd


def _parse_rows(text: Any) -> list[tuple[int, int, bool]]:
    if not isinstance(text, str) or not text:
        return []
    out = []
    for part in text.split():
        tx, amount, canonical = part.split(":")
        out.append((int(tx), int(amount), canonical == "1"))
    return out


class DuplicateGrants(Rule):
    frame_columns = ("subscription_id", "bestauth_user_id")
    columns = ("bestauth_user_id", "subscription_id")
    id_columns = ("subscription_id", "period_date")
    state_rows = False

    def frame(self, state: "pd.DataFrame", snapshot: Any, config: Any) -> "pd.DataFrame":
        import pandas as pd

        pg = snapshot.table("period_grants")
        pg = pg[pg["subscription_id"].notna() & pg["period_date"].notna()]
        keys = ["subscription_id", "period_date"]
        # almost every period sits under one points id (one row here); only the others need grouping
        shared = pg.duplicated(keys, keep=False).to_numpy()
        one = pg.loc[~shared, [*keys, "grants", "reversals"]]
        many = pg.loc[shared].groupby(keys, sort=False, as_index=False, observed=True).agg(
            grants=("grants", "sum"), reversals=("reversals", "sum"))
        per = pd.concat([one, many], ignore_index=True) if len(many) else one.reset_index(drop=True)
        per["net_grants"] = per["grants"] - per["reversals"]
        # who the period belongs to, looked up only where it can matter (findings name the user)
        suspect = per["net_grants"].to_numpy() > 1
        per["bestauth_user_id"] = None
        if suspect.any():
            subs = state.loc[state["subscription_id"].isin(set(per.loc[suspect, "subscription_id"])),
                             ["subscription_id", "bestauth_user_id"]]
            owner = dict(zip(subs["subscription_id"], subs["bestauth_user_id"], strict=True))
            per.loc[suspect, "bestauth_user_id"] = per.loc[suspect, "subscription_id"].map(owner)
        return per

    def expectations(self, config: Any, snapshot: Any = None) -> list:
        return [gxe().ExpectColumnValuesToBeBetween(column="net_grants", max_value=1)]

    def findings_for(self, rows: "pd.DataFrame", failed: dict[int, list[str]], config: Any,
                     snapshot: Any) -> list[Finding]:
        pg = snapshot.table("period_grants")
        wanted = pg["subscription_id"].isin(set(rows["subscription_id"])) & pg["period_date"].isin(set(rows["period_date"]))
        by_period: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for g in pg[wanted].to_dict("records"):
            by_period.setdefault((g["subscription_id"], g["period_date"]), []).append(g)
        balances = snapshot.table("points_balances").set_index("user_id")
        out = []
        for row in rows.to_dict("records"):
            groups = by_period.get((row["subscription_id"], row["period_date"]), [])
            holders = sorted({g["user_id"] for g in groups})
            grant_rows: list[tuple[int, int, bool]] = []
            reversed_ids: set[int] = set()
            for g in groups:
                grant_rows += _parse_rows(g["grant_rows"])
                reversed_ids |= {int(x) for x in str(opt(g["reversed_ids"]) or "").split() if x.isdigit()}
            grant_rows.sort()
            live_rows = [r for r in grant_rows if r[0] not in reversed_ids]
            keep = next((r for r in live_rows if r[2]), live_rows[0] if live_rows else None)
            extra = [r for r in live_rows if r is not keep]
            uid = holders[0] if len(holders) == 1 else None
            found = {"period": row["period_date"], "grants": int(row["grants"]), "reversed": int(row["reversals"]),
                     "transactions": [r[0] for r in grant_rows]}
            expected = {"period": row["period_date"], "grants": 1}
            finding_row = {"bestauth_user_id": row.get("bestauth_user_id"), "user_id": uid or ",".join(holders)}
            extra_amount = sum(r[1] for r in extra)
            fix, reason, params = None, None, None
            if uid is None:
                reason = f"the period was granted to {len(holders)} different points ids: a person must decide"
            else:
                spendable = 0
                if uid in balances.index:
                    spendable = int(balances.at[uid, "balance"]) - int(balances.at[uid, "reserved"])
                if spendable < extra_amount:
                    reason = (f"duplicate grant already spent: the user holds {spendable} spendable credits, "
                              f"reversing {extra_amount} would overdraw: a person must decide")
                else:
                    fix = "reverse_duplicate_grant"
                    params = {"user_id": uid, "subscription_id": row["subscription_id"],
                              "period_date": row["period_date"], "kept_transaction_id": keep[0] if keep else None,
                              "reverse": [{"transaction_id": r[0], "amount": r[1]} for r in extra]}
            out.append(self.finding(finding_row, expected=expected, found=found, fix=fix, reason=reason,
                                    params=params))
        return out


RULE = DuplicateGrants(id="duplicate_grants", severity="critical", family="funding", fixable=True,
                       description="no subscription period is granted more than once")
