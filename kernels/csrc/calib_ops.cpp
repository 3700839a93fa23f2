// C++ kernels for calibration (qserve/quantize/gptq.py): the clipping-range search and the Gram matrices
// of bf16 activations on AMX.
//
// mse_qparams: the GPTQ quantizer's clipping-range search (`mse_qparams`) as one pass per row.
// For each row of w [rows, cols] (one quantization group per row) the search tries the ranges
// p * [min, max] for p = 1, 1 - 1/grid, ..., down to 1 - max_shrink (exclusive) and keeps the p with the
// least sum |w - dq(q(w))|^norm. The torch version runs about a dozen elementwise ops over the whole
// group for each of the ~80 candidates; it was a quarter of a SmolLM2 GPTQ run. Here a row stays in
// registers while every candidate is scored: a [1536, 64] group in 8.5-8.9 ms against 43-53 ms.
//
// The arithmetic is the torch version's, operation for operation in fp32: the shrunk min/max of w * p
// equal min/max(w) * p (multiplying by p > 0 is monotone under rounding), scale and zero point as
// qserve/kernels/packing.py computes them, q = clamp(round_half_even(w / s) + z, 0, maxq), dq = s (q - z).
// Only |dq - w|^norm differs: exp(norm ln d) from the polynomials of vec_math.h (a few ulp; SLEEF's powf,
// which torch calls, is within 1 ulp and made this search 2.7x slower), and each row's sum is taken in
// another order. Where two
// candidates tie to within that rounding the choice may differ; the chosen error is the same to it.

// bf16_gram: A^T B for bf16 activations A [T, n], B [T, m] with AMX tiles (GPTQ's Hessian 2/T X^T X when a
// bf16 model is calibrated in bf16, opt-in through QSERVE_GPTQ_AMX=1: see quantize/gptq.py): bf16 x bf16 products are exact in fp32 and the tile unit sums them in
// fp32, so the result is the fp32 GEMM of the same values up to the order of the sums (measured closer to
// an fp64 reference than MKL's sgemm). A symmetric call (A is B) computes the 32 x 32 blocks on and above
// the diagonal and mirrors them: [8192, 1536] 72 ms against 207 ms for the fp32 sgemm of the widened
// values on this machine's two cores (2x at 576 columns).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "amx.h"
#include "vec_math.h"

namespace {

struct Grid {
  int64_t maxq;
  bool sym;
  int64_t sym_scale;  // 0 absmax, 1 signed (packing.SYM_SCALES)
};

// compute_qparams for one row whose (shrunk) max and min are hi and lo.
inline void qparams(const Grid& g, float hi, float lo, float& scale, float& zero) {
  const float maxq = static_cast<float>(g.maxq);
  if (g.sym) {
    const int64_t half = (g.maxq + 1) / 2;
    if (g.sym_scale == 1) {
      scale = std::max(std::max(hi, 0.f) / static_cast<float>(half - 1),
                       -std::min(lo, 0.f) / static_cast<float>(half));
      scale = std::max(scale, 1e-8f);
    } else {
      const float amax = std::max(std::max(std::fabs(hi), std::fabs(lo)), 1e-8f);
      scale = 2.f * amax / maxq;
    }
    zero = static_cast<float>(half);
  } else {
    lo = std::min(lo, 0.f);
    hi = std::max(hi, 0.f);
    const float span = std::max(hi - lo, 1e-8f);
    scale = span / maxq;
    zero = std::min(std::max(std::nearbyint(-lo / scale), 0.f), maxq);
  }
}

// sum_c |s (clamp(round(w_c / s) + z, 0, maxq) - z) - w_c|^norm
float lp_error_scalar(const float* w, int64_t n, float s, float z, float maxq, float norm) {
  float sum = 0.f;
  for (int64_t c = 0; c < n; ++c) {
    const float q = std::min(std::max(std::nearbyint(w[c] / s) + z, 0.f), maxq);
    sum += std::pow(std::fabs(s * (q - z) - w[c]), norm);
  }
  return sum;
}

#if defined(__AVX512F__)
using qserve_vec::exp512;
using qserve_vec::log512;

float lp_error_avx512(const float* w, int64_t n, float s, float z, float maxq, float norm) {
  const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z), mq = _mm512_set1_ps(maxq);
  const __m512 nv = _mm512_set1_ps(norm), zero = _mm512_setzero_ps();
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m =
        n - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - c)) - 1u);
    const __m512 wv = _mm512_maskz_loadu_ps(m, w + c);
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(wv, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, zv), zero), mq);
    const __m512 d = _mm512_and_ps(_mm512_sub_ps(_mm512_mul_ps(sv, _mm512_sub_ps(q, zv)), wv), absmask);
    // d^norm = exp(norm ln d); d = 0 (and masked lanes) contribute 0
    const __mmask16 pos = _mm512_mask_cmp_ps_mask(m, d, zero, _CMP_GT_OQ);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(pos, exp512(_mm512_mul_ps(nv, log512(d)))));
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

std::tuple<at::Tensor, at::Tensor> mse_qparams(const at::Tensor& w_in, int64_t bits, bool sym, double norm,
                                               int64_t grid, double max_shrink, int64_t sym_scale) {
  TORCH_CHECK(w_in.dim() == 2, "mse_qparams: w must be [rows, cols], got ", w_in.sizes());
  TORCH_CHECK(w_in.size(1) > 0, "mse_qparams: w has no columns");
  TORCH_CHECK(bits >= 1 && bits <= 8, "mse_qparams: bits must be 1..8, got ", bits);
  TORCH_CHECK(grid >= 1, "mse_qparams: grid must be positive, got ", grid);
  TORCH_CHECK(sym_scale == 0 || sym_scale == 1, "mse_qparams: sym_scale must be 0 (absmax) or 1 (signed)");
  const at::Tensor w = w_in.to(at::kFloat).contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor scales = at::empty({rows}, w.options());
  at::Tensor zeros = at::empty({rows}, w.options());
  const Grid g{(int64_t{1} << bits) - 1, sym, sym_scale};
  const float maxq = static_cast<float>(g.maxq), nf = static_cast<float>(norm);
  // Candidates past the first, as `1.0 - i / grid` in double rounded to the fp32 the tensor op uses.
  const int64_t steps = static_cast<int64_t>(max_shrink * static_cast<double>(grid));
  const float* wp = w.data_ptr<float>();
  float* sp = scales.data_ptr<float>();
  float* zp = zeros.data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = wp + r * cols;
      float wmax = row[0], wmin = row[0];
      for (int64_t c = 1; c < cols; ++c) {
        wmax = std::max(wmax, row[c]);
        wmin = std::min(wmin, row[c]);
      }
      auto error = [&](float s, float z) {
#if defined(__AVX512F__)
        return lp_error_avx512(row, cols, s, z, maxq, nf);
#else
        return lp_error_scalar(row, cols, s, z, maxq, nf);
#endif
      };
      float best_s, best_z;
      qparams(g, wmax, wmin, best_s, best_z);
      float best = error(best_s, best_z);
      for (int64_t i = 1; i < steps; ++i) {
        const float p = static_cast<float>(1.0 - static_cast<double>(i) / static_cast<double>(grid));
        float s, z;
        qparams(g, wmax * p, wmin * p, s, z);
        const float e = error(s, z);
        if (e < best) {
          best = e;
          best_s = s;
          best_z = z;
        }
      }
      sp[r] = best_s;
      zp[r] = best_z;
    }
  });
  return {scales, zeros};
}

// The scalar error sum, exposed for tests (the AVX-512 body must agree with it to fp32 rounding).
at::Tensor lp_error_rows(const at::Tensor& w_in, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                         double norm, bool vector_body) {
  TORCH_CHECK(w_in.dim() == 2, "lp_error_rows: w must be [rows, cols]");
  const at::Tensor w = w_in.to(at::kFloat).contiguous();
  const at::Tensor s = scale.to(at::kFloat).contiguous(), z = zero.to(at::kFloat).contiguous();
  TORCH_CHECK(s.numel() == w.size(0) && z.numel() == w.size(0), "lp_error_rows: one scale and zero per row");
  at::Tensor out = at::empty({w.size(0)}, w.options());
  const float maxq = static_cast<float>((int64_t{1} << bits) - 1);
  for (int64_t r = 0; r < w.size(0); ++r) {
    const float* row = w.data_ptr<float>() + r * w.size(1);
    const float sr = s.data_ptr<float>()[r], zr = z.data_ptr<float>()[r];
#if defined(__AVX512F__)
    if (vector_body) {
      out.data_ptr<float>()[r] = lp_error_avx512(row, w.size(1), sr, zr, maxq, static_cast<float>(norm));
      continue;
    }
#endif
    out.data_ptr<float>()[r] = lp_error_scalar(row, w.size(1), sr, zr, maxq, static_cast<float>(norm));
  }
  return out;
}

#if defined(QSERVE_AMX)
using qserve_amx::amx_bf16_usable;

// Operands are packed tile by tile so that every tile load reads 1 KiB contiguously:
//   Ap [n/16][T/32][16 rows][32 tokens]             a transposed (rows = features of a)
//   Bp [m/16][T/32][16 token pairs][16 columns][2]  b with each pair of tokens interleaved per column
// A pass over kGramTokens tokens runs every 32 x 32 block of C; a thread's blocks share block rows, so
// its A tiles stay in L1 and the pass's B tiles (m x 512 bytes) in L2.
constexpr int64_t kGramTokens = 1024;

// C [.., ldc] += A^T B over token steps [s0, s1) (32 tokens each) for blocks [k0, k1) of `blocks`; `first`
// starts the sums at zero. Tiles 0-3 accumulate a 32 x 32 block of C, 4-5 hold A, 6-7 hold B.
QSERVE_AMX_TARGET void gram_blocks(const uint16_t* ap, const uint16_t* bp, int64_t steps, float* c, int64_t ldc,
                                   const std::vector<std::pair<int64_t, int64_t>>& blocks, int64_t k0,
                                   int64_t k1, int64_t s0, int64_t s1, bool first) {
  const qserve_amx::TileConfig cfg = qserve_amx::full_tiles();
  _tile_loadconfig(&cfg);
  const int64_t ldcb = ldc * 4, tile = 512;  // uint16 per packed tile
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t bi = blocks[k].first, bj = blocks[k].second;  // 32-row / 32-column block indices
    float* cb = c + (32 * bi) * ldc + 32 * bj;
    if (first) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    } else {
      _tile_loadd(0, cb, ldcb);
      _tile_loadd(1, cb + 16, ldcb);
      _tile_loadd(2, cb + 16 * ldc, ldcb);
      _tile_loadd(3, cb + 16 * ldc + 16, ldcb);
    }
    const uint16_t* a0 = ap + (2 * bi) * steps * tile;
    const uint16_t* a1 = a0 + steps * tile;
    const uint16_t* b0 = bp + (2 * bj) * steps * tile;
    const uint16_t* b1 = b0 + steps * tile;
    for (int64_t s = s0; s < s1; ++s) {
      _tile_loadd(4, a0 + s * tile, 64);
      _tile_loadd(5, a1 + s * tile, 64);
      _tile_loadd(6, b0 + s * tile, 64);
      _tile_loadd(7, b1 + s * tile, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, cb, ldcb);
    _tile_stored(1, cb + 16, ldcb);
    _tile_stored(2, cb + 16 * ldc, ldcb);
    _tile_stored(3, cb + 16 * ldc + 16, ldcb);
  }
  _tile_release();
}

// Ap from x [T, n] (see above), zero-padded to np rows and Tp tokens.
void pack_a(const uint16_t* x, int64_t T, int64_t n, int64_t np, int64_t Tp, uint16_t* ap) {
  const int64_t steps = Tp / 32;
  at::parallel_for(0, (np / 16) * steps, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t rb = i / steps, s = i % steps;
      const int64_t tn = std::max<int64_t>(0, std::min<int64_t>(32, T - 32 * s));
      const int64_t fn = std::max<int64_t>(0, std::min<int64_t>(16, n - 16 * rb));
      uint16_t* tile = ap + i * 512;
      if (tn < 32 || fn < 16) std::fill(tile, tile + 512, uint16_t{0});
      for (int64_t q = 0; q < tn; ++q) {  // token 32 s + q: up to 16 features of its row
        const uint16_t* row = x + (32 * s + q) * n + 16 * rb;
        for (int64_t r = 0; r < fn; ++r) tile[r * 32 + q] = row[r];
      }
    }
  });
}

// Bp from x [T, m], zero-padded to mp columns and Tp tokens.
void pack_b(const uint16_t* x, int64_t T, int64_t m, int64_t mp, int64_t Tp, uint16_t* bp) {
  const int64_t steps = Tp / 32;
  at::parallel_for(0, (mp / 16) * steps, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t cb = i / steps, s = i % steps;
      const int64_t tn = std::max<int64_t>(0, std::min<int64_t>(32, T - 32 * s));
      const int64_t cn = std::max<int64_t>(0, std::min<int64_t>(16, m - 16 * cb));
      uint16_t* tile = bp + i * 512;
      if (tn < 32 || cn < 16) std::fill(tile, tile + 512, uint16_t{0});
      for (int64_t q = 0; q < tn; ++q) {  // token 32 s + q is element q & 1 of pair q / 2
        const uint16_t* row = x + (32 * s + q) * m + 16 * cb;
        uint16_t* out = tile + (q / 2) * 32 + (q & 1);
        for (int64_t c = 0; c < cn; ++c) out[2 * c] = row[c];
      }
    }
  });
}

#endif

bool has_amx_bf16_op() {
#if defined(QSERVE_AMX)
  return amx_bf16_usable();
#else
  return false;
#endif
}

at::Tensor bf16_gram(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "qserve_cpu::bf16_gram";
  TORCH_CHECK(has_amx_bf16_op(), op, ": this CPU (or kernel) offers no AMX-BF16; use an fp32 matmul");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == at::kBFloat16 &&
                  b.scalar_type() == at::kBFloat16,
              op, ": a and b must be bfloat16 CPU tensors, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), op, ": a [T, n] and b [T, m] must share T, got ",
              a.sizes(), " and ", b.sizes());
  const bool symmetric = a.is_same(b);
  const int64_t T = a.size(0), n = a.size(1), m = b.size(1);
  at::Tensor out = at::empty({n, m}, a.options().dtype(at::kFloat));
  if (T == 0) out.zero_();
  if (T == 0 || n == 0 || m == 0) return out;
#if defined(QSERVE_AMX)
  const int64_t Tp = (T + 31) / 32 * 32, np = (n + 31) / 32 * 32, mp = (m + 31) / 32 * 32;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor apk = at::empty({np * Tp}, a.options());
  at::Tensor bpk = at::empty({mp * Tp}, b.options());
  uint16_t* ap = reinterpret_cast<uint16_t*>(apk.data_ptr<c10::BFloat16>());
  uint16_t* bp = reinterpret_cast<uint16_t*>(bpk.data_ptr<c10::BFloat16>());
  pack_a(reinterpret_cast<const uint16_t*>(ac.data_ptr<c10::BFloat16>()), T, n, np, Tp, ap);
  pack_b(reinterpret_cast<const uint16_t*>(bc.data_ptr<c10::BFloat16>()), T, m, mp, Tp, bp);
  at::Tensor c = (np == n && mp == m) ? out : at::empty({np, mp}, out.options());
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t i = 0; i < np / 32; ++i)
    for (int64_t j = symmetric ? i : 0; j < mp / 32; ++j) blocks.emplace_back(i, j);
  float* cp = c.data_ptr<float>();
  const int64_t steps = Tp / 32, chunk = kGramTokens / 32;
  for (int64_t s0 = 0; s0 < steps; s0 += chunk) {
    const int64_t s1 = std::min(steps, s0 + chunk);
    at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t k0, int64_t k1) {
      gram_blocks(ap, bp, steps, cp, mp, blocks, k0, k1, s0, s1, s0 == 0);
    });
  }
  if (symmetric)  // the blocks below the diagonal from those above
    for (int64_t i = 0; i < np / 32; ++i)
      for (int64_t j = 0; j < i; ++j)
        for (int64_t r = 0; r < 32; ++r)
          for (int64_t q = 0; q < 32; ++q) cp[(32 * i + r) * mp + 32 * j + q] = cp[(32 * j + q) * mp + 32 * i + r];
  if (!c.is_same(out)) out.copy_(c.narrow(0, 0, n).narrow(1, 0, m));
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qserve_cpu, m) {
  m.def("has_amx_bf16() -> bool", &has_amx_bf16_op);
  m.def("bf16_gram(Tensor a, Tensor b) -> Tensor");
  m.def("mse_qparams(Tensor w, int bits, bool sym, float norm, int grid, float max_shrink, int sym_scale) "
        "-> (Tensor, Tensor)");
  m.def("lp_error_rows(Tensor w, Tensor scale, Tensor zero, int bits, float norm, bool vector_body) -> Tensor");
}

TORCH_LIBRARY_IMPL(qserve_cpu, CPU, m) {
  m.impl("mse_qparams", &mse_qparams);
  m.impl("lp_error_rows", &lp_error_rows);
  m.impl("bf16_gram", &bf16_gram);
}
