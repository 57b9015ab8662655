// A bfloat16 matmul for XLA:CPU as an XLA FFI custom call, on the CPU's bf16 dot-product
// instruction (AVX-512 BF16: vdpbf16ps, two bf16 products summed into each f32 lane).
// Built and called by warm_jax/cpu_matmul.py (model option matmul_impl='cpu_bf16').
//
// C [.., M, N] = op(A) op(B), A and B bfloat16, accumulated in float32 over the whole
// contraction, C rounded to bfloat16 (round to nearest even) once at the end: the value
// XLA:CPU computes for a bf16 dot (an f32 dot between converts) up to the order of the
// f32 sums. op(A) is A [.., M, K] or, with trans_a, A stored [.., K, M]; op(B) is B [.., K, N]
// or, with trans_b, B stored [.., N, K]. Leading axes (vmap) are matched one to one. K is
// even (the caller pads it). As the instruction does, bf16 subnormals read as zero.
//
// Work: op(B) is packed once into 64-column panels of k-pairs ([K/2][64] 32-bit pairs per
// panel, the instruction's operand layout); then tasks of up to 96 rows x 256 columns (fewer
// rows where there would be under 8 tasks to share among the threads) run
// one register-blocked microkernel (6 rows x 64 columns, 24 f32 accumulators held over the
// whole contraction). op(A) is read in place when A is [M, K] (each 32-bit word is a k-pair
// of one row) and packed per task when transposed. Tasks run on XLA's intra-op thread pool.
//
// On a CPU with AMX (amx_tile, amx_bf16; built with -march=native there) the same product
// runs on the tile units when the caller asks (attribute amx) and the OS grants the tile
// state (arch_prctl ARCH_REQ_XCOMP_PERM, once per process; warm_jax_bf16_amx() says whether
// it did): B is packed into the same panels (k-pairs padded to a multiple of 16 with zeros),
// op(A) is read in place when A is [M, K] with K a multiple of 32 and otherwise packed once
// into rows of k-pairs (a transposed A through 16 x 16 transposes of 32-bit pairs); blocks of
// 32 rows x 32 columns accumulate in four f32 tiles (TDPBF16PS) over the whole contraction
// and are rounded to bf16 once.
#include <immintrin.h>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)  // -march=native on a CPU with AMX
#define WARM_JAX_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "matmul_problem.h"
#include "parallel_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Scratch = std::vector<uint32_t>;  // per-thread packing buffer of a task
using warm_jax::Problem;
constexpr int64_t NR = 64;   // columns per panel and per microkernel tile
constexpr int64_t MR = 6;    // rows per microkernel tile
constexpr int64_t MC = 96;   // rows per task at most (a multiple of MR)
constexpr int64_t MIN_TASKS = 8;  // fewer rows per task (down to 12) until there are this many
constexpr int64_t NG = 4;    // panels per task

// C[M x 64 (ncols valid)] = sum_kp a(i, kp) . b[kp, 0:64] (k-pairs), a(i, kp) the 32-bit
// pair at a[i * asi + kp * ask]; b a packed panel [k2][64] of pairs.
template <int M>
inline void micro(int64_t k2, const uint32_t* a, int64_t asi, int64_t ask, const uint32_t* b,
                  uint16_t* c, int64_t ldc, int64_t ncols) {
  __m512 r[M][4];
  for (int i = 0; i < M; ++i)
    for (int u = 0; u < 4; ++u) r[i][u] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < k2; ++kp) {
    const uint32_t* bk = b + kp * NR;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bk), b1 = (__m512bh)_mm512_loadu_si512(bk + 16),
                   b2 = (__m512bh)_mm512_loadu_si512(bk + 32),
                   b3 = (__m512bh)_mm512_loadu_si512(bk + 48);
    const uint32_t* ak = a + kp * ask;
    for (int i = 0; i < M; ++i) {
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(int(ak[i * asi]));
      r[i][0] = _mm512_dpbf16_ps(r[i][0], ai, b0);
      r[i][1] = _mm512_dpbf16_ps(r[i][1], ai, b1);
      r[i][2] = _mm512_dpbf16_ps(r[i][2], ai, b2);
      r[i][3] = _mm512_dpbf16_ps(r[i][3], ai, b3);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int u = 0; u < 4; ++u) {
      const int64_t left = ncols - 16 * u;
      if (left <= 0) break;
      const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(r[i][u]);
      _mm256_mask_storeu_epi16(c + i * ldc + 16 * u, m, v);
    }
}

// Interleaves bf16 rows r0, r1 (32 columns each) into 32 pairs: out0 columns 0-15,
// out1 columns 16-31.
inline void interleave32(__m512i r0, __m512i r1, __m512i& out0, __m512i& out1) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  out0 = _mm512_permutex2var_epi16(r0, lo, r1);
  out1 = _mm512_permutex2var_epi16(r0, hi, r1);
}

// Pairs (x[k0][j], x[k0 + 1][j]) for j in [j0, j0 + n) of a row-major bf16 matrix with row
// stride ld (k0 + 1 < kmax, else the second is 0), written to out[0:n].
void pair_rows(const uint16_t* x, int64_t ld, int64_t k0, int64_t kmax, int64_t j0, int64_t n,
               uint32_t* out) {
  const uint16_t* r0 = x + k0 * ld + j0;
  const uint16_t* r1 = k0 + 1 < kmax ? r0 + ld : nullptr;
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t left = std::min<int64_t>(32, n - j);
    const __mmask32 m = left == 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1);
    __m512i o0, o1;
    interleave32(_mm512_maskz_loadu_epi16(m, r0 + j),
                 r1 ? _mm512_maskz_loadu_epi16(m, r1 + j) : _mm512_setzero_si512(), o0, o1);
    const __mmask16 m0 = __mmask16(m), m1 = __mmask16(m >> 16);
    _mm512_mask_storeu_epi32(out + j, m0, o0);
    if (m1) _mm512_mask_storeu_epi32(out + j + 16, m1, o1);
  }
}

// Packs op(B) of one batch element into panels [N/64][K/2][64] (columns past N are 0).
void pack_b_panel(const Problem& p, const uint16_t* b, int64_t panel, uint32_t* out) {
  const int64_t k2 = p.k / 2, j0 = panel * NR, nc = std::min(NR, p.n - j0);
  if (!p.trans_b) {  // B [K, N]: interleave rows 2kp, 2kp + 1
    for (int64_t kp = 0; kp < k2; ++kp) {
      uint32_t* o = out + kp * NR;
      pair_rows(b, p.n, 2 * kp, p.k, j0, nc, o);
      std::fill(o + nc, o + NR, 0u);
    }
    return;
  }
  // B stored [N, K]: the pair for (kp, j) is the 32-bit word kp of row j.
  const uint32_t* w = reinterpret_cast<const uint32_t*>(b);
  for (int64_t j = 0; j < NR; ++j) {
    if (j >= nc) {
      for (int64_t kp = 0; kp < k2; ++kp) out[kp * NR + j] = 0;
      continue;
    }
    const uint32_t* row = w + (j0 + j) * k2;
    for (int64_t kp = 0; kp < k2; ++kp) out[kp * NR + j] = row[kp];
  }
}

// Packs op(A) rows [i0, i0 + mc) of a transposed A (stored [K, M]) as [K/2][mc] pairs.
void pack_a_transposed(const Problem& p, const uint16_t* a, int64_t i0, int64_t mc, uint32_t* out) {
  for (int64_t kp = 0; kp < p.k / 2; ++kp) pair_rows(a, p.m, 2 * kp, p.k, i0, mc, out + kp * mc);
}

// Whether the AMX path can run in this process: built for a CPU with AMX and granted the
// tile state by the OS (arch_prctl ARCH_REQ_XCOMP_PERM, asked once).
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

#ifdef WARM_JAX_AMX
constexpr int64_t AM = 32;    // rows of an AMX block (two 16-row A tiles)
constexpr int64_t AMC = 128;  // rows per AMX task at most (a multiple of AM)

// out [32 x 32] f32 (row stride 32) = a [32 rows, 16 * kts pairs] (row stride lda words)
// times b (kts * 16 pair rows of a panel, 32 columns, row stride NR words).
inline void amx_block(int64_t kts, const uint32_t* a, int64_t lda, const uint32_t* b, float* out) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kt = 0; kt < kts; ++kt) {
    const uint32_t* ak = a + kt * 16;
    const uint32_t* bk = b + kt * 16 * NR;
    _tile_loadd(4, ak, lda * 4);
    _tile_loadd(5, ak + 16 * lda, lda * 4);
    _tile_loadd(6, bk, NR * 4);
    _tile_loadd(7, bk + 16, NR * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, AM * 4);
  _tile_stored(1, out + 16, AM * 4);
  _tile_stored(2, out + 16 * AM, AM * 4);
  _tile_stored(3, out + 16 * AM + 16, AM * 4);
}

// c[rows x cols] (row stride ldc) = out (f32, row stride 32) rounded to bf16.
inline void store_block(const float* out, uint16_t* c, int64_t ldc, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i)
    for (int u = 0; u < 2; ++u) {
      const int64_t left = cols - 16 * u;
      if (left <= 0) break;
      const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(out + i * AM + 16 * u));
      _mm256_mask_storeu_epi16(c + i * ldc + 16 * u, m, v);
    }
}

// Packs op(A) rows [i0, i0 + 32) of one batch element as [32][k2p] k-pairs, zeros past M
// and past K; tmp: scratch for a transposed A ([k2p][32] pairs first, then transposed).
void pack_a_amx(const Problem& p, const uint16_t* a, int64_t i0, int64_t k2p, uint32_t* out,
                Scratch& tmp) {
  const int64_t k2 = p.k / 2, rows = std::min(AM, p.m - i0);
  if (!p.trans_a) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(a);
    for (int64_t r = 0; r < AM; ++r) {
      uint32_t* o = out + r * k2p;
      const int64_t n = r < rows ? k2 : 0;
      if (n) std::memcpy(o, w + (i0 + r) * k2, sizeof(uint32_t) * n);
      std::fill(o + n, o + k2p, 0u);
    }
    return;
  }
  tmp.assign(size_t(k2p * AM), 0u);
  for (int64_t kp = 0; kp < k2; ++kp) pair_rows(a, p.m, 2 * kp, p.k, i0, rows, tmp.data() + kp * AM);
  __m512i r[16];
  for (int64_t kb = 0; kb < k2p / 16; ++kb)
    for (int64_t h = 0; h < 2; ++h) {
      for (int q = 0; q < 16; ++q) r[q] = _mm512_loadu_si512(tmp.data() + (kb * 16 + q) * AM + 16 * h);
      transpose16(r);
      for (int q = 0; q < 16; ++q) _mm512_storeu_si512(out + (16 * h + q) * k2p + kb * 16, r[q]);
    }
}

void matmul_amx(ffi::ThreadPool& pool, const Problem& p, const uint16_t* a, const uint16_t* b,
                uint16_t* c, std::vector<uint32_t>& packed, std::vector<uint32_t>& apacked) {
  const int64_t k2 = p.k / 2, k2p = (k2 + 15) / 16 * 16, panels = (p.n + NR - 1) / NR;
  const int64_t ngroups = (panels + NG - 1) / NG, panel_size = k2p * NR;
  packed.resize(size_t(p.batch * panels * panel_size));
  uint32_t* pk = packed.data();
  warm_jax::parallel_tasks<Scratch>(pool, p.batch * panels, [&](int64_t t, Scratch&) {
    pack_b_panel(p, b + (t / panels) * p.k * p.n, t % panels, pk + t * panel_size);
    std::fill(pk + t * panel_size + k2 * NR, pk + (t + 1) * panel_size, 0u);
  });
  // op(A): in place ([M, K], K a multiple of 32; a last block of under 32 rows is copied once
  // per task) or packed once for all tasks into [M rounded up to 32][k2p] per batch element
  const bool in_place = !p.trans_a && k2 % 16 == 0;
  const int64_t ablocks = (p.m + AM - 1) / AM, lda = in_place ? k2 : k2p;
  const int64_t a_batch = in_place ? p.m * k2 : ablocks * AM * k2p;
  const uint32_t* abase = reinterpret_cast<const uint32_t*>(a);
  if (!in_place) {
    apacked.resize(size_t(p.batch * a_batch));
    uint32_t* ap = apacked.data();
    warm_jax::parallel_tasks<Scratch>(pool, p.batch * ablocks, [&](int64_t t, Scratch& tmp) {
      const int64_t e = t / ablocks, blk = t % ablocks;
      pack_a_amx(p, a + e * p.m * p.k, blk * AM, k2p, ap + e * a_batch + blk * AM * k2p, tmp);
    });
    abase = ap;
  }
  int64_t rows = AMC;  // rows per task: fewer where the tasks would be too few to share out
  while (rows > AM && p.batch * ngroups * ((p.m + rows - 1) / rows) < MIN_TASKS) rows /= 2;
  const int64_t mblocks = (p.m + rows - 1) / rows, per_batch = mblocks * ngroups;
  warm_jax::parallel_tasks<Scratch>(pool, p.batch * per_batch, [&](int64_t t, Scratch& tail) {
    const int64_t e = t / per_batch, mb = (t % per_batch) / ngroups, g = t % ngroups;
    const int64_t i0 = mb * rows, mc = std::min(rows, p.m - i0);
    alignas(64) float out[AM * AM];
    // A read in place: a last block of under 32 rows is copied once, zero rows below
    const int64_t full = mc / AM * AM;
    if (in_place && full < mc) {
      tail.assign(size_t(AM * lda), 0u);
      std::memcpy(tail.data(), abase + e * a_batch + (i0 + full) * lda,
                  sizeof(uint32_t) * (mc - full) * lda);
    }
    amx_configure();
    for (int64_t panel = g * NG; panel < std::min(panels, (g + 1) * NG); ++panel) {
      const uint32_t* bp = pk + (e * panels + panel) * panel_size;
      const int64_t j0 = panel * NR, nc = std::min(NR, p.n - j0);
      for (int64_t h = 0; h * 32 < nc; ++h)
        for (int64_t i = 0; i < mc; i += AM) {
          const int64_t nrows = std::min(AM, mc - i);
          const uint32_t* ai = in_place && i == full ? tail.data()
                                                     : abase + e * a_batch + (i0 + i) * lda;
          amx_block(k2p / 16, ai, lda, bp + 32 * h, out);
          store_block(out, c + e * p.m * p.n + (i0 + i) * p.n + j0 + 32 * h, p.n, nrows,
                      std::min<int64_t>(32, nc - 32 * h));
        }
    }
    _tile_release();
  });
}
#endif

void matmul(ffi::ThreadPool& pool, const Problem& p, const uint16_t* a, const uint16_t* b,
            uint16_t* c, std::vector<uint32_t>& packed) {
  const int64_t k2 = p.k / 2, panels = (p.n + NR - 1) / NR;
  const int64_t ngroups = (panels + NG - 1) / NG, panel_size = k2 * NR;
  int64_t rows = MC;  // rows per task: fewer where the tasks would be too few to share out
  while (rows > 12 && p.batch * ngroups * ((p.m + rows - 1) / rows) < MIN_TASKS) rows /= 2;
  const int64_t mblocks = (p.m + rows - 1) / rows;
  packed.resize(size_t(p.batch * panels * panel_size));
  uint32_t* pk = packed.data();
  warm_jax::parallel_tasks<Scratch>(pool, p.batch * panels, [&](int64_t t, Scratch&) {
    const int64_t e = t / panels;
    pack_b_panel(p, b + e * p.k * p.n, t % panels, pk + t * panel_size);
  });
  const int64_t per_batch = mblocks * ngroups;
  warm_jax::parallel_tasks<Scratch>(pool, p.batch * per_batch, [&](int64_t t, Scratch& scratch) {
    const int64_t e = t / per_batch, mb = (t % per_batch) / ngroups, g = t % ngroups;
    const int64_t i0 = mb * rows, mc = std::min(rows, p.m - i0);
    const uint16_t* ae = a + e * p.m * p.k;
    const uint32_t* arows;
    int64_t asi, ask;
    if (p.trans_a) {
      scratch.resize(size_t(k2 * mc));
      pack_a_transposed(p, ae, i0, mc, scratch.data());
      arows = scratch.data(), asi = 1, ask = mc;
    } else {
      arows = reinterpret_cast<const uint32_t*>(ae) + i0 * k2, asi = k2, ask = 1;
    }
    uint16_t* ce = c + e * p.m * p.n;
    for (int64_t panel = g * NG; panel < std::min(panels, (g + 1) * NG); ++panel) {
      const uint32_t* bp = pk + (e * panels + panel) * panel_size;
      const int64_t j0 = panel * NR, nc = std::min(NR, p.n - j0);
      for (int64_t i = 0; i < mc; i += MR) {
        const uint32_t* ai = arows + i * asi;
        uint16_t* cij = ce + (i0 + i) * p.n + j0;
        switch (std::min(MR, mc - i)) {
          case 6: micro<6>(k2, ai, asi, ask, bp, cij, p.n, nc); break;
          case 5: micro<5>(k2, ai, asi, ask, bp, cij, p.n, nc); break;
          case 4: micro<4>(k2, ai, asi, ask, bp, cij, p.n, nc); break;
          case 3: micro<3>(k2, ai, asi, ask, bp, cij, p.n, nc); break;
          case 2: micro<2>(k2, ai, asi, ask, bp, cij, p.n, nc); break;
          default: micro<1>(k2, ai, asi, ask, bp, cij, p.n, nc); break;
        }
      }
    }
  });
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                      ffi::ResultBuffer<ffi::BF16> c, bool trans_a, bool trans_b, bool amx) {
  Problem p;
  if (auto err = warm_jax::read_problem("bf16_matmul", a.dimensions(), b.dimensions(),
                                        c->dimensions(), trans_a, trans_b, 2, &p);
      err.failure())
    return err;
  const int64_t batch = p.batch, m = p.m, n = p.n, k = p.k;
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  auto* cp = reinterpret_cast<uint16_t*>(c->untyped_data());
  if (k == 0) {
    std::memset(cp, 0, sizeof(uint16_t) * batch * m * n);
    return ffi::Error::Success();
  }
  thread_local std::vector<uint32_t> packed;
  const auto* ap = reinterpret_cast<const uint16_t*>(a.untyped_data());
  const auto* bp = reinterpret_cast<const uint16_t*>(b.untyped_data());
  if (amx) {
#ifdef WARM_JAX_AMX
    if (amx_ready()) {
      thread_local std::vector<uint32_t> apacked;
      matmul_amx(pool, p, ap, bp, cp, packed, apacked);
      return ffi::Error::Success();
    }
#endif
    return ffi::Error::InvalidArgument("bf16_matmul: amx=True but AMX cannot run here");
  }
  matmul(pool, p, ap, bp, cp, packed);
  return ffi::Error::Success();
}

}  // namespace

// 1 when the AMX path can run in this process (see amx_ready), else 0.
extern "C" int warm_jax_bf16_amx() { return amx_ready() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(WarmJaxBf16Matmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<bool>("amx"));
