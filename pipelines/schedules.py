"""The daily schedules: the expiry sweep, then the audit an hour later, each for the day it ticks in."""

import os

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, schedule

from assets.partitions import partition_key_for
from pipelines.jobs import daily_audit, expire_credits


def audit_hour() -> int:
    """$CREDITS_AUDIT_HOUR (0-23) in $CREDITS_AUDIT_TIMEZONE; default 06:00 UTC."""
    raw = os.environ.get("CREDITS_AUDIT_HOUR", "6").strip()
    if not raw.isdigit() or not 0 <= int(raw) <= 23:
        raise ValueError(f"CREDITS_AUDIT_HOUR must be an hour from 0 to 23, got {raw!r}")
    return int(raw)


AUDIT_TIMEZONE = os.environ.get("CREDITS_AUDIT_TIMEZONE", "UTC")


@schedule(job=daily_audit, cron_schedule=f"0 {audit_hour()} * * *", execution_timezone=AUDIT_TIMEZONE,
          default_status=DefaultScheduleStatus.RUNNING,
          description="The daily audit of the UTC day the tick falls in (partitions are UTC days).")
def daily_audit_schedule(context: ScheduleEvaluationContext) -> RunRequest:
    # today's partition: its day has not ended, so the audit reads the present (cache compared too)
    key = partition_key_for(context.scheduled_execution_time)
    return RunRequest(run_key=key, partition_key=key, tags={"credit-recon/trigger": "schedule"})


def expiry_hour() -> int:
    """$CREDITS_EXPIRY_HOUR (0-23); default one hour before the audit, so the audit reads the day's expiry."""
    raw = os.environ.get("CREDITS_EXPIRY_HOUR", str((audit_hour() - 1) % 24)).strip()
    if not raw.isdigit() or not 0 <= int(raw) <= 23:
        raise ValueError(f"CREDITS_EXPIRY_HOUR must be an hour from 0 to 23, got {raw!r}")
    return int(raw)


@schedule(job=expire_credits, cron_schedule=f"0 {expiry_hour()} * * *", execution_timezone=AUDIT_TIMEZONE,
          default_status=DefaultScheduleStatus.RUNNING,
          description="The expiry sweep, before the daily audit (default: an hour before it).")
def expire_credits_schedule(context: ScheduleEvaluationContext) -> RunRequest:
    key = partition_key_for(context.scheduled_execution_time)
    return RunRequest(run_key=key, partition_key=key, tags={"credit-recon/trigger": "schedule"})
