"""The fixes of the credit-lifecycle rules (registered in checks.fixes.HANDLERS; same contract: run
inside the fix's transaction, re-check what they were planned on, a replay is a no-op).

- ``expire_lots`` (expiry_applied): ``public.expire_lots(user)``, idempotent by construction (each
  expiry row's key names the lot and the credits expired from it so far).
- ``grant_plan_change`` (plan_change_grants): the missing prorated grant through ``add_points`` under
  the plan change's own key, with the handler's metadata and lot terms (planned by the rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb

if TYPE_CHECKING:
    from checks.fixes import PlannedFix

Outcome = tuple[bool, Any, Any, "int | None"]


def _balance(conn: psycopg.Connection, user_id: str) -> int | None:
    row = conn.execute("SELECT balance FROM public.points_balances WHERE user_id = %s", (user_id,)).fetchone()
    return int(row[0]) if row else None


def expire_lots(conn: psycopg.Connection, fix: "PlannedFix", run_id: str) -> Outcome:
    uid = fix.params["user_id"]
    before = _balance(conn, uid)
    last = conn.execute("SELECT coalesce(max(id), 0) FROM public.points_transactions WHERE user_id = %s",
                        (uid,)).fetchone()[0]
    lots, credits, rolled = conn.execute("SELECT lots, credits, rolled_over FROM public.expire_lots(%s)",
                                         (uid,)).fetchone()
    tx = conn.execute("""SELECT max(id) FROM public.points_transactions
                          WHERE user_id = %s AND transaction_type = 'expiry' AND id > %s""", (uid, last)).fetchone()[0]
    after = {"balance": _balance(conn, uid), "expired": int(credits), "rolled_over": int(rolled), "lots": int(lots)}
    return bool(lots or credits or rolled), {"balance": before}, after, tx


def grant_plan_change(conn: psycopg.Connection, fix: "PlannedFix", run_id: str) -> Outcome:
    from checks.fixes import FixConflict

    p = fix.params
    row = conn.execute("""SELECT user_id::text, credits, idempotency_key, kind
                            FROM public.subscription_plan_changes WHERE id = %s""",
                       (p["plan_change_id"],)).fetchone()
    if row is None or row[0] != p["user_id"] or row[1] != p["amount"] or row[2] != p["key"] or row[3] != "upgrade":
        raise FixConflict(f"plan change {p['plan_change_id']} is not the upgrade the audit saw")
    before = _balance(conn, p["user_id"])
    meta = dict(p["metadata"]) | {"via": "credits audit --live", "audit_run_id": run_id}
    try:
        new_balance, tx_id, duplicate = conn.execute(
            """SELECT new_balance, transaction_id, duplicate
                 FROM public.add_points(%s, %s, 'plan_change', %s, %s, %s)""",
            (p["user_id"], p["amount"], p["description"], p["key"], Jsonb(meta))).fetchone()
    except psycopg.Error as exc:
        if getattr(exc, "sqlstate", None) == "CR002":  # the key is taken by another row: not ours to judge
            raise FixConflict(f"the key {p['key']} is used by another ledger row: a person must decide") from None
        raise
    return (not duplicate), {"balance": before}, {"balance": int(new_balance), "granted": p["amount"]}, int(tx_id)


HANDLERS = {"expire_lots": expire_lots, "grant_plan_change": grant_plan_change}
