"""``bdscan``: the root command, global options and exit-code policy.

Exit codes: 0 clean/ok, 1 backdoor suspected, 2 error, 3 nothing to analyse, 4 usage error,
5 (audit) suspicious and repaired to the targets.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from bdscan import __version__
from bdscan.cli.common import handle_errors


# typer may vendor click; take its exception classes from typer's own hierarchy.
_ClickUsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class BdscanGroup(TyperGroup):
    """Maps click's usage errors to exit code 4 (click's own default is 2, which bdscan
    reserves for errors in the input), and every other click error to 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # noqa: D401
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _ClickUsageError as e:
            e.show()
            sys.exit(4)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(130)
        except _ClickException as e:
            e.show()
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=BdscanGroup,
    name="bdscan",
    help="Audit and repair backdoored language-model checkpoints and LoRA adapters.\n\n"
    "Exit codes: 0 clean/ok, 1 backdoor suspected, 2 error in the input, 3 nothing to analyse, 4 usage error, "
    "5 (audit) backdoor suspected and repaired.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bdscan {__version__}")
        raise typer.Exit()


@app.callback()
@handle_errors
def root(
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads (default: half the cores; env BDSCAN_THREADS). One thread is fastest on a busy 2-core box.")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    from bdscan.runtime import request_threads

    request_threads(threads)


def _register() -> None:
    from bdscan.cli import audit, calibrate, demo, detect, eval as eval_cmd, localize, purify, report

    app.command("detect", help=detect.HELP, no_args_is_help=True)(detect.command)
    app.command("localize", help=localize.HELP, no_args_is_help=True)(localize.command)
    app.command("purify", help=purify.HELP, no_args_is_help=True)(purify.command)
    app.command("eval", help=eval_cmd.HELP, no_args_is_help=True)(eval_cmd.command)
    app.command("audit", help=audit.HELP, no_args_is_help=True)(audit.command)
    app.command("calibrate", help=calibrate.HELP, no_args_is_help=True)(calibrate.command)
    app.command("report", help=report.HELP, no_args_is_help=True)(report.command)
    app.command("demo", help=demo.HELP)(demo.command)


_register()


def main() -> None:
    app()
