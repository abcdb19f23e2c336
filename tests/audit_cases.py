"""Hand-built users for the audit tests: healthy ones (including the tricky look-alikes) and one of each
fault, written the way the app (or its bugs) writes them."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tests.factories import grant_period, make_subscription, make_user

PRO_MONTHLY = 800


def paid_user(conn: psycopg.Connection, *, tier: str = "pro", cycle: str = "monthly", status: str = "active",
              grant: bool = True, spend: int = 0, prev_periods: int = 0, metadata: dict[str, Any] | str = "resolved",
              mapped: bool = True, days_into_period: int = 3) -> dict[str, Any]:
    """A paid user whose current period started ``days_into_period`` days ago; optionally earlier periods
    (renewals, all granted), the current grant, and ``spend`` credits of generations."""
    bid, pid = make_user(conn, mapped_to=True if mapped else None)
    points = pid or uuid.uuid4()
    meta: dict[str, Any]
    if metadata == "resolved":
        meta = {"resolved_supabase_user_id": str(points)}
    elif metadata == "none":
        meta = {}
    elif isinstance(metadata, dict):
        meta = metadata
    else:
        meta = {metadata: str(points)}
    days = 365 if cycle == "yearly" else 30
    start = (datetime.now(timezone.utc) - timedelta(days=days_into_period)).replace(microsecond=0)
    sub_id = uuid.uuid4()
    periods = []
    for k in range(prev_periods, 0, -1):
        p_start = start - timedelta(days=days * k)
        periods.append({"id": sub_id, "start": p_start, "end": p_start + timedelta(days=days), "tier": tier,
                        "billing_cycle": cycle})
    sub = make_subscription(conn, bid, tier=tier, billing_cycle=cycle, status=status, period_start=start, days=days,
                            metadata=meta, sub_id=sub_id)
    amount = 800 if (tier, cycle) == ("pro", "monthly") else 9600 if tier == "pro" and cycle == "yearly" \
        else 2000 if cycle == "monthly" else 24000
    for p in periods:
        grant_period(conn, points, p, amount)
    if grant:
        grant_period(conn, points, sub, amount)
    if spend:
        deduct(conn, points, spend)
    return {"bid": bid, "pid": points, "sub": sub, "amount": amount}


def free_user(conn: psycopg.Connection, *, subscription: bool = True) -> dict[str, Any]:
    bid, pid = make_user(conn)
    if subscription:
        conn.execute("""INSERT INTO public.subscriptions_consolidated (user_id, tier, status, metadata)
                        VALUES (%s, 'free', 'active', %s)""", (bid, Jsonb({"resolved_supabase_user_id": str(pid)})))
    return {"bid": bid, "pid": pid}


def deduct(conn: psycopg.Connection, user_id: uuid.UUID, amount: int, key: str | None = None) -> Any:
    return conn.execute("SELECT * FROM public.deduct_points(%s, %s, 'generation_deduction', 'image generation', %s)",
                        (user_id, amount, key or f"generation:job_{uuid.uuid4()}")).fetchone()


def add(conn: psycopg.Connection, user_id: uuid.UUID, amount: int, kind: str = "adjustment") -> Any:
    return conn.execute("SELECT * FROM public.add_points(%s, %s, %s, 'support', %s)",
                        (user_id, amount, kind, f"support:{uuid.uuid4()}")).fetchone()


def retry_grant(conn: psycopg.Connection, case: dict[str, Any]) -> Any:
    """The current period granted again by a webhook retry under its own key (metadata names the period)."""
    sub = case["sub"]
    meta = {"subscription_id": str(sub["id"]), "period_start": sub["start"].isoformat(),
            "period_end": sub["end"].isoformat(), "tier": sub["tier"], "billing_cycle": sub["billing_cycle"]}
    return conn.execute("SELECT * FROM public.add_points(%s, %s, 'subscription_grant', 'retry', %s, %s)",
                        (case["pid"], case["amount"], f"stripe_webhook:evt_{uuid.uuid4().hex[:20]}",
                         Jsonb(meta))).fetchone()


def drift(conn: psycopg.Connection, user_id: uuid.UUID, delta: int) -> None:
    """The balance cache moved without a ledger row (as the table owner: what the old bug did)."""
    conn.execute("UPDATE public.points_balances SET balance = balance + %s WHERE user_id = %s", (delta, user_id))


def chain_break(conn: psycopg.Connection, user_id: uuid.UUID, amount: int = 50, offset: int = 30) -> None:
    """A ledger row written past the functions with a stale balance_after (cache kept in step)."""
    bal = conn.execute("SELECT balance FROM public.points_balances WHERE user_id = %s", (user_id,)).fetchone()[0]
    conn.execute("""INSERT INTO public.points_transactions (user_id, amount, balance_after, transaction_type,
                        description, idempotency_key) VALUES (%s, %s, %s, 'adjustment', 'legacy script', %s)""",
                 (user_id, amount, bal + amount + offset, f"legacy:{uuid.uuid4()}"))
    conn.execute("""UPDATE public.points_balances SET balance = balance + %s, lifetime_earned = lifetime_earned + %s
                     WHERE user_id = %s""", (amount, amount, user_id))


def fail_deductions(conn: psycopg.Connection, user_id: uuid.UUID, n: int, *, hours_ago: float = 0) -> None:
    conn.execute("""INSERT INTO public.points_deduction_failures (user_id, amount, balance, reason, created_at)
                    SELECT %s, 100, 0, 'insufficient_credits', now() - %s * interval '1 hour' - g * interval '1 second'
                      FROM generate_series(1, %s) g""", (user_id, hours_ago, n))


def table_dump(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table an audit could touch, for before/after comparisons."""
    tables = {"bestauth_users": "id", "user_id_mapping": "bestauth_user_id", "subscriptions_consolidated": "id",
              "points_balances": "user_id", "points_transactions": "id", "audit_runs": "id", "audit_fix_log": "id"}
    return {t: conn.execute(f"SELECT * FROM public.{t} ORDER BY {k}").fetchall()  # noqa: S608 (constants)
            for t, k in tables.items()}
