// The pairwise-MLP (concat) critic's score-matrix reductions, fused, on the CPU.
//
//   s_ij = sum_h w_h * relu(a_ih + c_jh) + b2,   a (B, H), c (N, H), w (H,), b2 ()
//
// is not a matrix product: every pair costs H add-max-multiply-adds. The functions below compute
// the estimators' per-row and per-column statistics of s (online log-sum-exp, off-diagonal
// log-sum-exp with an optional clip, off-diagonal softplus sums) and their gradients with respect
// to a, c, w and b2 tile by tile, never holding the B x N scores nor the B x N x H hidden layer:
// memory O((B + N) * H). Python (rid_fast/ops/pairwise_cpp.py) pads H to a whole number of lanes
// (padded entries have w_h = 0, so they add nothing) and calls these with contiguous tensors of
// one dtype, float (statistics in float) or double.
//
// Determinism: OpenMP threads take whole row tiles (or whole column tiles) of a fixed size that
// does not depend on the number of threads; every output element is written by the one thread
// owning its tile, in a fixed order, and the per-tile partials of dw and db are added in tile
// order at the end. No atomics. Results are bitwise equal from run to run and for any number of
// threads on one machine (the compiler's vector width is fixed per build).
//
// Each pair's H loop runs over vectors of the target's widest registers (GCC/Clang vector
// extensions: 64 bytes with AVX-512, 32 with AVX, 16 otherwise), lane l summing h = l, l + L, …;
// the lanes are added in a fixed tree at the end. The vectorisation is written out, not left to
// the auto-vectoriser, and needs no reassociation (no -ffast-math): every pair is summed in the
// same order wherever it lies. (A vector wider than the registers would not do: GCC lowers its
// comparisons, the relu, to scalar code.) Python pads H to 64 bytes, a multiple of every width.

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

template <typename T>
constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(T));

// One register of T, one lane per element.
template <typename T>
struct VectorOf {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using Vec = typename VectorOf<T>::type;

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

template <typename T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline Vec<T> broadcast(T x) {
  return Vec<T>{} + x;
}

template <typename T>
inline Vec<T> relu(Vec<T> z) {
  return z > T(0) ? z : Vec<T>{};
}

// Tile of the score matrix one thread works on at a time: TILE_ROWS x TILE_COLS scores (8 KiB in
// float), its rows of a and columns of c (with H = 256: 32 KiB and 64 KiB) stay in L1/L2.
constexpr int64_t kTileRows = 32;
constexpr int64_t kTileCols = 64;

// Row statistics (row_statistics's `reduction`).
enum RowReduction : int64_t { kRowLse = 0, kRowLseNegatives = 1, kRowSoftplusNegatives = 2 };
// Weights W = dL/ds of the backward (backward's `kind`).
enum WeightKind : int64_t { kCrossEntropy = 0, kLseNegatives = 1, kSoftplusNegatives = 2 };

template <typename T>
inline T horizontal_sum(Vec<T> v) {
  // A fixed tree: the same order for every pair.
  T lanes[kLanes<T>];
  store(lanes, v);
  for (int width = kLanes<T> / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// Scores of one row a_i against NC rows of c: out[r] = w . relu(a_i + c_r) + b2. NC > 1 keeps NC
// independent accumulator chains in flight and loads a_i and w once for all of them.
template <typename T, int NC>
inline void score_row_against(const T* a_i, const T* const* c_rows, const T* w, int64_t hp, T b2, T* out) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[NC];
  for (int r = 0; r < NC; ++r) acc[r] = Vec<T>{};
  for (int64_t h = 0; h < hp; h += L) {
    const Vec<T> w_h = load(w + h), a_h = load(a_i + h);
    for (int r = 0; r < NC; ++r) acc[r] += w_h * relu<T>(a_h + load(c_rows[r] + h));
  }
  for (int r = 0; r < NC; ++r) out[r] = horizontal_sum<T>(acc[r]) + b2;
}

template <typename T>
inline T score_pair(const T* a_i, const T* c_j, const T* w, int64_t hp, T b2) {
  T out;
  score_row_against<T, 1>(a_i, &c_j, w, hp, b2, &out);
  return out;
}

// tile[(i - i0) * kTileCols + (j - j0)] = s_ij for i in [i0, i1), j in [j0, j1).
template <typename T>
void score_tile(const T* a, const T* c, const T* w, int64_t hp, T b2, int64_t i0, int64_t i1, int64_t j0,
                int64_t j1, T* tile) {
  for (int64_t i = i0; i < i1; ++i) {
    const T* a_i = a + i * hp;
    T* row = tile + (i - i0) * kTileCols - j0;
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      const T* c_rows[4] = {c + j * hp, c + (j + 1) * hp, c + (j + 2) * hp, c + (j + 3) * hp};
      score_row_against<T, 4>(a_i, c_rows, w, hp, b2, row + j);
    }
    for (; j < j1; ++j) row[j] = score_pair(a_i, c + j * hp, w, hp, b2);
  }
}

template <typename T>
inline T softplus(T s) {
  // As torch.nn.functional.softplus with its threshold: above it, log1p(e^s) = s to working precision.
  const T threshold = sizeof(T) == 8 ? T(40) : T(20);
  return s > threshold ? s : std::log1p(std::exp(s));
}

// Online log-sum-exp: fold the values v[0..n) (entries equal to -inf are skipped) into (max, sum).
template <typename T>
inline void fold_lse(const T* values, int64_t n, int64_t stride, T& running_max, T& running_sum) {
  T tile_max = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < n; ++k) tile_max = std::max(tile_max, values[k * stride]);
  if (tile_max == -std::numeric_limits<T>::infinity()) return;
  const T new_max = std::max(running_max, tile_max);
  T total = T(0);
  for (int64_t k = 0; k < n; ++k) total += std::exp(values[k * stride] - new_max);
  running_sum = running_sum * std::exp(running_max - new_max) + total;
  running_max = new_max;
}

struct Problem {
  int64_t rows, cols, hp;
};

template <typename T>
Problem check_inputs(const at::Tensor& a, const at::Tensor& c, const at::Tensor& w, const at::Tensor& b2) {
  TORCH_CHECK(a.dim() == 2 && c.dim() == 2 && w.dim() == 1 && b2.dim() == 0, "a (B, H), c (N, H), w (H,), b2 ()");
  TORCH_CHECK(a.size(1) == c.size(1) && a.size(1) == w.size(0), "a, c and w must have the same H");
  TORCH_CHECK(a.size(1) % kLanes<T> == 0, "H must be padded to a multiple of the vector width");
  for (const at::Tensor* t : {&a, &c, &w, &b2}) {
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu() && t->scalar_type() == a.scalar_type(),
                "contiguous CPU tensors of one dtype");
  }
  return {a.size(0), c.size(0), a.size(1)};
}

int threads() { return at::get_num_threads(); }

// ---- forward: per-row statistics (and the diagonal scores s_ii, i < min(B, N)) -------------------

template <typename T>
std::vector<at::Tensor> row_statistics_impl(const at::Tensor& a_t, const at::Tensor& c_t, const at::Tensor& w_t,
                                            const at::Tensor& b2_t, int64_t reduction, double clip_or_nan) {
  const Problem p = check_inputs<T>(a_t, c_t, w_t, b2_t);
  const T* a = a_t.data_ptr<T>();
  const T* c = c_t.data_ptr<T>();
  const T* w = w_t.data_ptr<T>();
  const T b2 = b2_t.item<T>();
  const bool has_clip = !std::isnan(clip_or_nan);
  const T clip = static_cast<T>(has_clip ? clip_or_nan : 0.0);
  at::Tensor stat_t = at::empty({p.rows}, a_t.options());
  at::Tensor diag_t = at::zeros({p.rows}, a_t.options());
  T* stat = stat_t.data_ptr<T>();
  T* diag = diag_t.data_ptr<T>();
  const int64_t n_tiles = (p.rows + kTileRows - 1) / kTileRows;
  const T neg_inf = -std::numeric_limits<T>::infinity();

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads())
  for (int64_t t = 0; t < n_tiles; ++t) {
    std::vector<T> tile(kTileRows * kTileCols);
    const int64_t i0 = t * kTileRows, i1 = std::min(i0 + kTileRows, p.rows);
    T running_max[kTileRows], running_sum[kTileRows];
    for (int64_t r = 0; r < kTileRows; ++r) running_max[r] = neg_inf, running_sum[r] = T(0);
    for (int64_t j0 = 0; j0 < p.cols; j0 += kTileCols) {
      const int64_t j1 = std::min(j0 + kTileCols, p.cols), width = j1 - j0;
      score_tile(a, c, w, p.hp, b2, i0, i1, j0, j1, tile.data());
      for (int64_t i = i0; i < i1; ++i) {
        T* row = tile.data() + (i - i0) * kTileCols;
        const bool has_diagonal = i >= j0 && i < j1;
        if (has_diagonal) diag[i] = row[i - j0];
        if (reduction == kRowSoftplusNegatives) {
          T total = T(0);
          for (int64_t k = 0; k < width; ++k) total += (j0 + k == i) ? T(0) : softplus(row[k]);
          running_sum[i - i0] += total;
          continue;
        }
        if (reduction == kRowLseNegatives) {
          if (has_clip) {
            for (int64_t k = 0; k < width; ++k) row[k] = std::min(std::max(row[k], -clip), clip);
          }
          if (has_diagonal) row[i - j0] = neg_inf;
        }
        fold_lse(row, width, 1, running_max[i - i0], running_sum[i - i0]);
      }
    }
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i - i0;
      stat[i] = reduction == kRowSoftplusNegatives ? running_sum[r] : running_max[r] + std::log(running_sum[r]);
    }
  }
  return {stat_t, diag_t};
}

// ---- forward: per-column log-sum-exp over every row (symmetric InfoNCE) ----------------------------

template <typename T>
at::Tensor column_lse_impl(const at::Tensor& a_t, const at::Tensor& c_t, const at::Tensor& w_t,
                           const at::Tensor& b2_t) {
  const Problem p = check_inputs<T>(a_t, c_t, w_t, b2_t);
  const T* a = a_t.data_ptr<T>();
  const T* c = c_t.data_ptr<T>();
  const T* w = w_t.data_ptr<T>();
  const T b2 = b2_t.item<T>();
  at::Tensor out_t = at::empty({p.cols}, a_t.options());
  T* out = out_t.data_ptr<T>();
  const int64_t n_tiles = (p.cols + kTileCols - 1) / kTileCols;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads())
  for (int64_t t = 0; t < n_tiles; ++t) {
    std::vector<T> tile(kTileRows * kTileCols);
    const int64_t j0 = t * kTileCols, j1 = std::min(j0 + kTileCols, p.cols);
    T running_max[kTileCols], running_sum[kTileCols];
    for (int64_t k = 0; k < kTileCols; ++k) running_max[k] = -std::numeric_limits<T>::infinity(), running_sum[k] = 0;
    for (int64_t i0 = 0; i0 < p.rows; i0 += kTileRows) {
      const int64_t i1 = std::min(i0 + kTileRows, p.rows);
      score_tile(a, c, w, p.hp, b2, i0, i1, j0, j1, tile.data());
      for (int64_t j = j0; j < j1; ++j) {
        fold_lse(tile.data() + (j - j0), i1 - i0, kTileCols, running_max[j - j0], running_sum[j - j0]);
      }
    }
    for (int64_t j = j0; j < j1; ++j) out[j] = running_max[j - j0] + std::log(running_sum[j - j0]);
  }
  return out_t;
}

// ---- diagonal scores s_ii, i < B (N >= B) -----------------------------------------------------------

template <typename T>
at::Tensor diagonal_impl(const at::Tensor& a_t, const at::Tensor& c_t, const at::Tensor& w_t, const at::Tensor& b2_t) {
  const Problem p = check_inputs<T>(a_t, c_t, w_t, b2_t);
  TORCH_CHECK(p.cols >= p.rows, "N >= B");
  const T* a = a_t.data_ptr<T>();
  const T* c = c_t.data_ptr<T>();
  const T* w = w_t.data_ptr<T>();
  const T b2 = b2_t.item<T>();
  at::Tensor out_t = at::empty({p.rows}, a_t.options());
  T* out = out_t.data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(threads())
  for (int64_t i = 0; i < p.rows; ++i) out[i] = score_pair(a + i * p.hp, c + i * p.hp, w, p.hp, b2);
  return out_t;
}

// ---- backward ----------------------------------------------------------------------------------------

// W_ij = dL/ds_ij from the recomputed score and the saved statistics (as the streaming path's
// make_weights_ in rid_fast/ops/streaming.py):
//   cross entropy:  g_i e^{s - l_i} + [g'_j e^{s - l'_j}] - (g_i + [g'_i]) [i = j]   (columns: symmetric)
//   lse negatives:  g_i e^{clamp(s) - l_i} [|s| <= clip], 0 on the diagonal
//   softplus:       g_i sigmoid(s), 0 on the diagonal
template <typename T>
struct Weights {
  int64_t kind;
  const T* row_grad;
  const T* row_shift;
  const T* col_grad;  // nullptr: no column term
  const T* col_shift;
  bool has_clip;
  T clip;

  inline T operator()(T s, int64_t i, int64_t j) const {
    switch (kind) {
      case kCrossEntropy: {
        T weight = row_grad[i] * std::exp(s - row_shift[i]);
        if (col_grad != nullptr) weight += col_grad[j] * std::exp(s - col_shift[j]);
        if (i == j) weight -= row_grad[i] + (col_grad != nullptr ? col_grad[i] : T(0));
        return weight;
      }
      case kLseNegatives: {
        if (i == j || (has_clip && std::abs(s) > clip)) return T(0);
        const T clamped = has_clip ? std::min(std::max(s, -clip), clip) : s;
        return row_grad[i] * std::exp(clamped - row_shift[i]);
      }
      default:  // kSoftplusNegatives
        return i == j ? T(0) : row_grad[i] / (T(1) + std::exp(-s));
    }
  }

  // The tile of scores becomes the tile of weights, in place.
  void apply(T* tile, int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    for (int64_t i = i0; i < i1; ++i) {
      T* row = tile + (i - i0) * kTileCols;
      for (int64_t j = j0; j < j1; ++j) row[j - j0] = (*this)(row[j - j0], i, j);
    }
  }
};

// Row pass: da_i += sum_j W_ij [a_i + c_j > 0] (times w at the end), dw += sum_ij W_ij relu(a_i + c_j),
// db += sum_ij W_ij; tile t owns rows [t * kTileRows, ...) of da and slot t of the partials.
template <typename T>
void backward_rows(const T* a, const T* c, const T* w, T b2, const Problem& p, const Weights<T>& weights, T* da,
                   T* dw_partial, T* db_partial) {
  constexpr int L = kLanes<T>;
  const int64_t n_tiles = (p.rows + kTileRows - 1) / kTileRows;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads())
  for (int64_t t = 0; t < n_tiles; ++t) {
    std::vector<T> tile(kTileRows * kTileCols);
    const int64_t i0 = t * kTileRows, i1 = std::min(i0 + kTileRows, p.rows);
    T* dw = dw_partial + t * p.hp;
    T db = T(0);
    for (int64_t j0 = 0; j0 < p.cols; j0 += kTileCols) {
      const int64_t j1 = std::min(j0 + kTileCols, p.cols);
      score_tile(a, c, w, p.hp, b2, i0, i1, j0, j1, tile.data());
      weights.apply(tile.data(), i0, i1, j0, j1);
      for (int64_t i = i0; i < i1; ++i) {
        const T* row = tile.data() + (i - i0) * kTileCols - j0;
        const T* a_i = a + i * p.hp;
        T* da_i = da + i * p.hp;
        for (int64_t h = 0; h < p.hp; h += L) {
          const Vec<T> a_h = load(a_i + h);
          Vec<T> d_pre{}, d_w{};
          for (int64_t j = j0; j < j1; ++j) {
            const T weight = row[j];
            if (weight == T(0)) continue;  // the diagonal of off-diagonal sums, clipped scores
            const Vec<T> z = a_h + load(c + j * p.hp + h), weights = broadcast(weight);
            d_pre += z > T(0) ? weights : Vec<T>{};
            d_w += weights * relu<T>(z);
          }
          store(da_i + h, load(da_i + h) + d_pre);
          store(dw + h, load(dw + h) + d_w);
        }
        for (int64_t j = j0; j < j1; ++j) db += row[j];
      }
    }
    db_partial[t] = db;
  }
}

// Column pass: dc_j += sum_i W_ij [a_i + c_j > 0] (times w at the end); tile t owns its columns of dc.
template <typename T>
void backward_cols(const T* a, const T* c, const T* w, T b2, const Problem& p, const Weights<T>& weights, T* dc) {
  constexpr int L = kLanes<T>;
  const int64_t n_tiles = (p.cols + kTileCols - 1) / kTileCols;

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads())
  for (int64_t t = 0; t < n_tiles; ++t) {
    std::vector<T> tile(kTileRows * kTileCols);
    const int64_t j0 = t * kTileCols, j1 = std::min(j0 + kTileCols, p.cols);
    for (int64_t i0 = 0; i0 < p.rows; i0 += kTileRows) {
      const int64_t i1 = std::min(i0 + kTileRows, p.rows);
      score_tile(a, c, w, p.hp, b2, i0, i1, j0, j1, tile.data());
      weights.apply(tile.data(), i0, i1, j0, j1);
      for (int64_t j = j0; j < j1; ++j) {
        const T* column = tile.data() + (j - j0) - i0 * kTileCols;
        const T* c_j = c + j * p.hp;
        T* dc_j = dc + j * p.hp;
        for (int64_t h = 0; h < p.hp; h += L) {
          const Vec<T> c_h = load(c_j + h);
          Vec<T> d_pre{};
          for (int64_t i = i0; i < i1; ++i) {
            const T weight = column[i * kTileCols];
            if (weight == T(0)) continue;
            d_pre += load(a + i * p.hp + h) + c_h > T(0) ? broadcast(weight) : Vec<T>{};
          }
          store(dc_j + h, load(dc_j + h) + d_pre);
        }
      }
    }
  }
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& a_t, const at::Tensor& c_t, const at::Tensor& w_t,
                                      const at::Tensor& b2_t, int64_t kind, const at::Tensor& row_grad,
                                      const at::Tensor& row_shift, const c10::optional<at::Tensor>& col_grad,
                                      const c10::optional<at::Tensor>& col_shift, double clip_or_nan) {
  const Problem p = check_inputs<T>(a_t, c_t, w_t, b2_t);
  TORCH_CHECK(row_grad.numel() == p.rows && row_grad.is_contiguous() && row_grad.scalar_type() == a_t.scalar_type(),
              "row_grad (B,)");
  const bool has_cols = col_grad.has_value();
  TORCH_CHECK(!has_cols || (col_grad->numel() == p.cols && col_shift.has_value() && col_shift->numel() == p.cols),
              "col_grad, col_shift (N,)");
  const bool has_clip = !std::isnan(clip_or_nan);
  const Weights<T> weights{kind,
                           row_grad.data_ptr<T>(),
                           row_shift.numel() ? row_shift.data_ptr<T>() : nullptr,
                           has_cols ? col_grad->data_ptr<T>() : nullptr,
                           has_cols ? col_shift->data_ptr<T>() : nullptr,
                           has_clip,
                           static_cast<T>(has_clip ? clip_or_nan : 0.0)};
  const T* a = a_t.data_ptr<T>();
  const T* c = c_t.data_ptr<T>();
  const T* w = w_t.data_ptr<T>();
  const T b2 = b2_t.item<T>();
  const int64_t n_row_tiles = (p.rows + kTileRows - 1) / kTileRows;
  at::Tensor da_t = at::zeros_like(a_t), dc_t = at::zeros_like(c_t);
  at::Tensor dw_partial_t = at::zeros({n_row_tiles, p.hp}, a_t.options());
  at::Tensor db_partial_t = at::zeros({n_row_tiles}, a_t.options());
  T* da = da_t.data_ptr<T>();
  T* dc = dc_t.data_ptr<T>();
  backward_rows(a, c, w, b2, p, weights, da, dw_partial_t.data_ptr<T>(), db_partial_t.data_ptr<T>());
  backward_cols(a, c, w, b2, p, weights, dc);

  // ds/d(a_ih + c_jh) = w_h [a_ih + c_jh > 0]: the factor w_h, left out of the sweeps, goes in once here.
  for (auto [d, n] : {std::pair<T*, int64_t>{da, p.rows}, std::pair<T*, int64_t>{dc, p.cols}}) {
#pragma omp parallel for schedule(static) num_threads(threads())
    for (int64_t r = 0; r < n; ++r) {
      T* d_r = d + r * p.hp;
#pragma omp simd
      for (int64_t h = 0; h < p.hp; ++h) d_r[h] *= w[h];
    }
  }
  // The partials added in tile order: the same sums whatever the number of threads.
  at::Tensor dw_t = at::zeros({p.hp}, a_t.options());
  T* dw = dw_t.data_ptr<T>();
  const T* dw_partial = dw_partial_t.data_ptr<T>();
  const T* db_partial = db_partial_t.data_ptr<T>();
  T db = T(0);
  for (int64_t t = 0; t < n_row_tiles; ++t) {
    for (int64_t h = 0; h < p.hp; ++h) dw[h] += dw_partial[t * p.hp + h];
    db += db_partial[t];
  }
  return {da_t, dc_t, dw_t, at::scalar_tensor(db, a_t.options())};
}

#define RID_FAST_DISPATCH(a, name, ...)                                          \
  [&] {                                                                          \
    if ((a).scalar_type() == at::kDouble) return name<double>(__VA_ARGS__);       \
    TORCH_CHECK((a).scalar_type() == at::kFloat, "float32 or float64 tensors"); \
    return name<float>(__VA_ARGS__);                                             \
  }()

std::vector<at::Tensor> row_statistics(const at::Tensor& a, const at::Tensor& c, const at::Tensor& w,
                                       const at::Tensor& b2, int64_t reduction, double clip_or_nan) {
  TORCH_CHECK(reduction >= kRowLse && reduction <= kRowSoftplusNegatives, "unknown row reduction");
  return RID_FAST_DISPATCH(a, row_statistics_impl, a, c, w, b2, reduction, clip_or_nan);
}

at::Tensor column_lse(const at::Tensor& a, const at::Tensor& c, const at::Tensor& w, const at::Tensor& b2) {
  return RID_FAST_DISPATCH(a, column_lse_impl, a, c, w, b2);
}

at::Tensor diagonal(const at::Tensor& a, const at::Tensor& c, const at::Tensor& w, const at::Tensor& b2) {
  return RID_FAST_DISPATCH(a, diagonal_impl, a, c, w, b2);
}

std::vector<at::Tensor> backward(const at::Tensor& a, const at::Tensor& c, const at::Tensor& w, const at::Tensor& b2,
                                 int64_t kind, const at::Tensor& row_grad, const at::Tensor& row_shift,
                                 const c10::optional<at::Tensor>& col_grad, const c10::optional<at::Tensor>& col_shift,
                                 double clip_or_nan) {
  TORCH_CHECK(kind >= kCrossEntropy && kind <= kSoftplusNegatives, "unknown weight kind");
  return RID_FAST_DISPATCH(a, backward_impl, a, c, w, b2, kind, row_grad, row_shift, col_grad, col_shift,
                           clip_or_nan);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  auto release = py::call_guard<py::gil_scoped_release>();
  m.attr("VECTOR_BYTES") = kVectorBytes;
  m.attr("TILE_ROWS") = kTileRows;
  m.attr("TILE_COLS") = kTileCols;
  m.def("row_statistics", &row_statistics, release,
        "(statistic (B,), diagonal scores (B,)): reduction 0 row log-sum-exp, 1 off-diagonal log-sum-exp of the "
        "scores clamped to [-clip, clip] (no clamp when clip is NaN), 2 off-diagonal softplus sums");
  m.def("column_lse", &column_lse, release, "column log-sum-exp over every row (N,)");
  m.def("diagonal", &diagonal, release, "s_ii for i < B (B,)");
  m.def("backward", &backward, release,
        "(da, dc, dw, db) of sum W_ij s_ij: kind 0 cross entropy (rows, and columns when col_grad is given), "
        "1 off-diagonal log-sum-exp (clip NaN: none), 2 off-diagonal softplus");
}
