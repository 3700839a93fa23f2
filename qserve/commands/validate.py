"""`qserve validate DIR`: check a GPTQ/AWQ checkpoint before it is served."""

from __future__ import annotations

import json

import click

from qserve.errors import CheckpointError


@click.command()
@click.argument("path", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--strict", is_flag=True, help="Count warnings as errors.")
@click.option("--deep", is_flag=True, help="Also read the tensor data (zeros, g_idx, NaN, magnitudes).")
@click.pass_context
def validate(ctx: click.Context, path: str, as_json: bool, strict: bool, deep: bool) -> None:
    """Check the checkpoint directory PATH against its quantization metadata.

    Exit code 0: valid; 1: findings of error severity (warnings too with --strict);
    2: PATH is not a readable checkpoint directory.
    """
    from qserve.validate import validate_checkpoint

    try:
        report = validate_checkpoint(path, deep=deep, strict=strict)
    except CheckpointError as exc:
        if as_json:
            click.echo(json.dumps({"path": path, "ok": False, "error": str(exc)}, indent=2))
        else:
            click.secho(f"error: {exc}", fg="red", err=True)
        ctx.exit(exc.exit_code)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(report.format_text())
    ctx.exit(0 if report.ok else 1)
