"""`credits audit`, `credits monitor`, `credits diagnose`: thin wrappers over checks/.

Exit codes (the contract's): 0 HEALTHY, 1 WARNING, 2 CRITICAL, 3 could not run (database unreachable,
bad arguments, a live plan over the cap). pandas and GE are imported inside the commands that need them;
`monitor` needs neither.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import EXIT_CANNOT_RUN, err, fail, handle_errors, out, print_json

if TYPE_CHECKING:
    from ledger.config import CreditsConfig

STYLE = {"HEALTHY": "bold green", "WARNING": "bold yellow", "CRITICAL": "bold red"}


def _database() -> tuple[str, "CreditsConfig"]:
    """Config and URL, with the schema migrated (an audit on an old schema would misread it)."""
    from ledger import db
    from ledger.config import load_config
    from ledger.migrate import migrate

    config = load_config()
    url = db.resolve_url(config)
    with db.connect(url, autocommit=True) as conn:
        migrate(conn, config)
    return url, config


def _progress(enabled: bool) -> tuple[Any, Any]:
    """A rich progress bar on stderr for the snapshot's reads (only on a terminal)."""
    if not enabled or not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from checks.snapshot import SNAPSHOT_TABLES

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=err, transient=True)
    task = bar.add_task("reading snapshot", total=len(SNAPSHOT_TABLES))

    def step(name: str, rows: int, seconds: float) -> None:
        bar.update(task, advance=1, description=f"read {name} ({rows:,} rows)")

    return bar, step


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def audit(
        live: Annotated[bool, typer.Option("--live", help="Apply the planned fixes (default: dry run, nothing changes)")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print the contract's JSON document on stdout")] = False,
        rule: Annotated[list[str] | None, typer.Option("--rule", help="Only this rule id (repeatable)")] = None,
        max_fixes: Annotated[int | None, typer.Option("--max-fixes", min=0,
                                                      help="Refuse a live run planning more fixes than this "
                                                           "(default: audit.max_fixes in the config, 500)")] = None,
        user: Annotated[list[str] | None, typer.Option("--user", help="Only this user (email or id; repeatable)")] = None,
        markdown: Annotated[bool, typer.Option("--markdown", help="Print the Markdown health report instead")] = False,
    ) -> None:
        """Audit every user against every rule; with --live, apply the safe fixes (capped, recorded)."""
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        from checks.audit import audit_and_fix, select_rules
        from checks.fixes import FixCapExceeded

        rules = select_rules(rule) if rule else None  # bad ids: exit 3 before touching the database
        url, config = _database()
        bar, step = _progress(not json_out)
        try:
            if bar:
                bar.start()
            report = audit_and_fix(url, config, live=live, max_fixes=max_fixes, rules=rules, progress=step,
                                   users=user or None,
                                   on_phase=(lambda msg: err.print(f"[dim]{msg}...[/]")) if not json_out else None)
        except FixCapExceeded as exc:
            if bar:
                bar.stop()
            raise fail(str(exc), EXIT_CANNOT_RUN) from None
        finally:
            if bar:
                bar.stop()
        _emit(report, json_out, markdown)
        raise typer.Exit(report.exit_code)

    @app.command()
    @handle_errors
    def monitor(
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout")] = False,
    ) -> None:
        """Fast health summary (counts only): unfunded paid users, unmapped users, failed deductions, integrity."""
        from ledger import db
        from ledger.config import load_config

        from checks.monitor import monitor as run_monitor

        config = load_config()
        url = db.resolve_url(config)
        report = run_monitor(url, config)
        if json_out:
            print_json(report.to_json())
        else:
            from rich.table import Table

            t = Table(title="credit health (monitor)", title_justify="left", show_edge=False)
            t.add_column("indicator")
            t.add_column("count", justify="right")
            for k, v in report.counts.items():
                t.add_row(k, f"{v:,}", style="red" if v and k in ("paid_unfunded", "integrity_issues",
                                                                  "balance_mismatches", "missing_balance_rows")
                          else "yellow" if v and k in ("unmapped_users", "users_over_threshold") else "")
            out.print(t)
            for p in report.problems:
                out.print(f"- {p}")
            out.print(f"status: [{STYLE[report.status]}]{report.status}[/] ({report.seconds:.2f}s)"
                      + ("   run `credits audit` for the details" if report.problems else ""))
        raise typer.Exit(report.exit_code)

    @app.command()
    @handle_errors
    def diagnose(
        user: Annotated[str, typer.Argument(help="User email, BestAuth id or points (Supabase) id")],
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout")] = False,
    ) -> None:
        """Every check for one user (pass/fail, with the fix to run), including a dry-run deduction."""
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        from checks.diagnose import diagnose as run_diagnose

        url, config = _database()
        dx = run_diagnose(url, config, user)
        if json_out:
            print_json(dx.to_json())
        else:
            from rich.table import Table

            u = dx.user
            out.print(f"[bold]{u.get('email') or '(no BestAuth user)'}[/]  BestAuth {u.get('bestauth_user_id')}  "
                      f"points {u.get('user_id')} (via {u.get('resolved_via')})  tier {u.get('tier')} "
                      f"{u.get('billing_cycle') or ''} {u.get('status') or ''}  balance {u.get('balance')}")
            t = Table(show_edge=False)
            t.add_column("check", no_wrap=True)
            t.add_column("result", no_wrap=True)
            t.add_column("detail", ratio=3)
            t.add_column("fix", ratio=2)
            marks = {"pass": "[green]PASS[/]", "fail": "[red]FAIL[/]", "warn": "[yellow]WARN[/]", "skip": "[dim]skip[/]"}
            for c in dx.checks:
                t.add_row(c.name, marks[c.status], c.detail, c.fix or "")
            from rich.console import Console

            console = out if out.is_terminal and out.width >= 140 else Console(highlight=False, width=160)
            console.print(t)
            out.print(f"status: [{STYLE[dx.status]}]{dx.status}[/]")
        raise typer.Exit(dx.exit_code)


def _emit(report: Any, json_out: bool, markdown: bool) -> None:
    if json_out:
        from checks.report import health_summary

        print_json(health_summary(report))
    elif markdown:
        from checks.report import render_markdown

        sys.stdout.write(render_markdown(report))
    else:
        from checks.report import render_table

        from rich.console import Console

        console = out if out.is_terminal and out.width >= 140 else Console(highlight=False, width=160)
        console.print(render_table(report))
