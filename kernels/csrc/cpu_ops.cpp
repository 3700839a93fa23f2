// qserve's C++ CPU kernels for the engine's decode hot path (fp32):
//
// linear_small_m: y[M, N] = x[M, K] @ w[N, K]^T for the few activation rows of a decode step. At those
// shapes the work is one pass over the weight, so the only goal is to stream it at memory bandwidth:
// each thread takes a contiguous range of weight rows and reads each row as one sequential stream (for
// more rows of x, four weight rows at a time share every load of x). torch's own fp32 GEMV (MKL/oneDNN)
// runs these shapes on one thread at about a third of the machine's read bandwidth.
//
// paged_decode: one query token per sequence attending over its blocks of the paged KV cache, read in
// place (the torch path must first gather each sequence's blocks into a padded tensor); fp32 or bf16
// caches (a bf16 model's), fp32 scores and accumulation either way.
//
// rope_write_kv: RoPE on the q and k heads of a fused qkv projection and the k/v write into the paged
// cache in one pass (the torch path takes ~10 small ops per layer for it).
//
// Built on first use by qserve/kernels/cpu_ext.py with -march=native; an AVX-512 path when the CPU has
// it, otherwise a loop the compiler vectorises for whatever the CPU does have.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
// Floats ahead of the current position to prefetch in each row (1 KiB): measured best of 0/256/1024.
constexpr int64_t kPrefetch = 256;

inline void dot4(const float* x, const float* w, int64_t K, float* out) {
  const float* w0 = w;
  const float* w1 = w + K;
  const float* w2 = w + 2 * K;
  const float* w3 = w + 3 * K;
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + k + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + k + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w2 + k + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w3 + k + kPrefetch), _MM_HINT_T0);
    const __m512 xv = _mm512_loadu_ps(x + k);
    a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w0 + k), a0);
    a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w1 + k), a1);
    a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w2 + k), a2);
    a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w3 + k), a3);
  }
  if (k < K) {  // masked tail: K need not be a multiple of 16
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    a0 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w0 + k), a0);
    a1 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w1 + k), a1);
    a2 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w2 + k), a2);
    a3 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w3 + k), a3);
  }
  out[0] = _mm512_reduce_add_ps(a0);
  out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2);
  out[3] = _mm512_reduce_add_ps(a3);
}

// One row, one sequential stream, four independent accumulators.
inline float dot_row(const float* x, const float* w, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), _mm512_loadu_ps(w + k + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), _mm512_loadu_ps(w + k + 48), a3);
  }
  for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), _mm512_maskz_loadu_ps(m, w + k), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#else
inline void dot4(const float* __restrict x, const float* __restrict w, int64_t K, float* out) {
  const float* w0 = w;
  const float* w1 = w + K;
  const float* w2 = w + 2 * K;
  const float* w3 = w + 3 * K;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t k = 0; k < K; ++k) {
    const float xv = x[k];
    a0 += xv * w0[k];
    a1 += xv * w1[k];
    a2 += xv * w2[k];
    a3 += xv * w3[k];
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}
#endif

inline float dot1(const float* __restrict x, const float* __restrict w, int64_t K) {
  float a = 0.f;
#pragma omp simd reduction(+ : a)
  for (int64_t k = 0; k < K; ++k) a += x[k] * w[k];
  return a;
}

#if !defined(__AVX512F__)
inline float dot_row(const float* x, const float* w, int64_t K) { return dot1(x, w, K); }
#endif

// Up to this many activation rows, each weight row is read as one sequential stream (measured at the
// bandwidth of torch.sum over the same bytes for M = 1..4); above it, four weight rows share each
// load of x, which the compute of larger M needs (M = 8: 19 ms per SmolLM2 forward vs 26 row-wise).
constexpr int64_t kRowWiseMaxM = 4;

at::Tensor linear_small_m(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "qserve_cpu::linear_small_m: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "qserve_cpu::linear_small_m: float32 only, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "qserve_cpu::linear_small_m: x [M, K] and w [N, K] expected, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "qserve_cpu::linear_small_m: contiguous tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M <= kRowWiseMaxM) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot_row(xp + m * K, wp + n * K, K);
    });
    return y;
  }
  const int64_t blocks = N / 4;
  // At least ~64 KiB of weights per task, so small layers are not split finer than is worth a thread.
  const int64_t grain = std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(4 * K, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    float acc[4];
    for (int64_t b = b0; b < b1; ++b) {
      const float* wr = wp + 4 * b * K;
      for (int64_t m = 0; m < M; ++m) {  // the 4 rows stay in L1 across the M activation rows
        dot4(xp + m * K, wr, K, acc);
        float* yr = yp + m * N + 4 * b;
        yr[0] = acc[0];
        yr[1] = acc[1];
        yr[2] = acc[2];
        yr[3] = acc[3];
      }
    }
  });
  for (int64_t n = 4 * blocks; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot1(xp + m * K, wp + n * K, K);
  return y;
}

// The decode kernel over caches of element type T (float or bfloat16), fp32 q, scores and accumulators.
template <typename T>
inline float dot_kv(const float* __restrict x, const T* __restrict w, int64_t D) {
  float a = 0.f;
#pragma omp simd reduction(+ : a)
  for (int64_t k = 0; k < D; ++k) a += x[k] * static_cast<float>(w[k]);
  return a;
}

template <typename T>
void paged_decode_impl(const float* qp, const T* kp, const T* vp, float* op, const int32_t* bt,
                       const int32_t* lens, int64_t S, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t MB,
                       float sc) {
  const int64_t G = H / KVH;
  // One task per (sequence, kv head): its G query heads share every K/V row they read (GQA).
  at::parallel_for(0, S * KVH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores, acc(G * D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t s = task / KVH, kh = task % KVH, len = lens[s];
      const int32_t* table = bt + s * MB;
      const float* qs = qp + (s * H + kh * G) * D;  // G consecutive heads
      scores.resize(G * len);
      for (int64_t t = 0; t < len; ++t) {
        const T* krow = kp + ((static_cast<int64_t>(table[t / BS]) * BS + t % BS) * KVH + kh) * D;
        for (int64_t g = 0; g < G; ++g) scores[g * len + t] = dot_kv(qs + g * D, krow, D) * sc;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < G; ++g) {  // softmax in place, max-subtracted
        float* row = scores.data() + g * len;
        float mx = row[0];
        for (int64_t t = 1; t < len; ++t) mx = std::max(mx, row[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          row[t] = std::exp(row[t] - mx);
          sum += row[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) row[t] *= inv;
      }
      for (int64_t t = 0; t < len; ++t) {
        const T* vrow = vp + ((static_cast<int64_t>(table[t / BS]) * BS + t % BS) * KVH + kh) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * len + t];
          float* acc_g = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc_g[d] += p * static_cast<float>(vrow[d]);
        }
      }
      std::copy(acc.begin(), acc.end(), op + (s * H + kh * G) * D);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && key_cache.device().is_cpu() && value_cache.device().is_cpu(),
              "qserve_cpu::paged_decode: CPU tensors only");
  const auto kv_type = key_cache.scalar_type();
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  (kv_type == at::kFloat || kv_type == at::kBFloat16) && value_cache.scalar_type() == kv_type,
              "qserve_cpu::paged_decode: float32 or bfloat16 q and caches (both caches alike) expected, got ",
              q.scalar_type(), ", ", kv_type, " and ", value_cache.scalar_type());
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "qserve_cpu::paged_decode: q [S, H, D] and caches [blocks, block_size, KVH, D] expected, got ",
              q.sizes(), ", ", key_cache.sizes(), " and ", value_cache.sizes());
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "qserve_cpu::paged_decode: int32 block_tables and seq_lens expected");
  TORCH_CHECK(q.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  block_tables.is_contiguous() && seq_lens.is_contiguous(),
              "qserve_cpu::paged_decode: contiguous tensors only");
  const int64_t S = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = key_cache.size(0), BS = key_cache.size(1), KVH = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D && KVH > 0 && H % KVH == 0,
              "qserve_cpu::paged_decode: ", H, " query heads of dim ", D, " over ", KVH, " kv heads of dim ",
              key_cache.size(3));
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == S && seq_lens.numel() == S,
              "qserve_cpu::paged_decode: one block table row and one length per sequence expected");
  const int64_t MB = block_tables.size(1);
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  // Validate every block the kernel will read before any thread starts: a bad table is an error,
  // never a read outside the cache.
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = lens[s];
    TORCH_CHECK(len >= 1 && len <= MB * BS, "qserve_cpu::paged_decode: sequence ", s, " has length ", len,
                " but its block table holds ", MB * BS, " slots");
    for (int64_t b = 0; b < (len + BS - 1) / BS; ++b)
      TORCH_CHECK(bt[s * MB + b] >= 0 && bt[s * MB + b] < NB, "qserve_cpu::paged_decode: sequence ", s,
                  " block ", b, " is ", bt[s * MB + b], ", outside the cache's ", NB, " blocks");
  }
  // bf16 q is widened once (S x H x D values); bf16 caches are read in place and widened per row.
  const at::Tensor qf = q.scalar_type() == at::kFloat ? q : q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(qf);
  const float sc = static_cast<float>(scale);
  if (kv_type == at::kFloat) {
    paged_decode_impl<float>(qf.data_ptr<float>(), key_cache.data_ptr<float>(), value_cache.data_ptr<float>(),
                             out.data_ptr<float>(), bt, lens, S, H, KVH, D, BS, MB, sc);
  } else {
    paged_decode_impl<c10::BFloat16>(qf.data_ptr<float>(), key_cache.data_ptr<c10::BFloat16>(),
                                     value_cache.data_ptr<c10::BFloat16>(), out.data_ptr<float>(), bt, lens, S,
                                     H, KVH, D, BS, MB, sc);
  }
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// Rotate-half RoPE of one head: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), halves of length `half`.
inline void rope_head(const float* __restrict x, const float* __restrict c, const float* __restrict s,
                      int64_t half, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * c[i] - x[i + half] * s[i];
    out[i + half] = x[i + half] * c[i] + x[i] * s[i];
  }
}

at::Tensor rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slot_mapping,
                         int64_t num_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && key_cache.device().is_cpu() && value_cache.device().is_cpu(),
              "qserve_cpu::rope_write_kv: CPU tensors only");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && key_cache.scalar_type() == at::kFloat &&
                  value_cache.scalar_type() == at::kFloat,
              "qserve_cpu::rope_write_kv: float32 only");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "qserve_cpu::rope_write_kv: int64 slot_mapping expected");
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && key_cache.is_contiguous() &&
                  value_cache.is_contiguous() && slot_mapping.is_contiguous(),
              "qserve_cpu::rope_write_kv: contiguous tensors only");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "qserve_cpu::rope_write_kv: caches [blocks, block_size, KVH, D] of one shape expected");
  const int64_t n = qkv.size(0), KVH = key_cache.size(2), D = key_cache.size(3), half = D / 2;
  const int64_t H = num_heads, width = (H + 2 * KVH) * D;
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == width && D % 2 == 0,
              "qserve_cpu::rope_write_kv: qkv [tokens, (", H, " + 2 x ", KVH, ") x ", D, "] expected, got ",
              qkv.sizes());
  TORCH_CHECK(cos.numel() == n * half && sin.numel() == n * half && slot_mapping.numel() == n,
              "qserve_cpu::rope_write_kv: cos/sin [tokens, head_dim / 2] and one slot per token expected");
  const int64_t slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* sm = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(sm[t] >= -1 && sm[t] < slots, "qserve_cpu::rope_write_kv: token ", t, " has slot ", sm[t],
                ", outside the cache's ", slots, " slots");
  at::Tensor q = at::empty({n, H, D}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kc = key_cache.data_ptr<float>();
  float* vc = value_cache.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = xp + t * width;
      const float* c = cp + t * half;
      const float* s = sp + t * half;
      for (int64_t h = 0; h < H; ++h) rope_head(row + h * D, c, s, half, qp + (t * H + h) * D);
      if (sm[t] < 0) continue;  // padding token: nothing cached
      for (int64_t kh = 0; kh < KVH; ++kh) {
        rope_head(row + (H + kh) * D, c, s, half, kc + (sm[t] * KVH + kh) * D);
        std::copy(row + (H + KVH + kh) * D, row + (H + KVH + kh + 1) * D, vc + (sm[t] * KVH + kh) * D);
      }
    }
  });
  return q;
}

}  // namespace

TORCH_LIBRARY(qserve_cpu, m) {
  m.def("rope_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping, int num_heads) -> Tensor");
  m.def("linear_small_m(Tensor x, Tensor w) -> Tensor");
  m.def("paged_decode(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qserve_cpu, CPU, m) {
  m.impl("linear_small_m", &linear_small_m);
  m.impl("paged_decode", &paged_decode);
  m.impl("rope_write_kv", &rope_write_kv);
}
