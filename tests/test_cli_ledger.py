"""`credits migrate|grant|deduct|balance|history` as a person (or a script) uses them."""

from __future__ import annotations

import psycopg

from tests.cli_helpers import run_cli
from tests.factories import count_rows, make_user


def test_grant_balance_history_round_trip(db_url: str, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn, "ann@example.com")
    r = run_cli(db_url, "grant", "ann@example.com", "250", "--reason", "goodwill", "--key", "t1", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["new_balance"] == 250 and r.json()["user_id"] == str(sid)
    again = run_cli(db_url, "grant", "ann@example.com", "250", "--reason", "goodwill", "--key", "t1", "--json")
    assert again.code == 0 and again.json()["duplicate"] is True
    assert run_cli(db_url, "deduct", str(bid), "50").code == 0
    bal = run_cli(db_url, "balance", str(sid), "--json")
    assert bal.code == 0 and bal.json()["balance"] == 200
    hist = run_cli(db_url, "history", "ann@example.com")
    assert hist.code == 0 and "goodwill" in hist.stdout and "-50" in hist.stdout


def test_migrate_twice_is_a_no_op(db_url: str) -> None:
    r = run_cli(db_url, "migrate")
    assert r.code == 0 and "up to date" in r.stdout


def test_bad_input_exits_3_with_one_clear_line_and_writes_nothing(db_url: str, conn: psycopg.Connection) -> None:
    make_user(conn, "bob@example.com")
    cases = [
        (("grant", "nobody@example.com", "10"), "no user with email"),
        (("grant", "bob@example.com", "-5"), "positive whole number"),
        (("deduct", "bob@example.com", "-1"), "positive whole number"),
        (("grant", "bob@example.com", "5", "--bogus"), "unexpected extra argument"),
        (("grant", "bob@example.com", "ten"), "whole number"),
        (("grant", "bob@example.com", "0"), "positive"),
        (("grant", "bob@example.com", "99999999999"), "maximum"),
        (("grant", "bob@example.com", "10", "--type", "gift"), "unknown transaction type"),
        (("balance", "not-an-id"), "not an email or a UUID"),
        (("balance", "x' OR 1=1 --"), "not an email or a UUID"),
        (("balance", "00000000-0000-0000-0000-000000000000"), "no user with id"),
        (("grant",), "Missing argument"),
    ]
    for args, message in cases:
        r = run_cli(db_url, *args)
        assert r.code == 3, (args, r.stdout, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert count_rows(conn, "points_transactions") == 0


def test_insufficient_credits_exit_4_and_recorded(db_url: str, conn: psycopg.Connection) -> None:
    make_user(conn, "cat@example.com")
    r = run_cli(db_url, "deduct", "cat@example.com", "5")
    assert r.code == 4 and "insufficient credits" in r.stderr
    assert count_rows(conn, "points_deduction_failures") == 1


def test_unreachable_database_names_host_not_password() -> None:
    r = run_cli("postgresql://admin:s3cr3t-pw@127.0.0.1:1/prod_credits", "balance", "a@example.com")
    assert r.code == 3
    assert "127.0.0.1:1/prod_credits" in r.stderr and "s3cr3t-pw" not in r.stderr + r.stdout
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
    r = run_cli("mysql://root:pw@db/x", "migrate")
    assert r.code == 3 and "postgresql://" in r.stderr and "pw@" not in r.stderr
