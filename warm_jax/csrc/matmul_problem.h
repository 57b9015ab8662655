// The shapes of a batched matmul custom call, checked once for the matmul kernels
// (bf16_matmul.cc, f32_matmul.cc): C [.., M, N] = op(A) op(B), op(A) A [.., M, K] or (trans_a)
// A stored [.., K, M], op(B) B [.., K, N] or (trans_b) B stored [.., N, K], leading axes
// matched one to one (their product: batch).
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace warm_jax {

struct Problem {
  int64_t batch, m, n, k;
  bool trans_a, trans_b;
};

// Fills p from the three buffers' dimensions, or an InvalidArgument error prefixed with
// `name`; k_multiple > 1: K must be a multiple of it.
template <typename Dims>
xla::ffi::Error read_problem(const std::string& name, const Dims& ad, const Dims& bd,
                             const Dims& cd, bool trans_a, bool trans_b, int64_t k_multiple,
                             Problem* p) {
  using xla::ffi::Error;
  const size_t r = ad.size();
  if (r < 2 || bd.size() != r || cd.size() != r)
    return Error::InvalidArgument(name + ": A, B and C must have one rank >= 2");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < r; ++i) {
    if (ad[i] != bd[i] || ad[i] != cd[i])
      return Error::InvalidArgument(name + ": leading axes differ");
    batch *= ad[i];
  }
  const int64_t m = trans_a ? ad[r - 1] : ad[r - 2], k = trans_a ? ad[r - 2] : ad[r - 1];
  const int64_t kb = trans_b ? bd[r - 1] : bd[r - 2], n = trans_b ? bd[r - 2] : bd[r - 1];
  if (k != kb || k % k_multiple || cd[r - 2] != m || cd[r - 1] != n)
    return Error::InvalidArgument(name + ": shapes do not match" +
                                  (k_multiple > 1 ? " (or K is odd)" : ""));
  *p = Problem{batch, m, n, k, trans_a, trans_b};
  return Error::Success();
}

}  // namespace warm_jax
