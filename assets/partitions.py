"""What one day's partition of an append-only ledger means.

A partition is a UTC day D. Its audit reads **the books as they stood at the end of D**: ledger rows
created up to D's last microsecond (``take_snapshot(as_of=...)``), and the failed-deduction window is
the last hour of D. While D is still running (today's partition, the one the daily schedule runs) the
cut-off is "now" (``as_of=None``), which is also the only moment the balance cache can be compared with
the ledger: the cache has no history. Tables without history (users, id mapping, subscriptions, the
balance cache) are read as they are when the run happens.

Why this meaning: the ledger is append-only, so "the ledger as of the end of D" never changes once D is
over; re-running a past partition reproduces its ledger view, and the per-rule finding counts of the
daily runs form a time series (the UI plots them). Today's partition is re-run freely during the day.

Fixes always act on the present (``assets.fixes``): a day's fix run applies the fixes that the day's
audit planned *and* that the current audit still plans, under the same idempotency keys (a period's
grant key is ``subscription_grant:<subscription>:<period start>``), so a backfill over any range of days
and the daily runs can overlap without granting anything twice.
"""

from __future__ import annotations

import os
from datetime import date, datetime, time, timedelta, timezone

from dagster import DailyPartitionsDefinition

# the first day a backfill can reach; the UI lists one partition per day from here to today
PARTITIONS_START = os.environ.get("CREDITS_PARTITIONS_START", "2026-01-01")

# end_offset=1: today's (still running) day is a partition too, so the daily schedule audits the
# present under today's key instead of waiting for the day to end
daily_partitions = DailyPartitionsDefinition(start_date=PARTITIONS_START, timezone="UTC", end_offset=1)


def day_of(partition_key: str) -> date:
    return date.fromisoformat(partition_key)


def day_end(partition_key: str) -> datetime:
    """The last instant of day D (UTC): created_at <= this belongs to D or earlier."""
    start = datetime.combine(day_of(partition_key), time(0), tzinfo=timezone.utc)
    return start + timedelta(days=1) - timedelta(microseconds=1)


def as_of_for(partition_key: str | None, now: datetime | None = None) -> datetime | None:
    """The snapshot cut-off of a partition: the end of its day, or None (now) while the day runs.

    No partition (a run launched without one) also means now.
    """
    if partition_key is None:
        return None
    now = now or datetime.now(timezone.utc)
    end = day_end(partition_key)
    return None if end >= now else end


def partition_key_for(moment: datetime) -> str:
    """The partition (UTC day) a moment falls in."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).date().isoformat()
