"""Immutable ledger, least privilege with real LOGIN roles, and the optional Supabase row-level security.

Roles are cluster-wide, so every role a test creates has a unique name and is dropped afterwards
(``DROP OWNED`` in the test database first). Supabase's ``anon``/``authenticated`` have fixed names
(the policies name them); they are created only if missing and dropped only if this test created them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from ledger import ConfigError, Ledger, LedgerImmutable, SubscriptionEvent
from ledger.config import CreditsConfig, DatabaseConfig
from ledger.migrate import apply_supabase_rls, grant_service_role, migrate
from tests.cli_helpers import run_cli
from tests.factories import count_rows, make_user
from tests.invariants import assert_consistent

DENIED = "42501"  # insufficient_privilege


def _url_as(url: str, role: str, password: str) -> str:
    """The same database URL, signed in as ``role`` (a postgresql:// URL, as $DATABASE_URL would be)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{quote(role)}:{quote(password)}@{host}"))


def _drop_role(admin: psycopg.Connection, role: str) -> None:
    ident = sql.Identifier(role)
    admin.execute(sql.SQL("DROP OWNED BY {}").format(ident))
    try:
        admin.execute(sql.SQL("DROP ROLE {}").format(ident))
    except psycopg.errors.DependentObjectsStillExist:  # granted something in another database
        pass


@pytest.fixture
def login_role(db_url: str, conn: psycopg.Connection) -> Iterator[Callable[[], tuple[str, str]]]:
    """Factory of real LOGIN roles (unique names): returns (role name, URL of the test database as it)."""
    made: list[str] = []

    def make() -> tuple[str, str]:
        role = f"cr_test_role_{uuid.uuid4().hex[:12]}"
        password = uuid.uuid4().hex
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        made.append(role)
        return role, _url_as(db_url, role, password)

    yield make
    for role in made:
        _drop_role(conn, role)


def _sqlstate(c: psycopg.Connection, query: str, params: tuple = ()) -> str | None:
    try:
        c.execute(query, params)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


# ---------------------------------------------------------------------------------- immutable ledger

def test_ledger_rows_cannot_change_even_for_the_owner(conn: psycopg.Connection, ledger: Ledger) -> None:
    uid = uuid.uuid4()
    ledger.grant(uid, 100, idempotency_key="g")
    ledger.deduct(uid, 30, idempotency_key="d")
    before = conn.execute("SELECT * FROM public.points_transactions ORDER BY id").fetchall()
    for stmt in ("UPDATE public.points_transactions SET amount = 1000 WHERE idempotency_key = 'g'",
                 "UPDATE public.points_transactions SET description = 'edited'",
                 "UPDATE public.points_transactions SET idempotency_key = idempotency_key || 'x'",
                 "DELETE FROM public.points_transactions WHERE amount < 0",
                 "DELETE FROM public.points_transactions",
                 "TRUNCATE public.points_transactions",
                 "TRUNCATE public.points_transactions CASCADE"):
        assert _sqlstate(conn, stmt) == "CR010", stmt
    # through the module's connection the refusal is a typed error
    with pytest.raises(LedgerImmutable):
        with ledger.connection() as c:
            c.execute("DELETE FROM public.points_transactions")
    assert conn.execute("SELECT * FROM public.points_transactions ORDER BY id").fetchall() == before
    assert_consistent(conn)


# ---------------------------------------------------------------------------------- least privilege

def test_service_role_calls_the_functions_and_writes_no_money_table_directly(
        db_url: str, conn: psycopg.Connection, login_role) -> None:
    role, url = login_role()
    grant_service_role(conn, role)
    bid, sid = make_user(conn)
    config = CreditsConfig(database=DatabaseConfig(service_role=role))
    with Ledger.connect(url, config, migrate=False, max_size=2) as led:
        led.grant(sid, 100, idempotency_key="g")
        led.deduct(sid, 10, idempotency_key="d")
        with led.hold(sid, 20, "job") as h:
            h.capture(5)
        led.reserve(sid, 5, job_id="job-2")
        assert led.release("job-2")
        assert led.release_expired().released == 0
        start = datetime(2026, 11, 1, tzinfo=timezone.utc)
        res = led.handle_subscription_event(SubscriptionEvent(
            bestauth_user_id=bid, tier="pro", billing_cycle="monthly", status="active",
            current_period_start=start, current_period_end=start + timedelta(days=30)))
        assert res.granted == 800 and not res.duplicate
        assert led.balance(sid).balance == 100 - 10 - 5 + 800
        assert led.find_user(str(bid)).user_id == sid

    with psycopg.connect(url, autocommit=True) as c:
        assert c.execute("SELECT current_user").fetchone()[0] == role
        forbidden = [
            "UPDATE public.points_balances SET balance = balance + 1000",
            "INSERT INTO public.points_balances (user_id, balance) VALUES (gen_random_uuid(), 5)",
            "DELETE FROM public.points_balances",
            "TRUNCATE public.points_balances",
            "INSERT INTO public.points_transactions (user_id, amount, balance_after, transaction_type, idempotency_key)"
            " VALUES (gen_random_uuid(), 5, 5, 'adjustment', 'direct')",
            "UPDATE public.points_transactions SET amount = 1",
            "DELETE FROM public.points_transactions",
            "UPDATE public.points_reservations SET status = 'released'",
            "INSERT INTO public.points_reservations (job_id, user_id, amount, expires_at) "
            "VALUES ('x', gen_random_uuid(), 1, now())",
            "UPDATE public.ledger_settings SET value = '999999999999' WHERE name = 'max_operation_amount'",
            "INSERT INTO public.ledger_transaction_types VALUES ('gift', 1)",
            "DELETE FROM public.points_deduction_failures",
            "INSERT INTO public.free_generation_claims (job_id, user_id, day) VALUES ('x', gen_random_uuid(), now())",
            "CREATE FUNCTION public.add_points_shadow() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "UPDATE public.schema_migrations SET checksum = 'x'",
        ]
        for stmt in forbidden:
            assert _sqlstate(c, stmt) == DENIED, stmt
    assert_consistent(conn)
    assert conn.execute("SELECT * FROM public.security_exposures").fetchall() == []


def test_a_role_without_the_grant_is_refused_everything(db_url: str, conn: psycopg.Connection, login_role) -> None:
    role, url = login_role()
    uid = uuid.uuid4()
    conn.execute("SELECT * FROM public.add_points(%s, 50, 'adjustment', 'seed', 'seed')", (uid,))
    conn.execute("SELECT * FROM public.reserve_points(%s, 10, 'held')", (uid,))
    calls = [
        ("SELECT * FROM public.add_points(%s, 5, 'adjustment', 'x', 'k1')", (uid,)),
        ("SELECT * FROM public.deduct_points(%s, 5, 'adjustment', 'x', 'k2')", (uid,)),
        ("SELECT * FROM public.ledger_apply(%s, 5, 'adjustment', 'x', 'k3', '{}')", (uid,)),
        ("SELECT * FROM public.reserve_points(%s, 5, 'k4')", (uid,)),
        ("SELECT * FROM public.capture_reservation('held')", ()),
        ("SELECT * FROM public.release_reservation('held')", ()),
        ("SELECT * FROM public.release_expired_reservations()", ()),
        ("SELECT * FROM public.record_failed_deduction(%s, 5)", (uid,)),
        ("SELECT * FROM public.claim_free_generation(%s, 'job')", (uid,)),
        ("SELECT * FROM public.audit_rebuild_balance(%s)", (uid,)),
        ("SELECT * FROM public.points_balances", ()),
        ("SELECT * FROM public.points_transactions", ()),
        ("SELECT * FROM public.points_reservations", ()),
        ("UPDATE public.points_balances SET balance = 0", ()),
    ]
    with psycopg.connect(url, autocommit=True) as c:
        for query, params in calls:
            assert _sqlstate(c, query, params) == DENIED, query
    with Ledger.connect(url, CreditsConfig(), migrate=False, max_size=1) as led:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            led.grant(uid, 5, idempotency_key="module")
    assert count_rows(conn, "points_transactions") == 1
    assert conn.execute("SELECT balance, reserved FROM public.points_balances").fetchone() == (50, 10)


def test_security_exposures_lists_a_loosened_grant_and_migrate_closes_it(conn: psycopg.Connection,
                                                                         login_role) -> None:
    assert conn.execute("SELECT * FROM public.security_exposures").fetchall() == []
    role, _ = login_role()
    conn.execute("GRANT EXECUTE ON FUNCTION public.add_points(uuid, bigint, text, text, text, jsonb, timestamptz, integer) TO PUBLIC")
    conn.execute(sql.SQL("GRANT UPDATE ON public.points_balances TO {}").format(sql.Identifier(role)))
    conn.execute("ALTER FUNCTION public.release_reservation(text) RESET search_path")
    found = {(k, o, g, p) for k, o, g, p in conn.execute("SELECT * FROM public.security_exposures").fetchall()}
    assert found == {
        ("definer_executable_by", "add_points(uuid,bigint,text,text,text,jsonb,timestamp with time zone,integer)", "PUBLIC", "EXECUTE"),
        ("money_table_writable_by", "points_balances", role, "UPDATE"),
        ("definer_without_search_path", "release_reservation(text)", None, None),
    }
    conn.execute("ALTER FUNCTION public.release_reservation(text) SET search_path = ''")
    grant_service_role(conn, role)  # what every `credits migrate` runs
    assert conn.execute("SELECT * FROM public.security_exposures").fetchall() == []


def test_a_hostile_search_path_cannot_redirect_the_functions(conn: psycopg.Connection) -> None:
    conn.execute("CREATE SCHEMA evil")
    conn.execute("CREATE TABLE evil.points_transactions (LIKE public.points_transactions)")
    conn.execute("CREATE TABLE evil.points_balances (LIKE public.points_balances)")
    conn.execute("CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$SELECT '2000-01-01'::timestamptz$$")
    conn.execute("SET search_path = evil, public, pg_catalog")
    uid = uuid.uuid4()
    conn.execute("SELECT * FROM public.add_points(%s, 10, 'adjustment', 'x', 'k')", (uid,))
    conn.execute("SELECT * FROM public.reserve_points(%s, 5, 'j')", (uid,))
    conn.execute("RESET search_path")
    assert conn.execute("SELECT count(*) FROM evil.points_transactions").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM evil.points_balances").fetchone()[0] == 0
    assert conn.execute("SELECT balance, reserved FROM public.points_balances").fetchone() == (10, 5)
    assert conn.execute("SELECT expires_at > now() FROM public.points_reservations").fetchone()[0]


# ---------------------------------------------------------------------------------- Supabase RLS

@pytest.fixture
def supabase_like(conn: psycopg.Connection) -> Iterator[None]:
    """What Supabase provides: roles anon and authenticated, and auth.uid() reading the JWT's sub claim."""
    created = []
    for role in ("anon", "authenticated"):
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
            try:
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
                created.append(role)
            except psycopg.errors.DuplicateObject:
                pass
        # Supabase's default privileges hand every table and function in public to these roles
        conn.execute(sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT ALL ON ALL FUNCTIONS IN SCHEMA public TO {}").format(sql.Identifier(role)))
    conn.execute("CREATE SCHEMA auth")
    conn.execute("GRANT USAGE ON SCHEMA auth TO anon, authenticated")
    conn.execute("""CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
                        SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$""")
    yield
    for role in ("anon", "authenticated"):
        ident = sql.Identifier(role)
        conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        if role in created:
            try:
                conn.execute(sql.SQL("DROP ROLE {}").format(ident))
            except psycopg.errors.DependentObjectsStillExist:
                pass


def _as_client(c: psycopg.Connection, role: str, sub: uuid.UUID | None) -> None:
    """What PostgREST does per request: switch to the client role and expose the JWT's claims."""
    c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    c.execute("SELECT set_config('request.jwt.claim.sub', %s, false)", (str(sub) if sub else "",))


def test_supabase_rls_user_reads_only_own_rows_and_writes_nothing(
        db_url: str, conn: psycopg.Connection, login_role, supabase_like) -> None:
    service, service_url = login_role()
    config = CreditsConfig(database=DatabaseConfig(service_role=service))
    migrate(conn, config)
    # the exposure view sees what Supabase's default privileges hand out, until the grant step revokes it
    conn.execute("GRANT EXECUTE ON FUNCTION public.add_points(uuid, bigint, text, text, text, jsonb, timestamptz, integer) TO authenticated")
    assert conn.execute("SELECT count(*) FROM public.security_exposures WHERE grantee = 'authenticated'"
                        ).fetchone()[0] == 1
    apply_supabase_rls(conn, config)
    apply_supabase_rls(conn, config)  # safe to repeat
    assert conn.execute("SELECT * FROM public.security_exposures").fetchall() == []

    alice, bob = uuid.uuid4(), uuid.uuid4()
    for u, n in ((alice, 100), (bob, 70)):
        conn.execute("SELECT * FROM public.add_points(%s, %s, 'subscription_grant', 'p', %s)", (u, n, f"g:{u}"))
        conn.execute("SELECT * FROM public.deduct_points(%s, 5, 'generation_deduction', 'img', %s)", (u, f"d:{u}"))
        conn.execute("SELECT * FROM public.reserve_points(%s, 10, %s)", (u, f"job:{u}"))

    with psycopg.connect(db_url, autocommit=True) as c:
        _as_client(c, "authenticated", alice)
        assert c.execute("SELECT user_id, balance FROM public.points_balances").fetchall() == [(alice, 95)]
        assert {r[0] for r in c.execute("SELECT user_id FROM public.points_transactions").fetchall()} == {alice}
        assert c.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0] == 2
        assert c.execute("SELECT user_id FROM public.points_reservations").fetchall() == [(alice,)]
        assert c.execute("SELECT count(*) FROM public.points_balances WHERE user_id = %s", (bob,)).fetchone()[0] == 0
        for stmt, params in [
            ("UPDATE public.points_balances SET balance = 1000000", ()),
            ("INSERT INTO public.points_transactions (user_id, amount, balance_after, transaction_type, "
             "idempotency_key) VALUES (%s, 1000, 1000, 'adjustment', 'free money')", (alice,)),
            ("DELETE FROM public.points_reservations", ()),
            ("SELECT * FROM public.add_points(%s, 1000, 'adjustment', 'x', 'rpc')", (alice,)),
            ("SELECT * FROM public.release_reservation(%s)", (f"job:{alice}",)),
            ("SELECT * FROM public.release_expired_reservations()", ()),
            ("SELECT * FROM public.bestauth_users", ()),
            ("SELECT * FROM public.user_id_mapping", ()),
            ("SELECT * FROM public.subscriptions_consolidated", ()),
            ("SELECT * FROM public.user_id_resolution", ()),
            ("SELECT * FROM public.stale_reservations", ()),
            ("SELECT * FROM public.ledger_settings", ()),
        ]:
            assert _sqlstate(c, stmt, params) == DENIED, stmt
        _as_client(c, "authenticated", None)  # signed in without a sub claim: nothing
        assert c.execute("SELECT count(*) FROM public.points_balances").fetchone()[0] == 0
        c.execute("RESET ROLE")
        _as_client(c, "anon", alice)  # anon reads nothing, whatever claims it sends
        assert _sqlstate(c, "SELECT * FROM public.points_balances") == DENIED
        assert _sqlstate(c, "SELECT * FROM public.points_transactions") == DENIED
        assert _sqlstate(c, "SELECT * FROM public.reserve_points(%s, 1, 'anon-job')", (alice,)) == DENIED

    # the service role still sees everyone and moves credits; the functions pass RLS as the tables' owner
    with Ledger.connect(service_url, config, migrate=False, max_size=1) as led:
        assert led.balance(bob).balance == 65
        led.capture(f"job:{bob}", 10)
        assert led.balance(bob).balance == 55
    # a plain migrate afterwards (the grant step) keeps the user's read access and the policies
    migrate(conn, config)
    with psycopg.connect(db_url, autocommit=True) as c:
        _as_client(c, "authenticated", bob)
        assert c.execute("SELECT user_id, balance FROM public.points_balances").fetchall() == [(bob, 55)]
    assert count_rows(conn, "points_transactions") == 5
    assert_consistent(conn)


def test_supabase_step_refuses_a_database_that_is_not_supabase(db_url: str, conn: psycopg.Connection) -> None:
    with pytest.raises(ConfigError, match=r"auth\.uid\(\)"):
        apply_supabase_rls(conn, CreditsConfig())
    r = run_cli(db_url, "migrate", "--supabase")
    assert r.code == 3 and "not a Supabase database" in r.stderr and "Traceback" not in r.stderr
    assert not conn.execute("SELECT relrowsecurity FROM pg_class WHERE oid = 'public.points_balances'::regclass"
                            ).fetchone()[0]


def test_a_service_role_that_owns_the_tables_is_left_working(db_url: str, conn: psycopg.Connection, login_role,
                                                              caplog) -> None:
    """Misconfigured as the tables' (non-superuser) owner: migrate warns instead of revoking the owner's own
    rights, which would break every SECURITY DEFINER function (they write as the owner)."""
    owner, owner_url = login_role()
    ident = sql.Identifier(owner)
    for (rel,) in conn.execute("SELECT c.oid::regclass::text FROM pg_class c WHERE c.relnamespace = "
                               "'public'::regnamespace AND c.relkind IN ('r', 'v')").fetchall():
        conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.SQL(rel), ident))
    for (fn,) in conn.execute("SELECT p.oid::regprocedure::text FROM pg_proc p "
                              "WHERE p.pronamespace = 'public'::regnamespace").fetchall():
        conn.execute(sql.SQL("ALTER FUNCTION {} OWNER TO {}").format(sql.SQL(fn), ident))
    migrate(conn, CreditsConfig(database=DatabaseConfig(service_role=owner)))
    assert any("least privilege cannot be enforced" in r.getMessage() for r in caplog.records)
    uid = uuid.uuid4()
    with psycopg.connect(owner_url, autocommit=True) as c:
        c.execute("SELECT * FROM public.add_points(%s, 10, 'adjustment', 'x', 'k')", (uid,))
        c.execute("SELECT * FROM public.reserve_points(%s, 4, 'j')", (uid,))
    assert conn.execute("SELECT balance, reserved FROM public.points_balances").fetchone() == (10, 4)
    assert conn.execute("SELECT * FROM public.security_exposures").fetchall() == []
