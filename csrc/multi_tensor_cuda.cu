// CUDA kernels for the multi-tensor ops (compiled only when setup.py finds a CUDA torch and nvcc; WITH_CUDA).
//
// One launch covers a whole list: a small int64 metadata array on the device holds, per tensor, its data pointers
// (one per list), its element count, and the index of its first chunk. Block b handles chunk b (kChunk elements of
// one tensor, found by binary search over the chunk offsets) and writes one partial sum; a second launch sums each
// tensor's partials in chunk order. No atomics: results are deterministic run to run. The z-update adds a third
// launch that applies z -= eta * scale_k * v with the per-tensor scale left on the device by the second (no host
// synchronization anywhere). Each call copies its metadata from pinned host memory, so these ops are not meant to be
// captured in a CUDA graph.
#include "multi_tensor.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream, without the cuBLAS/cuSPARSE headers
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>

namespace megatron_bliss {
namespace {

constexpr int kBlock = 512;                       // threads per block
constexpr int kUnroll = 4;                        // independent loads in flight per thread
constexpr int64_t kChunk = int64_t{1} << 16;      // elements per block: 128 per thread
static_assert(kBlock % 32 == 0, "block must be whole warps");

// Device-side view of the metadata array built by make_meta().
struct ListMeta {
  const int64_t* ptrs;    // [num_lists * n] data pointers, list-major
  const int64_t* numels;  // [n]
  const int64_t* chunk0;  // [n + 1] first chunk of each tensor, then the total chunk count
  int n;

  // Tensor owning chunk c: the last k with chunk0[k] <= c (empty tensors own no chunk and are skipped).
  __device__ int tensor_of(int64_t c) const {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (chunk0[mid] <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  template <typename T>
  __device__ T* ptr(int list, int k) const {
    return reinterpret_cast<T*>(ptrs[static_cast<int64_t>(list) * n + k]);
  }
};

// The metadata of some lists on the device: the tensor that holds it (kept alive by the caller until the kernels are
// enqueued: the caching allocator orders its reuse on the stream), the kernels' view of it, and the chunk count.
struct DeviceMeta {
  at::Tensor storage;
  ListMeta view;
  int64_t nchunks;
};

// Copies the metadata of `lists` (same length n, same numels) to the current device. List number `written` is the
// one the kernels write (its pointers come from mutable_data_ptr, which materializes copy-on-write storage), -1 none.
DeviceMeta make_meta(std::initializer_list<const std::vector<at::Tensor>*> lists, int written) {
  const std::vector<at::Tensor>& first = **lists.begin();
  const int64_t n = static_cast<int64_t>(first.size());
  const int64_t num_lists = static_cast<int64_t>(lists.size());
  const auto offsets = chunk_offsets(first, kChunk);
  const int64_t total = num_lists * n + n + (n + 1);
  // Pinned host buffer, so that the copy below is asynchronous; the caching host allocator keeps it alive until the
  // copy has run on the current stream.
  at::Tensor host = at::empty({total}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.mutable_data_ptr<int64_t>();
  int64_t pos = 0;
  int index = 0;
  for (const auto* list : lists) {
    for (const auto& t : *list) {
      const void* p = index == written ? t.mutable_data_ptr() : t.const_data_ptr();
      h[pos++] = reinterpret_cast<int64_t>(p);
    }
    ++index;
  }
  for (const auto& t : first) h[pos++] = t.numel();
  for (const int64_t off : offsets) h[pos++] = off;
  at::Tensor dev = host.to(first[0].device(), at::kLong, /*non_blocking=*/true);
  const int64_t* d = dev.const_data_ptr<int64_t>();
  ListMeta view{d, d + num_lists * n, d + num_lists * n + n, static_cast<int>(n)};
  return {dev, view, offsets.back()};
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; the result is valid in thread 0. Called once per kernel (one shared buffer per type).
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_totals[kBlock / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  v = threadIdx.x < kBlock / 32 ? warp_totals[lane] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// Element range [begin, end) of chunk `c` of tensor `k`.
__device__ __forceinline__ void chunk_range(const ListMeta& meta, int k, int64_t c, int64_t& begin, int64_t& end) {
  begin = (c - meta.chunk0[k]) * kChunk;
  end = begin + kChunk < meta.numels[k] ? begin + kChunk : meta.numels[k];
}

// v = hz - g + mu * z in the op-math type, the same expression as the CPU kernel.
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ opmath_t z_residual(scalar_t hz, scalar_t g, scalar_t z, opmath_t mu) {
  return (static_cast<opmath_t>(hz) - static_cast<opmath_t>(g)) + mu * static_cast<opmath_t>(z);
}

// kind 0: partial[c] = sum x*y; kind 1: sum x*x (list 0 only); kind 2: sum v*v with v the z-residual of lists
// (hz, g, z) = (0, 1, 2).
template <typename scalar_t, int kind>
__global__ void __launch_bounds__(kBlock) partial_sums_kernel(ListMeta meta, double mu, double* partial) {
  using acc_t = acc_type_t<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const int k = meta.tensor_of(c);
  int64_t begin, end;
  chunk_range(meta, k, c, begin, end);
  const scalar_t* a = meta.ptr<const scalar_t>(0, k);
  const scalar_t* b = kind == 1 ? a : meta.ptr<const scalar_t>(1, k);
  const scalar_t* zz = kind == 2 ? meta.ptr<const scalar_t>(2, k) : a;
  const opmath_t mu_o = static_cast<opmath_t>(mu);

  auto term = [&](int64_t i) -> acc_t {
    if constexpr (kind == 2) {
      const acc_t v = static_cast<acc_t>(z_residual(a[i], b[i], zz[i], mu_o));
      return v * v;
    } else {
      return static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
    }
  };

  acc_t acc = 0;
  int64_t i = begin + threadIdx.x;
  for (; i + (kUnroll - 1) * kBlock < end; i += kUnroll * kBlock) {
    acc_t t[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) t[u] = term(i + u * kBlock);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc += t[u];
  }
  for (; i < end; i += kBlock) acc += term(i);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[c] = static_cast<double>(acc);
}

// One block per tensor: out[k] = sum of its chunk partials (in a fixed order), square-rooted when `take_sqrt`. When
// `scale` is given, also scale[k] = clip / out[k] if out[k] > clip, else 1.
__global__ void __launch_bounds__(kBlock) sum_partials_kernel(const double* partial, const int64_t* chunk0,
                                                              bool take_sqrt, double clip, double* out,
                                                              double* scale) {
  const int k = blockIdx.x;
  double s = 0.0;
  for (int64_t c = chunk0[k] + threadIdx.x; c < chunk0[k + 1]; c += kBlock) s += partial[c];
  s = block_sum(s);
  if (threadIdx.x == 0) {
    const double r = take_sqrt ? sqrt(s) : s;
    out[k] = r;
    if (scale != nullptr) scale[k] = r > clip ? clip / r : 1.0;
  }
}

// z -= eta * scale_k * v, v recomputed from (hz, g, z) = lists (0, 1, 2).
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) z_apply_kernel(ListMeta meta, double mu, double eta, const double* scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const int k = meta.tensor_of(c);
  int64_t begin, end;
  chunk_range(meta, k, c, begin, end);
  const scalar_t* hz = meta.ptr<const scalar_t>(0, k);
  const scalar_t* g = meta.ptr<const scalar_t>(1, k);
  scalar_t* z = meta.ptr<scalar_t>(2, k);
  const opmath_t mu_o = static_cast<opmath_t>(mu);
  const opmath_t neg_eta = static_cast<opmath_t>(-eta);
  const opmath_t s = static_cast<opmath_t>(scale[k]);
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
    const opmath_t v = z_residual(hz[i], g[i], z[i], mu_o) * s;
    z[i] = static_cast<scalar_t>(static_cast<opmath_t>(z[i]) + neg_eta * v);
  }
}

// out = a * x + b * y with (out, x, y) = lists (0, 1, 2); out may alias x or y element for element.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) axpby_kernel(ListMeta meta, double a, double b) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const int k = meta.tensor_of(c);
  int64_t begin, end;
  chunk_range(meta, k, c, begin, end);
  scalar_t* out = meta.ptr<scalar_t>(0, k);
  const scalar_t* x = meta.ptr<const scalar_t>(1, k);
  const scalar_t* y = meta.ptr<const scalar_t>(2, k);
  const opmath_t a_o = static_cast<opmath_t>(a);
  const opmath_t b_o = static_cast<opmath_t>(b);
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
    out[i] = static_cast<scalar_t>(a_o * static_cast<opmath_t>(x[i]) + b_o * static_cast<opmath_t>(y[i]));
  }
}

// Launches the partial sums of `kind` (0 dot, 1 sum of squares, 2 z-residual sum of squares) then their per-tensor
// totals: returns float64 [n] (square-rooted for kinds 1 and 2). With `scale` given, also fills it with the clip
// factors (float64 [n], on the device).
at::Tensor reduce(int kind, const DeviceMeta& meta, const at::Tensor& like, double mu, double clip, at::Tensor* scale) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto opts = like.options().dtype(at::kDouble);
  const int n = meta.view.n;
  at::Tensor partial = at::empty({std::max<int64_t>(meta.nchunks, 1)}, opts);
  double* p = partial.mutable_data_ptr<double>();
  if (meta.nchunks > 0) {
    const dim3 grid(static_cast<unsigned>(meta.nchunks));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "multi_tensor_reduce_cuda", [&] {
      if (kind == 0) {
        partial_sums_kernel<scalar_t, 0><<<grid, kBlock, 0, stream>>>(meta.view, mu, p);
      } else if (kind == 1) {
        partial_sums_kernel<scalar_t, 1><<<grid, kBlock, 0, stream>>>(meta.view, mu, p);
      } else {
        partial_sums_kernel<scalar_t, 2><<<grid, kBlock, 0, stream>>>(meta.view, mu, p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor out = at::empty({n}, opts);
  double* scale_ptr = nullptr;
  if (scale != nullptr) {
    *scale = at::empty({n}, opts);
    scale_ptr = scale->mutable_data_ptr<double>();
  }
  sum_partials_kernel<<<n, kBlock, 0, stream>>>(p, meta.view.chunk0, kind != 0, clip, out.mutable_data_ptr<double>(),
                                                scale_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

at::Tensor multi_tensor_dot_cuda(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ys) {
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const DeviceMeta meta = make_meta({&xs, &ys}, /*written=*/-1);
  return reduce(0, meta, xs[0], 0.0, 0.0, nullptr);
}

at::Tensor multi_tensor_norm_cuda(const std::vector<at::Tensor>& xs) {
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const DeviceMeta meta = make_meta({&xs}, /*written=*/-1);
  return reduce(1, meta, xs[0], 0.0, 0.0, nullptr);
}

at::Tensor multi_tensor_z_update_cuda(const std::vector<at::Tensor>& hz, const std::vector<at::Tensor>& g,
                                      const std::vector<at::Tensor>& z, double mu, double eta, double clip) {
  const c10::cuda::CUDAGuard guard(z[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const DeviceMeta meta = make_meta({&hz, &g, &z}, /*written=*/2);
  at::Tensor scale;
  at::Tensor norms = reduce(2, meta, z[0], mu, clip, &scale);
  if (meta.nchunks > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z[0].scalar_type(), "multi_tensor_z_update_cuda", [&] {
      z_apply_kernel<scalar_t><<<static_cast<unsigned>(meta.nchunks), kBlock, 0, stream>>>(
          meta.view, mu, eta, scale.const_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return norms;
}

void multi_tensor_axpby_cuda(const std::vector<at::Tensor>& out, const std::vector<at::Tensor>& xs,
                             const std::vector<at::Tensor>& ys, double a, double b) {
  const c10::cuda::CUDAGuard guard(out[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const DeviceMeta meta = make_meta({&out, &xs, &ys}, /*written=*/0);
  if (meta.nchunks == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out[0].scalar_type(), "multi_tensor_axpby_cuda", [&] {
    axpby_kernel<scalar_t><<<static_cast<unsigned>(meta.nchunks), kBlock, 0, stream>>>(meta.view, a, b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace megatron_bliss
