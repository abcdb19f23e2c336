"""Credits as lots: the terms a grant's lot gets (expiry, priority, rollover), and the lot operations.

The database keeps lots right on every write path (sql/011_credit_lots.sql: a trigger on the ledger;
a lot's id is the id of the ledger row that granted it);
this module only decides the *terms* of a grant from the configuration -- when a period's credits expire
and how many may roll over -- and offers the lot-aware operations to Python callers (top-ups, refunds of
failed generations, expiry, a user's lots and what consumed them).

The terms travel in the ledger row's own metadata (``metadata.lot``), so every grant carries in the ledger
what its lot was promised, whoever wrote it (webhook, audit fix, support).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from psycopg.rows import dict_row

from ledger.errors import ConfigError, InvalidArgument
from ledger.ids import check_text, parse_uuid

if TYPE_CHECKING:
    from ledger.config import CreditsConfig
    from ledger.service import Ledger, LedgerWrite

log = logging.getLogger(__name__)


def period_lot_terms(config: "CreditsConfig", tier: str, period_start: datetime,
                     period_end: datetime) -> dict[str, Any]:
    """The lot terms of a subscription period's credits under the tier's rollover policy.

    - "unlimited": no expiry (the credits stay until spent);
    - "none": they expire at the period's end;
    - N: they expire at the period's end, except up to N credits (over all of the period's lots) that
      roll over and expire at the end of the next period (one period later; never rolled again).
    """
    policy = config.rollover(tier)
    terms: dict[str, Any] = {"priority": config.lifecycle.grant_priority}
    if policy == "unlimited":
        return terms
    terms["expires_at"] = period_end.isoformat()
    if isinstance(policy, int) and policy > 0:
        terms["rollover_cap"] = policy
        terms["rollover_until"] = (period_end + (period_end - period_start)).isoformat()
    return terms


def top_up_terms(config: "CreditsConfig", pack: str, purchased_at: datetime) -> dict[str, Any]:
    cfg = config.top_up_pack(pack)
    terms: dict[str, Any] = {"priority": cfg.priority}
    if cfg.expiry_days is not None:
        terms["expires_at"] = (purchased_at + timedelta(days=cfg.expiry_days)).isoformat()
    return terms


# ------------------------------------------------------------------------------------ Ledger methods

MAX_PAYMENT_ID_LENGTH = 400  # the key is 'top_up:<payment id>', within a key's 512 characters


@dataclass(frozen=True)
class Draw:
    """One ledger row's draw on a lot (amount < 0: credits a refund returned to it)."""

    transaction_id: int
    transaction_type: str
    amount: int
    created_at: datetime
    description: str | None


@dataclass(frozen=True)
class Lot:
    id: int
    transaction_id: int  # the granting ledger row (the same number as the lot's id)
    source_type: str
    granted: int
    remaining: int
    expired: int
    priority: int
    expires_at: datetime | None
    period_end: datetime | None  # the expiry it was granted with, once a rollover moved it
    rollover_cap: int | None
    rolled_over: int | None
    created_at: datetime
    draws: list[Draw] = field(default_factory=list)

    @property
    def consumed(self) -> int:
        return self.granted - self.remaining - self.expired


@dataclass(frozen=True)
class Expiry:
    lots: int
    credits: int
    rolled_over: int


@dataclass(frozen=True)
class Refund:
    new_balance: int
    transaction_id: int
    duplicate: bool
    refunded: int


def check_payment_id(payment_id: object) -> str:
    if not isinstance(payment_id, str) or not 0 < len(payment_id) <= MAX_PAYMENT_ID_LENGTH:
        raise InvalidArgument(f"payment id must be a string of 1 to {MAX_PAYMENT_ID_LENGTH} characters")
    return check_text(payment_id, "payment id")


class LotsMixin:
    """Lot-aware operations; mixed into ``ledger.service.Ledger``."""

    def top_up(self: "Ledger", user_id: uuid.UUID | str, pack: str, *, payment_id: str,
               purchased_at: datetime | None = None, metadata: dict[str, Any] | None = None) -> "LedgerWrite":
        """Grant a configured top-up pack as a ``top_up`` lot under ``top_up:<payment id>`` (a retried
        payment webhook grants once). Its expiry counts from ``purchased_at`` (default: now)."""
        cfg = self.config.top_up_pack(pack)
        pay = check_payment_id(payment_id)
        when = purchased_at or datetime.now(timezone.utc)
        if when.tzinfo is None:
            raise InvalidArgument("purchased_at must be timezone-aware")
        meta = {**(metadata or {}), "pack": pack, "price_id": cfg.price_id, "payment_id": pay,
                "purchased_at": when.isoformat(), "lot": top_up_terms(self.config, pack, when)}
        return self.grant(user_id, cfg.credits, idempotency_key=f"top_up:{pay}", transaction_type="top_up",
                          description=f"top-up pack {pack} ({cfg.credits} credits)", metadata=meta)

    def top_up_by_price(self: "Ledger", user_id: uuid.UUID | str, price_id: str, *, payment_id: str,
                        purchased_at: datetime | None = None) -> "LedgerWrite":
        """The same, for a payment webhook that names the price rather than the pack."""
        for name, cfg in self.config.top_ups.items():
            if cfg.price_id == price_id:
                return self.top_up(user_id, name, payment_id=payment_id, purchased_at=purchased_at)
        raise ConfigError(f"no top-up pack has price id {price_id!r}")

    def refund_generation(self: "Ledger", transaction_id: int, amount: int | None = None, *,
                          description: str | None = None) -> Refund:
        """Return a failed generation's credits to the lots it drew from: once per deduction, never more
        than it charged (CR008 -> RefundRefused). A retry of the same refund answers duplicate=True."""
        from ledger.service import check_amount

        if isinstance(transaction_id, bool) or not isinstance(transaction_id, int) or transaction_id <= 0:
            raise InvalidArgument("transaction id must be a positive whole number")
        if amount is not None:
            amount = check_amount(amount, self.config)
        if description is not None:
            check_text(description, "description")
        row = self._fetchone("SELECT new_balance, transaction_id, duplicate, refunded "
                             "FROM public.refund_generation(%s, %s, %s)", (transaction_id, amount, description))
        return Refund(int(row[0]), int(row[1]), bool(row[2]), int(row[3]))

    def expire_lots(self: "Ledger", user_id: uuid.UUID | str) -> Expiry:
        """Write off the user's expired credits now (every ledger operation also does it first)."""
        row = self._fetchone("SELECT lots, credits, rolled_over FROM public.expire_lots(%s)", (parse_uuid(user_id),))
        return Expiry(int(row[0]), int(row[1]), int(row[2]))

    def expire_due_lots(self: "Ledger", batch: int = 1000, max_batches: int | None = None) -> tuple[int, Expiry]:
        """The daily sweep: every user's expired lots, ``batch`` users per transaction until none is left.
        Returns (users, totals)."""
        users = lots = credits = rolled = 0
        done = 0
        while max_batches is None or done < max_batches:
            row = self._fetchone("SELECT users, lots, credits, rolled_over FROM public.expire_due_lots(%s)", (batch,))
            done += 1
            users, lots, credits, rolled = users + row[0], lots + row[1], credits + row[2], rolled + row[3]
            if row[0] < batch:
                break
        if users:
            log.info("expired %s credits in %s lot(s) of %s user(s); %s rolled over", credits, lots, users, rolled)
        return users, Expiry(lots, credits, rolled)

    def spendable(self: "Ledger", user_id: uuid.UUID | str) -> int:
        """Balance minus active holds, after the user's expired credits are written off."""
        uid = parse_uuid(user_id)
        row = self._fetchone("SELECT spendable FROM public.current_balance(%s)", (uid,))
        return int(row[0]) if row else 0

    def lots(self: "Ledger", user_id: uuid.UUID | str, *, open_only: bool = False, limit: int = 200) -> list[Lot]:
        """A user's lots, newest first, each with the ledger rows that drew on it (where each credit went)."""
        uid = parse_uuid(user_id)
        if not isinstance(limit, int) or not 0 < limit <= 10_000:
            raise InvalidArgument("limit must be between 1 and 10000")
        with self.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            lots = cur.execute(
                """SELECT id, id AS transaction_id, source_type, granted, remaining, expired, priority, expires_at,
                          period_end, rollover_cap, rolled_over, created_at
                     FROM public.points_lots WHERE user_id = %s AND (remaining > 0 OR NOT %s)
                    ORDER BY id DESC LIMIT %s""", (uid, open_only, limit)).fetchall()
            draws = cur.execute(
                """SELECT k.lot_id, k.transaction_id, t.transaction_type, k.amount, k.created_at, t.description
                     FROM public.points_lot_draws k
                     JOIN public.points_transactions t ON t.id = k.transaction_id
                    WHERE k.user_id = %s AND k.lot_id = ANY (%s)  -- user_id: the ledger half by its index
                    ORDER BY k.transaction_id""", (uid, [lot["id"] for lot in lots])).fetchall()
        by_lot: dict[int, list[Draw]] = {}
        for d in draws:
            by_lot.setdefault(d["lot_id"], []).append(Draw(d["transaction_id"], d["transaction_type"], d["amount"],
                                                           d["created_at"], d["description"]))
        return [Lot(**lot, draws=by_lot.get(lot["id"], [])) for lot in lots]


__all__ = ["Draw", "Expiry", "Lot", "LotsMixin", "Refund", "period_lot_terms", "top_up_terms"]
