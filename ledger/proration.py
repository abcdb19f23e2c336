"""Proration of plan changes inside a billing period: exact fractions, one cumulative rounding.

Why cumulative: rounding every upgrade on its own can lose (or invent) up to a credit per upgrade, so a
customer who upgrades in three steps would end up with a different total than one who upgrades once to
the same plan at the same moment. Here each period keeps its prorated entitlement as an exact fraction;
an upgrade adds ``(new allocation - old allocation) x (time left / period length)`` to it, and the credits
granted for it are ``round(entitlement) - credits already granted``. So after any sequence of upgrades the
period's prorated credits are ``round(exact entitlement)``: off by less than one credit, never by one per
step, and the same whatever path led to the final plan at a given moment.

Downgrades (a smaller allocation) grant nothing and take nothing: they take effect at the period's end
(the next period is granted at the new plan). Switching monthly <-> yearly follows the same rules: the
allocations compared are the per-period allocations of the two plans, and the time fraction is measured
on the period the event names.

Pure functions only (no database): the webhook handler (ledger/subscriptions.py) stores the state it
needs (the exact entitlement as ``"p/q"`` and the credits granted) with each plan change, and the
property tests check the arithmetic on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction

ROUNDINGS = ("down", "half_even", "up")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def round_credits(value: Fraction, rounding: str) -> int:
    """A non-negative exact amount as whole credits under the configured policy."""
    if rounding == "down":
        return math.floor(value)
    if rounding == "up":
        return math.ceil(value)
    if rounding == "half_even":
        return round(value)  # Fraction.__round__ rounds half to even
    raise ValueError(f"unknown rounding {rounding!r} (expected one of {', '.join(ROUNDINGS)})")


def _micros(ts: datetime) -> int:
    if ts.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def fraction_left(period_start: datetime, period_end: datetime, at: datetime) -> Fraction:
    """Share of the period still ahead at ``at``: 1 at (or before) the start, 0 at (or after) the end.

    Measured in whole microseconds, so the result is exact and the same on every machine.
    """
    start, end, now = _micros(period_start), _micros(period_end), _micros(at)
    if end <= start:
        raise ValueError("the period must end after it starts")
    return Fraction(min(max(end - now, 0), end - start), end - start)


def classify(old_allocation: int, new_allocation: int) -> str:
    """"upgrade", "downgrade" or "same", by the per-period allocations of the two plans."""
    if new_allocation > old_allocation:
        return "upgrade"
    if new_allocation < old_allocation:
        return "downgrade"
    return "same"


@dataclass(frozen=True)
class ProrationState:
    """What a period's upgrades have added so far: the exact entitlement and the credits granted for it."""

    exact: Fraction = Fraction(0)
    granted: int = 0

    def encode(self) -> dict[str, object]:
        return {"exact": f"{self.exact.numerator}/{self.exact.denominator}", "granted": self.granted}

    @classmethod
    def decode(cls, doc: dict[str, object] | None) -> "ProrationState":
        if not doc:
            return cls()
        num, _, den = str(doc["exact"]).partition("/")
        state = cls(Fraction(int(num), int(den or 1)), int(doc["granted"]))  # type: ignore[call-overload]
        if state.exact < 0 or state.granted < 0:
            raise ValueError(f"a proration state cannot be negative: {doc}")
        return state


def upgrade(state: ProrationState, old_allocation: int, new_allocation: int, left: Fraction,
            rounding: str) -> tuple[int, ProrationState]:
    """Credits to grant for an upgrade from ``old_allocation`` to ``new_allocation`` with ``left`` of the
    period ahead, and the period's state afterwards. Never negative; 0 at the period's end."""
    if new_allocation <= old_allocation:
        raise ValueError(f"not an upgrade: {old_allocation} -> {new_allocation}")
    if not 0 <= left <= 1:
        raise ValueError(f"the time left must be a share of the period, got {left}")
    exact = state.exact + (new_allocation - old_allocation) * left
    total = round_credits(exact, rounding)
    grant = total - state.granted
    if grant < 0:  # only possible if the stored state was written under another rounding policy
        grant, total = 0, state.granted
    return grant, ProrationState(exact, total)
