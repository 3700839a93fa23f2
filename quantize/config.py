"""One frozen `QuantConfig` with a field per `qserve quantize` option.

A recipe's YAML keys map 1:1 onto these fields (`QuantConfig.from_dict`), so every option the CLI
has is also settable from a recipe. The config does no I/O: checks that need the model's shapes live
in `check_layer_shapes`, called once the checkpoint header has been read.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from qserve.errors import ConfigError, RecipeError

METHODS = ("gptq", "awq", "rtn")
LAYOUTS = ("gptq", "awq")
CALIB_MODES = ("concat", "windows")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The GPTQ layout packs 2, 4 and 8 bits per word; 4 is the one every kernel reads, 8 is the plus.
GPTQ_BITS = (4, 8)
AWQ_BITS = (4,)  # AWQ GEMM exists only at 4 bits
# The group sizes an automatic choice picks from, largest first: 128 is the GPTQ/AWQ convention (what
# published checkpoints and the kernels are tuned for); 64 and 32 are the standard fallbacks when a
# layer's input size is not a multiple of 128 (SmolLM2's 576).
AUTO_GROUP_SIZES = (128, 64, 32)
# How a symmetric group's scale is chosen: kernels/packing.py's SYM_SCALES (restated here so that reading a
# config does not import torch; a test keeps the two equal).
SYM_SCALES = ("absmax", "signed")
# A symmetric GPTQ/RTN run's group scale when sym_scale is not given.
DEFAULT_SYM_SCALE = "absmax"

# vLLM's Marlin GPTQ kernel (gptq_marlin), the fast path for GPTQ checkpoints on GPUs, takes symmetric
# weights only (uint4b8 / uint8b128), these group sizes, and Linear shapes its tiles divide: out_features a
# multiple of 64 and in_features a multiple of 128 (and of the group size). A GPTQ checkpoint with zero
# points loads through vLLM's exllama GPTQ kernel, transformers/GPTQModel and qserve instead.
MARLIN_BITS = (4, 8)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_OUT_MULTIPLE = 64
MARLIN_IN_MULTIPLE = 128
# Why a model Marlin cannot run gets zero points with MSE ranges and gptaq (bench/RESULTS.md section 3).
ZERO_POINTS_MEASURED = (
    "zero points + MSE + gptaq measured best on such a model (SmolLM2-135M, hidden 576: 0.576 of "
    "asymmetric RTN's loss recovered at 128 x 512; 9.7% below it at 32 x 512; bench/RESULTS.md section 3)"
)

GPTQ_DEFAULTS_NOTE = (
    "symmetric when every quantized layer fits vLLM's Marlin GPTQ kernel (4/8 bits, group size -1/32/64/128, "
    "out_features % 64 == 0, in_features % 128 == 0; Marlin takes symmetric weights only), otherwise zero "
    "points with MSE ranges and gptaq (read by vLLM's exllama GPTQ kernel, transformers and qserve; measured "
    "best where Marlin cannot run, bench/RESULTS.md section 3); --sym/--asym, --mse/--no-mse and "
    "--gptaq/--no-gptaq choose explicitly. Act-order without static groups (Marlin and exllama read its "
    "g_idx; without act-order GPTQ measured worse than rounding on SmolLM2, with it below rounding: "
    "bench/RESULTS.md, GPTQ section)"
)


@dataclass(frozen=True)
class QuantConfig:
    """Every knob of a quantization run. `sym` and `format` default per method (None = the method's own)."""

    model: str
    output: str
    method: str
    bits: int = 4
    # None = automatic: the largest of AUTO_GROUP_SIZES that divides every quantized layer's in_features,
    # chosen once the checkpoint header is read (`resolve_group_size`). An explicit size is never changed.
    group_size: int | None = None
    # None = the method's default. AWQ: asymmetric ("zero_point": true, as AWQ checkpoints are); RTN: by
    # layout (symmetric GPTQ, asymmetric AWQ). GPTQ: automatic, chosen once the layer shapes are known
    # (`resolve_gptq_grid`): symmetric when every layer fits vLLM's Marlin kernel, else zero points
    # (GPTQ_DEFAULTS_NOTE). An explicit choice is never changed.
    sym: bool | None = None
    format: str | None = None  # checkpoint layout; only rtn may choose, gptq/awq write their own
    calib: str = "c4"
    # How calibration text is cut: None = the method's reference convention (GPTQ: random windows of
    # documents; AWQ and RTN: concatenated documents cut into blocks).
    calib_mode: str | None = None
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # compute dtype; the exported non-quantized tensors keep the model's dtype
    # GPTQ. desc_act defaults per method (None = on for GPTQ, GPTQ_DEFAULTS_NOTE; off for the others).
    damp: float = 0.01
    desc_act: bool | None = None
    static_groups: bool = False
    true_sequential: bool = True
    block_size: int = 128
    # Leading tokens of each calibration window left out of GPTQ's Hessians. A model attends to the
    # first position of any window as an attention sink; that token's activations are outliers (on
    # SmolLM2 79% of a late down_proj's H), which a short calibration window over-weights. Leaving it out
    # lowers that layer's held-out error but made SmolLM2 worse end to end (bench/RESULTS.md): a knob
    # for experiments, off by default.
    skip_first: int = 0
    # Weight of each calibration window's first position (after skip_first) in GPTQ's Hessians. That
    # attention-sink token occurs once per window, so a short window over-weights it against a served
    # context (seqlen/2048 gives it a 2048-token context's share); None = 1, every token alike.
    first_token_weight: float | None = None
    # Each group's scale/zero from a search over shrunk [min, max] ranges (the GPTQ reference
    # quantizer's `mse` option: least sum |w - q(w)|^2.4 per row) instead of the plain min/max.
    # None = automatic (GPTQ): on with zero points, off when symmetric (GPTQ_DEFAULTS_NOTE).
    mse: bool | None = None
    # How a symmetric group's scale covers its range (GPTQ and RTN; SYM_SCALES in kernels/packing.py):
    # "signed" puts both extremes on the -8..7 grid, "absmax" is the reference quantizer's 2*max|w|/15.
    # None = DEFAULT_SYM_SCALE for a symmetric run; an asymmetric run has no use for it.
    sym_scale: str | None = None
    # Asymmetric calibration (the GPTAQ objective, Li et al. 2025): fit each layer's output on the
    # quantized model's inputs to the float model's output on the float model's inputs, instead of to
    # the float layer on the quantized inputs. Corrects the error carried in from earlier layers; costs
    # a float-block forward per block (per true-sequential group when memory is short) and a second
    # copy of the block activations. None = automatic (GPTQ): on with zero points (except on MoE models,
    # which cannot pair the float model's expert inputs), off when symmetric (GPTQ_DEFAULTS_NOTE).
    gptaq: bool | None = None
    # Activation-aware scales before the solve (AWQ's per-channel scale search, folded into the previous
    # norm or Linear, an identity on the float block), then GPTQ on the scaled weights. The scales give
    # the channels that carry large activations finer steps on the grid, which GPTQ's column-by-column
    # updates alone cannot: see GPTQ_DEFAULTS_NOTE and bench/RESULTS.md section 3.
    awq_scales: bool = False
    # AWQ
    duo_scaling: bool = True
    clip: bool = True
    n_grid: int = 20
    # run control
    resume: bool = False
    eval: bool = True
    eval_windows: int | None = 16  # None = every window
    eval_seqlen: int = 2048
    quiet: bool = False

    def __post_init__(self) -> None:
        _one_of("method", self.method, METHODS)
        if self.format is None:
            object.__setattr__(self, "format", "awq" if self.method == "awq" else "gptq")
        _one_of("format", self.format, LAYOUTS)
        if self.method != "rtn" and self.format != self.method:
            raise ConfigError(
                f"format={self.format!r} does not go with method={self.method!r}: {self.method} writes the "
                f"{self.method} layout; only --method rtn can choose --format"
            )
        if self.sym is None and self.method == "gptq" and self.sym_scale is not None:
            # A symmetric scale rule was asked for: that is a choice of symmetric weights.
            object.__setattr__(self, "sym", True)
        if self.sym is None and self.method != "gptq":
            object.__setattr__(self, "sym", self.format == "gptq")
        # GPTQ with zero points takes MSE ranges and gptaq (measured best); symmetric GPTQ and the other
        # methods neither. GPTQ's gptaq with zero points waits for resolve_gptq_grid, which knows whether the
        # model is MoE.
        if self.mse is None and (self.method != "gptq" or self.sym is not None):
            object.__setattr__(self, "mse", self.method == "gptq" and not self.sym)
        if self.gptaq is None and (self.method != "gptq" or self.sym):
            object.__setattr__(self, "gptaq", False)
        if self.desc_act is None:
            object.__setattr__(self, "desc_act", self.method == "gptq")
        if self.sym_scale is not None:
            _one_of("sym_scale", self.sym_scale, SYM_SCALES)
            if self.sym is False:
                raise ConfigError(
                    f"sym_scale={self.sym_scale!r} chooses a symmetric group's scale, but this run stores zero "
                    "points (--asym); drop --sym-scale or quantize with --sym"
                )
            if self.method == "awq":
                raise ConfigError(
                    f"sym_scale={self.sym_scale!r} is a GPTQ/RTN option; AWQ's scale and clipping search "
                    "chooses its own ranges (drop --sym-scale)"
                )
        elif self.sym and self.method != "awq":
            object.__setattr__(self, "sym_scale", DEFAULT_SYM_SCALE)
        allowed_bits = AWQ_BITS if self.format == "awq" else GPTQ_BITS
        if self.bits not in allowed_bits:
            raise ConfigError(
                f"bits={self.bits} is not available in the {self.format} layout; use one of {allowed_bits}"
                + (" (AWQ GEMM is 4-bit only; use --method gptq for 8-bit)" if self.format == "awq" else "")
            )
        if self.group_size is not None and self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size}: expected a positive size or -1 (per channel)")
        if self.method != "gptq" and (self.desc_act or self.static_groups):
            raise ConfigError(
                f"desc_act/static_groups are GPTQ options; method={self.method!r} has no act-order "
                "(the AWQ layout has no g_idx)"
            )
        if self.calib_mode is None:
            object.__setattr__(self, "calib_mode", "windows" if self.method == "gptq" else "concat")
        _one_of("calib_mode", self.calib_mode, CALIB_MODES)
        _one_of("device", self.device, DEVICES)
        _one_of("dtype", self.dtype, DTYPES)
        for name in ("n_samples", "seqlen", "block_size", "n_grid", "eval_seqlen"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise ConfigError(f"eval_windows={self.eval_windows}: expected a positive integer or None (all)")
        if self.skip_first < 0 or self.skip_first >= self.seqlen:
            raise ConfigError(
                f"skip_first={self.skip_first}: expected 0 <= skip_first < seqlen ({self.seqlen}); it is the "
                "number of leading tokens of each calibration window left out of GPTQ's Hessians"
            )
        if self.skip_first and self.method != "gptq":
            raise ConfigError(
                f"skip_first={self.skip_first} is a GPTQ option (tokens left out of its Hessians); "
                f"method={self.method!r} does not use it"
            )
        if self.mse and self.method != "gptq":
            raise ConfigError(
                f"mse is a GPTQ option (its per-group range search); method={self.method!r} does not use it"
                + (" (AWQ has its own clipping search, --clip)" if self.method == "awq" else "")
            )
        if self.gptaq and self.method != "gptq":
            raise ConfigError(
                f"gptaq is a GPTQ option (asymmetric calibration of its solve); method={self.method!r} "
                "does not use it"
            )
        if self.awq_scales and self.method != "gptq":
            raise ConfigError(
                f"awq_scales is a GPTQ option (AWQ's scale search before the GPTQ solve); "
                f"method={self.method!r} does not use it"
                + (" (--method awq always searches scales)" if self.method == "awq" else "")
            )
        if self.first_token_weight is not None:
            if self.method != "gptq":
                raise ConfigError(
                    f"first_token_weight={self.first_token_weight} is a GPTQ option (a weight in its "
                    f"Hessians); method={self.method!r} does not use it"
                )
            if not 0.0 <= self.first_token_weight <= 1.0:
                raise ConfigError(
                    f"first_token_weight={self.first_token_weight}: expected a weight in [0, 1] "
                    "(1 = every token counts the same, 0 = like skip_first=1)"
                )
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"damp={self.damp}: expected a fraction of mean(diag(H)) in (0, 1), e.g. 0.01")
        if not self.model or not self.output:
            raise ConfigError("model and output must both be given")

    # ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Build from plain data (a recipe merged with CLI options); unknown keys and wrong types are
        RecipeErrors naming the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise RecipeError(
                f"unknown key(s) {', '.join(map(repr, unknown))}; valid keys are: {', '.join(fields)}"
            )
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise RecipeError(f"missing required key(s) {', '.join(map(repr, missing))}")
        for key, value in d.items():
            _check_type(key, value, _FIELD_TYPES[key])
        return cls(**d)

    @property
    def grid_pending(self) -> bool:
        """True while GPTQ's automatic choices (sym, and with it mse/gptaq) wait for the layer shapes."""
        return self.sym is None or self.mse is None or self.gptaq is None

    def fingerprint_dict(self) -> dict[str, Any]:
        """The fields that decide the quantized tensors (what a resumed run must share): the resolved
        values, so that a resumed run cannot flip an automatic choice."""
        if self.grid_pending:
            raise ValueError("fingerprint_dict needs resolved sym/mse/gptaq; call resolve_gptq_grid first")
        skip = {"output", "resume", "eval", "eval_windows", "eval_seqlen", "quiet", "model"}
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        d["first_token_weight"] = self.resolved_first_token_weight()
        return d

    def resolved_first_token_weight(self) -> float:
        """The weight GPTQ gives each calibration window's first token in its Hessians."""
        # Default 1: down-weighting the sink token (0.25 with --mse) measured no better on SmolLM2.
        return 1.0 if self.first_token_weight is None else float(self.first_token_weight)


# Field types for recipe checking; kept explicit because annotations are strings under
# `from __future__ import annotations` and a recipe must not smuggle a str into an int field.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "output": (str,),
    "method": (str,),
    "bits": (int,),
    "group_size": (int, type(None)),
    "sym": (bool, type(None)),
    "format": (str, type(None)),
    "calib": (str,),
    "calib_mode": (str, type(None)),
    "n_samples": (int,),
    "seqlen": (int,),
    "seed": (int,),
    "device": (str,),
    "dtype": (str,),
    "damp": (float, int),
    "desc_act": (bool, type(None)),
    "static_groups": (bool,),
    "true_sequential": (bool,),
    "block_size": (int,),
    "skip_first": (int,),
    "first_token_weight": (float, int, type(None)),
    "mse": (bool, type(None)),
    "sym_scale": (str, type(None)),
    "gptaq": (bool, type(None)),
    "awq_scales": (bool,),
    "duo_scaling": (bool,),
    "clip": (bool,),
    "n_grid": (int,),
    "resume": (bool,),
    "eval": (bool,),
    "eval_windows": (int, type(None)),
    "eval_seqlen": (int,),
    "quiet": (bool,),
}


def _check_type(key: str, value: Any, types: tuple[type, ...]) -> None:
    # bool is an int subclass: `bits: true` must not pass as bits=1.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise RecipeError(f"key {key!r}: expected {names}, found {type(value).__name__} {value!r}")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def check_layer_shapes(cfg: QuantConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse, before any calibration, a group size or bit width that some layer cannot be packed with.

    `shapes` maps each Linear to be quantized to its weight shape (out, in).
    """
    if cfg.group_size is None:
        raise ValueError("check_layer_shapes needs a resolved group size; call resolve_group_size first")
    per_word = 32 // cfg.bits
    bad_group: dict[str, int] = {}
    bad_pack: dict[str, tuple[int, int]] = {}
    for name, (out_f, in_f) in shapes.items():
        if cfg.group_size != -1 and in_f % cfg.group_size:
            bad_group[name] = in_f
        # qweight packs `in` (GPTQ) or `out` (AWQ) into words; qzeros packs `out` in both layouts.
        if in_f % per_word or out_f % per_word:
            bad_pack[name] = (out_f, in_f)
    if bad_group:
        fit = suggest_group_sizes(list({in_f for _, in_f in shapes.values()}))
        raise ConfigError(
            f"group_size={cfg.group_size} does not divide the input size of {len(bad_group)} layer(s): "
            f"{_summarise(bad_group)}. Every quantized layer needs in_features % group_size == 0 "
            f"(AutoAWQ and the kernels require it); use --group-size {' or '.join(map(str, fit))}"
        )
    if bad_pack:
        listed = ", ".join(f"{n} {s}" for n, s in list(bad_pack.items())[:4])
        raise ConfigError(
            f"{len(bad_pack)} layer(s) have (out, in) not divisible by {per_word} and cannot be packed "
            f"at {cfg.bits} bits: {listed}"
        )


# GPTQ's update solves with H = 2 X X^T over the calibration tokens: an in x in matrix estimated from
# n tokens. n < in makes H singular (only the damping keeps it invertible); for n a few times in, the
# smallest eigenvalues of a sample covariance are shrunk by about (1 - sqrt(in / n))^2 (Marchenko-Pastur),
# and H^-1, which steers every GPTQ update, is led by exactly those directions. At n = 16 x in that
# factor is 0.56; at 4 x in it is 0.25. Measured on SmolLM2-135M (widest in_features 1536, bench/RESULTS.md):
# 16 x 512 tokens (5.3 x 1536) +48.9% WikiText-2 perplexity, 32 x 512 (10.7x) +34.4%, while 128 x 512
# (42.7x) all GPTQ variants answer the smoke question. Hence a warning below 16 tokens per input channel.
GPTQ_MIN_TOKENS_PER_IN_FEATURE = 16
# AWQ reduces its calibration to per-channel mean |x| (a first moment, stable with far fewer tokens) and
# searches scales and clips on a strided subset of 2048 token rows (quantize/awq.py `search_tokens`):
# fewer calibration tokens than that budget means the search sees fewer rows than it was designed for.
AWQ_MIN_TOKENS = 2048


def calibration_warning(cfg: QuantConfig, shapes: dict[str, tuple[int, int]]) -> str | None:
    """A warning when the calibration token count is below what `cfg.method` needs for these layers."""
    if cfg.method == "rtn" or not shapes:
        return None
    tokens = cfg.n_samples * (cfg.seqlen - cfg.skip_first)
    size = f"{cfg.n_samples} x {cfg.seqlen} = {tokens} calibration tokens"
    if cfg.method == "gptq":
        widest_name, (_, widest) = max(shapes.items(), key=lambda kv: kv[1][1])
        need = GPTQ_MIN_TOKENS_PER_IN_FEATURE * widest
        if tokens >= need:
            return None
        worse = (
            f"fewer than its {widest} input channels, so its Hessian is singular and only the damping keeps "
            "it invertible"
            if tokens < widest
            else f"{tokens / widest:.1f} per input channel"
        )
        return (
            f"warning: {size} is too few for GPTQ on this model: the widest quantized layer "
            f"({_suffix(widest_name)}, in_features {widest}) gets {worse}. GPTQ needs about "
            f"{GPTQ_MIN_TOKENS_PER_IN_FEATURE} tokens per input channel ({need} here) for a well-conditioned "
            f"Hessian; expect a large perplexity loss. Raise --n-samples to at least "
            f"{-(-need // (cfg.seqlen - cfg.skip_first))} (or --seqlen), or use --method awq."
        )
    if tokens >= AWQ_MIN_TOKENS:
        return None
    return (
        f"warning: {size} is fewer than AWQ's scale/clip search budget of {AWQ_MIN_TOKENS} tokens; the "
        f"search sees fewer token rows than it is designed for. Raise --n-samples to at least "
        f"{-(-AWQ_MIN_TOKENS // cfg.seqlen)} (or --seqlen)."
    )


def _suffix(name: str) -> str:
    return ".".join(p if not p.isdigit() else "*" for p in name.split("."))


def resolve_group_size(
    cfg: QuantConfig, shapes: dict[str, tuple[int, int]]
) -> tuple[QuantConfig, str | None]:
    """`cfg` with a concrete group size, and a log line saying which was chosen and why (None when the
    user set one).

    Automatic choice: the largest of AUTO_GROUP_SIZES dividing every quantized layer's in_features. A
    model none of them fits is a ConfigError listing what would (per channel, -1, always does).
    """
    if cfg.group_size is not None:
        return cfg, None
    in_features = sorted({in_f for _, in_f in shapes.values()})
    fits = [g for g in AUTO_GROUP_SIZES if all(f % g == 0 for f in in_features)]
    if not fits:
        fit = suggest_group_sizes(in_features)
        raise ConfigError(
            f"no standard group size ({', '.join(map(str, AUTO_GROUP_SIZES))}) divides every quantized layer's "
            f"input size (in_features {', '.join(map(str, in_features))}); pass --group-size "
            f"{' or '.join(map(str, fit))}"
        )
    chosen = fits[0]
    skipped = [g for g in AUTO_GROUP_SIZES if g > chosen]
    why = (
        f"the largest standard size dividing every quantized layer's in_features "
        f"({', '.join(map(str, in_features))})"
    )
    if skipped:
        misfit = {g: [f for f in in_features if f % g] for g in skipped}
        why += "; " + "; ".join(
            f"{g} does not divide {', '.join(map(str, bad))}" for g, bad in misfit.items()
        )
    msg = f"group size: {chosen} (automatic: {why}; set --group-size to choose)"
    return dataclasses.replace(cfg, group_size=chosen), msg


def suggest_group_sizes(in_features: list[int]) -> list[int]:
    """Power-of-two group sizes (32..256, largest first) dividing every input size, then -1."""
    g = math.gcd(*in_features)
    return [s for s in (256, 128, 64, 32) if g % s == 0] + [-1]


def _summarise(bad: dict[str, int]) -> str:
    """Collapse per-block names (model.layers.N.mlp.down_proj) so 30 blocks read as one line."""
    by_suffix: dict[str, tuple[int, int]] = {}
    for name, in_f in bad.items():
        parts = name.split(".")
        suffix = ".".join(p if not p.isdigit() else "*" for p in parts)
        count, _ = by_suffix.get(suffix, (0, in_f))
        by_suffix[suffix] = (count + 1, in_f)
    return "; ".join(f"{s} (in_features {in_f}, {n}x)" for s, (n, in_f) in by_suffix.items())


def marlin_misfits(cfg: QuantConfig, shapes: dict[str, tuple[int, int]]) -> list[str]:
    """Why vLLM's Marlin GPTQ kernel cannot run these layers at `cfg`'s bits and (resolved) group size,
    one reason per kind of layer and dimension; empty when it can (symmetric weights given)."""
    reasons = []
    if cfg.bits not in MARLIN_BITS:
        reasons.append(f"{cfg.bits} bits is not one Marlin takes ({' or '.join(map(str, MARLIN_BITS))})")
    if cfg.group_size not in MARLIN_GROUP_SIZES:
        reasons.append(
            f"group size {cfg.group_size} is not one Marlin takes ({', '.join(map(str, MARLIN_GROUP_SIZES))})"
        )
    # (dimension, size, multiple) -> the kinds of layer (per-block names collapsed) that miss it
    misses: dict[tuple[str, int, int], list[str]] = {}
    for name, (out_f, in_f) in shapes.items():
        checks = (
            ("out_features", out_f, MARLIN_OUT_MULTIPLE),
            ("in_features", in_f, MARLIN_IN_MULTIPLE),
            ("in_features", in_f, cfg.group_size if cfg.group_size and cfg.group_size > 0 else 1),
        )
        for dim, size, multiple in checks:
            kinds = misses.setdefault((dim, size, multiple), [])
            if size % multiple and _suffix(name) not in kinds:
                kinds.append(_suffix(name))
    for (dim, size, multiple), kinds in misses.items():
        if kinds:
            more = f" and {len(kinds) - 1} more kind(s) of layer" if len(kinds) > 1 else ""
            reasons.append(f"{kinds[0]}{more}: {dim} {size} is not a multiple of {multiple}")
    return reasons


def resolve_gptq_grid(
    cfg: QuantConfig, shapes: dict[str, tuple[int, int]], moe: bool = False
) -> tuple[QuantConfig, str | None]:
    """`cfg` with GPTQ's automatic sym (and with it mse and gptaq) resolved for these layers, and why
    (None when nothing was automatic). Needs a resolved group size (`resolve_group_size`).

    Symmetric when vLLM's Marlin GPTQ kernel can run every layer (`marlin_misfits` is empty): Marlin takes
    symmetric weights only. Otherwise zero points, with MSE ranges and gptaq unless the user chose them
    (gptaq stays off on a mixture-of-experts model, `moe`, where it is not supported). Explicit values are
    never changed, so resolving twice (a resumed run) gives the same config.
    """
    if not cfg.grid_pending:
        return cfg, None
    if cfg.group_size is None:
        raise ValueError("resolve_gptq_grid needs a resolved group size; call resolve_group_size first")
    if cfg.sym is not None:  # an explicit choice; only gptaq is left to resolve
        gptaq = cfg.gptaq if cfg.gptaq is not None else not cfg.sym and not moe
        why = None
        if moe and not cfg.sym and cfg.gptaq is None:
            why = "--asym; gptaq stays off: it is not supported for mixture-of-experts models"
        return dataclasses.replace(cfg, gptaq=gptaq), why
    misfits = marlin_misfits(cfg, shapes)
    if not misfits:
        why = (
            f"auto: every quantized layer fits vLLM's Marlin GPTQ kernel ({cfg.bits} bits, group size "
            f"{cfg.group_size}, out_features % {MARLIN_OUT_MULTIPLE} == 0, in_features % {MARLIN_IN_MULTIPLE} "
            "== 0), which takes symmetric weights only; --asym for zero points"
        )
        gptaq = False if cfg.gptaq is None else cfg.gptaq
        return dataclasses.replace(cfg, sym=True, gptaq=gptaq), why
    listed = "; ".join(misfits[:2]) + (f" (and {len(misfits) - 2} more)" if len(misfits) > 2 else "")
    why = f"auto: {listed}, so vLLM's Marlin kernel cannot run this model; {ZERO_POINTS_MEASURED}"
    gptaq = cfg.gptaq
    if gptaq is None:
        gptaq = not moe
        if moe:
            why += "; gptaq stays off: it is not supported for mixture-of-experts models"
    return dataclasses.replace(cfg, sym=False, gptaq=gptaq), why + "; --sym to choose symmetric"


def gptq_settings_line(cfg: QuantConfig, why: str | None = None) -> str:
    """The GPTQ settings in force, one line for the start of a run, with why the defaults are what they are.

    `why`: how the automatic sym choice was made (`resolve_gptq_grid`'s second value)."""
    if cfg.sym is None:
        grid = "symmetric or zero points (automatic: chosen once the layer shapes are read)"
    elif cfg.sym:
        grid = f"symmetric ({cfg.sym_scale or DEFAULT_SYM_SCALE} scale{'; ' + why if why else ''})"
    else:
        grid = f"zero points ({why or 'asymmetric'})"
    parts = [
        grid,
        ("act-order" + (" + static groups" if cfg.static_groups else "")) if cfg.desc_act else "no act-order",
        "MSE ranges with zero points" if cfg.mse is None else "MSE ranges" if cfg.mse else "min/max ranges",
        f"first-token weight {cfg.resolved_first_token_weight():g}",
        f"damp {cfg.damp:g}",
    ]
    if cfg.awq_scales:
        parts.append("AWQ scales")
    if cfg.gptaq:
        parts.append("gptaq")
    elif cfg.gptaq is None:
        parts.append("gptaq with zero points")
    if cfg.skip_first:
        parts.append(f"skip first {cfg.skip_first}")
    return f"gptq: {', '.join(parts)}. Defaults: {GPTQ_DEFAULTS_NOTE}."
