"""Entry point of `credits`. Command groups live in their own modules and register here."""

from __future__ import annotations

import os
import sys

import typer

from cli import ledger_cmds

# typer vendors click; its exception classes are what standalone_mode=False lets through
_click_errors = typer.core._click.exceptions  # type: ignore[attr-defined]
from cli.common import EXIT_CANNOT_RUN, err, setup_logging

app = typer.Typer(
    name="credits",
    help="credit-recon: the credit ledger, its audit and fixes, from a terminal.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug detail to stderr")) -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    setup_logging(verbose)


ledger_cmds.register(app)

# further command groups register themselves here (one module each)
for _name in ("cli.audit_cmds", "cli.demo_cmds", "cli.lifecycle_cmds", "cli.reservation_cmds"):
    try:
        _module = __import__(_name, fromlist=["register"])
    except ModuleNotFoundError as _exc:
        if _exc.name != _name:
            raise
        continue
    _module.register(app)


def main() -> None:
    """Run the CLI; usage errors exit 3 (could not run), as the contract's exit codes say."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        err.print("aborted")
        sys.exit(EXIT_CANNOT_RUN)
    except _click_errors.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(0)
    except _click_errors.ClickException as exc:  # usage errors: bad or missing arguments
        exc.show()
        sys.exit(EXIT_CANNOT_RUN)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
