// qserve's C++ CPU kernels over 4-bit weights kept packed in memory, and a bf16-weight GEMM.
//
// Resident form (written once at load by qserve/kernels/cpu_packed.py from a GPTQ or AWQ checkpoint):
//   qdata  uint8 [NB, K/2, 64]  NB = ceil(N / 64) blocks of 64 output columns; byte (b, p, c) holds the
//                               code of column 64 b + c at input 2 p in its low nibble and at input 2 p + 1
//                               in its high nibble. One block is one sequential stream of K * 32 bytes.
//   scales fp16|fp32 [G, NB*64] per group and column, as stored in the checkpoint (fp16 stays fp16)
//   zeros  uint8 [G, NB*64]     true zero point per group and column (0..15)
// Groups are contiguous runs of `group_size` inputs: an act-order GPTQ layer has its input rows
// permuted once at load, and the activations are permuted the same way here (`perm`).
// Dequantization is w = s * (q - z) in fp32, exactly as qserve/kernels/packing.py computes it.
//
// packed_linear, few rows (M <= kFusedMaxM): per block of 64 columns and up to 4 activation rows, the
// nibbles are widened in registers and multiplied into fp32 accumulators; per group the kernel keeps
// sum_k x_k q_k and applies y += s * (that - z * sum_k x_k) once, so the inner loop is one FMA per
// weight and row and no dense weight is ever written to memory.
// packed_linear, many rows (prefill): each thread dequantizes a tile of columns into its own buffer of
// about 512 KiB (half of this machine's L2) and multiplies it with at::mm, so the compute is MKL's
// fp32 GEMM and the 4-bit weights are read once per call.
//
// linear_bf16w: y = x @ w^T for a bf16 weight [N, K] (the LM head and embeddings of a quantized model),
// fp32 accumulation; few rows stream the bf16 rows, many rows go through fp32 tiles and at::mm.
//
// packed_linear_q8, decode-sized rows (the llama.cpp Q4 x Q8 scheme): each activation row is quantized
// once per call to int8 in blocks of kb = gcd(group_size, 32) inputs, symmetric, one fp32 scale per block
// (xs = max|x| / 127, q = round-to-nearest-even(x * 127 / max|x|)), and the kernel sums nibble x int8
// products exactly in int32, per block and column. Per block it adds
//     s * (xs * sum_k q_k x_k  -  z * xs * sum_k x_k)      (the second sum over the int8 x: exact)
// to the output in fp32, so the result is exactly the fp32 GEMM of the weights with the dequantized int8
// activations xs * x_q, up to fp32 rounding of those per-block terms. Every body (AVX512-VNNI vpdpbusd,
// AVX2 vpmaddubsw + vpmaddwd, portable) runs the same integer sums and the same fp32 operations in the
// same order, so their outputs are bit-identical. Reading the resident layout: two rows p, p + 1 hold
// inputs 2p .. 2p + 3 of a column in their nibbles; two byte unpacks and two 16-bit unpacks turn them into
// 32-bit lanes of four consecutive inputs of one column, in a column order that is a 4x4 transpose of
// 128-bit lanes (W order) of the natural one: scales and zero points are transposed into it once per
// group and the output back once per block.
//
// Each kernel has an AVX-512 body (compiled with a target attribute and used when the CPU reports
// AVX-512F/BW/VL at run time) and a portable body; the caller picks one through `isa`
// (qserve/kernels/cpu_packed.py: auto-detected, or forced with QSERVE_CPU_ISA). The int8 path has
// AVX512-VNNI, AVX2 and portable bodies (isa 3, 2, 0).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(QSERVE_SIMDE)
// Tests only (tests/kernels/q8_simde_check.cpp): the x86 bodies compiled on SIMDe's portable versions of
// the intrinsics, so that the AVX-512 and VNNI bodies can be checked on a CPU without them.
#define QSERVE_X86 1
#define QSERVE_NO_TARGET 1
#include "q8_simde_shims.h"
#elif defined(__x86_64__) || defined(_M_X64)
#define QSERVE_X86 1
#include <immintrin.h>
#include "amx.h"
#endif

namespace {

constexpr int64_t kBlock = 64;        // output columns per block
constexpr int64_t kFusedMaxM = 32;    // rows up to which the fused kernel runs; above, dequantized tiles
constexpr int64_t kTileBytes = 512 * 1024;  // per-thread dequantized tile
constexpr int64_t kIsaScalar = 0;
constexpr int64_t kIsaAvx512 = 1;
constexpr int64_t kIsaAvx2 = 2;        // int8 path only
constexpr int64_t kIsaAvx512Vnni = 3;  // int8 path only

bool cpu_has_avx512_impl() {
#if defined(QSERVE_SIMDE)
  return true;
#elif defined(QSERVE_X86) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
  static const bool has = cpu_has_avx512_impl();
  return has;
}

bool cpu_has_avx512_vnni() {
#if defined(QSERVE_SIMDE)
  return true;
#elif defined(QSERVE_X86) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(QSERVE_X86) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

// Calls of packed_linear_q8 per body (index = isa code), so that tests can see which one ran.
std::atomic<int64_t> q8_calls_by_isa[4];

// Everything one call needs, in plain pointers.
struct Packed {
  const uint8_t* q;        // [NB, K/2, 64]
  const void* scales;      // [G, Np]
  bool scales_half;        // fp16 (else fp32)
  const uint8_t* zeros;    // [G, Np]
  int64_t K, N, Np, G, gs;
};

inline float scale_at(const Packed& w, int64_t g, int64_t col) {
  const int64_t i = g * w.Np + col;
  return w.scales_half ? static_cast<float>(static_cast<const c10::Half*>(w.scales)[i])
                       : static_cast<const float*>(w.scales)[i];
}

// ---------------------------------------------------------------------------------------------------
// Portable bodies
// ---------------------------------------------------------------------------------------------------

// y[m, col0 : col0 + 64] for rows m0..m0+mt of x [M, K] (fp32, groups contiguous); xsum [M, G].
void block_scalar(const Packed& w, int64_t b, const float* x, const float* xsum, int64_t m0, int64_t mt,
                  float* y, int64_t ldy) {
  const uint8_t* qb = w.q + b * (w.K / 2) * kBlock;
  const int64_t col0 = b * kBlock, ncols = std::min<int64_t>(kBlock, w.N - col0);
  for (int64_t m = m0; m < m0 + mt; ++m) {
    const float* xr = x + m * w.K;
    float out[kBlock] = {0.f};
    for (int64_t g = 0; g < w.G; ++g) {
      float acc[kBlock] = {0.f};
      for (int64_t p = g * w.gs / 2; p < (g + 1) * w.gs / 2; ++p) {
        const uint8_t* row = qb + p * kBlock;
        const float x0 = xr[2 * p], x1 = xr[2 * p + 1];
        for (int64_t c = 0; c < kBlock; ++c)
          acc[c] += x0 * static_cast<float>(row[c] & 15) + x1 * static_cast<float>(row[c] >> 4);
      }
      const float xs = xsum[m * w.G + g];
      const uint8_t* z = w.zeros + g * w.Np + col0;
      for (int64_t c = 0; c < kBlock; ++c)
        out[c] += scale_at(w, g, col0 + c) * (acc[c] - static_cast<float>(z[c]) * xs);
    }
    std::copy(out, out + ncols, y + m * ldy + col0);
  }
}

// Dense fp32 tile of blocks b0..b1: t[k, (b - b0) * 64 + c] = W'[64 b + c, k], row stride ld.
void dequant_scalar(const Packed& w, int64_t b0, int64_t b1, float* t, int64_t ld) {
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* qb = w.q + b * (w.K / 2) * kBlock;
    float* tb = t + (b - b0) * kBlock;
    for (int64_t g = 0; g < w.G; ++g) {
      float s[kBlock], z[kBlock];
      for (int64_t c = 0; c < kBlock; ++c) {
        s[c] = scale_at(w, g, b * kBlock + c);
        z[c] = static_cast<float>(w.zeros[g * w.Np + b * kBlock + c]);
      }
      for (int64_t p = g * w.gs / 2; p < (g + 1) * w.gs / 2; ++p) {
        const uint8_t* row = qb + p * kBlock;
        float* lo = tb + (2 * p) * ld;
        float* hi = lo + ld;
        for (int64_t c = 0; c < kBlock; ++c) {
          lo[c] = s[c] * (static_cast<float>(row[c] & 15) - z[c]);
          hi[c] = s[c] * (static_cast<float>(row[c] >> 4) - z[c]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// int8 activations (packed_linear_q8)
// ---------------------------------------------------------------------------------------------------

// Inputs per activation scale: gcd(group_size, 32), so that blocks never straddle a weight group; the
// kernels consume four inputs at a time, so it must be a multiple of 4 (0: the int8 path cannot run).
int64_t q8_block(int64_t group_size) {
  const int64_t kb = std::gcd(group_size, static_cast<int64_t>(32));
  return kb % 4 == 0 ? kb : 0;
}

struct Q8Act {
  std::vector<int8_t> q;  // [M, K] in -127..127
  std::vector<float> xs;  // [M, nb] scale per block
  std::vector<float> c;   // [M, nb] xs * (sum of the block's q): the zero-point term
  int64_t K = 0, kb = 0, nb = 0;
  const int8_t* row(int64_t m) const { return q.data() + m * K; }
};

// Symmetric per-block quantization of x [M, K] (fp32, contiguous). A block holding a NaN or an infinity
// gets a NaN scale, so that the outputs it touches are NaN, as the fp32 path's would be.
// T: float, or c10::BFloat16 read in place (a bf16 model's activations need no fp32 copy first).
template <typename T>
void quantize_q8(const T* x, int64_t M, int64_t K, int64_t kb, Q8Act& a) {
  a.K = K, a.kb = kb, a.nb = K / kb;
  a.q.resize(M * K);
  a.xs.resize(M * a.nb);
  a.c.resize(M * a.nb);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < a.nb; ++b) {
      const T* xr = x + m * K + b * kb;
      int8_t* qr = a.q.data() + m * K + b * kb;
      float amax = 0.f;
      bool finite = true;
      for (int64_t k = 0; k < kb; ++k) {
        const float v = static_cast<float>(xr[k]);
        finite = finite && std::isfinite(v);
        amax = std::max(amax, std::fabs(v));
      }
      const float inv = (amax > 0.f && finite) ? 127.f / amax : 0.f;
      int32_t sum = 0;
      for (int64_t k = 0; k < kb; ++k) {
        const float v = std::min(127.f, std::max(-127.f, std::nearbyint(static_cast<float>(xr[k]) * inv)));
        qr[k] = static_cast<int8_t>(v);
        sum += qr[k];
      }
      const float xs = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
      a.xs[m * a.nb + b] = xs;
      a.c[m * a.nb + b] = xs * static_cast<float>(sum);
    }
}

// The per-block epilogue every body runs, lane by lane: out += s * (acc * xs - z * c), two roundings
// (the product, then each fused multiply-add) in this order.
inline float q8_term(float out, int32_t acc, float xs, float c, float s, float z) {
  const float t = std::fma(-z, c, static_cast<float>(acc) * xs);
  return std::fma(s, t, out);
}

void block_q8_scalar(const Packed& w, int64_t b, const Q8Act& a, int64_t M, float* y, int64_t ldy) {
  const uint8_t* qb = w.q + b * (w.K / 2) * kBlock;
  const int64_t col0 = b * kBlock, ncols = std::min<int64_t>(kBlock, w.N - col0);
  const int64_t per_group = w.gs / a.kb;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = a.row(m);
    float out[kBlock] = {0.f};
    for (int64_t g = 0; g < w.G; ++g) {
      float s[kBlock], z[kBlock];
      for (int64_t c = 0; c < kBlock; ++c) {
        s[c] = scale_at(w, g, col0 + c);
        z[c] = static_cast<float>(w.zeros[g * w.Np + col0 + c]);
      }
      for (int64_t xb = g * per_group; xb < (g + 1) * per_group; ++xb) {
        int32_t acc[kBlock] = {0};
        for (int64_t p = xb * a.kb / 2; p < (xb + 1) * a.kb / 2; ++p) {
          const uint8_t* row = qb + p * kBlock;
          const int32_t x0 = xq[2 * p], x1 = xq[2 * p + 1];
          for (int64_t c = 0; c < kBlock; ++c) acc[c] += (row[c] & 15) * x0 + (row[c] >> 4) * x1;
        }
        const float xs = a.xs[m * a.nb + xb], cz = a.c[m * a.nb + xb];
        for (int64_t c = 0; c < kBlock; ++c) out[c] = q8_term(out[c], acc[c], xs, cz, s[c], z[c]);
      }
    }
    std::copy(out, out + ncols, y + m * ldy + col0);
  }
}

// ---------------------------------------------------------------------------------------------------
// AVX-512 bodies
// ---------------------------------------------------------------------------------------------------

#if defined(QSERVE_X86)
#if defined(QSERVE_NO_TARGET)
#define QSERVE_AVX512
#else
#define QSERVE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#endif

QSERVE_AVX512 inline __m512 load_scales16(const Packed& w, int64_t g, int64_t col) {
  const int64_t i = g * w.Np + col;
  if (w.scales_half)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
        static_cast<const c10::Half*>(w.scales) + i)));
  return _mm512_loadu_ps(static_cast<const float*>(w.scales) + i);
}

QSERVE_AVX512 inline __m512 load_zeros16(const Packed& w, int64_t g, int64_t col) {
  const __m128i z = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.zeros + g * w.Np + col));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z));
}

// MT rows (1..4) of one block. With MT <= 2 the even and odd inputs accumulate separately, so that
// even one row has eight independent FMA chains; with 3-4 rows the rows themselves provide them.
template <int MT>
QSERVE_AVX512 void block_avx512(const Packed& w, int64_t b, const float* x, const float* xsum, int64_t m0,
                                float* y, int64_t ldy) {
  constexpr bool kSplit = MT <= 2;
  const uint8_t* qb = w.q + b * (w.K / 2) * kBlock;
  const int64_t col0 = b * kBlock, ncols = std::min<int64_t>(kBlock, w.N - col0);
  const __m512i low4 = _mm512_set1_epi32(15);
  __m512 out[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < 4; ++j) out[m][j] = _mm512_setzero_ps();
  const float* xr[MT];
  for (int m = 0; m < MT; ++m) xr[m] = x + (m0 + m) * w.K;
  for (int64_t g = 0; g < w.G; ++g) {
    __m512 acc[MT][4], acc2[kSplit ? MT : 1][4];
    for (int m = 0; m < MT; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
    if constexpr (kSplit)
      for (int m = 0; m < MT; ++m)
        for (int j = 0; j < 4; ++j) acc2[m][j] = _mm512_setzero_ps();
    const int64_t p1 = (g + 1) * w.gs / 2;
    for (int64_t p = g * w.gs / 2; p < p1; ++p) {
      const uint8_t* row = qb + p * kBlock;
      __m512 lo[4], hi[4];
      for (int j = 0; j < 4; ++j) {
        const __m512i e =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * j)));
        lo[j] = _mm512_cvtepi32_ps(_mm512_and_si512(e, low4));
        hi[j] = _mm512_cvtepi32_ps(_mm512_srli_epi32(e, 4));
      }
      for (int m = 0; m < MT; ++m) {
        const __m512 x0 = _mm512_set1_ps(xr[m][2 * p]);
        const __m512 x1 = _mm512_set1_ps(xr[m][2 * p + 1]);
        for (int j = 0; j < 4; ++j) {
          acc[m][j] = _mm512_fmadd_ps(x0, lo[j], acc[m][j]);
          if constexpr (kSplit)
            acc2[m][j] = _mm512_fmadd_ps(x1, hi[j], acc2[m][j]);
          else
            acc[m][j] = _mm512_fmadd_ps(x1, hi[j], acc[m][j]);
        }
      }
    }
    for (int j = 0; j < 4; ++j) {
      const __m512 s = load_scales16(w, g, col0 + 16 * j);
      const __m512 z = load_zeros16(w, g, col0 + 16 * j);
      for (int m = 0; m < MT; ++m) {
        __m512 t = acc[m][j];
        if constexpr (kSplit) t = _mm512_add_ps(t, acc2[m][j]);
        t = _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[(m0 + m) * w.G + g]), t);  // t - z * xsum
        out[m][j] = _mm512_fmadd_ps(s, t, out[m][j]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    float* yr = y + (m0 + m) * ldy + col0;
    for (int j = 0; j < 4; ++j) {
      const int64_t left = ncols - 16 * j;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      _mm512_mask_storeu_ps(yr + 16 * j, mask, out[m][j]);
    }
  }
}

QSERVE_AVX512 void block_rows_avx512(const Packed& w, int64_t b, const float* x, const float* xsum, int64_t M,
                                     float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block_avx512<4>(w, b, x, xsum, m, y, ldy);
  switch (M - m) {
    case 3: block_avx512<3>(w, b, x, xsum, m, y, ldy); break;
    case 2: block_avx512<2>(w, b, x, xsum, m, y, ldy); break;
    case 1: block_avx512<1>(w, b, x, xsum, m, y, ldy); break;
    default: break;
  }
}

QSERVE_AVX512 void dequant_avx512(const Packed& w, int64_t b0, int64_t b1, float* t, int64_t ld) {
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* qb = w.q + b * (w.K / 2) * kBlock;
    float* tb = t + (b - b0) * kBlock;
    for (int64_t g = 0; g < w.G; ++g) {
      __m512 s[4], z[4];
      for (int j = 0; j < 4; ++j) {
        s[j] = load_scales16(w, g, b * kBlock + 16 * j);
        z[j] = load_zeros16(w, g, b * kBlock + 16 * j);
      }
      for (int64_t p = g * w.gs / 2; p < (g + 1) * w.gs / 2; ++p) {
        const uint8_t* row = qb + p * kBlock;
        float* lo = tb + (2 * p) * ld;
        float* hi = lo + ld;
        for (int j = 0; j < 4; ++j) {
          const __m512i e =
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * j)));
          // s * (q - z), the same two roundings as the reference's scale * (q - zero)
          _mm512_storeu_ps(lo + 16 * j,
                           _mm512_mul_ps(s[j], _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(e, low4)), z[j])));
          _mm512_storeu_ps(hi + 16 * j,
                           _mm512_mul_ps(s[j], _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(e, 4)), z[j])));
        }
      }
    }
  }
}

// bf16 row [K] widened to fp32 and dotted with fp32 x, 4 rows of x... one weight row at a time.
QSERVE_AVX512 inline __m512 bf16x16(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

QSERVE_AVX512 inline __m512 bf16x16_masked(const c10::BFloat16* p, __mmask16 m) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

template <int MT>
QSERVE_AVX512 void bf16_rows_avx512(const float* x, int64_t m0, const c10::BFloat16* wr, int64_t K, float* y,
                                    int64_t ldy, int64_t n) {
  __m512 a[MT][2];
  for (int m = 0; m < MT; ++m) a[m][0] = a[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = bf16x16(wr + k), w1 = bf16x16(wr + k + 16);
    for (int m = 0; m < MT; ++m) {
      const float* xr = x + (m0 + m) * K + k;
      a[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, a[m][0]);
      a[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, a[m][1]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m512 w0 = bf16x16_masked(wr + k, mk);
    for (int m = 0; m < MT; ++m)
      a[m][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x + (m0 + m) * K + k), w0, a[m][0]);
  }
  for (int m = 0; m < MT; ++m) y[(m0 + m) * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(a[m][0], a[m][1]));
}

QSERVE_AVX512 void bf16_row_avx512(const float* x, int64_t M, const c10::BFloat16* wr, int64_t K, float* y,
                                   int64_t ldy, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) bf16_rows_avx512<4>(x, m, wr, K, y, ldy, n);
  switch (M - m) {
    case 3: bf16_rows_avx512<3>(x, m, wr, K, y, ldy, n); break;
    case 2: bf16_rows_avx512<2>(x, m, wr, K, y, ldy, n); break;
    case 1: bf16_rows_avx512<1>(x, m, wr, K, y, ldy, n); break;
    default: break;
  }
}
// int8 path, AVX512-VNNI: 64 columns are four zmm of 16 int32 lanes in W order (see the top of the file).
#if defined(QSERVE_NO_TARGET)
#define QSERVE_VNNI
#else
#define QSERVE_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))
#endif

// v[j].block[L] <-> v[L].block[j] for the four 128-bit blocks of four vectors (its own inverse).
QSERVE_VNNI inline void transpose_blocks(__m512 v[4]) {
  const __m512 t0 = _mm512_shuffle_f32x4(v[0], v[1], 0x44), t1 = _mm512_shuffle_f32x4(v[0], v[1], 0xEE);
  const __m512 t2 = _mm512_shuffle_f32x4(v[2], v[3], 0x44), t3 = _mm512_shuffle_f32x4(v[2], v[3], 0xEE);
  v[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
  v[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
  v[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
  v[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
}

inline int32_t load_x4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int MT>
QSERVE_VNNI void block_q8_vnni(const Packed& w, int64_t b, const Q8Act& a, int64_t m0, float* y, int64_t ldy) {
  const uint8_t* qb = w.q + b * (w.K / 2) * kBlock;
  const int64_t col0 = b * kBlock, ncols = std::min<int64_t>(kBlock, w.N - col0);
  const int64_t per_group = w.gs / a.kb, rows = a.kb / 2;
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512 out[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < 4; ++j) out[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.G; ++g) {
    __m512 s[4], z[4];
    for (int j = 0; j < 4; ++j) {
      s[j] = load_scales16(w, g, col0 + 16 * j);
      z[j] = load_zeros16(w, g, col0 + 16 * j);
    }
    transpose_blocks(s);
    transpose_blocks(z);
    for (int64_t xb = g * per_group; xb < (g + 1) * per_group; ++xb) {
      __m512i acc[MT][4];
      for (int m = 0; m < MT; ++m)
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_si512();
      for (int64_t p = xb * rows; p < (xb + 1) * rows; p += 2) {
        const __m512i A = _mm512_loadu_si512(qb + p * kBlock), B = _mm512_loadu_si512(qb + (p + 1) * kBlock);
        const __m512i alo = _mm512_and_si512(A, low4), ahi = _mm512_and_si512(_mm512_srli_epi16(A, 4), low4);
        const __m512i blo = _mm512_and_si512(B, low4), bhi = _mm512_and_si512(_mm512_srli_epi16(B, 4), low4);
        const __m512i p0 = _mm512_unpacklo_epi8(alo, ahi), p1 = _mm512_unpackhi_epi8(alo, ahi);
        const __m512i q0 = _mm512_unpacklo_epi8(blo, bhi), q1 = _mm512_unpackhi_epi8(blo, bhi);
        const __m512i wv[4] = {_mm512_unpacklo_epi16(p0, q0), _mm512_unpackhi_epi16(p0, q0),
                               _mm512_unpacklo_epi16(p1, q1), _mm512_unpackhi_epi16(p1, q1)};
        for (int m = 0; m < MT; ++m) {
          const __m512i xv = _mm512_set1_epi32(load_x4(a.row(m0 + m) + 2 * p));
          for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], wv[j], xv);
        }
      }
      for (int m = 0; m < MT; ++m) {
        const __m512 xs = _mm512_set1_ps(a.xs[(m0 + m) * a.nb + xb]);
        const __m512 cz = _mm512_set1_ps(a.c[(m0 + m) * a.nb + xb]);
        for (int j = 0; j < 4; ++j) {
          const __m512 t = _mm512_fnmadd_ps(z[j], cz, _mm512_mul_ps(_mm512_cvtepi32_ps(acc[m][j]), xs));
          out[m][j] = _mm512_fmadd_ps(s[j], t, out[m][j]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    transpose_blocks(out[m]);
    float* yr = y + (m0 + m) * ldy + col0;
    for (int j = 0; j < 4; ++j) {
      const int64_t left = ncols - 16 * j;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      _mm512_mask_storeu_ps(yr + 16 * j, mask, out[m][j]);
    }
  }
}

QSERVE_VNNI void block_rows_q8_vnni(const Packed& w, int64_t b, const Q8Act& a, int64_t M, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block_q8_vnni<4>(w, b, a, m, y, ldy);
  switch (M - m) {
    case 3: block_q8_vnni<3>(w, b, a, m, y, ldy); break;
    case 2: block_q8_vnni<2>(w, b, a, m, y, ldy); break;
    case 1: block_q8_vnni<1>(w, b, a, m, y, ldy); break;
    default: break;
  }
}

// int8 path, AVX2: each 32-column half of a block is four ymm of 8 int32 lanes in W order (lane i of
// 128-bit block L of vector j is column 16 L + 4 j + i of the half). One byte unpack per row gives the
// two inputs of a column side by side; vpmaddubsw multiplies them with the two int8 activations and
// adds the pair (at most 2 * 15 * 127, no saturation) into int16 lanes, summed over up to 8 rows and
// then sign-extended into the int32 sums.
#if defined(QSERVE_NO_TARGET)
#define QSERVE_AVX2
#else
#define QSERVE_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

QSERVE_AVX2 inline void avx2_to_w_order(__m256 v[4]) {  // natural (8 columns each) -> W order
  const __m256 n0 = v[0], n1 = v[1], n2 = v[2], n3 = v[3];
  v[0] = _mm256_permute2f128_ps(n0, n2, 0x20);
  v[1] = _mm256_permute2f128_ps(n0, n2, 0x31);
  v[2] = _mm256_permute2f128_ps(n1, n3, 0x20);
  v[3] = _mm256_permute2f128_ps(n1, n3, 0x31);
}

QSERVE_AVX2 inline void avx2_from_w_order(__m256 v[4]) {
  const __m256 w0 = v[0], w1 = v[1], w2 = v[2], w3 = v[3];
  v[0] = _mm256_permute2f128_ps(w0, w1, 0x20);
  v[1] = _mm256_permute2f128_ps(w2, w3, 0x20);
  v[2] = _mm256_permute2f128_ps(w0, w1, 0x31);
  v[3] = _mm256_permute2f128_ps(w2, w3, 0x31);
}

QSERVE_AVX2 inline __m256 avx2_scales8(const Packed& w, int64_t g, int64_t col) {
  const int64_t i = g * w.Np + col;
  if (w.scales_half)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const c10::Half*>(w.scales) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(w.scales) + i);
}

QSERVE_AVX2 inline __m256 avx2_zeros8(const Packed& w, int64_t g, int64_t col) {
  const __m128i z = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.zeros + g * w.Np + col));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z));
}

template <int MT>
QSERVE_AVX2 void block_q8_avx2(const Packed& w, int64_t b, const Q8Act& a, int64_t m0, float* y, int64_t ldy) {
  const uint8_t* qb = w.q + b * (w.K / 2) * kBlock;
  const int64_t col0 = b * kBlock, ncols = std::min<int64_t>(kBlock, w.N - col0);
  const int64_t per_group = w.gs / a.kb, rows = a.kb / 2;
  const __m256i low4 = _mm256_set1_epi8(15);
  __m256 out[MT][2][4];
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j) out[m][h][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.G; ++g) {
    __m256 s[2][4], z[2][4];
    for (int h = 0; h < 2; ++h) {
      for (int r = 0; r < 4; ++r) {
        s[h][r] = avx2_scales8(w, g, col0 + 32 * h + 8 * r);
        z[h][r] = avx2_zeros8(w, g, col0 + 32 * h + 8 * r);
      }
      avx2_to_w_order(s[h]);
      avx2_to_w_order(z[h]);
    }
    for (int64_t xb = g * per_group; xb < (g + 1) * per_group; ++xb) {
      for (int h = 0; h < 2; ++h) {  // the second half re-reads the block's lines from L1
        __m256i acc[MT][4];
        for (int m = 0; m < MT; ++m)
          for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_si256();
        // Runs of at most 8 rows (16 inputs) add in int16: |sum| <= 8 * 2 * 15 * 127 = 30480 < 2^15.
        for (int64_t p0 = xb * rows; p0 < (xb + 1) * rows; p0 += 8) {
          const int64_t p1 = std::min(p0 + 8, (xb + 1) * rows);
          __m256i a16[MT][2];
          for (int m = 0; m < MT; ++m) a16[m][0] = a16[m][1] = _mm256_setzero_si256();
          for (int64_t p = p0; p < p1; ++p) {
            const __m256i A = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + p * kBlock + 32 * h));
            const __m256i lo = _mm256_and_si256(A, low4), hi = _mm256_and_si256(_mm256_srli_epi16(A, 4), low4);
            // 16-bit lanes (inputs 2p, 2p + 1) of one column: columns 16 L + 0..7, then 16 L + 8..15
            const __m256i c0 = _mm256_unpacklo_epi8(lo, hi), c1 = _mm256_unpackhi_epi8(lo, hi);
            for (int m = 0; m < MT; ++m) {
              int16_t x2;
              std::memcpy(&x2, a.row(m0 + m) + 2 * p, 2);
              const __m256i xv = _mm256_set1_epi16(x2);
              a16[m][0] = _mm256_add_epi16(a16[m][0], _mm256_maddubs_epi16(c0, xv));
              a16[m][1] = _mm256_add_epi16(a16[m][1], _mm256_maddubs_epi16(c1, xv));
            }
          }
          for (int m = 0; m < MT; ++m)
            for (int t = 0; t < 2; ++t) {  // sign-extend to int32: W order (columns 16 L + 8 t + 0..3, + 4..7)
              const __m256i sign = _mm256_srai_epi16(a16[m][t], 15);
              acc[m][2 * t] = _mm256_add_epi32(acc[m][2 * t], _mm256_unpacklo_epi16(a16[m][t], sign));
              acc[m][2 * t + 1] = _mm256_add_epi32(acc[m][2 * t + 1], _mm256_unpackhi_epi16(a16[m][t], sign));
            }
        }
        for (int m = 0; m < MT; ++m) {
          const __m256 xs = _mm256_set1_ps(a.xs[(m0 + m) * a.nb + xb]);
          const __m256 cz = _mm256_set1_ps(a.c[(m0 + m) * a.nb + xb]);
          for (int j = 0; j < 4; ++j) {
            const __m256 t = _mm256_fnmadd_ps(z[h][j], cz, _mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][j]), xs));
            out[m][h][j] = _mm256_fmadd_ps(s[h][j], t, out[m][h][j]);
          }
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    float* yr = y + (m0 + m) * ldy + col0;
    for (int h = 0; h < 2; ++h) {
      avx2_from_w_order(out[m][h]);
      for (int r = 0; r < 4; ++r) {
        const int64_t c = 32 * h + 8 * r, left = ncols - c;
        if (left >= 8) {
          _mm256_storeu_ps(yr + c, out[m][h][r]);
        } else if (left > 0) {
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, out[m][h][r]);
          std::copy(tmp, tmp + left, yr + c);
        }
      }
    }
  }
}

QSERVE_AVX2 void block_rows_q8_avx2(const Packed& w, int64_t b, const Q8Act& a, int64_t M, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block_q8_avx2<4>(w, b, a, m, y, ldy);
  switch (M - m) {
    case 3: block_q8_avx2<3>(w, b, a, m, y, ldy); break;
    case 2: block_q8_avx2<2>(w, b, a, m, y, ldy); break;
    case 1: block_q8_avx2<1>(w, b, a, m, y, ldy); break;
    default: break;
  }
}
// bf16 weight rows on AVX2 (the LM head of a quantized model on CPUs without AVX-512).
QSERVE_AVX2 inline __m256 bf16x8_avx2(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

template <int MT>
QSERVE_AVX2 void bf16_rows_avx2(const float* x, int64_t m0, const c10::BFloat16* wr, int64_t K, float* y,
                                int64_t ldy, int64_t n) {
  __m256 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = bf16x8_avx2(wr + k), w1 = bf16x8_avx2(wr + k + 8);
    for (int m = 0; m < MT; ++m) {
      const float* xr = x + (m0 + m) * K + k;
      acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), w1, acc[m][1]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_add_ps(acc[m][0], acc[m][1]));
    float sum = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    const float* xr = x + (m0 + m) * K;
    for (int64_t kk = k; kk < K; ++kk) sum += xr[kk] * static_cast<float>(wr[kk]);
    y[(m0 + m) * ldy + n] = sum;
  }
}

QSERVE_AVX2 void bf16_row_avx2(const float* x, int64_t M, const c10::BFloat16* wr, int64_t K, float* y,
                               int64_t ldy, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) bf16_rows_avx2<4>(x, m, wr, K, y, ldy, n);
  switch (M - m) {
    case 3: bf16_rows_avx2<3>(x, m, wr, K, y, ldy, n); break;
    case 2: bf16_rows_avx2<2>(x, m, wr, K, y, ldy, n); break;
    case 1: bf16_rows_avx2<1>(x, m, wr, K, y, ldy, n); break;
    default: break;
  }
}
#endif  // QSERVE_X86

// The fp32 ops: 0 portable, 1 AVX-512, 2 AVX2 (the bf16-weight kernel's AVX2 body; the 4-bit fp32 kernels
// have none and run their portable body).
void check_isa(int64_t isa, const char* op) {
  TORCH_CHECK(isa == kIsaScalar || isa == kIsaAvx512 || isa == kIsaAvx2, op,
              ": isa must be 0 (scalar), 1 (avx512) or 2 (avx2), got ", isa);
  TORCH_CHECK(isa != kIsaAvx512 || cpu_has_avx512(), op,
              ": the AVX-512 path was requested but this CPU lacks AVX-512F/BW/VL; "
              "unset QSERVE_CPU_ISA or set QSERVE_CPU_ISA=scalar");
  TORCH_CHECK(isa != kIsaAvx2 || cpu_has_avx2(), op,
              ": the AVX2 path was requested but this CPU lacks AVX2/FMA; unset QSERVE_CPU_ISA or set "
              "QSERVE_CPU_ISA=scalar");
}

void block_rows(const Packed& w, int64_t b, const float* x, const float* xsum, int64_t M, float* y, int64_t ldy,
                int64_t isa) {
#if defined(QSERVE_X86)
  if (isa == kIsaAvx512) return block_rows_avx512(w, b, x, xsum, M, y, ldy);
#endif
  block_scalar(w, b, x, xsum, 0, M, y, ldy);
}

void dequant_tile(const Packed& w, int64_t b0, int64_t b1, float* t, int64_t ld, int64_t isa) {
#if defined(QSERVE_X86)
  if (isa == kIsaAvx512) return dequant_avx512(w, b0, b1, t, ld);
#endif
  dequant_scalar(w, b0, b1, t, ld);
}

void check_isa_q8(int64_t isa, const char* op) {
  TORCH_CHECK(isa == kIsaScalar || isa == kIsaAvx2 || isa == kIsaAvx512Vnni, op,
              ": isa must be 0 (scalar), 2 (avx2) or 3 (avx512_vnni), got ", isa);
  TORCH_CHECK(isa != kIsaAvx2 || cpu_has_avx2(), op,
              ": the AVX2 int8 path was requested but this CPU lacks AVX2/FMA; unset QSERVE_CPU_ISA or set "
              "QSERVE_CPU_ISA=scalar");
  TORCH_CHECK(isa != kIsaAvx512Vnni || cpu_has_avx512_vnni(), op,
              ": the AVX512-VNNI int8 path was requested but this CPU lacks AVX512-VNNI; unset QSERVE_CPU_ISA "
              "or pick another value");
}

void block_rows_q8(const Packed& w, int64_t b, const Q8Act& a, int64_t M, float* y, int64_t ldy, int64_t isa) {
#if defined(QSERVE_X86)
  if (isa == kIsaAvx512Vnni) return block_rows_q8_vnni(w, b, a, M, y, ldy);
  if (isa == kIsaAvx2) return block_rows_q8_avx2(w, b, a, M, y, ldy);
#endif
  block_q8_scalar(w, b, a, M, y, ldy);
}

Packed check_packed(const at::Tensor& qdata, const at::Tensor& scales, const at::Tensor& zeros, int64_t n,
                    int64_t group_size, const char* op) {
  TORCH_CHECK(qdata.device().is_cpu() && scales.device().is_cpu() && zeros.device().is_cpu(), op,
              ": CPU tensors only");
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.dim() == 3 && qdata.size(2) == kBlock && qdata.is_contiguous(),
              op, ": qdata must be contiguous uint8 [blocks, K/2, 64], got ", qdata.scalar_type(), " ", qdata.sizes());
  const int64_t NB = qdata.size(0), K = qdata.size(1) * 2, Np = NB * kBlock;
  TORCH_CHECK(n > Np - kBlock && n <= Np, op, ": ", n, " output columns do not fit ", NB, " blocks of 64");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, op,
              ": scales must be float16 or float32, got ", scales.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == Np && scales.is_contiguous(), op,
              ": scales must be contiguous [groups, ", Np, "], got ", scales.sizes());
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.sizes() == scales.sizes() && zeros.is_contiguous(), op,
              ": zeros must be contiguous uint8 of the scales' shape ", scales.sizes(), ", got ", zeros.scalar_type(),
              " ", zeros.sizes());
  const int64_t G = scales.size(0);
  TORCH_CHECK(group_size >= 2 && group_size % 2 == 0 && G * group_size == K, op, ": ", G, " groups of ",
              group_size, " inputs do not cover K = ", K, " (group_size must be even and divide K)");
  return Packed{qdata.data_ptr<uint8_t>(), scales.data_ptr(), scales.scalar_type() == at::kHalf,
                zeros.data_ptr<uint8_t>(), K, n, Np, G, group_size};
}

// x as contiguous fp32 [M, K], its inputs permuted by perm when given (act-order).
at::Tensor activations_fp32(const at::Tensor& x, const c10::optional<at::Tensor>& perm, int64_t K, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": activations must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, op, ": x must be [M, ", K, "], got ", x.sizes());
  at::Tensor xf = x.to(at::kFloat);
  if (perm.has_value() && perm->defined()) {
    TORCH_CHECK(perm->scalar_type() == at::kLong && perm->dim() == 1 && perm->numel() == K, op,
                ": perm must be int64 [", K, "], got ", perm->scalar_type(), " ", perm->sizes());
    xf = xf.index_select(1, *perm);
  }
  return xf.contiguous();
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                         const at::Tensor& zeros, const c10::optional<at::Tensor>& perm, int64_t n,
                         int64_t group_size, int64_t isa, bool bf16_tiles) {
  const char* op = "qserve_cpu::packed_linear";
  check_isa(isa, op);
  const Packed w = check_packed(qdata, scales, zeros, n, group_size, op);
  const at::Tensor xf = activations_fp32(x, perm, w.K, op);
  const int64_t M = xf.size(0), NB = qdata.size(0);
  at::Tensor y = at::empty({M, n}, xf.options());
  if (M == 0 || n == 0) return y.to(x.scalar_type());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M <= kFusedMaxM) {
    std::vector<float> xsum(M * w.G);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < w.G; ++g) {
        float s = 0.f;
        for (int64_t k = g * w.gs; k < (g + 1) * w.gs; ++k) s += xp[m * w.K + k];
        xsum[m * w.G + g] = s;
      }
    at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) block_rows(w, b, xp, xsum.data(), M, yp, n, isa);
    });
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  // Prefill: tiles of whole blocks, sized to kTileBytes, each dequantized by one thread into its own
  // buffer and multiplied on that thread: fp32 activations by MKL's sgemm; bf16 activations (a bf16
  // model's, exact in bf16) with the tile rounded to bf16 by oneDNN's bf16 GEMM (AVX512-BF16/AMX), as
  // the dense bf16 path computes: at 64 rows ~3x the sgemm tiles on the AMX machine.
  const bool bf16 = x.scalar_type() == at::kBFloat16 && bf16_tiles;
  const at::Tensor xb = bf16 ? xf.to(at::kBFloat16) : xf;
  const int64_t per_tile = std::max<int64_t>(1, kTileBytes / (w.K * kBlock * 4));
  const int64_t tiles = (NB + per_tile - 1) / per_tile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor buf = at::empty({w.K, per_tile * kBlock}, xf.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = t * per_tile, b1 = std::min(NB, b0 + per_tile);
      const int64_t c0 = b0 * kBlock, cols = std::min(n, b1 * kBlock) - c0;
      dequant_tile(w, b0, b1, buf.data_ptr<float>(), per_tile * kBlock, isa);
      at::Tensor part = bf16 ? at::mm(xb, buf.narrow(1, 0, cols).to(at::kBFloat16)).to(at::kFloat).contiguous()
                             : at::mm(xf, buf.narrow(1, 0, cols)).contiguous();  // [M, cols]
      // Raw copy, not Tensor::copy_: this runs on a pool thread, which does not inherit the caller's
      // InferenceMode, and y is an inference tensor when the engine calls under inference_mode.
      const float* pp = part.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m) std::memcpy(yp + m * n + c0, pp + m * cols, sizeof(float) * cols);
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

int64_t checked_q8_block(int64_t group_size, const char* op) {
  const int64_t kb = q8_block(group_size);
  TORCH_CHECK(kb > 0, op, ": the int8-activation path needs a group size that is a multiple of 4, got ",
              group_size, "; use the fp32 path (QSERVE_CPU_ACT_INT8=0)");
  return kb;
}

// y = x @ W'^T with x quantized to int8 per row and block (see the top of the file); any M, meant for few.
at::Tensor packed_linear_q8(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                            const at::Tensor& zeros, const c10::optional<at::Tensor>& perm, int64_t n,
                            int64_t group_size, int64_t isa) {
  const char* op = "qserve_cpu::packed_linear_q8";
  check_isa_q8(isa, op);
  const Packed w = check_packed(qdata, scales, zeros, n, group_size, op);
  const int64_t kb = checked_q8_block(w.gs, op);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  // bf16 rows without act-order are quantized straight from x (act-order ones, and malformed x, go through
  // activations_fp32's checked, permuted fp32 copy); sums are fp32, and a bf16 output is rounded from them
  // here: no fp32 copy of x, no fp32 output tensor and its conversion (two ATen ops per layer, ~10 us of a
  // decode step's ~40 us per 4-bit layer at SmolLM2's sizes).
  const bool in_place = bf16 && !(perm.has_value() && perm->defined()) && x.device().is_cpu() && x.dim() == 2 &&
                        x.size(1) == w.K && x.is_contiguous();
  const at::Tensor xf = in_place ? x : activations_fp32(x, perm, w.K, op);
  const int64_t M = xf.size(0), NB = qdata.size(0);
  q8_calls_by_isa[isa].fetch_add(1, std::memory_order_relaxed);
  at::Tensor out = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return out;
  Q8Act a;
  if (in_place)
    quantize_q8(x.data_ptr<c10::BFloat16>(), M, w.K, kb, a);
  else
    quantize_q8(xf.data_ptr<float>(), M, w.K, kb, a);
  std::vector<float> sums(bf16 ? M * n : 0);
  float* yp = bf16 ? sums.data() : out.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block_rows_q8(w, b, a, M, yp, n, isa);
  });
  if (bf16) {
    c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < M * n; ++i) o[i] = static_cast<c10::BFloat16>(yp[i]);  // nearest even, as .to()
  }
  return out;
}

// (x_q int8 [M, K], scales fp32 [M, K / kb]) as packed_linear_q8 quantizes x (after perm): for tests.
std::tuple<at::Tensor, at::Tensor> quantize_activations_q8(const at::Tensor& x, const c10::optional<at::Tensor>& perm,
                                                         int64_t group_size) {
  const char* op = "qserve_cpu::quantize_activations_q8";
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, K], got ", x.sizes());
  const int64_t K = x.size(1);
  TORCH_CHECK(group_size >= 2 && K % group_size == 0, op, ": group_size ", group_size, " does not divide K = ", K);
  const int64_t kb = checked_q8_block(group_size, op);
  const at::Tensor xf = activations_fp32(x, perm, K, op);
  Q8Act a;
  quantize_q8(xf.data_ptr<float>(), xf.size(0), K, kb, a);
  at::Tensor q = at::empty({xf.size(0), K}, xf.options().dtype(at::kChar));
  at::Tensor s = at::empty({xf.size(0), a.nb}, xf.options());
  std::memcpy(q.data_ptr<int8_t>(), a.q.data(), a.q.size());
  std::memcpy(s.data_ptr<float>(), a.xs.data(), a.xs.size() * sizeof(float));
  return {q, s};
}

std::vector<int64_t> q8_calls_op() {
  std::vector<int64_t> v;
  for (auto& c : q8_calls_by_isa) v.push_back(c.load(std::memory_order_relaxed));
  return v;
}

bool has_avx512_vnni_op() { return cpu_has_avx512_vnni(); }
bool has_avx2_op() { return cpu_has_avx2(); }

// W' [K, n] fp32 in the resident (permuted) input order: what the prefill path multiplies with.
at::Tensor packed_dequantize(const at::Tensor& qdata, const at::Tensor& scales, const at::Tensor& zeros, int64_t n,
                             int64_t group_size, int64_t isa) {
  const char* op = "qserve_cpu::packed_dequantize";
  check_isa(isa, op);
  const Packed w = check_packed(qdata, scales, zeros, n, group_size, op);
  at::Tensor t = at::empty({w.K, w.Np}, scales.options().dtype(at::kFloat));
  dequant_tile(w, 0, qdata.size(0), t.data_ptr<float>(), w.Np, isa);
  return t.narrow(1, 0, n).contiguous();
}

at::Tensor linear_bf16w(const at::Tensor& x, const at::Tensor& w, int64_t isa) {
  const char* op = "qserve_cpu::linear_bf16w";
  check_isa(isa, op);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(), op,
              ": weight must be a contiguous bfloat16 [N, K] CPU tensor, got ", w.scalar_type(), " ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor xf = activations_fp32(x, c10::nullopt, K, op);
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  if (M == 0 || N == 0) return y.to(x.scalar_type());
  const float* xp = xf.data_ptr<float>();
  const c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
  float* yp = y.data_ptr<float>();
  if (M <= kFusedMaxM) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t nn = n0; nn < n1; ++nn) {
#if defined(QSERVE_X86)
        if (isa == kIsaAvx512) {
          bf16_row_avx512(xp, M, wp + nn * K, K, yp, N, nn);
          continue;
        }
        if (isa == kIsaAvx2) {
          bf16_row_avx2(xp, M, wp + nn * K, K, yp, N, nn);
          continue;
        }
#endif
        const c10::BFloat16* wr = wp + nn * K;
        for (int64_t m = 0; m < M; ++m) {
          float a = 0.f;
          for (int64_t k = 0; k < K; ++k) a += xp[m * K + k] * static_cast<float>(wr[k]);
          yp[m * N + nn] = a;
        }
      }
    });
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  const int64_t rows = std::max<int64_t>(16, kTileBytes / (4 * K));
  const int64_t tiles = (N + rows - 1) / rows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * rows, r = std::min(N, r0 + rows) - r0;
      at::Tensor tile = w.narrow(0, r0, r).to(at::kFloat);  // [r, K], one conversion of the tile
      // Copy by pointer, not y.narrow(...).copy_(): worker threads do not inherit the caller's
      // InferenceMode, and an in-place op on an inference tensor outside it throws (seen at 2 threads).
      const at::Tensor part = at::mm(xf, tile.t()).contiguous();  // [M, r]
      const float* pp = part.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m) std::memcpy(yp + m * N + r0, pp + m * r, sizeof(float) * r);
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------------------
// bf16 activations on AMX tiles (packed_linear_amx)
// ---------------------------------------------------------------------------------------------------
#if defined(QSERVE_AMX) && !defined(QSERVE_SIMDE)

// One block of 64 columns dequantized to bf16 (w = s (q - z) in fp32, rounded to nearest even: the dense
// bf16 path's weight) straight into AMX B tiles: out [K/32][4][16][16] uint32, tile (k step, column
// tile) holding, per row p (a pair of inputs 2p, 2p + 1) and column c, the two bf16 as one uint32. The
// resident layout already keeps inputs 2p and 2p + 1 of a column in one byte, so a byte becomes a pair.
QSERVE_AMX_BF16_TARGET void dequant_block_amx(const Packed& w, int64_t b, uint32_t* out) {
  const uint8_t* qb = w.q + b * (w.K / 2) * kBlock;
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t g = 0; g < w.G; ++g) {
    __m512 s[4], z[4];
    for (int ct = 0; ct < 4; ++ct) {
      const int64_t i = g * w.Np + b * kBlock + ct * 16;
      s[ct] = w.scales_half
                  ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                        static_cast<const c10::Half*>(w.scales) + i)))
                  : _mm512_loadu_ps(static_cast<const float*>(w.scales) + i);
      z[ct] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.zeros + i))));
    }
    for (int64_t p = g * w.gs / 2; p < (g + 1) * w.gs / 2; ++p) {
      const uint8_t* row = qb + p * kBlock;
      uint32_t* dst = out + ((p / 16) * 4 * 16 + (p % 16)) * 16;
      for (int ct = 0; ct < 4; ++ct) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + ct * 16)));
        const __m512 lo = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))), z[ct]), s[ct]);
        const __m512 hi = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), z[ct]), s[ct]);
        // [lo 0..15, hi 0..15] as bf16, then interleaved to (lo c, hi c) per column
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(dst + ct * 256, _mm512_permutexvar_epi16(pairs, both));
      }
    }
  }
}

// c [Mp, 64] fp32 = xb [Mp, K] bf16 (Mp a multiple of 16) x the block's tiles: per 16-row tile, the four
// column tiles accumulate in tiles 0-3, the rows in tile 4, the weights in tiles 5-7.
QSERVE_AMX_BF16_TARGET void block_gemm_amx(const uint16_t* xb, int64_t Mp, int64_t K, const uint32_t* wt, float* c) {
  const int64_t steps = K / 32, xs = K * 2;
  for (int64_t i = 0; i < Mp; i += 16) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t* a = xb + i * K;
    for (int64_t k = 0; k < steps; ++k) qserve_amx::dot_a_by_four_b(a + k * 32, xs, wt + k * 4 * 256);
    float* ci = c + i * kBlock;
    _tile_stored(0, ci, kBlock * 4);
    _tile_stored(1, ci + 16, kBlock * 4);
    _tile_stored(2, ci + 32, kBlock * 4);
    _tile_stored(3, ci + 48, kBlock * 4);
  }
}
#endif

// y [M, n] = x [M, K] (bf16) @ W'^T on AMX tiles: each thread dequantizes one block of 64 columns at a
// time into bf16 tiles (K x 128 bytes, in L2) and multiplies every activation row with it, so the 4-bit
// weights are read once per call and expanded once, whatever M. Output in bf16 (fp32 sums).
at::Tensor packed_linear_amx(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                             const at::Tensor& zeros, const c10::optional<at::Tensor>& perm, int64_t n,
                             int64_t group_size) {
  const char* op = "qserve_cpu::packed_linear_amx";
#if defined(QSERVE_AMX) && !defined(QSERVE_SIMDE)
  const bool amx = qserve_amx::amx_bf16_usable();
#else
  const bool amx = false;
#endif
  TORCH_CHECK(amx, op, ": this CPU (or kernel) offers no AMX-BF16; use packed_linear");
  const Packed w = check_packed(qdata, scales, zeros, n, group_size, op);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == w.K, op,
              ": x must be a bfloat16 CPU tensor [M, ", w.K, "], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(w.K % 32 == 0, op, ": K = ", w.K, " must be a multiple of 32 (one AMX k step)");
  const int64_t M = x.size(0), Mp = (M + 15) / 16 * 16, NB = qdata.size(0);
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  at::Tensor xb = x;
  if (perm.has_value() && perm->defined()) {
    TORCH_CHECK(perm->scalar_type() == at::kLong && perm->dim() == 1 && perm->numel() == w.K, op,
                ": perm must be int64 [", w.K, "], got ", perm->scalar_type(), " ", perm->sizes());
    xb = xb.index_select(1, *perm);
  }
  if (Mp != M) xb = at::cat({xb, at::zeros({Mp - M, w.K}, x.options())});
  xb = xb.contiguous();
#if defined(QSERVE_AMX) && !defined(QSERVE_SIMDE)
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<c10::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> wt(w.K / 2 * kBlock);
    std::vector<float> c(Mp * kBlock);
    qserve_amx::tiles_begin();
    for (int64_t b = b0; b < b1; ++b) {
      dequant_block_amx(w, b, wt.data());
      block_gemm_amx(xp, Mp, w.K, wt.data(), c.data());
      const int64_t c0 = b * kBlock, cols = std::min(n, c0 + kBlock) - c0;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < cols; ++j) yp[m * n + c0 + j] = c10::BFloat16(c[m * kBlock + j]).x;
    }
    qserve_amx::tiles_end();
  });
#endif
  return y;
}

bool has_avx512_op() { return cpu_has_avx512(); }

}  // namespace

#if !defined(QSERVE_SIMDE)
#include "ops.h"

namespace qserve_ops {
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                         const at::Tensor& zeros, const c10::optional<at::Tensor>& perm, int64_t n,
                         int64_t group_size, int64_t isa, bool bf16_tiles) {
  return ::packed_linear(x, qdata, scales, zeros, perm, n, group_size, isa, bf16_tiles);
}
at::Tensor packed_linear_q8(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                            const at::Tensor& zeros, const c10::optional<at::Tensor>& perm, int64_t n,
                            int64_t group_size, int64_t isa) {
  return ::packed_linear_q8(x, qdata, scales, zeros, perm, n, group_size, isa);
}
at::Tensor packed_linear_amx(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                             const at::Tensor& zeros, const c10::optional<at::Tensor>& perm, int64_t n,
                             int64_t group_size) {
  return ::packed_linear_amx(x, qdata, scales, zeros, perm, n, group_size);
}
}  // namespace qserve_ops

TORCH_LIBRARY_FRAGMENT(qserve_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor qdata, Tensor scales, Tensor zeros, Tensor? perm, int n, int group_size, "
        "int isa, bool bf16_tiles=False) -> Tensor");
  m.def("packed_dequantize(Tensor qdata, Tensor scales, Tensor zeros, int n, int group_size, int isa) -> Tensor");
  m.def("linear_bf16w(Tensor x, Tensor w, int isa) -> Tensor");
  m.def("has_avx512() -> bool", &has_avx512_op);
  m.def("packed_linear_amx(Tensor x, Tensor qdata, Tensor scales, Tensor zeros, Tensor? perm, int n, "
        "int group_size) -> Tensor");
  m.def("packed_linear_q8(Tensor x, Tensor qdata, Tensor scales, Tensor zeros, Tensor? perm, int n, "
        "int group_size, int isa) -> Tensor");
  m.def("quantize_activations_q8(Tensor x, Tensor? perm, int group_size) -> (Tensor, Tensor)");
  m.def("q8_calls() -> int[]", &q8_calls_op);
  m.def("has_avx512_vnni() -> bool", &has_avx512_vnni_op);
  m.def("has_avx2() -> bool", &has_avx2_op);
}

TORCH_LIBRARY_IMPL(qserve_cpu, CPU, m) {
  m.impl("packed_linear", &packed_linear);
  m.impl("packed_linear_amx", &packed_linear_amx);
  m.impl("packed_dequantize", &packed_dequantize);
  m.impl("linear_bf16w", &linear_bf16w);
  m.impl("packed_linear_q8", &packed_linear_q8);
  m.impl("quantize_activations_q8", &quantize_activations_q8);
}
#endif  // !QSERVE_SIMDE
