"""Running the pipeline's real jobs in process against a test database, and reading what they recorded."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetKey, DagsterInstance, ExecuteInProcessResult

from assets.partitions import partition_key_for
from pipelines.definitions import defs


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    """An in-memory Dagster instance (runs, events, check evaluations), IO manager files under tmp_path:
    the same storage API as SQLite, without an fsync per event."""
    inst = DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster"))
    try:
        yield inst
    finally:
        inst.dispose()


def today() -> str:
    return partition_key_for(datetime.now(timezone.utc))


def yesterday() -> str:
    return partition_key_for(datetime.now(timezone.utc) - timedelta(days=1))


def run_job(name: str, db_url: str, instance: DagsterInstance, *, partition: str | None = None,
            run_config: dict[str, Any] | None = None, raise_on_error: bool = True,
            asset_selection: list[AssetKey] | None = None) -> ExecuteInProcessResult:
    """One run of a job of ``defs``, its database resource pointed at ``db_url`` by run config (as the
    launchpad would), so a run is exactly what the UI launches."""
    job = defs.resolve_job_def(name)
    config = {**(run_config or {}), "resources": {"database": {"config": {"url": db_url}}}}
    return job.execute_in_process(partition_key=partition, instance=instance, run_config=config,
                                  raise_on_error=raise_on_error, asset_selection=asset_selection)


def live_config(live: bool = True, **extra: Any) -> dict[str, Any]:
    return {"ops": {"applied_fixes": {"config": {"live": live, **extra}}}}


def checks_by_rule(result: ExecuteInProcessResult) -> dict[str, Any]:
    """rule id -> the AssetCheckEvaluation the run recorded for it."""
    return {ev.check_name: ev for ev in result.get_asset_check_evaluations()}


def metadata(result: ExecuteInProcessResult, key: str | list[str]) -> dict[str, Any]:
    """The plain metadata values of the run's materialization of ``key``."""
    asset_key = AssetKey(key) if isinstance(key, list) else AssetKey([key])
    for event in result.get_asset_materialization_events():
        if event.asset_key == asset_key:
            return {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
    raise KeyError(f"run did not materialize {asset_key.to_user_string()}")


def output(result: ExecuteInProcessResult, node: str) -> Any:
    """The value an asset's op returned in this run (held in memory by execute_in_process)."""
    return result.output_for_node(node)
