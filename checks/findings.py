"""A finding: one rule broken for one user (or one subscription period), in words a person can act on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("warning", "critical")


def plain(value: Any) -> Any:
    """numpy / pandas scalars and containers as plain JSON-able Python values."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, bool, int, float)):
        return value
    item = getattr(value, "item", None)  # numpy scalar
    if callable(item):
        try:
            return plain(item())
        except (TypeError, ValueError):
            pass
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
        if isinstance(value, pd.Timestamp):
            return value.isoformat()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    bestauth_user_id: str | None
    user_id: str | None
    expected: Any
    found: Any
    fix: str | None  # planned fix action, or None: a person must decide (see reason)
    reason: str | None = None  # why there is no fix, or what the fix rests on
    # what the planned fix needs (ids, amounts, keys); not part of the contract's JSON
    params: dict[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        doc = {"rule": self.rule, "severity": self.severity, "bestauth_user_id": self.bestauth_user_id,
               "user_id": self.user_id, "expected": plain(self.expected), "found": plain(self.found),
               "fix": self.fix}
        if self.reason:
            doc["reason"] = self.reason
        return doc
