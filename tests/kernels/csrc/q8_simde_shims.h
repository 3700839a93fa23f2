// Tests only: the x86 intrinsics cpu_packed.cpp uses, from SIMDe (portable C implementations), plus the
// few SIMDe 0.7 lacks, written lane by lane here. Included by kernels/csrc/cpu_packed.cpp when
// QSERVE_SIMDE is defined (q8_simde_check.cpp).
#pragma once
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace qserve_simde {

inline __m512 cvtph_ps(__m256i h) {
  uint16_t in[16];
  float out[16];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(in), h);
  for (int i = 0; i < 16; ++i) out[i] = c10::detail::fp16_ieee_to_fp32_value(in[i]);
  return _mm512_loadu_ps(out);
}

inline __m512i cvtepu8_epi32(__m128i v) {
  uint8_t in[16];
  int32_t out[16];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(in), v);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return _mm512_loadu_si512(out);
}

inline __m512i cvtepu16_epi32(__m256i v) {
  uint16_t in[16];
  int32_t out[16];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(in), v);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return _mm512_loadu_si512(out);
}

inline __m512 cvtepi32_ps(__m512i v) {
  int32_t in[16];
  float out[16];
  _mm512_storeu_si512(in, v);
  for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(in[i]);
  return _mm512_loadu_ps(out);
}

inline void mask_storeu_ps(void* p, __mmask16 m, __m512 v) {
  float in[16];
  _mm512_storeu_ps(in, v);
  for (int i = 0; i < 16; ++i)
    if (m >> i & 1) static_cast<float*>(p)[i] = in[i];
}

inline __m512 maskz_loadu_ps(__mmask16 m, const void* p) {
  float out[16];
  for (int i = 0; i < 16; ++i) out[i] = (m >> i & 1) ? static_cast<const float*>(p)[i] : 0.f;
  return _mm512_loadu_ps(out);
}

inline __m256i maskz_loadu_epi16(__mmask16 m, const void* p) {
  uint16_t out[16];
  for (int i = 0; i < 16; ++i) out[i] = (m >> i & 1) ? static_cast<const uint16_t*>(p)[i] : 0;
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out));
}

inline float reduce_add_ps(__m512 v) {
  float in[16];
  _mm512_storeu_ps(in, v);
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += in[i];
  return s;
}

}  // namespace qserve_simde

#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps qserve_simde::cvtph_ps
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32 qserve_simde::cvtepu8_epi32
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 qserve_simde::cvtepu16_epi32
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps qserve_simde::cvtepi32_ps
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps qserve_simde::mask_storeu_ps
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps qserve_simde::maskz_loadu_ps
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16 qserve_simde::maskz_loadu_epi16
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps qserve_simde::reduce_add_ps
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4 simde_mm512_shuffle_f32x4
