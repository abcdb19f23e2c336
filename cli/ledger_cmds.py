"""Support operations: migrate, grant, deduct, balance, history."""

from __future__ import annotations

import uuid
from typing import Annotated

import typer

from cli.common import handle_errors, open_ledger, out, print_json

USER = typer.Argument(help="User email, BestAuth id or points (Supabase) id")


def _amount(value: str) -> int:
    """Whole positive credits; typer's int parsing would accept '1e3'-like surprises poorly."""
    text = value.strip().replace("_", "")
    if not text.isdigit():
        raise typer.BadParameter(f"amount must be a positive whole number of credits, got {value!r}")
    return int(text)


# `credits grant x -5` would otherwise be read as an unknown option "-5"; passed through, it reaches
# _amount, which says what is wrong with it.
_NEGATIVE_AMOUNTS = {"ignore_unknown_options": True}


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def migrate(
        supabase: Annotated[bool, typer.Option(
            "--supabase", help="Also enable row-level security for a Supabase database (sql/optional/supabase_rls.sql)"
        )] = False,
    ) -> None:
        """Apply the SQL migrations in sql/ (safe to repeat, also concurrently)."""
        from ledger import db
        from ledger.config import load_config
        from ledger.migrate import migrate as run

        config = load_config()
        url = db.resolve_url(config)
        with db.connect(url, autocommit=True) as conn:
            applied = run(conn, config)
            if supabase:
                from ledger.migrate import apply_supabase_rls

                apply_supabase_rls(conn, config)
        out.print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else "; up to date")
                  + f" on {db.describe_url(url)}" + ("; row-level security for Supabase in place" if supabase else ""))

    @app.command(context_settings=_NEGATIVE_AMOUNTS)
    @handle_errors
    def grant(
        user: Annotated[str, USER],
        amount: Annotated[str, typer.Argument(help="Credits to add (positive whole number)")],
        reason: Annotated[str, typer.Option("--reason", "-r", help="Description stored with the ledger row")] = "support grant",
        key: Annotated[str | None, typer.Option("--key", help="Idempotency key (default: a new random key)")] = None,
        transaction_type: Annotated[str, typer.Option("--type", help="Transaction type")] = "adjustment",
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """Add credits to a user (an adjustment row in the ledger)."""
        credits = _amount(amount)
        with open_ledger() as ledger:
            who = ledger.find_user(user)
            write = ledger.grant(who.user_id, credits, idempotency_key=key or f"support:{uuid.uuid4()}",
                                 transaction_type=transaction_type, description=reason,
                                 metadata={"via": "credits grant"})
        _report("granted", credits, who, write, json_out)

    @app.command(context_settings=_NEGATIVE_AMOUNTS)
    @handle_errors
    def deduct(
        user: Annotated[str, USER],
        amount: Annotated[str, typer.Argument(help="Credits to take (positive whole number)")],
        reason: Annotated[str, typer.Option("--reason", "-r", help="Description stored with the ledger row")] = "support deduction",
        key: Annotated[str | None, typer.Option("--key", help="Idempotency key (default: a new random key)")] = None,
        transaction_type: Annotated[str, typer.Option("--type", help="Transaction type")] = "adjustment",
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """Take credits from a user; refused (exit 4) when the balance does not cover it."""
        credits = _amount(amount)
        with open_ledger() as ledger:
            who = ledger.find_user(user)
            write = ledger.deduct(who.user_id, credits, idempotency_key=key or f"support:{uuid.uuid4()}",
                                  transaction_type=transaction_type, description=reason,
                                  metadata={"via": "credits deduct"})
        _report("deducted", credits, who, write, json_out)

    @app.command()
    @handle_errors
    def balance(
        user: Annotated[str, USER],
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """Show a user's balance and lifetime totals."""
        with open_ledger(migrate=False) as ledger:
            who = ledger.find_user(user)
            bal = ledger.balance(who.user_id)
        if json_out:
            print_json({"bestauth_user_id": who.bestauth_user_id, "user_id": bal.user_id, "balance": bal.balance,
                        "lifetime_earned": bal.lifetime_earned, "lifetime_spent": bal.lifetime_spent,
                        "updated_at": bal.updated_at})
            return
        out.print(f"user {who.bestauth_user_id} (points id {bal.user_id}, resolved by {who.source})")
        out.print(f"balance {bal.balance}   earned {bal.lifetime_earned}   spent {bal.lifetime_spent}")

    @app.command()
    @handle_errors
    def history(
        user: Annotated[str, USER],
        limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=10_000, help="Rows to show")] = 20,
        lots: Annotated[bool, typer.Option("--lots/--no-lots", help="Show the user's lots and what drew on them")] = True,
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """Show a user's lots (expiry, priority, what drew on each) and ledger rows, newest first."""
        from cli.lifecycle_cmds import show_history

        show_history(user, limit=limit, show_lots=lots, json_out=json_out)


def _report(verb: str, credits: int, who, write, json_out: bool) -> None:  # type: ignore[no-untyped-def]
    if json_out:
        print_json({"bestauth_user_id": who.bestauth_user_id, "user_id": who.user_id, "amount": credits,
                    "new_balance": write.new_balance, "transaction_id": write.transaction_id,
                    "duplicate": write.duplicate})
        return
    note = " (duplicate key: nothing written, first result shown)" if write.duplicate else ""
    out.print(f"{verb} {credits} credits for {who.user_id}: balance {write.new_balance}, "
              f"transaction {write.transaction_id}{note}")
