"""One snapshot asset per table, all read in one consistent moment.

The frames (``checks.snapshot.SNAPSHOT_TABLES``) come from one ``take_snapshot`` call, so they
are one ``multi_asset``: separate assets would be separate transactions, and the rules would compare a
balance read before a write with a ledger read after it. The five tables map to the frames as
``bestauth_users``, ``user_id_mapping``, ``subscriptions`` (subscriptions_consolidated), ``points_balances``,
and the ledger (points_transactions) as two server-side aggregates, ``ledger_by_user`` and
``period_grants``; ``failed_deductions`` reads points_deduction_failures. See ``assets.partitions`` for
what a day's partition reads.
"""

from collections.abc import Iterator
from typing import Any

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetOut,
    MetadataValue,
    Output,
    TableColumn,
    TableSchema,
    multi_asset,
)

from assets.partitions import as_of_for, daily_partitions
from assets.resources import CreditsDatabase
from checks.snapshot import SNAPSHOT_TABLES, Snapshot

SNAPSHOT_PREFIX = "snapshot"
GROUP = "snapshot"

DESCRIPTIONS = {
    "bestauth_users": "BestAuth users (id, email).",
    "user_id_mapping": "BestAuth id -> Supabase (points) id mapping.",
    "subscriptions": "subscriptions_consolidated with the metadata ids validated as UUIDs in SQL.",
    "points_balances": "The balance cache, one row per points user.",
    "ledger_by_user": "points_transactions aggregated per user up to the partition's cut-off: sums, lifetime "
                      "totals, balance_after chain breaks.",
    "period_grants": "Subscription grants (and their reversals) per subscription period, up to the cut-off.",
    "failed_deductions": "Failed deduction attempts per user in the hour before the cut-off.",
    "lots_by_user": "Credit lots per points user up to the cut-off: remaining, lots whose draws disagree, draws no "
                    "lot covered, credits past expiry and held by reservations (lifecycle rules).",
    "refunds": "Refunded deductions: how many refunds each had and for how much, against what it charged.",
    "plan_change_grants": "Recorded upgrades with credits, and the plan_change ledger row found for each.",
}


def snapshot_key(name: str) -> AssetKey:
    return AssetKey([SNAPSHOT_PREFIX, name])


# what downstream assets and checks declare to receive every frame of one partition's snapshot
SNAPSHOT_INS: dict[str, AssetIn] = {name: AssetIn(key=snapshot_key(name)) for name in SNAPSHOT_TABLES}

# which moment a frame belongs to travels with it (DataFrame.attrs survive the IO manager's pickle)
_ATTR = "credit_recon_snapshot"


def _schema(frame: pd.DataFrame) -> TableSchema:
    return TableSchema(columns=[TableColumn(name=str(c), type=str(t)) for c, t in frame.dtypes.items()])


@multi_asset(
    outs={name: AssetOut(key=snapshot_key(name), description=DESCRIPTIONS[name], group_name=GROUP,
                         io_manager_key="io_manager") for name in SNAPSHOT_TABLES},
    partitions_def=daily_partitions,
    compute_kind="postgres",
)
def table_snapshots(context: AssetExecutionContext, database: CreditsDatabase) -> Iterator[Output[Any]]:
    """Every table of the credit database as of the partition's cut-off, in one REPEATABLE READ snapshot."""
    from checks.snapshot import take_snapshot

    as_of = as_of_for(context.partition_key if context.has_partition_key else None)
    url = database.resolve_url()
    snap = take_snapshot(url, as_of=as_of)
    moment = {"taken_at": snap.taken_at, "as_of": snap.as_of}
    context.log.info("snapshot of %s taken at %s, ledger as of %s", database.describe(), snap.taken_at,
                     snap.as_of or "now")
    for name in SNAPSHOT_TABLES:
        frame = snap.table(name)
        frame.attrs[_ATTR] = moment
        yield Output(frame, output_name=name, metadata={
            "dagster/row_count": MetadataValue.int(len(frame)),
            "dagster/column_schema": _schema(frame),
            "read_seconds": MetadataValue.float(round(float(snap.timings.get(name, 0.0)), 3)),
            "taken_at": MetadataValue.text(snap.taken_at.isoformat()),
            "ledger_as_of": MetadataValue.text(snap.as_of.isoformat() if snap.as_of else "now (day not over)"),
        })


def snapshot_from_frames(frames: dict[str, pd.DataFrame]) -> Snapshot:
    """The Snapshot that ``table_snapshots`` read, rebuilt from its stored frames."""
    from checks.snapshot import Snapshot

    moments = {repr(f.attrs.get(_ATTR)) for f in frames.values()}
    first = next(iter(frames.values())).attrs.get(_ATTR)
    if first is None or len(moments) != 1:
        raise ValueError("the snapshot frames do not come from one snapshot (re-materialize the snapshot assets "
                         "of this partition together)")
    return Snapshot(taken_at=first["taken_at"], as_of=first["as_of"], frames=dict(frames))
