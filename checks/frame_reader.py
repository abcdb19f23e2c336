"""Connections that read snapshot frames straight into Arrow, through ADBC's PostgreSQL driver.

Why ADBC and not psycopg's COPY: the driver runs ``COPY (query) TO STDOUT (FORMAT binary)`` and decodes
the binary rows into Arrow arrays in C, outside the GIL. The CSV path it replaced handed every row to
Python as a bytes object (~0.6 us a row, GIL held) before Arrow's CSV parser read the text again: at
1M users an identity half cost the client 2.9-3.3 s of CPU that way and 1.0-1.2 s here, the grant
tokens 1.5-1.9 s against 0.44 s, and the snapshot's two reader threads now decode at the same time.

What it costs: binary COPY sends PostgreSQL's own types, so a frame's columns are cast in SQL to the
types the frame declares (``typed``): a ``sum()`` is numeric on the server and would otherwise arrive as
a string. psycopg still owns everything else (the exported snapshot, client-side parameter binding, the
ledger's writes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ledger import db
from ledger.errors import DatabaseUnavailable

if TYPE_CHECKING:
    import pyarrow as pa

# a frame's declared dtype -> the PostgreSQL type its column is cast to before the binary COPY
_PG_TYPES = {"str": "text", "int64": "int8", "Int64": "int8", "bool": "bool"}


def typed(query: str, dtypes: dict[str, str], dates: list[str]) -> str:
    """``query`` with each declared column cast to its frame type, in the declared order.

    A column the query does not produce fails the read (PostgreSQL names it); one it produces but the
    frame does not declare is dropped, as the frame's consumers never see it either way.
    """
    cols = [f'q."{c}"::{_PG_TYPES[t]} AS "{c}"' for c, t in dtypes.items()]
    cols += [f'q."{c}"::timestamptz AS "{c}"' for c in dates]
    return f"SELECT {', '.join(cols)} FROM ({query}) AS q"


def connect(url: str) -> Any:
    """An autocommit ADBC connection (transactions are opened with BEGIN, as on the psycopg side)."""
    import adbc_driver_manager
    import adbc_driver_postgresql.dbapi as adbc_pg
    from psycopg.conninfo import make_conninfo

    try:
        conninfo = make_conninfo(url, connect_timeout=10, application_name="credit-recon snapshot")
        return adbc_pg.connect(conninfo, autocommit=True)
    except adbc_driver_manager.Error as exc:
        raise DatabaseUnavailable(db.unreachable(url, exc)) from None


def is_connection_error(exc: BaseException) -> bool:
    """Whether a driver error means the server went away (as opposed to a failing query)."""
    import adbc_driver_manager

    if not isinstance(exc, adbc_driver_manager.Error):
        return False
    sqlstate = getattr(exc, "sqlstate", None) or ""
    # no SQLSTATE: libpq lost the connection; 08xxx connection exceptions; 57P0x the server shut down
    return sqlstate.startswith(("08", "57P")) or (not sqlstate and isinstance(exc, adbc_driver_manager.OperationalError))


def execute(conn: Any, statement: str) -> None:
    """Run a statement whose result (if any) is not wanted."""
    with conn.cursor() as cur:
        cur.execute(statement)
        if cur.description:
            cur.fetch_arrow_table()


def read_table(conn: Any, query: str) -> "pa.Table":
    """The query's rows as one Arrow table (``query`` carries its parameters as literals)."""
    with conn.cursor() as cur:
        cur.execute(query)
        table = cur.fetch_arrow_table()
    # one chunk per column: the driver's batches keep the slack of buffers grown while decoding, which
    # the frames would hold to the end of the audit (an identity half: ~176 MB held in batches, ~142 MB
    # combined)
    return table.combine_chunks()


def arrow_strings(series: Any, typ: "pa.DataType | None" = None) -> "pa.ChunkedArray":
    """A pandas string column as an Arrow ChunkedArray (of ``typ``; large_string when not given), with
    no copy when the column is Arrow-backed already.

    ``pa.array`` answers with an Array, or with a ChunkedArray for a column read in several batches (as
    these readers deliver them); ``pa.chunked_array([that])`` would convert it value by value (1.2 s for
    a 908k-row column), hence the check.
    """
    import pyarrow as pa

    typ = typ or pa.large_string()
    arr = pa.array(series)
    if isinstance(arr, pa.Array):
        arr = pa.chunked_array([arr])
    return arr if arr.type == typ else arr.cast(typ)
