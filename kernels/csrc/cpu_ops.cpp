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
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "amx.h"
#include "vec_math.h"

namespace {

#if defined(__AVX512F__)
using qserve_vec::exp512;
#endif

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

// The cache slot of a sequence's position t: block table[t / BS], offset t % BS, with a shift and a mask
// when BS is a power of two (it is by default): a division per key read costs more than the read.
struct SlotOf {
  int64_t BS, mask;
  int shift;
  explicit SlotOf(int64_t bs) : BS(bs), mask(bs - 1), shift(-1) {
    if (bs > 0 && (bs & (bs - 1)) == 0)
      for (shift = 0; (int64_t{1} << shift) < bs; ++shift) {
      }
  }
  inline int64_t operator()(const int32_t* table, int64_t t) const {
    return shift >= 0 ? static_cast<int64_t>(table[t >> shift]) * BS + (t & mask)
                      : static_cast<int64_t>(table[t / BS]) * BS + t % BS;
  }
};

// The decode kernel over caches of element type T (float or bfloat16), fp32 q, scores and accumulators.
template <typename T>
inline float dot_kv(const float* __restrict x, const T* __restrict w, int64_t D) {
  float a = 0.f;
#pragma omp simd reduction(+ : a)
  for (int64_t k = 0; k < D; ++k) a += x[k] * static_cast<float>(w[k]);
  return a;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the high half of a float
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp(row - max(row)) in place over row[0, len); returns 1 / the sum (the caller scales the outputs).
inline float softmax_row(float* row, int64_t len) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= len; t += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + t));
  float m = _mm512_reduce_max_ps(mx);
  for (; t < len; ++t) m = std::max(m, row[t]);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (t = 0; t < len; t += 16) {
    const __mmask16 mask =
        len - t >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (len - t)) - 1u);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + t), mv));
    _mm512_mask_storeu_ps(row + t, mask, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// Rows ahead to prefetch: a block's rows for one kv head are strided (the other heads sit between them),
// which the hardware prefetcher follows poorly, and the next block is anywhere in the cache.
constexpr int64_t kAhead = 8;
template <typename T, int64_t D>
inline void prefetch_row(const T* row) {
  for (int64_t b = 0; b < static_cast<int64_t>(D * sizeof(T)); b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T0);
}

// One (sequence, kv head) task of paged_decode with head_dim D = 16 NV: up to GB of its G query heads
// kept in registers while each K row is read once, scores softmaxed with exp512, and the V rows
// accumulated in registers; 1 / sum is applied at the store. Bit-for-bit it differs from the generic
// loop only in summation order and exp's last bits.
template <typename T, int NV>
void decode_task_avx512(const float* qs, const T* kp, const T* vp, float* out, const int32_t* table,
                        int64_t len, int64_t G, int64_t KVH, int64_t kh, int64_t BS, float sc,
                        std::vector<float>& scores) {
  constexpr int64_t D = 16 * NV;
  constexpr int GB = NV <= 4 ? 4 : (NV <= 8 ? 2 : 1);
  scores.resize(G * len);
  const SlotOf slot(BS);
  auto row_of = [&](const T* base, int64_t t) { return base + (slot(table, t) * KVH + kh) * D; };
  for (int64_t g0 = 0; g0 < G; g0 += GB) {
    const int gn = static_cast<int>(std::min<int64_t>(GB, G - g0));
    __m512 qv[GB][NV];
    for (int g = 0; g < gn; ++g)
      for (int v = 0; v < NV; ++v)
        qv[g][v] = _mm512_mul_ps(_mm512_loadu_ps(qs + (g0 + g) * D + 16 * v), _mm512_set1_ps(sc));
    for (int64_t t = 0; t < len; ++t) {
      const T* krow = row_of(kp, t);
      if (t + kAhead < len) prefetch_row<T, D>(row_of(kp, t + kAhead));
      __m512 k[NV];
      for (int v = 0; v < NV; ++v) k[v] = load16(krow + 16 * v);
      for (int g = 0; g < gn; ++g) {
        __m512 a = _mm512_mul_ps(qv[g][0], k[0]);
        for (int v = 1; v < NV; ++v) a = _mm512_fmadd_ps(qv[g][v], k[v], a);
        scores[(g0 + g) * len + t] = _mm512_reduce_add_ps(a);
      }
    }
  }
  float inv[64];  // G <= 64 (checked by the caller)
  for (int64_t g = 0; g < G; ++g) inv[g] = softmax_row(scores.data() + g * len, len);
  for (int64_t g0 = 0; g0 < G; g0 += GB) {
    const int gn = static_cast<int>(std::min<int64_t>(GB, G - g0));
    __m512 acc[GB][NV];
    for (int g = 0; g < GB; ++g)
      for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
      const T* vrow = row_of(vp, t);
      if (t + kAhead < len) prefetch_row<T, D>(row_of(vp, t + kAhead));
      __m512 vv[NV];
      for (int v = 0; v < NV; ++v) vv[v] = load16(vrow + 16 * v);
      for (int g = 0; g < gn; ++g) {
        const __m512 p = _mm512_set1_ps(scores[(g0 + g) * len + t]);
        for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(p, vv[v], acc[g][v]);
      }
    }
    for (int g = 0; g < gn; ++g)
      for (int v = 0; v < NV; ++v)
        _mm512_storeu_ps(out + (g0 + g) * D + 16 * v, _mm512_mul_ps(acc[g][v], _mm512_set1_ps(inv[g0 + g])));
  }
}

// The head dims with a register-blocked body; others take the generic loop.
template <typename T>
bool decode_task_fast(const float* qs, const T* kp, const T* vp, float* out, const int32_t* table, int64_t len,
                      int64_t G, int64_t KVH, int64_t kh, int64_t D, int64_t BS, float sc,
                      std::vector<float>& scores) {
  if (G > 64) return false;
  switch (D) {
    case 64:
      decode_task_avx512<T, 4>(qs, kp, vp, out, table, len, G, KVH, kh, BS, sc, scores);
      return true;
    case 128:
      decode_task_avx512<T, 8>(qs, kp, vp, out, table, len, G, KVH, kh, BS, sc, scores);
      return true;
    case 256:
      decode_task_avx512<T, 16>(qs, kp, vp, out, table, len, G, KVH, kh, BS, sc, scores);
      return true;
    default:
      return false;
  }
}
#endif

// Which query row a task index stands for, the sequence it belongs to and how many keys it sees.
struct AttnRow {
  int64_t row, seq, len;
};

// The attention of R query rows over the paged cache, each row attending to the first `len` keys of its
// sequence (decode: the whole context; a prefill token: its causal prefix). One task per (row, kv head):
// the row's G query heads share every K/V row they read (GQA).
template <typename T, typename RowFn>
void attend_rows_impl(const float* qp, const T* kp, const T* vp, float* op, const int32_t* bt, int64_t R,
                      int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t MB, float sc, bool use_fast,
                      RowFn row_of) {
  const int64_t G = H / KVH;
  const SlotOf slot(BS);
  at::parallel_for(0, R * KVH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores, acc(G * D);
    for (int64_t task = t0; task < t1; ++task) {
      const AttnRow rw = row_of(task / KVH);
      const int64_t kh = task % KVH, len = rw.len;
      const int32_t* table = bt + rw.seq * MB;
      const float* qs = qp + (rw.row * H + kh * G) * D;  // G consecutive heads
      float* os = op + (rw.row * H + kh * G) * D;
#if defined(__AVX512F__)
      if (use_fast && decode_task_fast<T>(qs, kp, vp, os, table, len, G, KVH, kh, D, BS, sc, scores)) continue;
#endif
      scores.resize(G * len);
      for (int64_t t = 0; t < len; ++t) {
        const T* krow = kp + (slot(table, t) * KVH + kh) * D;
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
        const T* vrow = vp + (slot(table, t) * KVH + kh) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * len + t];
          float* acc_g = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc_g[d] += p * static_cast<float>(vrow[d]);
        }
      }
      std::copy(acc.begin(), acc.end(), os);
    }
  });
}

template <typename T>
void paged_decode_impl(const float* qp, const T* kp, const T* vp, float* op, const int32_t* bt,
                       const int32_t* lens, int64_t S, int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t MB,
                       float sc, bool use_fast) {
  attend_rows_impl<T>(qp, kp, vp, op, bt, S, H, KVH, D, BS, MB, sc, use_fast,
                      [&](int64_t r) { return AttnRow{r, r, static_cast<int64_t>(lens[r])}; });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, bool generic) {
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
                             out.data_ptr<float>(), bt, lens, S, H, KVH, D, BS, MB, sc, !generic);
  } else {
    paged_decode_impl<c10::BFloat16>(qf.data_ptr<float>(), key_cache.data_ptr<c10::BFloat16>(),
                                     value_cache.data_ptr<c10::BFloat16>(), out.data_ptr<float>(), bt, lens, S,
                                     H, KVH, D, BS, MB, sc, !generic);
  }
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

#if defined(__AVX512F__)
// Query tokens per blocked prefill task: their G heads each form the rows that share one transposed K
// tile of 16 keys (scores) and each V row (outputs).
constexpr int64_t kPrefillBlock = 16;

// One blocked prefill task: qn consecutive query tokens of one sequence (causal prefix lengths first_len,
// first_len + 1, ...) for one kv head, head_dim D = 16 NV. Scores are 16 keys at a time from a K tile
// transposed once into fp32 [D][16] and shared by every row (no horizontal sum per dot product, as the
// per-row body needs); softmax as the per-row body does; V rows accumulated four output rows at a time.
template <typename T, int NV>
void prefill_block_avx512(const float* qp, const T* kp, const T* vp, float* op, const int32_t* table, int64_t row0,
                          int64_t qn, int64_t first_len, int64_t H, int64_t G, int64_t KVH, int64_t kh, int64_t BS,
                          float sc, std::vector<float>& qbuf, std::vector<float>& sbuf, std::vector<float>& kt) {
  constexpr int64_t D = 16 * NV;
  const int64_t R = qn * G, Lmax = first_len + qn - 1, Lpad = (Lmax + 15) / 16 * 16;
  // row r = query r / G, head r % G; its causal length and q/output offset computed once (no division
  // in the loops)
  const SlotOf slot(BS);
  int64_t lens[kPrefillBlock * 64], offs[kPrefillBlock * 64];  // R <= kPrefillBlock x G, G <= 64
  for (int64_t r = 0; r < R; ++r) {
    lens[r] = first_len + r / G;
    offs[r] = ((row0 + r / G) * H + kh * G + r % G) * D;
  }
  auto len_of = [&](int64_t r) { return lens[r]; };
  auto qrow = [&](int64_t r) { return qp + offs[r]; };
  qbuf.resize(R * D);
  for (int64_t r = 0; r < R; ++r) {
    const float* src = qrow(r);
    for (int64_t d = 0; d < D; ++d) qbuf[r * D + d] = src[d] * sc;
  }
  sbuf.resize(R * Lpad);
  kt.resize(D * 16);
  for (int64_t t0 = 0; t0 < Lmax; t0 += 16) {
    const int64_t nt = std::min<int64_t>(16, Lmax - t0);
    for (int64_t j = 0; j < 16; ++j) {
      if (j < nt) {
        const int64_t t = t0 + j;
        const T* row = kp + (slot(table, t) * KVH + kh) * D;
        for (int64_t d = 0; d < D; ++d) kt[d * 16 + j] = static_cast<float>(row[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) kt[d * 16 + j] = 0.f;
      }
    }
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) {
      if (t0 >= len_of(r + 3)) continue;  // no row of the group sees this tile (lengths grow with r)
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const float *q0 = &qbuf[r * D], *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
      for (int64_t d = 0; d < D; ++d) {
        const __m512 kv = _mm512_loadu_ps(&kt[d * 16]);
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[d]), kv, a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[d]), kv, a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(q2[d]), kv, a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(q3[d]), kv, a3);
      }
      _mm512_storeu_ps(&sbuf[r * Lpad + t0], a0);
      _mm512_storeu_ps(&sbuf[(r + 1) * Lpad + t0], a1);
      _mm512_storeu_ps(&sbuf[(r + 2) * Lpad + t0], a2);
      _mm512_storeu_ps(&sbuf[(r + 3) * Lpad + t0], a3);
    }
    for (; r < R; ++r) {  // the last R % 4 rows, one at a time
      if (t0 >= len_of(r)) continue;
      __m512 a = _mm512_setzero_ps();
      const float* q0 = &qbuf[r * D];
      for (int64_t d = 0; d < D; ++d) a = _mm512_fmadd_ps(_mm512_set1_ps(q0[d]), _mm512_loadu_ps(&kt[d * 16]), a);
      _mm512_storeu_ps(&sbuf[r * Lpad + t0], a);
    }
  }
  std::vector<float> inv(R);
  for (int64_t r = 0; r < R; ++r) inv[r] = softmax_row(&sbuf[r * Lpad], len_of(r));  // each row's own prefix
  constexpr int RB = NV <= 4 ? 4 : 2;  // output rows accumulated at once (RB x NV registers)
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int rn = static_cast<int>(std::min<int64_t>(RB, R - r0));
    __m512 acc[RB][NV];
    for (int i = 0; i < RB; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
    const int64_t lmax = len_of(r0 + rn - 1);
    for (int64_t t = 0; t < lmax; ++t) {
      const T* vrow = vp + (slot(table, t) * KVH + kh) * D;
      __m512 vv[NV];
      for (int v = 0; v < NV; ++v) vv[v] = load16(vrow + 16 * v);
      for (int i = 0; i < rn; ++i) {
        if (t >= len_of(r0 + i)) continue;
        const __m512 pv = _mm512_set1_ps(sbuf[(r0 + i) * Lpad + t]);
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(pv, vv[v], acc[i][v]);
      }
    }
    for (int i = 0; i < rn; ++i) {
      const int64_t r = r0 + i;
      float* dst = op + offs[r];
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(dst + 16 * v, _mm512_mul_ps(acc[i][v], _mm512_set1_ps(inv[r])));
    }
  }
}
#endif

// paged_prefill: a mixed batch (prefill chunks and decodes) over the paged cache, causal with the
// queries as the last q_len of each sequence's seq_len positions (chunked prefill after a cached
// prefix), the KV of the chunk already written. Each query token attends to its causal prefix: for a
// bf16 model on a CPU with AMX and head dim 64/128/256, chunks as AMX tile products (prefill_amx_impl,
// path 0); with AVX-512, chunks in blocks of kPrefillBlock tokens sharing transposed K tiles
// (prefill_blocked, path 1 forces it); decodes through the decode body either way; otherwise (path 2
// forces it) every token as a row of the generic loop. Work is handed to threads short and long in turn
// so that a long prompt's triangle splits evenly.
#if defined(__AVX512F__)
// paged_prefill's AVX-512 driver: decodes (one query) as per-row tasks, longer chunks as blocks of
// kPrefillBlock query tokens, each task for one kv head; tasks alternate from both ends of the list
// (long and short) so each thread's contiguous share of them is about as costly.
struct PrefillTask {
  int64_t seq, row0, qn, first_len, kh;
};

template <typename T, int NV>
void prefill_blocked_impl(const float* qp, const T* kp, const T* vp, float* op, const int32_t* bt,
                          const std::vector<PrefillTask>& tasks, int64_t H, int64_t KVH, int64_t BS, int64_t MB,
                          float sc) {
  const int64_t G = H / KVH, n = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qbuf, sbuf, kt, scores;
    for (int64_t i = t0; i < t1; ++i) {
      const PrefillTask& tk = tasks[(i % 2 == 0) ? i / 2 : n - 1 - i / 2];
      const int32_t* table = bt + tk.seq * MB;
      if (tk.qn == 1) {
        decode_task_avx512<T, NV>(qp + (tk.row0 * H + tk.kh * G) * 16 * NV, kp, vp,
                                  op + (tk.row0 * H + tk.kh * G) * 16 * NV, table, tk.first_len, G, KVH, tk.kh, BS,
                                  sc, scores);
      } else {
        prefill_block_avx512<T, NV>(qp, kp, vp, op, table, tk.row0, tk.qn, tk.first_len, H, G, KVH, tk.kh, BS, sc,
                                    qbuf, sbuf, kt);
      }
    }
  });
}

void prefill_blocked(const float* qp, const at::Tensor& key_cache, const at::Tensor& value_cache, float* op,
                     const int32_t* bt, const int32_t* qsl, const int32_t* lens, int64_t S, int64_t H, int64_t KVH,
                     int64_t D, int64_t BS, int64_t MB, float sc) {
  std::vector<PrefillTask> tasks;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t q_len = qsl[s + 1] - qsl[s], base = lens[s] - q_len;
    for (int64_t i0 = 0; i0 < q_len; i0 += kPrefillBlock) {
      const int64_t qn = std::min<int64_t>(kPrefillBlock, q_len - i0);
      for (int64_t kh = 0; kh < KVH; ++kh) tasks.push_back({s, qsl[s] + i0, qn, base + i0 + 1, kh});
    }
  }
  auto run = [&](auto nv_tag) {
    constexpr int NV = decltype(nv_tag)::value;
    if (key_cache.scalar_type() == at::kFloat)
      prefill_blocked_impl<float, NV>(qp, key_cache.data_ptr<float>(), value_cache.data_ptr<float>(), op, bt, tasks,
                                      H, KVH, BS, MB, sc);
    else
      prefill_blocked_impl<c10::BFloat16, NV>(qp, key_cache.data_ptr<c10::BFloat16>(),
                                              value_cache.data_ptr<c10::BFloat16>(), op, bt, tasks, H, KVH, BS, MB,
                                              sc);
  };
  if (D == 64)
    run(std::integral_constant<int, 4>{});
  else if (D == 128)
    run(std::integral_constant<int, 8>{});
  else
    run(std::integral_constant<int, 16>{});
}
#endif

#if defined(__AVX512F__) && defined(QSERVE_AMX)
// paged_prefill on AMX tiles (bf16 q and caches, a bf16 model's; head dim 64, 128 or 256): scores and
// P V as bf16 x bf16 tile products with fp32 sums. Each sequence with a prompt chunk has its K and V up
// to its length copied once per step into tile layouts (K^T and V with key pairs interleaved, zero past
// the length), shared by all of its query blocks; a task is up to 64 rows = (query token, head of the kv
// group) pairs, as four 16-row tiles. Scores stay fp32; the softmax weights are rounded to bf16 for the
// P V product (as bf16 flash attention does) and each row is normalised by the sum of its rounded
// weights. Decodes in the same batch take the AVX-512 decode body.
constexpr int64_t kAmxRows = 64;

inline uint16_t bf16_bits(float f) { return c10::BFloat16(f).x; }  // round to nearest even

// Kp [L/16][D/32][16 d-pairs][16 keys][2] and Vp [L/32][D/16][16 key pairs][16 dims][2] for keys
// [0, Lp), zero from L on: every tile a contiguous KiB.
void pack_kv_amx(const c10::BFloat16* kc, const c10::BFloat16* vc, const int32_t* table, int64_t L, int64_t Lp,
                 int64_t KVH, int64_t kh, int64_t D, int64_t BS, uint16_t* kpk, uint16_t* vpk) {
  const SlotOf slot(BS);
  const int64_t C = D / 32, NB = D / 16;
  uint32_t* k32 = reinterpret_cast<uint32_t*>(kpk);
  for (int64_t t = 0; t < Lp; ++t) {
    const bool real = t < L;
    const int64_t base = real ? (slot(table, t) * KVH + kh) * D : 0;
    const uint32_t* krow = reinterpret_cast<const uint32_t*>(kc + base);  // d pairs
    const uint16_t* vrow = reinterpret_cast<const uint16_t*>(vc + base);
    uint32_t* kt = k32 + (t / 16) * C * 256 + (t % 16);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t r = 0; r < 16; ++r) kt[c * 256 + r * 16] = real ? krow[c * 16 + r] : 0u;
    uint16_t* vt = vpk + (t / 32) * NB * 512 + ((t % 32) / 2) * 32 + (t % 2);
    for (int64_t d = 0; d < D; ++d) vt[(d / 16) * 512 + (d % 16) * 2] = real ? vrow[d] : uint16_t{0};
  }
}

// One task: query tokens row0 .. row0 + qn - 1 of a chunk whose first token's causal length is
// first_len, for kv head kh (rows r = token r / G, head r % G; R = qn G <= 64).
QSERVE_AMX_BF16_TARGET void prefill_task_amx(
    const float* qp, float* op, const uint16_t* kpk, const uint16_t* vpk, int64_t row0, int64_t qn,
    int64_t first_len, int64_t H, int64_t G, int64_t kh, int64_t D, float sc, std::vector<uint16_t>& qa,
    std::vector<float>& sb, std::vector<uint16_t>& pa, std::vector<float>& ob) {
  const int64_t R = qn * G, nrt = (R + 15) / 16, C = D / 32, NB = D / 16;
  const int64_t Lmax = first_len + qn - 1, nkb = (Lmax + 15) / 16, Lp = (Lmax + 31) / 32 * 32;
  qa.assign(nrt * 16 * D, 0);
  for (int64_t r = 0; r < R; ++r) {
    const float* src = qp + ((row0 + r / G) * H + kh * G + r % G) * D;
    for (int64_t d = 0; d < D; ++d) qa[r * D + d] = bf16_bits(src[d]);
  }
  sb.resize(nrt * 16 * Lp);
  const uint16_t* q0 = qa.data();
  const int64_t qs = D * 2;  // bytes per q row
  for (int64_t kb = 0; kb < nkb; ++kb) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < C; ++c) {
      _tile_loadd(5, kpk + (kb * C + c) * 512, 64);
      _tile_loadd(4, q0 + c * 32, qs);
      _tile_dpbf16ps(0, 4, 5);
      if (nrt > 1) {
        _tile_loadd(6, q0 + 16 * D + c * 32, qs);
        _tile_dpbf16ps(1, 6, 5);
      }
      if (nrt > 2) {
        _tile_loadd(7, q0 + 32 * D + c * 32, qs);
        _tile_dpbf16ps(2, 7, 5);
      }
      if (nrt > 3) {
        _tile_loadd(4, q0 + 48 * D + c * 32, qs);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    float* s0 = sb.data() + kb * 16;
    const int64_t ss = Lp * 4;
    _tile_stored(0, s0, ss);
    if (nrt > 1) _tile_stored(1, s0 + 16 * Lp, ss);
    if (nrt > 2) _tile_stored(2, s0 + 32 * Lp, ss);
    if (nrt > 3) _tile_stored(3, s0 + 48 * Lp, ss);
  }
  // softmax of each row over its causal prefix; weights rounded to bf16, zero past the prefix
  pa.resize(nrt * 16 * Lp);
  std::fill(pa.begin() + R * Lp, pa.end(), uint16_t{0});  // rows past the task's
  float inv[kAmxRows];
  const __m512 scv = _mm512_set1_ps(sc);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t len = first_len + r / G;
    const float* row = sb.data() + r * Lp;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < len; t += 16) {
      const __mmask16 m = len - t >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (len - t)) - 1u);
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, row + t));
    }
    const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * sc);
    __m512 sum = _mm512_setzero_ps();
    uint16_t* prow = pa.data() + r * Lp;
    for (int64_t t = 0; t < len; t += 16) {
      const __mmask16 m = len - t >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (len - t)) - 1u);
      const __m512 e = exp512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, row + t), scv, mv));
      const __m256bh eb = _mm512_cvtneps_pbh(e);
      _mm256_mask_storeu_epi16(prow + t, m, (__m256i)eb);
      // the sum of the weights as rounded: (bf16 bits << 16) is the rounded float
      const __m512 er = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)eb), 16));
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, er));
    }
    inv[r] = 1.f / _mm512_reduce_add_ps(sum);
    std::fill(prow + len, prow + Lp, uint16_t{0});
  }
  ob.resize(16 * 64);
  const int64_t ps = Lp * 2;
  for (int64_t i = 0; i < nrt; ++i) {
    const int64_t last = std::min(R - 1, 16 * i + 15);
    const int64_t nch = (first_len + last / G + 31) / 32;  // key chunks any row of the tile sees
    for (int64_t cg = 0; cg < NB; cg += 4) {  // 64 output columns at a time
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t ch = 0; ch < nch; ++ch)
        qserve_amx::dot_a_by_four_b(pa.data() + 16 * i * Lp + ch * 32, ps, vpk + (ch * NB + cg) * 512);
      _tile_stored(0, ob.data(), 256);
      _tile_stored(1, ob.data() + 16, 256);
      _tile_stored(2, ob.data() + 32, 256);
      _tile_stored(3, ob.data() + 48, 256);
      for (int64_t j = 0; j < 16 && 16 * i + j < R; ++j) {
        const int64_t r = 16 * i + j;
        float* dst = op + ((row0 + r / G) * H + kh * G + r % G) * D + cg * 16;
        const __m512 iv = _mm512_set1_ps(inv[r]);
        for (int64_t v = 0; v < 4; ++v)
          _mm512_storeu_ps(dst + 16 * v, _mm512_mul_ps(_mm512_loadu_ps(ob.data() + j * 64 + 16 * v), iv));
      }
    }
  }
}

template <int NV>
void prefill_amx_impl(const float* qp, const c10::BFloat16* kc, const c10::BFloat16* vc, float* op,
                      const int32_t* bt, const int32_t* qsl, const int32_t* lens, int64_t S, int64_t H, int64_t KVH,
                      int64_t BS, int64_t MB, float sc) {
  constexpr int64_t D = 16 * NV;
  const int64_t G = H / KVH, qn_max = std::max<int64_t>(1, kAmxRows / G);
  // the packed K and V of each (sequence with a chunk, kv head)
  std::vector<int64_t> pack_off(S, -1);
  int64_t total = 0;
  for (int64_t s = 0; s < S; ++s)
    if (qsl[s + 1] - qsl[s] > 1) {
      pack_off[s] = total;
      total += KVH * 2 * ((lens[s] + 31) / 32 * 32) * D;
    }
  std::vector<uint16_t> packed(total);
  std::vector<std::pair<int64_t, int64_t>> packs;
  for (int64_t s = 0; s < S; ++s)
    if (pack_off[s] >= 0)
      for (int64_t kh = 0; kh < KVH; ++kh) packs.emplace_back(s, kh);
  auto pack_at = [&](int64_t s, int64_t kh) {
    const int64_t Lp = (lens[s] + 31) / 32 * 32;
    uint16_t* k = packed.data() + pack_off[s] + kh * 2 * Lp * D;
    return std::make_pair(k, k + Lp * D);
  };
  at::parallel_for(0, static_cast<int64_t>(packs.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const auto [s, kh] = packs[i];
      const auto [k, v] = pack_at(s, kh);
      pack_kv_amx(kc, vc, bt + s * MB, lens[s], (lens[s] + 31) / 32 * 32, KVH, kh, D, BS, k, v);
    }
  });
  std::vector<PrefillTask> tasks;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t q_len = qsl[s + 1] - qsl[s], base = lens[s] - q_len;
    const int64_t step = q_len == 1 ? 1 : qn_max;
    for (int64_t i0 = 0; i0 < q_len; i0 += step) {
      const int64_t qn = std::min<int64_t>(step, q_len - i0);
      for (int64_t kh = 0; kh < KVH; ++kh) tasks.push_back({s, qsl[s] + i0, qn, base + i0 + 1, kh});
    }
  }
  const int64_t n = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    qserve_amx::tiles_begin();
    std::vector<float> scores, sb, ob;
    std::vector<uint16_t> qa, pa;
    for (int64_t i = t0; i < t1; ++i) {
      const PrefillTask& tk = tasks[(i % 2 == 0) ? i / 2 : n - 1 - i / 2];
      if (pack_off[tk.seq] < 0) {  // a decode
        decode_task_avx512<c10::BFloat16, NV>(qp + (tk.row0 * H + tk.kh * G) * D, kc, vc,
                                              op + (tk.row0 * H + tk.kh * G) * D, bt + tk.seq * MB, tk.first_len,
                                              G, KVH, tk.kh, BS, sc, scores);
      } else {
        const auto [k, v] = pack_at(tk.seq, tk.kh);
        prefill_task_amx(qp, op, k, v, tk.row0, tk.qn, tk.first_len, H, G, tk.kh, D, sc, qa, sb, pa, ob);
      }
    }
    qserve_amx::tiles_end();
  });
}
#endif

at::Tensor paged_prefill(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                         const at::Tensor& block_tables, const at::Tensor& query_start_loc,
                         const at::Tensor& seq_lens, double scale, int64_t path) {
  TORCH_CHECK(q.device().is_cpu() && key_cache.device().is_cpu() && value_cache.device().is_cpu(),
              "qserve_cpu::paged_prefill: CPU tensors only");
  TORCH_CHECK(path >= 0 && path <= 2, "qserve_cpu::paged_prefill: path is 0 (fastest), 1 (AVX-512 without AMX) or ",
              "2 (generic loop), got ", path);
  const bool generic = path == 2;
  const auto kv_type = key_cache.scalar_type();
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  (kv_type == at::kFloat || kv_type == at::kBFloat16) && value_cache.scalar_type() == kv_type,
              "qserve_cpu::paged_prefill: float32 or bfloat16 q and caches (both caches alike) expected, got ",
              q.scalar_type(), ", ", kv_type, " and ", value_cache.scalar_type());
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "qserve_cpu::paged_prefill: q [T, H, D] and caches [blocks, block_size, KVH, D] expected, got ",
              q.sizes(), ", ", key_cache.sizes(), " and ", value_cache.sizes());
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_start_loc.scalar_type() == at::kInt,
              "qserve_cpu::paged_prefill: int32 block_tables, query_start_loc and seq_lens expected");
  TORCH_CHECK(q.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  block_tables.is_contiguous() && seq_lens.is_contiguous() && query_start_loc.is_contiguous(),
              "qserve_cpu::paged_prefill: contiguous tensors only");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = key_cache.size(0), BS = key_cache.size(1), KVH = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D && KVH > 0 && H % KVH == 0, "qserve_cpu::paged_prefill: ", H,
              " query heads of dim ", D, " over ", KVH, " kv heads of dim ", key_cache.size(3));
  const int64_t S = seq_lens.numel();
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == S && query_start_loc.numel() == S + 1,
              "qserve_cpu::paged_prefill: one block table row, one length and S + 1 query starts expected");
  const int64_t MB = block_tables.size(1);
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[S] == T, "qserve_cpu::paged_prefill: query_start_loc must run from 0 to ", T);
  std::vector<int64_t> seq_of(T), len_of(T);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = lens[s], q_len = qsl[s + 1] - qsl[s];
    TORCH_CHECK(q_len >= 0 && len >= q_len && len <= MB * BS, "qserve_cpu::paged_prefill: sequence ", s, " has ",
                q_len, " queries and length ", len, " but its block table holds ", MB * BS, " slots");
    for (int64_t b = 0; b < (len + BS - 1) / BS; ++b)
      TORCH_CHECK(bt[s * MB + b] >= 0 && bt[s * MB + b] < NB, "qserve_cpu::paged_prefill: sequence ", s,
                  " block ", b, " is ", bt[s * MB + b], ", outside the cache's ", NB, " blocks");
    for (int64_t i = 0; i < q_len; ++i) {
      seq_of[qsl[s] + i] = s;
      len_of[qsl[s] + i] = len - q_len + i + 1;
    }
  }
  const at::Tensor qf = q.scalar_type() == at::kFloat ? q : q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(qf);
  if (T == 0) return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
  const float sc = static_cast<float>(scale);
#if defined(__AVX512F__) && defined(QSERVE_AMX)
  if (path == 0 && (D == 64 || D == 128 || D == 256) && H / KVH <= 64 && q.scalar_type() == at::kBFloat16 &&
      kv_type == at::kBFloat16 && qserve_amx::amx_bf16_usable()) {
    const c10::BFloat16* kc = key_cache.data_ptr<c10::BFloat16>();
    const c10::BFloat16* vc = value_cache.data_ptr<c10::BFloat16>();
    float* o = out.data_ptr<float>();
    const float* qfp = qf.data_ptr<float>();
    if (D == 64)
      prefill_amx_impl<4>(qfp, kc, vc, o, bt, qsl, lens, S, H, KVH, BS, MB, sc);
    else if (D == 128)
      prefill_amx_impl<8>(qfp, kc, vc, o, bt, qsl, lens, S, H, KVH, BS, MB, sc);
    else
      prefill_amx_impl<16>(qfp, kc, vc, o, bt, qsl, lens, S, H, KVH, BS, MB, sc);
    return out.to(q.scalar_type());
  }
#endif
#if defined(__AVX512F__)
  if (!generic && (D == 64 || D == 128 || D == 256) && H / KVH <= 64) {
    prefill_blocked(qf.data_ptr<float>(), key_cache, value_cache, out.data_ptr<float>(), bt, qsl, lens, S, H, KVH, D,
                    BS, MB, sc);
    return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
  }
#endif
  auto row_of = [&](int64_t r) {  // 0, T-1, 1, T-2, ...: each thread's contiguous range gets short and long rows
    const int64_t row = (r % 2 == 0) ? r / 2 : T - 1 - r / 2;
    return AttnRow{row, seq_of[row], len_of[row]};
  };
  if (kv_type == at::kFloat) {
    attend_rows_impl<float>(qf.data_ptr<float>(), key_cache.data_ptr<float>(), value_cache.data_ptr<float>(),
                            out.data_ptr<float>(), bt, T, H, KVH, D, BS, MB, sc, !generic, row_of);
  } else {
    attend_rows_impl<c10::BFloat16>(qf.data_ptr<float>(), key_cache.data_ptr<c10::BFloat16>(),
                                    value_cache.data_ptr<c10::BFloat16>(), out.data_ptr<float>(), bt, T, H, KVH, D,
                                    BS, MB, sc, !generic, row_of);
  }
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// Rotate-half RoPE of one head: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), halves of length `half`, in fp32
// whatever the storage type (a bf16 model's values are rounded once, on the store).
template <typename T, typename C>
inline void rope_head(const T* __restrict x, const C* __restrict c, const C* __restrict s, int64_t half,
                      T* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
    const float ci = static_cast<float>(c[i]), si = static_cast<float>(s[i]);
    out[i] = static_cast<T>(x1 * ci - x2 * si);
    out[i + half] = static_cast<T>(x2 * ci + x1 * si);
  }
}

template <typename T, typename C>
void rope_write_kv_impl(const T* xp, const C* cp, const C* sp, T* qp, T* kc, T* vc, const int64_t* sm, int64_t n,
                        int64_t H, int64_t KVH, int64_t D) {
  const int64_t half = D / 2, width = (H + 2 * KVH) * D;
  at::parallel_for(0, n, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* row = xp + t * width;
      const C* c = cp + t * half;
      const C* s = sp + t * half;
      for (int64_t h = 0; h < H; ++h) rope_head(row + h * D, c, s, half, qp + (t * H + h) * D);
      if (sm[t] < 0) continue;  // padding token: nothing cached
      for (int64_t kh = 0; kh < KVH; ++kh) {
        rope_head(row + (H + kh) * D, c, s, half, kc + (sm[t] * KVH + kh) * D);
        std::copy(row + (H + KVH + kh) * D, row + (H + KVH + kh + 1) * D, vc + (sm[t] * KVH + kh) * D);
      }
    }
  });
}

at::Tensor rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& slot_mapping,
                         int64_t num_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && key_cache.device().is_cpu() && value_cache.device().is_cpu(),
              "qserve_cpu::rope_write_kv: CPU tensors only");
  const auto dt = qkv.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && key_cache.scalar_type() == dt &&
                  value_cache.scalar_type() == dt,
              "qserve_cpu::rope_write_kv: float32 or bfloat16 qkv and caches of the same dtype expected, got ", dt,
              ", ", key_cache.scalar_type(), " and ", value_cache.scalar_type());
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type() && (cos.scalar_type() == at::kFloat || cos.scalar_type() == dt),
              "qserve_cpu::rope_write_kv: cos/sin in float32 or qkv's dtype expected");
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
  if (dt == at::kFloat) {
    rope_write_kv_impl<float, float>(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                     q.data_ptr<float>(), key_cache.data_ptr<float>(), value_cache.data_ptr<float>(),
                                     sm, n, H, KVH, D);
  } else {
    using B = c10::BFloat16;
    if (cos.scalar_type() == at::kFloat)
      rope_write_kv_impl<B, float>(qkv.data_ptr<B>(), cos.data_ptr<float>(), sin.data_ptr<float>(), q.data_ptr<B>(),
                                   key_cache.data_ptr<B>(), value_cache.data_ptr<B>(), sm, n, H, KVH, D);
    else
      rope_write_kv_impl<B, B>(qkv.data_ptr<B>(), cos.data_ptr<B>(), sin.data_ptr<B>(), q.data_ptr<B>(),
                               key_cache.data_ptr<B>(), value_cache.data_ptr<B>(), sm, n, H, KVH, D);
  }
  return q;
}

// RMSNorm over the last dim in fp32 (as the reference implementation normalises), x and the output
// in x's dtype (fp32 or bf16), the weight in fp32 or x's dtype: w * round(x / rms(x)) with the product
// taken in fp32 and rounded once. One pass per row instead of the ~7 torch ops a bf16 norm takes.
template <typename T, typename W>
void rms_norm_impl(const T* x, const W* w, T* y, int64_t rows, int64_t N, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < N; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(N) + eps);
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) {
        // The reference rounds the normalised value to the model dtype before the weight multiply.
        const float h = static_cast<float>(static_cast<T>(static_cast<float>(xr[i]) * inv));
        yr[i] = static_cast<T>(static_cast<float>(w[i]) * h);
      }
    }
  });
}

#if defined(__AVX512F__)
// fp32 -> bf16 with round-to-nearest-even (NaN stays a quiet NaN), as c10::BFloat16's conversion rounds.
inline __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 from_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// The bf16 row body of rms_norm_impl: same arithmetic, 16 lanes at a time (the scalar loop's bf16
// conversions do not vectorise).
void rms_norm_bf16_avx512(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, int64_t rows,
                          int64_t N, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const c10::BFloat16* xr = x + r * N;
      c10::BFloat16* yr = y + r * N;
      __m512 acc = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= N; i += 16) {
        const __m512 v = load16(xr + i);
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      float ss = _mm512_reduce_add_ps(acc);
      for (int64_t j = i; j < N; ++j) ss += static_cast<float>(xr[j]) * static_cast<float>(xr[j]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(N) + eps);
      const __m512 iv = _mm512_set1_ps(inv);
      for (i = 0; i + 16 <= N; i += 16) {
        const __m512 h = from_bf16(to_bf16(_mm512_mul_ps(load16(xr + i), iv)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + i), to_bf16(_mm512_mul_ps(load16(w + i), h)));
      }
      for (; i < N; ++i) {
        const float h = static_cast<float>(static_cast<c10::BFloat16>(static_cast<float>(xr[i]) * inv));
        yr[i] = static_cast<c10::BFloat16>(static_cast<float>(w[i]) * h);
      }
    }
  });
}
#endif

// silu_mul: [n, 2I] (gate | up, a fused projection's output) -> silu(gate) * up [n, I] for bf16, in one
// pass; rounded as torch rounds the two ops it replaces (silu to bf16, then the product to bf16).
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.scalar_type() == at::kBFloat16 && gate_up.is_contiguous() &&
                  gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "qserve_cpu::silu_mul: a contiguous bf16 CPU tensor [..., 2 I] expected, got ", gate_up.scalar_type(),
              " ", gate_up.sizes());
  const int64_t I = gate_up.size(-1) / 2, rows = I ? gate_up.numel() / (2 * I) : 0;
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = I;
  at::Tensor out = at::empty(shape, gate_up.options());
  using B = c10::BFloat16;
  const B* xp = gate_up.data_ptr<B>();
  B* op = out.data_ptr<B>();
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const B* g = xp + r * 2 * I;
      const B* u = g + I;
      B* o = op + r * I;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= I; i += 16) {
        const __m512 gv = load16(g + i);
        // silu(g) = g / (1 + exp(-g)); exp512 clamps below, overflows to inf above (-> 0, as it should)
        const __m512 sv = from_bf16(to_bf16(_mm512_div_ps(gv, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), to_bf16(_mm512_mul_ps(sv, load16(u + i))));
      }
#endif
      for (; i < I; ++i) {
        const float gv = static_cast<float>(g[i]);
        const float sv = static_cast<float>(static_cast<B>(gv / (1.f + std::exp(-gv))));
        o[i] = static_cast<B>(sv * static_cast<float>(u[i]));
      }
    }
  });
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "qserve_cpu::rms_norm: CPU tensors only");
  const auto dt = x.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == dt),
              "qserve_cpu::rms_norm: float32 or bfloat16 x and a weight in float32 or x's dtype expected, got ", dt,
              " and ", weight.scalar_type());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.dim() >= 1 && weight.dim() == 1 &&
                  x.size(-1) == weight.size(0),
              "qserve_cpu::rms_norm: contiguous x [..., N] and weight [N] expected, got ", x.sizes(), " and ",
              weight.sizes());
  const int64_t N = weight.size(0), rows = N ? x.numel() / N : 0;
  at::Tensor y = at::empty_like(x);
  const float e = static_cast<float>(eps);
  using B = c10::BFloat16;
  if (dt == at::kFloat) {
    TORCH_CHECK(weight.scalar_type() == at::kFloat, "qserve_cpu::rms_norm: float32 x needs a float32 weight");
    rms_norm_impl<float, float>(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), rows, N, e);
  } else if (weight.scalar_type() == at::kFloat) {
    rms_norm_impl<B, float>(x.data_ptr<B>(), weight.data_ptr<float>(), y.data_ptr<B>(), rows, N, e);
  } else {
#if defined(__AVX512F__)
    rms_norm_bf16_avx512(x.data_ptr<B>(), weight.data_ptr<B>(), y.data_ptr<B>(), rows, N, e);
#else
    rms_norm_impl<B, B>(x.data_ptr<B>(), weight.data_ptr<B>(), y.data_ptr<B>(), rows, N, e);
#endif
  }
  return y;
}

// sample_rows: one token per row of logits [R, V] (fp32): the argmax where inv_temp[r] <= 0 (greedy; the
// first of equal maxima, as torch's argmax), otherwise the Gumbel-max draw argmax_j(l_j * inv_temp + g_j),
// g_j = -ln(-ln u_j), which picks j with probability softmax(l * inv_temp)_j (the exponential race in log
// form: -inf logits are never drawn). u_j comes from a counter-based hash of (seeds[r], j), so a row's
// draw depends only on its seed and logits, never on the batch around it, and needs no sequential
// generator: torch's exponential_ costs ~34 ns per element on one thread (65 ms for 40 rows of a 49k
// vocabulary), this pass ~1. The hash is two rounds of a 32-bit integer finaliser keyed by the seed's
// halves (scrambled), uniforms from its top 24 bits at the centres of their 2^-24 cells (never 0 or 1).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

inline float gumbel_scalar(uint32_t j, uint32_t k0, uint32_t k1) {
  const uint32_t bits = mix32(mix32(j ^ k0) + k1);
  const float u = (static_cast<float>(bits >> 8) + 0.5f) * (1.f / 16777216.f);
  return -std::log(-std::log(u));
}

#if defined(__AVX512F__)
inline __m512i mix32_512(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
#endif

// The best (score, index) of one row; `noise` false: score = l (greedy).
template <bool noise>
int64_t best_of_row(const float* l, int64_t V, float inv_temp, uint32_t k0, uint32_t k1) {
  float best = -INFINITY;
  int64_t best_j = 0;
  int64_t j = 0;
#if defined(__AVX512F__)
  if (V >= 16) {
    __m512 vbest = _mm512_set1_ps(-INFINITY);
    __m512i vidx = _mm512_setzero_si512();
    __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sixteen = _mm512_set1_epi32(16);
    const __m512 it = _mm512_set1_ps(inv_temp);
    for (; j + 16 <= V; j += 16) {
      __m512 score = _mm512_loadu_ps(l + j);
      if (noise) {
        const __m512i bits = mix32_512(_mm512_add_epi32(mix32_512(_mm512_xor_si512(lane, _mm512_set1_epi32(
                                                            static_cast<int>(k0)))),
                                                        _mm512_set1_epi32(static_cast<int>(k1))));
        const __m512 u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bits, 8)), _mm512_set1_ps(1.f / 16777216.f),
                                         _mm512_set1_ps(0.5f / 16777216.f));
        const __m512 e = _mm512_sub_ps(_mm512_setzero_ps(), qserve_vec::log512(u));  // -ln u > 0
        score = _mm512_fmsub_ps(score, it, qserve_vec::log512(e));                   // l / T - ln(-ln u)
      }
      const __mmask16 better = _mm512_cmp_ps_mask(score, vbest, _CMP_GT_OQ);  // strict: earlier index wins ties
      vbest = _mm512_mask_mov_ps(vbest, better, score);
      vidx = _mm512_mask_mov_epi32(vidx, better, lane);
      lane = _mm512_add_epi32(lane, sixteen);
    }
    alignas(64) float bv[16];
    alignas(64) int32_t bi[16];
    _mm512_store_ps(bv, vbest);
    _mm512_store_si512(reinterpret_cast<__m512i*>(bi), vidx);
    best_j = bi[0];
    best = bv[0];
    for (int i = 1; i < 16; ++i)
      if (bv[i] > best || (bv[i] == best && bi[i] < best_j)) best = bv[i], best_j = bi[i];
  }
#endif
  for (; j < V; ++j) {
    const float score = noise ? l[j] * inv_temp + gumbel_scalar(static_cast<uint32_t>(j), k0, k1) : l[j];
    if (score > best) best = score, best_j = j;
  }
  return best_j;
}

at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& inv_temp, const at::Tensor& seeds) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "qserve_cpu::sample_rows: float32 CPU logits [R, V] with contiguous rows expected, got ",
              logits.scalar_type(), " ", logits.sizes());
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 && V < (int64_t(1) << 31), "qserve_cpu::sample_rows: vocabulary size ", V, " out of range");
  TORCH_CHECK(inv_temp.scalar_type() == at::kFloat && inv_temp.dim() == 1 && inv_temp.size(0) == R &&
                  inv_temp.is_contiguous() && seeds.scalar_type() == at::kLong && seeds.dim() == 1 &&
                  seeds.size(0) == R && seeds.is_contiguous(),
              "qserve_cpu::sample_rows: inv_temp float32 [R] and seeds int64 [R] expected for ", R, " rows");
  at::Tensor out = at::empty({R}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  const int64_t ld = logits.stride(0);
  const float* tp = inv_temp.data_ptr<float>();
  const int64_t* sp = seeds.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint64_t seed = static_cast<uint64_t>(sp[r]);
      // keys scrambled first, so that nearby seeds (0, 1, 2, ...) still give unrelated noise vectors
      const uint32_t k0 = mix32(static_cast<uint32_t>(seed) ^ 0x85ebca6bu);
      const uint32_t k1 = mix32(static_cast<uint32_t>(seed >> 32) + k0);
      op[r] = tp[r] > 0.f ? best_of_row<true>(lp + r * ld, V, tp[r], k0, k1)
                          : best_of_row<false>(lp + r * ld, V, 0.f, k0, k1);
    }
  });
  return out;
}

}  // namespace

#include "ops.h"

namespace qserve_ops {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) { return ::rms_norm(x, weight, eps); }
at::Tensor silu_mul(const at::Tensor& gate_up) { return ::silu_mul(gate_up); }
at::Tensor rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& key_cache,
                         at::Tensor& value_cache, const at::Tensor& slot_mapping, int64_t num_heads) {
  return ::rope_write_kv(qkv, cos, sin, key_cache, value_cache, slot_mapping, num_heads);
}
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  return ::paged_decode(q, key_cache, value_cache, block_tables, seq_lens, scale, false);
}
}  // namespace qserve_ops

TORCH_LIBRARY(qserve_cpu, m) {
  m.def("rope_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping, int num_heads) -> Tensor");
  m.def("linear_small_m(Tensor x, Tensor w) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("sample_rows(Tensor logits, Tensor inv_temp, Tensor seeds) -> Tensor");
  m.def("paged_decode(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, bool generic=False) -> Tensor");
  m.def("paged_prefill(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor query_start_loc, Tensor seq_lens, float scale, int path=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(qserve_cpu, CPU, m) {
  m.impl("linear_small_m", &linear_small_m);
  m.impl("paged_decode", &paged_decode);
  m.impl("paged_prefill", &paged_prefill);
  m.impl("rope_write_kv", &rope_write_kv);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("sample_rows", &sample_rows);
}
