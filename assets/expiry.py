"""The daily expiry sweep as an asset: every lot past its expiry written off (or rolled over) as `expiry` rows.

Why a pipeline step when every operation already expires a user's lots lazily: a user who does nothing
keeps showing credits that have expired in their balance row, and the audit (``expiry_applied``) would
flag them every day. The sweep runs before the daily audit so the audit reads a ledger with every due
expiry written.

A day's partition records *when* the sweep ran, not what it reads: expiry acts on the present (what is
due now), so re-running or backfilling a past day writes only what is due at that moment, and a second
run right after the first writes nothing (``expire_lots`` is idempotent per lot).
Same code as `credits expire`: ``Ledger.expire_due_lots`` -> ``public.expire_due_lots`` in batches.
"""

import time
from typing import Any

from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset
from pydantic import Field

from assets.partitions import daily_partitions
from assets.resources import CreditsDatabase

GROUP = "lifecycle"


class ExpireCreditsConfig(Config):
    """Run options of the expiry sweep (the same as `credits expire --batch`)."""

    batch: int = Field(default=1000, ge=1, le=100_000, description="Users per transaction (row locks held "
                                                                    "for one batch at a time).")
    max_batches: int | None = Field(default=None, ge=1, description="Stop after this many batches (default: "
                                                                    "until nothing is due).")


@asset(partitions_def=daily_partitions, group_name=GROUP, compute_kind="postgres")
def expired_credits(context: AssetExecutionContext, config: ExpireCreditsConfig,
                    database: CreditsDatabase) -> Output[dict[str, Any]]:
    """Credits written off because their lot expired (and credits kept by a rollover), for every user with
    something due when the run starts. Changes the ledger: only `expiry` rows, each once per lot."""
    from ledger.service import Ledger

    url = database.resolve_url()
    started = time.monotonic()
    with Ledger.connect(url, database.credits_config(), migrate=False, max_size=2) as ledger:
        users, totals = ledger.expire_due_lots(batch=config.batch, max_batches=config.max_batches)
        with ledger.connection() as conn:
            # what is still due: rows another transaction held locked (SKIP LOCKED), or a max_batches stop
            still_due = conn.execute("SELECT count(*) FROM public.points_balances WHERE next_expiry <= now()"
                                     ).fetchone()[0]
            next_due = conn.execute("SELECT min(next_expiry) FROM public.points_balances WHERE next_expiry > now()"
                                    ).fetchone()[0]
    seconds = time.monotonic() - started
    context.log.info("expired %d credit(s) in %d lot(s) of %d user(s), %d rolled over, in %.2fs on %s; "
                     "%d user(s) still due", totals.credits, totals.lots, users, totals.rolled_over, seconds,
                     database.describe(), still_due)
    value = {"users": users, "lots": totals.lots, "credits": totals.credits, "rolled_over": totals.rolled_over,
             "still_due_users": int(still_due), "next_expiry": next_due.isoformat() if next_due else None}
    return Output(value, metadata={
        "users": MetadataValue.int(users),
        "lots": MetadataValue.int(totals.lots),
        "credits_expired": MetadataValue.int(totals.credits),
        "credits_rolled_over": MetadataValue.int(totals.rolled_over),
        "still_due_users": MetadataValue.int(int(still_due)),
        "next_expiry": MetadataValue.text(next_due.isoformat() if next_due else "none"),
        "seconds": MetadataValue.float(round(seconds, 3)),
    })


__all__ = ["ExpireCreditsConfig", "expired_credits"]
