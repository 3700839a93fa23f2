"""Architecture knowledge, one table per model family.

Everything the quantizers need to know about a family lives here: where the decoder blocks are,
which Linears a block holds (in true-sequential order), and AWQ's (previous op -> linears) scale
groups, plus the few named switches the engine model reads (which checkpoint Linears it fuses into its
q/k/v and gate/up projections, per-head q/k norms). Adding a family means adding one `ArchSpec`, not
editing the algorithms or copying the engine model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qserve.errors import ConfigError


@dataclass(frozen=True)
class ScaleGroup:
    """An AWQ scaling site: scales are divided out of `prev_op` and multiplied into `linears`.

    `inspect` is the submodule (relative to the block; "" = the whole block) whose output measures
    the loss of a candidate scale; `input_of` is the linear whose input activations drive the search.
    `requires_same_shape` names a (prev, next) pair whose weights must have equal shapes for the
    group to apply (v_proj -> o_proj only works without GQA). `prev_tail`: `prev_op` is a fused Linear
    whose last rows alone feed the group (Phi-3's gate_up_proj: only the up half reaches down_proj
    linearly), so the scales divide those rows only.
    """

    prev_op: str
    linears: tuple[str, ...]
    inspect: str
    requires_same_shape: tuple[str, str] | None = None
    prev_tail: bool = False
    # A module whose input is the group's input when the linears themselves see only part of it: a MoE
    # block ("mlp"), whose experts' gate/up each read only the tokens routed to them. Such a group's
    # linears do not share a GPTQ Hessian.
    input_module: str | None = None

    @property
    def input_of(self) -> str:
        return self.input_module or self.linears[0]


@dataclass(frozen=True)
class ArchSpec:
    family: str
    architectures: tuple[str, ...]  # config.architectures values
    model_types: tuple[str, ...]  # config.model_type values
    blocks: str  # attribute path of the decoder block list
    embed: str  # modules that run before block 0 (moved to the device for capture)
    pre_blocks: tuple[str, ...]  # other modules needed before block 0 (rotary embedding)
    sequential: tuple[tuple[str, ...], ...]  # true-sequential groups of linears inside a block
    scale_groups: tuple[ScaleGroup, ...]
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Engine switches (serve/model.py, serve/loader.py). The checkpoint Linears the engine concatenates
    # (along outputs) into its fused q|k|v and gate|up projections: three/two separate Linears, or one
    # already-fused Linear (Phi-3).
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3: self_attn.q_norm / k_norm)
    # Mixture of experts. `experts`: the block's experts module, which transformers holds fused (3-D
    # parameters) and calibration replaces by one Linear per expert projection (quantize/moe.py); names
    # in `sequential` / `scale_groups` containing "{e}" are per expert and expanded by arch_for_config
    # to the config's expert count (the first of `num_experts_keys` present: hub configs of Qwen3-MoE
    # say num_experts, transformers 5 writes num_local_experts). `expert_linears`: an expert's gate, up and down Linear
    # names in checkpoints. `router`: the router Linear, kept in full precision.
    experts: str | None = None
    expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    router: str | None = None
    # Whether the top-k routing weights are renormalised to sum to 1: fixed by the family (Mixtral:
    # always), or None to read the config's norm_topk_prob (Qwen3-MoE).
    renormalize_topk: bool | None = None
    # (transformers' module attribute, the checkpoint's name) for a block child that checkpoints name
    # differently (Mixtral: the MoE is `mlp` in transformers 5, `block_sparse_moe` in every checkpoint).
    renamed: tuple[tuple[str, str], ...] = ()
    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
    methods: tuple[str, ...] = ("rtn", "gptq", "awq")  # quantization methods implemented for the family
    # Linears that read the same input beyond the scale groups' (a MoE expert's gate and up: the shared
    # AWQ group over all experts cannot say it), for GPTQ's one Hessian per input; "{e}": per expert.
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    # Qwen2-MoE: a dense shared expert (an MLP every token goes through) scaled by sigmoid(x . g), with
    # g the full-precision `shared_expert_gate` [1, hidden]; q/k/v biased whatever attention_bias says.
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    qkv_bias: bool = False
    # Gemma 3: RMSNorms scale by (norm_offset + w), attention and MLP outputs are normalised again before
    # the residual adds, embeddings are scaled by sqrt(hidden), sliding layers have their own RoPE base.
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    # (engine name, checkpoint name) of the sandwich norms where a family names them otherwise (GLM-4:
    # post_self_attn_layernorm after attention, post_attention_layernorm before the MLP, post_mlp_layernorm).
    norm_names: tuple[tuple[str, str], ...] = ()
    # GLM-4: RoPE rotates adjacent pairs (2i, 2i + 1) of the first partial_rotary_factor of each head.
    rope_interleaved: bool = False
    o_bias: bool = True  # config.json attention_bias also puts a bias on o_proj (Llama; not GLM-4)

    def with_experts(self, n_experts: int) -> ArchSpec:
        """This table with every per-expert ("{e}") name expanded to experts 0 .. n_experts - 1."""

        def names(group: tuple[str, ...]) -> tuple[str, ...]:
            """Per-expert names for every expert (expert by expert), then the group's other names once."""
            per = tuple(n.format(e=e) for e in range(n_experts) for n in group if "{e}" in n)
            return per + tuple(n for n in group if "{e}" not in n)

        groups = []
        for g in self.scale_groups:
            if not _per_expert((g.prev_op, g.inspect)) and _per_expert(g.linears):  # one group, all experts
                groups.append(replace(g, linears=names(g.linears)))
            elif _per_expert((g.prev_op, g.inspect, *g.linears)):
                groups += [
                    replace(g, prev_op=g.prev_op.format(e=e), inspect=g.inspect.format(e=e),
                            linears=tuple(n.format(e=e) for n in g.linears))
                    for e in range(n_experts)
                ]  # fmt: skip
            else:
                groups.append(g)
        shared = tuple(
            tuple(n.format(e=e) for n in group)
            for group in self.shared_inputs
            for e in (range(n_experts) if _per_expert(group) else (0,))
        )
        return replace(
            self,
            sequential=tuple(names(g) for g in self.sequential),
            scale_groups=tuple(groups),
            shared_inputs=shared,
        )

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)

    @property
    def input_owners(self) -> dict[str, str]:
        """Linear -> the Linear whose inputs it shares: the Linears of one scale group read the same
        input (their shared previous op's output), so GPTQ accumulates H = 2/n sum x x^T once for them."""
        groups = [g.linears for g in self.scale_groups if g.input_module is None] + list(self.shared_inputs)
        return {name: group[0] for group in groups for name in group}

    def solve_groups(self, true_sequential: bool) -> tuple[tuple[str, ...], ...]:
        """GPTQ's groups: true-sequential ones, or every Linear at once."""
        return self.sequential if true_sequential else (self.linears,)

    def collected(self, group: tuple[str, ...]) -> list[str]:
        """The Linears of `group` whose inputs are collected; the others share their owner's."""
        owners = self.input_owners
        return [n for n in group if owners.get(n, n) == n or owners[n] not in group]


_LLAMA_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

_LLAMA_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup(
        "self_attn.v_proj",
        ("self_attn.o_proj",),
        "self_attn.o_proj",
        requires_same_shape=("self_attn.v_proj", "self_attn.o_proj"),
    ),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


def _per_expert(names: tuple[str, ...]) -> bool:
    return any("{e}" in n for n in names)


def _llama_like(
    family: str, architectures: tuple[str, ...], model_types: tuple[str, ...], **switches
) -> ArchSpec:
    return ArchSpec(
        family=family,
        architectures=architectures,
        model_types=model_types,
        blocks="model.layers",
        embed="model.embed_tokens",
        pre_blocks=("model.rotary_emb",),
        sequential=_LLAMA_SEQUENTIAL,
        scale_groups=_LLAMA_SCALE_GROUPS,
        **switches,
    )


# Phi-3 stores q|k|v and gate|up as fused Linears. GPTQ solves each fused Linear as one layer (its rows
# are independent, so this equals solving q, k, v apart on the same H). AWQ scales the fused Linear's
# input like the three separate ones; gate_up -> down divides only the up half (prev_tail: silu(gate) is
# not linear in gate's scale). There is no v -> o group: v is a slice of qkv_proj (AutoAWQ skips it too).
_PHI3_SEQUENTIAL = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))

_PHI3_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_tail=True),
)


# Qwen3-MoE: Qwen3's attention, and a sparse MLP in every block (decoder_sparse_step 1, no
# mlp_only_layers, as the released models): a router (mlp.gate, full precision) picks the top
# num_experts_per_tok of num_experts experts per token. GPTQ runs each expert on the tokens routed to it:
# its gate and up read the same tokens, its down follows in the next true-sequential group. AWQ: one
# scale for every expert's gate/up (folded into the shared norm), searched on the MoE block's input and
# scored on its output, and one up -> down scale per expert on the tokens routed to it.
_MOE_EXPERT = "mlp.experts.{e}"
_QWEN3_MOE = ArchSpec(
    family="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    model_types=("qwen3_moe",),
    blocks="model.layers",
    embed="model.embed_tokens",
    pre_blocks=("model.rotary_emb",),
    sequential=(
        *_LLAMA_SEQUENTIAL[:2],
        (f"{_MOE_EXPERT}.gate_proj", f"{_MOE_EXPERT}.up_proj"),
        (f"{_MOE_EXPERT}.down_proj",),
    ),
    scale_groups=(
        *_LLAMA_SCALE_GROUPS[:2],
        ScaleGroup(
            "post_attention_layernorm",
            (f"{_MOE_EXPERT}.gate_proj", f"{_MOE_EXPERT}.up_proj"),
            "mlp",
            input_module="mlp",
        ),
        ScaleGroup(f"{_MOE_EXPERT}.up_proj", (f"{_MOE_EXPERT}.down_proj",), f"{_MOE_EXPERT}.down_proj"),
    ),
    qk_norm=True,
    experts="mlp.experts",
    router="mlp.gate",
    shared_inputs=((f"{_MOE_EXPERT}.gate_proj", f"{_MOE_EXPERT}.up_proj"),),
)


# Gemma 3 (text, Gemma3ForCausalLM): Llama's Linears and Qwen3's q/k norms; the MLP is read after
# pre_feedforward_layernorm (post_attention_layernorm normalises the attention output instead). Sliding
# and global layers differ only in RoPE base and attention span; the engine caps the context at the
# sliding window, where the two spans coincide. Calibration gives each block its own RoPE tables
# (quantize/capture.py records every block's keyword args). AWQ folds its scales into the (1 + w) norms through
# norm_offset: (1 + w) / s = 1 + w'.
_GEMMA3 = ArchSpec(
    family="gemma3",
    architectures=("Gemma3ForCausalLM",),
    model_types=("gemma3_text",),
    blocks="model.layers",
    embed="model.embed_tokens",
    pre_blocks=("model.rotary_emb",),
    sequential=_LLAMA_SEQUENTIAL,
    scale_groups=(
        *_LLAMA_SCALE_GROUPS[:2],
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        _LLAMA_SCALE_GROUPS[3],
    ),
    qk_norm=True,
    norm_offset=1.0,
    sandwich_norms=True,
)


# Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) and Qwen3-MoE's routed
# experts, plus a shared expert every token goes through, gated by sigmoid(shared_expert_gate x) (kept in
# full precision, like the router). The shared expert's gate/up join the AWQ group over the experts'.
_SHARED = "mlp.shared_expert"
_QWEN2_MOE = replace(
    _QWEN3_MOE,
    family="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    model_types=("qwen2_moe",),
    sequential=(
        *_LLAMA_SEQUENTIAL[:2],
        (f"{_MOE_EXPERT}.gate_proj", f"{_MOE_EXPERT}.up_proj", f"{_SHARED}.gate_proj", f"{_SHARED}.up_proj"),
        (f"{_MOE_EXPERT}.down_proj", f"{_SHARED}.down_proj"),
    ),
    scale_groups=(
        *_LLAMA_SCALE_GROUPS[:2],
        ScaleGroup(
            "post_attention_layernorm",
            (f"{_MOE_EXPERT}.gate_proj", f"{_MOE_EXPERT}.up_proj", f"{_SHARED}.gate_proj", f"{_SHARED}.up_proj"),
            "mlp",
            input_module="mlp",
        ),
        ScaleGroup(f"{_MOE_EXPERT}.up_proj", (f"{_MOE_EXPERT}.down_proj",), f"{_MOE_EXPERT}.down_proj"),
        ScaleGroup(f"{_SHARED}.up_proj", (f"{_SHARED}.down_proj",), f"{_SHARED}.down_proj"),
    ),
    shared_inputs=(
        (f"{_MOE_EXPERT}.gate_proj", f"{_MOE_EXPERT}.up_proj"),
        (f"{_SHARED}.gate_proj", f"{_SHARED}.up_proj"),
    ),
    qk_norm=False,
    shared_expert=_SHARED,
    shared_expert_gate="mlp.shared_expert_gate",
    qkv_bias=True,
)


# Mixtral: Mistral's attention and a MoE in every block, named as the original release does:
# block_sparse_moe.gate (router, full precision) and block_sparse_moe.experts.{e}.w1 / w3 / w2 (gate, up,
# down). Softmax over the experts, top-2, always renormalised. As for Qwen3-MoE, GPTQ runs per expert.
_MIXTRAL_EXPERT = "block_sparse_moe.experts.{e}"
_MIXTRAL = ArchSpec(
    family="mixtral",
    architectures=("MixtralForCausalLM",),
    model_types=("mixtral",),
    blocks="model.layers",
    embed="model.embed_tokens",
    pre_blocks=("model.rotary_emb",),
    sequential=(
        *_LLAMA_SEQUENTIAL[:2],
        (f"{_MIXTRAL_EXPERT}.w1", f"{_MIXTRAL_EXPERT}.w3"),
        (f"{_MIXTRAL_EXPERT}.w2",),
    ),
    scale_groups=(
        *_LLAMA_SCALE_GROUPS[:2],
        ScaleGroup(
            "post_attention_layernorm",
            (f"{_MIXTRAL_EXPERT}.w1", f"{_MIXTRAL_EXPERT}.w3"),
            "block_sparse_moe",
            input_module="block_sparse_moe",
        ),
        ScaleGroup(f"{_MIXTRAL_EXPERT}.w3", (f"{_MIXTRAL_EXPERT}.w2",), f"{_MIXTRAL_EXPERT}.w2"),
    ),
    experts="block_sparse_moe.experts",
    expert_linears=("w1", "w3", "w2"),
    shared_inputs=((f"{_MIXTRAL_EXPERT}.w1", f"{_MIXTRAL_EXPERT}.w3"),),
    router="block_sparse_moe.gate",
    renormalize_topk=True,
    renamed=(("mlp", "block_sparse_moe"),),
)


# GLM-4 (Glm4ForCausalLM, the ChatGLM line in transformers): q/k/v with biases, o without; a fused gate|up
# MLP (Phi-3's AWQ groups: gate_up -> down folds into the up half); extra norms after attention and after
# the MLP; RoPE on adjacent pairs of the first half of each head (partial_rotary_factor 0.5).
_GLM4 = ArchSpec(
    family="glm4",
    architectures=("Glm4ForCausalLM",),
    model_types=("glm4",),
    blocks="model.layers",
    embed="model.embed_tokens",
    pre_blocks=("model.rotary_emb",),
    sequential=(*_LLAMA_SEQUENTIAL[:2], ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    scale_groups=(
        *_LLAMA_SCALE_GROUPS[:2],
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_tail=True),
    ),
    gate_up=("mlp.gate_up_proj",),
    sandwich_norms=True,
    norm_names=(
        ("post_attention_layernorm", "post_self_attn_layernorm"),
        ("pre_feedforward_layernorm", "post_attention_layernorm"),
        ("post_feedforward_layernorm", "post_mlp_layernorm"),
    ),
    rope_interleaved=True,
    o_bias=False,
)


# Llama 2/3 and SmolLM2 share the Llama layout; Mistral and Qwen2 (qkv bias) use the same module names.
# Qwen3 too, plus a per-head RMSNorm on q and k: the norms sit inside self_attn, after the projections,
# so AWQ's input_layernorm -> q/k/v group (inspecting the whole self_attn) already sees them.
ARCHS: tuple[ArchSpec, ...] = (
    _llama_like("llama", ("LlamaForCausalLM",), ("llama",)),
    _llama_like("mistral", ("MistralForCausalLM",), ("mistral",)),
    _llama_like("qwen2", ("Qwen2ForCausalLM",), ("qwen2",)),
    _llama_like("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), qk_norm=True),
    ArchSpec(
        family="phi3",
        architectures=("Phi3ForCausalLM",),
        model_types=("phi3",),
        blocks="model.layers",
        embed="model.embed_tokens",
        pre_blocks=("model.rotary_emb",),
        sequential=_PHI3_SEQUENTIAL,
        scale_groups=_PHI3_SCALE_GROUPS,
        qkv=("self_attn.qkv_proj",),
        gate_up=("mlp.gate_up_proj",),
    ),
    _QWEN3_MOE,
    _GEMMA3,
    _MIXTRAL,
    _GLM4,
    _QWEN2_MOE,
)


def supported_architectures() -> list[str]:
    return [a for spec in ARCHS for a in spec.architectures]


def arch_for_config(config) -> ArchSpec:
    """The ArchSpec for a transformers config (or a config.json dict); ConfigError if unsupported."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    architectures = tuple(get("architectures", None) or ())
    model_type = get("model_type", None)
    for spec in ARCHS:
        if set(architectures) & set(spec.architectures) or model_type in spec.model_types:
            return spec if spec.experts is None else _expanded(spec, get)
    found = ", ".join(architectures) or model_type or "unknown"
    raise ConfigError(
        f"unsupported architecture {found}; qserve supports {', '.join(supported_architectures())}"
    )


def _expanded(spec: ArchSpec, get) -> ArchSpec:
    """A MoE family's table for this config: its expert count checked, its per-expert names expanded."""
    n = next((get(k, None) for k in spec.num_experts_keys if get(k, None) is not None), None)
    if not (isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 4096):
        raise ConfigError(
            f"config.json {' / '.join(spec.num_experts_keys)}={n!r}: a {spec.family} model needs a "
            "positive expert count"
        )
    dense = get("mlp_only_layers", None) or []
    step = get("decoder_sparse_step", 1)
    if dense or step not in (1, None):
        raise ConfigError(
            f"config.json mlp_only_layers={dense} / decoder_sparse_step={step}: qserve supports {spec.family} "
            "models whose every block is a mixture of experts (mlp_only_layers [] and decoder_sparse_step 1)"
        )
    return spec.with_experts(n)
