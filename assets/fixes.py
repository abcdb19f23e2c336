"""Applying the fix plan: dry by default, live only when the run's config says so.

A day's run applies the fixes that the day's audit planned (its ``fix_plan``) *and* that an audit of the
present still plans, taking the present's version of each (same idempotency key). Why both:

- the present, because every fix acts on the database as it is now; a plan read from a past day's
  snapshot may describe something a later run or a webhook has already repaired;
- the day, so that a backfill over days D1..Dn applies what was wrong on those days, and re-running a
  day applies nothing new.

Grants carry the period key ``subscription_grant:<subscription>:<period start>`` and every other fix its
own key; ``checks.fixes.apply_fixes`` re-checks each fix's facts inside its transaction. Live runs also
take one advisory lock per database, so the runs of a backfill apply one after another and each plans on
what the previous one left. Together: backfills and daily runs can overlap without granting twice.
"""

from typing import Any

from dagster import (
    AssetExecutionContext,
    Config,
    DagsterError,
    Failure,
    MetadataValue,
    Output,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)
from pydantic import Field

from assets.audit import TABLE_ROWS, fix_plan
from assets.partitions import daily_partitions
from assets.resources import CreditsDatabase
from checks.fixes import FixRun, PlannedFix

GROUP = "fixes"
FIX_LOCK = 7_262_011_004  # pg advisory lock: one live fix run at a time per database
LOCK_WAIT = "15min"


class ApplyFixesConfig(Config):
    """Run options of the apply-fixes job (the same switches as `credits audit --live --rule --max-fixes`)."""

    live: bool = Field(default=False, description="Apply the fixes. False (default): a dry run, nothing changes.")
    rules: list[str] | None = Field(default=None, description="Only these rule ids (default: every fixable rule).")
    max_fixes: int | None = Field(default=None, ge=0, description="Refuse a live run planning more fixes than this "
                                                                  "(default: audit.max_fixes in credits.toml).")


def applied_table(run: FixRun) -> MetadataValue:
    schema = TableSchema(columns=[TableColumn(n) for n in
                                  ("action", "rule", "bestauth_user_id", "user_id", "result")])
    rows = []
    for f in run.fixes[:TABLE_ROWS]:
        result = "applied" if f.applied else (f"not applied: {f.error}" if f.error else (f.note or "skipped"))
        rows.append(TableRecord({"action": f.planned.action, "rule": f.planned.rule,
                                 "bestauth_user_id": f.planned.bestauth_user_id or "",
                                 "user_id": f.planned.user_id or "", "result": result[:160]}))
    return MetadataValue.table(schema=schema, records=rows)


def _lock(url: str) -> Any:
    """Hold the fix lock on a connection of its own until it is closed."""
    from ledger import db

    conn = db.connect(url, autocommit=True)
    try:
        conn.execute("SELECT set_config('lock_timeout', %s, false)", (LOCK_WAIT,))
        conn.execute("SELECT pg_advisory_lock(%s)", (FIX_LOCK,))
    except Exception:
        conn.close()
        raise
    return conn


def _actor(context: AssetExecutionContext) -> str:
    """Who applied the fixes, for audit_runs.actor: the job and run (or a direct call, as in tests)."""
    try:
        return f"dagster:{context.run.job_name}:{context.run.run_id}"
    except DagsterError:  # DagsterInvalidPropertyError: no run when the asset is invoked directly
        return "dagster:direct-invocation"


@asset(partitions_def=daily_partitions, group_name=GROUP, compute_kind="postgres")
def applied_fixes(context: AssetExecutionContext, config: ApplyFixesConfig, database: CreditsDatabase,
                  fix_plan: list[PlannedFix]) -> Output[dict[str, Any]]:
    """The fixes applied (or, dry, that would be applied) for this day, recorded in audit_runs / audit_fix_log."""
    from checks.audit import run_audit, select_rules
    from checks.fixes import FixCapExceeded, apply_fixes
    from checks.report import render_markdown
    from ledger.errors import InvalidArgument

    try:
        rules = select_rules(config.rules) if config.rules is not None else None
    except InvalidArgument as exc:
        raise Failure(description=str(exc)) from None
    settings = database.credits_config()
    cap = settings.audit.max_fixes if config.max_fixes is None else config.max_fixes
    url = database.resolve_url()
    day_keys = {p.idempotency_key for p in fix_plan if rules is None or p.rule in rules}
    actor = _actor(context)

    lock = _lock(url) if config.live else None
    try:
        now = run_audit(url, settings, rules=rules)
        plan = [p for p in now.plan if p.idempotency_key in day_keys]
        done_since = len(day_keys - {p.idempotency_key for p in now.plan})
        later = len(now.plan) - len(plan)
        context.log.info("day plan %d fix(es): %d still needed now, %d already done or no longer needed; "
                         "%d planned now but not by this day's audit", len(day_keys), len(plan), done_since, later)
        try:
            run = apply_fixes(url, settings, plan, live=config.live, max_fixes=cap, actor=actor,
                              audit={"rules": list(now.results), "snapshot_at": now.snapshot_at,
                                     "status": now.status, "counts": now.counts()})
        except FixCapExceeded as exc:
            raise Failure(description=str(exc), metadata={"planned_fixes": MetadataValue.int(exc.planned),
                                                          "max_fixes": MetadataValue.int(exc.cap)}) from None
        after = run_audit(url, settings, rules=rules) if config.live and run.applied else None
    finally:
        if lock is not None:
            lock.close()  # ends the session: the advisory lock goes with it

    now.plan, now.fixes, now.live, now.run_id, now.after = plan, run.fixes, config.live, run.run_id, after
    by_action: dict[str, int] = {}
    for f in run.fixes:
        if f.applied:
            by_action[f.planned.action] = by_action.get(f.planned.action, 0) + 1
    for f in run.fixes:
        if f.error:
            context.log.warning("%s for user %s not applied: %s", f.planned.action,
                                f.planned.bestauth_user_id or f.planned.user_id, f.error)
    value = {"live": config.live, "fix_run_id": run.run_id, "status_before": now.status,
             "status_after": after.status if after is not None else None,
             "fixes": [f.to_json() for f in run.fixes]}
    return Output(value, metadata={
        "live": MetadataValue.bool(bool(config.live)),
        "fix_run_id": MetadataValue.text(run.run_id or "dry run"),
        "planned_fixes": MetadataValue.int(len(plan)),
        "applied": MetadataValue.int(int(run.applied)),
        "already_done": MetadataValue.int(int(run.skipped) if config.live else 0),
        "not_applied": MetadataValue.int(int(run.failed)),
        "day_plan_done_since": MetadataValue.int(done_since),
        "planned_now_not_this_day": MetadataValue.int(later),
        "status_before": MetadataValue.text(now.status),
        "status_after": MetadataValue.text(after.status if after is not None else now.status),
        **{f"applied_{a}": MetadataValue.int(n) for a, n in sorted(by_action.items())},
        "fixes": applied_table(run),
        "report": MetadataValue.md(render_markdown(now)),
    })


__all__ = ["ApplyFixesConfig", "applied_fixes", "fix_plan"]
