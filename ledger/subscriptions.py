"""The subscription webhook, done so that it cannot fail silently.

One transaction upserts the subscription, resolves and maps the user id, records
``resolved_supabase_user_id`` and grants the period's credits under the period key, then checks
the result. Retries (same period) are no-ops at the ledger; any failure raises a typed error
and logs a CRITICAL line naming user, subscription and period.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ledger.config import PAID_STATUSES
from ledger.errors import AmbiguousUser, ConfigError, CreditError, InvalidArgument, SubscriptionGrantError, UnknownUser
from ledger.ids import parse_uuid

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


@dataclass(frozen=True)
class SubscriptionEventResult:
    subscription_id: uuid.UUID
    bestauth_user_id: uuid.UUID
    user_id: uuid.UUID
    granted: int  # credits this period's grant carries (0 for free or unpaid states)
    duplicate: bool  # the period was already granted: nothing written to the ledger
    new_balance: int | None
    transaction_id: int | None


def _aware(ts: datetime | None, what: str) -> datetime | None:
    if ts is None:
        return None
    if not isinstance(ts, datetime):
        raise InvalidArgument(f"{what} must be a datetime")
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def _validate(event: SubscriptionEvent, ledger: Any) -> tuple[uuid.UUID, uuid.UUID | None, int]:
    bid = parse_uuid(event.bestauth_user_id, "BestAuth user id")
    sid = parse_uuid(event.subscription_id, "subscription id") if event.subscription_id else None
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


def handle_subscription_event(ledger: Any, event: SubscriptionEvent) -> SubscriptionEventResult:
    """Apply a subscription webhook event; see the module docstring for the guarantees."""
    period = event.current_period_start.date().isoformat() if isinstance(event.current_period_start, datetime) else None
    context = f"user {event.bestauth_user_id}, subscription {event.subscription_id or '(new)'}, period {period}"
    try:
        bid, sid, amount = _validate(event, ledger)
        result = _apply(ledger, event, bid, sid, amount)
    except CreditError as exc:
        log.critical("subscription event %s failed for %s: %s", event.event_id or "-", context, exc)
        raise
    except Exception as exc:
        log.critical("subscription event %s failed for %s: %s", event.event_id or "-", context, exc)
        raise SubscriptionGrantError(f"subscription event failed for {context}: {exc}") from exc
    return result


def _apply(ledger: Any, event: SubscriptionEvent, bid: uuid.UUID, sid: uuid.UUID | None,
           amount: int) -> SubscriptionEventResult:
    hint = metadata_user_id(event.metadata or {})
    with ledger.connection() as conn, conn.transaction():
        if conn.execute("SELECT 1 FROM public.bestauth_users WHERE id = %s", (bid,)).fetchone() is None:
            raise UnknownUser(f"no BestAuth user with id {bid}")
        row = conn.execute(
            """INSERT INTO public.subscriptions_consolidated AS s
                   (id, user_id, tier, billing_cycle, status, current_period_start, current_period_end, metadata)
               VALUES (coalesce(%(sid)s, gen_random_uuid()), %(bid)s, %(tier)s, %(cycle)s, %(status)s,
                       %(start)s, %(end)s, %(meta)s)
               ON CONFLICT (user_id) DO UPDATE SET
                   tier = excluded.tier, billing_cycle = excluded.billing_cycle, status = excluded.status,
                   current_period_start = excluded.current_period_start,
                   current_period_end = excluded.current_period_end,
                   metadata = s.metadata || excluded.metadata, updated_at = now()
               RETURNING s.id""",
            {"sid": event.subscription_id and str(event.subscription_id), "bid": bid, "tier": event.tier,
             "cycle": event.billing_cycle, "status": event.status, "start": event.current_period_start,
             "end": event.current_period_end, "meta": Jsonb(event.metadata or {})},
        ).fetchone()
        sub_id: uuid.UUID = row[0]
        if sid and sid != sub_id:
            raise AmbiguousUser(f"user {bid} already has subscription {sub_id}, event names {sid}")
        user_id = ensure_mapping_in(conn, bid, hint)
        conn.execute(
            """UPDATE public.subscriptions_consolidated
                  SET metadata = metadata || jsonb_build_object('resolved_supabase_user_id', %s::text)
                WHERE id = %s AND metadata ->> 'resolved_supabase_user_id' IS DISTINCT FROM %s::text""",
            (user_id, sub_id, user_id),
        )
        if amount == 0 or event.status not in PAID_STATUSES:
            return SubscriptionEventResult(sub_id, bid, user_id, 0, False, None, None)
        write = conn.execute(
            """SELECT g.new_balance, g.transaction_id, g.duplicate, k.key
                 FROM (SELECT public.subscription_grant_key(%(sub)s, %(start)s) AS key) k,
                      LATERAL public.add_points(%(uid)s, %(amount)s, 'subscription_grant',
                          %(desc)s, k.key, %(meta)s) g""",
            {"sub": sub_id, "start": event.current_period_start, "uid": user_id, "amount": amount,
             "desc": f"{event.tier} {event.billing_cycle} credits",
             "meta": Jsonb({"subscription_id": str(sub_id), "bestauth_user_id": str(bid), "tier": event.tier,
                            "billing_cycle": event.billing_cycle,
                            "period_start": event.current_period_start.isoformat(),
                            "period_end": event.current_period_end.isoformat(),
                            "event_id": event.event_id})},
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
    log.info("subscription %s: %s credits for user %s (points %s), period key %s%s",
             sub_id, amount, bid, user_id, key, " (already granted)" if duplicate else "")
    return SubscriptionEventResult(sub_id, bid, user_id, amount, bool(duplicate), int(new_balance), int(tx_id))
