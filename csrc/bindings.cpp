// Python bindings of megatron_bliss._C: argument checks, contiguity handling and CPU/CUDA dispatch.
//
// Inputs that are not contiguous are copied to contiguous tensors first; a non-contiguous tensor updated in place is
// computed into a contiguous buffer and copied back. Tensors written in place get their autograd version counter
// bumped, as a PyTorch in-place op would. The ops are not differentiable.
#include "lm_loss.h"
#include "multi_tensor.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>

namespace megatron_bliss {
namespace {

using TensorList = std::vector<at::Tensor>;

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Checks that `lists` (named by `names`) are equally long, share the first tensor's dtype and device, and pair
// tensors of equal size. Returns false for empty lists.
bool check_lists(const char* op, std::initializer_list<const char*> names,
                 std::initializer_list<const TensorList*> lists) {
  const TensorList& first = **lists.begin();
  const char* first_name = *names.begin();
  auto name_it = names.begin();
  for (const TensorList* list : lists) {
    TORCH_CHECK(list->size() == first.size(), op, ": ", *name_it, " has ", list->size(), " tensors but ", first_name,
                " has ", first.size());
    ++name_it;
  }
  if (first.empty()) return false;
  TORCH_CHECK(first[0].defined(), op, ": ", first_name, "[0] is undefined");
  const at::ScalarType dtype = first[0].scalar_type();
  const at::Device device = first[0].device();
  TORCH_CHECK(supported_dtype(dtype), op, ": dtype ", dtype, " is not supported (float32, float64, bfloat16, float16)");
  name_it = names.begin();
  for (const TensorList* list : lists) {
    for (size_t k = 0; k < list->size(); ++k) {
      const at::Tensor& t = (*list)[k];
      TORCH_CHECK(t.defined(), op, ": ", *name_it, "[", k, "] is undefined");
      TORCH_CHECK(t.scalar_type() == dtype, op, ": ", *name_it, "[", k, "] has dtype ", t.scalar_type(), ", expected ",
                  dtype, " (one dtype per call)");
      TORCH_CHECK(t.device() == device, op, ": ", *name_it, "[", k, "] is on ", t.device(), ", expected ", device);
      TORCH_CHECK(t.numel() == first[k].numel(), op, ": ", *name_it, "[", k, "] has ", t.numel(), " elements but ",
                  first_name, "[", k, "] has ", first[k].numel());
    }
    ++name_it;
  }
  return true;
}

TensorList contiguous(const TensorList& xs) {
  TensorList out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.contiguous());
  return out;
}

// Contiguous tensors that a kernel writes into, and how to hand the result back to the caller's tensors.
struct InPlaceTargets {
  TensorList originals;
  TensorList work;

  // `read_too`: the kernel also reads the old values (z in the z-update), so a non-contiguous target is copied.
  InPlaceTargets(const TensorList& targets, bool read_too) : originals(targets) {
    work.reserve(targets.size());
    for (const auto& t : targets) {
      if (t.is_contiguous()) {
        work.push_back(t);
      } else {
        work.push_back(read_too ? t.contiguous() : at::empty(t.sizes(), t.options()));
      }
    }
  }

  void finish() {
    for (size_t k = 0; k < originals.size(); ++k) {
      if (work[k].is_same(originals[k])) {
        originals[k].unsafeGetTensorImpl()->bump_version();  // written through data_ptr; tell autograd
      } else {
        originals[k].copy_(work[k]);
      }
    }
  }
};

#ifndef WITH_CUDA
[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, op, ": megatron_bliss._C was built without CUDA; use megatron_bliss.ops, which falls back to "
              "the PyTorch reference");
}
#endif

void check_device(const char* op, const at::Device& device) {
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), op, ": tensors on ", device, " are not supported (cpu or cuda)");
}

at::Tensor multi_tensor_dot(const TensorList& xs, const TensorList& ys) {
  if (!check_lists("multi_tensor_dot", {"xs", "ys"}, {&xs, &ys})) return at::empty({0}, at::kDouble);
  check_device("multi_tensor_dot", xs[0].device());
  const TensorList x = contiguous(xs), y = contiguous(ys);
  if (x[0].is_cuda()) {
#ifdef WITH_CUDA
    return multi_tensor_dot_cuda(x, y);
#else
    no_cuda("multi_tensor_dot");
#endif
  }
  return multi_tensor_dot_cpu(x, y);
}

at::Tensor multi_tensor_norm(const TensorList& xs) {
  if (!check_lists("multi_tensor_norm", {"xs"}, {&xs})) return at::empty({0}, at::kDouble);
  check_device("multi_tensor_norm", xs[0].device());
  const TensorList x = contiguous(xs);
  if (x[0].is_cuda()) {
#ifdef WITH_CUDA
    return multi_tensor_norm_cuda(x);
#else
    no_cuda("multi_tensor_norm");
#endif
  }
  return multi_tensor_norm_cpu(x);
}

at::Tensor multi_tensor_z_update(const TensorList& hz, const TensorList& g, const TensorList& z, double mu, double eta,
                                 double clip) {
  TORCH_CHECK(clip > 0.0, "multi_tensor_z_update: clip must be > 0 (use inf for no clipping), got ", clip);
  if (!check_lists("multi_tensor_z_update", {"z", "hz", "g"}, {&z, &hz, &g})) return at::empty({0}, at::kDouble);
  check_device("multi_tensor_z_update", z[0].device());
  const TensorList h = contiguous(hz), gg = contiguous(g);
  InPlaceTargets targets(z, /*read_too=*/true);
  at::Tensor norms;
  if (z[0].is_cuda()) {
#ifdef WITH_CUDA
    norms = multi_tensor_z_update_cuda(h, gg, targets.work, mu, eta, clip);
#else
    no_cuda("multi_tensor_z_update");
#endif
  } else {
    norms = multi_tensor_z_update_cpu(h, gg, targets.work, mu, eta, clip);
  }
  targets.finish();
  return norms;
}

void multi_tensor_axpby(const TensorList& out, const TensorList& xs, const TensorList& ys, double a, double b) {
  if (!check_lists("multi_tensor_axpby", {"out", "xs", "ys"}, {&out, &xs, &ys})) return;
  check_device("multi_tensor_axpby", out[0].device());
  const TensorList x = contiguous(xs), y = contiguous(ys);
  InPlaceTargets targets(out, /*read_too=*/false);
  if (out[0].is_cuda()) {
#ifdef WITH_CUDA
    multi_tensor_axpby_cuda(targets.work, x, y, a, b);
#else
    no_cuda("multi_tensor_axpby");
#endif
  } else {
    multi_tensor_axpby_cpu(targets.work, x, y, a, b);
  }
  targets.finish();
}

// ------------------------------------------------------------------------------------------------- LM row kernels
// Statistics dtype of logits of dtype `t`: float64 for float64, float32 otherwise.
at::ScalarType stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks the logits z: a 2-D [rows, vocab] tensor of a supported floating dtype on the CPU or a CUDA device.
at::Tensor checked_logits(const char* op, const at::Tensor& z) {
  TORCH_CHECK(z.defined(), op, ": z is undefined");
  TORCH_CHECK(supported_dtype(z.scalar_type()), op, ": logits dtype ", z.scalar_type(),
              " is not supported (float32, float64, bfloat16, float16)");
  TORCH_CHECK(z.dim() == 2, op, ": logits must be 2-D [rows, vocab], got shape ", z.sizes());
  check_device(op, z.device());
  return z.contiguous();
}

// A tensor shaped like the logits (zt, u): z's dtype, shape and device. Contiguous, or undefined when absent.
at::Tensor checked_like_logits(const char* op, const char* name, const std::optional<at::Tensor>& t,
                               const at::Tensor& z) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->scalar_type() == z.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
              " but the logits z have dtype ", z.scalar_type(), " (they must match)");
  TORCH_CHECK(t->sizes() == z.sizes(), op, ": ", name, " has shape ", t->sizes(), " but the logits z have shape ",
              z.sizes());
  TORCH_CHECK(t->device() == z.device(), op, ": ", name, " is on ", t->device(), " but the logits z are on ",
              z.device());
  return t->contiguous();
}

// A per-row vector (lse, lse_t, alpha, beta, w, qu): [rows] of the statistics dtype, on z's device. Contiguous, or
// undefined when absent and not `required`; `why` says when it is required.
at::Tensor checked_row_vector(const char* op, const char* name, const std::optional<at::Tensor>& t,
                              const at::Tensor& z, bool required, const char* why) {
  if (!t.has_value() || !t->defined()) {
    TORCH_CHECK(!required, op, ": ", name, " is required ", why);
    return at::Tensor();
  }
  const at::ScalarType acc = stat_dtype(z.scalar_type());
  TORCH_CHECK(t->scalar_type() == acc, op, ": ", name, " has dtype ", t->scalar_type(), ", expected ", acc,
              " (the statistics dtype of ", z.scalar_type(), " logits)");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == z.size(0), op, ": ", name, " has shape ", t->sizes(), ", expected [",
              z.size(0), "] (one value per row of the logits)");
  TORCH_CHECK(t->device() == z.device(), op, ": ", name, " is on ", t->device(), " but the logits z are on ",
              z.device());
  return t->contiguous();
}

at::Tensor checked_labels(const char* op, const at::Tensor& labels, const at::Tensor& z) {
  TORCH_CHECK(labels.defined(), op, ": labels is undefined");
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels has dtype ", labels.scalar_type(),
              ", expected int64 (shard-local indices, -1 outside the shard)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0), op, ": labels has shape ", labels.sizes(),
              ", expected [", z.size(0), "] (one label per row of the logits)");
  TORCH_CHECK(labels.device() == z.device(), op, ": labels is on ", labels.device(), " but the logits z are on ",
              z.device());
  return labels.contiguous();
}

// The optional target logits and, when they are given, their row logsumexps (required then).
std::pair<at::Tensor, at::Tensor> checked_target(const char* op, const std::optional<at::Tensor>& zt,
                                                 const std::optional<at::Tensor>& lse_t, const at::Tensor& z) {
  at::Tensor tc = checked_like_logits(op, "zt", zt, z);
  at::Tensor ltc = tc.defined() ? checked_row_vector(op, "lse_t", lse_t, z, true, "with zt") : at::Tensor();
  return {tc, ltc};
}

at::Tensor lm_row_stats(const at::Tensor& z, const std::optional<at::Tensor>& zt, const at::Tensor& labels) {
  const char* op = "lm_row_stats";
  const at::Tensor zc = checked_logits(op, z);
  TORCH_CHECK(zc.size(1) > 0, op, ": the vocabulary shard is empty (logits of shape ", zc.sizes(), ")");
  const at::Tensor tc = checked_like_logits(op, "zt", zt, zc);
  const at::Tensor yc = checked_labels(op, labels, zc);
  if (zc.is_cuda()) {
#ifdef WITH_CUDA
    return lm_row_stats_cuda(zc, tc, yc);
#else
    no_cuda(op);
#endif
  }
  return lm_row_stats_cpu(zc, tc, yc);
}

at::Tensor lm_row_dots(const at::Tensor& z, const at::Tensor& lse, const std::optional<at::Tensor>& zt,
                       const std::optional<at::Tensor>& lse_t, const at::Tensor& labels, const at::Tensor& u) {
  const char* op = "lm_row_dots";
  const at::Tensor zc = checked_logits(op, z);
  const at::Tensor lc = checked_row_vector(op, "lse", lse, zc, true, "");
  const auto [tc, ltc] = checked_target(op, zt, lse_t, zc);
  const at::Tensor yc = checked_labels(op, labels, zc);
  TORCH_CHECK(u.defined(), op, ": u is undefined");
  const at::Tensor uc = checked_like_logits(op, "u", u, zc);
  if (zc.is_cuda()) {
#ifdef WITH_CUDA
    return lm_row_dots_cuda(zc, lc, tc, ltc, yc, uc);
#else
    no_cuda(op);
#endif
  }
  return lm_row_dots_cpu(zc, lc, tc, ltc, yc, uc);
}

at::Tensor lm_logit_grad(const at::Tensor& z, const at::Tensor& lse, const std::optional<at::Tensor>& zt,
                         const std::optional<at::Tensor>& lse_t, const at::Tensor& labels, const at::Tensor& alpha,
                         const at::Tensor& beta, const std::optional<at::Tensor>& u,
                         const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& qu) {
  const char* op = "lm_logit_grad";
  const at::Tensor zc = checked_logits(op, z);
  const at::Tensor lc = checked_row_vector(op, "lse", lse, zc, true, "");
  const auto [tc, ltc] = checked_target(op, zt, lse_t, zc);
  const at::Tensor yc = checked_labels(op, labels, zc);
  const at::Tensor ac = checked_row_vector(op, "alpha", alpha, zc, true, "");
  const at::Tensor bc = checked_row_vector(op, "beta", beta, zc, true, "");
  const at::Tensor uc = checked_like_logits(op, "u", u, zc);
  const at::Tensor wc = uc.defined() ? checked_row_vector(op, "w", w, zc, true, "with u") : at::Tensor();
  const at::Tensor qc = uc.defined() ? checked_row_vector(op, "qu", qu, zc, true, "with u") : at::Tensor();
  if (zc.is_cuda()) {
#ifdef WITH_CUDA
    return lm_logit_grad_cuda(zc, lc, tc, ltc, yc, ac, bc, uc, wc, qc);
#else
    no_cuda(op);
#endif
  }
  return lm_logit_grad_cpu(zc, lc, tc, ltc, yc, ac, bc, uc, wc, qc);
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace megatron_bliss

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace megatron_bliss;
  m.doc() =
      "megatron_bliss C++/CUDA multi-tensor ops and LM loss row kernels; call them through megatron_bliss.ops";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("multi_tensor_dot", &multi_tensor_dot, nogil, py::arg("xs"), py::arg("ys"),
        "Per-tensor dot products <x_k, y_k> as a float64 tensor [n].");
  m.def("multi_tensor_norm", &multi_tensor_norm, nogil, py::arg("xs"), "Per-tensor L2 norms as a float64 tensor [n].");
  m.def("multi_tensor_z_update", &multi_tensor_z_update, nogil, py::arg("hz"), py::arg("g"), py::arg("z"),
        py::arg("mu"), py::arg("eta"), py::arg("clip"),
        "In place: v = hz - g + mu*z, v_k *= clip/||v_k|| where ||v_k|| > clip, z -= eta*v. Returns ||v_k|| "
        "(before clipping) as a float64 tensor [n].");
  m.def("multi_tensor_axpby", &multi_tensor_axpby, nogil, py::arg("out"), py::arg("xs"), py::arg("ys"), py::arg("a"),
        py::arg("b"), "In place: out_k = a*x_k + b*y_k (out_k may be x_k or y_k).");
  m.def("lm_row_stats", &lm_row_stats, nogil, py::arg("z"), py::arg("zt"), py::arg("labels"),
        "Per-row LM statistics [R, 6] (statistics dtype): max z, sum exp(z - max), z[label] (0 outside the shard), "
        "max zt, sum exp(zt - max_t), sum exp(zt - max_t) (zt - z) (the last three 0 when zt is None).");
  m.def("lm_row_dots", &lm_row_dots, nogil, py::arg("z"), py::arg("lse"), py::arg("zt"), py::arg("lse_t"),
        py::arg("labels"), py::arg("u"),
        "Per-row [R, 3]: q.u, p.u (0 when zt is None), u[label] (0 outside the shard); q = exp(z - lse), "
        "p = exp(zt - lse_t).");
  m.def("lm_logit_grad", &lm_logit_grad, nogil, py::arg("z"), py::arg("lse"), py::arg("zt"), py::arg("lse_t"),
        py::arg("labels"), py::arg("alpha"), py::arg("beta"), py::arg("u"), py::arg("w"), py::arg("qu"),
        "alpha (q - e_label) + beta (q - p) + w q (u - qu) [R, V] in the logits' dtype (p term only with zt, "
        "w term only with u).");
  m.def("has_cuda", &has_cuda, "Whether this build has the CUDA kernels.");
}
