// The f32 register-blocked matmul the CPU kernels share (causal_attention.cc, f32_matmul.cc):
// C[m x n] (+)= A[m x kc] B[kc x n] in tiles of 6 rows x 64 columns (24 AVX-512
// accumulators held over the whole kc), A read with any strides (a(i, k) = a[i * asi +
// k * ask], so A^T costs nothing), B rows contiguous with stride ldb, the last column tile
// masked when n is not a multiple of 64. Each C element is one f32 sum in k order (added to
// C's value where acc). A column tile narrower than 64 holds only the vectors it needs and
// reads only its own columns of B.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace warm_jax {

template <int M, int NV, bool FULL>
inline void micro_f32(int64_t kc, const float* a, int64_t asi, int64_t ask, const float* b,
                      int64_t ldb, float* c, int64_t ldc, int64_t ncols, bool acc) {
  // NV 16-lane column vectors (16 * NV >= ncols > 16 * (NV - 1)), all full when FULL (B
  // read unmasked, as the 64-wide tiles always were); only those columns of B and C are read
  __m512 r[M][NV];
  __mmask16 mask[NV];
  for (int u = 0; u < NV; ++u) {
    const int64_t left = ncols - 16 * u;
    mask[u] = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
  }
  for (int i = 0; i < M; ++i)
    for (int u = 0; u < NV; ++u)
      r[i][u] = acc ? _mm512_maskz_loadu_ps(mask[u], c + i * ldc + 16 * u) : _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * ldb;
    __m512 bv[NV];
    for (int u = 0; u < NV; ++u)
      bv[u] = FULL || u + 1 < NV ? _mm512_loadu_ps(bk + 16 * u)
                                 : _mm512_maskz_loadu_ps(mask[u], bk + 16 * u);
    const float* ak = a + k * ask;
    for (int i = 0; i < M; ++i) {
      const __m512 ai = _mm512_set1_ps(ak[i * asi]);
      for (int u = 0; u < NV; ++u) r[i][u] = _mm512_fmadd_ps(ai, bv[u], r[i][u]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int u = 0; u < NV; ++u) _mm512_mask_storeu_ps(c + i * ldc + 16 * u, mask[u], r[i][u]);
}

template <int NV, bool FULL>
inline void rows_f32(int64_t m, int64_t kc, const float* a, int64_t asi, int64_t ask,
                     const float* b, int64_t ldb, float* c, int64_t ldc, int64_t nc, bool acc) {
  for (int64_t i = 0; i < m; i += 6) {
    const float* ai = a + i * asi;
    float* ci = c + i * ldc;
    switch (std::min<int64_t>(6, m - i)) {
      case 6: micro_f32<6, NV, FULL>(kc, ai, asi, ask, b, ldb, ci, ldc, nc, acc); break;
      case 5: micro_f32<5, NV, FULL>(kc, ai, asi, ask, b, ldb, ci, ldc, nc, acc); break;
      case 4: micro_f32<4, NV, FULL>(kc, ai, asi, ask, b, ldb, ci, ldc, nc, acc); break;
      case 3: micro_f32<3, NV, FULL>(kc, ai, asi, ask, b, ldb, ci, ldc, nc, acc); break;
      case 2: micro_f32<2, NV, FULL>(kc, ai, asi, ask, b, ldb, ci, ldc, nc, acc); break;
      default: micro_f32<1, NV, FULL>(kc, ai, asi, ask, b, ldb, ci, ldc, nc, acc); break;
    }
  }
}

// Column tiles of 64 (the last one narrower: only its columns of B are read).
inline void gemm_f32(int64_t m, int64_t n, int64_t kc, const float* a, int64_t asi, int64_t ask,
                     const float* b, int64_t ldb, float* c, int64_t ldc, bool acc) {
  for (int64_t j = 0; j < n; j += 64) {
    const int64_t nc = std::min<int64_t>(64, n - j);
    if (nc == 64) {
      rows_f32<4, true>(m, kc, a, asi, ask, b + j, ldb, c + j, ldc, nc, acc);
      continue;
    }
    switch ((nc + 15) / 16) {
      case 4: rows_f32<4, false>(m, kc, a, asi, ask, b + j, ldb, c + j, ldc, nc, acc); break;
      case 3: rows_f32<3, false>(m, kc, a, asi, ask, b + j, ldb, c + j, ldc, nc, acc); break;
      case 2: rows_f32<2, false>(m, kc, a, asi, ask, b + j, ldb, c + j, ldc, nc, acc); break;
      default: rows_f32<1, false>(m, kc, a, asi, ask, b + j, ldb, c + j, ldc, nc, acc); break;
    }
  }
}

}  // namespace warm_jax
