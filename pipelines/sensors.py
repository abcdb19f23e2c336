"""Alerting: a run that found CRITICAL posts one Slack-compatible message to a webhook.

Dagster has no built-in sensor for failed asset checks, so this one reads the instance: the runs of
the audit jobs that finished since its cursor (run-status events, each written once per run), and each
run's asset check evaluations. A run with a failed ERROR-severity check (a critical rule) is CRITICAL.

At most once per run: the cursor (the last run-status event's storage id) moves past a run whether or
not the post succeeded; a failed post is logged, never retried into a second message. Without
$CREDITS_ALERT_WEBHOOK_URL nothing is posted and nothing fails.
"""

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetCheckSeverity,
    DagsterEventType,
    DagsterInstance,
    DefaultSensorStatus,
    RunStatusChangeRecordsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

log = logging.getLogger(__name__)

WEBHOOK_ENV = "CREDITS_ALERT_WEBHOOK_URL"
UI_URL_ENV = "CREDITS_DAGSTER_UI_URL"  # optional: link the message to the run in the UI
WATCHED_JOBS = ("daily_audit", "apply_fixes")
FIRST_LOOKBACK_SECONDS = 24 * 3600  # a sensor started for the first time looks back one day, not forever
BATCH = 100
POST_TIMEOUT = 10


@dataclass
class CriticalRun:
    run_id: str
    job_name: str
    partition: str | None
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)  # check name -> {asset, findings, sample}
    warnings: list[str] = field(default_factory=list)  # failed WARN checks, named in the message too


def critical_evaluations(instance: DagsterInstance, run_id: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The run's failed ERROR checks (with counts and sample users) and the names of its failed WARN checks."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION).records
    critical: dict[str, dict[str, Any]] = {}
    warn: list[str] = []
    for rec in records:
        ev = rec.event_log_entry.dagster_event.event_specific_data  # AssetCheckEvaluation
        if ev.passed:
            continue
        if ev.severity == AssetCheckSeverity.ERROR:
            meta = ev.metadata or {}
            count = meta.get("findings")
            sample = meta.get("sample_user_ids")
            critical[ev.check_name] = {"asset": ev.asset_key.to_user_string(),
                                       "findings": getattr(count, "value", None),
                                       "sample": list(getattr(sample, "value", None) or [])[:5]}
        else:
            warn.append(ev.check_name)
    return critical, sorted(set(warn))


def slack_message(run: CriticalRun, ui_url: str | None = None) -> dict[str, Any]:
    """Slack's incoming-webhook body: ``text`` (all a compatible receiver needs) plus mrkdwn blocks."""
    where = f"{run.job_name}" + (f", partition {run.partition}" if run.partition else "")
    rules = ", ".join(f"{name} ({v['findings']})" if v["findings"] is not None else name
                      for name, v in sorted(run.failed.items()))
    text = f"credit-recon CRITICAL: {rules} in run {run.run_id[:8]} ({where})"
    lines = [f"*credit-recon: CRITICAL* in `{where}` run `{run.run_id[:8]}`"]
    for name, v in sorted(run.failed.items()):
        sample = ", ".join(f"`{u}`" for u in v["sample"])
        lines.append(f"• *{name}*: {v['findings'] if v['findings'] is not None else '?'} finding(s)"
                     + (f", e.g. {sample}" if sample else ""))
    if run.warnings:
        lines.append("Warnings too: " + ", ".join(run.warnings))
    if ui_url:
        link = f"{ui_url.rstrip('/')}/runs/{run.run_id}"
        lines.append(f"<{link}|Open the run in Dagster>")
        text += f" {link}"
    return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}}]}


def post_json(url: str, payload: dict[str, Any], timeout: float = POST_TIMEOUT) -> int:
    """POST a JSON body; the HTTP status, or an exception for a network error or a non-2xx answer."""
    data = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "credit-recon"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - URL from the operator
        return int(response.status)


def _finished_runs(instance: DagsterInstance, after: int | None, since: float | None) -> tuple[list[Any], int | None]:
    """Run-status records (success and failure) of the watched jobs after the cursor, in storage order,
    and the cursor to store: never past a record not yet seen when a batch came back full."""
    found: list[Any] = []
    bounds: list[int] = []
    for event_type in (DagsterEventType.RUN_SUCCESS, DagsterEventType.RUN_FAILURE):
        # no job_names filter in the query: not every event storage supports it (the in-memory one does not)
        flt = RunStatusChangeRecordsFilter(event_type=event_type, after_storage_id=after,
                                           after_timestamp=since if after is None else None)
        records = instance.fetch_run_status_changes(flt, limit=BATCH, ascending=True).records
        found.extend(records)
        if len(records) == BATCH:
            bounds.append(records[-1].storage_id)
    found.sort(key=lambda r: r.storage_id)
    if bounds:
        found = [r for r in found if r.storage_id <= min(bounds)]
    cursor = found[-1].storage_id if found else after
    return [r for r in found if r.event_log_entry.job_name in WATCHED_JOBS], cursor


@sensor(name="critical_findings_alert", minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Posts one Slack-compatible message per audit run that failed a critical rule's check "
                    f"(${WEBHOOK_ENV}; unset: nothing is posted).")
def critical_findings_alert(context: SensorEvaluationContext) -> SensorResult:
    state = json.loads(context.cursor) if context.cursor else {}
    after = state.get("after")
    since = None if after is not None else time.time() - FIRST_LOOKBACK_SECONDS
    records, cursor = _finished_runs(context.instance, after, since)
    url = os.environ.get(WEBHOOK_ENV, "").strip()
    ui_url = os.environ.get(UI_URL_ENV, "").strip() or None
    posted, critical_runs, failed_posts = 0, 0, 0
    for rec in records:
        run_id = rec.event_log_entry.run_id
        failed, warn = critical_evaluations(context.instance, run_id)
        if not failed:
            continue
        critical_runs += 1
        run = context.instance.get_run_by_id(run_id)
        partition = run.tags.get("dagster/partition") if run else None
        job_name = run.job_name if run else rec.event_log_entry.job_name or "?"
        message = slack_message(CriticalRun(run_id, job_name, partition, failed, warn), ui_url)
        if not url:
            context.log.info("run %s found CRITICAL (%s); %s is not set, nothing posted", run_id,
                             ", ".join(failed), WEBHOOK_ENV)
            continue
        try:
            post_json(url, message)
            posted += 1
            context.log.info("posted the CRITICAL alert of run %s", run_id)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failed_posts += 1  # at most once: the cursor moves on anyway
            context.log.warning("could not post the alert of run %s: %s", run_id, exc)
    new_cursor = json.dumps({"after": cursor}) if cursor is not None else context.cursor
    if posted:
        return SensorResult(cursor=new_cursor)
    reason = (f"{len(records)} finished run(s), {critical_runs} CRITICAL"
              + ("" if not critical_runs else f"; {WEBHOOK_ENV} not set" if not url else
                 f"; {failed_posts} post(s) failed"))
    return SensorResult(cursor=new_cursor, skip_reason=SkipReason(reason))
