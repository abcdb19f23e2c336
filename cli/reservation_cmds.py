"""`credits holds ...`: list a user's holds and free expired ones (what the daily pipeline does)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.common import handle_errors, open_ledger, out, print_json


def register(app: typer.Typer) -> None:
    holds = typer.Typer(help="Reservations (credits held for running jobs).", no_args_is_help=True)
    app.add_typer(holds, name="holds")

    @holds.command("list")
    @handle_errors
    def list_holds(
        user: Annotated[str, typer.Argument(help="User email, BestAuth id or points (Supabase) id")],
        active: Annotated[bool, typer.Option("--active", help="Only holds still counted against the user")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """A user's holds, newest first, with their status."""
        with open_ledger(migrate=False) as ledger:
            who = ledger.find_user(user)
            spendable = ledger.spendable(who.user_id)
            with ledger.connection() as conn:
                rows = conn.execute(
                    """SELECT job_id, amount, status, captured_amount, created_at, expires_at,
                              status = 'active' AND expires_at <= now() AS stale
                         FROM public.points_reservations
                        WHERE user_id = %s AND (NOT %s OR status = 'active')
                        ORDER BY id DESC LIMIT 200""", (who.user_id, active)).fetchall()
        if json_out:
            print_json({"user_id": who.user_id, "spendable": spendable, "holds": [
                {"job_id": r[0], "amount": r[1], "status": r[2], "captured_amount": r[3], "created_at": r[4],
                 "expires_at": r[5], "stale": r[6]} for r in rows]})
            return
        table = Table(title=f"holds of {who.user_id} (spendable {spendable})")
        for col in ("job", "amount", "status", "captured", "expires"):
            table.add_column(col, justify="right" if col in ("amount", "captured") else "left")
        for job, amount, status, captured, _created, expires, stale in rows:
            table.add_row(job, str(amount), status + (" (stale)" if stale else ""),
                          "" if captured is None else str(captured), expires.strftime("%Y-%m-%d %H:%M:%S"))
        out.print(table)

    @holds.command("release-expired")
    @handle_errors
    def release_expired(
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """Free every hold past its expiry (safe to run any time, from cron or the daily job)."""
        with open_ledger(migrate=False) as ledger:
            result = ledger.release_expired()
        if json_out:
            print_json({"released": result.released, "credits": result.credits})
            return
        out.print(f"freed {result.released} expired hold(s), {result.credits} credits")
