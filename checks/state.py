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

from typing import TYPE_CHECKING, Any

from ledger.config import PAID_STATUSES, CreditsConfig

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from checks.snapshot import Snapshot

_INT_COLUMNS = ("balance", "lifetime_earned", "lifetime_spent", "reserved", "ledger_rows", "ledger_sum",
                "ledger_earned", "ledger_spent", "chain_breaks", "failures_last_hour", "failed_amount",
                "current_grants", "current_grants_elsewhere", "current_granted", "allocation")


def _allocations(config: CreditsConfig) -> dict[tuple[str, str], int]:
    return {(tier, cycle): getattr(cfg, cycle) for tier, cfg in config.tiers.items()
            for cycle in ("monthly", "yearly")}


_ID_COLUMNS = (("bestauth_users", "bestauth_user_id"), ("user_id_mapping", "bestauth_user_id"),
               ("user_id_mapping", "mapped_user_id"), ("subscriptions", "bestauth_user_id"),
               ("subscriptions", "subscription_id"), ("subscriptions", "meta_resolved_id"),
               ("subscriptions", "meta_supabase_id"), ("subscriptions", "meta_original_id"),
               ("points_balances", "user_id"), ("ledger_by_user", "user_id"), ("failed_deductions", "user_id"),
               ("period_grants", "user_id"), ("period_grants", "subscription_id"))


class IdCodes:
    """Integer codes for every id column of a snapshot, from one Arrow hash pass.

    Joining a million rows on UUID *strings* spends most of its time hashing strings (pandas' key
    factorisation); joining on int64 codes of one shared dictionary is several times faster, and the
    string columns still travel along (Arrow takes, not Python objects). All columns are coded in one
    ``dictionary_encode`` pass; derived ids (the resolved user id)
    get their codes by the same coalesce on codes. Missing ids are -1.
    """

    def __init__(self, snapshot: "Snapshot") -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        present = [(f, c) for f, c in _ID_COLUMNS if f in snapshot.frames]
        chunks, sizes = [], []
        for frame, col in present:
            arr = self._arrow(snapshot.frames[frame][col])
            chunks.extend(arr.chunks)
            sizes.append(len(arr))
        everything = pa.chunked_array(chunks, type=pa.string())
        # one hash pass; Arrow's encoder is stateful across chunks, so every chunk shares one dictionary
        encoded = pc.dictionary_encode(everything)
        self.universe = encoded.chunks[-1].dictionary if encoded.num_chunks else pa.array([], pa.string())
        codes = (np.concatenate([c.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype("int64")
                                 for c in encoded.chunks]) if encoded.num_chunks else np.zeros(0, "int64"))
        bounds = np.cumsum([0, *sizes])
        self.codes = {key: codes[bounds[i]:bounds[i + 1]] for i, key in enumerate(present)}

    @staticmethod
    def _arrow(series: "pd.Series") -> Any:
        import pyarrow as pa

        arr = pa.array(series)
        if isinstance(arr, pa.Array):
            arr = pa.chunked_array([arr])
        return arr.cast(pa.string())

    def code(self, frame: str, column: str) -> "np.ndarray":
        return self.codes[(frame, column)]

    def strings(self, codes: "np.ndarray") -> list[str]:
        return self.universe.take(codes).to_pylist()


def current_period_grants(snapshot: "Snapshot", ids: "IdCodes | None" = None) -> "pd.DataFrame":
    """Grants of each subscription's *current* period, per points id they went to (net of reversals)."""
    ids = ids or IdCodes(snapshot)
    subs = snapshot.table("subscriptions")
    pg = snapshot.table("period_grants")
    cur_period = subs[["period_date"]].rename(columns={"period_date": "current_period"}).assign(
        _sid=ids.code("subscriptions", "subscription_id"))
    cur = pg.assign(_sid=ids.code("period_grants", "subscription_id"), _uid=ids.code("period_grants", "user_id"))
    cur = cur[cur["_sid"] >= 0].merge(cur_period, on="_sid", how="inner")
    cur = cur[cur["period_date"] == cur["current_period"]]
    cur = cur.assign(net=cur["grants"] - cur["reversals"], net_amount=cur["granted"] - cur["reversed"])
    return cur[["subscription_id", "period_date", "user_id", "grants", "reversals", "net", "net_amount",
                "canonical", "_sid", "_uid"]].reset_index(drop=True)


def user_state(snapshot: "Snapshot", config: CreditsConfig) -> "pd.DataFrame":
    import numpy as np
    import pandas as pd

    ids = IdCodes(snapshot)
    users = snapshot.table("bestauth_users")[["bestauth_user_id", "email"]]
    users = users.assign(_bid=ids.code("bestauth_users", "bestauth_user_id"))
    mapping = snapshot.table("user_id_mapping")
    mapping = mapping[["mapped_user_id"]].assign(_bid=ids.code("user_id_mapping", "bestauth_user_id"),
                                                 _mapped=ids.code("user_id_mapping", "mapped_user_id"))
    state = users.merge(mapping, on="_bid", how="left")
    subs = snapshot.table("subscriptions")
    subs = subs.drop(columns=["bestauth_user_id"]).assign(
        _bid=ids.code("subscriptions", "bestauth_user_id"), _sid=ids.code("subscriptions", "subscription_id"),
        _meta=np.where(ids.code("subscriptions", "meta_resolved_id") >= 0, ids.code("subscriptions", "meta_resolved_id"),
                       np.where(ids.code("subscriptions", "meta_supabase_id") >= 0,
                                ids.code("subscriptions", "meta_supabase_id"),
                                ids.code("subscriptions", "meta_original_id"))))
    state = state.merge(subs, on="_bid", how="left")
    for col in ("_mapped", "_sid", "_meta"):
        state[col] = state[col].fillna(-1).astype("int64")
    state["has_subscription"] = state["subscription_id"].notna()
    state["metadata_user_id"] = (state["meta_resolved_id"].fillna(state["meta_supabase_id"])
                                 .fillna(state["meta_original_id"]))
    state["user_id"] = state["mapped_user_id"].fillna(state["metadata_user_id"]).fillna(state["bestauth_user_id"])
    state["resolution_source"] = np.select(
        [state["mapped_user_id"].notna().to_numpy(), state["metadata_user_id"].notna().to_numpy()],
        ["mapping", "metadata"], default="bestauth_id")
    state["tier"] = state["tier"].fillna("free")
    alloc = _allocations(config)
    tiers = state["tier"].to_numpy(dtype=object, na_value=None)
    cycles = state["billing_cycle"].to_numpy(dtype=object, na_value=None)
    allocation = np.zeros(len(state), dtype="int64")
    for (tier, cycle), amount in alloc.items():
        allocation[(tiers == tier) & (cycles == cycle)] = amount
    state["allocation"] = allocation
    state["paid_tier"] = state["tier"] != "free"
    state["tier_configured"] = ~state["paid_tier"] | state["tier"].isin(list(config.tiers))
    state["paid_current"] = state["paid_tier"] & state["status"].isin(list(PAID_STATUSES))
    state["orphan"] = False
    mapped, meta, bid = state["_mapped"].to_numpy(), state["_meta"].to_numpy(), state["_bid"].to_numpy()
    state["_uid"] = np.where(mapped >= 0, mapped, np.where(meta >= 0, meta, bid))  # = user_id, as codes

    # points ids holding credits that no BestAuth user resolves to
    balances = snapshot.table("points_balances")
    ledger = snapshot.table("ledger_by_user")
    bal_k, led_k = ids.code("points_balances", "user_id"), ids.code("ledger_by_user", "user_id")
    orphan_k = np.setdiff1d(np.union1d(bal_k, led_k), state["_uid"].to_numpy())
    if len(orphan_k):
        orphan_ids = ids.strings(orphan_k)
        orphans = pd.DataFrame({"user_id": pd.array(orphan_ids, dtype="str"), "_uid": orphan_k, "orphan": True,
                                "tier": None, "paid_tier": False, "paid_current": False, "has_subscription": False,
                                "tier_configured": True, "allocation": 0, "resolution_source": "orphan",
                                "_bid": -1, "_sid": -1, "_mapped": -1, "_meta": -1})
        state = pd.concat([state, orphans], ignore_index=True)

    state = state.merge(balances.drop(columns=["user_id"]).assign(_uid=bal_k, has_balance_row=True),
                        on="_uid", how="left")
    state["has_balance_row"] = state["has_balance_row"].fillna(False).astype(bool)
    state = state.merge(ledger.drop(columns=["user_id"]).assign(_uid=led_k), on="_uid", how="left")
    fails = snapshot.table("failed_deductions")
    state = state.merge(fails[["failures_last_hour", "failed_amount"]].assign(_uid=ids.code("failed_deductions", "user_id")),
                        on="_uid", how="left")

    # the current period's grants: to the resolved id, and to any other id
    cur = current_period_grants(snapshot, ids)
    to_user = cur.merge(state.loc[state["_sid"] >= 0, ["_sid", "_uid"]], on=["_sid", "_uid"])
    agg_user = to_user.groupby("_sid", sort=False).agg(current_grants=("net", "sum"),
                                                       current_granted=("net_amount", "sum"))
    agg_all = cur.groupby("_sid", sort=False).agg(all_net=("net", "sum"), any_canonical=("canonical", "any"))
    state = state.merge(agg_user, left_on="_sid", right_index=True, how="left")
    state = state.merge(agg_all, left_on="_sid", right_index=True, how="left")
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
    # only the ids these few users' evidence can name: lookups against a million ids stay vectorised
    cols = ["bestauth_user_id", "subscription_id", "meta_resolved_id", "meta_supabase_id", "meta_original_id"]
    small = set()
    for col in cols:
        small.update(v for v in state.loc[unmapped, col].dropna())
    pg = snapshot.table("period_grants")
    mine = pg[pg["subscription_id"].isin(small)]
    small.update(mine["user_id"].dropna())
    bal_ids, led_ids = snapshot.table("points_balances")["user_id"], snapshot.table("ledger_by_user")["user_id"]
    holders = set(bal_ids[bal_ids.isin(small)]) | set(led_ids[led_ids.isin(small)])
    mp = snapshot.table("user_id_mapping")
    mp = mp[mp["mapped_user_id"].isin(small)]
    taken = dict(zip(mp["mapped_user_id"], mp["bestauth_user_id"], strict=True))
    grant_holders: dict[str, set[str]] = {}
    for sid, uid in zip(mine["subscription_id"], mine["user_id"], strict=True):
        grant_holders.setdefault(sid, set()).add(uid)
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
