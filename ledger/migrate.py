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
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(signature), ident))
