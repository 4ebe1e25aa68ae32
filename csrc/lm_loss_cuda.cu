// CUDA kernels of the fused LM loss rows (compiled only when setup.py finds a CUDA torch and nvcc; WITH_CUDA).
//
// Each row of the logits is handled by one block of kBlock threads, or by one warp when the vocabulary shard is
// short (kWarpRowsMaxV), eight rows to a block. Every thread walks its strided share of the row, then the group
// combines the per-thread partials with warp shuffles (and shared memory across the warps of a block). The
// statistics read each row once: a running max with its sum of exponentials, rescaled when the max grows, and the
// partials combine the same way. 16-bit logits are read as they are and converted per element; accumulation is in
// float (double for double logits), with the accurate expf/exp (no fast math, so that results round like the CPU
// kernels' up to summation order). No atomics: results do not change from run to run.
#include "lm_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream, without the cuBLAS/cuSPARSE headers

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace megatron_bliss {
namespace {

constexpr int kBlock = 512;              // threads per row for long rows
constexpr int kWarpRowsBlock = 256;      // threads per block when a warp takes a row (8 rows per block)
constexpr int64_t kWarpRowsMaxV = 2048;  // rows up to this long take a warp each
static_assert(kBlock % 32 == 0 && (kBlock / 32 & (kBlock / 32 - 1)) == 0, "block must be a power-of-two of warps");
static_assert(kWarpRowsBlock % 32 == 0, "block must be whole warps");

template <typename scalar_t>
using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// Max that propagates NaN from either side (as torch.amax does).
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  return (a != a || a > b) ? a : b;
}

// exp(m - big) with big >= m the combined max; 1 when they are equal (also when both are -inf).
template <typename A>
__device__ __forceinline__ A rescale(A m, A big) {
  return m == big ? A(1) : exp_acc(m - big);
}

// Row of the thread and its index within the row's group of kThreads threads (a warp, or the whole block).
template <int kThreads>
__device__ __forceinline__ int64_t group_row() {
  if constexpr (kThreads == 32) {
    return static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  } else {
    return blockIdx.x;
  }
}

template <int kThreads>
__device__ __forceinline__ int group_lane() {
  return kThreads == 32 ? static_cast<int>(threadIdx.x % 32) : static_cast<int>(threadIdx.x);
}

// K partial values of one thread.
template <typename A, int K>
struct Partials {
  A v[K];
};

template <typename A, int K>
__device__ __forceinline__ Partials<A, K> shfl_xor(Partials<A, K> p, int offset) {
#pragma unroll
  for (int k = 0; k < K; ++k) p.v[k] = __shfl_xor_sync(0xffffffffu, p.v[k], offset);
  return p;
}

// Combines the partials of the kThreads threads of a row group with `combine` (associative); the result is valid in
// lane 0 of the group (in every lane of a warp group). A block group reduces each warp, then the warp totals in the
// first warp: its lanes 16..31 duplicate 0..15 but only combine among themselves (xor offsets below the warp count).
template <int kThreads, typename P, typename Combine>
__device__ __forceinline__ P group_combine(P p, const Combine& combine) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) p = combine(p, shfl_xor(p, offset));
  if constexpr (kThreads > 32) {
    constexpr int kWarps = kThreads / 32;
    __shared__ P warp_totals[kWarps];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_totals[warp] = p;
    __syncthreads();
    if (warp == 0) {
      p = warp_totals[lane % kWarps];
#pragma unroll
      for (int offset = kWarps / 2; offset > 0; offset >>= 1) p = combine(p, shfl_xor(p, offset));
    }
  }
  return p;
}

__device__ __forceinline__ bool in_shard(int64_t label, int64_t v) { return label >= 0 && label < v; }

// Running (max, sum of exp(x - max)) of one thread, with x pushed one at a time. The sum stays exact up to rounding:
// when the max grows the sum is rescaled; an element of -inf adds 0 (the max is finite once it counts).
template <typename A>
__device__ __forceinline__ void push_max_sum(A x, A& m, A& s) {
  if (x > m || x != x) {
    s = s * exp_acc(m - x) + A(1);  // m = -inf at first: 0 * 0 + 1
    m = x;
  } else {
    s += m == neg_inf<A>() ? A(0) : exp_acc(x - m);
  }
}

// Stats partials: 0 max z, 1 sum exp(z - max), 2 max zt, 3 sum exp(zt - max_t), 4 sum exp(zt - max_t) (zt - z).
template <typename A>
__device__ __forceinline__ Partials<A, 5> combine_stats(const Partials<A, 5>& a, const Partials<A, 5>& b) {
  Partials<A, 5> r;
  r.v[0] = nan_max(a.v[0], b.v[0]);
  r.v[1] = a.v[1] * rescale(a.v[0], r.v[0]) + b.v[1] * rescale(b.v[0], r.v[0]);
  r.v[2] = nan_max(a.v[2], b.v[2]);
  const A fa = rescale(a.v[2], r.v[2]), fb = rescale(b.v[2], r.v[2]);
  r.v[3] = a.v[3] * fa + b.v[3] * fb;
  r.v[4] = a.v[4] * fa + b.v[4] * fb;
  return r;
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads == 32 ? kWarpRowsBlock : kThreads)
    stats_kernel(const T* __restrict__ z, const T* __restrict__ zt, const int64_t* __restrict__ labels,
                 int64_t rows, int64_t v, stat_t<T>* __restrict__ out) {
  using A = stat_t<T>;
  const int64_t r = group_row<kThreads>();
  if (kThreads == 32 && r >= rows) return;  // whole warps only; a block group always has its row
  const int lane = group_lane<kThreads>();
  const T* zr = z + r * v;
  Partials<A, 5> p{{neg_inf<A>(), A(0), neg_inf<A>(), A(0), A(0)}};
  if (zt == nullptr) {
    for (int64_t i = lane; i < v; i += kThreads) push_max_sum(static_cast<A>(zr[i]), p.v[0], p.v[1]);
  } else {
    const T* tr = zt + r * v;
    for (int64_t i = lane; i < v; i += kThreads) {
      const A za = static_cast<A>(zr[i]);
      const A ta = static_cast<A>(tr[i]);
      push_max_sum(za, p.v[0], p.v[1]);
      // the same running sum for zt, with the cross term rescaled alongside it
      if (ta > p.v[2] || ta != ta) {
        const A f = exp_acc(p.v[2] - ta);
        p.v[3] = p.v[3] * f + A(1);
        p.v[4] = p.v[4] * f + (ta - za);
        p.v[2] = ta;
      } else {
        const A e = p.v[2] == neg_inf<A>() ? A(0) : exp_acc(ta - p.v[2]);
        p.v[3] += e;
        p.v[4] += e * (ta - za);  // NaN for ta = -inf, as in the reference (0 * -inf)
      }
    }
  }
  p = group_combine<kThreads>(p, [](const Partials<A, 5>& a, const Partials<A, 5>& b) { return combine_stats(a, b); });
  if (lane != 0) return;
  // an infinite max makes the reference's exp(z - max) NaN somewhere (inf - inf); the running sums skip that
  const A nan = std::numeric_limits<A>::quiet_NaN();
  A* o = out + r * 6;
  o[0] = p.v[0];
  o[1] = isinf(p.v[0]) ? nan : p.v[1];
  const int64_t y = labels[r];
  o[2] = in_shard(y, v) ? static_cast<A>(zr[y]) : A(0);
  if (zt == nullptr) {
    o[3] = o[4] = o[5] = A(0);
  } else {
    const bool inf_t = isinf(p.v[2]);
    o[3] = p.v[2];
    o[4] = inf_t ? nan : p.v[3];
    o[5] = inf_t ? nan : p.v[4];
  }
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads == 32 ? kWarpRowsBlock : kThreads)
    dots_kernel(const T* __restrict__ z, const stat_t<T>* __restrict__ lse, const T* __restrict__ zt,
                const stat_t<T>* __restrict__ lse_t, const int64_t* __restrict__ labels, const T* __restrict__ u,
                int64_t rows, int64_t v, stat_t<T>* __restrict__ out) {
  using A = stat_t<T>;
  const int64_t r = group_row<kThreads>();
  if (kThreads == 32 && r >= rows) return;
  const int lane = group_lane<kThreads>();
  const T* zr = z + r * v;
  const T* ur = u + r * v;
  const A l = lse[r];
  Partials<A, 2> p{{A(0), A(0)}};
  if (zt == nullptr) {
    for (int64_t i = lane; i < v; i += kThreads) p.v[0] += exp_acc(static_cast<A>(zr[i]) - l) * static_cast<A>(ur[i]);
  } else {
    const T* tr = zt + r * v;
    const A lt = lse_t[r];
    for (int64_t i = lane; i < v; i += kThreads) {
      const A ua = static_cast<A>(ur[i]);
      p.v[0] += exp_acc(static_cast<A>(zr[i]) - l) * ua;
      p.v[1] += exp_acc(static_cast<A>(tr[i]) - lt) * ua;
    }
  }
  p = group_combine<kThreads>(p, [](const Partials<A, 2>& a, const Partials<A, 2>& b) {
    return Partials<A, 2>{{a.v[0] + b.v[0], a.v[1] + b.v[1]}};
  });
  if (lane != 0) return;
  A* o = out + r * 3;
  o[0] = p.v[0];
  o[1] = p.v[1];
  const int64_t y = labels[r];
  o[2] = in_shard(y, v) ? static_cast<A>(ur[y]) : A(0);
}

// The pointers of one lm_logit_grad call; zt/lse_t and u/w/qu are null when absent.
template <typename T>
struct GradArgs {
  const T* z;
  const stat_t<T>* lse;
  const T* zt;
  const stat_t<T>* lse_t;
  const int64_t* labels;
  const stat_t<T>* alpha;
  const stat_t<T>* beta;
  const T* u;
  const stat_t<T>* w;
  const stat_t<T>* qu;
  T* out;
  int64_t rows;
  int64_t v;
};

// One element in the order of the reference (and of the CPU kernel): ((alpha + beta) q [- alpha at the label])
// - beta p + (w q) (u - qu), rounded once to T.
template <typename T, int kThreads, bool kTarget, bool kDir>
__global__ void __launch_bounds__(kThreads == 32 ? kWarpRowsBlock : kThreads) grad_kernel(GradArgs<T> g) {
  using A = stat_t<T>;
  const int64_t r = group_row<kThreads>();
  if (r >= g.rows) return;
  const int lane = group_lane<kThreads>();
  const int64_t v = g.v;
  const T* zr = g.z + r * v;
  const T* tr = kTarget ? g.zt + r * v : nullptr;
  const T* ur = kDir ? g.u + r * v : nullptr;
  T* o = g.out + r * v;
  const A l = g.lse[r];
  const A lt = kTarget ? g.lse_t[r] : A(0);
  const A alpha = g.alpha[r], beta = g.beta[r];
  const A ab = alpha + beta;
  const A w = kDir ? g.w[r] : A(0);
  const A qu = kDir ? g.qu[r] : A(0);
  const int64_t y = g.labels[r];
  for (int64_t i = lane; i < v; i += kThreads) {
    const A q = exp_acc(static_cast<A>(zr[i]) - l);
    A e = ab * q - (i == y ? alpha : A(0));
    if constexpr (kTarget) e = e - beta * exp_acc(static_cast<A>(tr[i]) - lt);
    if constexpr (kDir) e = e + (w * q) * (static_cast<A>(ur[i]) - qu);
    o[i] = static_cast<T>(e);
  }
}

// Launches kernel<kThreads = 32 or kBlock> over the rows: a warp per row when v is short, else a block per row.
template <typename LaunchWarp, typename LaunchBlock>
void launch_rows(int64_t rows, int64_t v, const LaunchWarp& warp_rows, const LaunchBlock& block_rows) {
  if (rows == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (v <= kWarpRowsMaxV) {
    constexpr int64_t kRowsPerBlock = kWarpRowsBlock / 32;
    const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "lm row kernels: too many rows (", rows, ")");
    warp_rows(dim3(static_cast<unsigned>(blocks)), dim3(kWarpRowsBlock), stream.stream());
  } else {
    TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "lm row kernels: too many rows (", rows, ")");
    block_rows(dim3(static_cast<unsigned>(rows)), dim3(kBlock), stream.stream());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T, bool kTarget, bool kDir>
void launch_grad(const GradArgs<T>& g) {
  launch_rows(
      g.rows, g.v,
      [&](dim3 grid, dim3 block, cudaStream_t s) { grad_kernel<T, 32, kTarget, kDir><<<grid, block, 0, s>>>(g); },
      [&](dim3 grid, dim3 block, cudaStream_t s) { grad_kernel<T, kBlock, kTarget, kDir><<<grid, block, 0, s>>>(g); });
}

}  // namespace

at::Tensor lm_row_stats_cuda(const at::Tensor& z, const at::Tensor& zt, const at::Tensor& labels) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t rows = z.size(0), v = z.size(1);
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({rows, 6}, z.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lm_row_stats_cuda", [&] {
    using A = stat_t<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* tp = ptr_or_null<scalar_t>(zt);
    const int64_t* yp = labels.const_data_ptr<int64_t>();
    A* op = out.mutable_data_ptr<A>();
    launch_rows(
        rows, v,
        [&](dim3 grid, dim3 block, cudaStream_t s) {
          stats_kernel<scalar_t, 32><<<grid, block, 0, s>>>(zp, tp, yp, rows, v, op);
        },
        [&](dim3 grid, dim3 block, cudaStream_t s) {
          stats_kernel<scalar_t, kBlock><<<grid, block, 0, s>>>(zp, tp, yp, rows, v, op);
        });
  });
  return out;
}

at::Tensor lm_row_dots_cuda(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& zt,
                            const at::Tensor& lse_t, const at::Tensor& labels, const at::Tensor& u) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t rows = z.size(0), v = z.size(1);
  at::Tensor out = at::empty({rows, 3}, lse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lm_row_dots_cuda", [&] {
    using A = stat_t<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* tp = ptr_or_null<scalar_t>(zt);
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const A* lp = lse.const_data_ptr<A>();
    const A* ltp = ptr_or_null<A>(lse_t);
    const int64_t* yp = labels.const_data_ptr<int64_t>();
    A* op = out.mutable_data_ptr<A>();
    launch_rows(
        rows, v,
        [&](dim3 grid, dim3 block, cudaStream_t s) {
          dots_kernel<scalar_t, 32><<<grid, block, 0, s>>>(zp, lp, tp, ltp, yp, up, rows, v, op);
        },
        [&](dim3 grid, dim3 block, cudaStream_t s) {
          dots_kernel<scalar_t, kBlock><<<grid, block, 0, s>>>(zp, lp, tp, ltp, yp, up, rows, v, op);
        });
  });
  return out;
}

at::Tensor lm_logit_grad_cuda(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& zt,
                              const at::Tensor& lse_t, const at::Tensor& labels, const at::Tensor& alpha,
                              const at::Tensor& beta, const at::Tensor& u, const at::Tensor& w,
                              const at::Tensor& qu) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t rows = z.size(0), v = z.size(1);
  at::Tensor out = at::empty({rows, v}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lm_logit_grad_cuda", [&] {
    using A = stat_t<scalar_t>;
    const GradArgs<scalar_t> g{z.const_data_ptr<scalar_t>(), lse.const_data_ptr<A>(), ptr_or_null<scalar_t>(zt),
                               ptr_or_null<A>(lse_t), labels.const_data_ptr<int64_t>(), alpha.const_data_ptr<A>(),
                               beta.const_data_ptr<A>(), ptr_or_null<scalar_t>(u), ptr_or_null<A>(w),
                               ptr_or_null<A>(qu), out.mutable_data_ptr<scalar_t>(), rows, v};
    if (g.zt != nullptr) {
      if (g.u != nullptr) launch_grad<scalar_t, true, true>(g);
      else launch_grad<scalar_t, true, false>(g);
    } else {
      if (g.u != nullptr) launch_grad<scalar_t, false, true>(g);
      else launch_grad<scalar_t, false, false>(g);
    }
  });
  return out;
}

}  // namespace megatron_bliss
