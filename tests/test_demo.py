"""The audit on seeded data: every planted fault found by its rule, no healthy user flagged, the live
run fixes what is fixable and nothing twice; and `credits demo` end to end in a subprocess."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from checks.audit import run_audit
from checks.fixes import apply_fixes
from checks.rules import RULES
from checks.seed import seed
from ledger import db
from ledger.config import CreditsConfig
from tests.cli_helpers import run_cli

# what the audit must plan for each planted variant: a fix action, or None (a person decides)
EXPECTED_FIX = {
    "no_mapping": "create_mapping",
    "no_mapping_legacy_meta": "create_mapping",
    "missing_key": "write_resolved_metadata",
    "legacy_only": "write_resolved_metadata",
    "wrong_id": "write_resolved_metadata",       # the wrong id holds no credits: safe to overwrite
    "never_granted": "grant_period",
    "previous_not_current": "grant_period",
    "trialing_not_granted": "grant_period",
    "balance_drift": "rebuild_balance",
    "chain_break": None,                          # history is never rewritten
    "retry_key": "reverse_duplicate_grant",
    "retry_key_spent": None,                      # reversing would overdraw the user
    "huge_paid_balance": None,                    # report only
    "free_with_credits": None,                    # report only
    "burst": None,                                # report only
    "expired_top_up": "expire_lots",
    "lot_drift": None,                            # lots are never rewritten by the audit
    "refunded_twice": None,                       # taking credits back is a decision
    "upgrade_without_grant": "grant_plan_change",
}


def _balances_off(url: str) -> int:
    with psycopg.connect(url) as c:
        return c.execute(
            """SELECT count(*) FROM public.points_balances b
                 LEFT JOIN (SELECT user_id, sum(amount) s, coalesce(sum(amount) FILTER (WHERE amount > 0), 0) e,
                                   coalesce(-sum(amount) FILTER (WHERE amount < 0), 0) x
                              FROM public.points_transactions GROUP BY user_id) t ON t.user_id = b.user_id
                WHERE b.balance <> coalesce(t.s, 0) OR b.lifetime_earned <> coalesce(t.e, 0)
                   OR b.lifetime_spent <> coalesce(t.x, 0)""").fetchone()[0]


@pytest.mark.parametrize("mode", ["functions", "bulk"])  # bulk: how the scale benchmark's population is written
def test_audit_finds_what_was_planted_and_fixes_what_is_fixable(db_url: str, config: CreditsConfig, mode: str) -> None:
    manifest = seed(db_url, config, users=800, fault_rate=0.06, seed=11, mode=mode)
    report = run_audit(db_url, config)
    assert report.status == "CRITICAL"

    found = {(f.rule, f.bestauth_user_id) for f in report.findings}
    missed = [(rule, uid, manifest.variants[uid]) for rule, ids in manifest.faults.items() for uid in ids
              if (rule, uid) not in found]
    assert not missed
    flagged_healthy = {f.bestauth_user_id for f in report.findings} - manifest.faulted
    assert not flagged_healthy, [(f.rule, f.bestauth_user_id, f.found) for f in report.findings
                                 if f.bestauth_user_id in flagged_healthy]
    # the finding of a planted fault under its own rule carries the fix the fault calls for
    planted = {(rule, uid) for rule, ids in manifest.faults.items() for uid in ids}
    for f in report.findings:
        if (f.rule, f.bestauth_user_id) in planted:
            variant = manifest.variants[f.bestauth_user_id]
            assert f.fix == EXPECTED_FIX[variant], (f.rule, variant, f.fix, f.reason)
            if f.fix is None:
                assert f.reason, (f.rule, variant)

    with psycopg.connect(db_url) as c:
        ledger_before = c.execute("SELECT id, amount, balance_after FROM public.points_transactions ORDER BY id").fetchall()
    run = apply_fixes(db_url, config, report.plan, live=True, max_fixes=len(report.plan), actor="test_demo")
    assert run.failed == 0 and run.applied == len(report.plan)
    with psycopg.connect(db_url) as c:
        ledger_after = c.execute("SELECT id, amount, balance_after FROM public.points_transactions ORDER BY id").fetchall()
        logged = c.execute("SELECT count(*) FROM public.audit_fix_log WHERE run_id = %s", (run.run_id,)).fetchone()[0]
    assert ledger_after[:len(ledger_before)] == ledger_before  # fixes only append
    assert logged == run.applied

    after = run_audit(db_url, config)
    assert not [f for f in after.findings if f.fix], "a fixable finding survived the live run"
    # what is left is exactly the planted faults a person must decide on, under their own rule
    left = {(f.rule, f.bestauth_user_id) for f in after.findings}
    for_a_person = {(r, u) for r, u in planted if EXPECTED_FIX[manifest.variants[u]] is None}
    assert left == for_a_person
    for rid in ("mapping_present", "metadata_resolved", "paid_users_funded"):
        assert after.counts()[rid] == 0
    assert _balances_off(db_url) == 0

    again = apply_fixes(db_url, config, after.plan, live=True, max_fixes=500, actor="test_demo")
    assert again.applied == 0
    assert run_audit(db_url, config).counts() == after.counts()


@pytest.fixture
def demo_db(pg_admin_url: str) -> Iterator[str]:
    name = f"cr_demo_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_admin_url, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_credits_demo_runs_end_to_end(pg_admin_url: str, demo_db: str) -> None:
    res = run_cli(pg_admin_url, "demo", "--users", "400", "--database", demo_db, timeout=60)
    assert res.code == 0, res.stdout + res.stderr
    for step in ("1. Seed", "2. Audit", "CRITICAL", "3. Fix", "4. Audit again", "Demo complete"):
        assert step in res.stdout, step
    assert "FAIL" not in res.stdout
    # it worked in its own database and left the admin database alone
    with psycopg.connect(db.with_database(pg_admin_url, demo_db)) as c:
        assert c.execute("SELECT count(*) FROM public.bestauth_users").fetchone()[0] == 400
        assert c.execute("SELECT count(*) FROM public.audit_runs WHERE live").fetchone()[0] >= 1
    with psycopg.connect(pg_admin_url) as c:
        assert c.execute("SELECT to_regclass('public.bestauth_users')").fetchone()[0] is None

    doc = run_cli(pg_admin_url, "demo", "--users", "150", "--database", demo_db, "--json", "--seed", "3").json()
    assert doc["ok"] is True and doc["before"]["status"] == "CRITICAL"
    assert all(c["ok"] for c in doc["checks"])
    assert doc["after"]["status"] in ("HEALTHY", "WARNING", "CRITICAL")
    assert all(f["fix"] is None for f in doc["after"]["findings"])


def test_credits_demo_refuses_a_database_with_real_users(pg_admin_url: str, demo_db: str,
                                                        config: CreditsConfig) -> None:
    url = db.with_database(pg_admin_url, demo_db)
    with psycopg.connect(pg_admin_url, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(demo_db)))
    from ledger.migrate import migrate

    with psycopg.connect(url, autocommit=True) as c:
        migrate(c, config)
        c.execute("INSERT INTO public.bestauth_users (email) VALUES ('someone@company.com')")
    res = run_cli(pg_admin_url, "demo", "--users", "50", "--database", demo_db)
    assert res.code == 3 and "refusing to reset" in res.stderr
    with psycopg.connect(url) as c:
        assert c.execute("SELECT email FROM public.bestauth_users").fetchall() == [("someone@company.com",)]
