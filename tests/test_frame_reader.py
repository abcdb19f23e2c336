"""The snapshot's reader connections (checks.frame_reader): typed frames, one moment, readable failures."""

from __future__ import annotations

import pyarrow as pa
import pytest

from checks import frame_reader
from checks import snapshot as snapshot_module
from ledger.errors import DatabaseUnavailable
from tests.audit_cases import add
from tests.factories import make_user


def test_frames_arrive_with_their_declared_types(db_url) -> None:
    """Binary COPY sends PostgreSQL's types: a sum() is numeric there and would arrive as a string; the
    typed wrapper casts every declared column (ints, nullable ints, text, timestamps) to the frame's type."""
    query = frame_reader.typed(
        "SELECT sum(x)::numeric AS total, NULLIF(1, 1) AS maybe, 42 AS small, 'a' || x::text AS name,"
        " now() AS at FROM generate_series(1, 3) x GROUP BY x ORDER BY x",
        {"total": "int64", "maybe": "Int64", "small": "int64", "name": "str"}, ["at"])
    c = frame_reader.connect(db_url)
    try:
        table = frame_reader.read_table(c, query)
    finally:
        c.close()
    assert table.column_names == ["total", "maybe", "small", "name", "at"]
    assert [f.type for f in table.schema] == [pa.int64(), pa.int64(), pa.int64(), pa.string(),
                                              pa.timestamp("us", tz="UTC")]
    assert table.column("total").to_pylist() == [1, 2, 3]
    assert table.column("maybe").null_count == 3


def test_a_declared_column_the_query_lacks_fails_the_read(db_url) -> None:
    c = frame_reader.connect(db_url)
    try:
        with pytest.raises(Exception, match="missing"):
            frame_reader.read_table(c, frame_reader.typed("SELECT 1 AS present", {"missing": "int64"}, []))
    finally:
        c.close()


def test_readers_share_the_exported_snapshot(db_url, conn) -> None:
    """A reader that imported the snapshot does not see a write committed after the export."""
    main = snapshot_module.db.connect(db_url, autocommit=True)
    reader = frame_reader.connect(db_url)
    try:
        main.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snap_id = main.execute("SELECT pg_export_snapshot()").fetchone()[0]
        make_user(conn, "late@example.com")  # committed after the export
        snapshot_module._begin(reader, snap_id)
        main.execute("ROLLBACK")  # the reader holds the snapshot on its own once imported
        seen = frame_reader.read_table(reader, "SELECT count(*) AS n FROM public.bestauth_users").column(0)[0]
        assert seen.as_py() == 0
        assert conn.execute("SELECT count(*) FROM public.bestauth_users").fetchone()[0] == 1
    finally:
        main.close()
        reader.close()


def test_one_reader_and_two_read_the_same_frames(db_url, conn, config) -> None:
    """The identity halves and the ledger halves (two parts each) add up to the per-table reads."""
    _, uid = make_user(conn, "a@example.com")
    add(conn, uid, 500)
    make_user(conn, "b@example.com")
    whole = snapshot_module.take_snapshot(db_url)
    one_worker = snapshot_module.take_snapshot(db_url, workers=1)
    for name in ("bestauth_users", "user_id_mapping", "subscriptions", "points_balances", "ledger_by_user"):
        a = whole.table(name).sort_values(list(whole.table(name).columns[:1])).reset_index(drop=True)
        b = one_worker.table(name).sort_values(list(one_worker.table(name).columns[:1])).reset_index(drop=True)
        assert a.equals(b), name
    assert len(whole.table("bestauth_users")) == 2
    assert int(whole.table("ledger_by_user")["ledger_sum"].sum()) == 500


def test_unreachable_server_is_one_line_without_the_password() -> None:
    with pytest.raises(DatabaseUnavailable) as err:
        frame_reader.connect("postgresql://admin:s3cr3t-pw@127.0.0.1:1/prod_credits")
    msg = str(err.value)
    assert "127.0.0.1:1/prod_credits" in msg and "s3cr3t-pw" not in msg and "\n" not in msg.strip()


def test_connection_errors_are_told_from_query_errors(db_url, conn) -> None:
    """A failing query stays a query error; a reader whose server process is gone is a connection error
    (the snapshot turns it into DatabaseUnavailable)."""
    import adbc_driver_manager

    c = frame_reader.connect(db_url)
    try:
        with pytest.raises(adbc_driver_manager.Error) as err:
            frame_reader.read_table(c, "SELECT 1 / 0 AS x")
        assert not frame_reader.is_connection_error(err.value)  # 22012: the query, not the server
        pid = frame_reader.read_table(c, "SELECT pg_backend_pid() AS pid").column(0)[0].as_py()
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(adbc_driver_manager.Error) as err:
            frame_reader.read_table(c, "SELECT 1 AS x")
        assert frame_reader.is_connection_error(err.value), repr(err.value)
    finally:
        c.close()
    assert not frame_reader.is_connection_error(ValueError("x"))
