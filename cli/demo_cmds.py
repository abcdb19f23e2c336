"""`credits seed` (a demo population with planted faults) and `credits demo` (the main job end to end).

The demo never touches the user's own data: it works in a database of its own (``credits_demo`` on
the same server: the embedded one, or $DATABASE_URL's), dropped and recreated on every run. `credits
seed` writes into the normal target but refuses a database that holds users it did not write.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from cli.common import EXIT_CANNOT_RUN, EXIT_OK, err, handle_errors, out, print_json

if TYPE_CHECKING:
    from checks.audit import AuditReport
    from checks.seed import SeedManifest
    from ledger.config import CreditsConfig

DEMO_DATABASE = "credits_demo"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
EXIT_DEMO_FAILED = 1  # the job ran, but did not show what it should (a fault missed, a fix left over)


def _rate(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise typer.BadParameter(f"fault rate must be between 0 and 1, got {value}")
    return value


def _users(value: int) -> int:
    if not 1 <= value <= 10_000_000:
        raise typer.BadParameter(f"users must be between 1 and 10,000,000, got {value}")
    return value


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def seed(
        users: Annotated[int, typer.Option("--users", "-n", help="How many BestAuth users to create",
                                           callback=_users)] = 2000,
        faults: Annotated[float, typer.Option("--faults", help="Share of users drawn with a planted fault "
                                              "(0-1; one user per fault variant is always planted when > 0)",
                                              callback=_rate)] = 0.05,
        seed_value: Annotated[int, typer.Option("--seed", help="Random seed: the same seed, the same population",
                                                min=-(2**40), max=2**40)] = 42,
        reset: Annotated[bool, typer.Option("--reset", help="Drop and recreate the target database first "
                                            "(refused unless it holds only demo data)")] = False,
        bulk: Annotated[bool, typer.Option("--bulk", help="Write the same ledger rows with computed balance_after "
                                           "instead of one add_points/deduct_points call each (large populations)")
                        ] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON")] = False,
    ) -> None:
        """Write a demo population (tiers, periods, grants, generations, renewals, cancellations) with
        planted faults of every audit rule and healthy look-alikes, into an empty database."""
        from checks.seed import reset_database
        from checks.seed import seed as run_seed
        from ledger import db
        from ledger.config import load_config
        from ledger.migrate import migrate

        config = load_config()
        url = db.resolve_url(config)
        if reset:
            reset_database(url, config)
        else:
            with db.connect(url, autocommit=True) as conn:
                migrate(conn, config)
        manifest = run_seed(url, config, users=users, fault_rate=faults, seed=seed_value,
                            mode="bulk" if bulk else "functions")
        if json_out:
            print_json({"database": db.describe_url(url), **manifest.to_json()})
            return
        _print_seed(manifest, db.describe_url(url))
        out.print("Next: [bold]credits audit[/] (dry run), then [bold]credits audit --live[/].")

    @app.command()
    @handle_errors
    def demo(
        users: Annotated[int, typer.Option("--users", "-n", help="Demo population size", callback=_users)] = 2000,
        faults: Annotated[float, typer.Option("--faults", help="Share of users with a planted fault",
                                              callback=_rate)] = 0.05,
        seed_value: Annotated[int, typer.Option("--seed", help="Random seed", min=-(2**40), max=2**40)] = 42,
        database: Annotated[str, typer.Option("--database", help="The demo's own database on the server "
                                              "(dropped and recreated)")] = DEMO_DATABASE,
        max_fixes: Annotated[int | None, typer.Option("--max-fixes", help="Cap on the live fix run "
                                                      "(default: audit.max_fixes from the config)")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON summary instead")] = False,
    ) -> None:
        """The main job end to end on demo data: seed, audit (CRITICAL, and why), fix live, audit again."""
        code = run_demo(users=users, fault_rate=faults, seed=seed_value, database=database, max_fixes=max_fixes,
                        json_out=json_out)
        raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------- demo


def demo_url(config: "CreditsConfig", database: str) -> str:
    """The demo database's URL on the server the other commands use (embedded, or $DATABASE_URL's)."""
    import os

    from ledger import db

    if not database.replace("_", "").isalnum() or database != database.lower():
        raise typer.BadParameter(f"database name must be lower-case letters, digits and underscores: {database!r}")
    base = os.environ.get("DATABASE_URL")
    if base:
        return db.with_database(db.check_url(base), database)
    return db.embedded_url(config, database)


def run_demo(*, users: int, fault_rate: float, seed: int, database: str = DEMO_DATABASE,
             max_fixes: int | None = None, json_out: bool = False) -> int:
    """Seed -> audit -> fix live -> audit again, narrated; returns the exit code (0 = shown as expected)."""
    import os

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    from checks.audit import run_audit
    from checks.fixes import apply_fixes
    from checks.rules import RULES
    from checks.seed import reset_database
    from checks.seed import seed as run_seed
    from ledger import db
    from ledger.config import load_config

    config = load_config()
    started = time.perf_counter()
    say = (lambda *a, **k: None) if json_out else out.print
    url = demo_url(config, database)
    say(f"[bold]credit-recon demo[/]: the reconciliation job end to end on demo data, in database "
        f"[bold]{db.describe_url(url)}[/] (its own; dropped and recreated, your data is not touched)\n")

    t = time.perf_counter()
    reset_database(url, config)
    manifest = run_seed(url, config, users=users, fault_rate=fault_rate, seed=seed)
    seed_s = time.perf_counter() - t
    if not json_out:
        _print_seed(manifest, None, step="1. Seed")

    say(f"\n[bold]2. Audit[/] (dry run: reads one consistent snapshot, runs the {len(RULES)} rules as Great Expectations "
        "suites, plans fixes, writes nothing)")
    t = time.perf_counter()
    before = run_audit(url, config)
    audit1_s = time.perf_counter() - t
    if not json_out:
        _print_audit(before, _emails(url, before), audit1_s, first=True)

    cap = config.audit.max_fixes if max_fixes is None else max_fixes
    say(f"\n[bold]3. Fix[/] live: {len(before.plan)} planned fixes (cap {cap}), each in its own transaction "
        "with a fix-log row; ledger rows are only ever added")
    t = time.perf_counter()
    run = apply_fixes(url, config, before.plan, live=True, max_fixes=cap, actor="credits demo",
                      audit={"rules": list(before.results), "snapshot_at": before.snapshot_at,
                             "status": before.status, "counts": before.counts()})
    fix_s = time.perf_counter() - t
    by_action = Counter(f.planned.action for f in run.fixes if f.applied)
    if not json_out:
        parts = ", ".join(f"{a} {n}" for a, n in by_action.items()) or "nothing"
        out.print(f"   applied {run.applied} ({parts}); {run.failed} failed; run id {run.run_id} "
                  f"[dim]({fix_s:.1f} s)[/]")
        for f in run.fixes:
            if f.error:
                out.print(f"   [red]not applied[/] {f.planned.action} for {f.planned.bestauth_user_id}: {f.error}")

    say("\n[bold]4. Audit again[/]")
    t = time.perf_counter()
    after = run_audit(url, config)
    audit2_s = time.perf_counter() - t
    if not json_out:
        _print_audit(after, _emails(url, after), audit2_s, first=False)
    rerun = apply_fixes(url, config, after.plan, live=True, max_fixes=cap, actor="credits demo (second run)")

    checks = _verify(url, manifest, before, after, run, rerun)
    ok = all(c["ok"] for c in checks)
    total_s = time.perf_counter() - started
    if json_out:
        print_json({"database": db.describe_url(url), "ok": ok, "seconds": round(total_s, 2),
                    "seed": manifest.stats, "planted": {r: len(v) for r, v in manifest.faults.items()},
                    "before": before.to_json() | {"findings": len(before.findings)},
                    "fix_run": {"run_id": run.run_id, "applied": run.applied, "failed": run.failed,
                                "by_action": dict(by_action)},
                    "after": after.to_json() | {"findings": [f.to_json() for f in after.findings]},
                    "checks": checks,
                    "timings": {"seed": round(seed_s, 2), "audit": round(audit1_s, 2), "fix": round(fix_s, 2),
                                "audit_again": round(audit2_s, 2)}})
        return EXIT_OK if ok else EXIT_DEMO_FAILED
    out.print("\n[bold]5. Checked against what the seed planted[/]")
    for c in checks:
        mark = "[green]ok[/]  " if c["ok"] else "[red]FAIL[/]"
        out.print(f"   {mark} {c['check']}: {c['detail']}")
    out.print(f"\n{'[green]Demo complete[/]' if ok else '[red]Demo did not show what it should[/]'} in "
              f"{total_s:.1f} s. Explore it yourself: [bold]DATABASE_URL={_shell_quote(url)} credits audit[/], "
              f"[bold]credits diagnose <email>[/] (e.g. {_example_email(url, manifest)}).")
    return EXIT_OK if ok else EXIT_DEMO_FAILED


def _verify(url: str, manifest: "SeedManifest", before: "AuditReport", after: "AuditReport", run: Any,
            rerun: Any) -> list[dict[str, Any]]:
    """What the demo promises, checked rather than claimed."""
    from ledger import db

    found = {(f.rule, f.bestauth_user_id) for f in before.findings}
    planted = [(rule, uid) for rule, ids in manifest.faults.items() for uid in ids]
    missed = [p for p in planted if p not in found]
    faulted = manifest.faulted
    flagged_healthy = sorted({f.bestauth_user_id for f in before.findings + after.findings
                              if f.bestauth_user_id is not None and f.bestauth_user_id not in faulted})
    fixable_left = [f for f in after.findings if f.fix]
    with db.connect(url, autocommit=True) as conn:
        drift = conn.execute(
            """SELECT count(*) FROM public.points_balances b
                LEFT JOIN (SELECT user_id, sum(amount) AS s FROM public.points_transactions GROUP BY user_id) t
                       ON t.user_id = b.user_id
                WHERE b.balance <> coalesce(t.s, 0)""").fetchone()[0]
    return [
        {"check": "every planted fault found by its rule", "ok": not missed,
         "detail": f"{len(planted) - len(missed)} of {len(planted)}"
                   + (f"; missed: {missed[:5]}" if missed else "")},
        {"check": "no healthy user flagged (look-alikes included)", "ok": not flagged_healthy,
         "detail": f"{len(flagged_healthy)} flagged" + (f": {flagged_healthy[:5]}" if flagged_healthy else "")
                   + f"; {sum(len(v) for v in manifest.healthy_lookalikes.values())} look-alikes"},
        {"check": "after the live run nothing fixable is left", "ok": not fixable_left and run.failed == 0,
         "detail": f"{len(fixable_left)} fixable finding(s) left, {run.failed} fix(es) failed"},
        {"check": "every balance equals its ledger", "ok": drift == 0, "detail": f"{drift} balance(s) differ"},
        {"check": "a second live run applies nothing", "ok": rerun.applied == 0,
         "detail": f"{rerun.applied} applied"},
    ]


# ------------------------------------------------------------------------------------------- output


def _print_seed(manifest: "SeedManifest", where: str | None, step: str = "Seeded") -> None:
    s = manifest.stats
    looks = manifest.healthy_lookalikes
    head = f"[bold]{step}[/]" + (f" {where}" if where else "")
    how = ("through add_points/deduct_points; planted faults past them" if s.get("mode") != "bulk"
           else "bulk: the same rows, balance_after computed")
    out.print(f"{head}: {manifest.users:,} users, {s.get('ledger_rows', 0):,} ledger rows "
              f"({how}), {s.get('failures', 0):,} "
              f"failed attempts "
              f"[dim]({s.get('seconds', 0):.1f} s, seed {s.get('seed')})[/]")
    variants = Counter(manifest.variants.values())
    table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    table.add_column("   planted fault (rule)")
    table.add_column("users", justify="right")
    table.add_column("variants")
    from checks.seed import FAULTS

    for rule in _rule_order():
        ids = manifest.faults.get(rule, [])
        names = [p.variant for p in FAULTS if p.rule == rule]
        table.add_row(f"   {rule}", str(len(ids)), ", ".join(f"{v} {variants.get(v, 0)}" for v in names))
    out.print(table)
    out.print("   healthy look-alikes (must not be flagged): "
              + ", ".join(f"{cat} {len(ids)}" for cat, ids in sorted(looks.items())))


def _rule_order() -> list[str]:
    from checks.seed import RULE_IDS

    try:
        from checks.rules import RULES

        return list(RULES)
    except ImportError:  # pragma: no cover - the audit engine is part of the package
        return list(RULE_IDS)


def _emails(url: str, report: "AuditReport") -> dict[str, str]:
    """Emails of the users the printed examples name (a person recognises an email, not a UUID)."""
    from ledger import db

    ids = sorted({f.bestauth_user_id for res in report.results.values() for f in res.findings[:3]
                  if f.bestauth_user_id})
    if not ids:
        return {}
    with db.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT id::text, email FROM public.bestauth_users WHERE id = ANY(%s::uuid[])",
                            (ids,)).fetchall()
    return dict(rows)


def _print_audit(report: "AuditReport", emails: dict[str, str], seconds: float, *, first: bool) -> None:
    colour = {"HEALTHY": "green", "WARNING": "yellow", "CRITICAL": "red"}[report.status]
    fixable = sum(1 for f in report.findings if f.fix)
    out.print(f"   status [bold {colour}]{report.status}[/]: {len(report.findings)} finding(s) over "
              f"{report.checked_users:,} users, {fixable} with a planned fix [dim]({seconds:.1f} s)[/]")
    table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    table.add_column("   rule")
    table.add_column("severity")
    table.add_column("found", justify="right")
    table.add_column("fix", justify="right")
    table.add_column("why (one example)" if first else "what a person must decide (one example)", overflow="fold")
    for rid, res in report.results.items():
        n = len(res.findings)
        example = _example(res.findings, emails, need_person=not first)
        table.add_row(f"   {rid}", res.rule.severity, str(n), str(sum(1 for f in res.findings if f.fix)),
                      example if n else "[green]holds[/]")
    out.print(table)
    if not first:
        left = [f for f in report.findings if not f.fix]
        if report.status != "HEALTHY" and len(left) == len(report.findings):
            out.print("   Everything left needs a person: ledger history is never rewritten, a spent duplicate "
                      "grant or an implausible balance is a decision, not a fix.")


def _example(findings: list[Any], emails: dict[str, str], *, need_person: bool) -> str:
    pool = [f for f in findings if not f.fix] if need_person else findings
    if not pool:
        pool = findings
    if not pool:
        return ""
    # prefer an example with a planned fix on the first audit (it shows what --live will do)
    f = next((x for x in pool[:3] if x.fix), pool[0]) if not need_person else pool[0]
    who = emails.get(f.bestauth_user_id or "") or (f.bestauth_user_id or f.user_id or "?")[:8] + "…"
    text = f"{who}: expected {_compact(f.expected)}, found {_compact(f.found)}"
    if f.fix:
        text += f" → [bold]{f.fix}[/]"
    elif f.reason:
        text += f" — {f.reason}"
    return text


def _compact(value: Any, limit: int = 70) -> str:
    from checks.findings import plain

    text = json.dumps(plain(value), separators=(",", ":"), default=str)
    text = _UUID.sub(lambda m: m.group(0)[:8] + "…", text)  # a UUID prefix is enough to tell users apart
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _example_email(url: str, manifest: "SeedManifest") -> str:
    from ledger import db

    ids = manifest.faults.get("paid_users_funded") or next(iter(manifest.faults.values()), [])
    if not ids:
        return "an email from bestauth_users"
    with db.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT email FROM public.bestauth_users WHERE id = %s", (ids[0],)).fetchone()
    return row[0] if row else "an email from bestauth_users"


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


__all__ = ["register", "run_demo", "demo_url", "DEMO_DATABASE", "EXIT_CANNOT_RUN"]
