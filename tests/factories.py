"""Builders for hand-made test data, written the way the app (or its bugs) would write it."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg.types.json import Jsonb


def make_user(conn: psycopg.Connection, email: str | None = None, *, mapped_to: uuid.UUID | None | bool = True,
              created_at: datetime | None = None) -> tuple[uuid.UUID, uuid.UUID | None]:
    """A BestAuth user; ``mapped_to=True`` maps to a new random points id, a UUID maps to it, False/None maps nothing.

    Returns (bestauth id, mapped points id or None).
    """
    bid = uuid.uuid4()
    email = email or f"user-{bid.hex[:12]}@example.com"
    conn.execute("INSERT INTO public.bestauth_users (id, email, created_at) VALUES (%s, %s, coalesce(%s, now()))",
                 (bid, email.lower(), created_at))
    sid: uuid.UUID | None = None
    if mapped_to is True:
        sid = uuid.uuid4()
    elif isinstance(mapped_to, uuid.UUID):
        sid = mapped_to
    if sid is not None:
        conn.execute("INSERT INTO public.user_id_mapping (bestauth_user_id, supabase_user_id) VALUES (%s, %s)",
                     (bid, sid))
    return bid, sid


def make_subscription(conn: psycopg.Connection, bid: uuid.UUID, *, tier: str = "pro", billing_cycle: str = "monthly",
                      status: str = "active", period_start: datetime | None = None, days: int = 30,
                      metadata: dict[str, Any] | None = None, sub_id: uuid.UUID | None = None) -> dict[str, Any]:
    sub_id = sub_id or uuid.uuid4()
    start = period_start or (datetime.now(timezone.utc) - timedelta(days=3)).replace(microsecond=0)
    end = start + timedelta(days=days)
    conn.execute(
        """INSERT INTO public.subscriptions_consolidated
               (id, user_id, tier, billing_cycle, status, current_period_start, current_period_end, metadata)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
        (sub_id, bid, tier, billing_cycle, status, start, end, Jsonb(metadata or {})),
    )
    return {"id": sub_id, "start": start, "end": end, "tier": tier, "billing_cycle": billing_cycle}


def grant_period(conn: psycopg.Connection, user_id: uuid.UUID, sub: dict[str, Any], amount: int,
                 key: str | None = None) -> tuple[int, int, bool]:
    """Grant a period's credits the way the webhook does (period key unless ``key`` overrides)."""
    meta = {"subscription_id": str(sub["id"]), "period_start": sub["start"].isoformat(),
            "period_end": sub["end"].isoformat(), "tier": sub["tier"], "billing_cycle": sub["billing_cycle"]}
    return conn.execute(
        """SELECT * FROM public.add_points(%s, %s, 'subscription_grant', 'period credits',
                  coalesce(%s, public.subscription_grant_key(%s, %s)), %s)""",
        (user_id, amount, key, sub["id"], sub["start"], Jsonb(meta)),
    ).fetchone()


def ledger_sum(conn: psycopg.Connection, user_id: uuid.UUID) -> int:
    return int(conn.execute("SELECT coalesce(sum(amount), 0) FROM public.points_transactions WHERE user_id = %s",
                            (user_id,)).fetchone()[0])


def balance_row(conn: psycopg.Connection, user_id: uuid.UUID) -> tuple[int, int, int] | None:
    return conn.execute("SELECT balance, lifetime_earned, lifetime_spent FROM public.points_balances WHERE user_id = %s",
                        (user_id,)).fetchone()


def count_rows(conn: psycopg.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM public.{table}").fetchone()[0])  # noqa: S608 (test constant)
