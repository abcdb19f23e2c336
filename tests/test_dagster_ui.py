"""The Dagster UI as a person sees it: `dagster dev` on a free port over a seeded database, the daily job
run so the checks have results, then headless Debian chromium (driven by Playwright) on the asset checks
page: a failing critical rule shows as failed with the error icon, a warning rule with the warning icon."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance

from checks.rules import RULES
from checks.seed import seed
from ledger.config import CreditsConfig
from tests.dagster_helpers import checks_by_rule, run_job, today

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# the UI shows a check's severity as its icon: red "cancel" for ERROR, yellow "warning_outline" for WARN
ICON = {"critical": "cancel", "warning": "warning_outline"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dagster dev exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"dagster dev did not answer on {url} within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def dagster_home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


@pytest.fixture
def audited(db_url: str, dagster_home: Path) -> Iterator[str]:
    """A seeded database whose daily audit has run into the instance under ``dagster_home``."""
    seed(db_url, CreditsConfig(), users=100, fault_rate=0.05, seed=21)
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        result = run_job("daily_audit", db_url, instance, partition=today())
        assert not checks_by_rule(result)["paid_users_funded"].passed
    finally:
        instance.dispose()
    yield db_url


@pytest.fixture
def dagster_dev(audited: str, dagster_home: Path, tmp_path: Path) -> Iterator[str]:
    """`dagster dev -w workspace.yaml` on a free port (our own process group, stopped afterwards)."""
    port = free_port()
    log = tmp_path / "dagster-dev.log"
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "DATABASE_URL": audited,
           "GX_ANALYTICS_ENABLED": "false", "DAGSTER_DISABLE_TELEMETRY": "1"}
    env.pop("CREDITS_ALERT_WEBHOOK_URL", None)  # the sensor must not post anywhere from a test
    dagster = Path(sys.executable).with_name("dagster")
    with log.open("wb") as out:
        proc = subprocess.Popen([str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/server_info", proc, log)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (.ci/run installs it with apt-get; "
                    "Playwright cannot download its own browser here)")
    return CHROMIUM


def test_asset_checks_page_shows_failing_rules_and_severity(chromium: str, dagster_dev: str,
                                                            tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{dagster_dev}/assets/credit_state?view=checks", wait_until="domcontentloaded")
            skip = page.get_by_role("button", name="Skip")  # the UI's one-time newsletter prompt
            try:
                skip.click(timeout=8000)
            except Exception:  # noqa: BLE001 - the prompt does not always appear
                pass
            expect(page.get_by_text(f"Checks ({len(RULES)})")).to_be_visible(timeout=60_000)

            for rule, severity in (("paid_users_funded", "critical"), ("mapping_present", "warning")):
                row = page.locator("[class*=checkRow]").filter(has=page.locator(f"[title='{rule}']"))
                expect(row).to_have_count(1)
                expect(row).to_contain_text("Failed")
                expect(row.locator("[role=img]").first).to_have_attribute("aria-label", ICON[severity])

            page.locator("[title='paid_users_funded']").first.click()
            detail = page.get_by_text("[critical] every active or trialing paid subscription")
            expect(detail).to_be_visible(timeout=30_000)
            expect(page.get_by_text("Evaluation result")).to_be_visible()
            metadata = page.locator("table").filter(has_text="ge_suite")
            expect(metadata).to_contain_text("credit_recon.funding.paid_users_funded")
            expect(metadata.locator("tr").filter(has_text="severity")).to_contain_text("critical")
            expect(page.get_by_text(today()).first).to_be_visible()  # the partition the evaluation is for
            shot = tmp_path / "asset-checks.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()

