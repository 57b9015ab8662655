// The f32 register-blocked matmul the CPU kernels share (causal_attention.cc, f32_matmul.cc):
// C[m x n] (+)= A[m x kc] B[kc x n] in tiles of 6 rows x 64 columns (24 AVX-512
// accumulators held over the whole kc), A read with any strides (a(i, k) = a[i * asi +
// k * ask], so A^T costs nothing), B rows contiguous with stride ldb, the last column tile
// masked when n is not a multiple of 64. Each C element is one f32 sum in k order (added to
// C's value where acc).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace warm_jax {

template <int M>
inline void micro_f32(int64_t kc, const float* a, int64_t asi, int64_t ask, const float* b,
                      int64_t ldb, float* c, int64_t ldc, int64_t ncols, bool acc) {
  __m512 r[M][4];
  __mmask16 mask[4];
  for (int u = 0; u < 4; ++u) {
    const int64_t left = ncols - 16 * u;
    mask[u] = left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
  }
  for (int i = 0; i < M; ++i)
    for (int u = 0; u < 4; ++u)
      r[i][u] = acc ? _mm512_maskz_loadu_ps(mask[u], c + i * ldc + 16 * u) : _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * ldb;
    const __m512 b0 = _mm512_loadu_ps(bk), b1 = _mm512_loadu_ps(bk + 16),
                 b2 = _mm512_loadu_ps(bk + 32), b3 = _mm512_loadu_ps(bk + 48);
    const float* ak = a + k * ask;
    for (int i = 0; i < M; ++i) {
      const __m512 ai = _mm512_set1_ps(ak[i * asi]);
      r[i][0] = _mm512_fmadd_ps(ai, b0, r[i][0]);
      r[i][1] = _mm512_fmadd_ps(ai, b1, r[i][1]);
      r[i][2] = _mm512_fmadd_ps(ai, b2, r[i][2]);
      r[i][3] = _mm512_fmadd_ps(ai, b3, r[i][3]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int u = 0; u < 4; ++u)
      if (mask[u]) _mm512_mask_storeu_ps(c + i * ldc + 16 * u, mask[u], r[i][u]);
}

// B must be readable for 64 columns from each tile's start (zero-padded where n is not a
// multiple of 64); the columns past n are computed and not stored.
inline void gemm_f32(int64_t m, int64_t n, int64_t kc, const float* a, int64_t asi, int64_t ask,
                     const float* b, int64_t ldb, float* c, int64_t ldc, bool acc) {
  for (int64_t j = 0; j < n; j += 64)
    for (int64_t i = 0; i < m; i += 6) {
      const float* ai = a + i * asi;
      const float* bj = b + j;
      float* cij = c + i * ldc + j;
      const int64_t nc = std::min<int64_t>(64, n - j);
      switch (std::min<int64_t>(6, m - i)) {
        case 6: micro_f32<6>(kc, ai, asi, ask, bj, ldb, cij, ldc, nc, acc); break;
        case 5: micro_f32<5>(kc, ai, asi, ask, bj, ldb, cij, ldc, nc, acc); break;
        case 4: micro_f32<4>(kc, ai, asi, ask, bj, ldb, cij, ldc, nc, acc); break;
        case 3: micro_f32<3>(kc, ai, asi, ask, bj, ldb, cij, ldc, nc, acc); break;
        case 2: micro_f32<2>(kc, ai, asi, ask, bj, ldb, cij, ldc, nc, acc); break;
        default: micro_f32<1>(kc, ai, asi, ask, bj, ldb, cij, ldc, nc, acc); break;
      }
    }
}

}  // namespace warm_jax
