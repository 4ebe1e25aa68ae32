// CPU kernels of the fused LM loss rows: rows are spread over at::parallel_for threads; each row is read at most
// twice (a max pass, then one pass for the sums; a row of 50K float32 stays in cache between them).
//
// The inner loops are plain loops that the compiler vectorizes: several independent accumulators per loop, and an
// exp written out in arithmetic (the C library's exp is a scalar call). On x86-64 Linux with GCC each row loop is
// compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time (target_clones), so the build needs no
// -march flag and runs on any x86-64 CPU. Sums are blocked (partial sums of kBlockSteps steps per accumulator, then
// added up), which keeps the float32 rounding error of a 50K-term row sum near that of a pairwise sum.
#include "lm_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MB_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MB_ISA_CLONES
#endif

#if defined(__GNUC__)
#define MB_INLINE inline __attribute__((always_inline))
#else
#define MB_INLINE inline
#endif

namespace megatron_bliss {
namespace {

// Statistics type: double for double logits, float for float and the 16-bit types.
template <typename scalar_t>
using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Independent accumulators per loop: one AVX-512 register of the statistics type.
template <typename A>
constexpr int kLanes = 64 / static_cast<int>(sizeof(A));
constexpr int64_t kBlockSteps = 64;      // loop steps summed into a block partial before it joins the total
constexpr int64_t kGrainElements = 1 << 15;  // elements of work per parallel_for grain

// The bits of one value reread as another type of the same size (a float and its IEEE-754 pattern).
template <typename To, typename From>
MB_INLINE To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of one size");
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

// exp(x) in float, branch-free: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite, ln2 split in two), a degree-7 Taylor
// polynomial for exp(r) (truncation error below 1e-8 relative), and 2^n added to the exponent bits. Within about
// 1 ulp of the correctly rounded result; exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN; results below 1.6e-38
// (x < -87) are returned as 0 rather than as subnormals.
MB_INLINE float exp_acc(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 9 significant bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kShift = 12582912.0f;   // 1.5 * 2^23: adding it rounds to an integer kept in the low bits
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.8f ? 88.8f : xc;
  const float t = xc * kLog2e + kShift;
  const float n = t - kShift;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // n is in [-126, 128]; p in [0.7, 1.42]: the sum of exponents stays normal, or becomes inf for an overflow
  const float e = bit_cast<float>(bit_cast<uint32_t>(p) +
                                 ((bit_cast<uint32_t>(t) - bit_cast<uint32_t>(kShift)) << 23));
  const float res = x < -87.0f ? 0.0f : e;
  return x != x ? x : res;
}

// exp(x) in double, the same scheme with a degree-13 polynomial (truncation error below 1e-17 relative); results
// below 3.3e-308 (x < -708) are returned as 0.
MB_INLINE double exp_acc(double x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // trailing zero bits: n * kLn2Hi is exact
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kShift = 6755399441055744.0;          // 1.5 * 2^52
  double xc = x < -708.0 ? -708.0 : x;
  xc = xc > 709.9 ? 709.9 : xc;
  const double t = xc * kLog2e + kShift;
  const double n = t - kShift;
  double r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  constexpr double c[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                          1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,      1.0 / 720.0,
                          1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,         0.5,
                          1.0,                1.0};
  double p = c[0];
  for (int k = 1; k < 14; ++k) p = p * r + c[k];
  const double e = bit_cast<double>(bit_cast<uint64_t>(p) +
                                  ((bit_cast<uint64_t>(t) - bit_cast<uint64_t>(kShift)) << 52));
  const double res = x < -708.0 ? 0.0 : e;
  return x != x ? x : res;
}

template <typename A>
MB_INLINE A sum_lanes(const A (&acc)[kLanes<A>]) {
  A s = 0;
  for (int j = 0; j < kLanes<A>; ++j) s += acc[j];
  return s;
}

#if defined(__GNUC__)
// A 64-byte vector of E (GCC/Clang vector extension; one AVX-512 register, two AVX2 or four SSE ones).
template <typename E>
struct Vec64 {
  typedef E type __attribute__((vector_size(64)));
};

// v = x[0, 64 / sizeof(A)) converted to A (v a Vec64 of A). Element-wise inserts into a vector are not vectorized by GCC,
// hence whole-vector loads, and the bfloat16 conversion (the high half of a float) written as a vector shift.
// (An output argument rather than a return value: a 64-byte vector return would warn of an ABI change.)
template <typename A, typename T, typename vec_t>
MB_INLINE void load_vec(const T* x, vec_t& v) {
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(&v, x, sizeof v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    typedef uint16_t half_bits_t __attribute__((vector_size(32)));
    typedef uint32_t bits_t __attribute__((vector_size(64)));
    half_bits_t h;
    std::memcpy(&h, x, sizeof h);
    const bits_t b = __builtin_convertvector(h, bits_t) << 16;
    std::memcpy(&v, &b, sizeof v);
  } else {
    A buf[sizeof(vec_t) / sizeof(A)];
    for (size_t j = 0; j < sizeof(vec_t) / sizeof(A); ++j) buf[j] = static_cast<A>(x[j]);
    std::memcpy(&v, buf, sizeof v);
  }
}
#endif

// Max of x[0, n) in A; a NaN anywhere makes it NaN (as torch.amax does). NaNs are flagged apart from the max so
// that the loop stays a plain vector max; with GCC/Clang the lanes are a vector-extension type (written as an
// array, the compiler keeps the conditional max in scalar code).
template <typename A, typename T>
MB_INLINE A row_max(const T* x, int64_t n) {
  using flag_t = std::conditional_t<sizeof(A) == 8, int64_t, int32_t>;
  constexpr int L = kLanes<A>;
#if defined(__GNUC__)
  using vec_t = typename Vec64<A>::type;
  using flags_t = typename Vec64<flag_t>::type;
  vec_t m = vec_t{} - std::numeric_limits<A>::infinity();
  flags_t nan = {};
#else
  A m[L];
  flag_t nan[L] = {};
  for (int j = 0; j < L; ++j) m[j] = -std::numeric_limits<A>::infinity();
#endif
  int64_t i = 0;
  for (; i + L <= n; i += L) {
#if defined(__GNUC__)
    vec_t v;
    load_vec<A>(x + i, v);
    m = m < v ? v : m;
    nan |= v != v;
#else
    for (int j = 0; j < L; ++j) {
      const A v = static_cast<A>(x[i + j]);
      m[j] = m[j] < v ? v : m[j];
      nan[j] |= static_cast<flag_t>(v != v);
    }
#endif
  }
  A r = -std::numeric_limits<A>::infinity();
  bool any_nan = false;
  for (int j = 0; j < L; ++j) {
    r = r < m[j] ? m[j] : r;
    any_nan = any_nan || nan[j] != 0;
  }
  for (; i < n; ++i) {
    const A v = static_cast<A>(x[i]);
    r = r < v ? v : r;
    any_nan = any_nan || v != v;
  }
  return any_nan ? std::numeric_limits<A>::quiet_NaN() : r;
}

// K blocked sums over i in [0, n): term(i, t) writes the K terms of element i into t.
template <int K, typename A, typename Term>
MB_INLINE void blocked_sums(int64_t n, const Term& term, A (&result)[K]) {
  constexpr int L = kLanes<A>;
  A total[K][L] = {};
  const int64_t full = n - n % L;
  int64_t i = 0;
  while (i < full) {
    const int64_t block_end = std::min(full, i + kBlockSteps * L);
    A part[K][L] = {};
    for (; i < block_end; i += L) {
      for (int j = 0; j < L; ++j) {
        A t[K];
        term(i + j, t);
        for (int k = 0; k < K; ++k) part[k][j] += t[k];
      }
    }
    for (int k = 0; k < K; ++k) {
      for (int j = 0; j < L; ++j) total[k][j] += part[k][j];
    }
  }
  for (int k = 0; k < K; ++k) result[k] = sum_lanes<A>(total[k]);
  for (; i < n; ++i) {
    A t[K];
    term(i, t);
    for (int k = 0; k < K; ++k) result[k] += t[k];
  }
}

MB_INLINE bool in_shard(int64_t label, int64_t v) { return label >= 0 && label < v; }

// ----------------------------------------------------------------------------------------------------- row bodies
template <typename T, typename A = stat_t<T>>
MB_INLINE void stats_rows_impl(const T* z, const T* zt, const int64_t* labels, int64_t v, int64_t r0, int64_t r1,
                               A* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* zr = z + r * v;
    A* o = out + r * 6;
    const A m = row_max<A>(zr, v);
    A s[1];
    blocked_sums<1, A>(v, [&](int64_t i, A(&t)[1]) { t[0] = exp_acc(static_cast<A>(zr[i]) - m); }, s);
    o[0] = m;
    o[1] = s[0];
    o[2] = in_shard(labels[r], v) ? static_cast<A>(zr[labels[r]]) : A(0);
    if (zt == nullptr) {
      o[3] = o[4] = o[5] = A(0);
      continue;
    }
    const T* tr = zt + r * v;
    const A mt = row_max<A>(tr, v);
    A st[2];
    blocked_sums<2, A>(v, [&](int64_t i, A(&t)[2]) {
      const A ta = static_cast<A>(tr[i]);
      const A e = exp_acc(ta - mt);
      t[0] = e;
      t[1] = e * (ta - static_cast<A>(zr[i]));
    }, st);
    o[3] = mt;
    o[4] = st[0];
    o[5] = st[1];
  }
}

template <typename T, typename A = stat_t<T>>
MB_INLINE void dots_rows_impl(const T* z, const A* lse, const T* zt, const A* lse_t, const int64_t* labels,
                              const T* u, int64_t v, int64_t r0, int64_t r1, A* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* zr = z + r * v;
    const T* ur = u + r * v;
    A* o = out + r * 3;
    const A l = lse[r];
    if (zt == nullptr) {
      A d[1];
      blocked_sums<1, A>(v, [&](int64_t i, A(&t)[1]) {
        t[0] = exp_acc(static_cast<A>(zr[i]) - l) * static_cast<A>(ur[i]);
      }, d);
      o[0] = d[0];
      o[1] = A(0);
    } else {
      const T* tr = zt + r * v;
      const A lt = lse_t[r];
      A d[2];
      blocked_sums<2, A>(v, [&](int64_t i, A(&t)[2]) {
        const A ua = static_cast<A>(ur[i]);
        t[0] = exp_acc(static_cast<A>(zr[i]) - l) * ua;
        t[1] = exp_acc(static_cast<A>(tr[i]) - lt) * ua;
      }, d);
      o[0] = d[0];
      o[1] = d[1];
    }
    o[2] = in_shard(labels[r], v) ? static_cast<A>(ur[labels[r]]) : A(0);
  }
}

// The pointers of one lm_logit_grad call; zt/lse_t and u/w/qu are null when absent.
template <typename T, typename A = stat_t<T>>
struct GradArgs {
  const T* z;
  const A* lse;
  const T* zt;
  const A* lse_t;
  const int64_t* labels;
  const A* alpha;
  const A* beta;
  const T* u;
  const A* w;
  const A* qu;
  T* out;
  int64_t v;
};

// One output element in the order of the reference: ((alpha + beta) q [- alpha at the label]) - beta p
// + (w q) (u - qu).
template <bool kTarget, bool kDir, typename A>
MB_INLINE A grad_value(A q, A ab, A label_alpha, A beta, A p, A w, A u, A qu) {
  A o = ab * q - label_alpha;
  if constexpr (kTarget) o = o - beta * p;
  if constexpr (kDir) o = o + (w * q) * (u - qu);
  return o;
}

template <bool kTarget, bool kDir, typename T, typename A = stat_t<T>>
MB_INLINE void grad_rows_impl(const GradArgs<T>& g, int64_t r0, int64_t r1) {
  const int64_t v = g.v;
  for (int64_t r = r0; r < r1; ++r) {
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
    for (int64_t i = 0; i < v; ++i) {
      const A q = exp_acc(static_cast<A>(zr[i]) - l);
      const A p = kTarget ? exp_acc(static_cast<A>(tr[i]) - lt) : A(0);
      const A ua = kDir ? static_cast<A>(ur[i]) : A(0);
      o[i] = static_cast<T>(grad_value<kTarget, kDir>(q, ab, A(0), beta, p, w, ua, qu));
    }
    const int64_t y = g.labels[r];
    if (in_shard(y, v)) {  // the label element again, with -alpha where the reference subtracts it
      const A q = exp_acc(static_cast<A>(zr[y]) - l);
      const A p = kTarget ? exp_acc(static_cast<A>(tr[y]) - lt) : A(0);
      const A ua = kDir ? static_cast<A>(ur[y]) : A(0);
      o[y] = static_cast<T>(grad_value<kTarget, kDir>(q, ab, alpha, beta, p, w, ua, qu));
    }
  }
}

// Row loops, one overload per logits type, each compiled for several instruction sets (MB_ISA_CLONES).
#define MB_DEFINE_ROW_LOOPS(T)                                                                                     \
  MB_ISA_CLONES void stats_rows(const T* z, const T* zt, const int64_t* labels, int64_t v, int64_t r0, int64_t r1, \
                                stat_t<T>* out) {                                                                  \
    stats_rows_impl<T>(z, zt, labels, v, r0, r1, out);                                                             \
  }                                                                                                                \
  MB_ISA_CLONES void dots_rows(const T* z, const stat_t<T>* lse, const T* zt, const stat_t<T>* lse_t,              \
                               const int64_t* labels, const T* u, int64_t v, int64_t r0, int64_t r1,               \
                               stat_t<T>* out) {                                                                   \
    dots_rows_impl<T>(z, lse, zt, lse_t, labels, u, v, r0, r1, out);                                               \
  }                                                                                                                \
  MB_ISA_CLONES void grad_rows(const GradArgs<T>& g, int64_t r0, int64_t r1) {                                     \
    if (g.zt != nullptr) {                                                                                         \
      if (g.u != nullptr) grad_rows_impl<true, true, T>(g, r0, r1);                                                \
      else grad_rows_impl<true, false, T>(g, r0, r1);                                                              \
    } else {                                                                                                       \
      if (g.u != nullptr) grad_rows_impl<false, true, T>(g, r0, r1);                                               \
      else grad_rows_impl<false, false, T>(g, r0, r1);                                                             \
    }                                                                                                              \
  }

MB_DEFINE_ROW_LOOPS(float)
MB_DEFINE_ROW_LOOPS(double)
MB_DEFINE_ROW_LOOPS(c10::BFloat16)
MB_DEFINE_ROW_LOOPS(c10::Half)
#undef MB_DEFINE_ROW_LOOPS

int64_t row_grain(int64_t v) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(v, 1)); }

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

at::Tensor lm_row_stats_cpu(const at::Tensor& z, const at::Tensor& zt, const at::Tensor& labels) {
  const int64_t rows = z.size(0), v = z.size(1);
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({rows, 6}, z.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lm_row_stats_cpu", [&] {
    using A = stat_t<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* tp = ptr_or_null<scalar_t>(zt);
    const int64_t* lp = labels.const_data_ptr<int64_t>();
    A* op = out.mutable_data_ptr<A>();
    at::parallel_for(0, rows, row_grain(v), [&](int64_t r0, int64_t r1) { stats_rows(zp, tp, lp, v, r0, r1, op); });
  });
  return out;
}

at::Tensor lm_row_dots_cpu(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& zt, const at::Tensor& lse_t,
                           const at::Tensor& labels, const at::Tensor& u) {
  const int64_t rows = z.size(0), v = z.size(1);
  at::Tensor out = at::empty({rows, 3}, lse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lm_row_dots_cpu", [&] {
    using A = stat_t<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* tp = ptr_or_null<scalar_t>(zt);
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const A* lp = lse.const_data_ptr<A>();
    const A* ltp = ptr_or_null<A>(lse_t);
    const int64_t* yp = labels.const_data_ptr<int64_t>();
    A* op = out.mutable_data_ptr<A>();
    at::parallel_for(0, rows, row_grain(v),
                     [&](int64_t r0, int64_t r1) { dots_rows(zp, lp, tp, ltp, yp, up, v, r0, r1, op); });
  });
  return out;
}

at::Tensor lm_logit_grad_cpu(const at::Tensor& z, const at::Tensor& lse, const at::Tensor& zt,
                             const at::Tensor& lse_t, const at::Tensor& labels, const at::Tensor& alpha,
                             const at::Tensor& beta, const at::Tensor& u, const at::Tensor& w, const at::Tensor& qu) {
  const int64_t rows = z.size(0), v = z.size(1);
  at::Tensor out = at::empty({rows, v}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lm_logit_grad_cpu", [&] {
    using A = stat_t<scalar_t>;
    const GradArgs<scalar_t> g{z.const_data_ptr<scalar_t>(), lse.const_data_ptr<A>(), ptr_or_null<scalar_t>(zt),
                               ptr_or_null<A>(lse_t), labels.const_data_ptr<int64_t>(), alpha.const_data_ptr<A>(),
                               beta.const_data_ptr<A>(), ptr_or_null<scalar_t>(u), ptr_or_null<A>(w),
                               ptr_or_null<A>(qu), out.mutable_data_ptr<scalar_t>(), v};
    at::parallel_for(0, rows, row_grain(v), [&](int64_t r0, int64_t r1) { grad_rows(g, r0, r1); });
  });
  return out;
}

}  // namespace megatron_bliss
