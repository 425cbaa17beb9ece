"""The ``edgetok`` command line: one click group, one module per subcommand in
edgetok/commands/ (imported lazily so ``edgetok --help`` stays fast)."""
from __future__ import annotations

import importlib
import sys

import click

# name -> "module:attribute" of a click command
COMMANDS = {
    "export": "edgetok.commands.export:export",
    "inspect": "edgetok.commands.inspect:inspect",
    "build": "edgetok.commands.build:build",
    "triton": "edgetok.commands.triton:triton",
    "validate": "edgetok.commands.validate:validate",
    "demo": "edgetok.commands.demo:demo",
    "bench": "edgetok.commands.bench:bench",
    "plugins": "edgetok.commands.plugins:plugins",
    "stream": "edgetok.commands.stream:stream",
    "serve": "edgetok.commands.serve:serve",
    "finetune": "edgetok.commands.finetune:finetune_cmd",
    "methods": "edgetok.commands.methods:methods",
    "tune": "edgetok.commands.tune:tune",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgetok")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of one line.")
def cli(debug):
    """edgetok: token reduction that pays off on real deployments."""


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every cleanup (a staged export) runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    """Console entry: every failure is one line on stderr and a non-zero exit (``--debug``:
    the traceback); outputs being written are cleaned up on Ctrl-C and SIGTERM too."""
    import signal
    import threading

    from .errors import EdgetokError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args[: next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))]
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rv = cli.main(args=args, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (KeyboardInterrupt, Terminated):
        click.echo("interrupted: nothing was left half-written", err=True)
        return 130
    except (EdgetokError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if debug:
            raise
        click.echo(f"error: {_one_line(e, whole=isinstance(e, EdgetokError))}", err=True)
        return 1
    except Exception as e:  # not an input edgetok checks: still one line, with the way to see more
        if debug:
            raise
        click.echo(f"error: {type(e).__name__}: {_one_line(e)} (run `edgetok --debug ...` for the traceback)",
                   err=True)
        return 1
    return rv if isinstance(rv, int) else 0


def _one_line(e: BaseException, whole: bool = False) -> str:
    """``e``'s message on one line; ``whole``: edgetok's own messages (written to be read whole),
    else the first three lines, at most 500 characters (a library's message can be a page)."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if not lines:
        return type(e).__name__
    return "; ".join(lines) if whole else "; ".join(lines[:3])[:500]


if __name__ == "__main__":
    sys.exit(main())
