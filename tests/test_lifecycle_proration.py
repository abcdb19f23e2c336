"""Proration arithmetic (pure, property-based): credits are conserved across any sequence of plan changes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.proration import ROUNDINGS, ProrationState, classify, fraction_left, round_credits, upgrade

ALLOC = st.integers(1, 100_000)
SHARE = st.fractions(min_value=0, max_value=1, max_denominator=10**9)
FAST = settings(max_examples=300, deadline=None)


def _run(base: int, plans: list[int], lefts: list[Fraction], rounding: str) -> tuple[list[int], Fraction]:
    """Apply plan changes in order (an allocation per change, time left non-increasing); downgrades and
    same-plan events grant nothing. Returns the grants and the exact prorated entitlement by hand."""
    state, current, grants, exact = ProrationState(), base, [], Fraction(0)
    for alloc, left in zip(plans, lefts, strict=True):
        if classify(current, alloc) == "upgrade":
            grant, state = upgrade(state, current, alloc, left, rounding)
            exact += (alloc - current) * left
            grants.append(grant)
            current = alloc
        else:
            grants.append(0)  # downgrade: pending until the period's end; same: nothing
    return grants, exact


@st.composite
def change_sequences(draw: st.DrawFn) -> tuple[int, list[int], list[Fraction]]:
    base = draw(ALLOC)
    plans = draw(st.lists(ALLOC, min_size=1, max_size=12))
    lefts = sorted(draw(st.lists(SHARE, min_size=len(plans), max_size=len(plans))), reverse=True)
    return base, plans, lefts


@FAST
@given(seq=change_sequences(), rounding=st.sampled_from(ROUNDINGS))
def test_any_sequence_grants_the_rounded_exact_entitlement_once(seq, rounding) -> None:
    base, plans, lefts = seq
    grants, exact = _run(base, plans, lefts, rounding)
    assert all(g >= 0 for g in grants)
    total = sum(grants)
    assert total == round_credits(exact, rounding)  # one rounding for the whole period, not one per step
    assert abs(total - exact) < 1
    if rounding == "down":
        assert total <= exact
    if rounding == "up":
        assert total >= exact
    # never more than the difference between the highest plan reached and the first one
    assert 0 <= total <= max([base, *plans]) - base


@FAST
@given(base=ALLOC, steps=st.lists(ALLOC, min_size=1, max_size=6), left=SHARE, rounding=st.sampled_from(ROUNDINGS))
def test_path_independent_at_one_instant(base, steps, left, rounding) -> None:
    """Upgrading A -> B -> C at one moment grants what A -> C does."""
    ladder = sorted({base, *steps})
    ladder = [a for a in ladder if a >= base]
    if len(ladder) < 2:
        return
    stepwise, _ = _run(base, ladder[1:], [left] * (len(ladder) - 1), rounding)
    direct, _ = _run(base, [ladder[-1]], [left], rounding)
    assert sum(stepwise) == sum(direct)


@FAST
@given(seq=change_sequences(), rounding=st.sampled_from(ROUNDINGS))
def test_state_round_trips_through_its_stored_form(seq, rounding) -> None:
    """The handler stores the state with each change; decoding it mid-sequence changes nothing."""
    base, plans, lefts = seq
    state, current, total = ProrationState(), base, 0
    for alloc, left in zip(plans, lefts, strict=True):
        if alloc > current:
            grant, state = upgrade(ProrationState.decode(state.encode()), current, alloc, left, rounding)
            total += grant
            current = alloc
    assert total == sum(_run(base, plans, lefts, rounding)[0])


def test_fraction_left_is_exact_and_clamped() -> None:
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    end = start + timedelta(days=30)
    assert fraction_left(start, end, start) == 1
    assert fraction_left(start, end, start - timedelta(days=3)) == 1
    assert fraction_left(start, end, end) == 0
    assert fraction_left(start, end, end + timedelta(seconds=1)) == 0
    assert fraction_left(start, end, start + timedelta(days=10)) == Fraction(2, 3)
    with pytest.raises(ValueError):
        fraction_left(end, start, start)
    with pytest.raises(ValueError):
        fraction_left(start.replace(tzinfo=None), end, start)


def test_upgrade_examples_and_refusals() -> None:
    # pro (800) -> pro_plus (2000) with a third of the month left: 400 credits
    grant, state = upgrade(ProrationState(), 800, 2000, Fraction(1, 3), "down")
    assert grant == 400 and state.granted == 400
    # 1200 x 1/7 = 171.43: down 171, up 172, half_even 171
    assert [upgrade(ProrationState(), 800, 2000, Fraction(1, 7), r)[0] for r in ROUNDINGS] == [171, 171, 172]
    assert upgrade(ProrationState(), 800, 2000, Fraction(0), "up")[0] == 0  # at the period's end: nothing
    with pytest.raises(ValueError):
        upgrade(ProrationState(), 2000, 800, Fraction(1, 2), "down")
    with pytest.raises(ValueError):
        upgrade(ProrationState(), 800, 2000, Fraction(3, 2), "down")
    with pytest.raises(ValueError):
        round_credits(Fraction(1, 2), "sideways")
    assert classify(800, 9600) == "upgrade" and classify(9600, 800) == "downgrade" and classify(5, 5) == "same"
