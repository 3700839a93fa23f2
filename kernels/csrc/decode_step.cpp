// decode_step: every decoder layer of a Llama-shaped model with 4-bit packed linears, for a step whose
// rows are all decodes (one new token per sequence), in one call from Python.
//
// Per layer it runs exactly the ops the Python modules run, in the same order and on the same tensors:
//   h = rms_norm(x); qkv = linear(h); [q, k heads rms_norm'd (Qwen3)]; q = rope_write_kv(qkv -> caches);
//   a = paged_decode(q);
//   x = x + linear(a); h = rms_norm(x); x = x + linear(silu(gate) * up)
// so the hidden states are bit-identical to the module path (tests/serve/test_decode_step.py). What it
// removes is the Python between the kernels: at batch 1 on SmolLM2 (30 layers, ~11 kernels each) the
// module path spends more time in the interpreter and in per-call argument handling than in the 4-bit
// GEMVs themselves. serve/decode_step.py decides when a step may take it.
//
// Arguments: params holds kParamsPerLayer tensors per layer, in this order:
//   input_layernorm.weight,
//   qkv:  qdata, scales, zeros, perm, bias      (perm and bias: an empty tensor when absent)
//   o:    qdata, scales, zeros, perm, bias
//   post_attention_layernorm.weight,
//   gate_up: qdata, scales, zeros, perm, bias
//   down: qdata, scales, zeros, perm, bias
//   q_norm.weight, k_norm.weight                (an empty tensor when the model has no q/k norms)
// and dims kDimsPerLayer ints per layer: (out_features, group_size) for qkv, o, gate_up and down.
// path picks the linear kernel for every layer (the rows and dtype are the same throughout a step):
// 0 packed_linear (fp32 kernels; isa and bf16_tiles as there), 1 packed_linear_q8 (isa as there),
// 2 packed_linear_amx.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "ops.h"

namespace {

constexpr int64_t kParamsPerLayer = 24;
constexpr int64_t kDimsPerLayer = 8;

struct LinearKernel {
  int64_t path, isa;
  bool bf16_tiles;

  // p: qdata, scales, zeros, perm, bias
  at::Tensor operator()(const at::Tensor& x, const at::Tensor* p, int64_t n, int64_t group_size) const {
    c10::optional<at::Tensor> perm;
    if (p[3].numel()) perm = p[3];
    at::Tensor y;
    if (path == 1)
      y = qserve_ops::packed_linear_q8(x, p[0], p[1], p[2], perm, n, group_size, isa);
    else if (path == 2)
      y = qserve_ops::packed_linear_amx(x, p[0], p[1], p[2], perm, n, group_size);
    else
      y = qserve_ops::packed_linear(x, p[0], p[1], p[2], perm, n, group_size, isa, bf16_tiles);
    return p[4].numel() ? at::add(y, p[4]) : y;
  }
};

at::Tensor decode_step(const at::Tensor& x_in, at::TensorList params, at::IntArrayRef dims,
                       at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& cos,
                       const at::Tensor& sin, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                       const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                       double scale, double eps, int64_t path,
                       int64_t isa, bool bf16_tiles) {
  const int64_t L = static_cast<int64_t>(key_caches.size());
  TORCH_CHECK(static_cast<int64_t>(value_caches.size()) == L &&
                  static_cast<int64_t>(params.size()) == L * kParamsPerLayer &&
                  static_cast<int64_t>(dims.size()) == L * kDimsPerLayer,
              "qserve_cpu::decode_step: ", L, " layers need ", L * kParamsPerLayer, " params and ",
              L * kDimsPerLayer, " dims, got ", params.size(), " and ", dims.size(), " (and ", value_caches.size(),
              " value caches)");
  TORCH_CHECK(path >= 0 && path <= 2, "qserve_cpu::decode_step: path is 0 (fp32), 1 (int8) or 2 (amx), got ", path);
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_contiguous() && x_in.size(0) == seq_lens.numel(),
              "qserve_cpu::decode_step: contiguous x [S, hidden] with one row per sequence expected, got ",
              x_in.sizes(), " for ", seq_lens.numel(), " sequences");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "qserve_cpu::decode_step: float32 or bfloat16 activations expected, got ", x_in.scalar_type());
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
  const LinearKernel linear{path, isa, bf16_tiles};
  const int64_t n = x_in.size(0);
  at::Tensor x = x_in;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* p = params.data() + l * kParamsPerLayer;
    const int64_t* d = dims.data() + l * kDimsPerLayer;
    at::Tensor kc = key_caches[l], vc = value_caches[l];
    // attention block
    at::Tensor h = qserve_ops::rms_norm(x, p[0], eps);
    at::Tensor qkv = linear(h, p + 1, d[0], d[1]);
    if (p[22].numel()) {  // each q and k head normalised over its head_dim, v as it is
      const int64_t qs = num_heads * head_dim, ks = num_kv_heads * head_dim;
      at::Tensor qn = qserve_ops::rms_norm(qkv.narrow(1, 0, qs).reshape({n, num_heads, head_dim}).contiguous(), p[22], eps);
      at::Tensor kn =
          qserve_ops::rms_norm(qkv.narrow(1, qs, ks).reshape({n, num_kv_heads, head_dim}).contiguous(), p[23], eps);
      qkv = at::cat({qn.view({n, qs}), kn.view({n, ks}), qkv.narrow(1, qs + ks, ks)}, 1);
    }
    at::Tensor q = qserve_ops::rope_write_kv(qkv, cos, sin, kc, vc, slot_mapping, num_heads);
    at::Tensor a = qserve_ops::paged_decode(q, kc, vc, block_tables, seq_lens, scale);
    x = at::add(x, linear(a.view({n, -1}), p + 6, d[2], d[3]));
    // MLP block
    h = qserve_ops::rms_norm(x, p[11], eps);
    at::Tensor gate_up = linear(h, p + 12, d[4], d[5]);
    at::Tensor act;
    if (bf16) {
      act = qserve_ops::silu_mul(gate_up);
    } else {
      auto halves = gate_up.chunk(2, -1);
      act = at::mul(at::silu(halves[0]), halves[1]);
    }
    x = at::add(x, linear(act, p + 17, d[6], d[7]));
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qserve_cpu, m) {
  m.def("decode_step(Tensor x, Tensor[] params, int[] dims, Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, "
        "Tensor cos, Tensor sin, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, int num_heads, "
        "int num_kv_heads, int head_dim, float scale, float eps, int path, int isa, bool bf16_tiles) -> Tensor");
}

TORCH_LIBRARY_IMPL(qserve_cpu, CPU, m) { m.impl("decode_step", &decode_step); }
