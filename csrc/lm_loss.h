// Row kernels of the fused weighted LM loss (megatron_bliss.ops.lm_loss), shared by the CPU and CUDA builds.
//
// Contract for every function declared here (bindings.cpp checks it before calling them):
//   * z is a contiguous [R, V] tensor of float32, float64, bfloat16 or float16; zt and u, when defined, are
//     contiguous tensors of z's dtype and shape;
//   * labels is a contiguous int64 [R] tensor of shard-local indices; a value outside [0, V) means "not in this
//     shard";
//   * lse, lse_t, alpha, beta, w and qu, when defined, are contiguous [R] tensors of the statistics dtype (float64
//     for float64 logits, float32 otherwise), on z's device;
//   * V > 0 for lm_row_stats.
// Statistics are accumulated in that dtype; 16-bit logits are read as they are (never copied to float32). No
// kernel allocates a vocabulary-sized temporary besides its output.
#pragma once

#include <ATen/core/Tensor.h>

namespace megatron_bliss {

// [R, 6]: max z, sum exp(z - max), z[label] (0 outside the shard), max zt, sum exp(zt - max_t),
// sum exp(zt - max_t) (zt - z); the last three are 0 when zt is undefined.
at::Tensor lm_row_stats_cpu(const at::Tensor& z, const at::Tensor& zt, const at::Tensor& labels);
// [R, 3]: sum q u, sum p u (0 when zt is undefined), u[label] (0 outside the shard), with q = exp(z - lse) and
// p = exp(zt - lse_t).
at::Tensor lm_row_dots_cpu(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& zt, const at::Tensor& lse_t,
                           const at::Tensor& labels, const at::Tensor& u);
// [R, V] in z's dtype: alpha (q - e_label) + beta (q - p) + w q (u - qu), computed in the statistics dtype and
// rounded once; the p term only when zt is defined, the w term only when u is defined (w and qu then are too).
at::Tensor lm_logit_grad_cpu(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& zt,
                             const at::Tensor& lse_t, const at::Tensor& labels, const at::Tensor& alpha,
                             const at::Tensor& beta, const at::Tensor& u, const at::Tensor& w, const at::Tensor& qu);

#ifdef WITH_CUDA
at::Tensor lm_row_stats_cuda(const at::Tensor& z, const at::Tensor& zt, const at::Tensor& labels);
at::Tensor lm_row_dots_cuda(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& zt,
                            const at::Tensor& lse_t, const at::Tensor& labels, const at::Tensor& u);
at::Tensor lm_logit_grad_cuda(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& zt,
                              const at::Tensor& lse_t, const at::Tensor& labels, const at::Tensor& alpha,
                              const at::Tensor& beta, const at::Tensor& u, const at::Tensor& w, const at::Tensor& qu);
#endif

}  // namespace megatron_bliss
