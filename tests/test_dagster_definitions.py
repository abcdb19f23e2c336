"""The Dagster code location loads, and its pieces are wired as documented: every rule a check with the
right severity, daily partitions meaning "the books as of the end of the day", the schedule's hour."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from dagster import AssetCheckSeverity, AssetKey, Definitions, build_schedule_context

from assets.credit_state import RULE_CHECK_SPECS, credit_state, severity_of
from assets.partitions import as_of_for, daily_partitions, day_end, partition_key_for
from checks.rules import RULES
from checks.snapshot import SNAPSHOT_TABLES
from pipelines.definitions import defs
from pipelines.schedules import audit_hour, daily_audit_schedule

ROOT = Path(__file__).resolve().parent.parent


def test_definitions_load_with_every_piece() -> None:
    Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    assert {"daily_audit", "apply_fixes", "diagnose_user", "expire_credits"} <= set(repo.job_names)
    assert sorted(s.name for s in repo.schedule_defs) == ["daily_audit_schedule", "expire_credits_schedule"]
    assert [s.name for s in repo.sensor_defs] == ["critical_findings_alert"]
    keys = set(defs.resolve_asset_graph().get_all_asset_keys())
    expected = {AssetKey(["snapshot", t]) for t in SNAPSHOT_TABLES} | {
        AssetKey([k]) for k in ("credit_state", "findings", "fix_plan", "health_report", "applied_fixes",
                                "expired_credits")}
    assert keys == expected
    graph = defs.resolve_asset_graph()
    for key in keys:  # every asset is partitioned by day
        assert graph.get(key).partitions_def == daily_partitions, key

    # the daily audit changes nothing: it does not select the fix asset; the fix job does
    audit_keys = defs.resolve_job_def("daily_audit").asset_layer.selected_asset_keys
    assert AssetKey(["applied_fixes"]) not in audit_keys and AssetKey(["findings"]) in audit_keys
    assert AssetKey(["applied_fixes"]) in defs.resolve_job_def("apply_fixes").asset_layer.selected_asset_keys
    # nor the expiry sweep (it writes `expiry` rows), which is a job of its own
    assert AssetKey(["expired_credits"]) not in audit_keys
    assert defs.resolve_job_def("expire_credits").asset_layer.selected_asset_keys == {AssetKey(["expired_credits"])}


def test_one_check_per_rule_with_its_severity_and_partitions() -> None:
    assert [s.name for s in RULE_CHECK_SPECS] == list(RULES)
    for spec in RULE_CHECK_SPECS:
        rule = RULES[spec.name]
        assert spec.asset_key == credit_state.key
        assert spec.partitions_def == daily_partitions  # per-partition evaluations
        assert not spec.blocking  # the findings and the report must still be written
        assert spec.metadata["severity"] == rule.severity
        want = AssetCheckSeverity.ERROR if rule.severity == "critical" else AssetCheckSeverity.WARN
        assert severity_of(spec.name) == want
    assert {r for r in RULES if severity_of(r) == AssetCheckSeverity.ERROR} == {
        "paid_users_funded", "ledger_integrity", "duplicate_grants", "lots_consistent", "refunds_bounded"}


def test_partition_means_the_end_of_its_day() -> None:
    now = datetime(2026, 3, 5, 14, 30, tzinfo=timezone.utc)
    assert day_end("2026-03-04") == datetime(2026, 3, 4, 23, 59, 59, 999999, tzinfo=timezone.utc)
    assert as_of_for("2026-03-04", now) == day_end("2026-03-04")  # a day that is over: its end
    assert as_of_for("2026-03-05", now) is None  # today: the present (cache compared too)
    assert as_of_for(None, now) is None
    assert partition_key_for(datetime(2026, 3, 4, 23, 59, tzinfo=timezone.utc)) == "2026-03-04"
    # today's partition exists (end_offset=1), so the schedule can run it
    today = partition_key_for(datetime.now(timezone.utc))
    assert daily_partitions.get_last_partition_key() == today


def test_schedule_runs_the_day_it_ticks_in(monkeypatch: pytest.MonkeyPatch) -> None:
    tick = datetime(2026, 3, 5, 6, 0, tzinfo=timezone.utc)
    request = daily_audit_schedule(build_schedule_context(scheduled_execution_time=tick))
    assert request.partition_key == "2026-03-05" and request.run_key == "2026-03-05"
    assert daily_audit_schedule.cron_schedule == f"0 {audit_hour()} * * *"
    assert daily_audit_schedule.execution_timezone == os.environ.get("CREDITS_AUDIT_TIMEZONE", "UTC")
    monkeypatch.setenv("CREDITS_AUDIT_HOUR", "17")
    assert audit_hour() == 17
    for bad in ("24", "-1", "six"):
        monkeypatch.setenv("CREDITS_AUDIT_HOUR", bad)
        with pytest.raises(ValueError, match="CREDITS_AUDIT_HOUR"):
            audit_hour()


def test_expiry_sweep_is_scheduled_before_the_audit(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.schedules import expire_credits_schedule, expiry_hour

    assert expire_credits_schedule.cron_schedule == f"0 {expiry_hour()} * * *"
    assert expire_credits_schedule.execution_timezone == daily_audit_schedule.execution_timezone
    monkeypatch.delenv("CREDITS_EXPIRY_HOUR", raising=False)
    monkeypatch.setenv("CREDITS_AUDIT_HOUR", "6")
    assert expiry_hour() == 5
    monkeypatch.setenv("CREDITS_AUDIT_HOUR", "0")
    assert expiry_hour() == 23  # the evening before
    monkeypatch.setenv("CREDITS_EXPIRY_HOUR", "3")
    assert expiry_hour() == 3
    monkeypatch.setenv("CREDITS_EXPIRY_HOUR", "25")
    with pytest.raises(ValueError, match="CREDITS_EXPIRY_HOUR"):
        expiry_hour()
    request = expire_credits_schedule(build_schedule_context(
        scheduled_execution_time=datetime(2026, 3, 5, 5, 0, tzinfo=timezone.utc)))
    assert request.partition_key == "2026-03-05" and request.run_key == "2026-03-05"


def test_schedule_hour_comes_from_the_environment() -> None:
    """A fresh process with CREDITS_AUDIT_HOUR=17 loads a 17:00 schedule."""
    code = ("from pipelines.definitions import defs; "
            "print(defs.resolve_schedule_def('daily_audit_schedule').cron_schedule)")
    env = {**os.environ, "CREDITS_AUDIT_HOUR": "17", "GX_ANALYTICS_ENABLED": "false"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0 17 * * *"


def test_dagster_cli_validates_the_workspace(tmp_path: Path) -> None:
    dagster = Path(sys.executable).with_name("dagster")
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "GX_ANALYTICS_ENABLED": "false"}
    out = subprocess.run([str(dagster), "definitions", "validate", "-w", "workspace.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pipelines.definitions" in out.stdout + out.stderr


def test_yesterday_is_a_past_day() -> None:
    yesterday = partition_key_for(datetime.now(timezone.utc) - timedelta(days=1))
    assert as_of_for(yesterday) == day_end(yesterday)
