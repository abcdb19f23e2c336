"""Lots throughput: deductions by users with 50 open lots against users with a single open lot.

Issue 6 asks that a deduction drawing from many lots (a user with 50 open lots, mixed priorities and
expiries, so that draws sometimes cross lots) stays at >= 0.8x the single-lot deduction throughput, in
the same run. Both workloads are the same pgbench script -- one ``deduct_points`` call of 1..30 credits
for a random user, one round trip -- with the same clients and duration, on the same server; only the
users differ. The order alternates each round and the medians are compared.

    .venv/bin/python -m benchmarks.lots_throughput                       # 3 rounds x 2 workloads x 20 s
    .venv/bin/python -m benchmarks.lots_throughput --duration 10 --rounds 2

Without $DATABASE_URL (or --url) a throw-away embedded PostgreSQL starts in a temporary folder; with
one, a scratch database is created on that server and dropped afterwards (benchmarks.ledger_throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import psycopg

from benchmarks.ledger_throughput import (
    _DONE,
    _FAILED,
    _TPS,
    RESULTS_DIR,
    UID_SQL,
    RunResult,
    Target,
    _percentiles,
    _ratio_line,
    round_ratios,
    scratch_database,
)
from ledger.config import CreditsConfig
from ledger.migrate import SQL_DIR, migrate

WORKLOADS = ("single_lot", "many_lots")
LOTS = 50          # open lots per many-lot user, restored before every run
LOT_CREDITS = 20   # per lot: a 1..30 deduction crosses into the next lot often
MAX_DEDUCTION = 30
BACKSTOP_PRIORITY = 1000  # the many-lot users' 51st lot, drawn only once the 50 are empty

# Users 1..U hold one lot each; users U+1..2U hold LOTS lots each (pgbench addresses them by number).
SCRIPT = f"""\\set n random(:lo, :hi)
\\set amount random(1, :max_deduction)
\\set seq :seq + 1
SELECT * FROM public.deduct_points({UID_SQL}, :amount, 'generation_deduction', 'bench', 'bench:' || :run || ':' || :client_id || ':' || :seq);
"""


def prepare(target: Target, users: int, config: CreditsConfig, sql_dir: Path = SQL_DIR) -> dict[str, str]:
    """Migrate; one never-expiring lot per single-lot user, big enough for every run (one grant of the
    per-operation maximum); the many-lot users get a backstop lot here and their 50 lots from ``refill``."""
    with psycopg.connect(target.url, autocommit=True) as conn:
        migrate(conn, config, sql_dir=sql_dir)
        conn.execute(
            f"""SELECT count(*) FROM generate_series(1, %(users)s) n,
                   LATERAL public.add_points({UID_SQL.replace(':n', 'n')}, %(amount)s, 'adjustment',
                                             'bench single lot', 'bench-single:' || n) f""",
            {"users": users, "amount": config.limits.max_operation_amount})
        # the many-lot users' backstop: spent last (priority 1000), so a run never fails for want of credits
        # however many of the 50 lots it empties (refill restores them before the next run)
        conn.execute(
            f"""SELECT count(*) FROM generate_series(%(lo)s::int, %(hi)s::int) n,
                   LATERAL public.add_points({UID_SQL.replace(':n', 'n')}, %(amount)s, 'adjustment',
                                             'bench backstop', 'bench-backstop:' || n, '{{}}'::jsonb, NULL,
                                             {BACKSTOP_PRIORITY}) f""",
            {"lo": users + 1, "hi": 2 * users, "amount": config.limits.max_operation_amount})
        return dict(conn.execute(
            """SELECT name, setting || coalesce(unit, '') FROM pg_settings
                WHERE name IN ('server_version', 'max_connections', 'shared_buffers', 'fsync',
                               'synchronous_commit', 'wal_level', 'max_wal_size', 'jit')""").fetchall())


def refill(target: Target, users: int, tag: str) -> int:
    """Bring every many-lot user back to LOTS open lots: LOT_CREDITS each, priority 10/50/90 and an expiry
    in 1..90 days or none, at random (set in SQL with a fixed seed per refill), so that the consumption
    order (priority, soonest expiry, oldest) differs from the grant order. Returns the lots written."""
    with psycopg.connect(target.url, autocommit=True) as conn:
        conn.execute("SELECT setseed(%s)", (random.Random(tag).random() * 2 - 1,))
        return conn.execute(
            f"""WITH need AS (
                    SELECT n, {UID_SQL.replace(':n', 'n')} AS uid FROM generate_series(%(lo)s::int, %(hi)s::int) n
                ), missing AS (
                    SELECT need.n, need.uid, %(lots)s::int - (SELECT count(*) FROM public.points_lots l
                                                     WHERE l.user_id = need.uid AND l.remaining > 0
                                                       AND l.priority < {BACKSTOP_PRIORITY}) AS k
                      FROM need
                ), terms AS (
                    SELECT m.n, m.uid, g,
                           (ARRAY[10, 50, 90])[1 + floor(random() * 3)::int] AS priority,
                           CASE WHEN random() < 0.25 THEN NULL
                                ELSE now() + make_interval(days => 1 + floor(random() * 90)::int) END AS expires_at
                      FROM missing m, generate_series(1, m.k) g
                )
                SELECT count(*) FROM terms t,
                       LATERAL public.add_points(t.uid, %(credits)s, 'adjustment', 'bench lot',
                                                 'bench-lot:' || %(tag)s || ':' || t.n || ':' || t.g, '{{}}'::jsonb,
                                                 t.expires_at, t.priority) f""",
            {"lo": users + 1, "hi": 2 * users, "lots": LOTS, "credits": LOT_CREDITS, "tag": tag}).fetchone()[0]


def settle(target: Target) -> None:
    with psycopg.connect(target.url, autocommit=True) as conn:
        conn.execute("VACUUM public.points_balances, public.points_transactions, public.points_lots, "
                     "public.points_lot_consumptions")
        conn.execute("CHECKPOINT")


def run(target: Target, workload: str, rnd: int, args: argparse.Namespace, workdir: Path, run_tag: str,
        duration: int | None = None, label: str = "") -> RunResult:
    """One pgbench run of ``duration`` seconds (default --duration); ``label`` tells a warm-up apart
    (its own log folder and idempotency keys)."""
    duration = duration or args.duration
    logdir = workdir / f"{workload}-r{rnd}{label}"
    logdir.mkdir()
    script = workdir / "deduct.sql"
    script.write_text(SCRIPT)
    lo, hi = (1, args.users) if workload == "single_lot" else (args.users + 1, 2 * args.users)
    cmd = [str(target.pgbench), "-n", "-c", str(args.clients), "-j", str(args.threads), "-T", str(duration),
           "-M", args.protocol, "-l", "--log-prefix", str(logdir / "tx"), "-f", str(script),
           "-D", f"lo={lo}", "-D", f"hi={hi}", "-D", f"max_deduction={args.max_deduction}",
           "-D", f"run={run_tag}{rnd}{workload[0]}{label}", "-D", "seq=0",
           target.pgbench_conninfo]
    proc = subprocess.run(cmd, env=target.env, capture_output=True, text=True)
    out = proc.stdout
    if proc.returncode != 0 or not _TPS.search(out):
        raise RuntimeError(f"pgbench {workload} failed (exit {proc.returncode}):\n{out}\n{proc.stderr[-4000:]}")
    latencies: list[float] = []
    for path in logdir.iterdir():
        with path.open() as fh:
            latencies.extend(float(line.split()[2]) for line in fh)
    failed = _FAILED.search(out)
    return RunResult(workload, rnd, float(_TPS.search(out).group(1)), int(_DONE.search(out).group(1)),  # type: ignore[union-attr]
                     int(failed.group(1)) if failed else 0, float(duration), _percentiles(latencies))


def verify(target: Target, users: int, counted: int) -> dict[str, object]:
    """Exactly the counted deductions were written; for every user balance = ledger sum = open lots;
    no draw went uncovered; and how the many-lot deductions drew (one lot or several)."""
    with psycopg.connect(target.url, autocommit=True) as conn:
        rows = conn.execute("SELECT count(*) FROM public.points_transactions WHERE idempotency_key LIKE 'bench:%'"
                            ).fetchone()[0]
        unbalanced = conn.execute(
            """SELECT count(*) FROM public.points_balances b
                 LEFT JOIN (SELECT user_id, sum(amount) s FROM public.points_transactions GROUP BY user_id) t
                   USING (user_id)
                 LEFT JOIN (SELECT user_id, sum(remaining) r FROM public.points_lots GROUP BY user_id) l
                   USING (user_id)
                WHERE b.balance IS DISTINCT FROM t.s OR b.balance IS DISTINCT FROM l.r
                   OR b.balance <> b.lifetime_earned - b.lifetime_spent""").fetchone()[0]
        uncovered = conn.execute("SELECT count(*) FROM public.points_lot_draws WHERE lot_id IS NULL").fetchone()[0]
        lo = f"{UID_SQL.replace(':n', '%(lo)s')}"
        spread = conn.execute(
            f"""SELECT count(*) FILTER (WHERE lots = 1), count(*) FILTER (WHERE lots > 1), coalesce(max(lots), 0)
                  FROM (SELECT d.transaction_id, count(*) AS lots FROM public.points_lot_draws d
                          JOIN public.points_transactions t ON t.id = d.transaction_id
                         WHERE t.idempotency_key LIKE 'bench:%%' AND d.user_id >= {lo}
                         GROUP BY d.transaction_id) x""", {"lo": users + 1}).fetchone()
        open_lots = conn.execute(
            f"""SELECT round(avg(k), 1) FROM (SELECT count(*) FILTER (WHERE remaining > 0 AND priority < {BACKSTOP_PRIORITY}) AS k
                                                FROM public.points_lots WHERE user_id >= {lo} GROUP BY user_id) x""",
            {"lo": users + 1}).fetchone()[0]
    return {"ledger_rows": int(rows), "counted": counted, "unbalanced_users": int(unbalanced),
            "uncovered_draws": int(uncovered), "many_lot_deductions_one_lot": int(spread[0]),
            "many_lot_deductions_crossing_lots": int(spread[1]), "most_lots_in_one_deduction": int(spread[2]),
            "many_lot_users_open_lots_at_end": float(open_lots or 0)}


def summarize(results: list[RunResult]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for w in WORKLOADS:
        mine = [r for r in results if r.workload == w]
        if mine:
            out[w] = {"tps": round(statistics.median(r.tps for r in mine), 1)}
            for k in ("p50", "p99"):
                vals = [r.latency_ms[k] for r in mine if k in r.latency_ms]
                if vals:
                    out[w][f"{k}_ms"] = round(statistics.median(vals), 3)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lots_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=20, help="seconds per run (default 20)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent pgbench clients (default 8)")
    ap.add_argument("--threads", type=int, default=2, help="pgbench worker threads (default 2)")
    ap.add_argument("--users", type=int, default=5000,
                    help="users per workload (default 5000: a run empties only a fraction of each many-lot "
                         "user's 50 lots)")
    ap.add_argument("--max-deduction", type=int, default=MAX_DEDUCTION,
                    help=f"deductions are 1..N credits (default {MAX_DEDUCTION}; lots hold {LOT_CREDITS})")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median per workload is reported (default 3)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="seconds of the same workload, untimed, between the CHECKPOINT and each timed run "
                         "(default 0: timed from the checkpoint, when every first write of a page is a "
                         "full-page image)")
    ap.add_argument("--protocol", choices=("simple", "extended", "prepared"), default="prepared",
                    help="pgbench query protocol (default prepared, like psycopg)")
    ap.add_argument("--url", default=None, help="server to use (default $DATABASE_URL, else a temporary embedded one)")
    ap.add_argument("--json", dest="json_path", default=None,
                    help="write results here (default benchmarks/results/lots_throughput-<time>.json)")
    ap.add_argument("--no-json", action="store_true", help="do not write a JSON file")
    args = ap.parse_args(argv)
    for name in ("duration", "clients", "threads", "users", "rounds", "max_deduction"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be 0 or more seconds")
    args.threads = min(args.threads, args.clients)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = CreditsConfig()  # the documented defaults, whatever credits.toml says
    run_tag = str(random.randint(10**5, 10**6 - 1))
    results: list[RunResult] = []
    refilled: list[int] = []
    warmed: list[int] = []  # deductions of the untimed warm-ups (checked with the rest)
    started = datetime.now(timezone.utc)
    with scratch_database(args.url or os.environ.get("DATABASE_URL")) as target, \
            tempfile.TemporaryDirectory(prefix="credit-recon-pgbench-") as tmp:
        print(f"preparing {target.where}: migrate, {args.users} single-lot users, {args.users} users with "
              f"{LOTS} lots", file=sys.stderr)
        server = prepare(target, args.users, config)
        for rnd in range(1, args.rounds + 1):
            for w in (WORKLOADS if rnd % 2 else tuple(reversed(WORKLOADS))):  # alternate to cancel drift
                if w == "many_lots":
                    refilled.append(refill(target, args.users, f"{run_tag}:{rnd}"))
                settle(target)
                if args.warmup:
                    warmed.append(run(target, w, rnd, args, Path(tmp), run_tag, duration=args.warmup,
                                      label="w").transactions)
                r = run(target, w, rnd, args, Path(tmp), run_tag)
                results.append(r)
                print(f"round {rnd} {w:<11} {r.tps:9.1f} tps  {r.transactions} tx  "
                      f"p50 {r.latency_ms.get('p50', float('nan')):.2f} ms  "
                      f"p99 {r.latency_ms.get('p99', float('nan')):.2f} ms  failed {r.failed}",
                      file=sys.stderr, flush=True)
        checked = verify(target, args.users, sum(r.transactions for r in results) + sum(warmed))
    summary = summarize(results)
    ratio = round(summary["many_lots"]["tps"] / summary["single_lot"]["tps"], 3)
    meta: dict[str, object] = {
        "started_at": started.isoformat(timespec="seconds"), "host": platform.node(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "server": server, "verify": checked, "lots_refilled": refilled,
        "command": " ".join(["python -m benchmarks.lots_throughput", *(argv if argv is not None else sys.argv[1:])]),
    }
    print()
    print(f"lots throughput: {args.clients} clients, {args.duration}s per run, {args.rounds} round(s), "
          f"{args.users} users per workload, deductions of 1..{args.max_deduction}, many-lot users refilled to {LOTS} "
          f"lots of {LOT_CREDITS} before each run, "
          f"{f'{args.warmup}s untimed warm-up after each checkpoint, ' if args.warmup else 'timed from a checkpoint, '}"
          f"PostgreSQL {server['server_version']}, {meta['cpus']} CPUs")
    print(f"{'workload':<12}" + "".join(f"{'round ' + str(i + 1):>12}" for i in range(args.rounds))
          + f"{'median tps':>12}{'p50 ms':>9}{'p99 ms':>9}")
    for w, s in summary.items():
        per = [r.tps for r in sorted((r for r in results if r.workload == w), key=lambda r: r.round)]
        print(f"{w:<12}" + "".join(f"{t:>12.1f}" for t in per) + f"{s['tps']:>12.1f}"
              f"{s.get('p50_ms', float('nan')):>9.2f}{s.get('p99_ms', float('nan')):>9.2f}")
    print()
    per_round = round_ratios(results, "many_lots", "single_lot")
    print(_ratio_line("many_lots / single_lot ", ratio, per_round, "target >= 0.8x"))
    print(f"many-lot deductions: {checked['many_lot_deductions_crossing_lots']} crossed lots (up to "
          f"{checked['most_lots_in_one_deduction']} in one), {checked['many_lot_deductions_one_lot']} drew one lot; "
          f"{checked['many_lot_users_open_lots_at_end']} open lots per many-lot user at the end")
    print(f"check: {checked['ledger_rows']} bench ledger rows for {checked['counted']} counted deductions, "
          f"{checked['unbalanced_users']} users whose balance differs from their ledger or their open lots, "
          f"{checked['uncovered_draws']} uncovered draws")
    doc = {"meta": meta, "args": vars(args), "summary": summary, "ratio_many_vs_single": ratio,
           "ratio_many_vs_single_per_round": per_round,
           "runs": [asdict(r) for r in results]}
    if not args.no_json:
        path = Path(args.json_path) if args.json_path else \
            RESULTS_DIR / f"lots_throughput-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {path}", file=sys.stderr)
    bad = (checked["ledger_rows"] != checked["counted"] or checked["unbalanced_users"] != 0
           or checked["uncovered_draws"] != 0)
    if bad:
        print("VERIFY FAILED: ledger rows, balances or lots do not match what the runs counted", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
