// What the CPU kernels share for the AMX tile units (bf16_matmul.cc, causal_attention.cc):
// whether they can run in this process, the tile configuration and a 16 x 16 transpose of
// 32-bit words. WARM_JAX_AMX is defined where the compiler targets AMX (-march=native on a
// CPU with amx_tile and amx_bf16); elsewhere only amx_ready() (false) and transpose16 exist.
#pragma once

#include <immintrin.h>

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define WARM_JAX_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace warm_jax {

// Whether the AMX paths can run in this process: built for a CPU with AMX and granted the
// tile state by the OS (arch_prctl ARCH_REQ_XCOMP_PERM, asked once per library).
inline bool amx_ready() {
#ifdef WARM_JAX_AMX
  static const bool ok = [] {
    constexpr long kGetPerm = 0x1022, kReqPerm = 0x1023, kXtiledata = 18;
    if (syscall(SYS_arch_prctl, kReqPerm, kXtiledata) != 0) return false;
    unsigned long mask = 0;
    return syscall(SYS_arch_prctl, kGetPerm, &mask) == 0 && (mask >> kXtiledata & 1);
  }();
  return ok;
#else
  return false;
#endif
}

#ifdef WARM_JAX_AMX
struct alignas(64) TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

constexpr TileConfig tile_config() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  return cfg;
}

// All eight tiles at 16 rows x 64 bytes (16 f32 or 32 bf16 a row). Per task: the pool's
// threads run other work between tasks, so a task configures and releases the tiles. The
// configuration is a constant in memory: g++ 12 does not see LDTILECFG read its operand and
// drops the stores that fill a stack copy (the tiles then fault on first use).
inline void amx_configure() {
  static constexpr TileConfig kConfig = tile_config();
  _tile_loadconfig(&kConfig);
}
#endif

// Transposes 16 x 16 32-bit words held in r[0..15] (row q in r[q]) in place.
inline void transpose16(__m512i r[16]) {
  __m512i u[16];
  for (int g = 0; g < 4; ++g) {
    const __m512i* x = r + 4 * g;
    const __m512i t0 = _mm512_unpacklo_epi32(x[0], x[1]), t1 = _mm512_unpackhi_epi32(x[0], x[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(x[2], x[3]), t3 = _mm512_unpackhi_epi32(x[2], x[3]);
    u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
  }
  for (int j = 0; j < 4; ++j) {  // u[4g + j], lane L: rows 4g..4g+3 of column j + 4L
    const __m512i va = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
    const __m512i vb = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    const __m512i wa = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
    const __m512i wb = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
    r[j] = _mm512_shuffle_i32x4(va, vb, 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(va, vb, 0xdd);
    r[j + 4] = _mm512_shuffle_i32x4(wa, wb, 0x88);
    r[j + 12] = _mm512_shuffle_i32x4(wa, wb, 0xdd);
  }
}

}  // namespace warm_jax
