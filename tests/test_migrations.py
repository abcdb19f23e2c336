"""`credits migrate`: ordered, recorded, a no-op when repeated, safe when run concurrently."""

from __future__ import annotations

import threading

import psycopg
import pytest

from ledger.config import CreditsConfig, LimitsConfig
from ledger.migrate import discover, migrate


def test_first_run_applies_all_then_nothing(empty_db_url: str) -> None:
    names = [m.name for m in discover()]
    assert names == sorted(names) and names[0] == "001_schema"
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        assert migrate(conn, CreditsConfig()) == names
        assert migrate(conn, CreditsConfig()) == []
        recorded = [r[0] for r in conn.execute("SELECT name FROM public.schema_migrations ORDER BY version")]
    assert recorded == names


def test_concurrent_migrations_apply_each_file_once(empty_db_url: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            with psycopg.connect(empty_db_url, autocommit=True) as conn:
                barrier.wait()
                results.append(migrate(conn, CreditsConfig()))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    applied = [name for r in results for name in r]
    assert sorted(applied) == sorted(m.name for m in discover())  # each exactly once across all runners


def test_migrate_syncs_config_into_settings(db_url: str) -> None:
    cfg = CreditsConfig(limits=LimitsConfig(max_operation_amount=777))
    with psycopg.connect(db_url, autocommit=True) as conn:
        migrate(conn, cfg)
        value = conn.execute("SELECT value FROM public.ledger_settings WHERE name = 'max_operation_amount'").fetchone()
        assert value == ("777",)
        with pytest.raises(psycopg.Error) as exc:
            conn.execute("SELECT * FROM public.add_points(gen_random_uuid(), 778, 'adjustment', 'x', 'k')")
        assert exc.value.sqlstate == "CR003"
