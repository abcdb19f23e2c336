"""Every rule against hand-built users: the faults it must find, and the healthy look-alikes it must not."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.types.json import Jsonb

from checks.audit import run_audit
from checks.rules import RULES
from checks.snapshot import SNAPSHOT_TABLES, take_snapshot
from tests.audit_cases import (
    add,
    chain_break,
    deduct,
    drift,
    fail_deductions,
    free_user,
    paid_user,
    retry_grant,
)
from tests.factories import grant_period, make_user


def flagged(report, rule: str) -> dict[str, object]:
    """BestAuth id -> finding, for one rule."""
    return {f.bestauth_user_id: f for f in report.results[rule].findings}


def test_rules_registry_is_the_contract():
    # the contract's seven, in its order (later issues may append rules of their own)
    assert list(RULES)[:7] == ["mapping_present", "metadata_resolved", "paid_users_funded", "ledger_integrity",
                               "duplicate_grants", "balance_matches_tier", "failed_deductions"]
    sev = {r.id: r.severity for r in RULES.values()}
    assert sev["paid_users_funded"] == sev["ledger_integrity"] == sev["duplicate_grants"] == "critical"
    assert sev["mapping_present"] == sev["metadata_resolved"] == sev["balance_matches_tier"] == "warning"
    assert not RULES["balance_matches_tier"].fixable and not RULES["failed_deductions"].fixable


def test_empty_database_is_healthy(db_url, config):
    report = run_audit(db_url, config)
    assert report.status == "HEALTHY" and report.exit_code == 0
    assert report.findings == [] and report.plan == []
    doc = report.to_json()
    assert set(doc["rules"]) == set(RULES) and all(v["count"] == 0 for v in doc["rules"].values())


def test_snapshot_is_consistent_and_aggregated(db_url, conn, config):
    a = paid_user(conn, spend=300)
    snap = take_snapshot(db_url)
    assert list(snap.frames) == list(SNAPSHOT_TABLES)
    led = snap.table("ledger_by_user").set_index("user_id").loc[str(a["pid"])]
    assert (led["ledger_rows"], led["ledger_sum"], led["ledger_earned"], led["ledger_spent"]) == (2, 500, 800, 300)
    assert led["chain_breaks"] == 0 and led["last_balance_after"] == 500
    pg = snap.table("period_grants")
    row = pg[pg["subscription_id"] == str(a["sub"]["id"])].iloc[0]
    assert row["grants"] == 1 and bool(row["canonical"]) and row["period_date"] == a["sub"]["start"].strftime("%Y-%m-%d")
    # as_of before the grant: the ledger is empty as of then
    past = take_snapshot(db_url, as_of=datetime.now(timezone.utc) - timedelta(days=1))
    assert past.table("ledger_by_user").empty and past.as_of is not None


def test_background_frames_are_read_as_of_the_snapshot(db_url, conn, config):
    """Frames read in the background (the audit's lifecycle frames, while it builds the state) see the
    snapshot's moment, not the writes committed after take_snapshot returned."""
    a = paid_user(conn, spend=300)
    later = ("lots_by_user", "refunds", "plan_change_grants")
    inline = take_snapshot(db_url)
    snap = take_snapshot(db_url, background=later)
    assert set(snap.pending) == set(later) and not set(later) & set(snap.frames)
    conn.execute("SELECT * FROM public.add_points(%s, 40, 'adjustment', 'after the snapshot', %s)",
                 (a["pid"], f"bg-test:{uuid.uuid4()}"))
    for name in later:
        assert snap.table(name).equals(inline.table(name)), name
    assert not snap.pending and list(snap.counts()) == list(inline.counts())
    lots = snap.table("lots_by_user").set_index("user_id").loc[str(a["pid"])]
    assert (lots["lots"], lots["lots_remaining"]) == (1, 500)


def test_paid_users_funded(db_url, conn, config):
    spent_all = paid_user(conn, spend=800)                       # healthy: spent every credit
    renewed = paid_user(conn, prev_periods=2, spend=100)         # healthy: renewals, current granted
    canceled = paid_user(conn, status="canceled", grant=False, prev_periods=1)  # healthy: not owed
    expired = paid_user(conn, status="expired", grant=False)     # healthy
    past_due = paid_user(conn, status="past_due", grant=False, prev_periods=1)  # healthy: not owed while past due
    free = free_user(conn)                                       # healthy
    yearly = paid_user(conn, tier="pro_plus", cycle="yearly", days_into_period=200)  # healthy
    never = paid_user(conn, grant=False)                         # fault
    prev_only = paid_user(conn, grant=False, prev_periods=1, spend=200)  # fault: previous granted, current not
    trialing = paid_user(conn, status="trialing", grant=False)   # fault: trials are owed their credits
    # granted under a webhook's own key whose metadata names the current period: funded
    by_meta = paid_user(conn, grant=False)
    retry_grant(conn, by_meta)
    # granted, but to another points id (e.g. the BestAuth id): not funded, and not safe to grant again
    elsewhere = paid_user(conn, grant=False)
    grant_period(conn, elsewhere["bid"], elsewhere["sub"], 800)

    report = run_audit(db_url, config, rules=["paid_users_funded"])
    found = flagged(report, "paid_users_funded")
    healthy = [spent_all, renewed, canceled, expired, past_due, free, yearly, by_meta]
    assert not {str(c["bid"]) for c in healthy} & set(found)
    for case in (never, prev_only, trialing):
        f = found[str(case["bid"])]
        assert f.fix == "grant_period" and f.severity == "critical"
        assert f.params["key"] == f"subscription_grant:{case['sub']['id']}:{case['sub']['start']:%Y-%m-%d}"
        assert f.params["amount"] == 800 and f.params["user_id"] == str(case["pid"])
        assert f.found["current_period_grants"] == 0
    assert found[str(elsewhere["bid"])].fix is None and "another points id" in found[str(elsewhere["bid"])].reason
    assert report.status == "CRITICAL"


def test_duplicate_grants(db_url, conn, config):
    renewed = paid_user(conn, prev_periods=2)                    # healthy: each period once
    dup = paid_user(conn, spend=100)                             # fault: retry, unspent -> reversible
    retry_grant(conn, dup)
    spent = paid_user(conn)                                      # fault: retry, then spent -> a person
    retry_grant(conn, spent)
    deduct(conn, spent["pid"], 1500)

    report = run_audit(db_url, config, rules=["duplicate_grants"])
    found = flagged(report, "duplicate_grants")
    assert set(found) == {str(dup["bid"]), str(spent["bid"])}
    f = found[str(dup["bid"])]
    assert f.fix == "reverse_duplicate_grant" and f.found["grants"] == 2
    assert len(f.params["reverse"]) == 1 and f.params["reverse"][0]["amount"] == 800
    # the row under the period key is the one kept
    kept = conn.execute("SELECT id FROM public.points_transactions WHERE idempotency_key = %s",
                        (f"subscription_grant:{dup['sub']['id']}:{dup['sub']['start']:%Y-%m-%d}",)).fetchone()[0]
    assert f.params["kept_transaction_id"] == kept
    g = found[str(spent["bid"])]
    assert g.fix is None and "already spent" in g.reason


def test_ledger_integrity(db_url, conn, config):
    ok = paid_user(conn, prev_periods=1, spend=450)
    drifted = paid_user(conn, spend=100)
    drift(conn, drifted["pid"], 70)
    broken = paid_user(conn, spend=100)
    chain_break(conn, broken["pid"])
    deduct(conn, broken["pid"], 10)   # the next write follows the cache, not the stale row
    lifetime = paid_user(conn)
    conn.execute("UPDATE public.points_balances SET lifetime_spent = 5 WHERE user_id = %s", (lifetime["pid"],))

    report = run_audit(db_url, config, rules=["ledger_integrity"])
    found = flagged(report, "ledger_integrity")
    assert str(ok["bid"]) not in found
    d = found[str(drifted["bid"])]
    assert d.fix == "rebuild_balance" and d.found["cache"]["balance"] == 770 and d.found["ledger"]["balance"] == 700
    b = found[str(broken["bid"])]
    assert b.fix is None and b.found["chain_breaks"] >= 1 and "never rewritten" in b.reason
    assert found[str(lifetime["bid"])].fix == "rebuild_balance"   # balance right, lifetime total wrong


def test_metadata_ids_are_validated_and_lower_cased_like_the_app():
    """The snapshot's metadata ids: a UUID in any case becomes its lower-case form; anything else (a
    trailing newline or space, a non-ASCII letter, a short or long value, empty) is no id, and the raw
    resolved value is kept only where it is not one."""
    import pandas as pd

    from checks.snapshot import _subscription_ids

    good = "ABCDEF01-2345-4789-8BCD-EF0123456789"
    raws = [good, good.lower(), good + "\n", " " + good, "\u0130" + good[1:], good[:-1], good + "0", "", None,
            "user_123"]
    frame = _subscription_ids(pd.DataFrame({"meta_resolved_raw": raws, "meta_supabase_raw": raws,
                                            "meta_original_raw": raws}))
    ids = [good.lower(), good.lower()] + [None] * 8
    for col in ("meta_resolved_id", "meta_supabase_id", "meta_original_id"):
        assert [None if pd.isna(v) else v for v in frame[col]] == ids, col
    assert [None if pd.isna(v) else v for v in frame["meta_resolved_raw"]] == [None, None, *raws[2:8], None,
                                                                              "user_123"]
    assert "meta_supabase_raw" not in frame and "meta_original_raw" not in frame


def test_metadata_resolved(db_url, conn, config):
    good = paid_user(conn)
    legacy_too = paid_user(conn, metadata="resolved")
    conn.execute("UPDATE public.subscriptions_consolidated SET metadata = metadata || %s WHERE id = %s",
                 (Jsonb({"original_userId": str(legacy_too["pid"])}), legacy_too["sub"]["id"]))
    legacy_only = paid_user(conn, metadata="supabase_user_id")
    missing = paid_user(conn, metadata="none")
    not_uuid = paid_user(conn, metadata={"resolved_supabase_user_id": "user_123"})
    wrong = paid_user(conn, metadata={"resolved_supabase_user_id": str(uuid.uuid4())})
    # the wrong id holds credits of its own: which account is the user's is a person's call
    other = uuid.uuid4()
    add(conn, other, 50)
    conflict = paid_user(conn, metadata={"resolved_supabase_user_id": str(other)})

    report = run_audit(db_url, config, rules=["metadata_resolved"])
    found = flagged(report, "metadata_resolved")
    assert str(good["bid"]) not in found and str(legacy_too["bid"]) not in found
    for case in (legacy_only, missing, not_uuid, wrong):
        f = found[str(case["bid"])]
        assert f.fix == "write_resolved_metadata" and f.params["resolved_supabase_user_id"] == str(case["pid"])
    assert found[str(conflict["bid"])].fix is None and "conflicting" in found[str(conflict["bid"])].reason


def test_mapping_present(db_url, conn, config):
    mapped = paid_user(conn)
    by_meta = paid_user(conn, mapped=False)                       # metadata + ledger agree
    by_legacy = paid_user(conn, mapped=False, metadata="original_userId")
    bare_bid, _ = make_user(conn, mapped_to=None)                 # no credits anywhere: its own id
    # conflicting evidence: metadata says one id, the subscription's grants sit under another
    conflict = paid_user(conn, mapped=False, grant=False)
    grant_period(conn, uuid.uuid4(), conflict["sub"], 800)
    # the evidence names a points id that another BestAuth user is already mapped to
    taken_bid, taken_pid = make_user(conn)
    stolen = paid_user(conn, mapped=False, grant=False, metadata={"resolved_supabase_user_id": str(taken_pid)})
    # credits under the BestAuth id itself, while the metadata names another id
    held_too = paid_user(conn, mapped=False, grant=False, metadata={"resolved_supabase_user_id": str(uuid.uuid4())})
    add(conn, held_too["bid"], 100)

    report = run_audit(db_url, config, rules=["mapping_present"])
    found = flagged(report, "mapping_present")
    assert str(mapped["bid"]) not in found and str(taken_bid) not in found
    for case in (by_meta, by_legacy):
        f = found[str(case["bid"])]
        assert f.fix == "create_mapping" and f.params["supabase_user_id"] == str(case["pid"])
    assert found[str(bare_bid)].params["supabase_user_id"] == str(bare_bid)
    assert found[str(conflict["bid"])].fix is None and "conflicting" in found[str(conflict["bid"])].reason
    assert found[str(stolen["bid"])].fix is None and "already mapped" in found[str(stolen["bid"])].reason
    held_reason = found[str(held_too["bid"])].reason
    assert found[str(held_too["bid"])].fix is None and "credits held under the BestAuth id" in held_reason
    assert report.status == "WARNING" and report.exit_code == 1


def test_balance_matches_tier(db_url, conn, config):
    renewed = paid_user(conn, prev_periods=2, spend=100)            # 2300 <= 3 x 800
    canceled = paid_user(conn, status="canceled", prev_periods=1)  # leftover credits are theirs
    huge = paid_user(conn)
    add(conn, huge["pid"], 800 * 10)
    free = free_user(conn)
    add(conn, free["pid"], 500)
    no_sub = free_user(conn, subscription=False)

    report = run_audit(db_url, config, rules=["balance_matches_tier"])
    found = flagged(report, "balance_matches_tier")
    assert set(found) == {str(huge["bid"]), str(free["bid"])}
    assert found[str(huge["bid"])].expected["max_balance"] == 2400 and found[str(huge["bid"])].fix is None
    assert found[str(free["bid"])].expected["max_balance"] == 0
    assert str(no_sub["bid"]) not in found and str(canceled["bid"]) not in found and str(renewed["bid"]) not in found


@pytest.mark.parametrize("recent, old, flagged_", [(20, 0, True), (19, 30, False)])
def test_failed_deductions(db_url, conn, config, recent, old, flagged_):
    case = paid_user(conn, spend=790)
    fail_deductions(conn, case["pid"], recent)
    fail_deductions(conn, case["pid"], old, hours_ago=2)
    report = run_audit(db_url, config, rules=["failed_deductions"])
    found = flagged(report, "failed_deductions")
    assert (str(case["bid"]) in found) is flagged_
    if flagged_:
        assert found[str(case["bid"])].found["failures_last_hour"] == 20 and found[str(case["bid"])].fix is None


def test_rule_results_carry_ge_summaries(db_url, conn, config):
    paid_user(conn, grant=False)
    report = run_audit(db_url, config, rules=["paid_users_funded"])
    gx = report.results["paid_users_funded"].gx
    assert gx["suite"] == "credit_recon.funding.paid_users_funded" and gx["success"] is False
    failing = [e for e in gx["expectations"] if not e["success"]]
    assert {e["expectation"] for e in failing} == {"expect_column_values_to_be_between",
                                                   "expect_column_values_to_be_in_set"}
    assert all(e["unexpected_count"] == 1 and len(e["sample_ids"]) == 1 for e in failing)


def test_period_grants_from_the_ledger_pass(db_url, conn, config):
    """Grants ride the ledger pass as tokens: odd keys and metadata cannot break the parsing, rows naming
    no period form their own group, the audit's reversals count against their period."""
    case = paid_user(conn)
    pid, sub = case["pid"], case["sub"]
    # a grant under a hostile key (separators inside), one naming nothing, one naming a non-UUID subscription
    conn.execute("SELECT * FROM public.add_points(%s, 5, 'subscription_grant', 'odd', %s, %s)",
                 (pid, "subscription_grant:a|b c:2026-01-01", Jsonb({})))
    conn.execute("SELECT * FROM public.add_points(%s, 7, 'subscription_grant', 'bare', 'bare-grant', '{}')", (pid,))
    conn.execute("SELECT * FROM public.add_points(%s, 9, 'subscription_grant', 'x', 'x-grant', %s)",
                 (pid, Jsonb({"subscription_id": "not a uuid|x", "period_start": "garbage"})))
    dup = retry_grant(conn, case)
    conn.execute("""SELECT * FROM public.deduct_points(%s, 800, 'reconciliation_fix', 'reverse', 'rev-1', %s)""",
                 (pid, Jsonb({"reverses_transaction_id": str(dup[1]), "subscription_id": str(sub["id"]),
                              "period_start": f"{sub['start']:%Y-%m-%d}"})))
    snap = take_snapshot(db_url)
    pg = snap.table("period_grants")
    mine = pg[pg["user_id"] == str(pid)]
    cur = mine[mine["subscription_id"] == str(sub["id"])].iloc[0]
    assert (cur["grants"], cur["granted"], cur["reversals"], cur["reversed"]) == (2, 1600, 1, 800)
    assert bool(cur["canonical"]) and cur["reversed_ids"] == str(dup[1])
    assert sorted(cur["grant_rows"].split()) == sorted(
        [f"{t}:800:{c}" for t, c in conn.execute(
            """SELECT id, CASE WHEN idempotency_key LIKE 'subscription_grant:%%' THEN 1 ELSE 0 END
                 FROM public.points_transactions WHERE user_id = %s AND amount = 800
                  AND transaction_type = 'subscription_grant'""", (pid,)).fetchall()])
    odd = mine[mine["subscription_id"] == "abc"].iloc[0]
    assert odd["period_date"] == "2026-01-01" and odd["grants"] == 1
    nameless = mine[mine["subscription_id"].isna()]
    assert int(nameless["grants"].sum()) == 2 and int(nameless["granted"].sum()) == 16
    # the reversed duplicate no longer counts; the audit sees one grant for the period
    report = run_audit(db_url, config, rules=["duplicate_grants", "paid_users_funded"])
    assert report.findings == []
    # a snapshot filtered to this user says the same as the full one
    from checks.snapshot import user_filter_for

    one = take_snapshot(db_url, users=user_filter_for(db_url, [str(case["bid"])]))
    cols = ["subscription_id", "period_date", "grants", "granted", "reversals", "reversed"]
    a = one.table("period_grants")[cols].sort_values(cols).reset_index(drop=True)
    b = mine[cols].sort_values(cols).reset_index(drop=True)
    assert a.equals(b)
    led = one.table("ledger_by_user").set_index("user_id").loc[str(pid)]
    assert led["ledger_sum"] == snap.table("ledger_by_user").set_index("user_id").loc[str(pid), "ledger_sum"]


def test_period_grants_group_interleaved_periods(db_url, conn, config):
    """A period's rows need not be adjacent in id order (a late retry of an earlier period): the grant rows
    are grouped by period all the same, one period_grants row per period, its rows spelled in id order."""
    case = paid_user(conn, grant=False)
    pid, sub, amount = case["pid"], case["sub"], case["amount"]
    prev = {**sub, "start": sub["start"] - timedelta(days=30), "end": sub["start"]}
    earlier = grant_period(conn, pid, prev, amount)                      # 1: previous period, its key
    current = grant_period(conn, pid, sub, amount)                       # 2: current period, its key
    retry_cur = grant_period(conn, pid, sub, amount, key=f"evt-{uuid.uuid4()}")    # 3: current, a retry
    retry_prev = grant_period(conn, pid, prev, amount, key=f"evt-{uuid.uuid4()}")  # 4: previous, a late retry
    pg = take_snapshot(db_url, tables=["period_grants"]).table("period_grants")
    mine = pg[pg["user_id"] == str(pid)]
    assert len(mine) == 2 and set(mine["period_date"]) == {f"{prev['start']:%Y-%m-%d}", f"{sub['start']:%Y-%m-%d}"}
    by_period = {r["period_date"]: r for r in mine.to_dict("records")}
    for period, (keyed, retried) in ((prev, (earlier, retry_prev)), (sub, (current, retry_cur))):
        row = by_period[f"{period['start']:%Y-%m-%d}"]
        assert (row["grants"], row["granted"], row["reversals"], bool(row["canonical"])) == (2, 2 * amount, 0, True)
        assert row["grant_rows"] == f"{keyed[1]}:{amount}:1 {retried[1]}:{amount}:0"
        assert row["subscription_id"] == str(sub["id"]) and row["reversed_ids"] is None


def test_monitor_counts_match_the_audit_on_its_indicators(db_url, conn, config):
    from checks.monitor import monitor

    assert monitor(db_url, config).status == "HEALTHY"
    paid_user(conn, spend=800)                      # healthy look-alikes count nowhere
    paid_user(conn, status="canceled", grant=False, prev_periods=1)
    paid_user(conn, grant=False, prev_periods=1)    # unfunded
    drifted = paid_user(conn)
    drift(conn, drifted["pid"], 70)                 # integrity
    make_user(conn, mapped_to=None)                 # unmapped
    burst = paid_user(conn, spend=790)
    fail_deductions(conn, burst["pid"], 20)
    m = monitor(db_url, config)
    assert m.status == "CRITICAL" and m.exit_code == 2
    assert (m.counts["paid_unfunded"], m.counts["balance_mismatches"], m.counts["unmapped_users"],
            m.counts["users_over_threshold"], m.counts["failed_deductions_last_hour"]) == (1, 1, 1, 1, 20)
    report = run_audit(db_url, config)
    assert m.counts["paid_unfunded"] == len(report.results["paid_users_funded"].findings)
    assert m.counts["unmapped_users"] == len(report.results["mapping_present"].findings)


def test_audit_as_of_a_past_instant(db_url, conn, config):
    """As of a past instant the ledger is cut there; the cache (no history) is not compared with it."""
    before = conn.execute("SELECT now()").fetchone()[0]
    case = paid_user(conn, spend=100)
    drift(conn, case["pid"], 70)
    now_report = run_audit(db_url, config, rules=["ledger_integrity"])
    assert [f.bestauth_user_id for f in now_report.findings] == [str(case["bid"])]
    past = run_audit(db_url, config, rules=["ledger_integrity"], as_of=before)
    assert past.findings == [] and past.as_of == before
    assert past.to_json()["as_of"] == before.isoformat()


def test_frame_settings_hold_for_their_frame_only(db_url, conn, config):
    """lots_by_user plans with its own random_page_cost (snapshot.FRAME_SETTINGS); the frames read after it
    on the same snapshot connection plan with the connection's setting again."""
    from checks import snapshot as snapshot_module

    paid_user(conn, spend=300)
    assert snapshot_module.FRAME_SETTINGS["lots_by_user"]["random_page_cost"] != "4"
    from checks import frame_reader

    c = frame_reader.connect(db_url)
    try:
        snapshot_module._begin(c)
        setting = "SELECT current_setting('random_page_cost') AS v"
        before = frame_reader.read_table(c, setting).column(0)[0].as_py()
        now = datetime.now(timezone.utc)
        params = {"as_of": now, "ref": now, "live": True, "iso": snapshot_module._ISO_RE, "uuid": snapshot_module._UUID_RE}
        with snapshot_module.db.connect(db_url) as binder_conn:
            query = snapshot_module._frame_sql(psycopg.ClientCursor(binder_conn), "lots_by_user", params)
        frame = snapshot_module._read_frame(c, "lots_by_user", query)
        assert len(frame) == 1
        assert frame_reader.read_table(c, setting).column(0)[0].as_py() == before == "4"
        frame_reader.execute(c, "ROLLBACK")
    finally:
        c.close()


def test_orphan_points_ids_in_the_state(db_url, conn, config):
    """Points ids that hold a balance or ledger rows but that no BestAuth user resolves to get a row of
    their own (orphan), once each; resolved users' ids do not."""
    from checks.state import user_state

    resolved = paid_user(conn, spend=100)
    stray = [uuid.uuid4() for _ in range(3)]
    for n, pid in enumerate(stray):
        add(conn, pid, 10 + n)
        add(conn, pid, 5)
    state = user_state(take_snapshot(db_url), config)
    orphans = state[state["orphan"]]
    assert sorted(orphans["user_id"]) == sorted(str(p) for p in stray)
    assert orphans.set_index("user_id").loc[str(stray[2]), "balance"] == 17
    assert not state.loc[state["user_id"] == str(resolved["pid"]), "orphan"].any()
    assert (~state["orphan"]).sum() == len(take_snapshot(db_url).table("bestauth_users"))
