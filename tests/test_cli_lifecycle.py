"""`credits history` with lots, `credits top-up|refund|expire`, and `credits diagnose`'s lifecycle checks, as a
support engineer runs them (the real command in a subprocess, a real database)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg.types.json import Jsonb

from tests.cli_helpers import run_cli
from tests.factories import make_user
from tests.invariants import assert_consistent


def _grant(conn: psycopg.Connection, uid: uuid.UUID, amount: int, key: str, *, expires_at: datetime | None = None,
           priority: int | None = None, terms: dict | None = None) -> int:
    return conn.execute("SELECT transaction_id FROM public.add_points(%s, %s, 'adjustment', 'test grant', %s, %s, %s, %s)",
                        (uid, amount, key, Jsonb({"lot": terms} if terms else {}), expires_at, priority)).fetchone()[0]


def _deduct(conn: psycopg.Connection, uid: uuid.UUID, amount: int, key: str) -> int:
    return conn.execute("SELECT transaction_id FROM public.deduct_points(%s, %s, 'generation_deduction', 'gen', %s)",
                        (uid, amount, key)).fetchone()[0]


def test_history_shows_lots_their_expiry_and_what_drew_on_them(db_url: str, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn, "lots@example.com")
    soon = datetime.now(timezone.utc) + timedelta(days=2)
    forever = _grant(conn, sid, 30, "a")
    expiring = _grant(conn, sid, 20, "b", expires_at=soon,
                      terms={"rollover_cap": 5, "rollover_until": (soon + timedelta(days=30)).isoformat()})
    first = _grant(conn, sid, 10, "c", priority=10)
    gen = _deduct(conn, sid, 25, "g1")  # 10 from the priority lot, 15 from the expiring one
    doc = run_cli(db_url, "history", str(bid), "--json")
    assert doc.code == 0, doc.stderr
    d = doc.json()
    assert d["user_id"] == str(sid) and d["balance"] == 35 and d["open_lots_total"] == 35
    lots = {lot["lot_id"]: lot for lot in d["lots"]}
    assert [lot["lot_id"] for lot in d["lots"]] == [first, expiring, forever]  # newest first
    assert (lots[first]["remaining"], lots[first]["priority"]) == (0, 10)
    assert lots[expiring]["remaining"] == 5 and lots[expiring]["rollover"]["cap"] == 5
    assert lots[expiring]["expires_at"].startswith(soon.date().isoformat()) and not lots[expiring]["expiry_due"]
    assert lots[forever]["expires_at"] is None and lots[forever]["draws"] == []
    assert [(x["transaction_id"], x["amount"]) for x in lots[expiring]["draws"]] == [(gen, 15)]
    assert [t["amount"] for t in d["transactions"]] == [-25, 10, 20, 30]

    text = run_cli(db_url, "history", "lots@example.com")
    assert text.code == 0, text.stderr
    assert f"#{gen} generation_deduction 15" in text.stdout and "rollover up to 5" in text.stdout
    assert "ledger of" in text.stdout and "never" in text.stdout
    plain = run_cli(db_url, "history", str(sid), "--no-lots", "--json")
    assert plain.code == 0 and plain.json()["lots"] is None and len(plain.json()["transactions"]) == 4


def test_top_up_refund_and_expire(db_url: str, conn: psycopg.Connection) -> None:
    bid, sid = make_user(conn, "buyer@example.com")
    r = run_cli(db_url, "top-up", "buyer@example.com", "small", "--payment-id", "pay_1", "--json")
    assert r.code == 0, r.stderr
    assert (r.json()["amount"], r.json()["new_balance"], r.json()["duplicate"]) == (500, 500, False)
    again = run_cli(db_url, "top-up", str(bid), "small", "--payment-id", "pay_1", "--json")
    assert again.code == 0 and again.json()["duplicate"] is True and again.json()["new_balance"] == 500
    lot = conn.execute("SELECT source_type, priority, expires_at::date - now()::date FROM public.points_lots "
                       "WHERE user_id = %s", (sid,)).fetchall()
    assert lot == [("top_up", 50, 365)]

    unknown = run_cli(db_url, "top-up", str(bid), "huge", "--payment-id", "pay_2")
    assert unknown.code == 3 and "huge" in unknown.stderr and "large, small" in unknown.stderr

    gen = _deduct(conn, sid, 40, "gen-1")
    part = run_cli(db_url, "refund", str(gen), "--amount", "15", "--json")
    assert part.code == 0, part.stderr
    assert (part.json()["refunded"], part.json()["new_balance"]) == (15, 475)
    second = run_cli(db_url, "refund", str(gen), "--amount", "10")  # once per deduction
    assert second.code == 4 and "refund refused" in second.stderr
    over = run_cli(db_url, "refund", str(_deduct(conn, sid, 5, "gen-2")), "--amount", "6")
    assert over.code == 4 and "refund refused" in over.stderr
    grant_row = conn.execute("SELECT id FROM public.points_transactions WHERE user_id = %s AND amount > 0 "
                             "ORDER BY id LIMIT 1", (sid,)).fetchone()[0]
    assert run_cli(db_url, "refund", str(grant_row)).code == 4  # not a deduction
    assert run_cli(db_url, "refund", "0").code == 3
    assert conn.execute("SELECT balance FROM public.points_balances WHERE user_id = %s", (sid,)).fetchone()[0] == 470

    # one user's expiry, then the sweep: each writes once
    past = conn.execute("SELECT now() - interval '1 hour'").fetchone()[0]
    _, other = make_user(conn, "other@example.com")
    _grant(conn, sid, 7, "old-1", expires_at=past, priority=90)
    _grant(conn, other, 9, "old-2", expires_at=past)
    one = run_cli(db_url, "expire", "--user", "buyer@example.com", "--json")
    assert one.code == 0, one.stderr
    assert (one.json()["lots"], one.json()["credits"]) == (1, 7)
    sweep = run_cli(db_url, "expire", "--json")
    assert sweep.code == 0 and (sweep.json()["users"], sweep.json()["credits"]) == (1, 9)
    assert run_cli(db_url, "expire", "--json").json()["credits"] == 0
    assert run_cli(db_url, "expire", "--user", str(sid), "--json").json()["credits"] == 0
    assert conn.execute("SELECT count(*) FROM public.points_transactions WHERE transaction_type = 'expiry'"
                        ).fetchone()[0] == 2
    assert_consistent(conn)


def test_history_marks_credits_past_expiry_without_writing_them_off(db_url: str, conn: psycopg.Connection) -> None:
    _, sid = make_user(conn, "late@example.com")
    past = conn.execute("SELECT now() - interval '1 minute'").fetchone()[0]
    _grant(conn, sid, 12, "late", expires_at=past)
    r = run_cli(db_url, "history", "late@example.com", "--json")
    assert r.code == 0, r.stderr
    assert [lot["expiry_due"] for lot in r.json()["lots"]] == [True]
    text = run_cli(db_url, "history", "late@example.com")
    assert "past their expiry" in text.stdout and "(due)" in text.stdout
    assert conn.execute("SELECT count(*) FROM public.points_transactions WHERE transaction_type = 'expiry'"
                        ).fetchone()[0] == 0  # looking changes nothing
