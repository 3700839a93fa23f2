"""Build the engine's model from a checkpoint directory: config, quantization metadata, safetensors.

Quantization metadata is looked up where the ecosystem puts it (docs/formats.md): `quantize_config.json`,
then `quant_config.json`, then `config.json["quantization_config"]`, with AutoAWQ's legacy aliases.
Each Linear is taken from the checkpoint by name: `prefix.qweight` (+ qzeros, scales, g_idx) when
present, else `prefix.weight`, so partially quantized checkpoints (`modules_to_not_convert`) load too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from qserve import kernels
from qserve.errors import CheckpointError, ConfigError
from qserve.quantize.arch import arch_for_config
from qserve.serve.model import (
    MLP,
    Attention,
    CausalLM,
    DecoderLayer,
    ModelConfig,
    RMSNorm,
    RotaryEmbedding,
    SparseMoE,
)
from qserve.serve.quant_linear import Bf16Linear, HalfEmbedding, PackedLinear, QuantSpec, build_linear
from qserve.validate.metadata import find_metadata

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}  # fmt: skip
QUANT_METADATA_FILES = ("quantize_config.json", "quant_config.json")


@dataclass(frozen=True)
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    quant: QuantSpec | None
    hf_config: dict


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: cannot read JSON ({exc}); re-export or re-download the checkpoint"
        ) from exc


def read_quant_spec(model_dir: Path, hf_config: dict) -> QuantSpec | None:
    """The checkpoint's packing, or None for an unquantized checkpoint.

    Read by `qserve validate`'s metadata reader (the same files, aliases, precedence and conflict
    rules), so the engine and the validator can never disagree about what a checkpoint is.
    """
    sources: list[tuple[str, object]] = [
        (name, read_json(model_dir / name)) for name in QUANT_METADATA_FILES if (model_dir / name).exists()
    ]
    if "quantization_config" in hf_config:
        sources.append(("config.json:quantization_config", hf_config["quantization_config"]))
    if not sources:
        return None
    meta, _, findings = find_metadata(sources, has_qweight=True)
    errors = [f for f in findings if f.severity == "error"]
    if meta is None or errors:
        first = errors[0] if errors else None
        detail = f"{first.subject}: {first.line()}" if first else "unreadable quantization metadata"
        raise CheckpointError(f"{model_dir}: {detail} (run `qserve validate {model_dir}` for the full report)")
    try:  # AWQ has no checkpoint_format; QuantSpec keeps its GPTQ default there
        return QuantSpec(meta.method, meta.bits, meta.group_size, meta.checkpoint_format or "gptq", meta.desc_act)
    except ValueError as exc:
        raise CheckpointError(f"{model_dir}: {meta.source}: {exc}") from exc


class SafetensorsWeights:
    """Tensors of a single-file or sharded (`model.safetensors.index.json`) checkpoint, read by name."""

    def __init__(self, model_dir: Path) -> None:
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map", {})
            self._files = {name: model_dir / shard for name, shard in weight_map.items()}
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"{model_dir}: no *.safetensors weights found; qserve loads safetensors only (never pickle)"
                )
            self._files = {}
            for file in files:
                with safe_open(file, framework="pt") as f:
                    self._files.update(dict.fromkeys(f.keys(), file))
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def has_packed(self) -> bool:
        return any(name.endswith(".qweight") for name in self._files)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint; the export is incomplete")
        file = self._files[name]
        if not file.exists():
            raise CheckpointError(f"shard {file} (holding {name!r}) is missing; re-download the checkpoint")
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_tensor(name)

    def linear_part(self, prefix: str, quant: QuantSpec | None) -> torch.Tensor | PackedLinear:
        """`prefix`'s packed tensors if it was quantized, else its dense weight [out, in]."""
        if f"{prefix}.qweight" not in self:
            return self.get(f"{prefix}.weight")
        if quant is None:
            raise CheckpointError(
                f"tensor {prefix}.qweight is packed but the checkpoint has no quantization metadata "
                f"(looked in {', '.join(QUANT_METADATA_FILES)} and config.json quantization_config)"
            )
        g_idx = self.get(f"{prefix}.g_idx") if quant.method == "gptq" and f"{prefix}.g_idx" in self else None
        if g_idx is not None and kernels.g_idx_is_trivial(g_idx, quant.group_size):
            # i // group_size (no act-order, or act-order with static groups): the fused kernel then
            # loads scales once per tile instead of gathering them per input row
            g_idx = None
        return PackedLinear(
            self.get(f"{prefix}.qweight"), self.get(f"{prefix}.qzeros"), self.get(f"{prefix}.scales"), g_idx
        )

    def bias(self, prefix: str, expected: bool) -> torch.Tensor | None:
        if f"{prefix}.bias" in self:
            return self.get(f"{prefix}.bias")
        if expected:
            raise CheckpointError(f"tensor {prefix}.bias is missing but config.json declares biases for it")
        return None


def load_model(
    model_dir: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
    validate: bool = True,
    shard=None,
) -> LoadedModel:
    """Build the model with its weights on `device`, after `qserve validate`'s checks pass (when
    `validate` and the checkpoint is quantized). `shard` (a tensor_parallel.ShardInfo): build only that
    rank's shard: its heads, its intermediate slice, row-parallel o_proj / down_proj."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
    hf_config = read_json(model_dir / "config.json")
    spec = arch_for_config(hf_config)  # ConfigError naming the supported families
    cfg = full_cfg = ModelConfig.from_hf(hf_config)
    quant = read_quant_spec(model_dir, hf_config)
    if shard is not None:
        from qserve.serve import tensor_parallel

        tensor_parallel.check_shardable(full_cfg, quant, shard.world_size)
        cfg = tensor_parallel.local_config(full_cfg, shard.world_size)
    weights = SafetensorsWeights(model_dir)
    # The validator checks quantized checkpoints (it reports a plain model as "not quantized").
    if validate and (quant is not None or weights.has_packed()):
        _validate(model_dir)

    def linear(prefixes: list[str], bias_expected: bool, kind: str | None = None, channels=None, mlp_cfg=None,
               reduce: bool = True) -> torch.nn.Module:  # fmt: skip
        """`mlp_cfg`: the config whose intermediate_size is this MLP's (an expert's); `reduce=False`: a
        row-parallel shard whose all-reduce is the MoE block's, after its experts are summed."""
        parts = [weights.linear_part(p, quant) for p in prefixes]
        biases = [weights.bias(p, bias_expected) for p in prefixes]
        if shard is None or kind is None:
            return build_linear(parts, biases, quant, device, dtype)
        parts, biases = tensor_parallel.shard_linear(kind, parts, biases, mlp_cfg or full_cfg, quant, shard.rank,
                                                     shard.world_size, channels)  # fmt: skip
        if kind in ("qkv", "gate_up") or not reduce:  # column-parallel, or summed by the MoE block
            return build_linear(parts, biases, quant, device, dtype)
        inner = build_linear(parts, [None] * len(parts), quant, device, dtype)
        bias = None if biases[0] is None else biases[0].to(device=device, dtype=dtype)
        return tensor_parallel.RowParallelLinear(inner, bias, shard.comm)

    def expert_mlp(gate: str, up: str, down: str, intermediate_size: int) -> MLP:
        """A routed or shared expert; under tensor parallelism its gate/up column shard and its down row
        shard (not reduced: the MoE block reduces once), act-order experts by whole groups."""
        if shard is None:
            return MLP(linear([gate, up], False), linear([down], False), cfg.hidden_act)
        mcfg = tensor_parallel.mlp_config(full_cfg, intermediate_size)
        channels = tensor_parallel.mlp_channels(weights.linear_part(down, quant), shard.rank, shard.world_size)
        return MLP(linear([gate, up], False, "gate_up", channels, mcfg),
                   linear([down], False, "down", channels, mcfg, reduce=False), cfg.hidden_act)  # fmt: skip

    rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions, cfg.rotary_dim).to(device)  # float32
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        attn_names = [f"{p}.{n}" for n in spec.qkv]  # the family's q|k|v Linears (one if fused)
        attn = Attention(cfg, linear(attn_names, cfg.qkv_bias, "qkv"),
                         linear([f"{p}.self_attn.o_proj"], cfg.o_bias, "o"))  # fmt: skip
        if cfg.num_experts:  # a MoE block: one gate|up and one down per expert, a float router
            gate, up, down = (f"{p}.{spec.experts}.{{e}}.{n}" for n in spec.expert_linears)
            experts = [
                expert_mlp(gate.format(e=e), up.format(e=e), down.format(e=e), full_cfg.expert_intermediate_size)
                for e in range(cfg.num_experts)
            ]
            shared = None
            if spec.shared_expert:  # Qwen2-MoE's dense shared expert
                sp = f"{p}.{spec.shared_expert}"
                shared = expert_mlp(f"{sp}.gate_proj", f"{sp}.up_proj", f"{sp}.down_proj",
                                    full_cfg.shared_expert_intermediate_size)  # fmt: skip
            if shard is None:
                mlp = SparseMoE(cfg, experts, shared)
            else:  # each expert's intermediate slice; one all-reduce of the block's output
                mlp = tensor_parallel.ParallelSparseMoE(cfg, experts, shared, shard.comm)
        else:
            mlp_names = [f"{p}.{n}" for n in spec.gate_up]
            channels = None  # act-order down_proj: each rank's whole groups (tensor_parallel.mlp_channels)
            if shard is not None:
                down = weights.linear_part(f"{p}.mlp.down_proj", quant)
                channels = tensor_parallel.mlp_channels(down, shard.rank, shard.world_size)
            mlp = MLP(linear(mlp_names, cfg.mlp_bias, "gate_up", channels),
                      linear([f"{p}.mlp.down_proj"], cfg.mlp_bias, "down", channels), cfg.hidden_act)  # fmt: skip
        layers.append(DecoderLayer(cfg, attn, mlp))
    # A quantized checkpoint on the CPU keeps its bf16 embeddings and LM head in bf16 (the head's GEMV
    # reads bf16, accumulating in fp32): holding them in fp32 would double the largest tensors left.
    keep_bf16 = device.type == "cpu" and quant is not None and dtype != torch.bfloat16

    def bf16_stored(name: str) -> bool:
        return keep_bf16 and name in weights and weights.get(name).dtype == torch.bfloat16

    # HF ties the head whenever the config says so, even if the file also carries lm_head.weight.
    if cfg.tie_word_embeddings:
        lm_head = None
    elif bf16_stored("lm_head.weight") and "lm_head.qweight" not in weights:
        lm_head = Bf16Linear(weights.get("lm_head.weight"), None)
    else:
        lm_head = linear(["lm_head"], False)
    rotary_local = None if cfg.local_rope is None else RotaryEmbedding(cfg.local_rope, cfg.head_dim, max_positions)
    model = CausalLM(cfg, rotary, layers, lm_head, rotary_local and rotary_local.to(device))
    # Set tensor by tensor rather than model.to(dtype): that would also cast the packed fp16 scales
    # and the float32 RoPE tables.
    params = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    for i in range(cfg.num_layers):
        norms = ["input_layernorm", "post_attention_layernorm"]
        norms += ["self_attn.q_norm", "self_attn.k_norm"] if cfg.qk_norm else []
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if cfg.sandwich_norms else []
        stored = dict(spec.norm_names)  # the family's checkpoint names of the sandwich norms (GLM-4)
        for norm in norms:
            params[f"layers.{i}.{norm}"] = f"model.layers.{i}.{stored.get(norm, norm)}.weight"
        if cfg.num_experts:  # the router: kept unquantized, like the norms
            params[f"layers.{i}.mlp.gate"] = f"model.layers.{i}.{spec.router}.weight"
        if cfg.num_experts and spec.shared_expert_gate:
            params[f"layers.{i}.mlp.shared_expert_gate"] = f"model.layers.{i}.{spec.shared_expert_gate}.weight"
    if bf16_stored("model.embed_tokens.weight"):
        model.embed_tokens = HalfEmbedding(weights.get(params.pop("embed_tokens")), dtype)
    for module_name, tensor_name in params.items():
        weight = weights.get(tensor_name)
        if cfg.norm_offset and isinstance(model.get_submodule(module_name), RMSNorm):
            weight = weight.float() + cfg.norm_offset  # Gemma's norms scale by (1 + w): add the 1 once
        weight = weight.to(device=device, dtype=dtype)
        model.get_submodule(module_name).weight = torch.nn.Parameter(weight, requires_grad=False)
    if dtype == torch.bfloat16 and quant is None:
        # CPU + oneDNN bf16 only; a no-op elsewhere. Not for a quantized model: the copy would add the whole
        # head again (SmolLM2 AWQ: 171 MB resident instead of 115, 1.5x the checkpoint), and users quantize
        # to fit in memory; its batched head GEMMs take the bf16 kernel instead.
        model.pack_tied_head()
    return LoadedModel(model.eval(), cfg, quant, hf_config)


def _validate(model_dir: Path) -> None:
    try:
        from qserve.validate import validate_checkpoint
    except ImportError:  # the validator is optional at this layer; loading still checks every tensor it reads
        return
    report = validate_checkpoint(model_dir)
    if not report.ok:
        raise CheckpointError(f"{model_dir} failed validation:\n{report.format_text()}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX tiles (Sapphire Rapids and later), where oneDNN runs torch's bf16 GEMMs.

    QSERVE_CPU_AUTO_DTYPE=float32|bfloat16 overrides what `auto` picks on the CPU (the test suite pins
    float32 so that its exact comparisons with transformers do not depend on the machine)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


CPU_AUTO_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device, hf_config: dict) -> torch.dtype:
    """'auto': the checkpoint's half dtype on CUDA (bf16 for fp32 checkpoints). On the CPU, bf16 where the
    CPU has AMX, else float32:
    - with AMX (oneDNN's bf16 GEMMs), SmolLM2's 576x1536 GEMM ran 2.3x (M=8) to 3.7x (M=2048) faster in
      bf16 than in fp32, and the engine's 64 x 128 ShareGPT load 1.9x (bench/RESULTS.md section 4);
    - a 4-bit checkpoint too, since its batched steps and prompts multiply on AMX tiles in bf16
      (kernels/cpu_packed.py): the AWQ SmolLM2's 64 x 128 load ran at 414 output tok/s in bf16 against
      174 in fp32 in one run (2026-12-03); batch-1 decode is the int8 kernel either way;
    - without it (AVX2, or AVX512-BF16 alone, unmeasured) bf16 GEMMs ran ~5x slower than fp32 at batch 64
      (21 ms vs 4.5 ms for SmolLM2's MLP at M=64), which outweighs bf16's halved weight reads.
    QSERVE_CPU_AUTO_DTYPE overrides the CPU choice (cpu_has_amx_bf16)."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; use auto or one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type != "cuda":
        forced = os.environ.get("QSERVE_CPU_AUTO_DTYPE", "").strip().lower()
        if forced:
            if forced not in CPU_AUTO_DTYPES:
                raise ConfigError(
                    f"QSERVE_CPU_AUTO_DTYPE={forced!r} is not one of {', '.join(CPU_AUTO_DTYPES)}; unset it or pick one"
                )
            return CPU_AUTO_DTYPES[forced]
        if cpu_has_amx_bf16():
            return torch.bfloat16
        return torch.float32
    declared = _DTYPES.get(str(hf_config.get("torch_dtype") or hf_config.get("dtype") or ""), torch.bfloat16)
    return declared if declared != torch.float32 else torch.bfloat16


def eos_token_ids(model_dir: Path, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json (an int or a list) plus the tokenizer's EOS token."""
    ids: set[int] = set()
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
