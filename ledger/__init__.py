"""credit-recon's ledger module: the app's live credit operations over the SQL ledger functions.

Imports no Dagster, GE or pandas, so services can import it cheaply.
"""

from ledger.config import CreditsConfig, load_config
from ledger.errors import (
    AmbiguousUser,
    ConfigError,
    CreditError,
    DatabaseUnavailable,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    LedgerImmutable,
    RefundRefused,
    ReservationError,
    SubscriptionGrantError,
    UnknownUser,
)
from ledger.lots import Draw, Expiry, Lot, Refund
from ledger.reservations import ExpiredRelease, Hold, Reservation, ReservationState
from ledger.service import Balance, GenerationCharge, GenerationCheck, Ledger, LedgerWrite, Resolution, Transaction
from ledger.subscriptions import SubscriptionEvent, SubscriptionEventResult, handle_subscription_event

__all__ = [
    "AmbiguousUser", "Balance", "ConfigError", "CreditError", "CreditsConfig", "DatabaseUnavailable", "ExpiredRelease",
    "Hold", "Reservation", "ReservationState",
    "GenerationCharge", "GenerationCheck", "IdempotencyConflict", "InsufficientCredits", "InvalidAmount",
    "InvalidArgument", "Ledger", "LedgerImmutable", "LedgerWrite", "Resolution", "ReservationError",
    "SubscriptionEvent", "SubscriptionEventResult", "SubscriptionGrantError", "Transaction", "UnknownUser",
    "handle_subscription_event", "load_config", "Draw", "Expiry", "Lot", "Refund", "RefundRefused",
]
