"""The CRITICAL alert sensor against a real HTTP receiver on 127.0.0.1: one post per CRITICAL run, none
for a healthy run, none (and no error) without a URL, a dead receiver breaks nothing."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest
from dagster import AssetKey, DagsterInstance, SensorResult, build_sensor_context

from assets.credit_state import credit_state
from checks.snapshot import SNAPSHOT_TABLES
from pipelines.sensors import WEBHOOK_ENV, critical_findings_alert
from tests.audit_cases import paid_user
from tests.dagster_helpers import instance  # noqa: F401 (fixture)
from tests.dagster_helpers import checks_by_rule, run_job, today
from tests.factories import make_user


class Receiver:
    """A Slack-webhook stand-in: records every POST (path, content type, JSON body) and answers 200."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                posts.append({"path": self.path, "type": self.headers.get("Content-Type"),
                              "body": json.loads(body)})
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/secret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()




# the sensor reads check evaluations: the runs need the snapshots, the state and its checks, not the report
CHECKS_ONLY = [*(AssetKey(["snapshot", t]) for t in SNAPSHOT_TABLES), credit_state.key]


def audit(db_url: str, instance: DagsterInstance) -> Any:
    return run_job("daily_audit", db_url, instance, partition=today(), asset_selection=CHECKS_ONLY)


def evaluate(instance: DagsterInstance, cursor: str | None) -> SensorResult:
    result = critical_findings_alert(build_sensor_context(instance=instance, cursor=cursor))
    assert isinstance(result, SensorResult) and not result.run_requests
    return result


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"  # nothing listens there once the socket is closed


def test_alert_posts_once_per_critical_run(db_url: str, conn: psycopg.Connection, instance: DagsterInstance,
                                           receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEBHOOK_ENV, receiver.url)
    assert "0 finished run(s)" in evaluate(instance, None).skip_reason.skip_message
    healthy = audit(db_url, instance)
    assert all(ev.passed for ev in checks_by_rule(healthy).values())
    first = evaluate(instance, None)
    assert receiver.posts == []  # a healthy run posts nothing
    assert "1 finished run(s), 0 CRITICAL" in first.skip_reason.skip_message

    make_user(conn, mapped_to=None)  # mapping_present: a warning, named in the message but not its cause
    case = paid_user(conn, grant=False)  # paid_users_funded: critical
    critical = audit(db_url, instance)
    second = evaluate(instance, first.cursor)
    assert len(receiver.posts) == 1
    post = receiver.posts[0]
    assert post["path"] == "/services/T000/B000/secret" and post["type"] == "application/json"
    text = post["body"]["text"]
    assert "CRITICAL" in text and "paid_users_funded (1)" in text and critical.run_id[:8] in text
    assert "mapping_present" not in text  # warnings are named in the blocks, not as the alert
    block = post["body"]["blocks"][0]["text"]["text"]
    assert str(case["bid"]) in block and "Warnings too: mapping_present" in block and today() in block

    # the same run is never posted again: the cursor moved past it
    third = evaluate(instance, second.cursor)
    assert len(receiver.posts) == 1 and third.cursor == second.cursor

    # no URL: nothing posted, nothing fails, and the run is consumed (not posted later)
    audit(db_url, instance)
    monkeypatch.delenv(WEBHOOK_ENV)
    fourth = evaluate(instance, third.cursor)
    assert "not set" in fourth.skip_reason.skip_message and fourth.cursor != third.cursor
    monkeypatch.setenv(WEBHOOK_ENV, receiver.url)
    evaluate(instance, fourth.cursor)
    assert len(receiver.posts) == 1

    # a receiver that is down: the sensor logs it and moves on (at most once, not retried into a flood)
    monkeypatch.setenv(WEBHOOK_ENV, closed_port_url())
    replay = evaluate(instance, None)  # a fresh cursor looks back a day: both CRITICAL runs again
    assert "2 CRITICAL; 2 post(s) failed" in replay.skip_reason.skip_message
    assert replay.cursor == fourth.cursor

