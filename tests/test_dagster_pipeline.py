"""The pipeline's jobs in process on real databases: the daily audit marks exactly the faulted rules with
their severities and changes nothing; the fix job dry vs live; partitions, a two-day backfill, no double
grants; two live fix runs at once; the diagnose job."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from dagster import AssetCheckKey, AssetCheckSeverity, AssetKey, DagsterInstance, build_asset_context

from assets import ApplyFixesConfig, CreditsDatabase, applied_fixes
from assets.fixes import FIX_LOCK
from assets.credit_state import credit_state
from assets.partitions import day_end
from checks.audit import run_audit
from checks.rules import RULES
from checks.seed import seed
from ledger.config import CreditsConfig
from tests.audit_cases import paid_user, table_dump
from tests.dagster_helpers import instance  # noqa: F401 (fixture)
from tests.dagster_helpers import checks_by_rule, live_config, metadata, output, run_job, today, yesterday
from tests.factories import make_user

SEVERITY = {"critical": AssetCheckSeverity.ERROR, "warning": AssetCheckSeverity.WARN}
FIXABLE_ONLY = ("mapping_present", "metadata_resolved", "paid_users_funded", "expiry_applied",
                "plan_change_grants")  # every seeded fault has a fix




def _grant_rows(conn: psycopg.Connection) -> dict[str, int]:
    """subscription period -> grants of it in the ledger, net of the audit's reversals."""
    rows = conn.execute(
        """SELECT coalesce(CASE WHEN idempotency_key LIKE 'subscription_grant:%%' THEN idempotency_key END,
                           'subscription_grant:' || (metadata ->> 'subscription_id') || ':'
                           || left(metadata ->> 'period_start', 10)) AS period,
                  count(*) FILTER (WHERE transaction_type = 'subscription_grant')
                  - count(*) FILTER (WHERE transaction_type = 'reconciliation_fix') AS net
             FROM public.points_transactions
            WHERE transaction_type = 'subscription_grant'
               OR (transaction_type = 'reconciliation_fix' AND metadata ? 'reverses_transaction_id')
            GROUP BY 1""").fetchall()
    return {period: int(net) for period, net in rows}


def assert_no_second_grant(before: dict[str, int], after: dict[str, int]) -> None:
    """No fix granted a period that already had its grant; an ungranted period got at most one.
    (A seeded duplicate that was already spent stays: it needs a person, so its count may stay at 2.)"""
    for period, net in after.items():
        had = before.get(period, 0)
        assert net <= (had if had >= 1 else 1), (period, had, net)
    assert any(before.get(p, 0) == 0 and n == 1 for p, n in after.items())  # the fixes did grant something


def test_daily_audit_fails_exactly_the_faulted_rules(db_url: str, conn: psycopg.Connection,
                                                    instance: DagsterInstance) -> None:
    healthy = run_job("daily_audit", db_url, instance, partition=today())
    assert healthy.success
    assert all(ev.passed for ev in checks_by_rule(healthy).values())
    assert metadata(healthy, "findings")["status"] == "HEALTHY"

    unfunded = paid_user(conn, grant=False)  # paid_users_funded [critical]
    unmapped, _ = make_user(conn, mapped_to=None)  # mapping_present [warning]
    before = table_dump(conn)
    result = run_job("daily_audit", db_url, instance, partition=today())
    assert result.success  # failed checks do not fail the run: the report is still written
    evals = checks_by_rule(result)
    assert set(evals) == set(RULES)
    failed = {rid for rid, ev in evals.items() if not ev.passed}
    assert failed == {"paid_users_funded", "mapping_present"}
    for rid, ev in evals.items():
        assert ev.severity == SEVERITY[RULES[rid].severity], rid
        assert ev.partition == today()
    funded = evals["paid_users_funded"].metadata
    assert funded["findings"].value == 1 and funded["fixable"].value == 1
    assert funded["sample_user_ids"].value == [str(unfunded["bid"])]
    assert evals["mapping_present"].metadata["sample_user_ids"].value == [str(unmapped)]
    assert type(funded["checked_rows"].value) is int and type(funded["ge_success"].value) is bool

    found = metadata(result, "findings")
    assert found["status"] == "CRITICAL" and found["status_code"] == 2
    assert {rid: found[rid] for rid in RULES} == {rid: int(rid in failed) for rid in RULES}
    rows = found["findings"].records
    assert [r.data["rule"] for r in rows] == ["paid_users_funded", "mapping_present"]  # critical first
    assert rows[0].data["bestauth_user_id"] == str(unfunded["bid"])
    assert metadata(result, "fix_plan")["planned_fixes"] == 2
    report = metadata(result, "health_report")["report"]
    assert report.startswith("# Credit health: CRITICAL") and "`paid_users_funded` | critical | 1" in report
    assert table_dump(conn) == before  # the daily audit changed nothing


def test_daily_audit_on_seeded_data_matches_the_manifest(db_url: str, config: CreditsConfig,
                                                         instance: DagsterInstance) -> None:
    manifest = seed(db_url, config, users=300, fault_rate=0.05, seed=5)
    result = run_job("daily_audit", db_url, instance, partition=today())
    evals = checks_by_rule(result)
    seeded_rules = {rule for rule, ids in manifest.faults.items() if ids}
    assert {rid for rid, ev in evals.items() if not ev.passed} == seeded_rules == set(RULES)
    report = output(result, "findings")
    for rid, ev in evals.items():
        assert ev.severity == SEVERITY[RULES[rid].severity]
        assert ev.metadata["findings"].value == len(report.results[rid].findings)
        # a check's failing users are planted faults (of any rule: one fault can break two rules)
        assert set(ev.metadata["sample_user_ids"].value) <= manifest.faulted, rid
        # and every user planted for this rule is among the rule's findings
        assert set(manifest.faults[rid]) <= {f.bestauth_user_id for f in report.results[rid].findings}, rid


def test_fix_job_dry_capped_then_a_two_day_backfill(db_url: str, conn: psycopg.Connection, config: CreditsConfig,
                                                    instance: DagsterInstance) -> None:
    """Dry run and cap change nothing; a live backfill over yesterday and today applies the whole plan once,
    no period granted twice; re-running those days (as the daily runs do) applies nothing more."""
    seed(db_url, config, users=300, fault_rate=0.05, seed=3)
    grants_before = _grant_rows(conn)
    day1, day2 = yesterday(), today()
    before = table_dump(conn)

    dry = run_job("apply_fixes", db_url, instance, partition=day2)
    assert metadata(dry, ["snapshot", "ledger_by_user"])["ledger_as_of"] == "now (day not over)"
    assert {ev.partition for ev in checks_by_rule(dry).values()} == {day2}
    planned_now = {p.idempotency_key for p in output(dry, "fix_plan")}
    dry_meta = metadata(dry, "applied_fixes")
    assert dry_meta["live"] is False and dry_meta["applied"] == 0
    assert dry_meta["planned_fixes"] == len(planned_now) > 0 and dry_meta["fix_run_id"] == "dry run"
    assert {f["action"] for f in output(dry, "applied_fixes")["fixes"]} == {
        "create_mapping", "write_resolved_metadata", "grant_period", "reverse_duplicate_grant", "rebuild_balance",
        "grant_plan_change", "expire_lots"}
    assert table_dump(conn) == before  # dry: nothing written, not even a run record

    # over the cap: refused before anything is written (only the fix step, on the dry run's stored plan)
    capped = run_job("apply_fixes", db_url, instance, partition=day2, run_config=live_config(max_fixes=1),
                     asset_selection=[AssetKey(["applied_fixes"])], raise_on_error=False)
    assert not capped.success
    failure = [e for e in capped.all_events if e.is_step_failure][0]
    assert "more than the cap of 1" in str(failure.step_failure_data.error.message)
    assert table_dump(conn) == before

    # the backfill: one live run per day, oldest first
    first = run_job("apply_fixes", db_url, instance, partition=day1, run_config=live_config())
    snap = metadata(first, ["snapshot", "ledger_by_user"])
    assert snap["ledger_as_of"] == day_end(day1).isoformat()  # yesterday's books: as of its end
    assert snap["dagster/row_count"] == 0  # the seeded ledger was written today
    assert {ev.partition for ev in checks_by_rule(first).values()} == {day1}
    m1 = metadata(first, "applied_fixes")
    # a past day applies only what its own audit planned and the present still needs
    assert 0 < m1["applied"] < len(planned_now) and m1["planned_now_not_this_day"] > 0

    # today: the fix step on today's stored (dry-run) plan, which the present now needs only in part
    second = run_job("apply_fixes", db_url, instance, partition=day2, run_config=live_config(),
                     asset_selection=[AssetKey(["applied_fixes"])])
    m2 = metadata(second, "applied_fixes")
    assert m2["day_plan_done_since"] == m1["applied"]
    assert m1["applied"] + m2["applied"] == len(planned_now) and m2["not_applied"] == 0
    assert m2["status_before"] == "CRITICAL" and m2["status_after"] == "CRITICAL"  # people are still needed

    log = conn.execute("SELECT run_id::text, idempotency_key FROM public.audit_fix_log").fetchall()
    assert sorted(k for _, k in log) == sorted(planned_now)  # the whole plan, each fix exactly once
    assert {r for r, _ in log} == {m1["fix_run_id"], m2["fix_run_id"]}
    assert_no_second_grant(grants_before, _grant_rows(conn))

    # re-running the backfill's days applies nothing more: yesterday's stored plan (the fix step alone) and
    # today's whole job again (what the daily run does)
    rerun1 = run_job("apply_fixes", db_url, instance, partition=day1, run_config=live_config(),
                     asset_selection=[AssetKey(["applied_fixes"])])
    rerun2 = run_job("apply_fixes", db_url, instance, partition=day2, run_config=live_config())
    assert metadata(rerun1, "applied_fixes")["applied"] == metadata(rerun2, "applied_fixes")["applied"] == 0
    assert conn.execute("SELECT count(*) FROM public.audit_fix_log").fetchone()[0] == len(planned_now)
    assert_no_second_grant(grants_before, _grant_rows(conn))

    # today's audit (in the re-run): every rule whose findings all had a fix is healthy; the rest need a person
    evals = checks_by_rule(rerun2)
    for rid in FIXABLE_ONLY:
        assert evals[rid].passed, rid
    left = output(rerun2, "findings").findings
    assert left and all(f.fix is None for f in left)

    # each partition keeps its own evaluations: yesterday's still records what was wrong at its end
    key = AssetCheckKey(credit_state.key, "paid_users_funded")
    latest: dict[str, bool] = {}
    for rec in instance.event_log_storage.get_asset_check_execution_history(key, limit=20):  # newest first
        ev = rec.event.dagster_event.event_specific_data
        latest.setdefault(ev.partition, ev.passed)
    assert latest == {day2: True, day1: False}


def test_live_fix_runs_take_turns_and_apply_each_fix_once(db_url: str, conn: psycopg.Connection,
                                                          config: CreditsConfig) -> None:
    """Live fix runs queue on one database lock (a dry run does not): two started together while the lock
    is held both wait; once it is free, one applies the plan and the other finds it done."""
    seed(db_url, config, users=120, fault_rate=0.05, seed=4)
    plan = run_audit(db_url, config).plan
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def fix_run(name: str, day: str, live: bool) -> None:
        try:
            results[name] = applied_fixes(build_asset_context(partition_key=day), config=ApplyFixesConfig(live=live),
                                          database=CreditsDatabase(url=db_url), fix_plan=plan)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def waiting() -> int:
        return conn.execute("""SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                            """).fetchone()[0]

    with psycopg.connect(db_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (FIX_LOCK,))  # e.g. another live run in progress
        live = [threading.Thread(target=fix_run, args=(f"live-{day}", day, True)) for day in (yesterday(), today())]
        for t in live:
            t.start()
        deadline = time.monotonic() + 60
        while waiting() < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert waiting() == 2  # both live runs wait for the lock
        dry = threading.Thread(target=fix_run, args=("dry", today(), False))
        dry.start()
        dry.join(timeout=60)
        assert "dry" in results and all(t.is_alive() for t in live)  # a dry run does not queue
        assert conn.execute("SELECT count(*) FROM public.audit_fix_log").fetchone()[0] == 0
    for t in live:  # the holder's session ended: the lock is free
        t.join(timeout=120)
    assert not errors, errors
    meta = [{k: v.value for k, v in results[name].metadata.items()} for name in results if name.startswith("live")]
    assert sorted(m["applied"] for m in meta) == [0, len(plan)] and len(plan) > 0
    assert all(m["not_applied"] == 0 for m in meta)  # neither tripped over the other's work
    keys = [k for (k,) in conn.execute("SELECT idempotency_key FROM public.audit_fix_log")]
    assert sorted(keys) == sorted(p.idempotency_key for p in plan)


def test_diagnose_job(db_url: str, conn: psycopg.Connection, instance: DagsterInstance) -> None:
    case = paid_user(conn, grant=False)
    email = conn.execute("SELECT email FROM public.bestauth_users WHERE id = %s", (case["bid"],)).fetchone()[0]
    result = run_job("diagnose_user", db_url, instance,
                     run_config={"ops": {"diagnose_user_op": {"config": {"user": email}}}})
    doc = result.output_for_node("diagnose_user_op")
    assert doc["status"] == "CRITICAL" and doc["user"]["bestauth_user_id"] == str(case["bid"])
    failing = [c for c in doc["checks"] if c["status"] == "fail"]
    assert {c["rule"] for c in failing} == {"paid_users_funded"}

    unknown = run_job("diagnose_user", db_url, instance, raise_on_error=False,
                      run_config={"ops": {"diagnose_user_op": {"config": {"user": "nobody@example.com"}}}})
    assert not unknown.success
