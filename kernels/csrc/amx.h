// AMX (Intel Advanced Matrix Extensions) support shared by qserve's C++ kernels (calib_ops.cpp's Gram
// matrices, cpu_ops.cpp's prefill attention): whether this process may use the tiles, and the tile
// configuration every AMX body loads. QSERVE_AMX is defined where the toolchain can emit AMX code (x86-64
// Linux, GCC or Clang); whether the CPU has it is asked at run time (amx_bf16_usable).
#pragma once

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#define QSERVE_AMX 1
// Functions holding tile intrinsics are compiled for AMX whatever -march=native says; they run only
// after amx_bf16_usable() said yes.
#define QSERVE_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))
// The same plus the AVX512-BF16 conversions (and F16C/FMA) the bodies around the tiles use: every CPU with
// AMX-BF16 has them.
#define QSERVE_AMX_BF16_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c")))

namespace qserve_amx {

// AMX-TILE and AMX-BF16 in CPUID leaf 7, and the kernel's permission to use the tile data (Linux asks
// each process to request it once; oneDNN does the same).
inline bool amx_bf16_usable_impl() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
}

inline bool amx_bf16_usable() {
  static const bool ok = amx_bf16_usable_impl();
  return ok;
}

// ldtilecfg's 64-byte operand, palette 1.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All eight tiles 16 rows x 64 bytes (16 fp32 or 32 bf16 per row): the only shape qserve's bodies use.
inline TileConfig full_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  return cfg;
}

// Load full_tiles() into this thread's tile configuration / release the tiles: around every AMX body.
QSERVE_AMX_TARGET inline void tiles_begin() {
  const TileConfig cfg = full_tiles();
  _tile_loadconfig(&cfg);
}
QSERVE_AMX_TARGET inline void tiles_end() { _tile_release(); }

// Tiles 0-3 += one 16-row A tile (loaded into tile 4 from `a`, rows `a_stride` bytes apart) times four B
// tiles stored one after another from `b` (1 KiB each, through tiles 5-7): a 16 x 64 output strip.
QSERVE_AMX_TARGET inline void dot_a_by_four_b(const void* a, int64_t a_stride, const void* b) {
  const char* bt = static_cast<const char*>(b);
  _tile_loadd(4, a, a_stride);
  _tile_loadd(5, bt, 64);
  _tile_dpbf16ps(0, 4, 5);
  _tile_loadd(6, bt + 1024, 64);
  _tile_dpbf16ps(1, 4, 6);
  _tile_loadd(7, bt + 2048, 64);
  _tile_dpbf16ps(2, 4, 7);
  _tile_loadd(5, bt + 3072, 64);
  _tile_dpbf16ps(3, 4, 5);
}

}  // namespace qserve_amx
#endif
