// Exploratory: a fused causal softmax-attention FORWARD for XLA:CPU as an XLA FFI custom
// call, to measure what a hand-written kernel gains over XLA's own emitters on the RM step's
// attention (bench/attention_kernel_probe.py builds and times it). Not used by warm_jax.
//
// q, k, v, o: float32 [B, T, H, D], D = 64, T a multiple of 64, causal, no padding mask.
// Per (batch, head) pair, two threads over the pairs: K transposed and V copied once; then 4
// query rows at a time against 64-key tiles up to the diagonal: the 4 x 64 logits in 16
// AVX-512 accumulators, an online softmax (vectorised exp, causal mask on the diagonal tile),
// the 4 x 64 outputs in 16 more. Needs AVX-512F (built with -march=native).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#include <immintrin.h>
// 4 query rows at a time; S tile 4 x 64 keys in 16 zmm accumulators; P.V into 4 x 64 dims in
// 16 zmm accumulators; online softmax per row. D = 64, T a multiple of 64.
static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

static void attend_pair(const float* q, const float* k, const float* v, float* o, int64_t T,
                        int64_t H, int64_t b, int64_t h) {
  constexpr int D = 64, R = 4, KB = 64;
  const int64_t rs = H * D;
  const float scale = 1.0f / 8.0f;
  std::vector<float> kt(D * T), vv(T * D);
  for (int64_t t = 0; t < T; ++t)
    for (int d = 0; d < D; ++d) {
      kt[d * T + t] = k[(b * T + t) * rs + h * D + d];
      vv[t * D + d] = v[(b * T + t) * rs + h * D + d];
    }
  alignas(64) float s[R][KB];
  for (int64_t i0 = 0; i0 < T; i0 += R) {
    __m512 acc[R][4];
    float m[R], l[R];
    for (int i = 0; i < R; ++i) { m[i] = -INFINITY; l[i] = 0.f; for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps(); }
    const int64_t kend = i0 + R;
    for (int64_t j0 = 0; j0 < kend; j0 += KB) {
      __m512 sa[R][4];
      for (int i = 0; i < R; ++i) for (int c = 0; c < 4; ++c) sa[i][c] = _mm512_setzero_ps();
      for (int d = 0; d < D; ++d) {
        const float* kd = &kt[d * T + j0];
        __m512 k0 = _mm512_loadu_ps(kd), k1 = _mm512_loadu_ps(kd + 16),
               k2 = _mm512_loadu_ps(kd + 32), k3 = _mm512_loadu_ps(kd + 48);
        for (int i = 0; i < R; ++i) {
          __m512 qb = _mm512_set1_ps(q[(b * T + i0 + i) * rs + h * D + d] * scale);
          sa[i][0] = _mm512_fmadd_ps(qb, k0, sa[i][0]);
          sa[i][1] = _mm512_fmadd_ps(qb, k1, sa[i][1]);
          sa[i][2] = _mm512_fmadd_ps(qb, k2, sa[i][2]);
          sa[i][3] = _mm512_fmadd_ps(qb, k3, sa[i][3]);
        }
      }
      const int kn = int(std::min<int64_t>(KB, kend - j0));
      const __m512i lane = _mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15);
      for (int i = 0; i < R; ++i) {
        const int qpos = int(i0 + i);
        __mmask16 mk[4];
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int c = 0; c < 4; ++c) {
          __m512i jv = _mm512_add_epi32(lane, _mm512_set1_epi32(int(j0) + c * 16));
          mk[c] = _mm512_cmple_epi32_mask(jv, _mm512_set1_epi32(qpos));
          sa[i][c] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), mk[c], sa[i][c]);
          mv = _mm512_max_ps(mv, sa[i][c]);
        }
        const float mx = std::max(m[i], _mm512_reduce_max_ps(mv));
        const __m512 mb = _mm512_set1_ps(mx);
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < 4; ++c) {
          __m512 p = _mm512_maskz_mov_ps(mk[c], exp512(_mm512_sub_ps(sa[i][c], mb)));
          sum = _mm512_add_ps(sum, p);
          _mm512_store_ps(&s[i][c * 16], p);
        }
        const float corr = std::exp(m[i] - mx);
        l[i] = l[i] * corr + _mm512_reduce_add_ps(sum);
        m[i] = mx;
        __m512 cb = _mm512_set1_ps(corr);
        for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_mul_ps(acc[i][c], cb);
      }
      for (int j = 0; j < kn; ++j) {
        const float* vj = &vv[(j0 + j) * D];
        __m512 v0 = _mm512_loadu_ps(vj), v1 = _mm512_loadu_ps(vj + 16),
               v2 = _mm512_loadu_ps(vj + 32), v3 = _mm512_loadu_ps(vj + 48);
        for (int i = 0; i < R; ++i) {
          __m512 pb = _mm512_set1_ps(s[i][j]);
          acc[i][0] = _mm512_fmadd_ps(pb, v0, acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(pb, v1, acc[i][1]);
          acc[i][2] = _mm512_fmadd_ps(pb, v2, acc[i][2]);
          acc[i][3] = _mm512_fmadd_ps(pb, v3, acc[i][3]);
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      float* oi = o + (b * T + i0 + i) * rs + h * D;
      __m512 inv = _mm512_set1_ps(1.f / l[i]);
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(oi + c * 16, _mm512_mul_ps(acc[i][c], inv));
    }
  }
}

static ffi::Error AttnFwdImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                              ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> o) {
  auto dims = q.dimensions();
  const int64_t B = dims[0], T = dims[1], H = dims[2], D = dims[3];
  if (D != 64 || T % 64 != 0)
    return ffi::Error::InvalidArgument("attention probe: head dim 64 and T a multiple of 64");
  const int64_t pairs = B * H;
  const int nthreads = 2;
  std::vector<std::thread> ths;
  for (int t = 0; t < nthreads; ++t)
    ths.emplace_back([&, t] {
      for (int64_t p = t; p < pairs; p += nthreads)
        attend_pair(q.typed_data(), k.typed_data(), v.typed_data(), o->typed_data(), T, H,
                        p / H, p % H);
    });
  for (auto& th : ths) th.join();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WarmJaxAttentionProbeFwd, AttnFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
