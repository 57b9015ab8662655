// Fused causal self-attention for XLA:CPU, forward and backward, as XLA FFI custom calls.
// Built and called by warm_jax/cpu_attention.py (model option attention_impl='cpu_kernel').
//
// Shapes (float32, row-major): q [N, T, H, D]; k, v [N, T, K, D] (H a multiple of K:
// grouped-query attention); seg int32 [N, T], segment ids (0: padding; packed pairs: 1 the
// shared prefix, 2, 3 the continuations; a key padding mask: 1 real, 0 padding); N may be a
// product of leading axes (vmap). T and D are multiples of 16 (the caller pads T).
// Query i sees key j iff j <= i, seg[j] > 0 and seg[j] is 1 or seg[i] (model.Transformer's
// rule for packed pairs). A row that sees no key gets output 0 and lse = +inf (it is
// padding; nothing reads it).
//
// Work: one (sequence, key/value head) group per task, tasks spread over the CPU's
// threads. Per query head of the group, 64 query rows at a time: logits S = Q K^T only up
// to the block's causal end, an exact softmax per row (vectorised exp), then P V. The
// backward recomputes P from the saved log-sum-exp and forms dV += P^T dO, dS, dQ = dS K and
// dK += dS^T Q. Every product runs through the shared register-blocked AVX-512 gemm
// (f32_gemm.h: 6 rows x 64 columns, 24 accumulators; a head dim below 64 takes narrower
// tiles): C (+)= A B, A read with any strides (so A^T costs nothing), B rows contiguous
// (K^T and V^T are copied once per group).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "f32_gemm.h"
#include "parallel_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t QB = 64;  // query rows per block (the last block of a sequence may be shorter)
constexpr int64_t TM = 16;  // the multiple T must be (the softmax's 16-lane key loads)
constexpr int64_t NC = 16;  // head dim multiple (one AVX-512 vector of f32)

inline __m512 exp512(__m512 x) {
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

struct Dims {
  int64_t n, t, h, kvh, d;
  float scale;
};

// Lanes j0..j0+15 that query position p may see: causal, a real key (segment > 0), and of
// the query's segment or of segment 1 (the shared prefix of packed pairs). A key padding
// mask is segments 1 (real) and 0 (padding).
inline __mmask16 allowed(const int32_t* seg, int64_t j0, int64_t p) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i jv = _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(j0)));
  const __mmask16 causal = _mm512_cmple_epi32_mask(jv, _mm512_set1_epi32(int32_t(p)));
  const __m512i sj = _mm512_loadu_si512(seg + j0);
  const __mmask16 real = _mm512_cmpgt_epi32_mask(sj, _mm512_setzero_si512());
  const __mmask16 shared = _mm512_cmpeq_epi32_mask(sj, _mm512_set1_epi32(1)) |
                           _mm512_cmpeq_epi32_mask(sj, _mm512_set1_epi32(seg[p]));
  return causal & real & shared;
}

// Row of logits s[0:kend] (unscaled) -> probabilities in place; returns the log-sum-exp of
// the scaled logits (+inf when the row sees no key).
float softmax_row(float* s, const int32_t* seg, int64_t kend, int64_t p, float scale) {
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < kend; j += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), sc);
    mv = _mm512_mask_max_ps(mv, allowed(seg, j, p), mv, x);
  }
  const float mx = _mm512_reduce_max_ps(mv);
  if (mx == -INFINITY) {
    std::memset(s, 0, sizeof(float) * kend);
    return INFINITY;
  }
  const __m512 mb = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < kend; j += 16) {
    const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, mb);
    const __m512 e = _mm512_maskz_mov_ps(allowed(seg, j, p), exp512(x));
    sum = _mm512_add_ps(sum, e);
    _mm512_storeu_ps(s + j, e);
  }
  const float l = _mm512_reduce_add_ps(sum);
  const __m512 inv = _mm512_set1_ps(1.0f / l);
  for (int64_t j = 0; j < kend; j += 16)
    _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), inv));
  return mx + std::log(l);
}

// Row of logits s[0:kend] -> exp(scale * s - lse) where allowed, else 0.
void probs_row(float* s, const int32_t* seg, int64_t kend, int64_t p, float scale, float lse) {
  const __m512 sc = _mm512_set1_ps(scale), lb = _mm512_set1_ps(lse);
  for (int64_t j = 0; j < kend; j += 16) {
    const __mmask16 m = std::isinf(lse) ? 0 : allowed(seg, j, p);
    const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + j), sc, lb);
    _mm512_storeu_ps(s + j, _mm512_maskz_mov_ps(m, exp512(x)));
  }
}

// dst [D x T] = src rows [T x D] (row stride ld), transposed in 16 x 16 tiles.
void transpose_in(const float* src, int64_t ld, int64_t t, int64_t d, float* dst) {
  for (int64_t i0 = 0; i0 < t; i0 += 16)
    for (int64_t c0 = 0; c0 < d; c0 += 16)
      for (int64_t c = c0; c < c0 + 16; ++c)
        for (int64_t i = i0; i < i0 + 16; ++i) dst[c * t + i] = src[i * ld + c];
}

// Per-thread buffers, reused across the thread's tasks (sized on first use, not cleared).
struct Scratch {
  std::vector<float> buf[6];
  float* get(int i, int64_t n) {
    if (int64_t(buf[i].size()) < n) buf[i].resize(n);
    return buf[i].data();
  }
};

void forward(ffi::ThreadPool& pool, const Dims& dm, const float* q, const float* k, const float* v,
             const int32_t* seg, float* o, float* lse) {
  const int64_t T = dm.t, H = dm.h, K = dm.kvh, D = dm.d, G = H / K;
  warm_jax::parallel_tasks<Scratch>(pool, dm.n * K, [&](int64_t task, Scratch& scr) {
    const int64_t b = task / K, kh = task % K;
    float* kt = scr.get(0, D * T);
    float* s = scr.get(1, QB * T);
    const float* kb = k + (b * T * K + kh) * D;
    const float* vb = v + (b * T * K + kh) * D;
    const int32_t* vl = seg + b * T;
    transpose_in(kb, K * D, T, D, kt);
    for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
      for (int64_t r0 = 0; r0 < T; r0 += QB) {
        const int64_t rows = std::min(QB, T - r0), kend = r0 + rows;
        const float* qb = q + ((b * T + r0) * H + h) * D;
        warm_jax::gemm_f32(rows, kend, D, qb, H * D, 1, kt, T, s, T, false);
        for (int64_t i = 0; i < rows; ++i)
          lse[(b * H + h) * T + r0 + i] = softmax_row(s + i * T, vl, kend, r0 + i, dm.scale);
        warm_jax::gemm_f32(rows, D, kend, s, T, 1, vb, K * D, o + ((b * T + r0) * H + h) * D,
                           H * D, false);
      }
    }
  });
}

void backward(ffi::ThreadPool& pool, const Dims& dm, const float* q, const float* k, const float* v,
              const int32_t* seg, const float* o, const float* lse, const float* dout,
              float* dq, float* dk, float* dv) {
  const int64_t T = dm.t, H = dm.h, K = dm.kvh, D = dm.d, G = H / K;
  warm_jax::parallel_tasks<Scratch>(pool, dm.n * K, [&](int64_t task, Scratch& scr) {
    const int64_t b = task / K, kh = task % K;
    float* kt = scr.get(0, D * T);
    float* vt = scr.get(1, D * T);
    float* p = scr.get(2, QB * T);
    float* ds = scr.get(3, QB * T);
    float* gk = scr.get(4, 2 * T * D);
    float* gv = gk + T * D;
    float delta[QB];
    std::memset(gk, 0, sizeof(float) * 2 * T * D);
    const float* kb = k + (b * T * K + kh) * D;
    const float* vb = v + (b * T * K + kh) * D;
    const int32_t* vl = seg + b * T;
    transpose_in(kb, K * D, T, D, kt);
    transpose_in(vb, K * D, T, D, vt);
    for (int64_t h = kh * G; h < (kh + 1) * G; ++h) {
      for (int64_t r0 = 0; r0 < T; r0 += QB) {
        const int64_t rows = std::min(QB, T - r0), kend = r0 + rows;
        const int64_t row0 = (b * T + r0) * H + h;
        const float* qb = q + row0 * D;
        const float* gob = dout + row0 * D;
        const float* ob = o + row0 * D;
        warm_jax::gemm_f32(rows, kend, D, qb, H * D, 1, kt, T, p, T, false);
        for (int64_t i = 0; i < rows; ++i) {
          probs_row(p + i * T, vl, kend, r0 + i, dm.scale, lse[(b * H + h) * T + r0 + i]);
          __m512 acc = _mm512_setzero_ps();
          for (int64_t c = 0; c < D; c += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(gob + i * H * D + c),
                                  _mm512_loadu_ps(ob + i * H * D + c), acc);
          delta[i] = _mm512_reduce_add_ps(acc);
        }
        warm_jax::gemm_f32(rows, kend, D, gob, H * D, 1, vt, T, ds, T, false);  // dP
        const __m512 sc = _mm512_set1_ps(dm.scale);
        for (int64_t i = 0; i < rows; ++i) {
          const __m512 di = _mm512_set1_ps(delta[i]);
          float* dsi = ds + i * T;
          const float* pi = p + i * T;
          for (int64_t j = 0; j < kend; j += 16) {
            const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(pi + j),
                                           _mm512_sub_ps(_mm512_loadu_ps(dsi + j), di));
            _mm512_storeu_ps(dsi + j, _mm512_mul_ps(x, sc));
          }
        }
        warm_jax::gemm_f32(rows, D, kend, ds, T, 1, kb, K * D, dq + row0 * D, H * D, false);
        warm_jax::gemm_f32(kend, D, rows, ds, 1, T, qb, H * D, gk, D, true);
        warm_jax::gemm_f32(kend, D, rows, p, 1, T, gob, H * D, gv, D, true);
      }
    }
    for (int64_t j = 0; j < T; ++j) {
      std::memcpy(dk + ((b * T + j) * K + kh) * D, gk + j * D, sizeof(float) * D);
      std::memcpy(dv + ((b * T + j) * K + kh) * D, gv + j * D, sizeof(float) * D);
    }
  });
}

ffi::Error check(const Dims& dm) {
  if (dm.t % TM || dm.d % NC || dm.kvh <= 0 || dm.h % dm.kvh)
    return ffi::Error::InvalidArgument(
        "causal_attention: T and D must be multiples of 16 and H a multiple of K");
  return ffi::Error::Success();
}

Dims dims_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  const size_t r = qd.size();
  int64_t n = 1;
  for (size_t i = 0; i + 3 < r; ++i) n *= qd[i];
  const int64_t d = qd[r - 1];
  return Dims{n, qd[r - 3], qd[r - 2], kd[r - 2], d, 1.0f / std::sqrt(float(d))};
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> seg, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  const Dims dm = dims_of(q, k);
  ffi::Error err = check(dm);
  if (err.failure()) return err;
  forward(pool, dm, q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(),
          o->typed_data(), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> o,
                   ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                   ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                   ffi::ResultBuffer<ffi::F32> dv) {
  const Dims dm = dims_of(q, k);
  ffi::Error err = check(dm);
  if (err.failure()) return err;
  backward(pool, dm, q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(),
           o.typed_data(), lse.typed_data(), dout.typed_data(), dq->typed_data(),
           dk->typed_data(), dv->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WarmJaxCausalAttentionFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(WarmJaxCausalAttentionBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
