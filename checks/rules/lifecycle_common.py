"""What the four credit-lifecycle rules share: who a points id belongs to, and the frame's text lists."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

FAMILY = "lifecycle"  # their GE suites: credit_recon.lifecycle.<rule id>


def owners(state: "pd.DataFrame", user_ids: "list[Any] | set[Any]") -> dict[str, str]:
    """points id -> BestAuth id, for the few failing rows only (a points id two users resolve to keeps
    the first; orphan points ids have none)."""
    wanted = {u for u in user_ids if isinstance(u, str)}
    if not wanted or "user_id" not in state.columns:
        return {}
    rows = state.loc[state["user_id"].isin(wanted), ["user_id", "bestauth_user_id"]]
    out: dict[str, str] = {}
    for uid, bid in rows.itertuples(index=False, name=None):
        if isinstance(bid, str) and uid not in out:
            out[uid] = bid
    return out


def words(text: Any) -> list[str]:
    """A space-separated list from the snapshot (None/NaN: empty)."""
    return text.split() if isinstance(text, str) and text else []
