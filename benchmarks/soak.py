"""Soak: 16 clients mixing grants, deductions and holds on a skewed set of users, then an audit.

Not a test: a load run that reports throughput, p50/p99 latency per operation and refusals (counted
apart from errors) -- next to a baseline taken first in the same run on the same server (the same
clients doing plain deductions on uniform, well-funded users) -- then checks that nothing was lost or
doubled:

- every balance = sum(ledger) = earned - spent, >= 0; reserved = active holds; the balance_after chain;
  one row per key (SQL, over every user);
- the audit's integrity rules (checks.audit.run_audit: ledger_integrity, duplicate_grants, and
  stale_reservations when the audit has it) find nothing;
- credits are conserved: per user, the balance equals the opening grant plus what the clients were told
  they granted, minus what they were told they deducted or captured.

    .venv/bin/python -m benchmarks.soak                       # 16 clients, 30 s, throw-away embedded server
    .venv/bin/python -m benchmarks.soak --duration 120 --clients 32 --users 1000

Without $DATABASE_URL (or --url) a throw-away embedded PostgreSQL starts in a temporary folder; with
one, a scratch database is created on that server and dropped afterwards. Exit code 0 when the
verification is clean, 1 when it found anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import psycopg  # noqa: E402

from benchmarks.ledger_throughput import RESULTS_DIR, scratch_database  # noqa: E402
from ledger import InsufficientCredits, Ledger, ReservationError  # noqa: E402
from ledger.config import CreditsConfig  # noqa: E402
from ledger.migrate import migrate  # noqa: E402

OPENING_BALANCE = 500
OPS = ("grant", "deduct", "reserve", "capture", "release")

_INTEGRITY_SQL = """
WITH l AS (
    SELECT t.user_id, sum(t.amount) AS s, count(*) FILTER (WHERE t.balance_after <> t.running) AS breaks
      FROM (SELECT x.user_id, x.amount, x.balance_after,
                   sum(x.amount) OVER (PARTITION BY x.user_id ORDER BY x.id) AS running
              FROM public.points_transactions x) t
     GROUP BY t.user_id
), h AS (
    SELECT r.user_id, sum(r.amount) AS held FROM public.points_reservations r WHERE r.status = 'active'
     GROUP BY r.user_id
)
SELECT count(*) FILTER (WHERE coalesce(b.balance, 0) <> coalesce(l.s, 0))                          AS balance_ne_ledger,
       count(*) FILTER (WHERE coalesce(b.balance, 0) <> b.lifetime_earned - b.lifetime_spent)      AS balance_ne_totals,
       count(*) FILTER (WHERE b.balance < 0 OR b.reserved > b.balance)                              AS negative_spendable,
       count(*) FILTER (WHERE coalesce(b.reserved, 0) <> coalesce(h.held, 0))                       AS reserved_ne_holds,
       coalesce(sum(l.breaks), 0)                                                                   AS chain_breaks,
       (SELECT count(*) FROM (SELECT 1 FROM public.points_transactions
                               GROUP BY idempotency_key HAVING count(*) > 1) d)                     AS duplicate_keys
  FROM public.points_balances b FULL JOIN l ON l.user_id = b.user_id FULL JOIN h ON h.user_id = coalesce(b.user_id, l.user_id)
"""


@dataclass
class ClientStats:
    latencies_us: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outcomes: Counter = field(default_factory=Counter)          # (op, ok|refused|error)
    net: Counter = field(default_factory=Counter)               # user index -> credits the client was told moved
    errors: list[str] = field(default_factory=list)


def pick_user(rnd: random.Random, users: int, hot: int, hot_share: float) -> int:
    """A skewed choice: ``hot_share`` of all operations land on the first ``hot`` users."""
    if hot and rnd.random() < hot_share:
        return rnd.randrange(hot)
    return rnd.randrange(users)


@dataclass(frozen=True)
class Phase:
    name: str
    mix: dict[str, int]   # weights of grant, deduct, reserve, settle
    hot: int
    hot_share: float


def client(n: int, ledger: Ledger, user_ids: list[uuid.UUID], args: argparse.Namespace, phase: Phase,
           stop: threading.Event, stats: ClientStats) -> None:
    rnd = random.Random(args.seed * 1000 + n)
    held: list[tuple[str, int, int]] = []  # (job id, user index, amount) this client holds
    seq = 0
    weights = [phase.mix[o] for o in ("grant", "deduct", "reserve", "settle")]
    while not stop.is_set():
        seq += 1
        op = rnd.choices(("grant", "deduct", "reserve", "settle"), weights)[0]
        if op == "settle":
            if not held:
                op = "reserve"
            else:
                op = "capture" if rnd.random() < 0.7 else "release"
        u = pick_user(rnd, len(user_ids), phase.hot, phase.hot_share)
        key = f"{phase.name}:{n}:{seq}"
        t0 = time.perf_counter_ns()
        outcome = "ok"
        try:
            if op == "grant":
                amount = rnd.randint(1, 50)
                ledger.grant(user_ids[u], amount, idempotency_key=key, transaction_type="refund")
                stats.net[u] += amount
            elif op == "deduct":
                amount = rnd.randint(1, 20)
                ledger.deduct(user_ids[u], amount, idempotency_key=key)
                stats.net[u] -= amount
            elif op == "reserve":
                amount = rnd.randint(5, 40)
                ledger.reserve(user_ids[u], amount, job_id=key, ttl_seconds=args.ttl)
                held.append((key, u, amount))
            else:
                job, hu, amount = held.pop(rnd.randrange(len(held)))
                if op == "capture":
                    charge = rnd.randint(1, amount)
                    ledger.capture(job, charge)
                    stats.net[hu] -= charge
                else:
                    ledger.release(job)
        except (InsufficientCredits, ReservationError):
            outcome = "refused"
        except Exception as exc:  # counted and shown; the verification decides whether money moved wrongly
            outcome = "error"
            if len(stats.errors) < 20:
                stats.errors.append(f"{op}: {type(exc).__name__}: {exc}")
        stats.latencies_us[op].append((time.perf_counter_ns() - t0) / 1000.0)
        stats.outcomes[(op, outcome)] += 1


def run_phase(ledger: Ledger, user_ids: list[uuid.UUID], args: argparse.Namespace, phase: Phase,
              duration: float) -> tuple[list[ClientStats], float]:
    stats = [ClientStats() for _ in range(args.clients)]
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(n, ledger, user_ids, args, phase, stop, stats[n]))
               for n in range(args.clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join()
    return stats, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0  # ms


def verify(url: str, config: CreditsConfig, user_ids: list[uuid.UUID], net: Counter) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(_INTEGRITY_SQL)
        sql_checks = dict(zip([d.name for d in cur.description], (int(v) for v in cur.fetchone())))
        balances = dict(conn.execute("SELECT user_id, balance FROM public.points_balances WHERE user_id = ANY (%s)",
                                     (user_ids,)).fetchall())
        stale = conn.execute("SELECT count(*) FROM public.stale_reservations").fetchone()[0]
        rows = conn.execute("SELECT count(*) FROM public.points_transactions").fetchone()[0]
    conservation = sum(1 for i, u in enumerate(user_ids) if balances.get(u, 0) != OPENING_BALANCE + net[i])
    audit: dict[str, Any]
    try:
        from checks.audit import run_audit
        from checks.rules import RULES

        rules = [r for r in ("ledger_integrity", "duplicate_grants", "stale_reservations") if r in RULES]
        t0 = time.perf_counter()
        report = run_audit(url, config, rules=rules)
        audit = {"rules": rules, "findings": len(report.findings), "status": report.status,
                 "seconds": round(time.perf_counter() - t0, 2),
                 "sample": [f.to_json() for f in report.findings[:5]]}
    except ImportError as exc:  # the audit engine is optional for this script; the SQL checks are not
        audit = {"rules": [], "findings": None, "status": f"not run ({exc})"}
    problems = sum(sql_checks.values()) + conservation + (audit["findings"] or 0)
    return {"sql": sql_checks, "conservation_mismatches": conservation, "stale_holds": int(stale),
            "ledger_rows": int(rows), "audit": audit, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    ap.add_argument("--clients", type=int, default=16, help="client threads (default 16)")
    ap.add_argument("--users", type=int, default=200, help="points users (default 200)")
    ap.add_argument("--hot", type=int, default=4, help="very hot users (default 4)")
    ap.add_argument("--hot-share", type=float, default=0.5, help="share of operations on the hot users (0.5)")
    ap.add_argument("--ttl", type=int, default=3600, help="hold TTL in seconds (default 3600)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--url", default=os.environ.get("DATABASE_URL"), help="server to create a scratch db on")
    ap.add_argument("--baseline", type=float, default=10.0,
                    help="seconds of the same-run baseline first: deductions only, uniform users that cannot run "
                         "out (0 = none; default 10)")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/soak-*.json")
    args = ap.parse_args(argv)
    # grant 20%, deduct 40%, reserve 20%, settle (capture 70% / release 30% of a held job) 20%
    soak = Phase("soak", {"grant": 20, "deduct": 40, "reserve": 20, "settle": 20}, args.hot, args.hot_share)
    baseline = Phase("baseline", {"grant": 0, "deduct": 100, "reserve": 0, "settle": 0}, 0, 0.0)

    # refusals are part of the load (counted below), not news; retries and errors still show
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not record.getMessage().startswith("deduction refused"))

    config = CreditsConfig()
    with scratch_database(args.url) as target:
        with psycopg.connect(target.url, autocommit=True) as conn:
            migrate(conn, config)
        user_ids = [uuid.uuid4() for _ in range(args.users)]
        base_ids = [uuid.uuid4() for _ in range(args.users)]
        base_stats: list[ClientStats] = []
        with Ledger.connect(target.url, config, migrate=False, max_size=args.clients) as ledger:
            for i, u in enumerate(user_ids):
                ledger.grant(u, OPENING_BALANCE, idempotency_key=f"soak-open:{i}", transaction_type="subscription_grant")
            if args.baseline > 0:
                for i, u in enumerate(base_ids):
                    ledger.grant(u, config.limits.max_operation_amount, idempotency_key=f"base-open:{i}")
                base_stats, base_elapsed = run_phase(ledger, base_ids, args, baseline, args.baseline)
            stats, elapsed = run_phase(ledger, user_ids, args, soak, args.duration)
        net: Counter = Counter()
        outcomes: Counter = Counter()
        latencies: dict[str, list[float]] = defaultdict(list)
        errors: list[str] = []
        for s in stats:
            net.update(s.net)
            outcomes.update(s.outcomes)
            errors.extend(s.errors)
            for op, lat in s.latencies_us.items():
                latencies[op].extend(lat)
        check = verify(target.url, config, user_ids, net)
        where = target.where

    base: dict[str, Any] | None = None
    if base_stats:
        base_lat = [v for s in base_stats for lat in s.latencies_us.values() for v in lat]
        base_ok = sum(n for s in base_stats for (op, o), n in s.outcomes.items() if o == "ok")
        base_bad = sum(n for s in base_stats for (op, o), n in s.outcomes.items() if o != "ok")
        base = {"seconds": round(base_elapsed, 2), "operations": base_ok + base_bad, "not_ok": base_bad,
                "throughput_ops_s": round((base_ok + base_bad) / base_elapsed, 1),
                "p50_ms": round(percentile(base_lat, 0.50), 2), "p99_ms": round(percentile(base_lat, 0.99), 2)}
    everything = [v for lat in latencies.values() for v in lat]
    total = sum(outcomes.values())
    ok = sum(n for (op, o), n in outcomes.items() if o == "ok")
    refused = sum(n for (op, o), n in outcomes.items() if o == "refused")
    failed = sum(n for (op, o), n in outcomes.items() if o == "error")
    per_op = {op: {"ok": outcomes[(op, "ok")], "refused": outcomes[(op, "refused")], "error": outcomes[(op, "error")],
                   "p50_ms": round(percentile(latencies[op], 0.50), 2),
                   "p99_ms": round(percentile(latencies[op], 0.99), 2)} for op in OPS}
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "where": where,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "params": {k: v for k, v in vars(args).items() if k != "url"},
        "seconds": round(elapsed, 2), "operations": total, "ok": ok, "refused": refused, "errors": failed,
        "throughput_ops_s": round(total / elapsed, 1), "throughput_ok_s": round(ok / elapsed, 1),
        "p50_ms": round(percentile(everything, 0.50), 2), "p99_ms": round(percentile(everything, 0.99), 2),
        "per_op": per_op, "error_samples": errors[:10], "verification": check, "baseline": base,
    }
    if base:
        result["ratio_to_baseline"] = round(result["throughput_ops_s"] / base["throughput_ops_s"], 2)

    print(f"soak: {args.clients} clients, {args.users} users ({args.hot} hot take {args.hot_share:.0%}), "
          f"{elapsed:.1f} s on {where}")
    print(f"  {total:,} operations = {result['throughput_ops_s']:,.0f}/s  "
          f"(ok {ok:,} = {result['throughput_ok_s']:,.0f}/s, refused {refused:,}, errors {failed:,})")
    print(f"  latency p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
    if base:
        print(f"  baseline (same run, {base['seconds']:.0f} s, deductions only on uniform funded users): "
              f"{base['throughput_ops_s']:,.0f}/s, p50 {base['p50_ms']} ms, p99 {base['p99_ms']} ms, "
              f"not ok {base['not_ok']}; soak/baseline = {result['ratio_to_baseline']}x")
    print(f"  {'op':<8} {'ok':>8} {'refused':>8} {'error':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for op, r in per_op.items():
        print(f"  {op:<8} {r['ok']:>8,} {r['refused']:>8,} {r['error']:>6,} {r['p50_ms']:>8} {r['p99_ms']:>8}")
    sqlc = check["sql"]
    print(f"  verification: {check['ledger_rows']:,} ledger rows; " + ", ".join(f"{k} {v}" for k, v in sqlc.items())
          + f"; conservation mismatches {check['conservation_mismatches']}; audit {check['audit']['rules']}: "
          f"{check['audit']['findings']} finding(s) ({check['audit'].get('seconds', '-')} s)")
    for e in errors[:5]:
        print(f"  error sample: {e}")
    print("  RESULT: " + ("clean" if check["problems"] == 0 and failed == 0 else f"{check['problems']} problem(s)"))
    if not args.no_save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"soak-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"  saved {out.relative_to(RESULTS_DIR.parent.parent)}")
    base_failed = base["not_ok"] if base else 0
    return 0 if check["problems"] == 0 and failed == 0 and base_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
