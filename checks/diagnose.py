"""`credits diagnose`: every check for one user, as a pass/fail list with the fix to run.

The rule checks are the audit's own rules run on a snapshot filtered to this user's rows (so a
diagnosis can never disagree with the audit), plus what only makes sense for one user: does the user
exist, which id do their credits live under, and would a generation's deduction go through right now
(tried inside a transaction that is rolled back, so nothing changes).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg

from checks.findings import plain
from ledger import db
from ledger.config import CreditsConfig
from ledger.errors import UnknownUser

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"


@dataclass
class Check:
    name: str
    status: str  # pass | fail | warn | skip
    detail: str
    fix: str | None = None  # the command (or action) that fixes it
    rule: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status, "detail": self.detail, "fix": self.fix, "rule": self.rule}


@dataclass
class Diagnosis:
    ref: str
    user: dict[str, Any]
    checks: list[Check] = field(default_factory=list)

    @property
    def status(self) -> str:
        """CRITICAL if a failed check belongs to a critical rule (or to none: a user who cannot be
        resolved at all), WARNING if only warning rules failed, else HEALTHY (warn/skip never fail)."""
        from checks.rules import RULES

        failing = [c for c in self.checks if c.status == FAIL]
        if any(c.rule not in RULES or RULES[c.rule].severity == "critical" for c in failing):
            return "CRITICAL"
        return "WARNING" if failing else "HEALTHY"

    @property
    def exit_code(self) -> int:
        return {"HEALTHY": 0, "WARNING": 1, "CRITICAL": 2}[self.status]

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "user": plain(self.user), "checks": [c.to_json() for c in self.checks]}


def _rule_check(name: str, rule_id: str, results: dict[str, Any], ok_detail: str, user_ref: str,
                missing_ok: bool = False) -> Check:
    res = results[rule_id]
    if not res.findings:
        return Check(name, PASS, ok_detail, rule=rule_id)
    f = res.findings[0]
    detail = f"expected {_brief(f.expected)}, found {_brief(f.found)}"
    if f.fix:
        fix = f"credits audit --live --rule {rule_id} --user {user_ref}   ({f.fix})"
    else:
        fix = f"needs a person: {f.reason}" if f.reason else "needs a person"
    if f.fix and f.reason:
        detail += f" ({f.reason})"
    return Check(name, FAIL, detail, fix, rule=rule_id)


def _brief(value: Any) -> str:
    from checks.report import compact

    text = compact(value) if not isinstance(value, str) else value
    return text if len(text) <= 160 else text[:157] + "..."


def dry_run_deduction(url: str, user_id: str, amount: int) -> tuple[bool, str]:
    """Call deduct_points for real inside a transaction that is always rolled back."""
    with db.connect(url) as conn:
        try:
            with conn.transaction(force_rollback=True):
                new_balance, _tx, _dup = conn.execute(
                    """SELECT new_balance, transaction_id, duplicate FROM public.deduct_points(
                           %s, %s, 'generation_deduction', 'credits diagnose dry run', %s, '{"dry_run": true}')""",
                    (user_id, amount, f"diagnose:dry-run:{uuid.uuid4()}")).fetchone()
            return True, f"a {amount}-credit deduction would succeed (balance after: {new_balance}); rolled back"
        except psycopg.Error as exc:
            if getattr(exc, "sqlstate", None) == "CR001":
                return False, f"a {amount}-credit deduction would be refused: {exc.diag.message_primary}"
            return False, f"a {amount}-credit deduction would fail: {exc.diag.message_primary or exc}"


def diagnose(url: str, config: CreditsConfig, ref: str) -> Diagnosis:
    from checks.audit import run_audit
    from checks.snapshot import user_filter_for
    from checks.state import user_state

    flt = user_filter_for(url, [ref])
    if not flt.bestauth_ids and not flt.points_ids:  # pragma: no cover - user_filter_for raises first
        raise UnknownUser(f"no user matches {ref}")
    from checks.snapshot import take_snapshot

    snap = take_snapshot(url, users=flt)
    results = run_audit(url, config, snapshot=snap).results
    state = user_state(snap, config)
    users = state[~state["orphan"]]
    if len(users):
        row = users.iloc[0].to_dict()
    else:  # an orphan points id
        row = state.iloc[0].to_dict()
    from checks.rules.base import opt

    user = {"bestauth_user_id": opt(row.get("bestauth_user_id")), "email": opt(row.get("email")),
            "user_id": row["user_id"], "resolved_via": row["resolution_source"],
            "tier": opt(row.get("tier")), "billing_cycle": opt(row.get("billing_cycle")),
            "status": opt(row.get("status")), "balance": int(row["balance"]) if row["has_balance_row"] else None}
    dx = Diagnosis(ref, user)
    who = user["email"] or user["bestauth_user_id"] or user["user_id"]
    checks = dx.checks
    if user["bestauth_user_id"]:
        checks.append(Check("user exists", PASS, f"BestAuth user {user['bestauth_user_id']} ({user['email']})"))
    else:
        checks.append(Check("user exists", FAIL, f"points id {row['user_id']} holds credits but no BestAuth user "
                            "resolves to it (orphan)", "needs a person: find the owner and map them"))
    checks.append(_rule_check("mapping", "mapping_present", results,
                              f"mapped to points id {opt(row.get('mapped_user_id'))}", who))
    if row.get("has_subscription"):
        period = opt(row.get("period_date"))
        checks.append(Check("subscription", PASS, f"{row['tier']} {opt(row.get('billing_cycle')) or ''} "
                            f"{row['status']}, current period from {period}".replace("  ", " ")))
        checks.append(_rule_check("resolved metadata", "metadata_resolved", results,
                                  f"metadata.resolved_supabase_user_id = {opt(row.get('meta_resolved_id'))}", who))
    else:
        checks.append(Check("subscription", SKIP, "no subscription: free tier"))
        checks.append(Check("resolved metadata", SKIP, "no subscription"))
    if row["has_balance_row"]:
        checks.append(Check("balance row", PASS, f"balance {int(row['balance'])}, reserved {int(row['reserved'])}"))
    elif row.get("paid_current"):
        checks.append(Check("balance row", FAIL, "paid subscription but no balance row",
                            f"credits audit --live --rule paid_users_funded --user {who}", rule="paid_users_funded"))
    else:
        checks.append(Check("balance row", SKIP, "no balance row (never granted credits: fine for free users)"))
    if row.get("paid_current"):
        checks.append(_rule_check("current period funded", "paid_users_funded", results,
                                  f"period {opt(row.get('period_date'))} granted "
                                  f"({int(row['current_granted'])} credits)", who))
    else:
        checks.append(Check("current period funded", SKIP,
                            f"not an active/trialing paid subscription ({opt(row.get('status')) or 'none'})"))
    checks.append(_rule_check("balance plausible for tier", "balance_matches_tier", results,
                              "balance within the tier's plausible range", who))
    checks.append(_rule_check("ledger integrity", "ledger_integrity", results,
                              f"balance = ledger sum = {int(row['ledger_sum'])} over {int(row['ledger_rows'])} "
                              "rows, chain intact", who))
    checks.append(_rule_check("duplicate grants", "duplicate_grants", results, "no period granted twice", who))
    checks.append(_rule_check("failed deductions", "failed_deductions", results,
                              f"{int(row['failures_last_hour'])} failed deduction(s) in the last hour", who))
    cost = config.generation_cost("image") if "image" in config.generation_costs else min(config.generation_costs.values())
    if row["has_balance_row"]:
        ok, detail = dry_run_deduction(url, row["user_id"], cost)
        if ok:
            checks.append(Check("dry-run deduction", PASS, detail))
        elif row.get("paid_current"):
            checks.append(Check("dry-run deduction", WARN, detail + " (out of credits this period)"))
        else:
            checks.append(Check("dry-run deduction", WARN, detail))
    else:
        checks.append(Check("dry-run deduction", SKIP if not row.get("paid_current") else WARN,
                            "no balance row: a deduction would be refused"
                            + ("" if row.get("paid_current") else " (free users use the daily limit)")))
    return dx
