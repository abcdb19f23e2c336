"""The one Definitions object: resources, assets, asset checks, jobs, schedule, sensor.

Loaded by ``dagster dev -w workspace.yaml`` (and `dagster definitions validate -w workspace.yaml`).
With no settings at all it audits the embedded PostgreSQL that the `credits` commands use;
$DATABASE_URL points it elsewhere. Dagster's own storage is $DAGSTER_HOME's (see the README).
"""

from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # before anything can import great_expectations

from dagster import Definitions  # noqa: E402

from assets import ALL_ASSETS, ASSET_CHECKS, CreditsDatabase  # noqa: E402
from pipelines.jobs import apply_fixes_job, daily_audit, diagnose_user, expire_credits  # noqa: E402
from pipelines.schedules import daily_audit_schedule, expire_credits_schedule  # noqa: E402
from pipelines.sensors import critical_findings_alert  # noqa: E402

defs = Definitions(
    assets=ALL_ASSETS,
    asset_checks=ASSET_CHECKS,
    jobs=[daily_audit, apply_fixes_job, diagnose_user, expire_credits],
    schedules=[daily_audit_schedule, expire_credits_schedule],
    sensors=[critical_findings_alert],
    resources={"database": CreditsDatabase()},
)
