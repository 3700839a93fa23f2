// Tests only: the AVX512-VNNI int8 body and the AVX-512 fp32 bodies of kernels/csrc/cpu_packed.cpp,
// compiled on SIMDe (portable intrinsics), against the portable bodies on random layers. The int8
// bodies must agree bit for bit (same integer sums, same fp32 operations in the same order); the fp32
// dequantizer too; the fp32 GEMV bodies to fp32 rounding. Prints one line per failure, exits non-zero.
// Built and run by tests/kernels/test_cpu_packed_q8.py.
#define QSERVE_SIMDE 1
#include "../../../kernels/csrc/cpu_packed.cpp"

#include <cstdio>
#include <random>

namespace {

int failures = 0;

void fail(const char* what, int64_t gs, int64_t n, int64_t m, int64_t i, float got, float want) {
  if (++failures <= 20)
    std::printf("FAIL %s group_size=%lld N=%lld M=%lld index=%lld got=%.9g want=%.9g\n", what,
                static_cast<long long>(gs), static_cast<long long>(n), static_cast<long long>(m),
                static_cast<long long>(i), got, want);
}

void check_layer(std::mt19937& rng, int64_t N, int64_t K, int64_t gs, bool half_scales) {
  const int64_t NB = (N + kBlock - 1) / kBlock, Np = NB * kBlock, G = K / gs;
  std::vector<uint8_t> q(NB * (K / 2) * kBlock), z(G * Np);
  std::vector<c10::Half> sh(G * Np);
  std::vector<float> sf(G * Np);
  std::uniform_int_distribution<int> byte(0, 255), nib(0, 15);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (auto& v : q) v = static_cast<uint8_t>(byte(rng));
  for (int64_t i = 0; i < G * Np; ++i) {
    z[i] = static_cast<uint8_t>(nib(rng));
    sf[i] = 0.01f + std::fabs(normal(rng)) * 0.05f;
    sh[i] = c10::Half(sf[i]);
    if (half_scales) sf[i] = static_cast<float>(sh[i]);
  }
  const Packed w{q.data(), half_scales ? static_cast<const void*>(sh.data()) : sf.data(), half_scales, z.data(),
                 K, N, Np, G, gs};
  for (int64_t M : {1, 2, 3, 4, 5, 7, 8}) {
    std::vector<float> x(M * K);
    for (auto& v : x) v = normal(rng) * (1.f + 3.f * (byte(rng) == 0));  // a few outliers
    Q8Act a;
    quantize_q8(x.data(), M, K, q8_block(gs), a);
    std::vector<float> ys(M * N), yv(M * N, -1.f), ya(M * N, -2.f);
    for (int64_t b = 0; b < NB; ++b) {
      block_rows_q8(w, b, a, M, ys.data(), N, kIsaScalar);
      block_rows_q8(w, b, a, M, yv.data(), N, kIsaAvx512Vnni);
      block_rows_q8(w, b, a, M, ya.data(), N, kIsaAvx2);
    }
    for (int64_t i = 0; i < M * N; ++i) {
      if (std::memcmp(&yv[i], &ys[i], 4) != 0) fail("int8 avx512_vnni vs scalar", gs, N, M, i, yv[i], ys[i]);
      if (std::memcmp(&ya[i], &ys[i], 4) != 0) fail("int8 avx2 vs scalar", gs, N, M, i, ya[i], ys[i]);
    }
    // fp32 fused kernel: AVX-512 body against the portable one (different summation order)
    std::vector<float> xsum(M * G);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) s += x[m * K + k];
        xsum[m * G + g] = s;
      }
    std::vector<float> fs(M * N), fv(M * N, -1.f);
    for (int64_t b = 0; b < NB; ++b) {
      block_rows(w, b, x.data(), xsum.data(), M, fs.data(), N, kIsaScalar);
      block_rows(w, b, x.data(), xsum.data(), M, fv.data(), N, kIsaAvx512);
    }
    for (int64_t i = 0; i < M * N; ++i)
      if (!(std::fabs(fv[i] - fs[i]) <= 1e-4f + 1e-5f * std::fabs(fs[i]))) fail("fp32 avx512 vs scalar", gs, N, M, i, fv[i], fs[i]);
  }
  std::vector<float> ts(K * Np), tv(K * Np, -1.f);
  dequant_tile(w, 0, NB, ts.data(), Np, kIsaScalar);
  dequant_tile(w, 0, NB, tv.data(), Np, kIsaAvx512);
  for (int64_t i = 0; i < K * Np; ++i)
    if (std::memcmp(&tv[i], &ts[i], 4) != 0) fail("dequant avx512 vs scalar", gs, N, 0, i, tv[i], ts[i]);
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  int layers = 0;
  for (int64_t gs : {32, 64, 128, 256})
    for (int64_t N : {200, 64, 13})
      for (bool half : {true, false}) {
        check_layer(rng, N, 256, gs, half);
        ++layers;
      }
  check_layer(rng, 100, 96, 48, true);  // kb = 16
  check_layer(rng, 70, 40, 40, true);   // kb = 8
  check_layer(rng, 70, 36, 12, false);  // kb = 4
  layers += 3;
  std::printf("%s: %d layers, %d failures\n", failures ? "FAILED" : "OK", layers, failures);
  return failures ? 1 : 0;
}
