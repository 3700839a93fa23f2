"""Shape arithmetic of the packed formats (docs/formats.md), with no torch import.

For a Linear with `in` inputs and `out` outputs, G = ceil(in / group_size) groups:

    GPTQ  qweight [in * bits / 32, out]   qzeros [G, out * bits / 32]   scales [G, out]   g_idx [in]
    AWQ   qweight [in, out / 8]           qzeros [G, out / 8]           scales [G, out]

kernels/packing.py holds the one definition of the bit layout; this module only predicts shapes, so
the header-only check can run without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
INT_SUFFIXES = ("qweight", "qzeros", "g_idx")  # int32 in both formats


@dataclass(frozen=True)
class Layout:
    method: str  # gptq | awq
    bits: int
    group_size: int  # -1: one group

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    def groups(self, in_f: int) -> int:
        return 1 if self.group_size == -1 else -(-in_f // self.group_size)

    def shapes(self, in_f: int, out_f: int) -> dict[str, tuple[int, ...]]:
        g, w = self.groups(in_f), self.per_word
        if self.method == "gptq":
            return {
                "qweight": (in_f // w, out_f),
                "qzeros": (g, -(-out_f // w)),
                "scales": (g, out_f),
                "g_idx": (in_f,),
                "bias": (out_f,),
            }
        return {
            "qweight": (in_f, out_f // w),
            "qzeros": (g, out_f // w),
            "scales": (g, out_f),
            "bias": (out_f,),
        }

    def features(self, qweight_shape: tuple[int, ...]) -> tuple[int, int] | None:
        """(in, out) implied by a qweight shape, or None when it is not 2-D."""
        if len(qweight_shape) != 2:
            return None
        rows, cols = qweight_shape
        if self.method == "gptq":
            return rows * self.per_word, cols
        return rows, cols * self.per_word

    def explain_qweight(self, found: tuple[int, ...], in_f: int, out_f: int) -> str:
        """The likeliest reason a qweight has `found` instead of the expected shape."""
        for bits in (2, 4, 8):
            if bits != self.bits and Layout(self.method, bits, self.group_size).shapes(in_f, out_f)[
                "qweight"
            ] == tuple(found):
                return f"the shape fits bits={bits}: the bits metadata is wrong"
        other = "awq" if self.method == "gptq" else "gptq"
        if Layout(other, self.bits, self.group_size).shapes(in_f, out_f)["qweight"] == tuple(found):
            return f"the shape fits the {other.upper()} layout: the quant_method metadata is wrong"
        if self.method == "awq" and tuple(found) == (out_f, in_f // self.per_word):
            return "the shape fits AWQ's GEMV layout [out, in / 8]: the version metadata is wrong"
        return "the tensor does not match config.json: it belongs to another model or was packed wrongly"

    def explain_groups(self, found_groups: int, in_f: int) -> str:
        if found_groups == 1:
            return "the tensors hold one group (group_size -1): the group_size metadata is wrong"
        if found_groups > 0 and in_f % found_groups == 0:
            return (
                f"the tensors fit group_size {in_f // found_groups}: the checkpoint's group_size "
                "metadata is wrong or the tensors were packed with another group size"
            )
        return (
            "the checkpoint's group_size metadata is wrong or the tensors were packed with another group size"
        )


# Llama-family Linear shapes as (in, out) from config.json. Mistral, Qwen2 and Qwen3 share the layout;
# Phi-3 fuses q|k|v and gate|up; Qwen3-MoE has one gate/up/down per expert (quantize/arch.py says which
# names a family has).
def llama_linear_features(config: dict) -> dict[str, tuple[int, int]] | None:
    """Per-block Linear (in, out) for a llama-like config, or None when a dimension is missing or bad;
    both the separate and the fused projection names are given, the family's table picks its own."""
    hidden = config.get("hidden_size")
    inter = config.get("intermediate_size")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads", heads)
    dims = (hidden, inter, heads, kv_heads)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        return None
    head_dim = config.get("head_dim") or hidden // heads
    if not (isinstance(head_dim, int) and head_dim > 0):
        return None
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    experts = {}
    n_experts = config.get("num_experts", config.get("num_local_experts"))
    expert_inter = config.get("moe_intermediate_size")
    if all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in (n_experts, expert_inter)):
        for e in range(min(n_experts, 4096)):  # Qwen3-MoE: per-expert Linears, as checkpoints name them
            experts[f"mlp.experts.{e}.gate_proj"] = (hidden, expert_inter)
            experts[f"mlp.experts.{e}.up_proj"] = (hidden, expert_inter)
            experts[f"mlp.experts.{e}.down_proj"] = (expert_inter, hidden)
    shared_inter = config.get("shared_expert_intermediate_size")
    if isinstance(shared_inter, int) and not isinstance(shared_inter, bool) and shared_inter > 0:
        experts["mlp.shared_expert.gate_proj"] = (hidden, shared_inter)  # Qwen2-MoE's shared expert
        experts["mlp.shared_expert.up_proj"] = (hidden, shared_inter)
        experts["mlp.shared_expert.down_proj"] = (shared_inter, hidden)
    if isinstance(n_experts, int) and not isinstance(n_experts, bool) and n_experts > 0 and "mixtral" in str(
        config.get("model_type")
    ):  # Mixtral: w1 (gate), w3 (up), w2 (down) of intermediate_size
        for e in range(min(n_experts, 4096)):
            experts[f"block_sparse_moe.experts.{e}.w1"] = (hidden, inter)
            experts[f"block_sparse_moe.experts.{e}.w3"] = (hidden, inter)
            experts[f"block_sparse_moe.experts.{e}.w2"] = (inter, hidden)
    return experts | {
        "self_attn.q_proj": (hidden, q_out),
        "self_attn.k_proj": (hidden, kv_out),
        "self_attn.v_proj": (hidden, kv_out),
        "self_attn.o_proj": (q_out, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
        "self_attn.qkv_proj": (hidden, q_out + 2 * kv_out),
        "mlp.gate_up_proj": (hidden, 2 * inter),
    }
