"""Run the real `credits` command in a subprocess against a test database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(db_url: str | None, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
    full_env = {**os.environ, "GX_ANALYTICS_ENABLED": "false", **(env or {})}
    if db_url is not None:
        full_env["DATABASE_URL"] = db_url
    proc = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, stdin=subprocess.DEVNULL)
    return Result(proc.returncode, proc.stdout, proc.stderr)
