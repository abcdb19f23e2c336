"""`credits audit|monitor|diagnose` as a person or cron runs them: output, --json shape, exit codes."""

from __future__ import annotations

from checks.rules import RULES
from tests.audit_cases import paid_user, table_dump
from tests.cli_helpers import run_cli
from tests.factories import make_user


def test_audit_json_exit_codes_and_live(db_url, conn):
    healthy = run_cli(db_url, "audit", "--json")
    assert healthy.code == 0, healthy.stderr
    doc = healthy.json()
    assert doc["status"] == "HEALTHY" and set(doc["rules"]) == set(RULES) and doc["findings"] == []

    case = paid_user(conn, grant=False)
    make_user(conn, mapped_to=None)
    before = table_dump(conn)
    dry = run_cli(db_url, "audit", "--json")
    assert dry.code == 2, dry.stderr
    doc = dry.json()
    assert doc["status"] == "CRITICAL" and doc["rules"]["paid_users_funded"] == {
        "severity": "critical", "count": 1, "fixable": 1}
    assert doc["rules"]["mapping_present"]["count"] == 1 and doc["rules"]["duplicate_grants"]["count"] == 0
    f = [x for x in doc["findings"] if x["rule"] == "paid_users_funded"][0]
    assert f["bestauth_user_id"] == str(case["bid"]) and f["user_id"] == str(case["pid"])
    assert f["fix"] == "grant_period" and f["expected"]["grant"] == 800
    assert {x["action"] for x in doc["fixes"]} == {"grant_period", "create_mapping"}
    assert not any(x["applied"] for x in doc["fixes"])
    assert table_dump(conn) == before  # the dry run wrote nothing

    # only one rule
    one = run_cli(db_url, "audit", "--json", "--rule", "mapping_present")
    assert one.code == 1 and one.json()["status"] == "WARNING"
    assert one.json()["rules"]["paid_users_funded"]["evaluated"] is False

    # over the cap: refused, exit 3, nothing written
    capped = run_cli(db_url, "audit", "--live", "--max-fixes", "1")
    assert capped.code == 3 and "cap of 1" in capped.stderr
    assert table_dump(conn) == before

    live = run_cli(db_url, "audit", "--live", "--json")
    assert live.code == 0, live.stderr
    doc = live.json()
    assert doc["status"] == "HEALTHY" and doc["status_before_fixes"] == "CRITICAL" and doc["run_id"]
    assert all(x["applied"] for x in doc["fixes"]) and len(doc["fixes"]) == 2

    human = run_cli(db_url, "audit")
    assert human.code == 0 and "HEALTHY" in human.stdout and "paid_users_funded" in human.stdout


def test_audit_bad_arguments_and_unreachable_database(db_url):
    bad_rule = run_cli(db_url, "audit", "--rule", "no_such_rule")
    assert bad_rule.code == 3 and "unknown rule" in bad_rule.stderr
    bad_cap = run_cli(db_url, "audit", "--max-fixes", "-1")
    assert bad_cap.code == 3
    bad_opt = run_cli(db_url, "audit", "--frobnicate")
    assert bad_opt.code == 3
    down = run_cli("postgresql://nobody:secret@127.0.0.1:1/nowhere", "monitor", "--json")
    assert down.code == 3 and "cannot connect" in down.stderr and "secret" not in down.stderr + down.stdout
    down = run_cli("postgresql://nobody:secret@127.0.0.1:1/nowhere", "audit")
    assert down.code == 3 and "secret" not in down.stderr


def test_monitor(db_url, conn):
    ok = run_cli(db_url, "monitor", "--json")
    assert ok.code == 0 and ok.json()["status"] == "HEALTHY"
    paid_user(conn, grant=False)
    make_user(conn, mapped_to=None)
    bad = run_cli(db_url, "monitor", "--json")
    assert bad.code == 2
    counts = bad.json()["counts"]
    assert counts["paid_unfunded"] == 1 and counts["unmapped_users"] == 1 and counts["integrity_issues"] == 0
    human = run_cli(db_url, "monitor")
    assert human.code == 2 and "paid_unfunded" in human.stdout and "CRITICAL" in human.stdout


def test_diagnose_healthy_and_broken_user(db_url, conn):
    good = paid_user(conn, spend=100)
    email = conn.execute("SELECT email FROM public.bestauth_users WHERE id = %s", (good["bid"],)).fetchone()[0]
    before = table_dump(conn)
    ok = run_cli(db_url, "diagnose", email, "--json")
    assert ok.code == 0, ok.stderr
    doc = ok.json()
    assert doc["status"] == "HEALTHY" and doc["user"]["user_id"] == str(good["pid"])
    names = [c["check"] for c in doc["checks"]]
    for name in ("user exists", "mapping", "subscription", "resolved metadata", "balance row",
                 "current period funded", "balance plausible for tier", "ledger integrity", "dry-run deduction"):
        assert name in names
    dry = [c for c in doc["checks"] if c["check"] == "dry-run deduction"][0]
    assert dry["status"] == "pass" and "rolled back" in dry["detail"]
    assert table_dump(conn) == before   # the dry-run deduction left nothing behind

    broken = paid_user(conn, grant=False, mapped=False)
    bad = run_cli(db_url, "diagnose", str(broken["bid"]), "--json")
    assert bad.code == 2
    checks = {c["check"]: c for c in bad.json()["checks"]}
    assert checks["mapping"]["status"] == "fail" and "create_mapping" in checks["mapping"]["fix"]
    assert checks["current period funded"]["status"] == "fail"
    assert "credits audit --live --rule paid_users_funded" in checks["current period funded"]["fix"]
    # the fix it names works, for this user only
    fixed = run_cli(db_url, "audit", "--live", "--user", str(broken["bid"]), "--json")
    assert fixed.code == 0 and fixed.json()["status"] == "HEALTHY"
    human = run_cli(db_url, "diagnose", str(broken["pid"]))   # by points id, human output
    assert human.code == 0 and "PASS" in human.stdout and "HEALTHY" in human.stdout

    missing = run_cli(db_url, "diagnose", "nobody@example.com")
    assert missing.code == 3 and "no user" in missing.stderr
    garbage = run_cli(db_url, "diagnose", "not-an-id")
    assert garbage.code == 3
