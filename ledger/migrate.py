"""Apply ``sql/`` migrations in order, once each, safely from many processes at once.

Each file runs in its own transaction under a cluster-wide advisory lock, and is recorded in
``schema_migrations`` with its checksum, so a repeat run applies nothing and an edited, already
applied file is reported instead of silently diverging.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from ledger.config import PROJECT_ROOT, CreditsConfig
from ledger.errors import ConfigError

log = logging.getLogger(__name__)

SQL_DIR = PROJECT_ROOT / "sql"
_LOCK_KEY = 7_262_011_001  # arbitrary, fixed: "credit-recon migrations"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    found = []
    for path in sorted(sql_dir.glob("*.sql")):
        m = _NAME.match(path.name)
        if m:
            found.append(Migration(m.group(1), path.stem, path))
    versions = [m.version for m in found]
    if len(versions) != len(set(versions)):
        raise ConfigError(f"two migrations in {sql_dir} share a version number: {versions}")
    return found


def migrate(conn: psycopg.Connection, config: CreditsConfig, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply pending migrations and sync config-backed settings; returns the names applied."""
    applied_now: list[str] = []
    conn.autocommit = False
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(
                """CREATE TABLE IF NOT EXISTS public.schema_migrations (
                       version text PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
        for mig in discover(sql_dir):
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                row = conn.execute(
                    "SELECT checksum FROM public.schema_migrations WHERE version = %s", (mig.version,)
                ).fetchone()
                if row:
                    if row[0] != mig.checksum:
                        log.warning("migration %s changed after it was applied; not re-applied", mig.name)
                    continue
                log.info("applying migration %s", mig.name)
                conn.execute(mig.text)  # type: ignore[arg-type]  # trusted file from the repository
                conn.execute(
                    "INSERT INTO public.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (mig.version, mig.name, mig.checksum),
                )
                applied_now.append(mig.name)
        with conn.transaction():
            sync_settings(conn, config)
    finally:
        conn.autocommit = True
    return applied_now


def sync_settings(conn: psycopg.Connection, config: CreditsConfig) -> None:
    """Copy the config values the SQL functions enforce into ledger_settings, and grant the service role."""
    settings = {
        "max_operation_amount": str(config.limits.max_operation_amount),
        "free_daily_limit": str(config.free.daily_limit),
        "reservation_ttl_seconds": str(config.reservations.ttl_seconds),
    }
    for name, value in settings.items():
        conn.execute(
            """INSERT INTO public.ledger_settings (name, value) VALUES (%s, %s)
               ON CONFLICT (name) DO UPDATE SET value = excluded.value
               WHERE public.ledger_settings.value IS DISTINCT FROM excluded.value""",
            (name, value),
        )
    grant_service_role(conn, config.database.service_role)


def grant_service_role(conn: psycopg.Connection, role: str) -> None:
    """Create the service role if we may, and grant it the ledger functions (and nothing to write directly)."""
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    if not exists:
        can_create = conn.execute(
            "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        if not (can_create and can_create[0]):
            log.warning("service role %s does not exist and this user cannot create it; no grants made", role)
            return
        try:
            with conn.transaction():
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        except psycopg.errors.DuplicateObject:
            pass
    ident = sql.Identifier(role)
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident))
    conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(ident))
    functions = conn.execute(
        """SELECT p.oid::regprocedure::text FROM pg_proc p
            WHERE p.pronamespace = 'public'::regnamespace AND p.prosecdef"""
    ).fetchall()
    for (signature,) in functions:
        # signature: regprocedure's own quoted rendering of a catalog entry, not user input
        conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(sql.SQL(signature)))
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(signature), ident))
    _least_privilege(conn, role, [s for (s,) in functions])


# Tables only the SECURITY DEFINER ledger functions write (sql/004_security.sql, security_exposures).
MONEY_TABLES = ("points_balances", "points_transactions", "points_reservations", "points_deduction_failures",
                "free_generation_claims", "ledger_settings", "ledger_transaction_types", "schema_migrations")
# What the service role writes directly: the webhook (subscription upsert, mapping) and a live fix run's
# record (audit_fix_log is append-only by its trigger, like the ledger). UPDATE on user_id_mapping is for
# the webhook's SELECT ... FOR UPDATE of the user's mapping row.
SERVICE_WRITES = {"subscriptions_consolidated": "INSERT, UPDATE", "user_id_mapping": "INSERT, UPDATE",
                  "audit_runs": "INSERT, UPDATE", "audit_fix_log": "INSERT"}
SUPABASE_CLIENT_ROLES = ("anon", "authenticated")
# the tables a signed-in Supabase user may read (own rows only, sql/optional/supabase_rls.sql)
SUPABASE_OWN_ROW_TABLES = ("points_balances", "points_transactions", "points_reservations")
_CREDIT_TABLE_NAMES = ("bestauth_users", "user_id_mapping", "subscriptions_consolidated") + MONEY_TABLES
_CREDIT_TABLE_PATTERN = r"^(points_|ledger_|audit_|demo_seed_)"


def _existing_tables(conn: psycopg.Connection, names: "tuple[str, ...] | list[str]") -> list[str]:
    rows = conn.execute(
        """SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
              AND c.relkind IN ('r', 'p') AND c.relname = ANY (%s) ORDER BY c.relname""", (list(names),)
    ).fetchall()
    return [r[0] for r in rows]


def credit_relations(conn: psycopg.Connection) -> list[str]:
    """credit-recon's tables in public, and every view in public that reads one of them."""
    rows = conn.execute(
        """WITH ours AS (
               SELECT c.oid FROM pg_class c
                WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
                  AND (c.relname = ANY (%s) OR c.relname ~ %s))
           SELECT c.relname FROM pg_class c WHERE c.oid IN (SELECT oid FROM ours)
           UNION
           SELECT v.relname FROM pg_rewrite rw
             JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid
             JOIN pg_class v ON v.oid = rw.ev_class
            WHERE d.refobjid IN (SELECT oid FROM ours) AND v.relkind IN ('v', 'm')
              AND v.relnamespace = 'public'::regnamespace
           ORDER BY 1""",
        (list(_CREDIT_TABLE_NAMES), _CREDIT_TABLE_PATTERN),
    ).fetchall()
    return [r[0] for r in rows]


def _least_privilege(conn: psycopg.Connection, role: str, definer_functions: list[str]) -> None:
    """No direct writes to money tables by the service role; nothing for Supabase's client roles."""
    service = sql.Identifier(role)
    # a service role that owns the tables (or is a superuser) cannot be restricted, and revoking the owner's
    # own privileges would break the SECURITY DEFINER functions, which write as the owner
    owner_like = conn.execute(
        """SELECT r.rolsuper OR pg_has_role(r.oid, c.relowner, 'MEMBER')
             FROM pg_roles r, pg_class c
            WHERE r.rolname = %s AND c.oid = 'public.points_transactions'::regclass""", (role,)).fetchone()
    if owner_like and owner_like[0]:
        log.warning("service role %s owns the ledger tables or is a superuser: least privilege cannot be "
                    "enforced for it; configure a separate role in [database] service_role", role)
    money = _existing_tables(conn, MONEY_TABLES)
    if money:
        tables = sql.SQL(", ").join(sql.Identifier("public", t) for t in money)
        revoke_from = sql.SQL("PUBLIC") if owner_like and owner_like[0] else sql.SQL("PUBLIC, {}").format(service)
        conn.execute(sql.SQL("REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON {} FROM {}")
                     .format(tables, revoke_from))
    for table in _existing_tables(conn, list(SERVICE_WRITES)):
        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(
            sql.SQL(SERVICE_WRITES[table]), sql.Identifier("public", table), service))  # constants above
    present = [r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY (%s)",
                                          (list(SUPABASE_CLIENT_ROLES),)).fetchall()]
    if not present:
        return
    clients = sql.SQL(", ").join(sql.Identifier(r) for r in present)
    for signature in definer_functions:
        conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM {}").format(sql.SQL(signature), clients))
    relations = credit_relations(conn)
    if relations:
        conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(
            sql.SQL(", ").join(sql.Identifier("public", t) for t in relations), clients))
    rls_on = conn.execute(
        """SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
              AND c.relrowsecurity AND c.relname = ANY (%s)""", (list(SUPABASE_OWN_ROW_TABLES),)
    ).fetchall()
    if "authenticated" in present and rls_on:
        # only behind row-level security (apply_supabase_rls) may a signed-in user read: their own rows
        conn.execute(sql.SQL("GRANT SELECT ON {} TO authenticated").format(
            sql.SQL(", ").join(sql.Identifier("public", r[0]) for r in rls_on)))


SUPABASE_RLS_FILE = SQL_DIR / "optional" / "supabase_rls.sql"


def apply_supabase_rls(conn: psycopg.Connection, config: CreditsConfig) -> None:
    """The optional Supabase step (`credits migrate --supabase`): row-level security on every
    credit-recon table, own-row reads for ``authenticated``, nothing for ``anon``, and a read-all
    policy for the configured service role. Run after ``migrate``; safe to repeat.

    ConfigError when this is not a Supabase database (no ``auth.uid()``, no anon/authenticated roles).
    """
    if conn.execute("SELECT to_regprocedure('auth.uid()')").fetchone()[0] is None:
        raise ConfigError("not a Supabase database: function auth.uid() does not exist (run plain `credits migrate`)")
    missing = [r for r in SUPABASE_CLIENT_ROLES
               if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (r,)).fetchone() is None]
    if missing:
        raise ConfigError(f"not a Supabase database: role(s) {', '.join(missing)} do not exist")
    role = config.database.service_role
    was_autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(SUPABASE_RLS_FILE.read_text(encoding="utf-8"))  # type: ignore[arg-type]  # repository file
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                ident = sql.Identifier(role)
                rls_tables = [r[0] for r in conn.execute(
                    """SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
                          AND c.relrowsecurity ORDER BY 1""").fetchall()]
                for table in rls_tables:
                    target = sql.Identifier("public", table)
                    conn.execute(sql.SQL("DROP POLICY IF EXISTS credit_recon_service_read ON {}").format(target))
                    conn.execute(sql.SQL("CREATE POLICY credit_recon_service_read ON {} FOR SELECT TO {} USING (true)")
                                 .format(target, ident))
            else:
                log.warning("service role %s does not exist; it gets no read policy", role)
            sync_settings(conn, config)  # the grant step, now with row-level security in place
            conn.execute(
                """INSERT INTO public.schema_migrations (version, name, checksum) VALUES ('supabase', %s, %s)
                   ON CONFLICT (version) DO UPDATE SET checksum = excluded.checksum, applied_at = now()""",
                (SUPABASE_RLS_FILE.stem, hashlib.sha256(SUPABASE_RLS_FILE.read_bytes()).hexdigest()),
            )
    finally:
        conn.autocommit = was_autocommit
    log.info("row-level security applied for Supabase (service role %s)", role)
