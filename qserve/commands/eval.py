"""`qserve eval ppl MODEL`: perplexity in the GPTQ/AWQ-paper protocol."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("eval")
def eval_group() -> None:
    """Evaluate a model or a quantized checkpoint."""


@eval_group.command("ppl")
@click.argument("model")
@click.option(
    "--dataset",
    default="wikitext2",
    show_default=True,
    help="Preset name (wikitext2), a .txt/.jsonl/.json file, or a hub dataset id.",
)
@click.option(
    "--seqlen", type=click.IntRange(min=2), default=2048, show_default=True, help="Window length in tokens."
)
@click.option(
    "--max-windows",
    type=click.IntRange(min=1),
    default=None,
    help="Score only the first N windows (default: all).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="Compute dtype (auto: float32 on CPU, float16 on CUDA).",
)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the result as JSON."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def ppl(model, dataset, seqlen, max_windows, batch_size, device, dtype, json_out, quiet) -> None:
    """Perplexity of MODEL (a directory, `smollm2-135m`, or a hub id; plain, GPTQ or AWQ)."""
    from qserve.calib_data import check_source
    from qserve.evaluate import evaluate_ppl
    from qserve.hub import resolve_model

    check_source(dataset)
    path = resolve_model(model, progress=not quiet)
    result = evaluate_ppl(path, dataset, seqlen, max_windows, batch_size, device, dtype, progress=not quiet)
    click.echo(
        f"{dataset} perplexity {result.ppl:.4f}  ({result.windows} windows x {result.seqlen} tokens, "
        f"{result.tokens} scored, {result.seconds:.1f}s)  model: {path}"
    )
    if json_out:
        payload = {"model": str(path), **result.to_dict()}
        Path(json_out).write_text(json.dumps(payload, indent=2) + "\n")
