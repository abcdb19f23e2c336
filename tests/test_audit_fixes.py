"""The fix applier: dry runs change nothing, live runs fix what is safe (recorded, linked to their run),
a second live run finds nothing to fix, the cap refuses a large plan, ledger rows are never rewritten."""

from __future__ import annotations

import uuid

import pytest

from checks.audit import audit_and_fix, run_audit
from checks.fixes import FixCapExceeded, apply_fixes
from tests.audit_cases import (
    chain_break,
    deduct,
    drift,
    paid_user,
    retry_grant,
    table_dump,
)
from tests.factories import balance_row, ledger_sum, make_user


def _faults(conn):
    """One user per fixable fault, one per fault that needs a person, and a healthy one."""
    c = {
        "healthy": paid_user(conn, spend=800),
        "unmapped": paid_user(conn, mapped=False, metadata="supabase_user_id"),
        "legacy_meta": paid_user(conn, metadata="original_userId"),
        "unfunded": paid_user(conn, grant=False, prev_periods=1, spend=300),
        "unmapped_unfunded": paid_user(conn, mapped=False, grant=False),
        "drift": paid_user(conn, spend=200),
        "dup": paid_user(conn, spend=100),
        "dup_spent": paid_user(conn),
        "chain": paid_user(conn, spend=100),
    }
    drift(conn, c["drift"]["pid"], -30)
    retry_grant(conn, c["dup"])
    retry_grant(conn, c["dup_spent"])
    deduct(conn, c["dup_spent"]["pid"], 1500)
    chain_break(conn, c["chain"]["pid"])
    return c


def test_dry_run_changes_nothing(db_url, conn, config):
    _faults(conn)
    before = table_dump(conn)
    report = audit_and_fix(db_url, config, live=False)
    assert report.plan and all(not f.applied and f.note == "dry run" for f in report.fixes)
    assert report.run_id is None
    assert table_dump(conn) == before   # ledger, balances, mappings, metadata, run log: untouched


def test_live_run_fixes_what_is_safe_and_records_it(db_url, conn, config):
    c = _faults(conn)
    ledger_before = conn.execute("SELECT * FROM public.points_transactions ORDER BY id").fetchall()
    report = audit_and_fix(db_url, config, live=True, max_fixes=50, actor="test:pytest")
    assert report.status == "CRITICAL" and report.run_id
    assert not [f for f in report.fixes if f.error], [f.error for f in report.fixes if f.error]
    actions = sorted(f.planned.action for f in report.fixes if f.applied)
    assert actions == sorted(["create_mapping", "create_mapping", "write_resolved_metadata",
                              "write_resolved_metadata", "grant_period", "grant_period",
                              "reverse_duplicate_grant", "rebuild_balance"])

    # existing ledger rows are untouched: the fixes only appended
    ledger_after = conn.execute("SELECT * FROM public.points_transactions ORDER BY id").fetchall()
    assert ledger_after[: len(ledger_before)] == ledger_before and len(ledger_after) == len(ledger_before) + 3

    # what each fix did
    m = conn.execute("SELECT supabase_user_id FROM public.user_id_mapping WHERE bestauth_user_id = %s",
                     (c["unmapped"]["bid"],)).fetchone()
    assert m == (c["unmapped"]["pid"],)
    meta = conn.execute("SELECT metadata FROM public.subscriptions_consolidated WHERE id = %s",
                        (c["legacy_meta"]["sub"]["id"],)).fetchone()[0]
    assert meta["resolved_supabase_user_id"] == str(c["legacy_meta"]["pid"])
    assert balance_row(conn, c["unfunded"]["pid"])[0] == 800 + 800 - 300
    assert balance_row(conn, c["unmapped_unfunded"]["pid"])[0] == 800
    assert balance_row(conn, c["drift"]["pid"])[0] == ledger_sum(conn, c["drift"]["pid"]) == 600
    assert balance_row(conn, c["dup"]["pid"])[0] == 700

    # the run and every applied fix are recorded and linked
    run = conn.execute("SELECT actor, live, planned, applied, failed, status, finished_at IS NOT NULL "
                       "FROM public.audit_runs WHERE id = %s", (report.run_id,)).fetchone()
    assert run == ("test:pytest", True, len(report.plan), 8, 0, "CRITICAL", True)
    log = conn.execute("SELECT action, before, after FROM public.audit_fix_log WHERE run_id = %s ORDER BY id",
                       (report.run_id,)).fetchall()
    assert len(log) == 8
    rebuilt = [r for r in log if r[0] == "rebuild_balance"][0]
    assert rebuilt[1]["balance"] == 570 and rebuilt[2]["balance"] == 600

    # after: only what needs a person is left, and the report says so
    assert report.after is not None
    left = {(f.rule, f.bestauth_user_id) for f in report.after.findings}
    assert left == {("duplicate_grants", str(c["dup_spent"]["bid"])), ("ledger_integrity", str(c["chain"]["bid"]))}
    assert all(f.fix is None for f in report.after.findings)
    # every balance equals its ledger now
    assert conn.execute("""SELECT count(*) FROM public.points_balances b
                            WHERE b.balance <> (SELECT coalesce(sum(amount), 0) FROM public.points_transactions t
                                                 WHERE t.user_id = b.user_id)""").fetchone()[0] == 0

    # a second live run right after finds nothing to fix and writes nothing but its run record
    again = audit_and_fix(db_url, config, live=True, max_fixes=50, actor="test:pytest")
    assert again.plan == [] and again.fixes == [] and again.after is None
    assert conn.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0] == len(ledger_after)


def test_applying_the_same_plan_twice_is_a_no_op(db_url, conn, config):
    _faults(conn)
    report = run_audit(db_url, config)
    first = apply_fixes(db_url, config, report.plan, live=True, max_fixes=100, actor="test")
    assert first.applied == len(report.plan) and first.failed == 0
    dump = table_dump(conn)
    second = apply_fixes(db_url, config, report.plan, live=True, max_fixes=100, actor="test")
    assert second.applied == 0 and second.failed == 0 and second.skipped == len(report.plan)
    after = table_dump(conn)
    # only the second run's own record differs
    for table in ("bestauth_users", "user_id_mapping", "subscriptions_consolidated", "points_transactions",
                  "audit_fix_log"):
        assert after[table] == dump[table], table
    assert [b[:4] for b in after["points_balances"]] == [b[:4] for b in dump["points_balances"]]


def test_cap_refuses_a_large_plan_and_writes_nothing(db_url, conn, config):
    for _ in range(4):
        paid_user(conn, grant=False)
    before = table_dump(conn)
    with pytest.raises(FixCapExceeded) as exc:
        audit_and_fix(db_url, config, live=True, max_fixes=3)
    assert exc.value.planned == 4 and exc.value.cap == 3
    assert table_dump(conn) == before
    report = audit_and_fix(db_url, config, live=True, max_fixes=4)
    assert sum(f.applied for f in report.fixes) == 4 and report.final_status == "HEALTHY"


def test_config_cap_is_the_default(db_url, conn, config):
    paid_user(conn, grant=False)
    paid_user(conn, grant=False)
    small = config.model_copy(update={"audit": config.audit.model_copy(update={"max_fixes": 1})})
    with pytest.raises(FixCapExceeded):
        audit_and_fix(db_url, small, live=True)


def test_a_fix_whose_facts_changed_is_not_applied(db_url, conn, config):
    case = paid_user(conn, mapped=False, grant=False, metadata="supabase_user_id")
    report = run_audit(db_url, config)
    # between the audit and the fix someone maps the user elsewhere
    other = uuid.uuid4()
    conn.execute("INSERT INTO public.user_id_mapping (bestauth_user_id, supabase_user_id) VALUES (%s, %s)",
                 (case["bid"], other))
    run = apply_fixes(db_url, config, report.plan, live=True, max_fixes=10, actor="test")
    errors = {f.planned.action: f.error for f in run.fixes if f.error}
    assert "create_mapping" in errors and "grant_period" in errors and "write_resolved_metadata" in errors
    assert run.applied == 0
    assert conn.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM public.audit_fix_log").fetchone()[0] == 0


def test_a_duplicate_spent_after_the_audit_is_not_reversed(db_url, conn, config):
    case = paid_user(conn)
    retry_grant(conn, case)
    report = run_audit(db_url, config, rules=["duplicate_grants"])
    deduct(conn, case["pid"], 1000)     # spent between audit and fix
    run = apply_fixes(db_url, config, report.plan, live=True, max_fixes=10, actor="test")
    assert run.applied == 0 and "spent" in run.fixes[0].error
    assert balance_row(conn, case["pid"])[0] == 600


def test_seeded_population_end_to_end(db_url, conn, config):
    """Every planted fault found by its rule, no look-alike flagged; after --live only what needs a
    person is left, balances equal the ledger, and a second live run applies nothing."""
    from checks.seed import read_manifest, seed

    manifest = seed(db_url, config, users=600, fault_rate=0.08, seed=7)
    report = run_audit(db_url, config)
    found: dict[str, set[str]] = {}
    for f in report.findings:
        found.setdefault(f.rule, set()).add(f.bestauth_user_id)
    for rule, users in manifest.faults.items():
        assert set(users) <= found.get(rule, set()), rule
    faulted = {u for users in manifest.faults.values() for u in users}
    lookalikes = {u for users in manifest.healthy_lookalikes.values() for u in users}
    assert lookalikes and not lookalikes & {f.bestauth_user_id for f in report.findings}
    assert {f.bestauth_user_id for f in report.findings} <= faulted

    live = audit_and_fix(db_url, config, live=True, max_fixes=500)
    assert not [f.error for f in live.fixes if f.error]
    assert live.after is not None and all(f.fix is None for f in live.after.findings)
    fixable_rules = {"mapping_present", "metadata_resolved", "paid_users_funded"}
    assert not [f for f in live.after.findings if f.rule in fixable_rules]
    assert conn.execute("""SELECT count(*) FROM public.points_balances b
                            WHERE b.balance <> (SELECT coalesce(sum(amount), 0) FROM public.points_transactions t
                                                 WHERE t.user_id = b.user_id)""").fetchone()[0] == 0
    again = audit_and_fix(db_url, config, live=True, max_fixes=500)
    assert again.plan == [] and not any(f.applied for f in again.fixes)
    assert read_manifest(conn).users == 600


def test_rebuild_refuses_when_reservations_exceed_the_ledger(db_url, conn, config):
    case = paid_user(conn)
    conn.execute("UPDATE public.points_balances SET balance = 900, reserved = 850 WHERE user_id = %s", (case["pid"],))
    report = run_audit(db_url, config, rules=["ledger_integrity"])
    f = report.findings[0]
    assert f.fix is None and "reserved" in f.reason


def test_unmapped_user_without_any_evidence_maps_to_own_id(db_url, conn, config):
    bid, _ = make_user(conn, mapped_to=None)
    audit_and_fix(db_url, config, live=True, max_fixes=5)
    assert conn.execute("SELECT supabase_user_id FROM public.user_id_mapping WHERE bestauth_user_id = %s",
                        (bid,)).fetchone() == (bid,)
