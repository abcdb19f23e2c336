"""Client CPU per deduction, one thread: Ledger.deduct against bare psycopg sending the same call.

On this 2-core machine the server and the Python client share the CPUs, so the module's throughput
(benchmarks/ledger_throughput.py) is bounded by the CPU each call costs in the client. This counts
that cost directly, without the 8-thread run's drift: process CPU (user and system, from getrusage)
per call over N sequential calls, for each variant in turn, alternating their order each repetition.

    .venv/bin/python -m benchmarks.ledger_cpu                 # 20,000 calls x 3 repetitions per variant
    .venv/bin/python -m benchmarks.ledger_cpu -n 5000 --reps 1 --only module --only psycopg

Variants: ``module`` (Ledger.deduct on a pool, as an app calls it), ``psycopg`` (cursor.execute of
the module's cursor-route SQL and parameters), ``psycopg_raw`` (ledger_throughput's bare variant:
six parameters, the metadata as NULL), ``libpq`` (PQexecPrepared of a prepared statement through
psycopg's pgconn: the floor of any Python client). Same server set-up as ledger_throughput.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from benchmarks.ledger_throughput import RAW_SQL, bench_uid, prepare, scratch_database
from ledger import db
from ledger.config import CreditsConfig
from ledger.service import Ledger, _WRITE_SQL_NO_METADATA

VARIANTS = ("module", "psycopg", "psycopg_raw", "libpq")
USERS = 1000
LIBPQ_SQL = b"SELECT new_balance, transaction_id, duplicate FROM public.deduct_points($1, $2, $3, $4, $5)"


def _variants(ledger: Ledger, conn: psycopg.Connection) -> dict[str, Callable[[int, str], None]]:
    uids = [bench_uid(n) for n in range(1, USERS + 1)]
    cur = conn.cursor()
    module_sql = _WRITE_SQL_NO_METADATA["deduct_points"]
    pgconn = conn.pgconn
    assert pgconn.prepare(b"bench_deduct", LIBPQ_SQL, [2950, 20, 25, 25, 25]).status == psycopg.pq.ExecStatus.COMMAND_OK

    def module(n: int, prefix: str) -> None:
        deduct = ledger.deduct
        for i in range(n):
            deduct(uids[i % USERS], 1, idempotency_key=f"{prefix}{i}", description="bench")

    def bare(n: int, prefix: str) -> None:
        execute = cur.execute
        for i in range(n):
            execute(module_sql, (uids[i % USERS], 1, "generation_deduction", "bench", f"{prefix}{i}")).fetchone()

    def bare_raw(n: int, prefix: str) -> None:
        execute = cur.execute
        for i in range(n):
            execute(RAW_SQL, (uids[i % USERS], 1, "generation_deduction", "bench", f"{prefix}{i}", None)).fetchone()

    def libpq(n: int, prefix: str) -> None:
        execute = pgconn.exec_prepared
        for i in range(n):
            res = execute(b"bench_deduct", [uids[i % USERS].bytes, b"1", b"generation_deduction", b"bench",
                                            f"{prefix}{i}".encode()], [1, 0, 0, 0, 0])
            if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
                raise RuntimeError(res.get_error_message("utf-8"))
            int(res.get_value(0, 0)), int(res.get_value(0, 1)), res.get_value(0, 2) == b"t"

    return {"module": module, "psycopg": bare, "psycopg_raw": bare_raw, "libpq": libpq}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ledger_cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20_000, help="calls per variant and repetition (default 20000)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    ap.add_argument("--only", choices=VARIANTS, action="append", help="run only these variants (repeatable)")
    ap.add_argument("--url", default=None, help="server to use (default a temporary embedded one)")
    args = ap.parse_args(argv)
    names = [v for v in VARIANTS if v in (args.only or VARIANTS)]
    config = CreditsConfig()
    tag = random.randint(10**5, 10**6 - 1)
    results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in names}
    with scratch_database(args.url) as target, tempfile.TemporaryDirectory() as tmp:
        prepare(target, USERS, config, [], Path(tmp))
        ledger = Ledger(db.open_pool(target.url, max_size=1, min_size=1), config, target.url)
        conn = psycopg.connect(target.url, autocommit=True)
        try:
            variants = _variants(ledger, conn)
            for name in names:  # warm-up: statements prepared, caches loaded
                variants[name](200, f"bench:{tag}:w:{name}:")
            for rep in range(args.reps):
                for name in names if rep % 2 == 0 else names[::-1]:
                    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                    variants[name](args.n, f"bench:{tag}:{rep}:{name}:")
                    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                    user, system = (r1.ru_utime - r0.ru_utime) * 1e6 / args.n, (r1.ru_stime - r0.ru_stime) * 1e6 / args.n
                    results[name].append((user + system, user, system, (w1 - w0) * 1e6 / args.n))
        finally:
            ledger.close()
            conn.close()
    print(f"client CPU per deduction, one thread, {args.n} calls x {args.reps} repetitions (microseconds)")
    print(f"{'variant':<13}{'cpu per rep':>{8 * args.reps + 4}}{'median cpu':>12}{'user':>8}{'system':>8}{'wall':>8}")
    for name in names:
        rows = results[name]
        med = [statistics.median(r[k] for r in rows) for k in range(4)]
        print(f"{name:<13}{''.join(f'{r[0]:8.1f}' for r in rows):>{8 * args.reps + 4}}{med[0]:12.1f}"
              f"{med[1]:8.1f}{med[2]:8.1f}{med[3]:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
