"""Perplexity in the GPTQ/AWQ-paper protocol, on plain and quantized checkpoints.

Protocol (docs/benchmarks.md): the WikiText-2 test rows joined with "\\n\\n", tokenized once,
cut into non-overlapping `seqlen` windows (remainder dropped); perplexity = exp(mean token NLL over the
windows). Every comparison uses the same windows, so a report always says how many.

`load_causal_lm` is the model-loading seam: a plain Hugging Face checkpoint loads through transformers;
a GPTQ or AWQ-GEMM checkpoint is rebuilt as a dense model whose Linear weights are dequantized through
the shared packed-format code (kernels/packing.py), so `eval ppl` runs unchanged on quantized output.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from qserve.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class PplResult:
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    windows: int
    tokens: int  # tokens scored (windows * (seqlen - 1))
    seqlen: int
    seconds: float
    dataset: str

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve_dtype(dtype, device: str):
    import torch

    if dtype in (None, "auto"):
        # fp32 on CPU: bf16 matmuls are slower here and perplexity should not depend on the eval dtype.
        return torch.float32 if device == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available; use --device cpu")
    return device


def load_causal_lm(path: str | Path, dtype="auto", device: str = "auto"):
    """A transformers causal LM for `path` (plain, GPTQ or AWQ-GEMM), in eval mode on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    from qserve.quantize.arch import arch_for_config
    from qserve.quantize.families import prepare_skeleton
    from qserve.serve.loader import read_json, read_quant_spec

    # One reader of quantization metadata (file locations, aliases, legacy AutoAWQ keys) for eval and serving.
    spec = read_quant_spec(path, read_json(path / "config.json"))
    if spec is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        return model.to(device).eval()

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    # checkpoints name each MoE expert's Linears (transformers holds them fused) and store no Gemma
    # embedding scale: the tree is made to match them, as for calibration
    prepare_skeleton(model, arch_for_config(config))
    state = _dense_state_dict(path, spec, torch_dtype)
    missing = [k for k in model.state_dict() if k not in state and not _is_tied(model, k)]
    if missing:
        raise CheckpointError(f"{path}: tensors missing for {len(missing)} parameters, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild those modules for real.
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, type(module)(config=module.config))
    return model.to(device).eval()


def _is_tied(model, key: str) -> bool:
    return key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def _dense_state_dict(path: Path, spec, dtype) -> dict:
    """Every tensor of the checkpoint, with quantized Linears dequantized into `<prefix>.weight`."""
    from safetensors import safe_open

    from qserve.kernels.packing import dequantize_awq, dequantize_gptq

    method, bits, group_size = spec.method, spec.bits, spec.group_size
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files")
    raw: dict = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                raw[k] = sf.get_tensor(k)
    state = {}
    for k, v in raw.items():
        if k.endswith(".qweight"):
            prefix = k[: -len(".qweight")]
            if method == "awq":
                w = dequantize_awq(v, raw[f"{prefix}.qzeros"], raw[f"{prefix}.scales"], group_size)
            else:
                w = dequantize_gptq(
                    v,
                    raw[f"{prefix}.qzeros"],
                    raw[f"{prefix}.scales"],
                    raw.get(f"{prefix}.g_idx"),
                    bits,
                    group_size,
                    spec.checkpoint_format,
                )
            state[f"{prefix}.weight"] = w.to(dtype)
        elif k.endswith((".qzeros", ".scales", ".g_idx")):
            continue
        else:
            state[k] = v.to(dtype) if v.is_floating_point() else v
    return state


def eval_tokens(tokenizer, dataset: str = "wikitext2"):
    """The dataset's rows joined with "\\n\\n" and tokenized once: LongTensor [1, N]."""
    from qserve.calib_data import load_eval_rows

    text = "\n\n".join(load_eval_rows(dataset))
    return tokenizer(text, return_tensors="pt").input_ids


def perplexity(
    model,
    tokens,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    dataset: str = "wikitext2",
) -> PplResult:
    """exp(mean NLL) over non-overlapping `seqlen` windows of `tokens` [1, N]."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    n_windows = tokens.shape[1] // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ConfigError(f"{dataset} has {tokens.shape[1]} tokens: fewer than one window of seqlen={seqlen}")
    device = next(model.parameters()).device
    windows = tokens[0, : n_windows * seqlen].view(n_windows, seqlen)  # [W, seqlen]
    total_nll, start = 0.0, time.perf_counter()
    bar = tqdm(total=n_windows, desc=f"ppl {dataset}", unit="win", disable=not progress)
    with torch.inference_mode():
        for i in range(0, n_windows, batch_size):
            batch = windows[i : i + batch_size].to(device)
            logits = model(batch, use_cache=False).logits.float()
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            bar.update(batch.shape[0])
    bar.close()
    scored = n_windows * (seqlen - 1)
    mean_nll = total_nll / scored
    return PplResult(
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        windows=n_windows,
        tokens=scored,
        seqlen=seqlen,
        seconds=time.perf_counter() - start,
        dataset=dataset,
    )


def evaluate_ppl(
    model_path,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    dtype=None,
    progress: bool = True,
) -> PplResult:
    """Load `model_path` (plain or quantized) and measure its perplexity on `dataset`."""
    from transformers import AutoTokenizer

    from qserve.calib_data import check_source

    check_source(dataset)  # fail before loading the model
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokens = eval_tokens(tokenizer, dataset)
    model = load_causal_lm(model_path, dtype=dtype or "auto", device=device)
    return perplexity(model, tokens, seqlen, max_windows, batch_size, progress, dataset)


# Bumped whenever the protocol or the numbers it produces change, so older cache entries stop matching.
PPL_CACHE_VERSION = 1


def ppl_cache_dir() -> Path:
    """Where original-model perplexities are cached: $QSERVE_HOME/ppl (default ~/.cache/qserve/ppl)."""
    from qserve.hub import qserve_home

    return qserve_home() / "ppl"


def _safetensors_header_sha256(path: Path) -> str:
    """sha256 of a safetensors file's header (names, dtypes, shapes, offsets); reads only the header."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return hashlib.sha256(fh.read(min(n, 100 * 1024 * 1024))).hexdigest()


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def ppl_cache_key(
    model_dir: str | Path,
    dataset: str,
    seqlen: int,
    max_windows: int | None,
    batch_size: int,
    device: str,
    dtype,
) -> dict:
    """Everything the original model's perplexity depends on: its weight files (path, size, mtime and the
    safetensors header), its config and tokenizer files, the evaluation text file, and the settings."""
    from qserve.calib_data import resolve_source

    model_dir = Path(model_dir)
    device = _resolve_device(device)
    weights = []
    for f in sorted(model_dir.glob("*.safetensors")):
        weights.append({**_file_key(f), "header_sha256": _safetensors_header_sha256(f)})
    others = [
        _file_key(model_dir / name)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json")
        if (model_dir / name).is_file()
    ]
    src = resolve_source(dataset)
    text = [_file_key(p) for p in src.paths] if src.paths else [list(src.hub or ())]
    return {
        "version": PPL_CACHE_VERSION,
        "weights": weights,
        "files": others,
        "dataset": dataset,
        "text": text,
        "seqlen": seqlen,
        "max_windows": max_windows,
        "batch_size": batch_size,
        "device": device.split(":")[0],
        "dtype": str(_resolve_dtype(dtype, device)).removeprefix("torch."),
    }


def original_ppl(
    model_dir: str | Path,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    dtype=None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    cache: bool = True,
) -> PplResult:
    """`evaluate_ppl` for an unquantized model, cached: the same weight files and evaluation settings give
    the same number, so it is computed once (`ppl_cache_dir()`, one JSON file per key) and reused."""
    kwargs = dict(
        dataset=dataset,
        seqlen=seqlen,
        max_windows=max_windows,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
    if not cache:
        return evaluate_ppl(model_dir, progress=progress, **kwargs)
    key = ppl_cache_key(model_dir, dataset, seqlen, max_windows, batch_size, device, dtype)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    entry = ppl_cache_dir() / f"{digest}.json"
    if entry.is_file():
        try:
            saved = json.loads(entry.read_text())
            if saved.get("key") == key:
                result = PplResult(**{f.name: saved["result"][f.name] for f in fields(PplResult)})
                log(
                    f"original perplexity from cache ({entry}): {result.ppl:.4f} on {result.windows} windows x "
                    f"{result.seqlen} (computed once in {result.seconds:.0f} s)"
                )
                return result
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log(f"ignoring unreadable perplexity cache entry {entry} ({type(exc).__name__}); recomputing")
    result = evaluate_ppl(model_dir, progress=progress, **kwargs)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "result": result.to_dict()}, indent=1) + "\n")
        tmp.replace(entry)
        log(f"original perplexity {result.ppl:.4f} computed in {result.seconds:.0f} s; cached in {entry}")
    except OSError as exc:
        log(f"original perplexity {result.ppl:.4f}; could not cache it in {entry} ({exc.strerror})")
    return result
