"""`qserve quantize` end to end: check everything cheap first, then calibrate, export, validate, evaluate.

Order matters for the user: every mistake that can be found from the config, the checkpoint's header
and the data source's existence is reported before a single weight is loaded or a token computed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qserve.errors import CheckpointError, ConfigError
from qserve.quantize.arch import ArchSpec, arch_for_config
from qserve.quantize.config import (
    QuantConfig,
    calibration_warning,
    check_layer_shapes,
    gptq_settings_line,
    resolve_gptq_grid,
    resolve_group_size,
)
from qserve.quantize.driver import quantize_blocks
from qserve.quantize.export import TensorEntry, write_checkpoint
from qserve.quantize.families import prepare_skeleton
from qserve.quantize.lazy_model import LazyCheckpoint, build_skeleton
from qserve.quantize.memory import check_fits, estimate
from qserve.quantize.moe import check_family_options
from qserve.quantize.report import QuantReport, cuda_peak_bytes, peak_rss_bytes
from qserve.quantize.resume import PartialState, fingerprint, partial_dir

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EVAL_DATASET = "wikitext2"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device; use --device cpu (or auto)")
    return device


def model_dtype_of(config) -> torch.dtype:
    """The dtype the checkpoint declares (config.dtype, formerly torch_dtype); float32 if it says nothing."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype, torch.float32)
    return dtype


def compute_dtype_for(cfg: QuantConfig, device: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the block forwards during calibration (`--dtype auto`).

    On a GPU, the model's half dtype. On a CPU, fp32, except GPTQ on a bf16 model where the CPU has
    oneDNN's bf16 GEMMs (AVX512-BF16 / AMX): there the block forwards run in bf16 as they would on a GPU
    (3-4x faster here, and most of a run's time), while the Hessians, the solve and the clipping search
    stay fp32. AWQ keeps fp32 on CPUs (its search compares fp32 outputs of candidate scales; not
    re-measured in bf16)."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    if device.startswith("cuda") and model_dtype in (torch.float16, torch.bfloat16):
        return model_dtype
    if device == "cpu" and cfg.method == "gptq" and model_dtype == torch.bfloat16 and cpu_bf16_fast():
        return torch.bfloat16
    return torch.float32


def cpu_bf16_fast() -> bool:
    """Whether this CPU multiplies bf16 through oneDNN's bf16 GEMMs (AVX512-BF16 or AMX)."""
    from qserve.kernels.cpu_packed import onednn_bf16_supported

    return onednn_bf16_supported()


def _check_output(output: Path, resume: bool) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        what = "a finished checkpoint; nothing to resume" if resume else "not empty"
        raise ConfigError(
            f"output {output} already exists and is {what}; choose another --output or delete it"
        )
    if partial_dir(output).exists() and not resume:
        raise ConfigError(
            f"{partial_dir(output)} holds an interrupted run for {output}; pass --resume to continue it, "
            "or delete that directory to start over"
        )


def _layer_shapes(ckpt: LazyCheckpoint, spec: ArchSpec, n_blocks: int) -> dict[str, tuple[int, int]]:
    names = [f"{spec.blocks}.{i}.{linear}" for i in range(n_blocks) for linear in spec.linears]
    return {n: ckpt.shape(f"{n}.weight") for n in names}


def quantize_model(cfg: QuantConfig, log: Callable[[str], None] = print) -> QuantReport:
    """Run a whole quantization described by `cfg`; returns the report also saved in the output."""
    t_start = time.perf_counter()
    output = Path(cfg.output).expanduser()
    _check_output(output, cfg.resume)

    from transformers import AutoConfig

    from qserve.calib_data import check_source
    from qserve.hub import resolve_model

    model_dir = resolve_model(cfg.model, progress=not cfg.quiet)
    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None):
        raise ConfigError(
            f"{model_dir} is already quantized (config.json has quantization_config); pass the original model"
        )
    spec = arch_for_config(config)
    check_family_options(spec, cfg)
    ckpt = LazyCheckpoint(model_dir)
    n_blocks = config.num_hidden_layers
    shapes = _layer_shapes(ckpt, spec, n_blocks)
    cfg, chosen = resolve_group_size(cfg, shapes)
    check_layer_shapes(cfg, shapes)
    # GPTQ's automatic symmetric / zero points (and MSE, gptaq) by vLLM Marlin fit; resolved before the
    # resume fingerprint, so a resumed run gets (and is checked against) the same values.
    cfg, grid_why = resolve_gptq_grid(cfg, shapes, moe=spec.experts is not None)
    calib_source = check_source(cfg.calib) if cfg.method != "rtn" else None
    if cfg.eval:
        check_source(EVAL_DATASET)
    device = resolve_device(cfg.device)
    model_dtype = model_dtype_of(config)
    compute_dtype = compute_dtype_for(cfg, device, model_dtype)
    est = estimate(ckpt, spec, config, cfg, compute_dtype, device)
    log(
        f"model: {model_dir} ({spec.family}, {n_blocks} blocks, {str(model_dtype).removeprefix('torch.')}); "
        f"block forwards in {str(compute_dtype).removeprefix('torch.')} on {device}"
    )
    log(est.describe())
    if chosen:
        log(chosen)
    if cfg.method == "gptq":
        log(gptq_settings_line(cfg, grid_why))
    warning = calibration_warning(cfg, shapes)
    if warning:
        log(warning)
    check_fits(est)

    calib_ids = None
    if cfg.method != "rtn":
        from transformers import AutoTokenizer

        from qserve.calib_data import get_calib_samples

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        calib_ids = get_calib_samples(
            cfg.calib, tokenizer, cfg.n_samples, cfg.seqlen, cfg.seed, mode=cfg.calib_mode
        )
        log(
            f"calibration: {cfg.n_samples} x {cfg.seqlen} tokens from {cfg.calib} ({cfg.calib_mode}), "
            f"read from {calib_source.describe()}"
        )

    state = PartialState.open(output, fingerprint(model_dir, ckpt, calib_ids, cfg), cfg.resume)
    resumed_from = state.done
    if resumed_from:
        log(f"resuming: blocks 0..{resumed_from - 1} were saved in {state.root}")
    model = build_skeleton(config, compute_dtype)
    prepare_skeleton(model, spec)  # the module tree as checkpoints name it (quantize/families.py)
    blocks = quantize_blocks(
        model, ckpt, spec, cfg, calib_ids, state, torch.device(device), model_dtype, est.hold_float_inputs
    )
    write_checkpoint(output, model_dir, _export_entries(ckpt, spec, state, n_blocks, model_dtype), cfg)
    state.remove()

    report = QuantReport(
        model=str(model_dir),
        output=str(output),
        config=cfg.to_dict(),
        device=device,
        compute_dtype=str(compute_dtype).removeprefix("torch."),
        blocks=blocks,
        quantize_seconds=time.perf_counter() - t_start,
        peak_rss_bytes=peak_rss_bytes(),
        cuda_peak_bytes=cuda_peak_bytes(),
        memory_estimate=est.parts,
        resumed_from_block=resumed_from,
    )
    report.save(output)
    _validate(output, log)
    if cfg.eval:
        report.ppl = _evaluate(model_dir, output, cfg, device, log)
    report.wall_seconds = time.perf_counter() - t_start
    report.save(output)
    return report


def _export_entries(
    ckpt: LazyCheckpoint, spec: ArchSpec, state: PartialState, n_blocks: int, model_dtype: torch.dtype
) -> list[TensorEntry]:
    """Non-block tensors (embedding, final norm, lm_head if untied) from the source in the model dtype,
    then each block's saved tensors."""
    elt = torch.tensor([], dtype=model_dtype).element_size()
    entries = []
    for name in ckpt.names:
        if name.startswith(f"{spec.blocks}."):
            continue
        numel = 1
        for d in ckpt.shape(name):
            numel *= d
        entries.append(TensorEntry(name, numel * elt, functools.partial(_load_as, ckpt, name, model_dtype)))
    for i in range(n_blocks):
        for name, nbytes in state.tensor_names(i):
            entries.append(TensorEntry(name, nbytes, functools.partial(state.load_tensor, i, name)))
    return entries


def _load_as(ckpt: LazyCheckpoint, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = ckpt.load([name])[name]
    return t.to(dtype) if t.is_floating_point() else t


def _validate(output: Path, log: Callable[[str], None]) -> None:
    try:
        from qserve.validate import validate_checkpoint
    except ImportError as exc:
        if not (exc.name or "").startswith("qserve.validate"):
            raise
        log("validate: qserve.validate is not available in this build; skipped")
        return
    result = validate_checkpoint(output)
    if not result.ok:
        raise CheckpointError(
            f"qserve wrote {output} but its own validator rejects it. This is a bug in qserve; please report "
            f"it with this output:\n{result.format_text()}"
        )
    log(f"validate: {output} passes")


def resolve_config(cfg: QuantConfig) -> QuantConfig:
    """`cfg` with its automatic group size and GPTQ grid (sym, mse, gptaq) resolved against the model's
    layers (reads only headers)."""
    if cfg.group_size is not None and not cfg.grid_pending:
        return cfg
    from transformers import AutoConfig

    from qserve.hub import resolve_model

    model_dir = resolve_model(cfg.model, progress=not cfg.quiet)
    config = AutoConfig.from_pretrained(model_dir)
    spec = arch_for_config(config)
    shapes = _layer_shapes(LazyCheckpoint(model_dir), spec, config.num_hidden_layers)
    cfg = resolve_group_size(cfg, shapes)[0]
    return resolve_gptq_grid(cfg, shapes, moe=spec.experts is not None)[0]


def _evaluate(
    model_dir: Path, output: Path, cfg: QuantConfig, device: str, log: Callable[[str], None]
) -> dict:
    from qserve.evaluate import evaluate_ppl, original_ppl

    kwargs = dict(
        dataset=EVAL_DATASET,
        seqlen=cfg.eval_seqlen,
        max_windows=cfg.eval_windows,
        batch_size=1,
        device=device,
        dtype=None,
        progress=not cfg.quiet,
    )
    # Same dataset, seqlen and windows for both, so the two numbers are comparable. The original model's
    # perplexity never changes for the same files and settings: it comes from the cache after the first run.
    original = original_ppl(model_dir, log=log, **kwargs)
    quantized = evaluate_ppl(output, **kwargs)
    log(
        f"eval {EVAL_DATASET}: {original.ppl:.3f} -> {quantized.ppl:.3f} ({quantized.ppl / original.ppl - 1:+.1%}) "
        f"on {quantized.windows} windows x {quantized.seqlen}; quantized scored in {quantized.seconds:.0f} s"
    )
    return {"original": original.to_dict(), "quantized": quantized.to_dict()}
