"""Great Expectations 1.x, the fluent path, reduced to what an audit needs.

There is no maintained GE-1.x bridge for Dagster (dagster-ge pins GE < 1), so this is ours: one
ephemeral context per process, one pandas data asset per suite, and the validation result reduced to
counts plus the positions of the failing rows (so rules turn exactly those rows into findings, and
Dagster metadata gets a bounded sample of ids, never a million-row payload).

GE is imported here, lazily, and nowhere else: ``import great_expectations`` costs seconds.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SAMPLE_IDS = 20  # failing ids kept per expectation in the summary

_lock = threading.Lock()
_context: Any = None
_assets: dict[str, Any] = {}


def gx():  # type: ignore[no-untyped-def]
    """The great_expectations module, imported on first use with analytics off."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations

    # GE fingerprints every in-memory batch (pandas.util.hash_pandas_object over all of it) just to
    # label the batch; on a million-row frame that was more than half of the validation time. The
    # fingerprint is a marker only: no validation reads it. Batches under this size still get one.
    from great_expectations.execution_engine import pandas_execution_engine

    pandas_execution_engine.HASH_THRESHOLD = min(getattr(pandas_execution_engine, "HASH_THRESHOLD", 0), 10_000_000)
    if not log.isEnabledFor(logging.DEBUG):  # GE pins some loggers to INFO; its chatter is not ours
        for name in ("great_expectations", "great_expectations.data_context.types.base"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return great_expectations


def expectations():  # type: ignore[no-untyped-def]
    """``great_expectations.expectations`` (the Expect* classes rules build their suites from)."""
    gx()
    import great_expectations.expectations as gxe

    return gxe


def _batch_definition(suite_name: str) -> Any:
    global _context
    if _context is None:
        ge = gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        _context = ge.get_context(mode="ephemeral")
        try:  # no tqdm bars on stderr from inside a CLI or a Dagster run
            _context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        except Exception:  # pragma: no cover - older context layouts
            log.debug("could not switch GE progress bars off", exc_info=True)
        _context.data_sources.add_pandas("credit_recon")
    if suite_name not in _assets:
        source = _context.data_sources.get("credit_recon")
        asset = source.add_dataframe_asset(suite_name)
        _assets[suite_name] = asset.add_batch_definition_whole_dataframe(f"{suite_name}_whole")
    return _assets[suite_name]


def _drop_batch_data(batch: Any) -> None:
    """GE's execution engine caches every batch's DataFrame it loaded; an audit validates each frame
    once, so the cache only holds memory (hundreds of MB at a million users)."""
    try:
        manager = batch.data.execution_engine.batch_manager
        manager.batch_data_cache.clear()
        manager.reset_batch_cache()
    except Exception:  # pragma: no cover - internals moved in another GE version: only memory is lost
        log.debug("could not clear GE's batch cache", exc_info=True)


def _forget(suite_name: str) -> None:
    asset_def = _assets.pop(suite_name, None)
    if asset_def is None or _context is None:
        return
    try:
        _context.data_sources.get("credit_recon").delete_asset(suite_name)
    except Exception:  # pragma: no cover - a GE version without delete_asset: keep going
        log.debug("could not delete GE asset %s", suite_name, exc_info=True)


@dataclass
class ExpectationOutcome:
    expectation: str  # e.g. expect_column_values_to_not_be_null
    kwargs: dict[str, Any]
    success: bool
    element_count: int
    unexpected_count: int
    unexpected_rows: list[int]  # row positions in the validated frame
    exception: str | None = None

    def summary(self, sample: "list[Any]") -> dict[str, Any]:
        return {"expectation": self.expectation, "kwargs": self.kwargs, "success": self.success,
                "element_count": self.element_count, "unexpected_count": self.unexpected_count,
                "sample_ids": sample, **({"exception": self.exception} if self.exception else {})}


@dataclass
class GxOutcome:
    suite_name: str
    success: bool
    checked: int
    results: list[ExpectationOutcome] = field(default_factory=list)
    sample_ids: dict[str, list[Any]] = field(default_factory=dict)

    def unexpected_rows(self) -> list[int]:
        """Positions of every row any expectation failed, in frame order, once each."""
        rows: set[int] = set()
        for r in self.results:
            rows.update(r.unexpected_rows)
        return sorted(rows)

    def failed_by_row(self) -> dict[int, list[str]]:
        """Row position -> the expectations that row failed."""
        out: dict[int, list[str]] = {}
        for r in self.results:
            for pos in r.unexpected_rows:
                out.setdefault(pos, []).append(r.expectation)
        return out

    def to_summary(self) -> dict[str, Any]:
        """The bounded, JSON-able summary kept on RuleResult.gx (and in Dagster metadata)."""
        return {"suite": self.suite_name, "success": self.success, "checked": self.checked,
                "expectations": [r.summary(self.sample_ids.get(str(i), []))
                                 for i, r in enumerate(self.results)]}


def _plain_kwargs(config: Any) -> dict[str, Any]:
    raw = dict(getattr(config, "kwargs", {}) or {})
    return {k: v for k, v in raw.items() if k not in ("batch_id", "result_format") and v is not None}


def validate(frame: "pd.DataFrame", suite_name: str, expectations: list, id_columns: list[str]) -> GxOutcome:
    """Validate ``frame`` against a suite of GE expectations; failing rows come back as positions.

    The frame is re-indexed 0..n-1 so GE's unexpected index list is a list of positions; ids for the
    bounded samples are read from ``id_columns`` at those positions.
    """
    ge = gx()
    frame = frame.reset_index(drop=True)
    if frame.empty:  # GE refuses nothing on an empty frame, but spare the machinery
        return GxOutcome(suite_name, True, 0, [ExpectationOutcome(type(e).__name__, {}, True, 0, 0, [])
                                               for e in expectations])
    with _lock:  # the ephemeral context is not thread-safe; validations are CPU-bound anyway
        batch_def = _batch_definition(suite_name)
        suite = ge.ExpectationSuite(name=suite_name, expectations=list(expectations))
        batch = batch_def.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
        _drop_batch_data(batch)
        del batch
        _forget(suite_name)  # GE's asset keeps the last batch (the whole frame) alive otherwise
    outcome = GxOutcome(suite_name, bool(result.success), len(frame))
    for i, res in enumerate(result.results):
        info = res.result or {}
        exc = None
        if res.exception_info and res.exception_info.get("raised_exception"):
            exc = str(res.exception_info.get("exception_message"))[:500]
        positions = [int(p) for p in (info.get("unexpected_index_list") or [])]
        count = int(info.get("unexpected_count") or len(positions))
        outcome.results.append(ExpectationOutcome(
            expectation=res.expectation_config.type, kwargs=_plain_kwargs(res.expectation_config),
            success=bool(res.success) and exc is None, element_count=int(info.get("element_count") or len(frame)),
            unexpected_count=count, unexpected_rows=positions, exception=exc))
        if exc:
            outcome.success = False
            log.error("GE expectation %s in suite %s raised: %s", res.expectation_config.type, suite_name, exc)
        if positions and id_columns:
            sample = frame.iloc[positions[:SAMPLE_IDS]][id_columns]
            outcome.sample_ids[str(i)] = [
                (str(v[0]) if len(id_columns) == 1 else [str(x) for x in v])
                for v in sample.itertuples(index=False, name=None)]
    return outcome
