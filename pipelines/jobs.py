"""The jobs: the daily audit (changes nothing), the apply-fixes job, the expiry sweep, a one-user diagnosis.

Same code paths as the CLI: the audit assets call ``checks.audit.run_audit`` (`credits audit`), the fix
asset ``checks.fixes.apply_fixes`` (`credits audit --live`), the diagnosis ``checks.diagnose.diagnose``
(`credits diagnose`).
"""

from typing import Any

from dagster import (
    AssetSelection,
    Config,
    Failure,
    MetadataValue,
    OpExecutionContext,
    Output,
    define_asset_job,
    job,
    op,
)
from pydantic import Field

from assets import AUDIT_ASSETS, CreditsDatabase, applied_fixes, daily_partitions, expired_credits

FIX_RUN_TAG = "credit-recon/fixes"  # limit it to 1 in the run queue's tag_concurrency_limits

daily_audit = define_asset_job(
    "daily_audit",
    selection=AssetSelection.assets(*AUDIT_ASSETS),
    partitions_def=daily_partitions,
    description="Snapshot every table as of the partition's day, run every rule's GE suite as asset checks, "
                "write the findings, the (dry) fix plan and the health report. Changes nothing.",
)

apply_fixes_job = define_asset_job(
    "apply_fixes",
    selection=AssetSelection.assets(*AUDIT_ASSETS, applied_fixes),
    partitions_def=daily_partitions,
    tags={FIX_RUN_TAG: "apply"},
    description="The daily audit, then the fixes it plans that the present still needs. Dry unless the run "
                "config says `ops: {applied_fixes: {config: {live: true}}}`; capped by max_fixes; recorded.",
)

expire_credits = define_asset_job(
    "expire_credits",
    selection=AssetSelection.assets(expired_credits),
    partitions_def=daily_partitions,
    description="The expiry sweep: write off every lot past its expiry (rolling over what the tier's policy "
                "keeps) as `expiry` rows, once per lot. Scheduled before the daily audit; safe to re-run.",
)


class DiagnoseConfig(Config):
    user: str = Field(description="The user's email, BestAuth id or points (Supabase) id.")


@op
def diagnose_user_op(context: OpExecutionContext, config: DiagnoseConfig,
                     database: CreditsDatabase) -> Output[dict[str, Any]]:
    """Every check for one user, with the fix to run (`credits diagnose`); a dry-run deduction is rolled back."""
    from checks.diagnose import diagnose
    from ledger.errors import InvalidArgument, UnknownUser

    try:
        dx = diagnose(database.resolve_url(), database.credits_config(), config.user)
    except (UnknownUser, InvalidArgument) as exc:
        raise Failure(description=str(exc)) from None
    lines = ["| check | result | detail | fix |", "|---|---|---|---|"]
    for c in dx.checks:
        lines.append(f"| {c.name} | {c.status.upper()} | {c.detail.replace('|', '/')} | "
                     f"{(c.fix or '').replace('|', '/')} |")
    failing = [c for c in dx.checks if c.status == "fail"]
    context.log.info("diagnosis of %s: %s (%d failing check(s))", config.user, dx.status, len(failing))
    return Output(dx.to_json(), metadata={
        "status": MetadataValue.text(dx.status),
        "failing_checks": MetadataValue.int(len(failing)),
        "user": MetadataValue.json(dx.to_json()["user"]),
        "checks": MetadataValue.md("\n".join(lines)),
    })


@job(description="Diagnose one user: every rule on that user's rows, the fix to run, a rolled-back deduction. "
                 "Config: `ops: {diagnose_user_op: {config: {user: <email or id>}}}`.")
def diagnose_user() -> None:
    diagnose_user_op()
