"""The per-user frame every rule reads: who the user is, which points id their credits live under,
what they pay for, what the balance cache says and what the ledger says.

One row per BestAuth user, plus one per *orphan* points user (a balance row or ledger rows under an
id no BestAuth user resolves to). Built with vectorised joins only: no per-user Python.

Id resolution is the app's (mapping, else the first valid UUID in the subscription metadata, else
the BestAuth id); on top of it this frame records the *evidence* a fix may act on for an unmapped
user (``mapping_candidate``) and why there is none (``mapping_problem``), so every rule plans from the
same answer to "whose credits are these".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ledger.config import PAID_STATUSES, CreditsConfig

if TYPE_CHECKING:
    import pandas as pd

    from checks.snapshot import Snapshot

_INT_COLUMNS = ("balance", "lifetime_earned", "lifetime_spent", "reserved", "ledger_rows", "ledger_sum",
                "ledger_earned", "ledger_spent", "chain_breaks", "failures_last_hour", "failed_amount",
                "current_grants", "current_grants_elsewhere", "current_granted", "allocation")


def _allocations(config: CreditsConfig) -> dict[tuple[str, str], int]:
    return {(tier, cycle): getattr(cfg, cycle) for tier, cfg in config.tiers.items()
            for cycle in ("monthly", "yearly")}


def current_period_grants(snapshot: "Snapshot") -> "pd.DataFrame":
    """Grants of each subscription's *current* period, per points id they went to (net of reversals)."""
    import pandas as pd

    subs = snapshot.table("subscriptions")[["subscription_id", "period_date"]]
    pg = snapshot.table("period_grants")
    cur = pg.merge(subs, on=["subscription_id", "period_date"], how="inner")
    cur = cur.assign(net=cur["grants"] - cur["reversals"], net_amount=cur["granted"] - cur["reversed"])
    return cur[["subscription_id", "period_date", "user_id", "grants", "reversals", "net", "net_amount",
                "canonical"]].reset_index(drop=True) if len(cur) else pd.DataFrame(
        columns=["subscription_id", "period_date", "user_id", "grants", "reversals", "net", "net_amount",
                 "canonical"])


def user_state(snapshot: "Snapshot", config: CreditsConfig) -> "pd.DataFrame":
    import numpy as np
    import pandas as pd

    users = snapshot.table("bestauth_users")[["bestauth_user_id", "email"]]
    state = users.merge(snapshot.table("user_id_mapping"), on="bestauth_user_id", how="left")
    subs = snapshot.table("subscriptions")
    state = state.merge(subs, on="bestauth_user_id", how="left")
    state["has_subscription"] = state["subscription_id"].notna()
    state["metadata_user_id"] = (state["meta_resolved_id"].fillna(state["meta_supabase_id"])
                                 .fillna(state["meta_original_id"]))
    state["user_id"] = state["mapped_user_id"].fillna(state["metadata_user_id"]).fillna(state["bestauth_user_id"])
    state["resolution_source"] = np.select(
        [state["mapped_user_id"].notna(), state["metadata_user_id"].notna()], ["mapping", "metadata"],
        default="bestauth_id")
    state["tier"] = state["tier"].fillna("free")
    alloc = pd.DataFrame([(t, c, a) for (t, c), a in _allocations(config).items()],
                         columns=["tier", "billing_cycle", "allocation"])
    state = state.merge(alloc, on=["tier", "billing_cycle"], how="left")
    state["paid_tier"] = state["tier"] != "free"
    state["tier_configured"] = ~state["paid_tier"] | state["tier"].isin(list(config.tiers))
    state["paid_current"] = state["paid_tier"] & state["status"].isin(list(PAID_STATUSES))
    state["orphan"] = False

    # points ids holding credits that no BestAuth user resolves to
    balances = snapshot.table("points_balances")
    ledger = snapshot.table("ledger_by_user")
    known = set(state["user_id"])
    orphan_ids = sorted((set(balances["user_id"]) | set(ledger["user_id"])) - known)
    if orphan_ids:
        orphans = pd.DataFrame({"user_id": orphan_ids, "orphan": True, "tier": None, "paid_tier": False,
                                "paid_current": False, "has_subscription": False, "tier_configured": True,
                                "allocation": 0, "resolution_source": "orphan"})
        state = pd.concat([state, orphans], ignore_index=True)

    bal = balances.assign(has_balance_row=True)
    state = state.merge(bal, on="user_id", how="left")
    state["has_balance_row"] = state["has_balance_row"].fillna(False).astype(bool)
    state = state.merge(ledger, on="user_id", how="left")
    state = state.merge(snapshot.table("failed_deductions")[["user_id", "failures_last_hour", "failed_amount"]],
                        on="user_id", how="left")

    # the current period's grants: to the resolved id, and to any other id
    cur = current_period_grants(snapshot)
    to_user = cur.merge(state[["subscription_id", "user_id"]].dropna(), on=["subscription_id", "user_id"])
    agg_user = to_user.groupby("subscription_id", sort=False).agg(
        current_grants=("net", "sum"), current_granted=("net_amount", "sum"))
    agg_all = cur.groupby("subscription_id", sort=False).agg(all_net=("net", "sum"),
                                                            any_canonical=("canonical", "any"))
    state = state.merge(agg_user, left_on="subscription_id", right_index=True, how="left")
    state = state.merge(agg_all, left_on="subscription_id", right_index=True, how="left")
    state["current_grants_elsewhere"] = state["all_net"].fillna(0) - state["current_grants"].fillna(0)
    state["current_key_used"] = state["any_canonical"].fillna(False).astype(bool)
    state = state.drop(columns=["all_net", "any_canonical"])

    for col in _INT_COLUMNS:
        state[col] = state[col].fillna(0).astype("int64")
    state["first_break_id"] = state["first_break_id"].astype("Int64")
    state["last_balance_after"] = state["last_balance_after"].astype("Int64")

    _mapping_evidence(state, snapshot)
    return state.reset_index(drop=True)


def _mapping_evidence(state: "pd.DataFrame", snapshot: "Snapshot") -> None:
    """For each unmapped user, the one points id the evidence names, or why there is none.

    Evidence: the subscription metadata's ids (any of the three keys), the points ids that hold this
    subscription's grants, and the BestAuth id itself when credits live under it. One distinct id is
    unambiguous; none means no credits exist anywhere for the user, so the BestAuth id (what the app
    already resolves to) is mapped; two or more, or an id another user is mapped to, needs a person.
    """
    import pandas as pd

    state["mapping_candidate"] = state["mapped_user_id"]
    state["mapping_evidence"] = pd.Series([None] * len(state), dtype="object")
    state["mapping_problem"] = pd.Series([None] * len(state), dtype="object")
    unmapped = state.index[state["mapped_user_id"].isna() & ~state["orphan"]]
    if len(unmapped) == 0:
        return
    holders = set(snapshot.table("points_balances")["user_id"]) | set(snapshot.table("ledger_by_user")["user_id"])
    taken = dict(zip(snapshot.table("user_id_mapping")["mapped_user_id"],
                     snapshot.table("user_id_mapping")["bestauth_user_id"], strict=True))
    pg = snapshot.table("period_grants")
    grant_holders: dict[str, set[str]] = {}
    sub_ids = set(state.loc[unmapped, "subscription_id"].dropna())
    mine = pg[pg["subscription_id"].isin(sub_ids)]
    for sid, uid in zip(mine["subscription_id"], mine["user_id"], strict=True):
        grant_holders.setdefault(sid, set()).add(uid)
    cols = ["bestauth_user_id", "subscription_id", "meta_resolved_id", "meta_supabase_id", "meta_original_id"]
    candidates, evidence, problems = [], [], []
    for bid, sid, *meta in state.loc[unmapped, cols].itertuples(index=False, name=None):
        found: dict[str, list[str]] = {}
        for key, value in zip(("metadata.resolved_supabase_user_id", "metadata.supabase_user_id",
                               "metadata.original_userId"), meta, strict=True):
            if isinstance(value, str):
                found.setdefault(value, []).append(key)
        for uid in sorted(grant_holders.get(sid, ())) if isinstance(sid, str) else ():
            found.setdefault(uid, []).append("ledger grants of the subscription")
        if bid in holders:
            found.setdefault(bid, []).append("credits held under the BestAuth id")
        if not found:
            cand, ev, problem = bid, "no credits anywhere: map to the BestAuth id the app already uses", None
        elif len(found) == 1:
            cand = next(iter(found))
            ev, problem = ", ".join(found[cand]), None
        else:
            cand, ev = None, "; ".join(f"{u} ({', '.join(k)})" for u, k in found.items())
            problem = f"conflicting ids in the evidence: {ev}"
        if cand is not None and taken.get(cand) not in (None, bid):
            problem = f"points id {cand} is already mapped to BestAuth user {taken[cand]}"
            cand = None
        candidates.append(cand)
        evidence.append(ev)
        problems.append(problem)
    state.loc[unmapped, "mapping_candidate"] = candidates
    state.loc[unmapped, "mapping_evidence"] = evidence
    state.loc[unmapped, "mapping_problem"] = problems
