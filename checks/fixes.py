"""The fix applier: dry run by default; live only when asked, capped, recorded, idempotent.

Safety rules, each enforced here rather than trusted to the planner:

- A dry run touches nothing (it does not even connect).
- A live run whose plan is larger than the cap is refused before anything is written.
- Each fix runs in its own transaction together with its fix-log row: the log never claims a fix
  that did not land, and a fix that landed is always in the log, linked to its run.
- Each fix re-checks, inside its transaction, the facts it was planned on (the mapping still absent,
  the period still current, the duplicate still unspent, ...). A fix whose work is already done is a
  no-op (``applied = false``, "already done"), so running the same plan twice changes nothing twice.
- Ledger rows are only ever added, through the ledger functions, under idempotency keys; the balance
  cache is rebuilt only by ``audit_rebuild_balance`` (sql/005).
"""

from __future__ import annotations

import getpass
import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb

from checks.lifecycle_fixes import HANDLERS as LIFECYCLE_HANDLERS
from ledger import db
from ledger.errors import CreditError

if TYPE_CHECKING:
    from checks.findings import Finding
    from ledger.config import CreditsConfig

log = logging.getLogger(__name__)

# the order fixes are applied in: identity first (grants go to the mapped id), the cache, then expiry
# (expire_lots writes balance_after from the cache: it must be right first)
ACTIONS: tuple[str, ...] = ("create_mapping", "write_resolved_metadata", "grant_period", "grant_plan_change",
                            "reverse_duplicate_grant", "rebuild_balance", "expire_lots")


class FixCapExceeded(CreditError):
    """A live run's plan is larger than the cap: nothing was applied."""

    def __init__(self, planned: int, cap: int) -> None:
        super().__init__(f"the plan has {planned} fixes, more than the cap of {cap}: nothing was applied "
                         f"(review the dry run, then raise --max-fixes if the plan is right)")
        self.planned = planned
        self.cap = cap


class FixConflict(CreditError):
    """What the fix was planned on no longer holds; it was not applied."""


@dataclass
class PlannedFix:
    rule: str
    action: str
    bestauth_user_id: str | None
    user_id: str | None
    params: dict[str, Any]
    idempotency_key: str

    def to_json(self) -> dict[str, Any]:
        from checks.findings import plain

        return {"rule": self.rule, "action": self.action, "bestauth_user_id": self.bestauth_user_id,
                "user_id": self.user_id, "idempotency_key": self.idempotency_key, "params": plain(self.params)}


@dataclass
class AppliedFix:
    planned: PlannedFix
    applied: bool
    before: Any = None
    after: Any = None
    error: str | None = None
    note: str | None = None  # "dry run", "already done", ...
    transaction_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        from checks.findings import plain

        p = self.planned
        doc = {"rule": p.rule, "bestauth_user_id": p.bestauth_user_id, "user_id": p.user_id, "action": p.action,
               "applied": self.applied}
        extra = {"before": plain(self.before), "after": plain(self.after), "error": self.error, "note": self.note,
                 "transaction_id": self.transaction_id}
        return doc | {k: v for k, v in extra.items() if v is not None}


@dataclass
class FixRun:
    run_id: str | None
    live: bool
    actor: str
    fixes: list[AppliedFix] = field(default_factory=list)

    @property
    def applied(self) -> int:
        return sum(1 for f in self.fixes if f.applied)

    @property
    def failed(self) -> int:
        return sum(1 for f in self.fixes if f.error)

    @property
    def skipped(self) -> int:
        return sum(1 for f in self.fixes if not f.applied and not f.error)


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def _key(action: str, finding: "Finding") -> str:
    p = finding.params or {}
    if action == "create_mapping":
        return f"audit:create_mapping:{finding.bestauth_user_id}"
    if action == "write_resolved_metadata":
        return f"audit:write_resolved_metadata:{p['subscription_id']}:{p['resolved_supabase_user_id']}"
    if action == "grant_period":
        return str(p["key"])
    if action == "reverse_duplicate_grant":
        return "audit:reverse_grant:" + ",".join(str(r["transaction_id"]) for r in p["reverse"])
    if action == "rebuild_balance":
        return f"audit:rebuild_balance:{p['user_id']}"
    if action == "grant_plan_change":
        return str(p["key"])
    if action == "expire_lots":
        return f"audit:expire_lots:{p['user_id']}:{p['due_lot_ids']}"
    raise ValueError(f"unknown fix action {action!r}")


def plan_from_findings(findings: "list[Finding]") -> list[PlannedFix]:
    """One planned fix per finding that has one, deduplicated by key, in application order."""
    plan: dict[str, PlannedFix] = {}
    for f in findings:
        if not f.fix:
            continue
        key = _key(f.fix, f)
        if key not in plan:
            plan[key] = PlannedFix(rule=f.rule, action=f.fix, bestauth_user_id=f.bestauth_user_id,
                                   user_id=f.user_id, params=dict(f.params or {}), idempotency_key=key)
    return sorted(plan.values(), key=lambda p: ACTIONS.index(p.action))


# ----------------------------------------------------------------------------------------- handlers
# each: (conn inside a transaction, fix, run id) -> (applied, before, after, ledger transaction id)

Outcome = tuple[bool, Any, Any, int | None]


def _create_mapping(conn: psycopg.Connection, fix: PlannedFix, run_id: str) -> Outcome:
    bid, target = fix.bestauth_user_id, fix.params["supabase_user_id"]
    if conn.execute("SELECT 1 FROM public.bestauth_users WHERE id = %s", (bid,)).fetchone() is None:
        raise FixConflict(f"BestAuth user {bid} no longer exists")
    row = conn.execute("SELECT supabase_user_id::text FROM public.user_id_mapping WHERE bestauth_user_id = %s "
                       "FOR UPDATE", (bid,)).fetchone()
    if row:
        if row[0] == target:
            return False, None, {"supabase_user_id": target}, None
        raise FixConflict(f"user {bid} has meanwhile been mapped to {row[0]}, not {target}")
    taken = conn.execute("SELECT bestauth_user_id::text FROM public.user_id_mapping WHERE supabase_user_id = %s",
                         (target,)).fetchone()
    if taken:
        raise FixConflict(f"points id {target} is already mapped to BestAuth user {taken[0]}")
    conn.execute("INSERT INTO public.user_id_mapping (bestauth_user_id, supabase_user_id) VALUES (%s, %s)",
                 (bid, target))
    return True, None, {"supabase_user_id": target, "evidence": fix.params.get("evidence")}, None


def _write_resolved_metadata(conn: psycopg.Connection, fix: PlannedFix, run_id: str) -> Outcome:
    sid, target = fix.params["subscription_id"], fix.params["resolved_supabase_user_id"]
    row = conn.execute(
        """SELECT s.metadata ->> 'resolved_supabase_user_id', m.supabase_user_id::text
             FROM public.subscriptions_consolidated s
             LEFT JOIN public.user_id_mapping m ON m.bestauth_user_id = s.user_id
            WHERE s.id = %s FOR UPDATE OF s""", (sid,)).fetchone()
    if row is None:
        raise FixConflict(f"subscription {sid} no longer exists")
    current, mapped = row
    if mapped is not None and mapped != target:
        raise FixConflict(f"the mapping now says {mapped}, not {target}")
    if current == target:
        return False, {"resolved_supabase_user_id": current}, {"resolved_supabase_user_id": target}, None
    conn.execute("""UPDATE public.subscriptions_consolidated
                       SET metadata = metadata || jsonb_build_object('resolved_supabase_user_id', %s::text),
                           updated_at = now()
                     WHERE id = %s""", (target, sid))
    return True, {"resolved_supabase_user_id": current}, {"resolved_supabase_user_id": target}, None


def _grant_period(conn: psycopg.Connection, fix: PlannedFix, run_id: str) -> Outcome:
    p = fix.params
    sub = conn.execute(
        """SELECT s.status, s.tier, to_char(s.current_period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                  r.user_id::text
             FROM public.subscriptions_consolidated s
             JOIN public.user_id_resolution r ON r.bestauth_user_id = s.user_id
            WHERE s.id = %s FOR UPDATE OF s""", (p["subscription_id"],)).fetchone()
    if sub is None:
        raise FixConflict(f"subscription {p['subscription_id']} no longer exists")
    status, tier, period_date, resolved = sub
    if status not in ("active", "trialing") or tier != p["tier"] or period_date != p["period_date"]:
        raise FixConflict(f"the subscription changed since the audit (now {tier}, {status}, period {period_date})")
    if resolved != p["user_id"]:
        raise FixConflict(f"the user now resolves to {resolved}, not {p['user_id']}: map the user first")
    before = conn.execute("SELECT balance FROM public.points_balances WHERE user_id = %s", (p["user_id"],)).fetchone()
    meta = {"subscription_id": p["subscription_id"], "bestauth_user_id": fix.bestauth_user_id, "tier": p["tier"],
            "billing_cycle": p["billing_cycle"], "period_start": p["period_start"], "period_end": p.get("period_end"),
            "via": "credits audit --live", "audit_run_id": run_id}
    new_balance, tx_id, duplicate = conn.execute(
        """SELECT new_balance, transaction_id, duplicate
             FROM public.add_points(%s, %s, 'subscription_grant', %s, %s, %s)""",
        (p["user_id"], p["amount"], f"{p['tier']} {p['billing_cycle']} credits (audit fix: missing period grant)",
         p["key"], Jsonb(meta))).fetchone()
    after = {"balance": int(new_balance), "granted": p["amount"], "period": p["period_date"]}
    return (not duplicate), {"balance": before[0] if before else None}, after, int(tx_id)


def _reverse_duplicate_grant(conn: psycopg.Connection, fix: PlannedFix, run_id: str) -> Outcome:
    p = fix.params
    uid = p["user_id"]
    before = conn.execute("SELECT balance FROM public.points_balances WHERE user_id = %s", (uid,)).fetchone()
    applied, last_tx, new_balance = False, None, before[0] if before else None
    for r in p["reverse"]:
        tx = conn.execute("SELECT user_id::text, amount, transaction_type FROM public.points_transactions "
                          "WHERE id = %s", (r["transaction_id"],)).fetchone()
        if tx is None or tx[0] != uid or tx[1] != r["amount"] or tx[2] != "subscription_grant":
            raise FixConflict(f"ledger row {r['transaction_id']} is not the grant the audit saw")
        try:
            new_balance, tx_id, duplicate = conn.execute(
                """SELECT new_balance, transaction_id, duplicate
                     FROM public.deduct_points(%s, %s, 'reconciliation_fix', %s, %s, %s)""",
                (uid, r["amount"], f"reverse duplicate grant {r['transaction_id']} of period {p['period_date']}",
                 f"audit:reverse_grant:{r['transaction_id']}",
                 Jsonb({"reverses_transaction_id": str(r["transaction_id"]), "subscription_id": p["subscription_id"],
                        "period_start": p["period_date"], "kept_transaction_id": p.get("kept_transaction_id"),
                        "audit_run_id": run_id}))).fetchone()
        except psycopg.Error as exc:
            if getattr(exc, "sqlstate", None) == "CR001":
                raise FixConflict(f"the duplicate grant {r['transaction_id']} has meanwhile been spent: "
                                  "a person must decide") from None
            raise
        applied = applied or not duplicate
        last_tx = int(tx_id)
    return applied, {"balance": before[0] if before else None}, {"balance": int(new_balance)}, last_tx


def _rebuild_balance(conn: psycopg.Connection, fix: PlannedFix, run_id: str) -> Outcome:
    try:
        applied, before, after = conn.execute("SELECT applied, before, after FROM public.audit_rebuild_balance(%s)",
                                              (fix.params["user_id"],)).fetchone()
    except psycopg.Error as exc:
        if getattr(exc, "sqlstate", None) == "CR007":
            raise FixConflict(exc.diag.message_primary or str(exc)) from None
        raise
    return bool(applied), before, after, None


HANDLERS: dict[str, Callable[[psycopg.Connection, PlannedFix, str], Outcome]] = {
    "create_mapping": _create_mapping,
    "write_resolved_metadata": _write_resolved_metadata,
    "grant_period": _grant_period,
    "reverse_duplicate_grant": _reverse_duplicate_grant,
    "rebuild_balance": _rebuild_balance,
}
HANDLERS.update(LIFECYCLE_HANDLERS)  # expire_lots, grant_plan_change (checks/lifecycle_fixes.py)


def apply_fixes(url: str, config: "CreditsConfig", plan: list[PlannedFix], *, live: bool, max_fixes: int,
                actor: str, run_id: str | None = None, audit: dict[str, Any] | None = None) -> FixRun:
    """Apply ``plan`` (live) or describe it (dry run). ``audit`` fills the run record: rules, status,
    snapshot_at, counts."""
    if not live:
        return FixRun(None, False, actor, [AppliedFix(p, False, p.params.get("before"), p.params.get("after"),
                                                      note="dry run") for p in plan])
    if max_fixes < 0:
        raise ValueError("max_fixes must be >= 0")
    if len(plan) > max_fixes:
        raise FixCapExceeded(len(plan), max_fixes)
    run_id = run_id or str(uuid.uuid4())
    audit = audit or {}
    run = FixRun(run_id, True, actor)
    with db.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO public.audit_runs (id, actor, live, rules, snapshot_at, status, planned, counts)
               VALUES (%s, %s, true, %s, %s, %s, %s, %s)""",
            (run_id, actor, list(audit.get("rules") or []), audit.get("snapshot_at"), audit.get("status"),
             len(plan), Jsonb(audit.get("counts") or {})))
        for fix in plan:
            handler = HANDLERS.get(fix.action)
            if handler is None:
                run.fixes.append(AppliedFix(fix, False, error=f"unknown action {fix.action}"))
                continue
            try:
                with conn.transaction():
                    applied, before, after, tx_id = handler(conn, fix, run_id)
                    if applied:
                        conn.execute(
                            """INSERT INTO public.audit_fix_log (run_id, rule, action, bestauth_user_id, user_id,
                                   idempotency_key, before, after, ledger_transaction_id)
                               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                            (run_id, fix.rule, fix.action, fix.bestauth_user_id, fix.user_id, fix.idempotency_key,
                             Jsonb(before), Jsonb(after), tx_id))
                run.fixes.append(AppliedFix(fix, applied, before, after, transaction_id=tx_id,
                                            note=None if applied else "already done"))
                log.info("run %s: %s %s for user %s (%s)", run_id, "applied" if applied else "already done",
                         fix.action, fix.bestauth_user_id or fix.user_id, fix.rule)
            except (FixConflict, psycopg.Error) as exc:
                message = exc.diag.message_primary if isinstance(exc, psycopg.Error) and exc.diag.message_primary \
                    else str(exc)
                if isinstance(exc, psycopg.OperationalError) and conn.broken:
                    raise
                run.fixes.append(AppliedFix(fix, False, error=message))
                log.warning("run %s: %s for user %s not applied: %s", run_id, fix.action,
                            fix.bestauth_user_id or fix.user_id, message)
        conn.execute(
            """UPDATE public.audit_runs SET finished_at = clock_timestamp(), applied = %s, skipped = %s, failed = %s
                WHERE id = %s""", (run.applied, run.skipped, run.failed, run_id))
    return run
