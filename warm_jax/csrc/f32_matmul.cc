// A float32 matmul for XLA:CPU as an XLA FFI custom call (AVX-512F fused multiply-adds).
// Built and called by warm_jax/cpu_matmul.py (model option matmul_impl).
//
// C [.., M, N] = op(A) op(B), float32 throughout. Each output element is one f32 sum over
// the contraction in order k = 0, 1, ..., K-1 (one fused multiply-add per term), whatever
// the blocking and the threads: the result does not depend on the thread count. op(A) is
// A [.., M, K] or, with trans_a, A stored [.., K, M]; op(B) is B [.., K, N] or, with trans_b,
// B stored [.., N, K]. Leading axes (vmap) are matched one to one.
//
// Work: op(B) is packed once into 64-column panels ([K][64] per panel); tasks of up to 96
// rows x 256 columns (fewer rows where there would be under 8 tasks) walk the contraction in
// blocks of KC (the block of a panel stays in L2) and run one register-blocked microkernel
// (6 rows x 64 columns, 24 f32 accumulators) per block, adding into C after the first.
// op(A) is read in place in both layouts (a broadcast per row and k). Tasks run on XLA's
// intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Scratch = std::vector<float>;  // per-thread packing buffer of a task
constexpr int64_t NR = 64;   // columns per panel and per microkernel tile
constexpr int64_t MR = 6;    // rows per microkernel tile
constexpr int64_t MC = 96;   // rows per task at most (a multiple of MR)
constexpr int64_t KC = 512;  // contraction block (a panel's block: 128 KB, in L2)
constexpr int64_t MIN_TASKS = 8;  // fewer rows per task (down to 12) until there are this many
constexpr int64_t NG = 4;    // panels per task

// C[M x 64 (ncols valid)] (+)= sum_k a(i, k) b[k, 0:64]; a(i, k) = a[i * asi + k * ask];
// b a packed panel block [kc][64].
template <int M>
inline void micro(int64_t kc, const float* a, int64_t asi, int64_t ask, const float* b,
                  float* c, int64_t ldc, int64_t ncols, bool add) {
  __m512 r[M][4];
  __mmask16 mask[4];
  for (int u = 0; u < 4; ++u) {
    const int64_t left = ncols - 16 * u;
    mask[u] = left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
  }
  for (int i = 0; i < M; ++i)
    for (int u = 0; u < 4; ++u)
      r[i][u] = add ? _mm512_maskz_loadu_ps(mask[u], c + i * ldc + 16 * u) : _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * NR;
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

struct Problem {
  int64_t batch, m, n, k;
  bool trans_a, trans_b;
};

// Packs op(B) of one batch element, panel `panel`, as [K][64] (columns past N are 0).
void pack_b_panel(const Problem& p, const float* b, int64_t panel, float* out) {
  const int64_t j0 = panel * NR, nc = std::min(NR, p.n - j0);
  if (!p.trans_b) {
    for (int64_t k = 0; k < p.k; ++k) {
      float* o = out + k * NR;
      std::memcpy(o, b + k * p.n + j0, sizeof(float) * nc);
      std::fill(o + nc, o + NR, 0.f);
    }
    return;
  }
  for (int64_t j = 0; j < NR; ++j) {  // B stored [N, K]: column j of op(B) is row j0 + j
    if (j >= nc) {
      for (int64_t k = 0; k < p.k; ++k) out[k * NR + j] = 0.f;
      continue;
    }
    const float* row = b + (j0 + j) * p.k;
    for (int64_t k = 0; k < p.k; ++k) out[k * NR + j] = row[k];
  }
}

void matmul(ffi::ThreadPool& pool, const Problem& p, const float* a, const float* b, float* c,
            std::vector<float>& packed) {
  const int64_t panels = (p.n + NR - 1) / NR, ngroups = (panels + NG - 1) / NG;
  const int64_t panel_size = p.k * NR;
  int64_t rows = MC;
  while (rows > 12 && p.batch * ngroups * ((p.m + rows - 1) / rows) < MIN_TASKS) rows /= 2;
  const int64_t mblocks = (p.m + rows - 1) / rows;
  packed.resize(size_t(p.batch * panels * panel_size));
  float* pk = packed.data();
  warm_jax::parallel_tasks<Scratch>(pool, p.batch * panels, [&](int64_t t, Scratch&) {
    pack_b_panel(p, b + (t / panels) * p.k * p.n, t % panels, pk + t * panel_size);
  });
  const int64_t per_batch = mblocks * ngroups;
  warm_jax::parallel_tasks<Scratch>(pool, p.batch * per_batch, [&](int64_t t, Scratch& scratch) {
    const int64_t e = t / per_batch, mb = (t % per_batch) / ngroups, g = t % ngroups;
    const int64_t i0 = mb * rows, mc = std::min(rows, p.m - i0);
    const float* ae = a + e * p.m * p.k;
    float* ce = c + e * p.m * p.n;
    if (p.trans_a) scratch.resize(size_t(std::min(KC, p.k) * mc));
    for (int64_t k0 = 0; k0 < p.k; k0 += KC) {
      const int64_t kc = std::min(KC, p.k - k0);
      const bool add = k0 > 0;
      // op(A) rows [i0, i0 + mc) x [k0, k0 + kc): in place ([M, K]) or, transposed, packed
      // [kc][mc] (contiguous, where the stored rows are M apart).
      const float* ablk;
      int64_t asi, ask;
      if (p.trans_a) {
        for (int64_t k = 0; k < kc; ++k)
          std::memcpy(scratch.data() + k * mc, ae + (k0 + k) * p.m + i0, sizeof(float) * mc);
        ablk = scratch.data(), asi = 1, ask = mc;
      } else {
        ablk = ae + i0 * p.k + k0, asi = p.k, ask = 1;
      }
      for (int64_t panel = g * NG; panel < std::min(panels, (g + 1) * NG); ++panel) {
        const float* bp = pk + (e * panels + panel) * panel_size + k0 * NR;
        const int64_t j0 = panel * NR, nc = std::min(NR, p.n - j0);
        for (int64_t i = 0; i < mc; i += MR) {
          const float* ai = ablk + i * asi;
          float* cij = ce + (i0 + i) * p.n + j0;
          switch (std::min(MR, mc - i)) {
            case 6: micro<6>(kc, ai, asi, ask, bp, cij, p.n, nc, add); break;
            case 5: micro<5>(kc, ai, asi, ask, bp, cij, p.n, nc, add); break;
            case 4: micro<4>(kc, ai, asi, ask, bp, cij, p.n, nc, add); break;
            case 3: micro<3>(kc, ai, asi, ask, bp, cij, p.n, nc, add); break;
            case 2: micro<2>(kc, ai, asi, ask, bp, cij, p.n, nc, add); break;
            default: micro<1>(kc, ai, asi, ask, bp, cij, p.n, nc, add); break;
          }
        }
      }
    }
  });
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const size_t r = ad.size();
  if (r < 2 || bd.size() != r || cd.size() != r)
    return ffi::Error::InvalidArgument("f32_matmul: A, B and C must have one rank >= 2");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < r; ++i) {
    if (ad[i] != bd[i] || ad[i] != cd[i])
      return ffi::Error::InvalidArgument("f32_matmul: leading axes differ");
    batch *= ad[i];
  }
  const int64_t m = trans_a ? ad[r - 1] : ad[r - 2], k = trans_a ? ad[r - 2] : ad[r - 1];
  const int64_t kb = trans_b ? bd[r - 1] : bd[r - 2], n = trans_b ? bd[r - 2] : bd[r - 1];
  if (k != kb || cd[r - 2] != m || cd[r - 1] != n)
    return ffi::Error::InvalidArgument("f32_matmul: shapes do not match");
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  auto* cp = c->typed_data();
  if (k == 0) {
    std::memset(cp, 0, sizeof(float) * batch * m * n);
    return ffi::Error::Success();
  }
  thread_local std::vector<float> packed;
  matmul(pool, Problem{batch, m, n, k, trans_a, trans_b}, a.typed_data(), b.typed_data(), cp,
         packed);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WarmJaxF32Matmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
