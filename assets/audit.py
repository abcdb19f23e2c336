"""The audit's outputs as assets: the findings, the fix plan, the health report.

``findings`` is ``checks.audit.run_audit`` on this partition's snapshot, the very call behind
``credits audit``; the plan and the report are rendered from that one report. Nothing here decides what
a rule means. Per-rule finding counts are plain int metadata so the UI plots them across runs.
"""

from typing import Any

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetIn,
    MetadataValue,
    Output,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)

from assets.credit_state import GROUP, credit_state, locals_frames
from assets.partitions import daily_partitions
from assets.resources import CreditsDatabase
from assets.snapshots import SNAPSHOT_INS, snapshot_from_frames
from checks.audit import AuditReport
from checks.findings import Finding
from checks.fixes import PlannedFix
from checks.rules import RULES

TABLE_ROWS = 25  # first rows of a findings / plan table shown in the UI (the stored value has them all)
EXIT_CODE = {"HEALTHY": 0, "WARNING": 1, "CRITICAL": 2}


def _cell(value: Any, width: int = 120) -> str:
    from checks.report import compact

    text = value if isinstance(value, str) else compact(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def findings_table(findings: list[Finding], limit: int = TABLE_ROWS) -> MetadataValue:
    """The first findings, critical rules first, with the user ids a person searches for."""
    order = {rid: i for i, rid in enumerate(RULES)}
    ranked = sorted(findings, key=lambda f: (f.severity != "critical", order.get(f.rule, 99)))
    schema = TableSchema(columns=[TableColumn(n) for n in
                                  ("rule", "severity", "bestauth_user_id", "user_id", "expected", "found", "fix")])
    return MetadataValue.table(schema=schema, records=[
        TableRecord({"rule": f.rule, "severity": f.severity, "bestauth_user_id": f.bestauth_user_id or "",
                     "user_id": f.user_id or "", "expected": _cell(f.expected), "found": _cell(f.found),
                     "fix": f.fix or f"needs a person: {_cell(f.reason or '', 100)}"})
        for f in ranked[:limit]])


def plan_table(plan: list[PlannedFix], limit: int = TABLE_ROWS) -> MetadataValue:
    schema = TableSchema(columns=[TableColumn(n) for n in
                                  ("action", "rule", "bestauth_user_id", "user_id", "idempotency_key")])
    return MetadataValue.table(schema=schema, records=[
        TableRecord({"action": p.action, "rule": p.rule, "bestauth_user_id": p.bestauth_user_id or "",
                     "user_id": p.user_id or "", "idempotency_key": p.idempotency_key})
        for p in plan[:limit]])


def rule_counts(report: AuditReport) -> dict[str, MetadataValue]:
    """One int per rule (0 included), so each plots as its own series."""
    counts = report.counts()
    return {rid: MetadataValue.int(int(counts.get(rid, 0))) for rid in RULES}


@asset(ins={"credit_state": AssetIn(key=credit_state.key), **SNAPSHOT_INS}, partitions_def=daily_partitions,
       group_name=GROUP, compute_kind="great_expectations")
def findings(context: AssetExecutionContext, database: CreditsDatabase, credit_state: pd.DataFrame,
             bestauth_users: pd.DataFrame, user_id_mapping: pd.DataFrame, subscriptions: pd.DataFrame,
             points_balances: pd.DataFrame, ledger_by_user: pd.DataFrame, period_grants: pd.DataFrame,
             failed_deductions: pd.DataFrame, lots_by_user: pd.DataFrame,
             refunds: pd.DataFrame, plan_change_grants: pd.DataFrame) -> Output[AuditReport]:
    """Every rule's findings for the partition (the audit report `credits audit` prints), dry: nothing changes."""
    from checks.audit import run_audit

    snap = snapshot_from_frames(locals_frames(bestauth_users, user_id_mapping, subscriptions, points_balances,
                                              ledger_by_user, period_grants, failed_deductions, lots_by_user,
                                              refunds, plan_change_grants))
    report = run_audit(database.resolve_url(), database.credits_config(), snapshot=snap)
    critical = sum(1 for f in report.findings if f.severity == "critical")
    context.log.info("audit %s: %d finding(s), %d critical, %d fixable", report.status, len(report.findings),
                     critical, len(report.plan))
    return Output(report, metadata={
        "status": MetadataValue.text(report.status),
        "status_code": MetadataValue.int(EXIT_CODE[report.status]),
        "total_findings": MetadataValue.int(len(report.findings)),
        "critical_findings": MetadataValue.int(critical),
        "warning_findings": MetadataValue.int(len(report.findings) - critical),
        "checked_users": MetadataValue.int(int(report.checked_users)),
        **rule_counts(report),
        "findings": findings_table(report.findings),
        "audit_seconds": MetadataValue.float(round(float(report.timings.get("total", 0.0)), 3)),
    })


@asset(partitions_def=daily_partitions, group_name=GROUP)
def fix_plan(context: AssetExecutionContext, findings: AuditReport) -> Output[list[PlannedFix]]:
    """The fixes the findings call for, in application order (identity, grants, reversals, cache).
    Planning changes nothing; ``applied_fixes`` applies them when a run says ``live``."""
    plan = list(findings.plan)
    by_action: dict[str, int] = {}
    for p in plan:
        by_action[p.action] = by_action.get(p.action, 0) + 1
    person = sum(1 for f in findings.findings if not f.fix)
    return Output(plan, metadata={
        "planned_fixes": MetadataValue.int(len(plan)),
        "needs_a_person": MetadataValue.int(int(person)),
        **{f"action_{a}": MetadataValue.int(n) for a, n in sorted(by_action.items())},
        "plan": plan_table(plan),
    })


@asset(partitions_def=daily_partitions, group_name=GROUP, deps=[fix_plan])
def health_report(context: AssetExecutionContext, findings: AuditReport) -> Output[str]:
    """The health report a person reads: status, every rule's count, what needs a person (Markdown)."""
    from checks.report import render_markdown

    markdown = render_markdown(findings)
    return Output(markdown, metadata={
        "status": MetadataValue.text(findings.status),
        "report": MetadataValue.md(markdown),
        "rules": MetadataValue.json(findings.rules_json()),
    })
