// The fused AdamNX step on the CPU: one pass over memory per tensor, in torch's own thread pool.
//
// Built on first use by adamnx/_cpu_extension.py (g++ with torch's headers, cached per torch version and
// source) and loaded as the custom ops torch.ops.adamnx.*. The coefficients are NOT computed here: they
// come from adamnx.schedule.coefficients (Python), one value pair per tensor, so every path shares one
// implementation of the schedule. This file only applies them, in the for-loop path's order of operations:
//
//   g  = grad · grad_factor                 (grad_factor = ±1 / GradScaler's scale)
//   θ ← θ + (−ηλ)·θ                         (decoupled weight decay)
//   m ← lerp(m, g, 1 − β1_t)
//   v ← v·β̂2_t + (1 − β̂2_t)·g²
//   θ ← θ + (−η)·m / (√v + ε)
//
// All tensors of one step are seen as one long array of elements: at::parallel_for splits that array evenly
// between the threads once per step (one parallel region, not one per tensor), and each thread walks its
// share tensor by tensor. The inner loop is plain arithmetic over raw pointers, vectorised by the compiler.
//
// With per_coordinate_steps, every element also carries an int32 count (its steps since its first non-zero
// gradient), and its coefficients are gathered from a table of rows (1 − β1_t, β̂2_t, 1 − β̂2_t) indexed by count,
// built by adamnx._tensors.coordinate_table from the same coefficients: no exp/expm1 per element here either.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

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
// are added below bf16's last mantissa bit, then truncated (adamnx.functional.stochastic_round_to_bf16's rule).
inline c10::BFloat16 round_stochastic(float x, uint32_t random) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits = (bits + (random & 0xffffu)) & 0xffff0000u;
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

template <typename P, typename M, bool kStochastic>
inline P store_param(M p, int64_t i, uint32_t key) {
  if constexpr (kStochastic) {
    return round_stochastic(p, mix32(static_cast<uint32_t>(i) ^ key));
  } else {
    return static_cast<P>(p);
  }
}

template <typename P, typename S, typename M, bool kStochastic>
void update_range(P* __restrict__ param, const P* __restrict__ grad, S* __restrict__ exp_avg,
                  S* __restrict__ exp_avg_sq, int64_t begin, int64_t end, M w1, M beta2_hat, M w2,
                  const StepScalars<M>& s, uint32_t key) {
  const M neg_lr = s.neg_lr, neg_lr_wd = s.neg_lr_wd, eps = s.eps, grad_factor = s.grad_factor;
  // torch.lerp's two formulas (the weight decides which is exact at its end): the branch is per tensor.
  if (w1 < M(0.5)) {
    for (int64_t i = begin; i < end; ++i) {
      const M g = static_cast<M>(grad[i]) * grad_factor;
      M p = static_cast<M>(param[i]);
      p = p + neg_lr_wd * p;
      const M m_old = static_cast<M>(exp_avg[i]);
      const M m = m_old + w1 * (g - m_old);
      const M v = static_cast<M>(exp_avg_sq[i]) * beta2_hat + w2 * (g * g);
      p = p + neg_lr * (m / (std::sqrt(v) + eps));
      param[i] = store_param<P, M, kStochastic>(p, i, key);
      exp_avg[i] = static_cast<S>(m);
      exp_avg_sq[i] = static_cast<S>(v);
    }
  } else {
    const M one_minus_w1 = M(1) - w1;
    for (int64_t i = begin; i < end; ++i) {
      const M g = static_cast<M>(grad[i]) * grad_factor;
      M p = static_cast<M>(param[i]);
      p = p + neg_lr_wd * p;
      const M m_old = static_cast<M>(exp_avg[i]);
      const M m = g - (g - m_old) * one_minus_w1;
      const M v = static_cast<M>(exp_avg_sq[i]) * beta2_hat + w2 * (g * g);
      p = p + neg_lr * (m / (std::sqrt(v) + eps));
      param[i] = store_param<P, M, kStochastic>(p, i, key);
      exp_avg[i] = static_cast<S>(m);
      exp_avg_sq[i] = static_cast<S>(v);
    }
  }
}

// Write `value` to out[0, n) with streaming stores where the CPU has them: counts that are only written (a tensor
// on its step, an embedding's started rows) then cost their 4 bytes of writes, without the read of each line that
// an ordinary store first makes (that read alone was about a tenth of the step's memory traffic). Streaming stores
// are weakly ordered: each thread calls streaming_fence once it is done.
inline void fill_counts(int32_t* out, int64_t n, int32_t value) {
#if defined(__AVX2__)
  int64_t i = 0;
  for (; i < n && reinterpret_cast<uintptr_t>(out + i) % 32 != 0; ++i) out[i] = value;
  const __m256i values = _mm256_set1_epi32(value);
  for (; i + 8 <= n; i += 8) _mm256_stream_si256(reinterpret_cast<__m256i*>(out + i), values);
  for (; i < n; ++i) out[i] = value;
#else
  std::fill(out, out + n, value);
#endif
}

inline void streaming_fence() {
#if defined(__AVX2__)
  _mm_sfence();
#endif
}

// The per-coordinate table: rows (1 − β1_t, β̂2_t, 1 − β̂2_t) of `length` entries each, row t for count t.
template <typename M>
struct CountTable {
  const M* w1;
  const M* b2;
  const M* w2;
  int64_t last;  // length − 1: longer counts read the last row (the coefficients no longer change there)
};

// A pending run of consecutive elements that share one row of the count table: the walks below collect such
// elements and update them with one call of update_range's vectorised loop. A run ends where the row changes, and
// after kRun elements, so that what the walk has just read of it (counts, gradient) is still in cache.
template <typename P, typename S, typename M, bool kStochastic>
struct PendingRun {
  static constexpr int64_t kRun = 4096;
  P* param;
  const P* grad;
  S* exp_avg;
  S* exp_avg_sq;
  const CountTable<M>& table;
  const StepScalars<M>& s;
  uint32_t key;
  int64_t begin = 0;
  int32_t row = -1;  // the table row of the run [begin, ...), −1: none

  void flush(int64_t end) {
    if (row >= 0 && end > begin) {
      update_range<P, S, M, kStochastic>(param, grad, exp_avg, exp_avg_sq, begin, end, table.w1[row], table.b2[row],
                                         table.w2[row], s, key);
    }
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

// update_range with per-coordinate counts: count ← count + 1 once a coordinate has had a non-zero gradient (0
// before; saturating at 2^31 − 1), then the coefficients of that count.
//
// Elements go kBlock at a time. When a block's new counts agree (a dense layer whose coordinates all started at
// step 1; an embedding row; rows that never had a gradient), its coefficients are one table row, and consecutive
// such blocks with the same row run update_range's vectorised loop together (up to kRun elements, still in cache
// from the count pass). Only blocks with mixed counts gather a row per element (gathers are several times slower
// than loads on current x86 CPUs); torch.lerp's formula is then chosen per element.
template <typename P, typename S, typename M, bool kStochastic>
void update_range_per_coordinate(P* __restrict__ param, const P* __restrict__ grad, S* __restrict__ exp_avg,
                                 S* __restrict__ exp_avg_sq, int32_t* __restrict__ count, int64_t begin, int64_t end,
                                 const CountTable<M>& table, const StepScalars<M>& s, uint32_t key) {
  constexpr int64_t kBlock = 32;
  constexpr int32_t kMax = std::numeric_limits<int32_t>::max();
  const M neg_lr = s.neg_lr, neg_lr_wd = s.neg_lr_wd, eps = s.eps, grad_factor = s.grad_factor;
  const int32_t last = static_cast<int32_t>(table.last);
  PendingRun<P, S, M, kStochastic> run{param, grad, exp_avg, exp_avg_sq, table, s, key};  // of agreeing blocks
  auto advance = [&](int32_t c, int64_t i) -> int32_t {  // started ? c + 1 (saturating) : 0
    const int32_t started = (c != 0) | (static_cast<M>(grad[i]) * grad_factor != M(0));
    return (c + (c != kMax)) & -started;
  };
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    int32_t next[kBlock];
    const int32_t first = advance(count[b], b);
    int32_t changed = 0, differ = 0;
    if (n == kBlock) {  // a fixed trip count: unrolled into a few vector instructions
      for (int64_t j = 0; j < kBlock; ++j) {
        const int32_t c = count[b + j];
        next[j] = advance(c, b + j);
        changed |= next[j] ^ c;
        differ |= next[j] ^ first;
      }
      if (changed != 0) {  // rows that never had a gradient stay 0: their counts are only read
        for (int64_t j = 0; j < kBlock; ++j) count[b + j] = next[j];
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const int32_t c = count[b + j];
        next[j] = advance(c, b + j);
        changed |= next[j] ^ c;
        differ |= next[j] ^ first;
      }
      for (int64_t j = 0; j < n; ++j) count[b + j] = next[j];
    }
    if (differ == 0) {
      run.extend(b, std::min(std::max(first, 0), last));
      continue;
    }
    run.flush(b);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = b + j;
      const int32_t k = std::min(std::max(next[j], 0), last);
      const M w1 = table.w1[k], beta2_hat = table.b2[k], w2 = table.w2[k];
      const M g = static_cast<M>(grad[i]) * grad_factor;
      M p = static_cast<M>(param[i]);
      p = p + neg_lr_wd * p;
      const M m_old = static_cast<M>(exp_avg[i]);
      const M m = w1 < M(0.5) ? m_old + w1 * (g - m_old) : g - (g - m_old) * (M(1) - w1);
      const M v = static_cast<M>(exp_avg_sq[i]) * beta2_hat + w2 * (g * g);
      p = p + neg_lr * (m / (std::sqrt(v) + eps));
      param[i] = store_param<P, M, kStochastic>(p, i, key);
      exp_avg[i] = static_cast<S>(m);
      exp_avg_sq[i] = static_cast<S>(v);
    }
  }
  run.flush(end);
}

// update_range_per_coordinate for counts known to be constant along each row of `row_length` elements (an
// embedding), given each row's count before the step (`rows_before`): one count read per row, not one per element.
// A row that has started advances as a whole; one that has not starts as a whole when its gradient is non-zero
// everywhere. A row whose gradient is zero only in part, or a part of a row (the thread split cuts at most one
// row per thread) that starts, goes element by element, and `broken` tells the caller that the counts may no
// longer be constant along rows. The row's count after the step goes to `rows_after`, written by the thread that
// holds the row's first element (the only writer). Same coefficients, same bits as element by element.
template <typename P, typename S, typename M, bool kStochastic>
void update_range_by_row(P* __restrict__ param, const P* __restrict__ grad, S* __restrict__ exp_avg,
                         S* __restrict__ exp_avg_sq, int32_t* __restrict__ count, const int32_t* rows_before,
                         int32_t* rows_after, int64_t row_length, int64_t begin, int64_t end,
                         const CountTable<M>& table, const StepScalars<M>& s, uint32_t key, int32_t* broken) {
  constexpr int32_t kMax = std::numeric_limits<int32_t>::max();
  const int32_t last = static_cast<int32_t>(table.last);
  // Consecutive rows with the same coefficients run update_range together (rows of an embedding are short: a call
  // per row would cost more than the rows' arithmetic).
  PendingRun<P, S, M, kStochastic> run{param, grad, exp_avg, exp_avg_sq, table, s, key};
  const int64_t first_row = begin / row_length, end_row = (end + row_length - 1) / row_length;
  auto owned = [&](int64_t r) { return r * row_length >= begin; };  // the thread holding a row's first element
  // Rows go a stretch of equal counts at a time (in an embedding, long stretches of rows that have not started):
  // one pass over the stretch's gradient tells whether any of it starts. Stretches are no longer than a run, so
  // that gradient is still in cache when update_range reads it.
  const int64_t max_stretch = std::max<int64_t>(1, PendingRun<P, S, M, kStochastic>::kRun / row_length);
  for (int64_t r0 = first_row, r1; r0 < end_row; r0 = r1) {
    const int32_t before = rows_before[r0];
    const int64_t stretch_end = std::min(end_row, r0 + max_stretch);
    for (r1 = r0 + 1; r1 < stretch_end && rows_before[r1] == before; ++r1) {
    }
    const int64_t lo = std::max(begin, r0 * row_length), hi = std::min(end, r1 * row_length);
    if (before != 0) {  // started: the stretch advances as a whole (saturating)
      const int32_t after = before + (before != kMax);
      run.extend(lo, std::min(std::max(after, 0), last));
      fill_counts(count + lo, hi - lo, after);
      for (int64_t r = r0; r < r1; ++r) {
        if (owned(r)) rows_after[r] = after;
      }
      continue;
    }
    int32_t any = 0;  // an integer, not a bool: the compiler vectorises an integer OR
    for (int64_t i = lo; i < hi; ++i) any |= static_cast<M>(grad[i]) * s.grad_factor != M(0);
    if (any == 0) {  // none starts: counts stay 0 (only read)
      run.extend(lo, 0);
      for (int64_t r = r0; r < r1; ++r) {
        if (owned(r)) rows_after[r] = 0;
      }
      continue;
    }
    for (int64_t r = r0; r < r1; ++r) {  // some rows start: row by row
      const int64_t row_lo = std::max(begin, r * row_length), row_hi = std::min(end, (r + 1) * row_length);
      int64_t nonzero = 0;
      for (int64_t i = row_lo; i < row_hi; ++i) nonzero += static_cast<M>(grad[i]) * s.grad_factor != M(0);
      if (nonzero != 0 && nonzero != row_length) {  // in part, or a part of a row: element by element
        run.flush(row_lo);
        update_range_per_coordinate<P, S, M, kStochastic>(param, grad, exp_avg, exp_avg_sq, count, row_lo, row_hi,
                                                          table, s, key);
        __atomic_store_n(broken, 1, __ATOMIC_RELAXED);
        continue;
      }
      const int32_t after = nonzero != 0;  // a whole row starts, or stays 0
      run.extend(row_lo, std::min(after, last));
      if (after) std::fill(count + row_lo, count + row_hi, after);
      if (owned(r)) rows_after[r] = after;
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

// Whether a param's counts are int32 and walk in step with it (same sizes and strides).
bool same_counts_layout(const Tensor& p, const Tensor& counts) {
  return counts.scalar_type() == at::kInt && counts.device() == p.device() && counts.sizes() == p.sizes() &&
         counts.strides() == p.strides();
}

// Everything one step needs besides the element types.
struct Step {
  const std::vector<Tensor>& params;
  const std::vector<Tensor>& grads;
  const std::vector<Tensor>& exp_avgs;
  const std::vector<Tensor>& exp_avg_sqs;
  std::vector<int64_t> index;  // the tensors this kernel updates (see fused_step_)
  const double* w1s;           // 1 − β1_t, one per tensor (or one for all), from adamnx.schedule.coefficients
  const double* w2s;           // 1 − β̂2_t, likewise
  int64_t w_stride;            // 1: a value per tensor; 0: one value shared by all tensors
  double lr, weight_decay, eps, grad_factor;
  int64_t seed;                           // stochastic rounding's random stream for this step
  const std::vector<Tensor>& counts;      // per_coordinate_steps: int32 counts shaped like the params, or empty
  const Tensor& table;                    // ... and their coefficient table (3, L) in the math dtype
  const int64_t* fill;                    // ... and per tensor, -1 or the count every coordinate has after the
                                          // step (all on the tensor's step: its coefficients, counts only written)
  const std::vector<Tensor>& rows;        // ... and per tensor, empty or (2, R) int32: the counts of its R rows
                                          // before the step (read) and after it (written), counts constant by row
  int32_t* rows_broken;                   // ... and per tensor, set to 1 where a row's counts stopped being equal
};

template <typename P, typename S, bool kStochastic>
void run_step(const Step& step) {
  using M = typename MathType<std::conditional_t<std::is_same_v<S, double>, double, P>>::type;
  const StepScalars<M> scalars{static_cast<M>(-step.lr), static_cast<M>(-step.lr * step.weight_decay),
                               static_cast<M>(step.eps), static_cast<M>(step.grad_factor)};
  const int64_t n = static_cast<int64_t>(step.index.size());
  std::vector<int64_t> offsets(n + 1, 0);  // where each tensor starts in the step's virtual array
  std::vector<M> w1(n), b2(n), w2(n);
  std::vector<uint32_t> keys(n);
  const auto seed = static_cast<uint64_t>(step.seed);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = step.index[k];
    offsets[k + 1] = offsets[k] + step.params[i].numel();
    const int64_t j = i * step.w_stride;
    w1[k] = static_cast<M>(step.w1s[j]);
    // β̂2_t = 1 − w2 is formed in float64 from the stable w2, then rounded once (as the eager paths do)
    b2[k] = static_cast<M>(1.0 - step.w2s[j]);
    w2[k] = static_cast<M>(step.w2s[j]);
    // a key per (step, tensor); element j then draws mix32(j ^ key): distinct j, distinct draws
    keys[k] = mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) + uint32_t(i)));
  }
  const bool per_coordinate = !step.counts.empty();
  CountTable<M> table{};
  if (per_coordinate) {
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
      P* param = step.params[i].data_ptr<P>();
      const P* grad = step.grads[i].const_data_ptr<P>();
      S* exp_avg = step.exp_avgs[i].data_ptr<S>();
      S* exp_avg_sq = step.exp_avg_sqs[i].data_ptr<S>();
      const bool on_step = per_coordinate && step.fill != nullptr && step.fill[i] >= 0;
      const bool by_row = per_coordinate && !step.rows.empty() && step.rows[i].numel() > 0;
      if (by_row) {
        const Tensor& rows = step.rows[i];
        int32_t* before = rows.data_ptr<int32_t>();
        update_range_by_row<P, S, M, kStochastic>(param, grad, exp_avg, exp_avg_sq,
                                                  step.counts[i].data_ptr<int32_t>(), before, before + rows.size(1),
                                                  step.params[i].numel() / rows.size(1), lo, hi, table, scalars,
                                                  keys[k], step.rows_broken + i);
      } else if (per_coordinate && !on_step) {
        update_range_per_coordinate<P, S, M, kStochastic>(param, grad, exp_avg, exp_avg_sq,
                                                          step.counts[i].data_ptr<int32_t>(), lo, hi, table,
                                                          scalars, keys[k]);
      } else {
        update_range<P, S, M, kStochastic>(param, grad, exp_avg, exp_avg_sq, lo, hi, w1[k], b2[k], w2[k], scalars,
                                           keys[k]);
        if (on_step) {  // written, never read: a quarter of the traffic of reading and writing them
          int32_t* count = step.counts[i].data_ptr<int32_t>();
          fill_counts(count + lo, hi - lo, static_cast<int32_t>(step.fill[i]));
        }
      }
    }
    streaming_fence();  // this thread's streaming stores, visible before the step returns
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
  return same_state || float_state;
}

// One AdamNX step over CPU tensors whose params share a dtype. Returns the indices of the tensors it did NOT
// update (memory layouts it cannot walk in one pass, or dtype combinations without a kernel), which the caller
// updates with the eager implementation of the same math.
std::vector<int64_t> fused_step_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                                 const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                                 const std::vector<Tensor>& counts, const Tensor& w1s, const Tensor& w2s,
                                 const Tensor& table, const Tensor& fill, const std::vector<Tensor>& rows,
                                 const Tensor& rows_broken, double lr, double weight_decay, double eps,
                                 double grad_factor, bool stochastic_rounding, int64_t seed) {
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
  const bool per_coordinate = !counts.empty();
  TORCH_CHECK(!per_coordinate || static_cast<int64_t>(counts.size()) == n,
              "adamnx fused_step_: counts must be empty or one tensor per param");
  TORCH_CHECK(fill.numel() == 0 || (per_coordinate && fill.scalar_type() == at::kLong && fill.is_contiguous() &&
                                     fill.device().is_cpu() && fill.numel() == n),
              "adamnx fused_step_: fill must be empty or, with counts, a contiguous int64 CPU tensor with one value "
              "per tensor");
  const int64_t* fill_values = fill.numel() ? fill.const_data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; fill_values != nullptr && i < n; ++i) {
    TORCH_CHECK(fill_values[i] >= -1 && fill_values[i] <= std::numeric_limits<int32_t>::max(),
                "adamnx fused_step_: fill values must be -1 or int32 counts");
  }
  TORCH_CHECK(rows.empty() || (per_coordinate && static_cast<int64_t>(rows.size()) == n &&
                                rows_broken.scalar_type() == at::kInt && rows_broken.is_contiguous() &&
                                rows_broken.device().is_cpu() && rows_broken.numel() == n),
              "adamnx fused_step_: rows must be empty or, with counts, one tensor per param, and rows_broken a "
              "contiguous int32 CPU tensor with one value per param");
  for (int64_t i = 0; i < static_cast<int64_t>(rows.size()); ++i) {
    const Tensor& r = rows[i];
    if (r.numel() == 0) continue;
    // Rows are runs of consecutive elements: the param and its counts must be contiguous.
    TORCH_CHECK(r.scalar_type() == at::kInt && r.is_contiguous() && r.device().is_cpu() && r.dim() == 2 &&
                    r.size(0) == 2 && params[i].numel() % r.size(1) == 0 && params[i].is_contiguous() &&
                    counts[i].is_contiguous() && (fill_values == nullptr || fill_values[i] == -1),
                "adamnx fused_step_: a tensor's rows must be a contiguous (2, R) int32 CPU tensor, R dividing the "
                "numel of a contiguous param with contiguous counts, and its fill -1");
  }
  std::vector<int64_t> rejected;
  if (n == 0) return rejected;
  const at::ScalarType param_type = params[0].scalar_type(), state_type = exp_avgs[0].scalar_type();
  if (per_coordinate) {
    // The table holds the coefficients in the math dtype: float64 only for float64 params or state.
    const bool wide = param_type == at::kDouble || state_type == at::kDouble;
    TORCH_CHECK(table.dim() == 2 && table.size(0) == 3 && table.size(1) > 0 && table.is_contiguous() &&
                    table.device().is_cpu() && table.scalar_type() == (wide ? at::kDouble : at::kFloat),
                "adamnx fused_step_: the count table must be a contiguous (3, L) CPU tensor in the math dtype");
  }
  Step step{params,  grads,        exp_avgs,          exp_avg_sqs, {}, w1s.const_data_ptr<double>(),
            w2s.const_data_ptr<double>(), w1s.numel() == n ? 1 : 0, lr, weight_decay, eps, grad_factor, seed,
            counts,  table, fill_values, rows, rows.empty() ? nullptr : rows_broken.data_ptr<int32_t>()};
  step.index.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const bool ok = p.device().is_cpu() && p.scalar_type() == param_type && g.scalar_type() == param_type &&
                    m.scalar_type() == state_type && v.scalar_type() == state_type && same_dense_layout(p, g, m, v) &&
                    (!per_coordinate || same_counts_layout(p, counts[i]));
    (ok ? step.index : rejected).push_back(i);
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

// Advance every 0-d step counter by `increment`, write the new counts to `out` (float64, one per counter), and
// return the count if all counters agree (the usual case: a group's params step together), else NaN. The caller
// turns counts into coefficients with adamnx.schedule.coefficients. One call instead of a torch op per counter.
double advance_steps_(const std::vector<Tensor>& steps, double increment, const Tensor& out) {
  const int64_t n = static_cast<int64_t>(steps.size());
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() && out.numel() == n && out.device().is_cpu(),
              "adamnx advance_steps_: out must be a contiguous float64 CPU tensor with one value per step");
  double* values = out.mutable_data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& s = steps[i];
    TORCH_CHECK(s.numel() == 1 && s.device().is_cpu(), "adamnx advance_steps_: steps must be 1-element CPU tensors");
    switch (s.scalar_type()) {
      case at::kDouble:
        values[i] = (*s.mutable_data_ptr<double>() += increment);
        break;
      case at::kFloat:
        values[i] = (*s.mutable_data_ptr<float>() += static_cast<float>(increment));
        break;
      default:
        TORCH_CHECK(false, "adamnx advance_steps_: steps must be float32 or float64, got ", s.scalar_type());
    }
  }
  for (int64_t i = 1; i < n; ++i) {
    if (values[i] != values[0]) return std::numeric_limits<double>::quiet_NaN();
  }
  return n > 0 ? values[0] : std::numeric_limits<double>::quiet_NaN();
}

}  // namespace

TORCH_LIBRARY(adamnx, m) {
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] counts, Tensor w1s, Tensor w2s, Tensor table, Tensor fill, Tensor(e!)[] rows, "
      "Tensor(f!) rows_broken, float lr, float weight_decay, "
      "float eps, "
      "float grad_factor, "
      "bool stochastic_rounding, int seed) -> int[]");
  m.def("advance_steps_(Tensor(a!)[] steps, float increment, Tensor(b!) out) -> float");
}

TORCH_LIBRARY_IMPL(adamnx, CPU, m) {
  m.impl("fused_step_", &fused_step_);
  m.impl("advance_steps_", &advance_steps_);
}
