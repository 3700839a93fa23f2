"""The `qserve` command: one click group; each subcommand lives in `qserve.commands.<name>`.

Subcommands are imported lazily so `qserve --help` stays fast and a subcommand's heavy imports
(torch, transformers, fastapi) are paid only when it runs.
"""

from __future__ import annotations

import importlib
import sys

import click

from qserve import __version__
from qserve.errors import QserveError

# name -> (module, attribute). Order is the order `--help` lists them in.
COMMANDS: dict[str, tuple[str, str]] = {
    "pull": ("qserve.commands.pull", "pull"),
    "quantize": ("qserve.commands.quantize", "quantize"),
    "validate": ("qserve.commands.validate", "validate"),
    "eval": ("qserve.commands.eval", "eval_group"),
    "serve": ("qserve.commands.serve", "serve"),
    "run": ("qserve.commands.run", "run"),
    "deploy": ("qserve.commands.deploy", "deploy"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self.get_command(ctx, name) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[cmd_name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # subcommand not part of this build
                return None
            raise
        return getattr(module, attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qserve")
def cli() -> None:
    """Quantize a causal LM to 4-bit (GPTQ / AWQ), validate the checkpoint, and serve it."""


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="qserve", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except QserveError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    # standalone_mode=False returns ctx.exit(code) as the value instead of exiting.
    if isinstance(rv, int) and rv != 0:
        sys.exit(rv)


if __name__ == "__main__":
    main()
