"""What every `credits` command shares: opening the ledger, exit codes, error printing, output."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from ledger.errors import (
    ConfigError,
    CreditError,
    DatabaseUnavailable,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    UnknownUser,
)

# exit codes, as monitoring tools expect (health commands) and the support commands share
EXIT_OK, EXIT_WARNING, EXIT_CRITICAL, EXIT_CANNOT_RUN, EXIT_REFUSED = 0, 1, 2, 3, 4

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

P = ParamSpec("P")
R = TypeVar("R")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("CREDITS_LOG_LEVEL", "WARNING").upper(),
                                                  logging.WARNING)
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def open_ledger(migrate: bool = True, max_size: int | None = 4):  # type: ignore[no-untyped-def]
    """The Ledger for this command: $DATABASE_URL or the embedded server, migrated."""
    from ledger.service import Ledger

    return Ledger.connect(migrate=migrate, max_size=max_size)


def fail(message: str, code: int = EXIT_CANNOT_RUN) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", markup=True)
    return typer.Exit(code)


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn typed errors into one clear line on stderr and the documented exit code."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except InsufficientCredits as exc:
            raise fail(str(exc), EXIT_REFUSED) from None
        except (DatabaseUnavailable, ConfigError, InvalidAmount, InvalidArgument, UnknownUser) as exc:
            raise fail(str(exc), EXIT_CANNOT_RUN) from None
        except CreditError as exc:
            raise fail(f"{type(exc).__name__}: {exc}", EXIT_CANNOT_RUN) from None

    return wrapper


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, default=str, indent=2) + "\n")
    sys.stdout.flush()
