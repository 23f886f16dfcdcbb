"""The one runner of the ``fedsilo``, ``silo`` and ``aggregator`` command lines.

Every CLI is built with :func:`new_cli` (same settings, and ``--debug`` as a real option shown in
``--help``) and started with :func:`run_cli`, so a mistake gets the same answer whichever
command a person typed it into: one line on stderr and exit 2 for a :class:`UserError`, a
one-line "internal error" (exit 1) for anything else, and the full traceback only with
``--debug`` (or ``FEDSILO_DEBUG=1``).
"""

from __future__ import annotations

import contextvars

import click
import typer
from rich.console import Console
from rich.markup import escape

from fedsilo_base.errors import UserError

DEBUG_ENV = "FEDSILO_DEBUG"

# Set by the --debug callback of whichever app (or mounted sub-app) parsed the option; read by
# run_cli once the command has raised. A context variable, not a module flag, so in-process
# callers (tests) that run several commands do not leak the switch into each other.
_debug_requested: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fedsilo_debug_requested", default=False
)


def _debug_callback(
    debug: bool = typer.Option(
        False,
        "--debug",
        envvar=DEBUG_ENV,
        help="Show the full traceback of an error (for a bug report).",
    ),
) -> None:
    if debug:
        _debug_requested.set(True)


def new_cli(name: str, help_text: str) -> typer.Typer:
    """A typer app with the house settings and the ``--debug`` option."""
    return typer.Typer(
        name=name,
        help=help_text,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        callback=_debug_callback,
    )


def run_cli(app: typer.Typer, err: Console | None = None) -> None:
    """Run ``app`` as a console entry point; never returns normally with an error unreported."""
    err = err or Console(stderr=True, soft_wrap=True)
    token = _debug_requested.set(False)
    try:
        code = app(standalone_mode=False)
    except UserError as exc:
        if _debug_requested.get():
            raise
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted; every process started was stopped")
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except click.exceptions.ClickException as exc:  # usage errors: click's own message
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:
        raise SystemExit(1) from None
    except Exception as exc:
        if _debug_requested.get():
            raise
        err.print(
            f"[red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
            "(rerun with --debug)",
            highlight=False,
            soft_wrap=True,
        )
        raise SystemExit(1) from None
    finally:
        _debug_requested.reset(token)
    # standalone_mode=False turns typer.Exit(code) into a return value: keep its exit status
    if isinstance(code, int) and not isinstance(code, bool) and code:
        raise SystemExit(code)
