"""`qserve quantize MODEL --method awq|gptq|rtn --output DIR`: calibrate and write a GPTQ / AWQ checkpoint.

Every option is a field of `QuantConfig` (same name, dashes for underscores), so a recipe can set any
of them; options given on the command line override the recipe's.
"""

from __future__ import annotations

import dataclasses

import click
from click.core import ParameterSource

from qserve.errors import ConfigError
from qserve.quantize.config import CALIB_MODES, DEVICES, DTYPES, LAYOUTS, METHODS, SYM_SCALES, QuantConfig

_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(QuantConfig) if f.default is not dataclasses.MISSING
}


def _opt(*decls: str, field: str, **kwargs):
    """A click option whose default is QuantConfig's, so the CLI and recipes cannot drift apart."""
    return click.option(*decls, field, default=_DEFAULTS[field], show_default=True, **kwargs)


@click.command("quantize")
@click.argument("model", required=False)
@click.option(
    "--output", "-o", "output", default=None, help="Directory to write the checkpoint to (must not exist)."
)
@click.option(
    "--method", type=click.Choice(METHODS), default=None, help="Algorithm (required unless a recipe sets it)."
)
@click.option(
    "--recipe",
    type=click.Path(dir_okay=False),  # a missing file is reported by load_recipe, with the recipes that exist
    default=None,
    help="YAML recipe; CLI options override it.",
)
@_opt("--bits", field="bits", type=int, help="Bits per weight: 4 (any method) or 8 (GPTQ layout).")
@_opt(
    "--group-size",
    field="group_size",
    type=int,
    help="Input channels per scale/zero group; -1 = one per output channel. Default: automatic, the largest "
    "of 128, 64, 32 that divides every quantized layer's input size (the log says which).",
)
@click.option(
    "--sym/--asym",
    "sym",
    default=None,
    help="Symmetric or zero-point quantization. Default: AWQ zero points; RTN by layout; GPTQ automatic, "
    "symmetric when every layer fits vLLM's Marlin GPTQ kernel, else zero points (the log says which).",
)
@click.option(
    "--format",
    "format",
    type=click.Choice(LAYOUTS),
    default=None,
    help="Checkpoint layout for rtn (gptq/awq write their own).",
)
@_opt(
    "--calib",
    field="calib",
    help="Calibration text: preset (c4, wikitext2, ...), a .txt/.jsonl file, or a hub dataset id.",
)
@click.option(
    "--calib-mode",
    "calib_mode",
    type=click.Choice(CALIB_MODES),
    default=None,
    help="concat documents (AWQ's way) or random windows (GPTQ's); default per method.",
)
@_opt("--n-samples", field="n_samples", type=click.IntRange(min=1), help="Calibration sequences.")
@_opt("--seqlen", field="seqlen", type=click.IntRange(min=2), help="Tokens per calibration sequence.")
@_opt("--seed", field="seed", type=int, help="Seed for sampling calibration text.")
@_opt("--device", field="device", type=click.Choice(DEVICES))
@_opt(
    "--dtype",
    field="dtype",
    type=click.Choice(DTYPES),
    help="Compute dtype of the calibration forwards (auto: the model's half dtype on CUDA; on CPU float32, or bfloat16 for GPTQ on a bf16 model where the CPU has AVX512-BF16/AMX).",
)
@_opt("--damp", field="damp", type=float, help="GPTQ: Hessian damping, fraction of mean(diag(H)).")
@_opt(
    "--desc-act/--no-desc-act",
    field="desc_act",
    help="GPTQ: act-order (columns by descending Hessian diagonal).",
)
@_opt(
    "--static-groups/--no-static-groups",
    field="static_groups",
    help="GPTQ: with act-order, keep groups in the original order (monotonic g_idx).",
)
@_opt(
    "--true-sequential/--no-true-sequential",
    field="true_sequential",
    help="GPTQ: calibrate each sublayer group on the already-quantized earlier ones.",
)
@_opt(
    "--block-size",
    field="block_size",
    type=click.IntRange(min=1),
    help="GPTQ: columns per lazy-update block.",
)
@_opt(
    "--skip-first",
    field="skip_first",
    type=click.IntRange(min=0),
    help="GPTQ: leading tokens of each calibration window left out of the Hessians (attention sinks); "
    "an experiment: 1 measured worse on SmolLM2.",
)
@_opt(
    "--first-token-weight",
    field="first_token_weight",
    type=click.FloatRange(0.0, 1.0),
    help="GPTQ: weight of each calibration window's first token (the attention sink) in the Hessians.",
)
@_opt(
    "--mse/--no-mse",
    field="mse",
    help="GPTQ: choose each group's scale by a search over shrunk ranges (least |w - q|^2.4), "
    "not min/max. Default: on with zero points, off when symmetric.",
)
@_opt(
    "--sym-scale",
    field="sym_scale",
    type=click.Choice(SYM_SCALES),
    help="GPTQ/RTN, symmetric: a group's scale 2*max|w|/15 (absmax, the reference quantizer's; clips a "
    "positive extreme) or max(max/7, -min/8) (signed: both extremes on the -8..7 grid).",
)
@_opt(
    "--gptaq/--no-gptaq",
    field="gptaq",
    help="GPTQ: asymmetric calibration (GPTAQ): fit each layer on the quantized model's inputs to the "
    "float model's outputs, correcting the error carried in from earlier layers. Default: on with zero "
    "points (not on MoE models), off when symmetric.",
)
@_opt(
    "--awq-scales/--no-awq-scales",
    field="awq_scales",
    help="GPTQ: search AWQ's activation-aware per-channel scales first and fold them into the previous "
    "norm/Linear, then run GPTQ on the scaled weights (an identity on the float model).",
)
@_opt(
    "--duo-scaling/--no-duo-scaling",
    field="duo_scaling",
    help="AWQ: scales from activations and weights (s = x^r / w^(1-r)).",
)
@_opt("--clip/--no-clip", field="clip", help="AWQ: search per-group clipping of weights.")
@_opt("--n-grid", field="n_grid", type=click.IntRange(min=1), help="AWQ: ratios tried in the scale search.")
@_opt(
    "--resume", field="resume", is_flag=True, help="Continue an interrupted run from its last finished block."
)
@_opt(
    "--eval/--no-eval",
    field="eval",
    help="Measure WikiText-2 perplexity of the original and quantized model.",
)
@click.option(
    "--eval-windows",
    type=click.IntRange(min=0),
    default=_DEFAULTS["eval_windows"],
    show_default=True,
    help="Windows to score; 0 = all.",
)
@_opt("--eval-seqlen", field="eval_seqlen", type=click.IntRange(min=2), help="Perplexity window length.")
@_opt("--quiet", "-q", field="quiet", is_flag=True, help="No progress bars or info lines.")
@click.pass_context
def quantize(ctx: click.Context, recipe: str | None, **options) -> None:
    """Quantize MODEL (a directory, `smollm2-135m`, or a hub id) to a 4-bit GPTQ or AWQ checkpoint."""
    from qserve.quantize.pipeline import quantize_model

    if options["eval_windows"] == 0:
        options["eval_windows"] = None
    cfg = _build_config(ctx, recipe, options)

    def log(msg: str) -> None:
        # --quiet silences info lines, not warnings.
        if not cfg.quiet or msg.startswith("warning:"):
            click.echo(msg, err=True)

    report = quantize_model(cfg, log=log)
    click.echo(report.output if cfg.quiet else report.format_table())


def _build_config(ctx: click.Context, recipe: str | None, options: dict) -> QuantConfig:
    if recipe is None:
        for name, flag in (("model", "MODEL"), ("output", "--output"), ("method", "--method")):
            if options[name] is None:
                raise click.UsageError(f"missing {flag} (or give a --recipe that sets it)")
        return QuantConfig.from_dict(options)
    try:
        from qserve.recipe import load_recipe
    except ImportError as exc:
        raise ConfigError("--recipe needs qserve.recipe, which this build does not include") from exc
    # Only what the user typed overrides the recipe; click's defaults must not.
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    return load_recipe(recipe).quant_config(**given)
