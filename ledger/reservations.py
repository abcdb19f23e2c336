"""Two-phase charges: hold credits for a job, then capture (charge at most the hold) or release.

The SQL functions (sql/003_reservations.sql) do the work; this module validates early, maps the
SQLSTATEs to typed errors and offers ``hold()``, the check-then-generate-then-deduct flow as one
context manager: the credits are held before the work starts (so two jobs cannot spend them twice),
charged only when the caller says the work succeeded, and freed when it raised.

Every call is idempotent per job id, so the module's retry on a lost connection is safe here too.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from psycopg.types.json import Jsonb

from ledger.errors import InsufficientCredits, InvalidArgument, ReservationError
from ledger.ids import check_text, parse_uuid

if TYPE_CHECKING:
    from ledger.service import Ledger, LedgerWrite

log = logging.getLogger(__name__)

MAX_JOB_ID_LENGTH = 480  # the capture's ledger key is 'capture:<job id>', within the 512 of a key
MAX_TTL_SECONDS = 7 * 86_400

_RESERVE_SQL = ("SELECT reservation_id, spendable_after, duplicate "
                "FROM public.reserve_points(%s, %s, %s, %s, %s)")
_CAPTURE_SQL = "SELECT new_balance, transaction_id, duplicate FROM public.capture_reservation(%s, %s)"
_RELEASE_SQL = "SELECT released FROM public.release_reservation(%s)"
_RELEASE_EXPIRED_SQL = "SELECT released, credits FROM public.release_expired_reservations(%s)"


@dataclass(frozen=True)
class Reservation:
    """What reserve_points answered; ``duplicate`` when this job id already held credits."""

    reservation_id: int
    job_id: str
    spendable_after: int
    duplicate: bool


@dataclass(frozen=True)
class ReservationState:
    reservation_id: int
    job_id: str
    user_id: uuid.UUID
    amount: int
    status: str  # active | captured | released | expired
    captured_amount: int | None
    transaction_id: int | None
    created_at: datetime
    expires_at: datetime
    settled_at: datetime | None


@dataclass(frozen=True)
class ExpiredRelease:
    released: int  # holds freed
    credits: int   # credits they held


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_JOB_ID_LENGTH:
        raise InvalidArgument(f"job id must be a string of 1 to {MAX_JOB_ID_LENGTH} characters")
    return check_text(job_id, "job id")


def check_ttl(ttl_seconds: object) -> int | None:
    if ttl_seconds is None:
        return None
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidArgument(f"ttl_seconds must be a whole number from 1 to {MAX_TTL_SECONDS}, got {ttl_seconds!r}")
    return ttl_seconds


class Hold:
    """One job's hold inside ``Ledger.hold()``: call ``capture()`` when the work succeeded."""

    def __init__(self, ledger: "Ledger", user_id: uuid.UUID, amount: int, reservation: Reservation) -> None:
        self.ledger = ledger
        self.user_id = user_id
        self.amount = amount
        self.reservation = reservation
        self.charge: "LedgerWrite | None" = None
        self.released: bool | None = None

    @property
    def job_id(self) -> str:
        return self.reservation.job_id

    @property
    def settled(self) -> bool:
        return self.charge is not None or self.released is not None

    def capture(self, amount: int | None = None) -> "LedgerWrite":
        """Charge the hold (all of it, or ``amount`` <= the hold) and free the rest."""
        self.charge = self.ledger.capture(self.job_id, amount)
        return self.charge

    def release(self) -> bool:
        self.released = self.ledger.release(self.job_id)
        return self.released


class ReservationsMixin:
    """Ledger methods for holds; mixed into ``ledger.service.Ledger``."""

    def reserve(self: "Ledger", user_id: uuid.UUID | str, amount: int, *, job_id: str,
                ttl_seconds: int | None = None, metadata: dict[str, Any] | None = None) -> Reservation:
        """Hold ``amount`` credits for ``job_id`` (idempotent per job id). InsufficientCredits, recorded
        for the audit like a refused deduction, when the user's spendable credits do not cover it."""
        from ledger.service import check_amount

        uid = parse_uuid(user_id)
        amount = check_amount(amount, self.config)
        job = check_job_id(job_id)
        ttl = check_ttl(ttl_seconds)
        try:
            row = self._fetchone(_RESERVE_SQL, (uid, amount, job, ttl, Jsonb(metadata or {})))
        except InsufficientCredits:
            self._record_failure(uid, amount, f"reserve:{job}")
            raise
        return Reservation(int(row[0]), job, int(row[1]), bool(row[2]))

    def capture(self: "Ledger", job_id: str, amount: int | None = None) -> "LedgerWrite":
        """Charge a hold: ``amount`` (default the whole hold, never more) as a generation_deduction.

        ReservationError when the hold was released, expired, or already captured for another amount;
        a repeated capture of the same amount answers with the first ledger row (duplicate=True).
        """
        from ledger.service import LedgerWrite, check_amount

        job = check_job_id(job_id)
        if amount is not None:
            amount = check_amount(amount, self.config)
        row = self._fetchone(_CAPTURE_SQL, (job, amount))
        return LedgerWrite(int(row[0]), int(row[1]), bool(row[2]))

    def release(self: "Ledger", job_id: str) -> bool:
        """Free a hold without charging; False when it was already captured, released or expired."""
        job = check_job_id(job_id)
        return bool(self._fetchone(_RELEASE_SQL, (job,))[0])

    def release_expired(self: "Ledger", user_id: uuid.UUID | str | None = None) -> ExpiredRelease:
        """Free every expired hold (of one user, or all: what the daily pipeline runs)."""
        uid = parse_uuid(user_id) if user_id is not None else None
        released, credits = self._fetchone(_RELEASE_EXPIRED_SQL, (uid,))
        if released:
            log.info("freed %s expired hold(s), %s credits%s", released, credits,
                     f" of user {uid}" if uid else "")
        return ExpiredRelease(int(released), int(credits))

    def reservation(self: "Ledger", job_id: str) -> ReservationState | None:
        job = check_job_id(job_id)
        with self.connection() as conn:
            row = conn.execute(
                """SELECT id, job_id, user_id, amount, status, captured_amount, transaction_id, created_at,
                          expires_at, settled_at
                     FROM public.points_reservations WHERE job_id = %s""", (job,)).fetchone()
        return ReservationState(*row) if row else None

    def spendable(self: "Ledger", user_id: uuid.UUID | str) -> int:
        """Balance minus active holds: what a new charge or hold may use."""
        uid = parse_uuid(user_id)
        with self.connection() as conn:
            row = conn.execute("SELECT balance - reserved FROM public.points_balances WHERE user_id = %s",
                               (uid,)).fetchone()
        return int(row[0]) if row else 0

    @contextmanager
    def hold(self: "Ledger", user_id: uuid.UUID | str, amount: int, job_id: str, *,
             ttl_seconds: int | None = None, metadata: dict[str, Any] | None = None) -> Iterator[Hold]:
        """Check-then-generate-then-deduct as one mechanism::

            with ledger.hold(user_id, cost, job_id) as h:
                result = generate(...)
                h.capture()            # or h.capture(actual_cost), at most ``cost``

        The credits are held on entry (InsufficientCredits if they are not spendable), charged only by
        ``capture()``, and freed when the block raises or ends without a capture. A release that fails
        (say the database is gone) leaves the hold to expire on its own, so it never masks the error.
        """
        uid = parse_uuid(user_id)
        reservation = self.reserve(uid, amount, job_id=job_id, ttl_seconds=ttl_seconds, metadata=metadata)
        h = Hold(self, uid, amount, reservation)
        try:
            yield h
        except BaseException:
            if not h.settled:
                try:
                    h.release()
                except Exception:
                    log.exception("job %s: could not release the hold of user %s; it expires by itself", job_id, uid)
            raise
        if not h.settled:
            log.warning("job %s: hold of user %s left without capture(); released, nothing charged", job_id, uid)
            h.release()


__all__ = ["ExpiredRelease", "Hold", "Reservation", "ReservationError", "ReservationState", "ReservationsMixin",
           "check_job_id", "check_ttl"]
