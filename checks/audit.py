"""The audit: snapshot -> user state -> every rule's GE suite -> findings -> planned (or applied) fixes.

The CLI (`credits audit`) and the Dagster job call these functions; no rule logic lives anywhere else.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from checks.findings import Finding, plain
from checks.fixes import AppliedFix, FixRun, PlannedFix, apply_fixes, default_actor, plan_from_findings
from checks.rules import RULES
from checks.rules.base import RuleResult
from ledger.errors import CreditError, InvalidArgument

if TYPE_CHECKING:
    from checks.snapshot import Progress, Snapshot
    from ledger.config import CreditsConfig

log = logging.getLogger(__name__)

STATUSES = ("HEALTHY", "WARNING", "CRITICAL")
EXIT_CODES = {"HEALTHY": 0, "WARNING": 1, "CRITICAL": 2}


class RuleFailed(CreditError):
    """A rule's suite raised instead of validating: the audit cannot vouch for anything."""


def status_of(findings: Iterable[Finding]) -> str:
    severities = {f.severity for f in findings}
    if "critical" in severities:
        return "CRITICAL"
    if "warning" in severities:
        return "WARNING"
    return "HEALTHY"


def select_rules(rules: Iterable[str] | None) -> list[str]:
    if rules is None:
        return list(RULES)
    chosen = list(dict.fromkeys(rules))
    unknown = [r for r in chosen if r not in RULES]
    if unknown:
        raise InvalidArgument(f"unknown rule id(s): {', '.join(unknown)} (known: {', '.join(RULES)})")
    if not chosen:
        raise InvalidArgument("no rule selected")
    return [r for r in RULES if r in chosen]  # contract order


@dataclass
class AuditReport:
    status: str
    results: dict[str, RuleResult]
    findings: list[Finding]
    plan: list[PlannedFix] = field(default_factory=list)
    fixes: list[AppliedFix] = field(default_factory=list)
    run_id: str | None = None
    live: bool = False
    snapshot_at: datetime | None = None
    as_of: datetime | None = None
    timings: dict[str, float] = field(default_factory=dict)
    checked_users: int = 0
    after: "AuditReport | None" = None  # the verifying audit after a live run that applied fixes
    refused: str | None = None  # why a live run applied nothing (the cap)

    @property
    def final_status(self) -> str:
        return self.after.status if self.after is not None else self.status

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.final_status]

    def counts(self) -> dict[str, int]:
        return {rid: len(res.findings) for rid, res in self.results.items()}

    def rules_json(self) -> dict[str, Any]:
        doc = {}
        for rid, rule in RULES.items():
            res = self.results.get(rid)
            entry: dict[str, Any] = {"severity": rule.severity, "count": len(res.findings) if res else 0}
            if res is None:
                entry["evaluated"] = False
            else:
                entry["fixable"] = sum(1 for f in res.findings if f.fix)
            doc[rid] = entry
        return doc

    def to_json(self) -> dict[str, Any]:
        """The contract's --json document (status, rules, findings, fixes), plus run details."""
        doc: dict[str, Any] = {
            "status": self.final_status,
            "rules": self.rules_json(),
            "findings": [f.to_json() for f in self.findings],
            "fixes": [f.to_json() for f in self.fixes],
            "live": self.live,
            "run_id": self.run_id,
            "snapshot_at": plain(self.snapshot_at),
            "checked_users": self.checked_users,
        }
        if self.as_of is not None:
            doc["as_of"] = plain(self.as_of)
        if self.after is not None:
            doc["status_before_fixes"] = self.status
            doc["after"] = {"status": self.after.status, "rules": self.after.rules_json(),
                            "findings": [f.to_json() for f in self.after.findings]}
        if self.refused:
            doc["refused"] = self.refused
        return doc


def evaluate_rules(snapshot: "Snapshot", config: "CreditsConfig", rules: Iterable[str] | None = None,
                   state: Any = None) -> tuple[dict[str, RuleResult], Any]:
    """Every selected rule on one snapshot; returns the results and the user state they read."""
    from checks.state import release_memory, user_state

    chosen = select_rules(rules)
    if state is None:
        state = user_state(snapshot, config)
    results = {}
    # what exists before the rules (modules, GE's objects, the state) outlives them: frozen, the collection
    # after each rule walks only that rule's objects (1M users: 11 full collections cost 2.0 s, 0.18 s each)
    gc.freeze()
    try:
        for rid in chosen:
            res = RULES[rid].evaluate(state, snapshot, config)
            if res.errors:
                raise RuleFailed(f"rule {rid} could not validate: {'; '.join(res.errors)}")
            results[rid] = res
            res.outcome = None  # the row positions are in the findings now; keep only the bounded summary
            release_memory()  # each rule's temporaries go back before the next rule allocates its own
            log.debug("rule %s: %d checked, %d findings in %.2fs", rid, res.checked, len(res.findings), res.seconds)
    finally:
        gc.unfreeze()
    return results, state


def run_audit(url: str, config: "CreditsConfig", *, rules: Iterable[str] | None = None,
              as_of: datetime | None = None, snapshot: "Snapshot | None" = None,
              progress: "Progress | None" = None, users: Iterable[str] | None = None) -> AuditReport:
    """Audit every user (dry: nothing is written). The plan of fixes is on the report.

    ``users`` (emails or ids) restricts the audit to those users' rows: the same rules on a smaller
    snapshot (what `credits diagnose` and `credits audit --user` use).
    """
    # what exists before the audit (modules, GE's ~280k objects) is frozen while it runs, so the
    # collections that hand the snapshot's and the state's memory back walk only the audit's own objects
    # (~0.15 s each otherwise); evaluate_rules freezes again for the rules and unfreezes after them
    gc.freeze()
    try:
        return _run_audit(url, config, rules=rules, as_of=as_of, snapshot=snapshot, progress=progress,
                          users=users)
    finally:
        gc.unfreeze()


def _run_audit(url: str, config: "CreditsConfig", *, rules: Iterable[str] | None,
               as_of: datetime | None, snapshot: "Snapshot | None", progress: "Progress | None",
               users: Iterable[str] | None) -> AuditReport:
    from checks.lifecycle_frames import FRAMES as LIFECYCLE_FRAMES
    from checks.snapshot import take_snapshot, user_filter_for

    chosen = select_rules(rules)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    own_snapshot = snapshot is None
    if snapshot is None:
        flt = user_filter_for(url, users) if users is not None else None
        # the lifecycle frames (mostly server work) are read while the user state is built
        snapshot = take_snapshot(url, as_of=as_of, progress=progress, users=flt,
                                 background=LIFECYCLE_FRAMES if flt is None else ())
    timings["snapshot"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    from checks.state import release_memory, user_state

    # the identity frames end up in the state; on our own snapshot they are dropped as soon as they are
    # absorbed, so a million-user audit stays within its memory budget (a caller's snapshot is kept whole)
    state = user_state(snapshot, config, consume=own_snapshot)
    timings["state"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    results, _ = evaluate_rules(snapshot, config, chosen, state)
    timings["rules"] = time.perf_counter() - t2
    if own_snapshot:
        snapshot.wait()
        # read during the state and the rules: their own seconds, not on top of the snapshot's
        timings["snapshot_background"] = sum(snapshot.timings.get(n, 0.0) for n in LIFECYCLE_FRAMES)
    for rid, res in results.items():
        timings[f"rule:{rid}"] = res.seconds
    findings = [f for res in results.values() for f in res.findings]
    report = AuditReport(status=status_of(findings), results=results, findings=findings,
                         snapshot_at=snapshot.taken_at, as_of=snapshot.as_of, timings=timings,
                         checked_users=int((~state["orphan"]).sum()))
    report.plan = plan_fixes(report)
    report.fixes = [AppliedFix(p, False, p.params.get("before"), p.params.get("after"), note="dry run")
                    for p in report.plan]
    timings["total"] = time.perf_counter() - t0
    return report


def plan_fixes(report: AuditReport, *, rules: Iterable[str] | None = None) -> list[PlannedFix]:
    """The fixes the report's findings call for (optionally only some rules'), in application order."""
    chosen = set(select_rules(rules)) if rules is not None else None
    return plan_from_findings([f for f in report.findings if chosen is None or f.rule in chosen])


def audit_and_fix(url: str, config: "CreditsConfig", *, live: bool = False, max_fixes: int | None = None,
                  rules: Iterable[str] | None = None, actor: str | None = None,
                  progress: "Progress | None" = None, verify: bool = True, users: Iterable[str] | None = None,
                  on_phase: Callable[[str], None] | None = None) -> AuditReport:
    """The audit, then (live only) the fixes, then (if any fix landed) a verifying audit.

    Raises FixCapExceeded for a live plan over the cap (nothing written).
    """
    users = list(users) if users is not None else None
    report = run_audit(url, config, rules=rules, progress=progress, users=users)
    if not live:
        return report
    cap = config.audit.max_fixes if max_fixes is None else max_fixes
    if on_phase:
        on_phase(f"applying {len(report.plan)} fix(es)")
    run: FixRun = apply_fixes(url, config, report.plan, live=True, max_fixes=cap, actor=actor or default_actor(),
                              audit={"rules": list(report.results), "snapshot_at": report.snapshot_at,
                                     "status": report.status, "counts": report.counts()})
    report.live = True
    report.run_id = run.run_id
    report.fixes = run.fixes
    if verify and run.applied:
        if on_phase:
            on_phase("verifying")
        report.after = run_audit(url, config, rules=list(report.results), users=users)
    return report
