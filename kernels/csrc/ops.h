// The entry points of cpu_ops.cpp and cpu_packed.cpp that other translation units call directly (the
// fused decode step in decode_step.cpp), without a trip through the dispatcher. Each forwards to the op
// of the same name registered under qserve_cpu::, so both routes run the same code.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace qserve_ops {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& key_cache,
                         at::Tensor& value_cache, const at::Tensor& slot_mapping, int64_t num_heads);
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                         const at::Tensor& zeros, const c10::optional<at::Tensor>& perm, int64_t n,
                         int64_t group_size, int64_t isa, bool bf16_tiles);
at::Tensor packed_linear_q8(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                            const at::Tensor& zeros, const c10::optional<at::Tensor>& perm, int64_t n,
                            int64_t group_size, int64_t isa);
at::Tensor packed_linear_amx(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                             const at::Tensor& zeros, const c10::optional<at::Tensor>& perm, int64_t n,
                             int64_t group_size);

}  // namespace qserve_ops
