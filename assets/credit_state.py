"""The per-user credit state, and beside it one asset check per audit rule.

Each check runs its rule's Great Expectations suite through ``checks.audit.evaluate_rules`` (the same
``Rule.evaluate`` that ``credits audit`` runs), on this partition's state and snapshot. A failing rule is
a failed check, severity ERROR for critical rules and WARN for warning rules. The checks are not
blocking: a critical finding is exactly when the findings, the fix plan and the report must still be
produced.

Checks on a partitioned asset: the check specs carry the daily partitions too (per-partition checks,
new in Dagster 1.13), so a check run for day D loads only D's state and its evaluation is recorded
against D. A plain (unpartitioned) check would load every materialized partition of the state as its
input and report one verdict for all days at once, which means nothing for an as-of audit.
"""

import warnings
from collections.abc import Iterator
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    MetadataValue,
    Output,
    asset,
    multi_asset_check,
)

from assets.partitions import daily_partitions
from assets.resources import CreditsDatabase
from assets.snapshots import SNAPSHOT_INS, snapshot_from_frames
from checks.rules import RULES
from checks.rules.base import RuleResult

GROUP = "audit"
SAMPLE_USERS = 10  # failing users listed in a check's metadata


def severity_of(rule_id: str) -> AssetCheckSeverity:
    """ERROR for the contract's critical rules, WARN for its warning rules."""
    return AssetCheckSeverity.ERROR if RULES[rule_id].severity == "critical" else AssetCheckSeverity.WARN


@asset(ins=SNAPSHOT_INS, partitions_def=daily_partitions, group_name=GROUP, compute_kind="pandas")
def credit_state(context: AssetExecutionContext, database: CreditsDatabase, bestauth_users: pd.DataFrame,
                 user_id_mapping: pd.DataFrame, subscriptions: pd.DataFrame, points_balances: pd.DataFrame,
                 ledger_by_user: pd.DataFrame, period_grants: pd.DataFrame,
                 failed_deductions: pd.DataFrame, lots_by_user: pd.DataFrame,
                 refunds: pd.DataFrame, plan_change_grants: pd.DataFrame) -> Output[pd.DataFrame]:
    """One row per BestAuth user (and per orphan points id): resolved id, tier, balance, ledger totals."""
    from checks.state import user_state

    snap = snapshot_from_frames(locals_frames(bestauth_users, user_id_mapping, subscriptions, points_balances,
                                              ledger_by_user, period_grants, failed_deductions, lots_by_user,
                                              refunds, plan_change_grants))
    state = user_state(snap, database.credits_config())
    users = state[~state["orphan"]]
    by_source = users["resolution_source"].value_counts()
    return Output(state, metadata={
        "dagster/row_count": MetadataValue.int(len(state)),
        "users": MetadataValue.int(int(len(users))),
        "orphan_points_ids": MetadataValue.int(int(state["orphan"].sum())),
        "paid_current": MetadataValue.int(int(users["paid_current"].sum())),
        "resolved_via_mapping": MetadataValue.int(int(by_source.get("mapping", 0))),
        "resolved_via_metadata": MetadataValue.int(int(by_source.get("metadata", 0))),
        "resolved_via_bestauth_id": MetadataValue.int(int(by_source.get("bestauth_id", 0))),
        "credits_in_balances": MetadataValue.int(int(state.loc[state["has_balance_row"], "balance"].sum())),
    })


def locals_frames(*frames: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The snapshot frames in SNAPSHOT_TABLES order, by name (the assets' parameters are that order)."""
    from checks.snapshot import SNAPSHOT_TABLES

    return dict(zip(SNAPSHOT_TABLES, frames, strict=True))


def _specs() -> list[AssetCheckSpec]:
    with warnings.catch_warnings():  # partitions_def on a check spec is a preview feature of 1.13
        warnings.simplefilter("ignore")
        return [AssetCheckSpec(name=rid, asset=credit_state, description=f"[{rule.severity}] {rule.description}",
                               additional_deps=[i.key for i in SNAPSHOT_INS.values()],
                               partitions_def=daily_partitions,
                               metadata={"severity": rule.severity, "family": rule.family,
                                         "fixable": rule.fixable, "ge_suite": rule.suite_name})
                for rid, rule in RULES.items()]


RULE_CHECK_SPECS = _specs()


def check_result(result: RuleResult) -> AssetCheckResult:
    """A rule's outcome as an asset check result: plain ints and bools only (no numpy) in metadata."""
    from checks.findings import plain
    from checks.report import compact

    rule = result.rule
    findings = result.findings
    fixable = sum(1 for f in findings if f.fix)
    rows = ["| BestAuth user | points id | found | fix |", "|---|---|---|---|"]
    for f in findings[:SAMPLE_USERS]:
        found = compact(f.found)
        rows.append(f"| {f.bestauth_user_id or '-'} | {f.user_id or '-'} | {found[:80]} | "
                    f"{f.fix or 'needs a person'} |")
    expectations = [{"expectation": e["expectation"], "kwargs": plain(e.get("kwargs")),
                     "unexpected_count": int(e["unexpected_count"]), "success": bool(e["success"])}
                    for e in result.gx.get("expectations", [])]
    metadata: dict[str, Any] = {
        "severity": MetadataValue.text(rule.severity),
        "checked_rows": MetadataValue.int(int(result.checked)),
        "findings": MetadataValue.int(len(findings)),
        "fixable": MetadataValue.int(int(fixable)),
        "ge_suite": MetadataValue.text(rule.suite_name),
        "ge_success": MetadataValue.bool(bool(result.gx.get("success", result.passed))),
        "expectations": MetadataValue.json(expectations),
        "seconds": MetadataValue.float(round(float(result.seconds), 3)),
    }
    if findings:
        metadata["sample_users"] = MetadataValue.md("\n".join(rows))
        metadata["sample_user_ids"] = MetadataValue.json(
            [f.bestauth_user_id or f.user_id for f in findings[:SAMPLE_USERS]])
    if result.errors:
        metadata["errors"] = MetadataValue.json(list(result.errors))
    if result.passed:
        description = f"{result.checked} rows validated, no finding"
    else:
        description = (f"{len(findings)} finding(s) ({rule.severity}), {fixable} with a planned fix, "
                       f"{len(findings) - fixable} for a person")
    return AssetCheckResult(asset_key=credit_state.key, check_name=rule.id, passed=bool(result.passed),
                            severity=severity_of(rule.id), metadata=metadata, description=description)


@multi_asset_check(specs=RULE_CHECK_SPECS, can_subset=True, compute_kind="great_expectations",
                   ins={"credit_state": AssetIn(key=credit_state.key), **SNAPSHOT_INS})
def credit_rules(context: AssetCheckExecutionContext, database: CreditsDatabase, credit_state: pd.DataFrame,
                 bestauth_users: pd.DataFrame, user_id_mapping: pd.DataFrame, subscriptions: pd.DataFrame,
                 points_balances: pd.DataFrame, ledger_by_user: pd.DataFrame, period_grants: pd.DataFrame,
                 failed_deductions: pd.DataFrame, lots_by_user: pd.DataFrame,
                 refunds: pd.DataFrame, plan_change_grants: pd.DataFrame) -> Iterator[AssetCheckResult]:
    """The contract's audit rules, each as its Great Expectations suite over the credit state."""
    from checks.audit import evaluate_rules

    selected = {key.name for key in context.selected_asset_check_keys}
    rules = [rid for rid in RULES if rid in selected]
    snap = snapshot_from_frames(locals_frames(bestauth_users, user_id_mapping, subscriptions, points_balances,
                                              ledger_by_user, period_grants, failed_deductions, lots_by_user,
                                              refunds, plan_change_grants))
    results, _ = evaluate_rules(snap, database.credits_config(), rules, state=credit_state)
    for rid in rules:
        res = results[rid]
        context.log.info("rule %s: %d checked, %d finding(s)", rid, res.checked, len(res.findings))
        yield check_result(res)
