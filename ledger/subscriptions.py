"""The subscription webhook, done so that it cannot fail silently -- and so that the billing system's
delivery habits (late, twice, out of order) cannot move credits twice or backwards.

One transaction upserts the subscription, resolves and maps the user id, records
``resolved_supabase_user_id`` and grants the period's credits under the period key, then checks the
result. Any failure raises a typed error and logs a CRITICAL line naming user, subscription and period.

Events (issue 6) carry their id and their own time (``event_time``, kept apart from the time we
recorded them):

- a retried event (an id already processed, table ``subscription_events``) is answered from the record
  and writes nothing;
- a stale event -- older than the newest event already applied for the user, i.e. older than the state it
  would overwrite -- changes nothing, is recorded as ``stale`` and says so (``result.stale``);
- an event for an unknown user, a tier missing from the config, or one that cannot be applied is
  refused with a clear error *and* recorded (``subscription_event_refusals``, own transaction);
- a plan change inside the current period: an upgrade takes effect now and grants the prorated
  difference (ledger/proration.py, rounding from ``lifecycle.proration_rounding``) as a ``plan_change``
  row under ``plan_change:<subscription>:<period date>:<from>><to>``; a downgrade takes effect at the
  period's end (recorded as ``metadata.pending_plan``; the next period's event grants the new plan).
  Monthly <-> yearly follows the same rules (compared by allocation per period).

Without ``event_id`` nothing is deduplicated by id (the period key still grants a period once); without
``event_time`` nothing is judged stale: older callers keep their behaviour.

A period's credits are a lot whose expiry follows the tier's rollover policy (ledger/lots.py).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from fractions import Fraction
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ledger.config import PAID_STATUSES
from ledger.errors import (
    AmbiguousUser,
    ConfigError,
    CreditError,
    IdempotencyConflict,
    InvalidAmount,
    InvalidArgument,
    SubscriptionGrantError,
    UnknownUser,
)
from ledger.ids import check_text, parse_uuid
from ledger.lots import period_lot_terms
from ledger.proration import ProrationState, classify, fraction_left, upgrade

log = logging.getLogger(__name__)

TIERS = ("free", "pro", "pro_plus")
CYCLES = ("monthly", "yearly")
STATUSES = ("active", "trialing", "past_due", "canceled", "expired")
_LEGACY_ID_KEYS = ("resolved_supabase_user_id", "supabase_user_id", "original_userId")


@dataclass(frozen=True)
class SubscriptionEvent:
    """What the billing webhook tells us about one user's subscription."""

    bestauth_user_id: uuid.UUID | str
    tier: str
    status: str
    billing_cycle: str | None = None
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    subscription_id: uuid.UUID | str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    event_id: str | None = None
    # when the billing system says the event happened (not when it reached us); None: never judged stale
    event_time: datetime | None = None


@dataclass(frozen=True)
class SubscriptionEventResult:
    subscription_id: uuid.UUID | None
    bestauth_user_id: uuid.UUID
    user_id: uuid.UUID | None
    granted: int  # credits this event granted (period grant or prorated upgrade; 0 for free/unpaid states)
    duplicate: bool  # nothing written: the period (or plan change) was already granted, or the event replayed
    new_balance: int | None
    transaction_id: int | None
    stale: bool = False  # older than the state it would overwrite: nothing changed
    replayed: bool = False  # this event id was already processed: answered from its record
    plan_change: str | None = None  # "upgrade" | "downgrade" | "downgrade_canceled"
    detail: str = ""  # what happened, in words (logs, the webhook's reply)


def _aware(ts: datetime | None, what: str) -> datetime | None:
    if ts is None:
        return None
    if not isinstance(ts, datetime):
        raise InvalidArgument(f"{what} must be a datetime")
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def _validate(event: SubscriptionEvent, ledger: Any) -> tuple[uuid.UUID, uuid.UUID | None, int]:
    bid = parse_uuid(event.bestauth_user_id, "BestAuth user id")
    sid = parse_uuid(event.subscription_id, "subscription id") if event.subscription_id else None
    if event.event_id is not None and (not isinstance(event.event_id, str)
                                       or not 0 < len(check_text(event.event_id, "event id")) <= 255):
        raise InvalidArgument("event id must be a string of 1 to 255 characters")
    _aware(event.event_time, "event_time")
    if event.status not in STATUSES:
        raise InvalidArgument(f"unknown subscription status {event.status!r} (expected one of {', '.join(STATUSES)})")
    if event.tier == "free":
        return bid, sid, 0
    if event.tier not in TIERS and event.tier not in ledger.config.tiers:
        raise ConfigError(f"tier {event.tier!r} is not in the configuration")
    if event.billing_cycle not in CYCLES:
        raise InvalidArgument(f"billing cycle must be monthly or yearly, got {event.billing_cycle!r}")
    amount = ledger.config.allocation(event.tier, event.billing_cycle)
    start = _aware(event.current_period_start, "current_period_start")
    end = _aware(event.current_period_end, "current_period_end")
    if start is None or end is None or end <= start:
        raise InvalidArgument("a paid subscription needs current_period_start before current_period_end")
    return bid, sid, amount


def metadata_user_id(metadata: dict[str, Any]) -> uuid.UUID | None:
    """The first valid UUID among the metadata keys the app has used over time."""
    for key in _LEGACY_ID_KEYS:
        value = metadata.get(key)
        if isinstance(value, str):
            try:
                return uuid.UUID(value)
            except ValueError:
                continue
    return None


def ensure_mapping_in(conn: psycopg.Connection, bid: uuid.UUID, hint: uuid.UUID | None) -> uuid.UUID:
    """Inside the caller's transaction: the user's mapped points id, creating the mapping if missing."""
    row = conn.execute(
        "SELECT supabase_user_id FROM public.user_id_mapping WHERE bestauth_user_id = %s FOR UPDATE", (bid,)
    ).fetchone()
    if row:
        if hint and hint != row[0]:
            log.warning("user %s: mapping says %s, event metadata says %s; keeping the mapping", bid, row[0], hint)
        return row[0]
    if hint is None:
        res = conn.execute(
            "SELECT user_id FROM public.user_id_resolution WHERE bestauth_user_id = %s", (bid,)
        ).fetchone()
        if res is None:
            raise UnknownUser(f"no BestAuth user with id {bid}")
        hint = res[0]
    taken = conn.execute(
        "SELECT bestauth_user_id FROM public.user_id_mapping WHERE supabase_user_id = %s", (hint,)
    ).fetchone()
    if taken and taken[0] != bid:
        raise AmbiguousUser(f"points id {hint} for user {bid} is already mapped to user {taken[0]}")
    conn.execute(
        """INSERT INTO public.user_id_mapping (bestauth_user_id, supabase_user_id) VALUES (%s, %s)
           ON CONFLICT (bestauth_user_id) DO NOTHING""",
        (bid, hint),
    )
    log.info("user %s: created mapping to points id %s", bid, hint)
    return conn.execute(
        "SELECT supabase_user_id FROM public.user_id_mapping WHERE bestauth_user_id = %s", (bid,)
    ).fetchone()[0]


_LOCK_SPACE = 7_262_011_006  # advisory lock space: one webhook at a time per BestAuth user
_REFUSAL_REASON = ((UnknownUser, "unknown_user"), (ConfigError, "unknown_tier"), (InvalidArgument, "invalid_event"),
                   (InvalidAmount, "invalid_event"))
_SUB_COLUMNS = "id, tier, billing_cycle, status, current_period_start, current_period_end, metadata"


def handle_subscription_event(ledger: Any, event: SubscriptionEvent) -> SubscriptionEventResult:
    """Apply a subscription webhook event; see the module docstring for the guarantees."""
    period = event.current_period_start.date().isoformat() if isinstance(event.current_period_start, datetime) else None
    context = f"user {event.bestauth_user_id}, subscription {event.subscription_id or '(new)'}, period {period}"
    try:
        bid, sid, amount = _validate(event, ledger)
        result = _apply(ledger, event, bid, sid, amount)
    except CreditError as exc:
        log.critical("subscription event %s failed for %s: %s", event.event_id or "-", context, exc)
        _record_refusal(ledger, event, exc)
        raise
    except Exception as exc:
        log.critical("subscription event %s failed for %s: %s", event.event_id or "-", context, exc)
        raise SubscriptionGrantError(f"subscription event failed for {context}: {exc}") from exc
    log.info("subscription event %s for %s: %s", event.event_id or "-", context, result.detail)
    return result


def _safe_text(value: object, limit: int) -> str | None:
    """Text PostgreSQL can store, for the refusal record of an event that may be malformed."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value) if isinstance(value, (uuid.UUID, int)) else repr(value)
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\\0")[:limit]


def _record_refusal(ledger: Any, event: SubscriptionEvent, exc: CreditError) -> None:
    """Record a refused event for the audit, in its own transaction (the event's was rolled back).

    Transient faults are not refusals: the caller retries those, and they are not recorded.
    """
    from ledger.errors import DatabaseUnavailable
    from ledger.service import is_retryable

    if isinstance(exc, DatabaseUnavailable) or is_retryable(exc):
        return
    reason = next((r for cls, r in _REFUSAL_REASON if isinstance(exc, cls)), "conflict")
    payload = {k: _safe_text(v, 200) for k, v in (
        ("tier", event.tier), ("billing_cycle", event.billing_cycle), ("status", event.status),
        ("subscription_id", event.subscription_id),
        ("current_period_start", event.current_period_start.isoformat()
         if isinstance(event.current_period_start, datetime) else event.current_period_start),
        ("current_period_end", event.current_period_end.isoformat()
         if isinstance(event.current_period_end, datetime) else event.current_period_end),
        ("error", type(exc).__name__))}
    event_time = event.event_time if isinstance(event.event_time, datetime) else None
    if event_time is not None and event_time.tzinfo is None:
        event_time = event_time.replace(tzinfo=timezone.utc)
    try:
        with ledger.connection() as conn:
            conn.execute("SELECT public.record_subscription_event_refusal(%s, %s, %s, %s, %s, %s)",
                         (_safe_text(event.event_id, 255), _safe_text(event.bestauth_user_id, 200), event_time,
                          reason, _safe_text(str(exc), 2000), Jsonb(payload)))
    except Exception:  # the refusal stands; losing its record must not mask it
        log.exception("could not record the refused subscription event %s", _safe_text(event.event_id, 80))


def _row(conn: psycopg.Connection, bid: uuid.UUID) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_SUB_COLUMNS} FROM public.subscriptions_consolidated WHERE user_id = %s FOR UPDATE",
                       (bid,)).fetchone()
    return dict(zip(("id", "tier", "billing_cycle", "status", "start", "end", "metadata"), row, strict=True)) \
        if row else None


def _replayed(bid: uuid.UUID, prior: tuple[Any, ...]) -> SubscriptionEventResult:
    owner, outcome, doc, detail = prior
    if owner != bid:
        raise IdempotencyConflict(f"event id was already processed for another user ({owner})")
    sub = doc.get("subscription_id")
    uid = doc.get("user_id")
    return SubscriptionEventResult(
        uuid.UUID(sub) if sub else None, bid, uuid.UUID(uid) if uid else None, int(doc.get("granted") or 0), True,
        doc.get("new_balance"), doc.get("transaction_id"), stale=outcome == "stale", replayed=True,
        plan_change=doc.get("plan_change"), detail=f"event already processed ({outcome}): {detail or ''}".strip())


def _record_event(conn: psycopg.Connection, event: SubscriptionEvent, bid: uuid.UUID,
                  result: SubscriptionEventResult, outcome: str) -> None:
    if event.event_id is None:
        return
    payload = {"tier": event.tier, "billing_cycle": event.billing_cycle, "status": event.status,
               "current_period_start": event.current_period_start and event.current_period_start.isoformat(),
               "current_period_end": event.current_period_end and event.current_period_end.isoformat()}
    doc = {"subscription_id": result.subscription_id and str(result.subscription_id),
           "user_id": result.user_id and str(result.user_id), "granted": result.granted,
           "new_balance": result.new_balance, "transaction_id": result.transaction_id,
           "plan_change": result.plan_change, "duplicate": result.duplicate}
    inserted = conn.execute("SELECT public.record_subscription_event(%s, %s, %s, %s, %s, %s, %s, %s)",
                            (event.event_id, bid, result.subscription_id, _aware(event.event_time, "event_time"),
                             outcome, result.detail, Jsonb(payload), Jsonb(doc))).fetchone()[0]
    if not inserted:  # cannot happen under the per-user lock unless the id names another user's event
        raise IdempotencyConflict(f"event id {event.event_id!r} was processed concurrently or for another user")


def _identity(conn: psycopg.Connection, bid: uuid.UUID, sub_id: uuid.UUID, hint: uuid.UUID | None) -> uuid.UUID:
    """Map the user (if missing) and record the resolved id in the subscription metadata."""
    user_id = ensure_mapping_in(conn, bid, hint)
    conn.execute(
        """UPDATE public.subscriptions_consolidated
              SET metadata = metadata || jsonb_build_object('resolved_supabase_user_id', %s::text)
            WHERE id = %s AND metadata ->> 'resolved_supabase_user_id' IS DISTINCT FROM %s::text""",
        (user_id, sub_id, user_id),
    )
    return user_id


def _apply(ledger: Any, event: SubscriptionEvent, bid: uuid.UUID, sid: uuid.UUID | None,
           amount: int) -> SubscriptionEventResult:
    hint = metadata_user_id(event.metadata or {})
    event_time = _aware(event.event_time, "event_time")
    # naive times are UTC (as documented); from here on every time is aware
    event = replace(event, current_period_start=_aware(event.current_period_start, "current_period_start"),
                    current_period_end=_aware(event.current_period_end, "current_period_end"), event_time=event_time)
    with ledger.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SPACE % 2**31, str(bid)))
        if event.event_id is not None:
            prior = conn.execute("""SELECT bestauth_user_id, outcome, result, detail FROM public.subscription_events
                                     WHERE event_id = %s""", (event.event_id,)).fetchone()
            if prior is not None:
                return _replayed(bid, prior)
        if conn.execute("SELECT 1 FROM public.bestauth_users WHERE id = %s", (bid,)).fetchone() is None:
            raise UnknownUser(f"no BestAuth user with id {bid}")
        cur = _row(conn, bid)
        if sid and cur and sid != cur["id"]:
            raise AmbiguousUser(f"user {bid} already has subscription {cur['id']}, event names {sid}")

        if event_time is not None:
            last = conn.execute(
                """SELECT event_time, event_id FROM public.subscription_events
                    WHERE bestauth_user_id = %s AND outcome = 'applied' AND event_time IS NOT NULL
                    ORDER BY event_time DESC LIMIT 1""", (bid,)).fetchone()
            if last is not None and last[0] > event_time:
                resolved = conn.execute("SELECT user_id FROM public.user_id_resolution WHERE bestauth_user_id = %s",
                                        (bid,)).fetchone()
                result = SubscriptionEventResult(
                    cur["id"] if cur else None, bid, resolved[0] if resolved else None, 0, False, None, None,
                    stale=True, detail=(f"stale: the event happened at {event_time.isoformat()}, before event "
                                        f"{last[1]} ({last[0].isoformat()}) that set the current state; "
                                        "nothing changed"))
                _record_event(conn, event, bid, result, "stale")
                return result

        result = None
        paid_now = (cur is not None and cur["tier"] in ledger.config.tiers and cur["status"] in PAID_STATUSES
                    and cur["billing_cycle"] in CYCLES and cur["start"] is not None)
        same_period = paid_now and cur["start"] == event.current_period_start  # type: ignore[index]
        if same_period and amount > 0 and event.status in PAID_STATUSES:
            assert cur is not None
            if (cur["tier"], cur["billing_cycle"]) != (event.tier, event.billing_cycle):
                old = ledger.config.allocation(cur["tier"], cur["billing_cycle"])
                kind = classify(old, amount)
                if kind == "upgrade":
                    result = _upgrade(conn, ledger, event, bid, cur, old, amount, event_time, hint)
                elif kind == "downgrade":
                    result = _downgrade(conn, ledger, event, bid, cur, event_time, hint)
            elif (cur["metadata"] or {}).get("pending_plan"):
                _cancel_pending(conn, event, bid, cur, event_time, hint)
        if result is None:
            result = _period_grant(conn, ledger, event, bid, cur, amount, hint)
        _record_event(conn, event, bid, result, "applied")
        return result


def _now(conn: psycopg.Connection, event_time: datetime | None) -> datetime:
    return event_time or conn.execute("SELECT now()").fetchone()[0]


def _plan(tier: str | None, cycle: str | None) -> str:
    return f"{tier}.{cycle}"


def upgrade_grant_row(config: Any, *, subscription_id: Any, bestauth_user_id: Any, period_start: datetime,
                      period_end: datetime, from_tier: str, from_cycle: str, to_tier: str, to_cycle: str,
                      fraction_left: str | None, event_id: str | None) -> tuple[str, dict[str, Any]]:
    """The description and metadata (lot terms included) of an upgrade's plan_change ledger row: the
    webhook handler and the audit's fix for a missing grant (plan_change_grants) write the same row."""
    meta = {"subscription_id": str(subscription_id), "bestauth_user_id": str(bestauth_user_id),
            "period_start": period_start.isoformat(), "period_end": period_end.isoformat(),
            "from_plan": _plan(from_tier, from_cycle), "to_plan": _plan(to_tier, to_cycle),
            "fraction_left": fraction_left, "event_id": event_id,
            "lot": period_lot_terms(config, to_tier, period_start, period_end)}
    return f"upgrade {from_tier} {from_cycle} -> {to_tier} {to_cycle} (prorated)", meta


def _upgrade(conn: psycopg.Connection, ledger: Any, event: SubscriptionEvent, bid: uuid.UUID, cur: dict[str, Any],
             old: int, new: int, event_time: datetime | None, hint: uuid.UUID | None) -> SubscriptionEventResult | None:
    """Mid-period upgrade: the new plan now, and the prorated difference as a plan_change lot."""
    sub_id, start = cur["id"], cur["start"]
    end = _aware(event.current_period_end, "current_period_end")
    assert end is not None
    base_key = conn.execute("SELECT public.subscription_grant_key(%s, %s)", (sub_id, start)).fetchone()[0]
    if conn.execute("SELECT 1 FROM public.points_transactions WHERE idempotency_key = %s",
                    (base_key,)).fetchone() is None:
        return None  # the period itself was never granted: grant it at the new plan instead
    period_date = start.astimezone(timezone.utc).date().isoformat()
    key = f"plan_change:{sub_id}:{period_date}:{_plan(cur['tier'], cur['billing_cycle'])}>" \
          f"{_plan(event.tier, event.billing_cycle)}"
    changed_at = _now(conn, event_time)
    prior = conn.execute("SELECT proration FROM public.subscription_plan_changes "
                         "WHERE subscription_id = %s AND period_start = %s AND kind = 'upgrade' ORDER BY id DESC LIMIT 1",
                         (sub_id, start)).fetchone()
    state = ProrationState.decode(prior[0] if prior else None)
    left = fraction_left(start, end, changed_at)
    grant, after = upgrade(state, old, new, left, ledger.config.lifecycle.proration_rounding)
    conn.execute(
        """UPDATE public.subscriptions_consolidated
              SET tier = %s, billing_cycle = %s, status = %s, current_period_end = %s,
                  metadata = (metadata - 'pending_plan') || %s, updated_at = now()
            WHERE id = %s""",
        (event.tier, event.billing_cycle, event.status, end, Jsonb(event.metadata or {}), sub_id))
    user_id = _identity(conn, bid, sub_id, hint)
    tx_id = new_balance = None
    duplicate = False
    if grant > 0:
        description, meta = upgrade_grant_row(
            ledger.config, subscription_id=sub_id, bestauth_user_id=bid, period_start=start, period_end=end,
            from_tier=cur["tier"], from_cycle=cur["billing_cycle"], to_tier=event.tier, to_cycle=event.billing_cycle,
            fraction_left=f"{left.numerator}/{left.denominator}", event_id=event.event_id)
        new_balance, tx_id, duplicate = conn.execute(
            """SELECT new_balance, transaction_id, duplicate FROM public.add_points(%s, %s, 'plan_change', %s, %s, %s)""",
            (user_id, grant, description, key, Jsonb(meta))).fetchone()
    conn.execute(
        """SELECT public.record_plan_change(%s, %s, %s, %s, %s, %s, %s, %s, %s, 'upgrade', %s, %s, %s, %s, %s, %s,
                                            %s, %s)""",
        (sub_id, bid, user_id, start, end, cur["tier"], cur["billing_cycle"], event.tier, event.billing_cycle,
         changed_at, changed_at, f"{left.numerator}/{left.denominator}", Jsonb(after.encode()), grant, tx_id, key,
         event.event_id))
    detail = (f"upgrade {cur['tier']} {cur['billing_cycle']} -> {event.tier} {event.billing_cycle} with "
              f"{float(left):.4f} of the period left: {grant} prorated credits"
              + (" (already granted)" if duplicate else "") + f" under {key}")
    return SubscriptionEventResult(sub_id, bid, user_id, grant, bool(duplicate) or grant == 0,
                                   int(new_balance) if new_balance is not None else None,
                                   int(tx_id) if tx_id is not None else None, plan_change="upgrade", detail=detail)


def _downgrade(conn: psycopg.Connection, ledger: Any, event: SubscriptionEvent, bid: uuid.UUID, cur: dict[str, Any],
               event_time: datetime | None, hint: uuid.UUID | None) -> SubscriptionEventResult:
    """Mid-period downgrade: nothing changes until the period's end; the next period's event grants it."""
    sub_id, start, end = cur["id"], cur["start"], cur["end"]
    changed_at = _now(conn, event_time)
    pending = {"tier": event.tier, "billing_cycle": event.billing_cycle, "effective_at": end.isoformat(),
               "requested_at": changed_at.isoformat(), "event_id": event.event_id}
    conn.execute(
        """UPDATE public.subscriptions_consolidated
              SET status = %s, metadata = metadata || %s || jsonb_build_object('pending_plan', %s::jsonb),
                  updated_at = now()
            WHERE id = %s""", (event.status, Jsonb(event.metadata or {}), Jsonb(pending), sub_id))
    user_id = _identity(conn, bid, sub_id, hint)
    period_date = start.astimezone(timezone.utc).date().isoformat()
    key = (f"plan_change:{sub_id}:{period_date}:{_plan(cur['tier'], cur['billing_cycle'])}>"
           f"{_plan(event.tier, event.billing_cycle)}:downgrade:{event.event_id or uuid.uuid4()}")
    conn.execute(
        """SELECT public.record_plan_change(%s, %s, %s, %s, %s, %s, %s, %s, %s, 'downgrade', %s, %s, NULL, NULL, 0,
                                            NULL, %s, %s)""",
        (sub_id, bid, user_id, start, end, cur["tier"], cur["billing_cycle"], event.tier, event.billing_cycle,
         changed_at, end, key, event.event_id))
    detail = (f"downgrade {cur['tier']} {cur['billing_cycle']} -> {event.tier} {event.billing_cycle} pending: "
              f"takes effect at the period's end ({end.isoformat()}); nothing granted or taken now")
    return SubscriptionEventResult(sub_id, bid, user_id, 0, False, None, None, plan_change="downgrade", detail=detail)


def _cancel_pending(conn: psycopg.Connection, event: SubscriptionEvent, bid: uuid.UUID, cur: dict[str, Any],
                    event_time: datetime | None, hint: uuid.UUID | None) -> None:
    """The current plan confirmed inside its period: a pending downgrade is called off."""
    pending = cur["metadata"]["pending_plan"]
    conn.execute("""UPDATE public.subscriptions_consolidated SET metadata = metadata - 'pending_plan', updated_at = now()
                     WHERE id = %s""", (cur["id"],))
    cur["metadata"] = {k: v for k, v in cur["metadata"].items() if k != "pending_plan"}
    user_id = _identity(conn, bid, cur["id"], hint)
    changed_at = _now(conn, event_time)
    period_date = cur["start"].astimezone(timezone.utc).date().isoformat()
    key = f"plan_change:{cur['id']}:{period_date}:downgrade_canceled:{event.event_id or uuid.uuid4()}"
    conn.execute(
        """SELECT public.record_plan_change(%s, %s, %s, %s, %s, %s, %s, %s, %s, 'downgrade_canceled', %s, %s, NULL,
                                            NULL, 0, NULL, %s, %s)""",
        (cur["id"], bid, user_id, cur["start"], cur["end"], str(pending.get("tier")), str(pending.get("billing_cycle")),
         cur["tier"], cur["billing_cycle"], changed_at, changed_at, key, event.event_id))


def _period_grant(conn: psycopg.Connection, ledger: Any, event: SubscriptionEvent, bid: uuid.UUID,
                  cur: dict[str, Any] | None, amount: int, hint: uuid.UUID | None) -> SubscriptionEventResult:
    """The subscription as the event says, and (paid states) the period's grant under the period key."""
    new_period = cur is None or cur["start"] != event.current_period_start
    row = conn.execute(
        """INSERT INTO public.subscriptions_consolidated AS s
               (id, user_id, tier, billing_cycle, status, current_period_start, current_period_end, metadata)
           VALUES (coalesce(%(sid)s, gen_random_uuid()), %(bid)s, %(tier)s, %(cycle)s, %(status)s,
                   %(start)s, %(end)s, %(meta)s)
           ON CONFLICT (user_id) DO UPDATE SET
               tier = excluded.tier, billing_cycle = excluded.billing_cycle, status = excluded.status,
               current_period_start = excluded.current_period_start,
               current_period_end = excluded.current_period_end,
               metadata = CASE WHEN %(new_period)s THEN s.metadata - 'pending_plan' ELSE s.metadata END
                          || excluded.metadata,
               updated_at = now()
           RETURNING s.id""",
        {"sid": event.subscription_id and str(event.subscription_id), "bid": bid, "tier": event.tier,
         "cycle": event.billing_cycle, "status": event.status, "start": event.current_period_start,
         "end": event.current_period_end, "meta": Jsonb(event.metadata or {}), "new_period": new_period},
    ).fetchone()
    sub_id: uuid.UUID = row[0]
    user_id = _identity(conn, bid, sub_id, hint)
    if amount == 0 or event.status not in PAID_STATUSES:
        return SubscriptionEventResult(sub_id, bid, user_id, 0, False, None, None,
                                       detail=f"{event.tier} {event.status}: subscription recorded, nothing granted")
    start = _aware(event.current_period_start, "current_period_start")
    end = _aware(event.current_period_end, "current_period_end")
    assert start is not None and end is not None
    if not new_period and cur is not None and (cur["tier"], cur["billing_cycle"]) == (event.tier, event.billing_cycle):
        # the current plan redelivered: the period was granted at the plan it started with (and any upgrade
        # got its own prorated grant), so the period key may hold a smaller amount than this plan's
        done = conn.execute(
            """SELECT t.id, t.amount, t.balance_after, t.idempotency_key FROM public.points_transactions t
                WHERE t.idempotency_key = public.subscription_grant_key(%s, %s) AND t.user_id = %s""",
            (sub_id, start, user_id)).fetchone()
        if done is not None:
            return SubscriptionEventResult(sub_id, bid, user_id, int(done[1]), True, int(done[2]), int(done[0]),
                                           detail=f"period already granted under {done[3]} ({done[1]} credits)")
    write = conn.execute(
        """SELECT g.new_balance, g.transaction_id, g.duplicate, k.key
             FROM (SELECT public.subscription_grant_key(%(sub)s, %(start)s) AS key) k,
                  LATERAL public.add_points(%(uid)s, %(amount)s, 'subscription_grant',
                      %(desc)s, k.key, %(meta)s) g""",
        {"sub": sub_id, "start": event.current_period_start, "uid": user_id, "amount": amount,
         "desc": f"{event.tier} {event.billing_cycle} credits",
         "meta": Jsonb({"subscription_id": str(sub_id), "bestauth_user_id": str(bid), "tier": event.tier,
                        "billing_cycle": event.billing_cycle,
                        "period_start": start.isoformat(), "period_end": end.isoformat(),
                        "event_id": event.event_id, "lot": period_lot_terms(ledger.config, event.tier, start, end)})},
    ).fetchone()
    new_balance, tx_id, duplicate, key = write
    # verify before committing: the period's row is there, for this user, and the cache agrees
    check = conn.execute(
        """SELECT t.user_id, b.balance FROM public.points_transactions t
             JOIN public.points_balances b ON b.user_id = t.user_id
            WHERE t.idempotency_key = %s""",
        (key,),
    ).fetchone()
    if check is None or check[0] != user_id or check[1] < 0:
        raise SubscriptionGrantError(f"grant {key} did not land for points user {user_id}")
    if not duplicate and check[1] != new_balance:
        raise SubscriptionGrantError(f"balance of {user_id} is {check[1]} after grant, expected {new_balance}")
    detail = (f"{amount} credits for user {bid} (points {user_id}) under {key}"
              + (" (already granted)" if duplicate else ""))
    return SubscriptionEventResult(sub_id, bid, user_id, amount, bool(duplicate), int(new_balance), int(tx_id),
                                   detail=detail)
