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
// blocks of KC (the block of a panel stays in L2) and run the shared register-blocked gemm
// (f32_gemm.h: 6 x 64 tiles, 24 f32 accumulators) per block, adding into C after the first.
// op(A) is read in place when A is [M, K] and packed per task and block ([kc][rows]) when
// transposed. Tasks run on XLA's intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "f32_gemm.h"
#include "matmul_problem.h"
#include "parallel_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Scratch = std::vector<float>;  // per-thread packing buffer of a task
using warm_jax::Problem;
constexpr int64_t NR = 64;   // columns per panel and per microkernel tile
constexpr int64_t MC = 96;   // rows per task at most (a multiple of the gemm's 6-row tile)
constexpr int64_t KC = 512;  // contraction block (a panel's block: 128 KB, in L2)
constexpr int64_t MIN_TASKS = 8;  // fewer rows per task (down to 12) until there are this many
constexpr int64_t NG = 4;    // panels per task

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
        warm_jax::gemm_f32(mc, nc, kc, ablk, asi, ask, bp, NR, ce + i0 * p.n + j0, p.n, add);
      }
    }
  });
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  Problem p;
  if (auto err = warm_jax::read_problem("f32_matmul", a.dimensions(), b.dimensions(),
                                        c->dimensions(), trans_a, trans_b, 1, &p);
      err.failure())
    return err;
  const int64_t batch = p.batch, m = p.m, n = p.n, k = p.k;
  if (batch == 0 || m == 0 || n == 0) return ffi::Error::Success();
  auto* cp = c->typed_data();
  if (k == 0) {
    std::memset(cp, 0, sizeof(float) * batch * m * n);
    return ffi::Error::Success();
  }
  thread_local std::vector<float> packed;
  matmul(pool, p, a.typed_data(), b.typed_data(), cp, packed);
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
