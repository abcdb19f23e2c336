"""Property-based tests: random interleavings of every way credits move, checked against a model.

Hypothesis drives a state machine over a handful of users: grants, refunds, deductions, holds,
captures (whole or partial), releases, expiry (the lazy kind and the sweep), replayed keys (same or
conflicting parameters), lots (priorities, expiries, top-ups, refunds back to their lots, a lot's expiry
passing and the next operation writing it off) and subscription webhook events (retried, out of order, upgraded or downgraded
mid-period, unpaid states). After every step, for this example's users: balance = sum(ledger) =
earned - spent, balance >= 0, 0 <= reserved = active holds <= balance, the balance_after chain
holds, one ledger row per key, the lots sum to the balance -- and every balance, hold, refusal and lot's
remaining credits is what the model predicts (the model draws lots in the promised order).

Speed: one database per test, not per example; each example works in a fresh namespace of random
user ids, so nothing needs cleaning up between examples. Profiles (env CREDITS_HYPOTHESIS_PROFILE):
``ci`` (default: 300 + 60 examples), ``quick`` (for editing), ``thorough`` (before a release).
"""

from __future__ import annotations

import copy
import os
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from ledger import (
    IdempotencyConflict,
    InsufficientCredits,
    Ledger,
    RefundRefused,
    ReservationError,
    SubscriptionEvent,
)
from ledger.proration import ProrationState, fraction_left, upgrade
from ledger.subscriptions import handle_subscription_event
from tests.factories import make_user
from tests.invariants import integrity_problems

_COMMON = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
settings.register_profile("credit-recon-ci", max_examples=300, stateful_step_count=20, **_COMMON)
settings.register_profile("credit-recon-quick", max_examples=30, stateful_step_count=15, **_COMMON)
settings.register_profile("credit-recon-thorough", max_examples=2000, stateful_step_count=40, **_COMMON)
PROFILE = os.environ.get("CREDITS_HYPOTHESIS_PROFILE", "ci")
SEQUENTIAL = settings.get_profile(f"credit-recon-{PROFILE}")
CONCURRENT = settings(SEQUENTIAL, max_examples=max(SEQUENTIAL.max_examples // 3, 10),
                      stateful_step_count=max(SEQUENTIAL.stateful_step_count // 2, 4))

USERS = 3
PERIOD_BASE = datetime(2026, 1, 1, tzinfo=timezone.utc)
TIERS = {"pro": 800, "pro_plus": 2000}  # monthly allocations of the default config
LOT_EXPIRY_BASE = datetime(2031, 1, 1, tzinfo=timezone.utc)  # grants' expiries: far ahead until a rule ends them
TOP_UP_BASE = datetime(2026, 11, 1, tzinfo=timezone.utc)     # top-ups bought then expire a year later


@dataclass
class Hold:
    user: int
    amount: int
    status: str = "active"  # active | captured | released | expired
    stale: bool = False     # past expires_at, not yet freed
    captured: int | None = None


@dataclass
class LotM:
    """A lot as the model sees it; ``expiry`` sorts like the database's expires_at: (0, step) expired at that
    step, (1, datetime) in the future, (2,) never (NULLS LAST)."""

    id: int
    priority: int
    expiry: tuple
    remaining: int


@dataclass
class Model:
    balance: list[int] = field(default_factory=lambda: [0] * USERS)
    earned: list[int] = field(default_factory=lambda: [0] * USERS)
    spent: list[int] = field(default_factory=lambda: [0] * USERS)
    holds: dict[str, Hold] = field(default_factory=dict)
    keys: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # key -> (user, signed amount, type)
    periods: dict[tuple[int, int], int] = field(default_factory=dict)     # (subscriber, period) -> amount
    rows: int = 0
    lots: list[dict[int, LotM]] = field(default_factory=lambda: [{} for _ in range(USERS)])
    draws: dict[int, tuple[int, int, dict[int, int]]] = field(default_factory=dict)  # tx -> (user, charged, lot -> n)
    refunds: dict[int, int] = field(default_factory=dict)  # deduction tx -> refunded credits
    step: int = 0

    def new_lot(self, u: int, tx: int, amount: int, priority: int = 50, expiry: tuple = (2,)) -> None:
        self.lots[u][tx] = LotM(tx, priority, expiry, amount)

    def draw(self, u: int, tx: int, amount: int) -> None:
        """Priority, then soonest expiry, then oldest -- what sql/011 promises."""
        left, got = amount, {}
        for lot in sorted((x for x in self.lots[u].values() if x.remaining > 0),
                          key=lambda x: (x.priority, x.expiry, x.id)):
            if not left:
                break
            n = min(lot.remaining, left)
            lot.remaining -= n
            left -= n
            got[lot.id] = n
        assert left == 0, "the model's lots do not cover a draw the balance allowed"
        self.draws[tx] = (u, amount, got)

    def expire(self, u: int) -> int:
        """The lazy expiry: due lots by expiry then age, never below the credits held."""
        total = 0
        for lot in sorted((x for x in self.lots[u].values() if x.remaining > 0 and x.expiry[0] == 0),
                          key=lambda x: (x.expiry, x.id)):
            n = min(lot.remaining, self.balance[u] - self.reserved(u))
            if n > 0:
                lot.remaining -= n
                self.add(u, -n)
                total += n
        return total

    def reserved(self, u: int) -> int:
        return sum(h.amount for h in self.holds.values() if h.user == u and h.status == "active")

    def spendable(self, u: int) -> int:
        return self.balance[u] - self.reserved(u)

    def covers_after_lazy_expiry(self, u: int, amount: int) -> bool:
        """What a deduction or hold of ``amount`` does: fits, or fits once the user's stale holds are freed
        (they are freed then, and only then: a refusal rolls the freeing back)."""
        if self.spendable(u) >= amount:
            return True
        stale = [h for h in self.holds.values() if h.user == u and h.status == "active" and h.stale]
        if stale and self.spendable(u) + sum(h.amount for h in stale) >= amount:
            for h in stale:
                h.status = "expired"
            return True
        return False

    def add(self, u: int, delta: int) -> None:
        self.balance[u] += delta
        if delta > 0:
            self.earned[u] += delta
        else:
            self.spent[u] -= delta
        self.rows += 1


def _check_database(conn: psycopg.Connection, users: list[uuid.UUID], model: Model, jobs_prefix: str) -> None:
    assert integrity_problems(conn, users) == []
    rows = conn.execute(
        "SELECT user_id, balance, lifetime_earned, lifetime_spent, reserved FROM public.points_balances "
        "WHERE user_id = ANY (%s)", (users,)).fetchall()
    found = {r[0]: tuple(int(x) for x in r[1:]) for r in rows}
    for i, u in enumerate(users):
        expected = (model.balance[i], model.earned[i], model.spent[i], model.reserved(i))
        assert found.get(u, (0, 0, 0, 0)) == expected, (i, found.get(u), expected)
        assert expected[0] >= 0 and expected[0] - expected[3] >= 0
    count = conn.execute("SELECT count(*) FROM public.points_transactions WHERE user_id = ANY (%s)",
                         (users,)).fetchone()[0]
    assert count == model.rows  # one row per successful write: no duplicate, nothing lost
    # the functions keep the draw index's flag in step with remaining (sql/022: no longer generated)
    assert conn.execute("SELECT array_agg(id) FROM public.points_lots WHERE user_id = ANY (%s) "
                        "AND spent <> (remaining = 0)", (users,)).fetchone()[0] is None
    statuses = dict(conn.execute(
        "SELECT job_id, status FROM public.points_reservations WHERE job_id LIKE %s", (jobs_prefix + "%",)).fetchall())
    assert statuses == {job: h.status for job, h in model.holds.items()}


def _make_sequential_machine(ledger: Ledger, conn: psycopg.Connection) -> type[RuleBasedStateMachine]:
    class LedgerMachine(RuleBasedStateMachine):
        keys = Bundle("keys")
        jobs = Bundle("jobs")

        def __init__(self) -> None:
            super().__init__()
            self.ns = uuid.uuid4().hex[:10]  # this example's namespace: keys, jobs and users are new
            self.users = [uuid.uuid4() for _ in range(USERS)]
            self.subscribers: list[tuple[uuid.UUID, uuid.UUID]] = []  # (BestAuth id, subscription id)
            for i in range(2):  # two webhook subscribers, mapped to points users 0 and 1
                bid, _ = make_user(conn, f"p-{self.ns}-{i}@example.com", mapped_to=self.users[i])
                self.subscribers.append((bid, uuid.uuid4()))
            self.model = Model()
            self.n = 0
            self.subscription_rows: dict[int, tuple[int, str, str]] = {}
            self.prorations: dict[tuple[int, int], ProrationState] = {}

        def _name(self, kind: str) -> str:
            self.n += 1
            return f"{kind}:{self.ns}:{self.n}"

        @initialize(amounts=st.lists(st.sampled_from([0, 1, 50, 300, 1000]) | st.integers(0, 2000),
                                     min_size=USERS, max_size=USERS))
        def fund(self, amounts: list[int]) -> None:
            """Opening balances, from nothing to plenty, so that refusals and successes both happen."""
            for u, amount in enumerate(amounts):
                if amount:
                    w = ledger.grant(self.users[u], amount, idempotency_key=self._name("open"))
                    self.model.add(u, amount)
                    self.model.new_lot(u, w.transaction_id, amount)

        # ---- grants and deductions

        @rule(target=keys, u=st.integers(0, USERS - 1), amount=st.integers(1, 500),
              ttype=st.sampled_from(["adjustment", "refund", "subscription_grant"]),
              priority=st.sampled_from([None, 10, 90]), expires_in=st.sampled_from([None, None, 1, 2, 3]))
        def grant(self, u: int, amount: int, ttype: str, priority: int | None, expires_in: int | None) -> str:
            """A grant is a lot: some with a priority, some that expire (in days from a fixed future date)."""
            key = self._name("g")
            terms: dict[str, Any] = {}
            expires = LOT_EXPIRY_BASE + timedelta(days=expires_in, seconds=self.n) if expires_in else None
            if priority is not None:
                terms["priority"] = priority
            if expires is not None:
                terms["expires_at"] = expires.isoformat()
            self.model.expire(u)
            w = ledger.grant(self.users[u], amount, idempotency_key=key, transaction_type=ttype,
                             metadata={"lot": terms} if terms else None)
            self.model.add(u, amount)
            self.model.new_lot(u, w.transaction_id, amount, 50 if priority is None else priority,
                               (1, expires) if expires else (2,))
            assert (w.new_balance, w.duplicate) == (self.model.balance[u], False)
            self.model.keys[key] = (u, amount, ttype)
            return key

        @rule(target=keys, u=st.integers(0, USERS - 1), amount=st.integers(1, 50) | st.integers(1, 1500))
        def deduct(self, u: int, amount: int) -> str:
            key = self._name("d")
            before = copy.deepcopy(self.model)
            self.model.expire(u)  # written off first, kept only if the deduction succeeds
            if self.model.covers_after_lazy_expiry(u, amount):
                w = ledger.deduct(self.users[u], amount, idempotency_key=key)
                self.model.add(u, -amount)
                self.model.draw(u, w.transaction_id, amount)
                assert (w.new_balance, w.duplicate) == (self.model.balance[u], False)
                self.model.keys[key] = (u, -amount, "generation_deduction")
            else:
                try:
                    ledger.deduct(self.users[u], amount, idempotency_key=key)
                except InsufficientCredits as exc:
                    # what the refusal reports: spendable credits, counting any stale holds it tried to free
                    assert self.model.spendable(u) <= exc.balance < amount
                else:
                    raise AssertionError("deduction beyond spendable credits succeeded")
                self.model = before  # the refusal rolled the expiry back
            return key

        @rule(key=keys, conflicting=st.booleans())
        def replay(self, key: str, conflicting: bool) -> None:
            """A retried request: the same key again (answered as a duplicate) or a caller bug (refused)."""
            if key not in self.model.keys:
                return  # that attempt was refused: its key was never used
            u, delta, ttype = self.model.keys[key]
            amount = abs(delta) + (1 if conflicting else 0)
            call = ledger.grant if delta > 0 else ledger.deduct
            try:
                w = call(self.users[u], amount, idempotency_key=key, transaction_type=ttype)
            except IdempotencyConflict:
                assert conflicting
            else:
                assert not conflicting and w.duplicate

        # ---- holds

        @rule(target=jobs, u=st.integers(0, USERS - 1), amount=st.integers(1, 50) | st.integers(1, 1500))
        def reserve(self, u: int, amount: int) -> str:
            job = self._name("job")
            before = copy.deepcopy(self.model)
            self.model.expire(u)
            if self.model.covers_after_lazy_expiry(u, amount):
                r = ledger.reserve(self.users[u], amount, job_id=job)
                self.model.holds[job] = Hold(u, amount)
                assert (r.spendable_after, r.duplicate) == (self.model.spendable(u), False)
                assert ledger.reserve(self.users[u], amount, job_id=job).duplicate  # a retried request
            else:
                try:
                    ledger.reserve(self.users[u], amount, job_id=job)
                except InsufficientCredits:
                    self.model = before
                else:
                    raise AssertionError("hold beyond spendable credits succeeded")
            return job

        @rule(job=jobs, part=st.one_of(st.none(), st.floats(0.01, 1.0)))
        def capture(self, job: str, part: float | None) -> None:
            h = self.model.holds.get(job)
            if h is None:
                try:
                    ledger.capture(job)
                except ReservationError:
                    return
                raise AssertionError("captured a hold that was never made")
            amount = None if part is None else max(1, int(h.amount * part))
            charge = h.amount if amount is None else amount
            if h.status == "active" and not h.stale:
                w = ledger.capture(job, amount)
                self.model.expire(h.user)  # under the hold: its credits stay
                h.status, h.captured = "captured", charge
                self.model.add(h.user, -charge)
                self.model.draw(h.user, w.transaction_id, charge)
                assert (w.new_balance, w.duplicate) == (self.model.balance[h.user], False)
            elif h.status == "captured" and charge == h.captured:
                assert ledger.capture(job, amount).duplicate
            else:
                try:
                    ledger.capture(job, amount)
                except ReservationError:
                    pass
                else:
                    raise AssertionError(f"captured a hold that is {h.status} (stale={h.stale})")

        @rule(job=jobs)
        def release(self, job: str) -> None:
            h = self.model.holds.get(job)
            if h is None:
                try:
                    ledger.release(job)
                except ReservationError:
                    return
                raise AssertionError("released a hold that was never made")
            freed = ledger.release(job)
            assert freed == (h.status == "active")
            if freed:
                h.status = "released"

        @rule(job=jobs)
        def time_passes(self, job: str) -> None:
            """The hold's TTL runs out (its expiry moved into the past; nothing frees it yet)."""
            h = self.model.holds.get(job)
            if h is None or h.status != "active":
                return
            conn.execute("UPDATE public.points_reservations SET expires_at = now() - interval '1 second' "
                         "WHERE job_id = %s", (job,))
            h.stale = True

        @rule(everyone=st.booleans(), u=st.integers(0, USERS - 1))
        def sweep(self, everyone: bool, u: int) -> None:
            """The daily pipeline (or a per-user sweep). Other examples' stale holds are fair game too."""
            mine = [h for h in self.model.holds.values() if h.status == "active" and h.stale
                    and (everyone or h.user == u)]
            result = ledger.release_expired(None if everyone else self.users[u])
            assert result.released >= len(mine) if everyone else result.released == len(mine)
            for h in mine:
                h.status = "expired"

        # ---- subscription webhooks

        @rule(s=st.integers(0, 1), period=st.integers(0, 3), tier=st.sampled_from(sorted(TIERS)),
              status=st.sampled_from(["active", "active", "trialing", "past_due", "canceled"]))
        def subscription_event(self, s: int, period: int, tier: str, status: str) -> None:
            """Periods arrive in any order, any number of times; an upgrade reuses a granted period's key."""
            bid, sub_id = self.subscribers[s]
            start = PERIOD_BASE + timedelta(days=30 * period)
            event = SubscriptionEvent(bestauth_user_id=bid, subscription_id=sub_id, tier=tier, billing_cycle="monthly",
                                      status=status, current_period_start=start,
                                      current_period_end=start + timedelta(days=30), event_id=self._name("evt"))
            granted_before = self.model.periods.get((s, period))
            cur = self.subscription_rows.get(s)  # (period, tier, status) of the subscription row
            paid = status in ("active", "trialing")
            if paid and cur is not None and cur[0] == period and cur[2] in ("active", "trialing") and cur[1] != tier:
                # a plan change inside the row's current period (issue 6): an upgrade grants the prorated
                # difference now (these periods are over: 0 credits), a downgrade waits for the period's end
                res = handle_subscription_event(ledger, event)
                if TIERS[tier] > TIERS[cur[1]]:
                    left = fraction_left(start, start + timedelta(days=30), datetime.now(timezone.utc))
                    grant, self.prorations[(s, period)] = upgrade(
                        self.prorations.get((s, period), ProrationState()), TIERS[cur[1]], TIERS[tier], left, "down")
                    assert (res.plan_change, res.granted) == ("upgrade", grant)
                    if grant:
                        self.model.expire(s)
                        self.model.add(s, grant)
                        self.model.new_lot(s, res.transaction_id, grant)
                    self.subscription_rows[s] = (period, tier, status)
                else:
                    assert (res.plan_change, res.granted) == ("downgrade", 0)
                    self.subscription_rows[s] = (period, cur[1], status)
            elif not paid:
                assert handle_subscription_event(ledger, event).granted == 0
                self.subscription_rows[s] = (period, tier, status)
            elif granted_before is None:
                res = handle_subscription_event(ledger, event)
                assert (res.granted, res.duplicate) == (TIERS[tier], False)
                self.model.expire(s)
                self.model.add(s, TIERS[tier])
                self.model.new_lot(s, res.transaction_id, TIERS[tier])
                self.model.periods[(s, period)] = TIERS[tier]
                self.subscription_rows[s] = (period, tier, status)
            elif granted_before == TIERS[tier] or (cur is not None and cur[:2] == (period, tier)):
                # granted already (the row's own plan redelivered: the period key may hold the plan the
                # period started with, before an upgrade)
                assert handle_subscription_event(ledger, event).duplicate
                self.subscription_rows[s] = (period, tier, status)
            else:
                try:
                    handle_subscription_event(ledger, event)
                except IdempotencyConflict:
                    pass  # another period granted at another tier: a person decides, nothing doubles
                else:
                    raise AssertionError("a period was granted twice at different tiers")

        # ---- the credit lifecycle: top-ups, refunds, lots expiring, balance reads

        @rule(u=st.integers(0, USERS - 1), pack=st.sampled_from(["small", "large"]))
        def top_up(self, u: int, pack: str) -> None:
            pay = self._name("pay")
            bought = TOP_UP_BASE + timedelta(minutes=self.n)
            self.model.expire(u)
            w = ledger.top_up(self.users[u], pack, payment_id=pay, purchased_at=bought)
            cfg = ledger.config.top_ups[pack]
            self.model.add(u, cfg.credits)
            self.model.new_lot(u, w.transaction_id, cfg.credits, cfg.priority,
                               (1, bought + timedelta(days=cfg.expiry_days)) if cfg.expiry_days else (2,))
            assert (w.new_balance, ledger.top_up(self.users[u], pack, payment_id=pay).duplicate) == \
                (self.model.balance[u], True)

        @rule(pick=st.integers(0, 10_000), part=st.one_of(st.none(), st.floats(0.01, 1.0)))
        def refund(self, pick: int, part: float | None) -> None:
            """A failed generation's credits go back to the lots it drew on: once, never more than charged."""
            if not self.model.draws:
                return
            tx = sorted(self.model.draws)[pick % len(self.model.draws)]
            u, charged, got = self.model.draws[tx]
            amount = None if part is None else max(1, int(charged * part))
            if tx in self.model.refunds:
                if amount is None or amount == self.model.refunds[tx]:
                    assert ledger.refund_generation(tx, amount).duplicate
                else:
                    with pytest.raises(RefundRefused):
                        ledger.refund_generation(tx, amount)
                return
            r = ledger.refund_generation(tx, amount)
            n = charged if amount is None else amount
            self.model.expire(u)
            self.model.add(u, n)
            assert (r.refunded, r.duplicate, r.new_balance) == (n, False, self.model.balance[u])
            left = n
            for lot_id in sorted(got, reverse=True):
                back = min(got[lot_id], left)
                if back:
                    self.model.lots[u][lot_id].remaining += back
                    left -= back
            self.model.refunds[tx] = n
            self.model.expire(u)  # credits back in a lot that expired meanwhile expire again at once

        @rule(u=st.integers(0, USERS - 1), pick=st.integers(0, 10_000))
        def lot_expires(self, u: int, pick: int) -> None:
            """Time passes for one lot: its expiry is now in the past; nothing writes it off yet (lazy)."""
            future = sorted(x.id for x in self.model.lots[u].values() if x.expiry[0] == 1)
            if not future:
                return
            lot = self.model.lots[u][future[pick % len(future)]]
            self.model.step += 1
            conn.execute("UPDATE public.points_lots SET expires_at = clock_timestamp() - interval '1 second' "
                         "WHERE id = %s", (lot.id,))
            conn.execute("UPDATE public.points_balances SET next_expiry = least(next_expiry, "
                         "clock_timestamp() - interval '1 second') WHERE user_id = %s", (self.users[u],))
            lot.expiry = (0, self.model.step)

        @rule(u=st.integers(0, USERS - 1))
        def read_balance(self, u: int) -> None:
            """A balance read never shows an expired credit: what is due is written off first."""
            self.model.expire(u)
            assert ledger.balance(self.users[u]).balance == self.model.balance[u]
            assert ledger.spendable(self.users[u]) == self.model.spendable(u)

        @invariant()
        def database_matches_model(self) -> None:
            _check_database(conn, self.users, self.model, f"job:{self.ns}:")
            lots = dict(conn.execute("SELECT id, remaining FROM public.points_lots WHERE user_id = ANY (%s)",
                                     (self.users,)).fetchall())
            assert lots == {x.id: x.remaining for per in self.model.lots for x in per.values()}

    return LedgerMachine


def test_random_interleavings_keep_every_invariant(ledger: Ledger, conn: psycopg.Connection) -> None:
    run_state_machine_as_test(_make_sequential_machine(ledger, conn), settings=SEQUENTIAL)


# ------------------------------------------------------------------------------ concurrent clients

OP = st.one_of(
    st.tuples(st.just("grant"), st.integers(0, USERS - 1), st.integers(1, 60)),
    st.tuples(st.just("deduct"), st.integers(0, USERS - 1), st.integers(1, 60)),
    st.tuples(st.just("reserve"), st.integers(0, USERS - 1), st.integers(1, 60)),
    st.tuples(st.just("capture"), st.integers(0, 30), st.integers(0, 60)),  # job index, amount (0 = all)
    st.tuples(st.just("release"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("replay"), st.integers(0, 30), st.just(0)),           # an earlier key sent again
)


def _make_concurrent_machine(ledger: Ledger, conn: psycopg.Connection) -> type[RuleBasedStateMachine]:
    class ConcurrentClients(RuleBasedStateMachine):
        """Bursts of operations from 4 threads at once (released by a barrier). Who wins a race is not
        predictable, so the model follows the answers; the database must agree with them exactly."""

        def __init__(self) -> None:
            super().__init__()
            self.ns = uuid.uuid4().hex[:10]
            self.users = [uuid.uuid4() for _ in range(USERS)]
            self.model = Model()
            self.jobs: list[str] = []       # every job id a burst tried to hold, in order
            self.keys: list[tuple[str, int, int]] = []  # (key, user, signed amount) of successful writes
            self.n = 0
            for u in range(USERS):  # start funded, so that the races are about something
                ledger.grant(self.users[u], 100, idempotency_key=f"fund:{self.ns}:{u}")
                self.model.add(u, 100)

        def _name(self, kind: str) -> str:
            self.n += 1
            return f"{kind}:{self.ns}:{self.n}"

        def _run(self, op: tuple[str, int, int], name: str) -> tuple[str, Any]:
            kind, a, b = op
            try:
                if kind == "grant":
                    return "ok", ledger.grant(self.users[a], b, idempotency_key=name, transaction_type="refund")
                if kind == "deduct":
                    return "ok", ledger.deduct(self.users[a], b, idempotency_key=name)
                if kind == "reserve":
                    return "ok", ledger.reserve(self.users[a], b, job_id=name)
                if kind == "replay":
                    if not self.keys:
                        return "skip", None
                    key, u, delta = self.keys[a % len(self.keys)]
                    call = ledger.grant if delta > 0 else ledger.deduct
                    ttype = "refund" if delta > 0 else "generation_deduction"
                    return "ok", call(self.users[u], abs(delta), idempotency_key=key, transaction_type=ttype)
                if not self.jobs:
                    return "skip", None
                job = self.jobs[a % len(self.jobs)]
                if kind == "capture":
                    return "ok", ledger.capture(job, b or None)
                return "ok", ledger.release(job)
            except (InsufficientCredits, ReservationError) as exc:
                return type(exc).__name__, None
            except Exception as exc:  # InvalidAmount for a capture above the hold, and anything unexpected
                return type(exc).__name__, exc

        @rule(burst=st.lists(OP, min_size=4, max_size=12))
        def burst(self, burst: list[tuple[str, int, int]]) -> None:
            names = [self._name(op[0]) for op in burst]
            targets = {i: self.jobs[op[1] % len(self.jobs)] for i, op in enumerate(burst)
                       if op[0] in ("capture", "release") and self.jobs}
            holds_before = {j: (h.status, h.captured) for j, h in self.model.holds.items()}
            barrier = threading.Barrier(4)
            lanes = [list(range(i, len(burst), 4)) for i in range(4)]

            def lane(indices: list[int]) -> list[tuple[int, tuple[str, Any]]]:
                barrier.wait()
                return [(i, self._run(burst[i], names[i])) for i in indices]

            with ThreadPoolExecutor(4) as pool:
                results = dict(r for part in pool.map(lane, lanes) for r in part)

            outcomes = Counter()
            for i, op in enumerate(burst):
                kind, a, b = op
                status, value = results[i]
                outcomes[(kind, status)] += 1
                if kind in ("grant", "deduct") and status == "ok":
                    self.model.add(a, b if kind == "grant" else -b)
                    self.keys.append((names[i], a, b if kind == "grant" else -b))
                elif kind == "reserve":
                    self.jobs.append(names[i])
                    if status == "ok":
                        self.model.holds[names[i]] = Hold(a, b)
                elif kind == "replay" and status == "ok":
                    assert value.duplicate
                elif kind == "capture" and status == "ok" and not value.duplicate:
                    h = self.model.holds[targets[i]]
                    assert holds_before.get(targets[i], ("active",))[0] == "active"
                    charge = b or h.amount
                    self.model.add(h.user, -charge)
                    h.status, h.captured = "captured", charge
                elif kind == "release" and status == "ok" and value:
                    self.model.holds[targets[i]].status = "released"
                elif status not in ("ok", "skip", "InsufficientCredits", "ReservationError"):
                    assert status == "InvalidAmount" and kind == "capture", (op, status, value)
            # a hold is settled once: never both captured and released, never captured twice for credits
            settled = Counter(targets[i] for i in targets if results[i][0] == "ok"
                              and ((burst[i][0] == "capture" and not results[i][1].duplicate)
                                   or (burst[i][0] == "release" and results[i][1])))
            assert all(n == 1 for n in settled.values()), settled
            _check_database(conn, self.users, self.model, f"reserve:{self.ns}:")

    return ConcurrentClients


def test_concurrent_clients_keep_every_invariant(ledger: Ledger, conn: psycopg.Connection) -> None:
    run_state_machine_as_test(_make_concurrent_machine(ledger, conn), settings=CONCURRENT)
