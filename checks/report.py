"""The audit's outputs for people and machines: the contract JSON, a Markdown health report, and the
CLI's tables. Rendering only: every number comes from the AuditReport.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from checks.findings import plain
from checks.rules import RULES

if TYPE_CHECKING:
    from checks.audit import AuditReport
    from checks.findings import Finding

STYLE = {"HEALTHY": "bold green", "WARNING": "bold yellow", "CRITICAL": "bold red"}
MAX_ROWS = 25  # findings listed per rule in human output (the JSON has them all)


def health_summary(report: "AuditReport") -> dict[str, Any]:
    """The contract's JSON document (what `credits audit --json` prints)."""
    return report.to_json()


def compact(value: Any) -> str:
    """k=v text for people: {"cache": {"balance": 460}} -> "cache: balance=460"."""
    value = plain(value)
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if v is None:
                continue
            parts.append(f"{k}: {compact(v)}" if isinstance(v, dict) else f"{k}={compact(v)}")
        return "; ".join(parts) if any(isinstance(v, dict) for v in value.values()) else ", ".join(parts)
    if isinstance(value, list):
        return "[" + ", ".join(compact(v) for v in value) + "]"
    return "-" if value is None else str(value)


def _short(value: Any, width: int = 60) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else compact(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _fix_text(f: "Finding") -> str:
    return f.fix if f.fix else f"needs a person: {f.reason}" if f.reason else "needs a person"


def render_markdown(report: "AuditReport") -> str:
    """A health report a person reads (Dagster materialization, a ticket, an e-mail)."""
    lines = [f"# Credit health: {report.final_status}", ""]
    lines.append(f"Snapshot at {plain(report.snapshot_at)}; {report.checked_users} users checked"
                 + (f"; live run `{report.run_id}`" if report.run_id else "; dry run (nothing changed)") + ".")
    if report.refused:
        lines += ["", f"**Live run refused:** {report.refused}"]
    lines += ["", "| rule | severity | findings | fixable |", "|---|---|---:|---:|"]
    for rid, entry in report.rules_json().items():
        count = entry["count"] if entry.get("evaluated", True) else "not run"
        lines.append(f"| `{rid}` | {entry['severity']} | {count} | {entry.get('fixable', '-')} |")
    if report.fixes:
        applied = sum(1 for f in report.fixes if f.applied)
        failed = [f for f in report.fixes if f.error]
        lines += ["", f"Fixes: {len(report.fixes)} planned, {applied} applied"
                  + (f", {len(failed)} not applied" if failed else "") + ("" if report.live else " (dry run)") + "."]
        for f in failed[:MAX_ROWS]:
            lines.append(f"- `{f.planned.action}` for {f.planned.bestauth_user_id or f.planned.user_id}: {f.error}")
    if report.after is not None:
        lines += ["", f"After the fixes: **{report.after.status}**, "
                  f"{len(report.after.findings)} finding(s) left (each needs a person)."]
    person = [f for f in (report.after.findings if report.after is not None else report.findings) if not f.fix]
    if person:
        lines += ["", "## Needs a person", "", "| rule | user | found | why |", "|---|---|---|---|"]
        for f in person[:MAX_ROWS * 4]:
            lines.append(f"| `{f.rule}` | {f.bestauth_user_id or f.user_id} | {_short(f.found, 50)} | "
                         f"{_short(f.reason, 90)} |")
        if len(person) > MAX_ROWS * 4:
            lines.append(f"| … | {len(person) - MAX_ROWS * 4} more | | |")
    return "\n".join(lines) + "\n"


def render_table(report: "AuditReport") -> Any:
    """The CLI's human output: a rule summary, the findings per rule (bounded), the fixes."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    summary = Table(title="Audit rules", title_justify="left", show_edge=False)
    for col in ("rule", "severity", "checked", "findings", "fixable", "time"):
        summary.add_column(col, justify="right" if col in ("checked", "findings", "fixable", "time") else "left")
    for rid, rule in RULES.items():
        res = report.results.get(rid)
        if res is None:
            summary.add_row(rid, rule.severity, "-", "not run", "-", "-", style="dim")
            continue
        n = len(res.findings)
        style = "" if n == 0 else ("red" if rule.severity == "critical" else "yellow")
        summary.add_row(rid, rule.severity, f"{res.checked:,}", str(n), str(sum(1 for f in res.findings if f.fix)),
                        f"{res.seconds:.2f}s", style=style)
    parts.append(summary)

    for rid, res in report.results.items():
        if not res.findings:
            continue
        t = Table(title=f"{rid} ({len(res.findings)})", title_justify="left", show_edge=False, show_lines=False)
        t.add_column("BestAuth user / points id", no_wrap=True)
        t.add_column("expected", ratio=2)
        t.add_column("found", ratio=3)
        t.add_column("fix", ratio=3)
        for f in res.findings[:MAX_ROWS]:
            who = f.bestauth_user_id or "-"
            if f.user_id and f.user_id != f.bestauth_user_id:
                who += f"\n{f.user_id}"
            t.add_row(who, _short(f.expected, 80), _short(f.found, 120),
                      Text(_fix_text(f)[:160], style="green" if f.fix else "magenta"))
        if len(res.findings) > MAX_ROWS:
            t.add_row(f"… {len(res.findings) - MAX_ROWS} more (see --json)", "", "", "")
        parts.append(t)

    if report.fixes:
        applied = sum(1 for f in report.fixes if f.applied)
        failed = sum(1 for f in report.fixes if f.error)
        by_action: dict[str, list[int]] = {}
        for f in report.fixes:
            c = by_action.setdefault(f.planned.action, [0, 0, 0, 0])
            c[0] += 1
            c[1] += int(f.applied)
            c[2] += int(bool(f.error))
            c[3] += int(not f.applied and not f.error)
        t = Table(title="Fixes" + (f" (live run {report.run_id})" if report.live else " (dry run: nothing changed; "
                                   "add --live to apply)"), title_justify="left", show_edge=False)
        for col in ("action", "planned", "applied", "not applied", "already done"):
            t.add_column(col, justify="left" if col == "action" else "right")
        for action, (n, a, e, s) in by_action.items():
            t.add_row(action, str(n), str(a) if report.live else "-", str(e), str(s) if report.live else "-")
        parts.append(t)
        if report.live:
            parts.append(Text(f"{applied} fix(es) applied, {failed} not applied", style="bold"))
            for f in [f for f in report.fixes if f.error][:MAX_ROWS]:
                parts.append(Text(f"  not applied: {f.planned.action} for "
                                  f"{f.planned.bestauth_user_id or f.planned.user_id}: {f.error}", style="magenta"))
    if report.refused:
        parts.append(Text(f"live run refused: {report.refused}", style="bold red"))
    if report.after is not None:
        parts.append(Text.assemble("after the fixes: ", (report.after.status, STYLE[report.after.status]),
                                   f" ({len(report.after.findings)} finding(s) left, each needs a person)"))
    parts.append(Text.assemble("status: ", (report.final_status, STYLE[report.final_status]),
                               f"   {report.checked_users:,} users, snapshot {plain(report.snapshot_at)}, "
                               f"{report.timings.get('total', 0):.1f}s"))
    return Group(*parts)
