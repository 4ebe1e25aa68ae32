// Multi-tensor reductions and updates over lists of tensors (one call per list), shared by the CPU and CUDA builds.
//
// Contract for every function declared here (bindings.cpp checks it before calling them):
//   * every list is non-empty, has the same length, and holds contiguous tensors of one floating dtype on one device;
//   * the k-th tensors of all lists have the same number of elements;
//   * results are float64 tensors of length n on the inputs' device.
// Work is split into fixed-size chunks (a chunk never spans two tensors): one parallel pass writes one partial sum
// per chunk, then each tensor's partials are summed in chunk order. The result therefore does not depend on the
// number of threads or blocks. Accumulation is float64 for float32/float64 inputs and float32 inside a chunk for
// float16/bfloat16 inputs (chunk partials are still summed in float64).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace megatron_bliss {

// Accumulator type for a storage type: double for float/double, float for the 16-bit types.
template <typename scalar_t>
using acc_type_t =
    std::conditional_t<std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>, double, float>;

// First chunk index of each tensor plus one past the end: chunk_offsets[k + 1] - chunk_offsets[k] chunks of
// tensor k, each `chunk_size` elements except possibly the last (empty tensors own no chunk).
inline std::vector<int64_t> chunk_offsets(const std::vector<at::Tensor>& xs, int64_t chunk_size) {
  std::vector<int64_t> offsets(xs.size() + 1, 0);
  for (size_t k = 0; k < xs.size(); ++k) {
    const int64_t numel = xs[k].numel();
    offsets[k + 1] = offsets[k] + (numel + chunk_size - 1) / chunk_size;
  }
  return offsets;
}

at::Tensor multi_tensor_dot_cpu(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ys);
at::Tensor multi_tensor_norm_cpu(const std::vector<at::Tensor>& xs);
at::Tensor multi_tensor_z_update_cpu(const std::vector<at::Tensor>& hz, const std::vector<at::Tensor>& g,
                                     const std::vector<at::Tensor>& z, double mu, double eta, double clip);
void multi_tensor_axpby_cpu(const std::vector<at::Tensor>& out, const std::vector<at::Tensor>& xs,
                            const std::vector<at::Tensor>& ys, double a, double b);

#ifdef WITH_CUDA
at::Tensor multi_tensor_dot_cuda(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ys);
at::Tensor multi_tensor_norm_cuda(const std::vector<at::Tensor>& xs);
at::Tensor multi_tensor_z_update_cuda(const std::vector<at::Tensor>& hz, const std::vector<at::Tensor>& g,
                                      const std::vector<at::Tensor>& z, double mu, double eta, double clip);
void multi_tensor_axpby_cuda(const std::vector<at::Tensor>& out, const std::vector<at::Tensor>& xs,
                             const std::vector<at::Tensor>& ys, double a, double b);
#endif

}  // namespace megatron_bliss
