// CPU kernels for the multi-tensor ops: chunks of all tensors in a list are spread over at::parallel_for threads;
// the inner loops keep several independent accumulators so that the compiler can vectorize them.
#include "multi_tensor.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

namespace megatron_bliss {
namespace {

// 32K elements: 128 KiB of float32 per operand, large enough to amortize the per-chunk bookkeeping and small enough
// that a list of a few large tensors still spreads over all threads.
constexpr int64_t kChunk = int64_t{1} << 15;
constexpr int kLanes = 8;  // independent accumulators per inner loop

// Calls fn(k, begin, len, chunk) for every chunk of every tensor, chunks in parallel.
template <typename Fn>
void parallel_over_chunks(const std::vector<int64_t>& offsets, const std::vector<int64_t>& numels, const Fn& fn) {
  const int64_t nchunks = offsets.back();
  at::parallel_for(0, nchunks, 1, [&](int64_t first, int64_t last) {
    int64_t k = std::upper_bound(offsets.begin(), offsets.end(), first) - offsets.begin() - 1;
    for (int64_t c = first; c < last; ++c) {
      while (offsets[k + 1] <= c) ++k;  // skips tensors that own no chunk (empty ones)
      const int64_t begin = (c - offsets[k]) * kChunk;
      fn(k, begin, std::min(kChunk, numels[k] - begin), c);
    }
  });
}

std::vector<int64_t> numels_of(const std::vector<at::Tensor>& xs) {
  std::vector<int64_t> numels(xs.size());
  for (size_t k = 0; k < xs.size(); ++k) numels[k] = xs[k].numel();
  return numels;
}

// Sums each tensor's chunk partials in chunk order into a float64 tensor [n] (square root first when `take_sqrt`).
at::Tensor sum_partials(const std::vector<int64_t>& offsets, const std::vector<double>& partial, bool take_sqrt) {
  const int64_t n = static_cast<int64_t>(offsets.size()) - 1;
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  double* dst = out.mutable_data_ptr<double>();
  for (int64_t k = 0; k < n; ++k) {
    double s = 0.0;
    for (int64_t c = offsets[k]; c < offsets[k + 1]; ++c) s += partial[c];
    dst[k] = take_sqrt ? std::sqrt(s) : s;
  }
  return out;
}

template <typename scalar_t>
std::vector<const scalar_t*> const_ptrs(const std::vector<at::Tensor>& xs) {
  std::vector<const scalar_t*> ptrs(xs.size());
  for (size_t k = 0; k < xs.size(); ++k) ptrs[k] = xs[k].const_data_ptr<scalar_t>();
  return ptrs;
}

template <typename scalar_t>
std::vector<scalar_t*> mutable_ptrs(const std::vector<at::Tensor>& xs) {
  std::vector<scalar_t*> ptrs(xs.size());
  for (size_t k = 0; k < xs.size(); ++k) ptrs[k] = xs[k].mutable_data_ptr<scalar_t>();
  return ptrs;
}

template <typename acc_t>
acc_t sum_lanes(const acc_t (&acc)[kLanes], acc_t tail) {
  acc_t s = tail;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
acc_t dot_chunk(const scalar_t* x, const scalar_t* y, int64_t len) {
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<acc_t>(x[i + j]) * static_cast<acc_t>(y[i + j]);
  }
  acc_t tail = 0;
  for (; i < len; ++i) tail += static_cast<acc_t>(x[i]) * static_cast<acc_t>(y[i]);
  return sum_lanes(acc, tail);
}

template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
acc_t sumsq_chunk(const scalar_t* x, int64_t len) {
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t v = static_cast<acc_t>(x[i + j]);
      acc[j] += v * v;
    }
  }
  acc_t tail = 0;
  for (; i < len; ++i) tail += static_cast<acc_t>(x[i]) * static_cast<acc_t>(x[i]);
  return sum_lanes(acc, tail);
}

// v = hz - g + mu * z, in the op-math type (float for float32/16-bit inputs, double for float64).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
inline opmath_t z_residual(scalar_t hz, scalar_t g, scalar_t z, opmath_t mu) {
  return (static_cast<opmath_t>(hz) - static_cast<opmath_t>(g)) + mu * static_cast<opmath_t>(z);
}

template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>, typename opmath_t = at::opmath_type<scalar_t>>
acc_t residual_sumsq_chunk(const scalar_t* hz, const scalar_t* g, const scalar_t* z, opmath_t mu, int64_t len) {
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t v = static_cast<acc_t>(z_residual(hz[i + j], g[i + j], z[i + j], mu));
      acc[j] += v * v;
    }
  }
  acc_t tail = 0;
  for (; i < len; ++i) {
    const acc_t v = static_cast<acc_t>(z_residual(hz[i], g[i], z[i], mu));
    tail += v * v;
  }
  return sum_lanes(acc, tail);
}

}  // namespace

at::Tensor multi_tensor_dot_cpu(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ys) {
  const auto offsets = chunk_offsets(xs, kChunk);
  const auto numels = numels_of(xs);
  std::vector<double> partial(offsets.back());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "multi_tensor_dot_cpu", [&] {
    const auto x = const_ptrs<scalar_t>(xs);
    const auto y = const_ptrs<scalar_t>(ys);
    parallel_over_chunks(offsets, numels, [&](int64_t k, int64_t begin, int64_t len, int64_t c) {
      partial[c] = static_cast<double>(dot_chunk(x[k] + begin, y[k] + begin, len));
    });
  });
  return sum_partials(offsets, partial, /*take_sqrt=*/false);
}

at::Tensor multi_tensor_norm_cpu(const std::vector<at::Tensor>& xs) {
  const auto offsets = chunk_offsets(xs, kChunk);
  const auto numels = numels_of(xs);
  std::vector<double> partial(offsets.back());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "multi_tensor_norm_cpu", [&] {
    const auto x = const_ptrs<scalar_t>(xs);
    parallel_over_chunks(offsets, numels, [&](int64_t k, int64_t begin, int64_t len, int64_t c) {
      partial[c] = static_cast<double>(sumsq_chunk(x[k] + begin, len));
    });
  });
  return sum_partials(offsets, partial, /*take_sqrt=*/true);
}

at::Tensor multi_tensor_z_update_cpu(const std::vector<at::Tensor>& hz, const std::vector<at::Tensor>& g,
                                     const std::vector<at::Tensor>& z, double mu, double eta, double clip) {
  const auto offsets = chunk_offsets(z, kChunk);
  const auto numels = numels_of(z);
  std::vector<double> partial(offsets.back());
  at::Tensor norms;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z[0].scalar_type(), "multi_tensor_z_update_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto hz_p = const_ptrs<scalar_t>(hz);
    const auto g_p = const_ptrs<scalar_t>(g);
    const auto z_p = mutable_ptrs<scalar_t>(z);
    const opmath_t mu_o = static_cast<opmath_t>(mu);
    // Pass 1: ||v_k||^2 without materializing v.
    parallel_over_chunks(offsets, numels, [&](int64_t k, int64_t begin, int64_t len, int64_t c) {
      partial[c] = static_cast<double>(
          residual_sumsq_chunk(hz_p[k] + begin, g_p[k] + begin, z_p[k] + begin, mu_o, len));
    });
    norms = sum_partials(offsets, partial, /*take_sqrt=*/true);
    const double* norm = norms.const_data_ptr<double>();
    std::vector<opmath_t> scale(z.size());
    for (size_t k = 0; k < z.size(); ++k) scale[k] = static_cast<opmath_t>(norm[k] > clip ? clip / norm[k] : 1.0);
    const opmath_t neg_eta = static_cast<opmath_t>(-eta);
    // Pass 2: z <- z - eta * (scale_k * v), v recomputed from the same expression as in pass 1.
    parallel_over_chunks(offsets, numels, [&](int64_t k, int64_t begin, int64_t len, int64_t) {
      const scalar_t* h = hz_p[k] + begin;
      const scalar_t* gg = g_p[k] + begin;
      scalar_t* zz = z_p[k] + begin;
      const opmath_t s = scale[k];
      for (int64_t i = 0; i < len; ++i) {
        const opmath_t v = z_residual(h[i], gg[i], zz[i], mu_o) * s;
        zz[i] = static_cast<scalar_t>(static_cast<opmath_t>(zz[i]) + neg_eta * v);
      }
    });
  });
  return norms;
}

void multi_tensor_axpby_cpu(const std::vector<at::Tensor>& out, const std::vector<at::Tensor>& xs,
                            const std::vector<at::Tensor>& ys, double a, double b) {
  const auto offsets = chunk_offsets(out, kChunk);
  const auto numels = numels_of(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out[0].scalar_type(), "multi_tensor_axpby_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto x = const_ptrs<scalar_t>(xs);
    const auto y = const_ptrs<scalar_t>(ys);
    const auto o = mutable_ptrs<scalar_t>(out);
    const opmath_t a_o = static_cast<opmath_t>(a);
    const opmath_t b_o = static_cast<opmath_t>(b);
    // out may be the same tensor as x or y: each element is read before it is written, by the same thread.
    parallel_over_chunks(offsets, numels, [&](int64_t k, int64_t begin, int64_t len, int64_t) {
      const scalar_t* xx = x[k] + begin;
      const scalar_t* yy = y[k] + begin;
      scalar_t* oo = o[k] + begin;
      for (int64_t i = 0; i < len; ++i) {
        oo[i] = static_cast<scalar_t>(a_o * static_cast<opmath_t>(xx[i]) + b_o * static_cast<opmath_t>(yy[i]));
      }
    });
  });
}

}  // namespace megatron_bliss
