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

from checks.frame_reader import arrow_strings
from ledger.config import PAID_STATUSES, CreditsConfig

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from checks.snapshot import Snapshot

# a handful of values a million times: categorical codes, not strings
_LOW_CARDINALITY = ("tier", "billing_cycle", "status", "period_date")

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
            arr = arrow_strings(snapshot.frames[frame][col])
            chunks.extend(arr.chunks)
            sizes.append(len(arr))
        everything = pa.chunked_array(chunks, type=pa.large_string())
        # one hash pass; Arrow's encoder is stateful across chunks, so every chunk shares one dictionary
        encoded = pc.dictionary_encode(everything)
        self.universe = encoded.chunks[-1].dictionary if encoded.num_chunks else pa.array([], pa.large_string())
        codes = (np.concatenate([c.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype("int64")
                                 for c in encoded.chunks]) if encoded.num_chunks else np.zeros(0, "int64"))
        bounds = np.cumsum([0, *sizes])
        self.codes = {key: codes[bounds[i]:bounds[i + 1]] for i, key in enumerate(present)}

    def code(self, frame: str, column: str) -> "np.ndarray":
        return self.codes[(frame, column)]

    def strings(self, codes: "np.ndarray") -> list[str]:
        return self.universe.take(codes).to_pylist()

    def spell(self, codes: "np.ndarray") -> "pd.Series":
        """The id strings of (valid) codes, as an Arrow-backed column."""
        return self.universe.take(codes).to_pandas()


def current_period_grants(snapshot: "Snapshot", ids: "IdCodes | None" = None) -> "pd.DataFrame":
    """Grants of each subscription's *current* period, per points id they went to (net of reversals):
    columns ``_sid`` / ``_uid`` (id codes of subscription and points id), grants, reversals, net,
    net_amount, canonical. Matched on codes and one vectorised period comparison: no frame-wide merge."""
    import pandas as pd

    ids = ids or IdCodes(snapshot)
    subs = snapshot.table("subscriptions")
    pg = snapshot.table("period_grants")
    sid = ids.code("period_grants", "subscription_id")
    pos = _lookup(ids.code("subscriptions", "subscription_id"), len(ids.universe))[sid]
    current = _gather(subs["period_date"], pos)  # the subscription's current period, per grant group
    mask = (pos >= 0) & (pg["period_date"].to_numpy(dtype=object, na_value=None) == current.to_numpy(
        dtype=object, na_value=None)) if len(pg) else pos >= 0
    grants, reversals = pg["grants"].to_numpy()[mask], pg["reversals"].to_numpy()[mask]
    return pd.DataFrame({"_sid": sid[mask], "_uid": ids.code("period_grants", "user_id")[mask],
                         "grants": grants, "reversals": reversals, "net": grants - reversals,
                         "net_amount": pg["granted"].to_numpy()[mask] - pg["reversed"].to_numpy()[mask],
                         "canonical": pg["canonical"].to_numpy()[mask]})


def _lookup(keys: "np.ndarray", size: int) -> "np.ndarray":
    """code -> row position in a frame whose key column is ``keys`` (unique codes); -1 when absent.

    One slot more than the universe so that the code -1 (missing id) looks up position -1.
    """
    import numpy as np

    lut = np.full(size + 1, -1, dtype="int64")
    ok = keys >= 0
    lut[keys[ok]] = np.flatnonzero(ok)
    return lut


def _gather(column: "pd.Series", pos: "np.ndarray", fill: Any = None) -> Any:
    """``column`` at positions ``pos`` (-1: missing -> ``fill`` or NA), without a frame-wide merge."""
    import numpy as np
    from pandas.api.extensions import take

    values = column.array if not isinstance(column.dtype, np.dtype) else column.to_numpy()
    if fill is None:
        return take(values, pos, allow_fill=True)
    return take(values, pos, allow_fill=True, fill_value=fill)


def _codes_at(codes: "np.ndarray", pos: "np.ndarray") -> "np.ndarray":
    import numpy as np

    if len(codes) == 0:
        return np.full(len(pos), -1, dtype="int64")
    return np.where(pos >= 0, codes[np.maximum(pos, 0)], -1)


def user_state(snapshot: "Snapshot", config: CreditsConfig, *, consume: bool = False) -> "pd.DataFrame":
    """One row per BestAuth user (+ orphan points users). 1:1 lookups are position gathers on integer
    id codes, so a million-row state is built without copying the whole frame once per join.

    ``consume=True`` drops the identity frames (users, mappings, subscriptions) from the snapshot as
    soon as their columns are in the state: the audit's own snapshots, to bound peak memory.
    """
    import numpy as np
    import pandas as pd

    ids = IdCodes(snapshot)
    size = len(ids.universe)
    cur = current_period_grants(snapshot, ids)
    users = snapshot.table("bestauth_users")
    state = pd.DataFrame({"bestauth_user_id": users["bestauth_user_id"], "email": users["email"],
                          "_bid": ids.code("bestauth_users", "bestauth_user_id")})
    bid = state["_bid"].to_numpy()

    mapping = snapshot.table("user_id_mapping")
    pos = _lookup(ids.code("user_id_mapping", "bestauth_user_id"), size)[bid]
    state["mapped_user_id"] = _gather(mapping["mapped_user_id"], pos)
    mapped = _codes_at(ids.code("user_id_mapping", "mapped_user_id"), pos)

    subs = snapshot.table("subscriptions")
    pos = _lookup(ids.code("subscriptions", "bestauth_user_id"), size)[bid]
    sub_codes = {c: _codes_at(ids.code("subscriptions", c), pos)
                 for c in ("subscription_id", "meta_resolved_id", "meta_supabase_id", "meta_original_id")}
    for col in [c for c in subs.columns if c != "bestauth_user_id"]:
        values = _gather(subs[col], pos)
        state[col] = values.astype("category") if col in _LOW_CARDINALITY else values
        if consume:  # the snapshot's own frame gives its memory up column by column
            del subs[col]
    meta = np.where(sub_codes["meta_resolved_id"] >= 0, sub_codes["meta_resolved_id"],
                    np.where(sub_codes["meta_supabase_id"] >= 0, sub_codes["meta_supabase_id"],
                             sub_codes["meta_original_id"]))
    state["_sid"] = sub_codes["subscription_id"]
    state["has_subscription"] = pos >= 0
    # the app's resolution: mapping, else the first metadata id, else the BestAuth id (on codes, then spelled)
    state["_uid"] = np.where(mapped >= 0, mapped, np.where(meta >= 0, meta, bid))
    state["user_id"] = ids.spell(state["_uid"].to_numpy())
    state["resolution_source"] = pd.Categorical.from_codes(
        np.select([mapped >= 0, meta >= 0], [0, 1], default=2), categories=["mapping", "metadata", "bestauth_id"])
    tier = state["tier"].cat.add_categories(["free"]) if "free" not in state["tier"].cat.categories \
        else state["tier"]
    state["tier"] = tier.fillna("free")
    allocation = np.zeros(len(state), dtype="int64")
    for (tier_name, cycle), amount in _allocations(config).items():
        allocation[((state["tier"] == tier_name) & (state["billing_cycle"] == cycle)).to_numpy()] = amount
    state["allocation"] = allocation
    state["paid_tier"] = state["tier"] != "free"
    state["tier_configured"] = ~state["paid_tier"] | state["tier"].isin(list(config.tiers))
    state["paid_current"] = state["paid_tier"] & state["status"].isin(list(PAID_STATUSES))
    state["orphan"] = False
    del users, mapping, subs
    if consume:
        for name in ("bestauth_users", "subscriptions"):
            snapshot.frames.pop(name, None)
        release_memory()

    # points ids holding credits that no BestAuth user resolves to
    bal_k, led_k = ids.code("points_balances", "user_id"), ids.code("ledger_by_user", "user_id")
    # a mask over the dense code space, not np.setdiff1d(np.union1d(...)): same sorted codes, 8 ms instead
    # of 2.7 s for 600k + 600k codes against 1M (those sort; the ids are NOT NULL, so no code is -1)
    held = np.zeros(size, dtype=bool)
    held[bal_k[bal_k >= 0]] = True
    held[led_k[led_k >= 0]] = True
    held[state["_uid"].to_numpy()] = False
    orphan_k = np.flatnonzero(held)
    if len(orphan_k):
        orphans = pd.DataFrame({"user_id": pd.array(ids.strings(orphan_k), dtype=state["user_id"].dtype),
                                "_uid": orphan_k, "_bid": -1, "_sid": -1, "orphan": True, "tier": None,
                                "paid_tier": False, "paid_current": False, "has_subscription": False,
                                "tier_configured": True, "allocation": 0, "resolution_source": "orphan"})
        state = pd.concat([state, orphans], ignore_index=True)
    uid = state["_uid"].to_numpy()

    balances = snapshot.table("points_balances")
    pos = _lookup(bal_k, size)[uid]
    state["has_balance_row"] = pos >= 0
    for col in ("balance", "lifetime_earned", "lifetime_spent", "reserved"):
        state[col] = _gather(balances[col], pos, 0)
    ledger = snapshot.table("ledger_by_user")
    pos = _lookup(led_k, size)[uid]
    for col in ledger.columns:
        if col != "user_id":
            state[col] = _gather(ledger[col], pos, None if col in ("first_break_id", "last_balance_after") else 0)
    fails = snapshot.table("failed_deductions")
    pos = _lookup(ids.code("failed_deductions", "user_id"), size)[uid]
    for col in ("failures_last_hour", "failed_amount"):
        state[col] = _gather(fails[col], pos, 0)

    # the current period's grants: to the resolved id, and to any other id
    sid = state["_sid"].to_numpy()
    to_user = cur.merge(pd.DataFrame({"_sid": sid[sid >= 0], "_uid": uid[sid >= 0]}), on=["_sid", "_uid"])
    agg_user = to_user.groupby("_sid", sort=False).agg(current_grants=("net", "sum"),
                                                       current_granted=("net_amount", "sum"))
    agg_all = cur.groupby("_sid", sort=False).agg(all_net=("net", "sum"), any_canonical=("canonical", "any"))
    pos = _lookup(agg_user.index.to_numpy(), size)[sid]
    state["current_grants"] = _gather(agg_user["current_grants"], pos, 0)
    state["current_granted"] = _gather(agg_user["current_granted"], pos, 0)
    pos = _lookup(agg_all.index.to_numpy(), size)[sid]
    state["current_grants_elsewhere"] = _gather(agg_all["all_net"], pos, 0) - state["current_grants"]
    state["current_key_used"] = _gather(agg_all["any_canonical"].astype(bool), pos, False)

    for col in _INT_COLUMNS:
        state[col] = state[col].fillna(0).astype("int64")
    state["first_break_id"] = state["first_break_id"].astype("Int64")
    state["last_balance_after"] = state["last_balance_after"].astype("Int64")
    for col in ("tier", "billing_cycle", "status", "period_date", "resolution_source"):
        if not isinstance(state[col].dtype, pd.CategoricalDtype):  # the orphans' concat may undo it
            state[col] = state[col].astype("category")

    del cur
    # the evidence's ids as codes: the users' own, their subscriptions' and the metadata's (users' rows
    # come first in the state, before the orphans)
    named = {"bestauth_user_id": bid, **sub_codes}
    _mapping_evidence(state, snapshot, ids, named)
    del ids, named, sub_codes
    if consume:
        snapshot.frames.pop("user_id_mapping", None)
    release_memory()
    return state.reset_index(drop=True)


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise): keeps the audit's peak down when
    a stage's temporaries are gone before the next stage allocates."""
    import ctypes
    import gc

    gc.collect()
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except ImportError:  # pragma: no cover
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _mapping_evidence(state: "pd.DataFrame", snapshot: "Snapshot", ids: IdCodes,
                      named: dict[str, "np.ndarray"]) -> None:
    """For each unmapped user, the one points id the evidence names, or why there is none.

    Evidence: the subscription metadata's ids (any of the three keys), the points ids that hold this
    subscription's grants, and the BestAuth id itself when credits live under it. One distinct id is
    unambiguous; none means no credits exist anywhere for the user, so the BestAuth id (what the app
    already resolves to) is mapped; two or more, or an id another user is mapped to, needs a person.

    ``named``: the codes (``ids``) of each user's BestAuth id, subscription id and metadata ids, one
    entry per BestAuth user in the state's row order.
    """
    import numpy as np
    import pandas as pd

    state["mapping_candidate"] = state["mapped_user_id"]
    state["mapping_evidence"] = pd.Series([None] * len(state), dtype="object")
    state["mapping_problem"] = pd.Series([None] * len(state), dtype="object")
    is_unmapped = (state["mapped_user_id"].isna() & ~state["orphan"]).to_numpy()
    unmapped = state.index[is_unmapped]
    if len(unmapped) == 0:
        return
    # only the ids these few users' evidence can name, as a mask over the id codes: a frame's rows that
    # name one are that mask gathered at the frame's codes (string isin over the frames: ~0.6 s at 1M users)
    cols = ["bestauth_user_id", "subscription_id", "meta_resolved_id", "meta_supabase_id", "meta_original_id"]
    small = np.zeros(len(ids.universe) + 1, dtype=bool)  # the last slot answers for code -1 (no id): False
    rows = np.flatnonzero(is_unmapped)

    def note(codes: "np.ndarray") -> None:
        small[codes[codes >= 0]] = True

    for col in cols:
        note(named[col][rows])

    def naming(frame: str, column: str) -> "np.ndarray":
        return small[ids.code(frame, column)]

    pg = snapshot.table("period_grants")
    of_theirs = naming("period_grants", "subscription_id")
    mine = pg[of_theirs]
    note(ids.code("period_grants", "user_id")[of_theirs])
    bal_ids, led_ids = snapshot.table("points_balances")["user_id"], snapshot.table("ledger_by_user")["user_id"]
    holders = set(bal_ids[naming("points_balances", "user_id")]) | set(led_ids[naming("ledger_by_user", "user_id")])
    mp = snapshot.table("user_id_mapping")
    mp = mp[naming("user_id_mapping", "mapped_user_id")]
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
