"""The credit lifecycle from a terminal: a user's lots and where each credit went (`credits history`),
top-ups, refunds of failed generations, and the expiry sweep.

Thin over ``ledger.lots`` (the SQL functions do the work). `history` reads only: lots whose expiry has
passed but which no operation has written off yet are shown as "due" rather than expired here, so that
looking at a user never changes their ledger (`credits balance` or `credits expire` write it off).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cli.common import EXIT_REFUSED, fail, handle_errors, open_ledger, out, print_json

if TYPE_CHECKING:
    from ledger.lots import Lot

USER = typer.Argument(help="User email, BestAuth id or points (Supabase) id")
DRAWS_SHOWN = 4  # per lot in the table; --json has them all


def _when(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _lot_json(lot: "Lot", rollover_until: datetime | None, now: datetime) -> dict[str, Any]:
    return {"lot_id": lot.id, "source_type": lot.source_type, "granted": lot.granted, "remaining": lot.remaining,
            "expired": lot.expired, "consumed": lot.consumed, "priority": lot.priority,
            "expires_at": lot.expires_at, "expiry_due": _due(lot, now),
            "rollover": {"cap": lot.rollover_cap, "until": rollover_until, "rolled_over": lot.rolled_over,
                         "original_expiry": lot.period_end} if lot.rollover_cap is not None else None,
            "created_at": lot.created_at,
            "draws": [{"transaction_id": d.transaction_id, "transaction_type": d.transaction_type,
                       "amount": d.amount, "created_at": d.created_at, "description": d.description}
                      for d in reversed(lot.draws)]}


def _due(lot: "Lot", now: datetime) -> bool:
    """Past its expiry with credits left: written off at the user's next operation or the daily sweep."""
    return lot.remaining > 0 and lot.expires_at is not None and lot.expires_at <= now


def _expiry_text(lot: "Lot", rollover_until: datetime | None, now: datetime) -> str:
    if lot.expires_at is None:
        return "never"
    text = _when(lot.expires_at) + (" [bold yellow](due)[/]" if _due(lot, now) else "")
    if lot.period_end is not None:
        text += f"\nrolled over {lot.rolled_over} from {_when(lot.period_end)}"
    elif lot.rollover_cap is not None:
        text += f"\nrollover up to {lot.rollover_cap} until {_when(rollover_until)}"
    return text


def _draws_text(lot: "Lot") -> str:
    newest = list(reversed(lot.draws))
    lines = [f"#{d.transaction_id} {d.transaction_type} {'returned ' + str(-d.amount) if d.amount < 0 else d.amount}"
             for d in newest[:DRAWS_SHOWN]]
    if len(newest) > DRAWS_SHOWN:
        lines.append(f"... {len(newest) - DRAWS_SHOWN} more (--json)")
    if lot.consumed and not newest:
        lines.append(f"{lot.consumed} drawn before lots were itemised")
    return "\n".join(lines)


def show_history(user: str, *, limit: int = 20, show_lots: bool = True, json_out: bool = False) -> None:
    """`credits history`: the user's lots (newest first) with what drew on each, then the ledger rows."""
    with open_ledger(migrate=False) as ledger:
        who = ledger.find_user(user)
        rows = ledger.history(who.user_id, limit=limit)
        lots = ledger.lots(who.user_id, limit=200) if show_lots else []
        with ledger.connection() as conn:
            now = conn.execute("SELECT now()").fetchone()[0]
            bal = conn.execute("SELECT balance, reserved, next_expiry FROM public.points_balances WHERE user_id = %s",
                               (who.user_id,)).fetchone()
            until = dict(conn.execute("SELECT id, rollover_until FROM public.points_lots WHERE id = ANY (%s)",
                                      ([lot.id for lot in lots],)).fetchall()) if lots else {}
    balance, reserved, next_expiry = bal if bal else (None, None, None)
    console = out if out.is_terminal and out.width >= 140 else Console(highlight=False, soft_wrap=True, width=160)
    if json_out:
        print_json({"bestauth_user_id": who.bestauth_user_id, "user_id": who.user_id, "balance": balance,
                    "reserved": reserved, "next_expiry": next_expiry,
                    "open_lots_total": sum(lot.remaining for lot in lots),
                    "lots": [_lot_json(lot, until.get(lot.id), now) for lot in lots] if show_lots else None,
                    "transactions": [r.__dict__ for r in rows]})
        return
    if show_lots:
        due = [lot for lot in lots if _due(lot, now)]
        out.print(f"user {who.bestauth_user_id} (points id {who.user_id}, resolved by {who.source}): balance "
                  f"{balance if balance is not None else '(no balance row)'}"
                  + (f", {reserved} held" if reserved else "")
                  + f", open lots {sum(lot.remaining for lot in lots)}"
                  + (f", next expiry {_when(next_expiry)}" if next_expiry else ""))
        if due:
            out.print(f"[yellow]{sum(lot.remaining for lot in due)} credit(s) in {len(due)} lot(s) are past their "
                      "expiry and not yet written off (the next operation or `credits expire` does it)[/]")
        table = Table(title=f"lots of {who.user_id} (spent first: lowest priority, soonest expiry, oldest)",
                      title_justify="left")
        for col in ("lot", "source", "granted", "remaining", "expired", "priority", "expires", "drawn by (newest first)"):
            table.add_column(col, justify="right" if col in ("lot", "granted", "remaining", "expired", "priority")
                             else "left")
        for lot in lots:
            table.add_row(str(lot.id), lot.source_type, str(lot.granted), str(lot.remaining), str(lot.expired),
                          str(lot.priority), _expiry_text(lot, until.get(lot.id), now), _draws_text(lot))
        console.print(table)
    table = Table(title=f"ledger of {who.user_id}", title_justify="left")
    for col in ("id", "when", "type", "amount", "balance after", "description"):
        table.add_column(col, justify="right" if col in ("id", "amount", "balance after") else "left")
    for r in rows:
        table.add_row(str(r.id), _when(r.created_at), r.transaction_type, f"{r.amount:+d}", str(r.balance_after),
                      r.description or "")
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("top-up")
    @handle_errors
    def top_up(
        user: Annotated[str, USER],
        pack: Annotated[str, typer.Argument(help="Top-up pack name from credits.toml [top_ups.<name>]")],
        payment_id: Annotated[str, typer.Option("--payment-id", help="The payment's id: the grant's key is "
                                                "top_up:<payment id>, so a retry grants once")],
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """Grant a configured top-up pack (a `top_up` lot with the pack's expiry and priority)."""
        with open_ledger() as ledger:
            ledger.config.top_up_pack(pack)  # an unknown pack names the known ones, before any lookup
            who = ledger.find_user(user)
            write = ledger.top_up(who.user_id, pack, payment_id=payment_id, metadata={"via": "credits top-up"})
            credits = ledger.config.top_ups[pack].credits
        if json_out:
            print_json({"bestauth_user_id": who.bestauth_user_id, "user_id": who.user_id, "pack": pack,
                        "amount": credits, "new_balance": write.new_balance, "transaction_id": write.transaction_id,
                        "duplicate": write.duplicate})
            return
        note = " (payment already granted: nothing written, first result shown)" if write.duplicate else ""
        out.print(f"topped up {credits} credits ({pack}) for {who.user_id}: balance {write.new_balance}, "
                  f"lot {write.transaction_id}{note}")

    @app.command()
    @handle_errors
    def refund(
        transaction_id: Annotated[int, typer.Argument(min=1, help="The deduction's ledger row id "
                                                      "(see `credits history`)")],
        amount: Annotated[int | None, typer.Option("--amount", min=1, help="Credits to return "
                                                   "(default: all it charged)")] = None,
        reason: Annotated[str | None, typer.Option("--reason", "-r", help="Description of the refund row")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """Return a failed generation's credits to the lots it drew on (once per deduction, at most what it
        charged; refused with exit 4 otherwise)."""
        from ledger.errors import RefundRefused

        with open_ledger() as ledger:
            try:
                result = ledger.refund_generation(transaction_id, amount, description=reason)
            except RefundRefused as exc:
                raise fail(f"refund refused: {exc}", EXIT_REFUSED) from None
        if json_out:
            print_json({"refund_of": transaction_id, "refunded": result.refunded, "new_balance": result.new_balance,
                        "transaction_id": result.transaction_id, "duplicate": result.duplicate})
            return
        note = " (already refunded: nothing written, first result shown)" if result.duplicate else ""
        out.print(f"refunded {result.refunded} credits of transaction {transaction_id}: balance {result.new_balance}, "
                  f"refund row {result.transaction_id}{note}")

    @app.command()
    @handle_errors
    def expire(
        user: Annotated[str | None, typer.Option("--user", help="Only this user (email or id); default: the "
                                                  "sweep over every user with credits due")] = None,
        batch: Annotated[int, typer.Option("--batch", min=1, max=100_000, help="Users per transaction")] = 1000,
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """Write off expired credits (rolling over what the tier's policy keeps) as `expiry` rows. Safe to
        repeat: what is already written off is not written again. The daily pipeline runs the sweep."""
        with open_ledger() as ledger:
            if user is not None:
                who = ledger.find_user(user)
                result = ledger.expire_lots(who.user_id)
                users = 1 if (result.lots or result.credits) else 0
            else:
                users, result = ledger.expire_due_lots(batch=batch)
        if json_out:
            print_json({"user_id": who.user_id if user is not None else None, "users": users, "lots": result.lots,
                        "credits": result.credits, "rolled_over": result.rolled_over})
            return
        scope = f"for {who.user_id}" if user is not None else f"over {users} user(s)"
        out.print(f"expired {result.credits} credit(s) in {result.lots} lot(s) {scope}; "
                  f"{result.rolled_over} rolled over")
