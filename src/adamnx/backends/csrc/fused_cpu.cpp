// The fused AdamNX step on the CPU: one pass over memory per tensor, in torch's own thread pool.
//
// Built on first use by adamnx/backends/_build.py (g++ with torch's headers, cached per torch version and source) and
// loaded as the custom op torch.ops.adamnx.fused_step_. The coefficients are NOT computed here: they come from
// adamnx.schedule.coefficients (Python), a value pair per tensor or a table indexed by count, so every path shares one
// implementation of the schedule. This file applies them with adamnx_update, the update written once in C++ (as
// adamnx.update.update is in torch ops), in the same order of operations:
//
//   g  = grad · grad_factor                 (grad_factor = ±1 / GradScaler's scale)
//   θ ← θ + (−ηλ)·θ                         (decoupled weight decay)
//   m ← lerp(m, g, 1 − β1_t)
//   v ← v·β̂2_t + (1 − β̂2_t)·g²
//   θ ← θ + (−η)·m / (√v + ε)
//
// All tensors of one step are seen as one long array of elements: at::parallel_for splits that array evenly
// between the threads once per step (one parallel region, not one per tensor), and each thread walks its share
// tensor by tensor. The inner loops are plain arithmetic over raw pointers, vectorised by the compiler.
//
// With per_coordinate_steps (the late-activation guard, adamnx/guard.py) a tensor also has lags: one (a tensor whose
// coordinates started together), one per row, or one per element. A coordinate's count is the tensor's relative step
// minus its lag, clamped to [0, last row of the table]; its coefficients are that row of the table (rows
// (1 − β1_t, β̂2_t, 1 − β̂2_t) built by adamnx._table.coordinate_table). Lags are written only when a coordinate starts
// (its first non-zero gradient): per element here, per row here (a row that starts in part is reported to the caller,
// which keeps that tensor's lags per element from then on), and for a whole tensor by the caller.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

constexpr int32_t kNotStarted = std::numeric_limits<int32_t>::max();  // adamnx.guard.NOT_STARTED

template <typename T>
struct MathType {
  using type = float;  // float32, bfloat16 and float16 all compute in float32
};
template <>
struct MathType<double> {
  using type = double;
};

// The scalars of one step, rounded once to the math type (as the eager paths round their Python floats).
template <typename M>
struct StepScalars {
  M neg_lr, neg_lr_wd, eps, grad_factor;
};

// The coefficients of one count: 1 − β1_t (and 1 minus it, for lerp's second formula), β̂2_t, 1 − β̂2_t.
template <typename M>
struct Weights {
  M w1, one_minus_w1, b2, w2;
};

template <typename M>
inline Weights<M> weights(M w1, M b2, M w2) {
  return Weights<M>{w1, M(1) - w1, b2, w2};
}

// The update of one element, in registers: the only copy of the formula in this file. kLowWeight picks torch.lerp's
// formula for a weight below 0.5 (each is exact at its own end); the walks hoist that choice out of their loops.
// Every multiply-add is an explicit fused multiply-add and the file is built with -ffp-contract=off: the compiler
// cannot round a walk (vectorised, per element, another element type) differently from another.
template <typename M, bool kLowWeight>
inline void adamnx_update(M& p, M& m, M& v, M g, const Weights<M>& w, const StepScalars<M>& s) {
  p = std::fma(s.neg_lr_wd, p, p);
  m = kLowWeight ? std::fma(w.w1, g - m, m) : std::fma(-(g - m), w.one_minus_w1, g);
  v = std::fma(v, w.b2, w.w2 * (g * g));
  p = std::fma(s.neg_lr, m / (std::sqrt(v) + s.eps), p);
}

// A 32-bit integer hash (murmur3's finaliser): a bijection, so distinct element indices get distinct values.
inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// float32 → bfloat16, rounded up with probability equal to the distance to the value below: 16 random bits
// are added below bf16's last mantissa bit, then truncated (adamnx.update.stochastic_round_to_bf16's rule).
// Params round so when asked (stochastic_rounding); bf16 moments always do: AdamNX's weight 1 − β̂2_t ≈ 1/t makes a
// decrease of v smaller than half a bf16 ulp past t ≈ 256, and round-to-nearest would lose it while a large g²
// still pushes v up (adamnx.update.moments_in_state_dtype).
inline c10::BFloat16 round_stochastic(float x, uint32_t random) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t finite = -static_cast<uint32_t>((bits & 0x7f800000u) != 0x7f800000u);  // inf, NaN: no noise
  bits = (bits + (random & 0xffffu & finite)) & 0xffff0000u;
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

// Elements [begin, end) of one tensor with one set of coefficients: the vectorised loop. kLowWeight picks torch.lerp's
// formula for the whole range (the walks choose it per range, or per element).
// Always inlined into its callers: a call keeps the compiler from knowing the walk's pointers do not alias, and the
// loop then runs unvectorised (4x slower); left to itself, the compiler stops inlining once the file is large.
template <bool kLowWeight, typename P, typename S, typename M, bool kStochastic>
__attribute__((always_inline)) inline void update_loop(P* __restrict__ param, const P* __restrict__ grad, S* __restrict__ exp_avg,
                 S* __restrict__ exp_avg_sq, int64_t begin, int64_t end, const Weights<M> w, const StepScalars<M> s,
                 uint32_t key) {
  constexpr bool kBFloat16State = std::is_same_v<S, c10::BFloat16>;
  for (int64_t i = begin; i < end; ++i) {
    M p = static_cast<M>(param[i]), m = static_cast<M>(exp_avg[i]), v = static_cast<M>(exp_avg_sq[i]);
    adamnx_update<M, kLowWeight>(p, m, v, static_cast<M>(grad[i]) * s.grad_factor, w, s);
    [[maybe_unused]] const uint32_t random = (kStochastic || kBFloat16State) ? mix32(static_cast<uint32_t>(i) ^ key) : 0;
    if constexpr (kStochastic) {
      param[i] = round_stochastic(p, random);
    } else {
      param[i] = static_cast<P>(p);
    }
    if constexpr (kBFloat16State) {  // bf16 moments round stochastically: AdamNX's 1 − β̂2_t ≈ 1/t (see round_moment)
      // m takes the low 16 bits, v the high: one hash serves both unless the param took the low bits (a second one)
      const uint32_t moments_random = kStochastic ? mix32(random ^ 0x9e3779b9u) : random;
      exp_avg[i] = round_stochastic(static_cast<float>(m), moments_random);
      exp_avg_sq[i] = round_stochastic(static_cast<float>(v), moments_random >> 16);
    } else {
      exp_avg[i] = static_cast<S>(m);
      exp_avg_sq[i] = static_cast<S>(v);
    }
  }
}

// One tensor's memory, and what its update needs besides its coefficients.
template <typename P, typename S, typename M, bool kStochastic>
struct Span {
  P* param;
  const P* grad;
  S* exp_avg;
  S* exp_avg_sq;
  StepScalars<M> s;
  uint32_t key;  // stochastic rounding's stream for this tensor: element i draws mix32(i ^ key)

  // Elements [begin, end) with one set of coefficients.
  void update_range(int64_t begin, int64_t end, const Weights<M>& w) const {
    if (w.w1 < M(0.5)) {
      update_loop<true, P, S, M, kStochastic>(param, grad, exp_avg, exp_avg_sq, begin, end, w, s, key);
    } else {
      update_loop<false, P, S, M, kStochastic>(param, grad, exp_avg, exp_avg_sq, begin, end, w, s, key);
    }
  }

  bool starts(int64_t i) const { return static_cast<M>(grad[i]) * s.grad_factor != M(0); }
};

// The coefficient table: rows (1 − β1_t, β̂2_t, 1 − β̂2_t) of last + 1 entries each, row t for count t.
template <typename M>
struct CountTable {
  const M* w1;
  const M* b2;
  const M* w2;
  int64_t last;  // longer counts read the last row (the coefficients no longer change there)

  // The row of a coordinate with this lag at this relative step: its count, clamped into the table.
  int32_t row(int64_t relative_step, int32_t lag) const {
    return static_cast<int32_t>(std::clamp<int64_t>(relative_step - lag, 0, last));
  }
  Weights<M> at(int32_t r) const { return weights(w1[r], b2[r], w2[r]); }
};

// A pending run of consecutive elements that share one row of the count table: the walks below collect such
// elements and update them with one call of the vectorised loop. A run ends where the row changes, and after kRun
// elements, so that what the walk has just read of it (lags, gradient) is still in cache.
template <typename P, typename S, typename M, bool kStochastic>
struct PendingRun {
  static constexpr int64_t kRun = 4096;
  const Span<P, S, M, kStochastic>& span;
  const CountTable<M>& table;
  int64_t begin = 0;
  int32_t row = -1;  // the table row of the run [begin, ...), −1: none

  void flush(int64_t end) {
    if (row >= 0 && end > begin) span.update_range(begin, end, table.at(row));
    row = -1;
  }
  void extend(int64_t at, int32_t table_row) {  // the elements from `at` on take table row `table_row`
    if (table_row != row || at - begin >= kRun) {
      flush(at);
      begin = at;
      row = table_row;
    }
  }
};

// Lags per element. Elements go kBlock at a time: a block whose counts agree (a dense layer whose coordinates started
// together but for a few; rows that never had a gradient) joins a run of the vectorised loop; a block with mixed
// counts gathers a row per element (gathers are several times slower than loads on current x86 CPUs). A coordinate
// that starts (not started, non-zero gradient) gets its lag; a block is written back only then.
template <typename P, typename S, typename M, bool kStochastic>
void update_by_element(const Span<P, S, M, kStochastic>& span, int32_t* __restrict__ lag, int64_t relative_step,
                       int64_t begin, int64_t end, const CountTable<M>& table) {
  constexpr int64_t kBlock = 32;
  const int32_t start = static_cast<int32_t>(relative_step - 1);
  PendingRun<P, S, M, kStochastic> run{span, table};
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    int32_t rows[kBlock];
    const int32_t first = table.row(relative_step, lag[b]);
    int32_t differ = 0, starting = 0;
    for (int64_t j = 0; j < n; ++j) {  // a fixed trip count when n == kBlock: a few vector instructions
      rows[j] = table.row(relative_step, lag[b + j]);
      differ |= rows[j] ^ first;
      starting |= (lag[b + j] == kNotStarted) & span.starts(b + j);
    }
    if (starting != 0) {  // not-started and starting coordinates both read row 0 (t = 1's coefficients)
      for (int64_t j = 0; j < n; ++j) {
        if (lag[b + j] == kNotStarted && span.starts(b + j)) lag[b + j] = start;
      }
    }
    if (differ == 0) {
      run.extend(b, first);
      continue;
    }
    run.flush(b);
    for (int64_t j = 0; j < n; ++j) span.update_range(b + j, b + j + 1, table.at(rows[j]));
  }
  run.flush(end);
}

// Lags per row (rows of `row_length` consecutive elements: an embedding): one lag read per row, not one per element.
// A row that has not started starts as a whole when its gradient is non-zero everywhere; when it is non-zero only in
// part, `broken` tells the caller (which then keeps the tensor's lags per element). The thread that holds a row's
// first element decides, reading the whole row's gradient even past its share; another thread holding the rest of
// the row reads the row's lag while it may be written, but both values it can see (not started, started now) give
// the same coefficients (table rows 0 and 1 are t = 1's), and the accesses are atomic.
template <typename P, typename S, typename M, bool kStochastic>
void update_by_row(const Span<P, S, M, kStochastic>& span, int32_t* row_lags, int64_t row_length,
                   int64_t relative_step, int64_t begin, int64_t end, const CountTable<M>& table, int32_t* broken) {
  const int32_t start = static_cast<int32_t>(relative_step - 1);
  auto lag_of = [&](int64_t r) { return __atomic_load_n(row_lags + r, __ATOMIC_RELAXED); };
  // Consecutive rows with the same coefficients run the vectorised loop together (rows of an embedding are short:
  // a call per row would cost more than the rows' arithmetic).
  PendingRun<P, S, M, kStochastic> run{span, table};
  const int64_t first_row = begin / row_length, end_row = (end + row_length - 1) / row_length;
  // Rows go a stretch of equal lags at a time (in an embedding, long stretches of rows that have not started): one
  // pass over a stretch's gradient tells whether any of it starts. Stretches are no longer than a run, so that its
  // gradient is still in cache when the update reads it.
  const int64_t max_stretch = std::max<int64_t>(1, PendingRun<P, S, M, kStochastic>::kRun / row_length);
  for (int64_t r0 = first_row, r1; r0 < end_row; r0 = r1) {
    const int32_t lag = lag_of(r0);
    const int64_t stretch_end = std::min(end_row, r0 + max_stretch);
    for (r1 = r0 + 1; r1 < stretch_end && lag_of(r1) == lag; ++r1) {
    }
    const int64_t lo = std::max(begin, r0 * row_length), hi = std::min(end, r1 * row_length);
    run.extend(lo, table.row(relative_step, lag));
    if (lag != kNotStarted) continue;
    // Rows that have not started: those whose first element this thread holds may start now.
    const int64_t owned_lo = std::max(r0, (begin + row_length - 1) / row_length);
    int32_t any = 0;  // an integer, not a bool: the compiler vectorises an integer OR
    for (int64_t i = std::max(lo, owned_lo * row_length); i < r1 * row_length; ++i) any |= span.starts(i);
    if (any == 0) continue;
    for (int64_t r = owned_lo; r < r1; ++r) {
      int64_t nonzero = 0;
      for (int64_t i = r * row_length; i < (r + 1) * row_length; ++i) nonzero += span.starts(i);
      if (nonzero == row_length) {
        __atomic_store_n(row_lags + r, start, __ATOMIC_RELAXED);
      } else if (nonzero != 0) {  // starts in part: its coordinates' lags differ
        __atomic_store_n(broken, 1, __ATOMIC_RELAXED);
      }
    }
  }
  run.flush(end);
}

// Whether p, g, m, v each cover one dense block of memory with the same layout, so that walking the blocks
// in memory order visits corresponding elements (contiguous, channels_last, any dense permutation).
bool same_dense_layout(const Tensor& p, const Tensor& g, const Tensor& m, const Tensor& v) {
  if (!p.is_non_overlapping_and_dense()) return false;
  for (const Tensor* t : {&g, &m, &v}) {
    if (t->sizes() != p.sizes() || t->strides() != p.strides() || t->device() != p.device()) return false;
  }
  return true;
}

enum class Layout { kNone, kTensor, kRow, kElement };

// A tensor's lag layout (adamnx.guard): none (no guard), one lag (0-d), per row ((R, 1, ..., 1), rows that are blocks
// of memory), per element (the param's sizes and strides). kNone for lags the kernel cannot walk.
Layout layout_of(const Tensor& p, const Tensor& lag, bool guarded) {
  if (!guarded) return Layout::kNone;
  if (lag.scalar_type() != at::kInt || !lag.device().is_cpu()) return Layout::kNone;
  if (lag.dim() == 0) return Layout::kTensor;
  if (lag.sizes() == p.sizes() && lag.strides() == p.strides()) return Layout::kElement;
  // Rows are walked as runs of consecutive elements: the first dimension must be the outermost in memory (a
  // contiguous param, channels_last too), so that each row is one block.
  const bool outermost = p.size(0) <= 1 || p.stride(0) * p.size(0) == p.numel();
  const bool rows = lag.dim() == p.dim() && p.dim() >= 2 && lag.size(0) == p.size(0) && lag.numel() == p.size(0) &&
                    lag.is_contiguous() && p.is_non_overlapping_and_dense() && outermost;
  return rows ? Layout::kRow : Layout::kNone;
}

// Everything one step needs besides the element types.
struct Step {
  const std::vector<Tensor>& params;
  const std::vector<Tensor>& grads;
  const std::vector<Tensor>& exp_avgs;
  const std::vector<Tensor>& exp_avg_sqs;
  const std::vector<Tensor>& lags;  // per_coordinate_steps: one lag tensor per param, or empty
  std::vector<int64_t> index;       // the tensors this kernel updates (see fused_step_)
  std::vector<Layout> layouts;      // ... and their lag layouts
  const double* w1s;                // 1 − β1_t, one per tensor (or one for all), from adamnx.schedule.coefficients
  const double* w2s;                // 1 − β̂2_t, likewise
  int64_t w_stride;                 // 1: a value per tensor; 0: one value shared by all tensors
  const int64_t* relative_steps;    // per_coordinate_steps: each tensor's step as its lags see it
  const Tensor& table;              // ... and the coefficient table (3, L) in the math dtype
  int32_t* broken;                  // ... and per tensor, set to 1 where a row started in part
  double lr, weight_decay, eps, grad_factor;
  int64_t seed;  // stochastic rounding's random stream for this step
};

template <typename P, typename S, bool kStochastic>
void run_step(const Step& step) {
  using M = typename MathType<std::conditional_t<std::is_same_v<S, double>, double, P>>::type;
  const StepScalars<M> scalars{static_cast<M>(-step.lr), static_cast<M>(-step.lr * step.weight_decay),
                               static_cast<M>(step.eps), static_cast<M>(step.grad_factor)};
  const int64_t n = static_cast<int64_t>(step.index.size());
  std::vector<int64_t> offsets(n + 1, 0);  // where each tensor starts in the step's virtual array
  std::vector<Weights<M>> own(n);          // each tensor's coefficients when it has no lags
  std::vector<uint32_t> keys(n);
  const auto seed = static_cast<uint64_t>(step.seed);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = step.index[k];
    offsets[k + 1] = offsets[k] + step.params[i].numel();
    const int64_t j = i * step.w_stride;
    // β̂2_t = 1 − w2 is formed in float64 from the stable w2, then rounded once (as the eager paths do)
    own[k] = weights(static_cast<M>(step.w1s[j]), static_cast<M>(1.0 - step.w2s[j]), static_cast<M>(step.w2s[j]));
    // a key per (step, tensor); element j then draws mix32(j ^ key): distinct j, distinct draws
    keys[k] = mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) + uint32_t(i)));
  }
  CountTable<M> table{};
  if (step.table.numel() > 0) {
    const M* rows = step.table.const_data_ptr<M>();
    const int64_t length = step.table.size(1);
    table = CountTable<M>{rows, rows + length, rows + 2 * length, length - 1};
  }
  constexpr int64_t kGrain = 16384;  // elements: a step smaller than this runs on one thread
  at::parallel_for(0, offsets[n], kGrain, [&](int64_t begin, int64_t end) {
    int64_t k = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; k < n && offsets[k] < end; ++k) {
      const int64_t i = step.index[k];
      const int64_t lo = std::max(begin, offsets[k]) - offsets[k];
      const int64_t hi = std::min(end, offsets[k + 1]) - offsets[k];
      const Span<P, S, M, kStochastic> span{step.params[i].data_ptr<P>(),   step.grads[i].const_data_ptr<P>(),
                                            step.exp_avgs[i].data_ptr<S>(), step.exp_avg_sqs[i].data_ptr<S>(),
                                            scalars,                        keys[k]};
      switch (step.layouts[k]) {
        case Layout::kNone:
          span.update_range(lo, hi, own[k]);
          break;
        case Layout::kTensor: {
          const int32_t lag = *step.lags[i].const_data_ptr<int32_t>();
          span.update_range(lo, hi, table.at(table.row(step.relative_steps[i], lag)));
          break;
        }
        case Layout::kRow:
          update_by_row(span, step.lags[i].data_ptr<int32_t>(), step.params[i].numel() / step.lags[i].numel(),
                        step.relative_steps[i], lo, hi, table, step.broken + i);
          break;
        case Layout::kElement:
          update_by_element(span, step.lags[i].data_ptr<int32_t>(), step.relative_steps[i], lo, hi, table);
          break;
      }
    }
  });
}

// The kernel for one (param type, state type): state either matches the params or is float32 (wider state
// for low-precision params). Returns false for combinations without a kernel.
template <typename P>
bool run_for_param_type(at::ScalarType state_type, bool stochastic, const Step& step) {
  constexpr bool kBFloat16 = std::is_same_v<P, c10::BFloat16>;
  constexpr bool kLowPrecision = kBFloat16 || std::is_same_v<P, c10::Half>;
  const bool same_state = state_type == c10::CppTypeToScalarType<P>::value;
  const bool float_state = kLowPrecision && state_type == at::kFloat;
  // float32 params with bf16 moments (state_dtype=torch.bfloat16): half the state's bytes
  const bool bfloat16_state = std::is_same_v<P, float> && state_type == at::kBFloat16;
  if (stochastic) {  // only bfloat16 params round stochastically (the optimizer enforces it)
    if constexpr (kBFloat16) {
      if (same_state) run_step<P, P, true>(step);
      if (float_state) run_step<P, float, true>(step);
      return same_state || float_state;
    }
    return false;
  }
  if (same_state) run_step<P, P, false>(step);
  if constexpr (kLowPrecision) {
    if (float_state) run_step<P, float, false>(step);
  }
  if constexpr (std::is_same_v<P, float>) {
    if (bfloat16_state) run_step<P, c10::BFloat16, false>(step);
  }
  return same_state || float_state || bfloat16_state;
}

// One AdamNX step over CPU tensors whose params share a dtype. Returns the indices of the tensors it did NOT update
// (memory layouts it cannot walk in one pass, lags it cannot read, dtype combinations without a kernel), which the
// caller updates otherwise; sets broken[i] = 1 for a tensor with lags per row of which a row started in part.
std::vector<int64_t> fused_step_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                                 const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                                 const std::vector<Tensor>& lags, const Tensor& w1s, const Tensor& w2s,
                                 const Tensor& relative_steps, const Tensor& table, const Tensor& broken, double lr,
                                 double weight_decay, double eps, double grad_factor, bool stochastic_rounding,
                                 int64_t seed) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(exp_avgs.size()) == n &&
                  static_cast<int64_t>(exp_avg_sqs.size()) == n,
              "adamnx fused_step_: the four tensor lists must have the same length");
  for (const Tensor* w : {&w1s, &w2s}) {
    TORCH_CHECK(w->scalar_type() == at::kDouble && w->is_contiguous() && w->device().is_cpu() &&
                    w->numel() == w1s.numel() && (w->numel() == n || w->numel() == 1),
                "adamnx fused_step_: coefficients must be contiguous float64 CPU tensors, with one value per "
                "tensor or one for all");
  }
  const bool guarded = !lags.empty();
  TORCH_CHECK(!guarded || static_cast<int64_t>(lags.size()) == n,
              "adamnx fused_step_: lags must be empty or one tensor per param");
  TORCH_CHECK(!guarded || (relative_steps.scalar_type() == at::kLong && relative_steps.is_contiguous() &&
                           relative_steps.device().is_cpu() && relative_steps.numel() == n),
              "adamnx fused_step_: with lags, relative_steps must be a contiguous int64 CPU tensor, one per param");
  TORCH_CHECK(!guarded || (broken.scalar_type() == at::kInt && broken.is_contiguous() && broken.device().is_cpu() &&
                           broken.numel() == n),
              "adamnx fused_step_: with lags, broken must be a contiguous int32 CPU tensor, one per param");
  std::vector<int64_t> rejected;
  if (n == 0) return rejected;
  const at::ScalarType param_type = params[0].scalar_type(), state_type = exp_avgs[0].scalar_type();
  if (guarded) {
    // The table holds the coefficients in the math dtype: float64 only for float64 params or state.
    const bool wide = param_type == at::kDouble || state_type == at::kDouble;
    TORCH_CHECK(table.dim() == 2 && table.size(0) == 3 && table.size(1) > 0 && table.is_contiguous() &&
                    table.device().is_cpu() && table.scalar_type() == (wide ? at::kDouble : at::kFloat),
                "adamnx fused_step_: the count table must be a contiguous (3, L) CPU tensor in the math dtype");
  }
  Step step{params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            lags,
            {},
            {},
            w1s.const_data_ptr<double>(),
            w2s.const_data_ptr<double>(),
            w1s.numel() == n ? 1 : 0,
            guarded ? relative_steps.const_data_ptr<int64_t>() : nullptr,
            table,
            guarded ? broken.data_ptr<int32_t>() : nullptr,
            lr,
            weight_decay,
            eps,
            grad_factor,
            seed};
  step.index.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const Layout layout = layout_of(p, guarded ? lags[i] : p, guarded);
    const bool ok = p.device().is_cpu() && p.scalar_type() == param_type && g.scalar_type() == param_type &&
                    m.scalar_type() == state_type && v.scalar_type() == state_type && same_dense_layout(p, g, m, v) &&
                    (!guarded || layout != Layout::kNone);
    if (ok) {
      step.index.push_back(i);
      step.layouts.push_back(layout);
    } else {
      rejected.push_back(i);
    }
  }
  bool handled = false;
  switch (param_type) {
    case at::kFloat:
      handled = run_for_param_type<float>(state_type, stochastic_rounding, step);
      break;
    case at::kDouble:
      handled = run_for_param_type<double>(state_type, stochastic_rounding, step);
      break;
    case at::kBFloat16:
      handled = run_for_param_type<c10::BFloat16>(state_type, stochastic_rounding, step);
      break;
    case at::kHalf:
      handled = run_for_param_type<c10::Half>(state_type, stochastic_rounding, step);
      break;
    default:
      break;
  }
  if (!handled) {
    rejected.insert(rejected.end(), step.index.begin(), step.index.end());
    std::sort(rejected.begin(), rejected.end());
  }
  return rejected;
}

// ---- 8-bit moments (adamnx/quantized.py: the format, and the same rules in torch ops) ----
//
// m and v are one-byte codes with one float32 scale per block of kQuantBlock elements: m = scale·sign(q)·(|q|/127)⁴
// (int8), v = scale·(c/255)⁴ (uint8). A block is decoded, updated (adamnx_update, in float32), its new scales taken
// (the largest magnitudes), and encoded again, each element rounded stochastically to one of its two neighbouring
// codes with the probabilities that keep the stored value unbiased (AdamNX's 1 − β̂2_t ≈ 1/t would stall v under
// round-to-nearest), but a non-zero v is never stored as 0 (the update would divide by ε). A block with an inf or
// NaN moment gets a NaN scale; a block whose largest is subnormal is stored as zeros. Threads split the step's
// blocks: a block is never shared.
constexpr int64_t kQuantBlock = 256;

// The bits of |x| as an unsigned integer: ordered as the magnitudes are (inf, then NaN, above every finite value),
// so that a block's largest magnitude is an integer max, which the compiler vectorises (a float max it would not,
// without -ffast-math).
inline uint32_t magnitude_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits & 0x7fffffffu;
}

inline float from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// The magnitude a code q ≥ 0 of `levels` stands for, relative to its block's scale: (q/levels)⁴.
inline float code_value(float q, float unit) {
  float r = q * unit;
  r = r * r;
  return r * r;
}

// The low code of x ≥ 0 relative to its block's scale (r = x / scale in [0, 1]): floor(r^(1/4)·levels), at most
// levels − 1, with IEEE square roots (adamnx.quantized.quantize's formula; torch's float32 sqrt is now and then an
// ulp off, which moves quantize's steps by an ulp or two). Both encoders find this code; this is what defines it.
inline float low_code(float r, float levels) {
  return std::min(std::floor(std::sqrt(std::sqrt(r)) * levels), levels - 1.0f);
}

// The code of r in [0, 1] with `levels`: its low code, rounded up with probability (r − low value)/(gap) from 16
// random bits (adamnx.quantized.quantize's rule). The scalar encoder (the tail of a block, and builds without AVX2).
inline float encode_stochastic(float r, float levels, uint32_t random16) {
  const float low = low_code(r, levels);
  const float unit = 1.0f / levels;  // a constant: no division per element
  const float lo = code_value(low, unit), hi = code_value(low + 1.0f, unit);
  // up with probability (r − lo)/(hi − lo): random16/2^16 < that, without a division
  return static_cast<float>(static_cast<int32_t>(random16)) * (hi - lo) < (r - lo) * 65536.0f ? low + 1.0f : low;
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 code_value8(__m256 q, __m256 unit) {  // code_value, eight at a time (the same three multiplies)
  __m256 r = _mm256_mul_ps(q, unit);
  r = _mm256_mul_ps(r, r);
  return _mm256_mul_ps(r, r);
}

// encode_stochastic for eight r at once, with the same codes (random16: the 16 random bits as floats). Four exact
// square roots per element were most of the encoding; here the low code comes without them:
// - rsqrt(rsqrt(r)) estimates r^(1/4) (the instruction's relative error is at most 1.5·2^-12, so the estimate's is
//   under 2^-10.8; r = 0 gives rsqrt(inf) = 0); lowered by 2^-9, its code `guess` is the low code or the one below.
// - Which of the two: r ≥ the value of code guess + 1. low_code's steps (where a chain of rounded roots crosses an
//   integer) lie within 7 ulps of the code values, on either side, not on them (checked for every float in [0, 1]);
//   an r within kAmbiguous ulps of that value takes low_code itself (rare: the window is 33 ulps wide).
// Any estimate within 2^-9.1 gives the same codes: no instruction set changes a result.
constexpr int32_t kAmbiguous = 16;

inline __m256 encode_stochastic8(__m256 r, float levels, __m256 random16) {
  const __m256 one = _mm256_set1_ps(1.0f), unit = _mm256_set1_ps(1.0f / levels);
  const __m256 root = _mm256_rsqrt_ps(_mm256_rsqrt_ps(r));
  const __m256 guess = _mm256_floor_ps(_mm256_mul_ps(root, _mm256_set1_ps(levels * (1.0f - 0x1p-9f))));
  const __m256 next = code_value8(_mm256_add_ps(guess, one), unit);
  const __m256 below_top = _mm256_cmp_ps(guess, _mm256_set1_ps(levels - 1.0f), _CMP_LT_OQ);  // else low = the top
  const __m256 up = _mm256_and_ps(_mm256_cmp_ps(r, next, _CMP_GE_OQ), below_top);
  __m256 low = _mm256_add_ps(guess, _mm256_and_ps(up, one));
  // r and next are ≥ 0: their distance in ulps is the difference of their bits
  const __m256i distance = _mm256_abs_epi32(_mm256_sub_epi32(_mm256_castps_si256(r), _mm256_castps_si256(next)));
  const __m256 ambiguous = _mm256_andnot_ps(
      _mm256_castsi256_ps(_mm256_cmpgt_epi32(distance, _mm256_set1_epi32(kAmbiguous))), below_top);
  if (_mm256_movemask_ps(ambiguous) != 0) {
    alignas(32) float rs[8], lows[8];
    _mm256_store_ps(rs, r);
    for (int k = 0; k < 8; ++k) lows[k] = low_code(rs[k], levels);
    low = _mm256_load_ps(lows);
  }
  const __m256 lo = code_value8(low, unit), hi = code_value8(_mm256_add_ps(low, one), unit);
  // up with probability (r − lo)/(hi − lo), as encode_stochastic
  const __m256 round_up = _mm256_cmp_ps(_mm256_mul_ps(random16, _mm256_sub_ps(hi, lo)),
                                        _mm256_mul_ps(_mm256_sub_ps(r, lo), _mm256_set1_ps(65536.0f)), _CMP_LT_OQ);
  return _mm256_add_ps(low, _mm256_and_ps(round_up, one));
}

inline __m256i mix32_8(__m256i h) {  // mix32, eight at a time
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int32_t>(0x85ebca6bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int32_t>(0xc2b2ae35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// Elements [j, j + 8) of a block: m and v (the block's values) as codes, with the scalar loop's random bits.
inline void encode8(const float* m, const float* v, int8_t* m_codes, uint8_t* v_codes, __m256 m_inverse,
                    __m256 v_inverse, uint32_t index, uint32_t key) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i random = mix32_8(_mm256_xor_si256(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(index)),
                                                                    lanes),
                                                   _mm256_set1_epi32(static_cast<int32_t>(key))));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 mj = _mm256_loadu_ps(m), vj = _mm256_loadu_ps(v);
  const __m256 rm = _mm256_min_ps(_mm256_mul_ps(_mm256_andnot_ps(sign, mj), m_inverse), one);
  const __m256 rv = _mm256_min_ps(_mm256_mul_ps(vj, v_inverse), one);
  const __m256 qm = encode_stochastic8(rm, 127.0f, _mm256_cvtepi32_ps(_mm256_and_si256(random, _mm256_set1_epi32(0xffff))));
  const __m256 qv = _mm256_max_ps(encode_stochastic8(rv, 255.0f, _mm256_cvtepi32_ps(_mm256_srli_epi32(random, 16))),
                                  _mm256_and_ps(_mm256_cmp_ps(rv, _mm256_setzero_ps(), _CMP_GT_OQ), one));
  // m's code takes m's sign (copysign); the codes fit their bytes, so the saturating packs only narrow
  const __m256i m32 = _mm256_cvttps_epi32(_mm256_or_ps(qm, _mm256_and_ps(mj, sign)));
  const __m256i v32 = _mm256_cvttps_epi32(qv);
  const __m128i m16 = _mm_packs_epi32(_mm256_castsi256_si128(m32), _mm256_extracti128_si256(m32, 1));
  const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v32), _mm256_extracti128_si256(v32, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(m_codes), _mm_packs_epi16(m16, m16));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(v_codes), _mm_packus_epi16(v16, v16));
}
#endif

template <typename P, bool kStochastic, bool kLowWeight>
void update_8bit_block(P* __restrict__ param, const P* __restrict__ grad, int8_t* __restrict__ m_codes,
                       uint8_t* __restrict__ v_codes, float* m_scale, float* v_scale, int64_t begin, int64_t n,
                       const Weights<float>& w, const StepScalars<float>& s, uint32_t key) {
  float m[kQuantBlock], v[kQuantBlock];
  const float m_block = *m_scale, v_block = *v_scale;
  for (int64_t j = 0; j < n; ++j) {  // decode (as adamnx.quantized.dequantize: relative value, then the scale), update
    const int64_t i = begin + j;
    const float q = static_cast<float>(static_cast<int32_t>(m_codes[i]));
    const float c = static_cast<float>(static_cast<int32_t>(v_codes[i]));
    float p = static_cast<float>(param[i]);
    float mj = std::copysign(code_value(std::fabs(q), 1.0f / 127.0f), q) * m_block;
    float vj = code_value(c, 1.0f / 255.0f) * v_block;
    adamnx_update<float, kLowWeight>(p, mj, vj, static_cast<float>(grad[i]) * s.grad_factor, w, s);
    if constexpr (kStochastic) {
      param[i] = round_stochastic(p, mix32(mix32(static_cast<uint32_t>(i) ^ key) ^ 0x9e3779b9u));
    } else {
      param[i] = static_cast<P>(p);
    }
    m[j] = mj;
    v[j] = vj;
  }
  uint32_t m_max = 0, v_max = 0;  // the new scales, as magnitude bits
  for (int64_t j = 0; j < n; ++j) {
    m_max = std::max(m_max, magnitude_bits(m[j]));
    v_max = std::max(v_max, magnitude_bits(v[j]));
  }
  // A moment's block holding inf or NaN: a NaN scale and codes 0 (the block of that moment reads as NaN), as
  // adamnx.quantized.quantize stores it; the other moment is stored as usual.
  constexpr uint32_t kNonFinite = 0x7f800000u;
  const bool m_finite = m_max < kNonFinite, v_finite = v_max < kNonFinite;
  const float m_largest = m_finite ? from_bits(m_max) : 0.0f, v_largest = v_finite ? from_bits(v_max) : 0.0f;
  // a non-finite block's values are encoded as zeros: codes 0, never a conversion of NaN to an integer
  if (!m_finite) std::fill(m, m + n, 0.0f);
  if (!v_finite) std::fill(v, v + n, 0.0f);
  // blocks of zeros, and blocks whose largest is subnormal (1/scale would overflow): codes 0
  constexpr float kSmallestNormal = std::numeric_limits<float>::min();
  const float m_inverse = m_largest >= kSmallestNormal ? 1.0f / m_largest : 0.0f;
  const float v_inverse = v_largest >= kSmallestNormal ? 1.0f / v_largest : 0.0f;
  int64_t j = 0;  // encode, rounding stochastically: eight at a time, then the rest
#if defined(__AVX2__) && defined(__FMA__)
  for (; j + 8 <= n; j += 8) {
    encode8(m + j, v + j, m_codes + begin + j, v_codes + begin + j, _mm256_set1_ps(m_inverse),
            _mm256_set1_ps(v_inverse), static_cast<uint32_t>(begin + j), key);
  }
#endif
  for (; j < n; ++j) {
    const uint32_t random = mix32(static_cast<uint32_t>(begin + j) ^ key);
    const float rm = std::min(std::fabs(m[j]) * m_inverse, 1.0f), rv = std::min(v[j] * v_inverse, 1.0f);
    const float qm = encode_stochastic(rm, 127.0f, random & 0xffffu);
    const float qv = std::max(encode_stochastic(rv, 255.0f, random >> 16), rv > 0.0f ? 1.0f : 0.0f);  // never 0
    m_codes[begin + j] = static_cast<int8_t>(static_cast<int32_t>(std::copysign(qm, m[j])));
    v_codes[begin + j] = static_cast<uint8_t>(static_cast<int32_t>(qv));
  }
  *m_scale = m_finite ? m_largest : std::numeric_limits<float>::quiet_NaN();
  *v_scale = v_finite ? v_largest : std::numeric_limits<float>::quiet_NaN();
}

struct Step8bit {
  const std::vector<Tensor>& params;
  const std::vector<Tensor>& grads;
  const std::vector<Tensor>& exp_avgs;
  const std::vector<Tensor>& exp_avg_sqs;
  const std::vector<Tensor>& m_scales;
  const std::vector<Tensor>& v_scales;
  std::vector<int64_t> index;
  const double* w1s;  // 1 − β1_t per tensor
  const double* w2s;  // 1 − β̂2_t per tensor
  double lr, weight_decay, eps, grad_factor;
  int64_t seed;
};

template <typename P, bool kStochastic>
void run_step_8bit(const Step8bit& step) {
  const StepScalars<float> scalars{static_cast<float>(-step.lr), static_cast<float>(-step.lr * step.weight_decay),
                                   static_cast<float>(step.eps), static_cast<float>(step.grad_factor)};
  const int64_t n = static_cast<int64_t>(step.index.size());
  std::vector<int64_t> offsets(n + 1, 0);  // where each tensor's blocks start among the step's blocks
  std::vector<Weights<float>> own(n);
  std::vector<uint32_t> keys(n);
  const auto seed = static_cast<uint64_t>(step.seed);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = step.index[k];
    offsets[k + 1] = offsets[k] + (step.params[i].numel() + kQuantBlock - 1) / kQuantBlock;
    own[k] = weights(static_cast<float>(step.w1s[i]), static_cast<float>(1.0 - step.w2s[i]),
                     static_cast<float>(step.w2s[i]));
    keys[k] = mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) + uint32_t(i)));
  }
  constexpr int64_t kGrainBlocks = 64;
  at::parallel_for(0, offsets[n], kGrainBlocks, [&](int64_t begin, int64_t end) {
    int64_t k = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; k < n && offsets[k] < end; ++k) {
      const int64_t i = step.index[k], numel = step.params[i].numel();
      P* param = step.params[i].data_ptr<P>();
      const P* grad = step.grads[i].const_data_ptr<P>();
      auto* m_codes = step.exp_avgs[i].data_ptr<int8_t>();
      auto* v_codes = step.exp_avg_sqs[i].data_ptr<uint8_t>();
      float* m_scales = step.m_scales[i].data_ptr<float>();
      float* v_scales = step.v_scales[i].data_ptr<float>();
      const int64_t lo = std::max(begin, offsets[k]) - offsets[k], hi = std::min(end, offsets[k + 1]) - offsets[k];
      for (int64_t b = lo; b < hi; ++b) {
        const int64_t first = b * kQuantBlock, count = std::min(kQuantBlock, numel - first);
        if (own[k].w1 < 0.5f) {
          update_8bit_block<P, kStochastic, true>(param, grad, m_codes, v_codes, m_scales + b, v_scales + b, first,
                                                  count, own[k], scalars, keys[k]);
        } else {
          update_8bit_block<P, kStochastic, false>(param, grad, m_codes, v_codes, m_scales + b, v_scales + b, first,
                                                   count, own[k], scalars, keys[k]);
        }
      }
    }
  });
}

// One step of params (float32, or bfloat16 with or without stochastic rounding) with 8-bit moments. Returns the
// indices of the tensors it did NOT update (memory it cannot walk, other dtypes), which the caller updates otherwise.
std::vector<int64_t> fused_step_8bit_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                                      const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                                      const std::vector<Tensor>& m_scales, const std::vector<Tensor>& v_scales,
                                      const Tensor& w1s, const Tensor& w2s, double lr, double weight_decay,
                                      double eps, double grad_factor, bool stochastic_rounding, int64_t seed) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(exp_avgs.size()) == n &&
                  static_cast<int64_t>(exp_avg_sqs.size()) == n && static_cast<int64_t>(m_scales.size()) == n &&
                  static_cast<int64_t>(v_scales.size()) == n,
              "adamnx fused_step_8bit_: the six tensor lists must have the same length");
  for (const Tensor* w : {&w1s, &w2s}) {
    TORCH_CHECK(w->scalar_type() == at::kDouble && w->is_contiguous() && w->device().is_cpu() && w->numel() == n,
                "adamnx fused_step_8bit_: coefficients must be contiguous float64 CPU tensors, one value per tensor");
  }
  std::vector<int64_t> rejected;
  if (n == 0) return rejected;
  const at::ScalarType param_type = params[0].scalar_type();
  Step8bit step{params, grads, exp_avgs, exp_avg_sqs, m_scales, v_scales, {}, w1s.const_data_ptr<double>(),
                w2s.const_data_ptr<double>(), lr, weight_decay, eps, grad_factor, seed};
  for (int64_t i = 0; i < n; ++i) {
    const Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const int64_t blocks = (p.numel() + kQuantBlock - 1) / kQuantBlock;
    bool ok = p.device().is_cpu() && p.scalar_type() == param_type && g.scalar_type() == param_type &&
              p.is_contiguous() && g.is_contiguous() && g.numel() == p.numel() && m.scalar_type() == at::kChar &&
              v.scalar_type() == at::kByte && m.is_contiguous() && v.is_contiguous() && m.numel() == p.numel() &&
              v.numel() == p.numel();
    for (const Tensor* scale : {&m_scales[i], &v_scales[i]}) {
      ok = ok && scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->device().is_cpu() &&
           scale->numel() == blocks;
    }
    (ok ? step.index : rejected).push_back(i);
  }
  bool handled = true;
  if (param_type == at::kFloat && !stochastic_rounding) {
    run_step_8bit<float, false>(step);
  } else if (param_type == at::kBFloat16) {
    if (stochastic_rounding) {
      run_step_8bit<c10::BFloat16, true>(step);
    } else {
      run_step_8bit<c10::BFloat16, false>(step);
    }
  } else {
    handled = false;
  }
  if (!handled) {
    rejected.insert(rejected.end(), step.index.begin(), step.index.end());
    std::sort(rejected.begin(), rejected.end());
  }
  return rejected;
}

// The encoders alone, for the tests: x (float32, |x| ≤ 1: relative to a block scale of 1) as codes written to out
// (float32, the kernel's rules: m's signed, v's never 0 for a non-zero x) with 16 random bits each (noise: int32 in
// [0, 2^16)), by the vector encoder (eight at a time, where built with AVX2) or the scalar one.
void encode_8bit_(const Tensor& x, const Tensor& noise, bool is_signed, bool vectorised, const Tensor& out) {
  for (const Tensor* t : {&x, &noise, &out}) {
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu() && t->numel() == x.numel(),
                "adamnx encode_8bit_: contiguous CPU tensors of one size");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat && noise.scalar_type() == at::kInt && out.scalar_type() == at::kFloat,
              "adamnx encode_8bit_: x and out float32, noise int32");
  const float* r = x.const_data_ptr<float>();
  const int32_t* random = noise.const_data_ptr<int32_t>();
  float* q = out.mutable_data_ptr<float>();
  const float levels = is_signed ? 127.0f : 255.0f;
  const int64_t n = x.numel();
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; vectorised && j + 8 <= n; j += 8) {
    const __m256 xj = _mm256_loadu_ps(r + j), sign = _mm256_set1_ps(-0.0f);
    const __m256 rj = _mm256_min_ps(_mm256_andnot_ps(sign, xj), _mm256_set1_ps(1.0f));
    const __m256 code = encode_stochastic8(
        rj, levels,
        _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(random + j))));
    const __m256 nonzero = _mm256_and_ps(_mm256_cmp_ps(rj, _mm256_setzero_ps(), _CMP_GT_OQ), _mm256_set1_ps(1.0f));
    _mm256_storeu_ps(q + j, is_signed ? _mm256_or_ps(code, _mm256_and_ps(xj, sign)) : _mm256_max_ps(code, nonzero));
  }
#endif
  for (; j < n; ++j) {
    const float rj = std::min(std::fabs(r[j]), 1.0f);
    const float code = encode_stochastic(rj, levels, static_cast<uint32_t>(random[j]));
    q[j] = is_signed ? std::copysign(code, r[j]) : std::max(code, rj > 0.0f ? 1.0f : 0.0f);
  }
}

// Advance every 0-d step counter by `increment` and write the new counts to `out` (float64, one per counter): one
// call instead of a torch op per counter (a model has hundreds of tensors, each with its own counter).
void advance_steps_(const std::vector<Tensor>& steps, double increment, const Tensor& out) {
  const int64_t n = static_cast<int64_t>(steps.size());
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() && out.numel() == n && out.device().is_cpu(),
              "adamnx advance_steps_: out must be a contiguous float64 CPU tensor with one value per step");
  for (const Tensor& s : steps) {  // all checked before any counter moves
    TORCH_CHECK(s.numel() == 1 && s.device().is_cpu() && (s.scalar_type() == at::kDouble || s.scalar_type() == at::kFloat),
                "adamnx advance_steps_: steps must be 1-element float32 or float64 CPU tensors");
  }
  double* values = out.mutable_data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& s = steps[i];
    if (s.scalar_type() == at::kDouble) {
      values[i] = (*s.mutable_data_ptr<double>() += increment);
    } else {
      values[i] = (*s.mutable_data_ptr<float>() += static_cast<float>(increment));
    }
  }
}

}  // namespace

TORCH_LIBRARY(adamnx, m) {
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] lags, Tensor w1s, Tensor w2s, Tensor relative_steps, Tensor table, Tensor(e!) broken, "
      "float lr, float weight_decay, float eps, float grad_factor, bool stochastic_rounding, int seed) -> int[]");
  m.def(
      "fused_step_8bit_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] exp_avg_absmax, Tensor(e!)[] exp_avg_sq_absmax, Tensor w1s, Tensor w2s, float lr, "
      "float weight_decay, float eps, float grad_factor, bool stochastic_rounding, int seed) -> int[]");
  m.def("encode_8bit_(Tensor x, Tensor noise, bool is_signed, bool vectorised, Tensor(a!) out) -> ()");
  m.def("advance_steps_(Tensor(a!)[] steps, float increment, Tensor(b!) out) -> ()");
}

TORCH_LIBRARY_IMPL(adamnx, CPU, m) {
  m.impl("fused_step_", &fused_step_);
  m.impl("fused_step_8bit_", &fused_step_8bit_);
  m.impl("encode_8bit_", &encode_8bit_);
  m.impl("advance_steps_", &advance_steps_);
}
