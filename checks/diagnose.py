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

# the lifecycle rules' severities (issue 6), for the per-user checks below when the audit's rule is absent
LIFECYCLE_SEVERITY = {"expiry_applied": "warning", "lots_consistent": "critical", "refunds_bounded": "critical",
                      "plan_change_grants": "warning"}


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
        severity = {**LIFECYCLE_SEVERITY, **{r: rule.severity for r, rule in RULES.items()}}
        if any(severity.get(c.rule or "", "critical") == "critical" for c in failing):
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


# One round trip: the user's lots against the ledger, what is past its expiry, refunds against the
# deductions they refund, recorded upgrades against their grants, and what expires next. The same facts
# the lifecycle rules read (checks/rules/expiry_applied, lots_consistent, refunds_bounded,
# plan_change_grants) for the whole population; here they give the details, and the verdict when a rule
# is not registered.
LIFECYCLE_SQL = """
WITH lots AS (
    SELECT l.*, coalesce((SELECT sum(d.amount) FROM public.points_lot_draws d
                        WHERE d.user_id = l.user_id AND d.lot_id = l.id), 0) AS drawn
      FROM public.points_lots l WHERE l.user_id = %(uid)s
), bal AS (
    SELECT coalesce((SELECT b.balance FROM public.points_balances b WHERE b.user_id = %(uid)s), 0) AS balance,
           coalesce((SELECT b.reserved FROM public.points_balances b WHERE b.user_id = %(uid)s), 0) AS reserved,
           coalesce((SELECT sum(t.amount) FROM public.points_transactions t WHERE t.user_id = %(uid)s), 0) AS ledger_sum
), due AS (
    SELECT coalesce(sum(l.remaining), 0) AS credits, count(*) AS lots, min(l.expires_at) AS since,
           coalesce(sum(CASE WHEN l.rollover_cap IS NOT NULL AND l.period_end IS NULL
                              AND l.rollover_until > l.expires_at THEN least(l.remaining, l.rollover_cap) END), 0)
               AS rollable
      FROM lots l WHERE l.remaining > 0 AND l.expires_at <= now()
), refunds AS (
    SELECT (r.metadata ->> 'refund_of')::bigint AS refund_of, count(*) AS n, sum(r.amount) AS refunded
      FROM public.points_transactions r
     WHERE r.user_id = %(uid)s AND r.transaction_type = 'refund' AND jsonb_typeof(r.metadata -> 'refund_of') = 'number'
     GROUP BY 1
), upgrades AS (
    SELECT p.id, p.idempotency_key, p.credits, p.changed_at,
           EXISTS (SELECT 1 FROM public.points_transactions g
                    WHERE g.idempotency_key = p.idempotency_key AND g.transaction_type = 'plan_change'
                      AND g.amount = p.credits AND g.user_id = p.user_id) AS granted
      FROM public.subscription_plan_changes p
     WHERE (p.user_id = %(uid)s OR p.bestauth_user_id = %(bid)s) AND p.kind = 'upgrade' AND p.credits > 0
), nxt AS (
    SELECT min(l.expires_at) AS at FROM lots l WHERE l.remaining > 0 AND l.expires_at > now()
)
SELECT json_build_object(
    'lots', (SELECT count(*) FROM lots),
    'open_lots', (SELECT count(*) FROM lots WHERE remaining > 0),
    'open_credits', (SELECT coalesce(sum(remaining), 0) FROM lots),
    'bad_lots', (SELECT coalesce(json_agg(id ORDER BY id), '[]') FROM lots
                  WHERE remaining > granted OR expired > granted
                     OR granted - remaining - consumed_before <> drawn),
    'uncovered_credits', (SELECT coalesce(sum(d.amount), 0) FROM public.points_lot_draws d
                           WHERE d.user_id = %(uid)s AND d.lot_id IS NULL),
    'balance', (SELECT balance FROM bal), 'reserved', (SELECT reserved FROM bal),
    'ledger_sum', (SELECT ledger_sum FROM bal),
    'due_lots', (SELECT lots FROM due), 'due_credits', (SELECT credits FROM due), 'due_since', (SELECT since FROM due),
    'overdue', (SELECT greatest(0, least(d.credits - d.rollable, b.balance - b.reserved)) FROM due d, bal b),
    'refunded_deductions', (SELECT count(*) FROM refunds),
    'refunded_credits', (SELECT coalesce(sum(refunded), 0) FROM refunds),
    'bad_refunds', (SELECT coalesce(json_agg(json_build_object('refund_of', r.refund_of, 'refunds', r.n,
                                                               'refunded', r.refunded, 'charged', -d.amount,
                                                               'type', d.transaction_type) ORDER BY r.refund_of), '[]')
                      FROM refunds r LEFT JOIN public.points_transactions d ON d.id = r.refund_of
                     WHERE r.n > 1 OR d.id IS NULL OR d.amount >= 0 OR r.refunded > -d.amount),
    'upgrades', (SELECT count(*) FROM upgrades),
    'ungranted_upgrades', (SELECT coalesce(json_agg(json_build_object('plan_change_id', u.id, 'credits', u.credits,
                                                                      'key', u.idempotency_key) ORDER BY u.id), '[]')
                             FROM upgrades u WHERE NOT u.granted),
    'next_expiry', (SELECT at FROM nxt),
    'next_expiry_credits', (SELECT coalesce(sum(l.remaining), 0) FROM lots l, nxt
                             WHERE l.remaining > 0 AND l.expires_at = nxt.at),
    'next_expiry_rollover', (SELECT max(l.rollover_cap) FROM lots l, nxt
                              WHERE l.remaining > 0 AND l.expires_at = nxt.at AND l.period_end IS NULL)
)
"""


def lifecycle_facts(url: str, user_id: str, bestauth_user_id: str | None) -> dict[str, Any]:
    """The user's lifecycle facts (see LIFECYCLE_SQL), read in one statement, changing nothing."""
    with db.connect(url, autocommit=True) as conn:
        return conn.execute(LIFECYCLE_SQL, {"uid": user_id, "bid": bestauth_user_id}).fetchone()[0]


def lifecycle_checks(facts: dict[str, Any], results: dict[str, Any], who: str) -> list[Check]:
    """Lots vs ledger, expiry applied, refunds bounded, upgrades granted, and what expires next. The verdict is
    the audit rule's where it is registered (a diagnosis never disagrees with the audit), else the facts'."""
    f = facts
    checks = []

    def verdict(name: str, rule_id: str, ok: bool, ok_detail: str, bad_detail: str, fix: str) -> Check:
        if rule_id in results:
            return _rule_check(name, rule_id, results, ok_detail, who)
        return Check(name, PASS if ok else FAIL, ok_detail if ok else bad_detail, None if ok else fix, rule=rule_id)

    if not f["lots"] and not f["ledger_sum"] and "lots_consistent" not in results:
        checks.append(Check("lots match ledger", SKIP, "no lots: the user was never granted credits",
                            rule="lots_consistent"))
    else:
        ok = not f["bad_lots"] and not f["uncovered_credits"] and f["open_credits"] == f["ledger_sum"]
        bad = (f"open lots hold {f['open_credits']} but the ledger sums to {f['ledger_sum']}"
               + (f"; lots whose draws do not add up: {f['bad_lots']}" if f["bad_lots"] else "")
               + (f"; {f['uncovered_credits']} credit(s) drawn with no open lot" if f["uncovered_credits"] else ""))
        checks.append(verdict("lots match ledger", "lots_consistent", ok,
                              f"{f['open_lots']} open lot(s) of {f['lots']} hold {f['open_credits']} = ledger sum "
                              f"(balance {f['balance']})", bad, "needs a person: see `credits history " + who + "`"))
        held = f" ({f['reserved']} held by reservations do not expire under the hold)" if f["reserved"] else ""
        checks.append(verdict(
            "expiry applied", "expiry_applied", not f["overdue"],
            "no credits past their expiry" if not f["due_lots"] else
            f"{f['due_credits']} credit(s) in {f['due_lots']} lot(s) past expiry, kept by rollover or holds{held}",
            f"{f['overdue']} credit(s) in {f['due_lots']} lot(s) past their expiry (since {f['due_since']}) not "
            f"written off yet{held}; the next operation or the daily sweep does it",
            f"credits expire --user {who}"))
    if not f["refunded_deductions"] and "refunds_bounded" not in results:
        checks.append(Check("refunds bounded", SKIP, "no refunded deductions", rule="refunds_bounded"))
    else:
        checks.append(verdict("refunds bounded", "refunds_bounded", not f["bad_refunds"],
                              f"{f['refunded_deductions']} deduction(s) refunded ({f['refunded_credits']} credits), "
                              "each once and within what it charged" if f["refunded_deductions"]
                              else "no refunded deductions",
                              f"refunds over or twice: {f['bad_refunds']}",
                              "needs a person: a refund is never undone automatically"))
    if not f["upgrades"] and "plan_change_grants" not in results:
        checks.append(Check("upgrade grants", SKIP, "no mid-period upgrade recorded", rule="plan_change_grants"))
    else:
        missing = f["ungranted_upgrades"]
        checks.append(verdict("upgrade grants", "plan_change_grants", not missing,
                              f"{f['upgrades']} upgrade(s), each with its prorated plan_change grant" if f["upgrades"]
                              else "no mid-period upgrade recorded",
                              f"upgrade(s) without their grant: {missing}",
                              f"credits audit --live --rule plan_change_grants --user {who}"))
    if f["next_expiry"]:
        roll = f" (up to {f['next_expiry_rollover']} may roll over)" if f["next_expiry_rollover"] else ""
        checks.append(Check("next expiry", PASS, f"{f['next_expiry_credits']} credit(s) expire at "
                            f"{f['next_expiry']}{roll}"))
    else:
        checks.append(Check("next expiry", PASS if f["lots"] else SKIP, "no open credits expire"))
    return checks


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
    facts = lifecycle_facts(url, row["user_id"], user["bestauth_user_id"])
    user["open_lots"], user["next_expiry"] = facts["open_lots"], facts["next_expiry"]
    checks.extend(lifecycle_checks(facts, results, who))
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
