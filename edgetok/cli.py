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
def cli():
    """edgetok: token reduction that pays off on real deployments."""


def main(argv=None) -> int:
    """Console entry: EdgetokError and other expected failures become one line and exit 1."""
    from .errors import EdgetokError

    try:
        rv = cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (EdgetokError, FileNotFoundError, PermissionError) as e:
        click.echo(f"error: {e}", err=True)
        return 1
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
