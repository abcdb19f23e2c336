"""Typed errors the app can catch, and the mapping from the ledger functions' SQLSTATEs.

The SQL functions raise class-``CR`` SQLSTATEs so any language can tell a refusal from a
fault; Python callers get the matching exception instead of a raw driver error.
"""

from __future__ import annotations

import json
from typing import Any


class CreditError(Exception):
    """Base of every error credit-recon raises on purpose."""


class InsufficientCredits(CreditError):
    """The user's spendable credits do not cover the amount; nothing was written."""

    def __init__(self, message: str, *, user_id: str | None = None, balance: int | None = None,
                 requested: int | None = None) -> None:
        super().__init__(message)
        self.user_id = user_id
        self.balance = balance
        self.requested = requested


class IdempotencyConflict(CreditError):
    """An idempotency key was reused for a different write: a caller bug, never a duplicate."""


class InvalidAmount(CreditError, ValueError):
    """Amount missing, not positive, not whole, or above the per-operation maximum."""


class InvalidArgument(CreditError, ValueError):
    """A malformed id, email, key or an unknown transaction type."""


class UnknownUser(CreditError, LookupError):
    """No such BestAuth user (by id or email) or points user."""


class ConfigError(CreditError):
    """The configuration file is missing a key, has a bad value, or lacks a tier."""


class DatabaseUnavailable(CreditError):
    """The database could not be reached; the message names host and database, never a password."""


class LedgerImmutable(CreditError):
    """Something tried to UPDATE or DELETE a ledger row."""


class ReservationError(CreditError):
    """A reservation could not be captured or released (unknown, expired, already settled)."""


class SubscriptionGrantError(CreditError):
    """A subscription event could not be turned into its period's grant."""


class RefundRefused(CreditError):
    """A refund that is not allowed: not a generation's deduction, more than it charged, or a second one."""


class AmbiguousUser(CreditError):
    """Evidence for a user's id conflicts; a person must decide."""


_BY_SQLSTATE: dict[str, type[CreditError]] = {
    "CR001": InsufficientCredits,
    "CR002": IdempotencyConflict,
    "CR003": InvalidAmount,
    "CR004": InvalidArgument,
    "CR005": ReservationError,
    "CR006": UnknownUser,
    "CR008": RefundRefused,
    "CR010": LedgerImmutable,
    "22P02": InvalidArgument,  # invalid text representation (e.g. a malformed uuid)
    "22P05": InvalidArgument,  # untranslatable character (e.g. \u0000 in a jsonb string)
    "22021": InvalidArgument,  # character not in repertoire (invalid UTF-8)
    "23514": InvalidArgument,  # check violation: a value the table refuses (e.g. a description over 1,000 chars)
}


def translate(exc: Exception) -> Exception:
    """Return the typed error for a driver exception, or the exception itself."""
    sqlstate = getattr(exc, "sqlstate", None)
    cls = _BY_SQLSTATE.get(sqlstate or "")
    if cls is None:
        return exc
    diag = getattr(exc, "diag", None)
    message = (getattr(diag, "message_primary", None) or str(exc)).strip()
    if cls is InsufficientCredits:
        detail: dict[str, Any] = {}
        try:
            detail = json.loads(getattr(diag, "message_detail", None) or "{}")
        except ValueError:
            pass
        err: CreditError = InsufficientCredits(
            message, user_id=detail.get("user_id"), balance=detail.get("spendable"), requested=detail.get("requested")
        )
    else:
        err = cls(message)
    err.__cause__ = exc
    return err
