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

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
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

// One register of T, one lane per element; and the integers of the same width (for exp's 2^n).
template <typename T>
struct VectorOf {
  typedef T type __attribute__((vector_size(kVectorBytes)));
  typedef std::conditional_t<sizeof(T) == 8, int64_t, int32_t> integer __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using Vec = typename VectorOf<T>::type;
template <typename T>
using IntVec = typename VectorOf<T>::integer;

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

// The first n < kLanes values of p, the other lanes `fill`.
template <typename T>
inline Vec<T> load_first(const T* p, int64_t n, T fill) {
  T lanes[kLanes<T>];
  for (int l = 0; l < kLanes<T>; ++l) lanes[l] = l < n ? p[l] : fill;
  return load(lanes);
}

template <typename T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline Vec<T> broadcast(T x) {
  return Vec<T>{} + x;
}

// max(z, 0), 0 for NaN. x86's max instruction is exactly z > 0 ? z : 0 (the second operand unless
// the first is greater), which the compiler otherwise builds from a compare and a blend.
template <typename T>
inline Vec<T> relu(Vec<T> z) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) return _mm512_max_ps(z, Vec<T>{});
  else return _mm512_max_pd(z, Vec<T>{});
#elif defined(__AVX__)
  if constexpr (sizeof(T) == 4) return _mm256_max_ps(z, Vec<T>{});
  else return _mm256_max_pd(z, Vec<T>{});
#else
  return z > T(0) ? z : Vec<T>{};
#endif
}

// x * y + z with one rounding where the target has FMA, written out: the build passes
// -ffp-contract=off, so no other product and sum is fused, and whether one is cannot depend on how
// the compiler inlined a loop.
template <typename T>
inline Vec<T> fmadd(Vec<T> x, Vec<T> y, Vec<T> z) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) return _mm512_fmadd_ps(x, y, z);
  else return _mm512_fmadd_pd(x, y, z);
#elif defined(__FMA__)
  if constexpr (sizeof(T) == 4) return _mm256_fmadd_ps(x, y, z);
  else return _mm256_fmadd_pd(x, y, z);
#else
  return x * y + z;
#endif
}

// e^x lane by lane, within 2 ulp of the true value (Cephes' expf and exp): x = n ln 2 + r with
// |r| <= ln(2)/2, e^r by a polynomial (float) or a Padé form (double), times 2^n built in the
// exponent bits (as 2^(n-1) * 2, so that n = emax + 1 still fits). Below `kFlush` (e^x under 1e-37
// in float, 1e-307 in double) the result is 0; above log(max) it is inf; NaN stays NaN. Plain
// arithmetic, so the same bits on every machine with the same vector width.
template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  static constexpr float kFlush = -86.0f, kOverflow = 88.72283935546875f;
  static constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
  static constexpr int kMantissa = 23, kBias = 127;
};
template <>
struct ExpConstants<double> {
  static constexpr double kFlush = -707.0, kOverflow = 709.782712893384;
  static constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2High = 6.93145751953125e-1, kLn2Low = 1.42860682030941723212e-6;
  static constexpr int kMantissa = 52, kBias = 1023;
};

template <typename T>
inline Vec<T> vexp(Vec<T> x) {
  using K = ExpConstants<T>;
  Vec<T> clamped = x > K::kOverflow ? broadcast<T>(K::kOverflow) : x;
  clamped = clamped < K::kFlush ? broadcast<T>(K::kFlush) : clamped;
  const Vec<T> rounded = clamped * T(1.4426950408889634) + K::kRound;  // round-to-nearest, in the low bits
  const Vec<T> n = rounded - K::kRound;
  const Vec<T> r = (clamped - n * K::kLn2High) - n * K::kLn2Low;
  Vec<T> e;
  if constexpr (sizeof(T) == 4) {
    const Vec<T> rr = r * r;
    Vec<T> p = broadcast<T>(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    e = (p * rr + r) + 1.0f;
  } else {
    const Vec<T> rr = r * r;
    Vec<T> p = broadcast<T>(1.26177193074810590878e-4);
    p = p * rr + 3.02994407707441961300e-2;
    p = (p * rr + 9.99999999999999999910e-1) * r;
    Vec<T> q = broadcast<T>(3.00198505138664455042e-6);
    q = q * rr + 2.52448340349684104192e-3;
    q = q * rr + 2.27265548208155028766e-1;
    q = q * rr + 2.00000000000000000009e0;
    e = (p / (q - p)) * T(2) + T(1);
  }
  // 2^(n - 1): n sits in the low bits of `rounded`, as an offset from those of kRound.
  const IntVec<T> exponent = (IntVec<T>)rounded - (IntVec<T>)broadcast<T>(K::kRound) + (K::kBias - 1);
  e = e * (Vec<T>)(exponent << K::kMantissa) * T(2);
  e = x > K::kOverflow ? broadcast<T>(std::numeric_limits<T>::infinity()) : e;
  return x < K::kFlush ? Vec<T>{} : e;
}

// The lane-wise larger (y where x is NaN).
template <typename T>
inline Vec<T> vmax(Vec<T> x, Vec<T> y) {
  return y > x ? y : x;
}

// The lanes of v added in a fixed tree, the same for every pair: the upper half onto the lower half
// (lane l + n/2 onto lane l), again on the lower half, down to one lane. With shuffles in registers
// where the compiler has them (GCC 12, Clang): through memory, the accumulators of a whole block
// would live on the stack.
template <typename T, typename V>
inline T horizontal_sum_of(V v) {
  constexpr std::size_t n = sizeof(V) / sizeof(T);
  if constexpr (n == 1) {
    return v[0];
  } else {
#if defined(__clang__) || __GNUC__ >= 12
    auto halves = []<std::size_t... I>(V x, std::index_sequence<I...>) {
      return __builtin_shufflevector(x, x, I...) + __builtin_shufflevector(x, x, (I + n / 2)...);
    };
    return horizontal_sum_of<T>(halves(v, std::make_index_sequence<n / 2>{}));
#else
    typedef T Half __attribute__((vector_size(sizeof(V) / 2)));
    Half low, high;
    std::memcpy(&low, &v, sizeof(Half));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return horizontal_sum_of<T>(low + high);
#endif
  }
}

template <typename T>
inline T horizontal_sum(Vec<T> v) {
  return horizontal_sum_of<T>(v);
}


// Tile of the score matrix one thread works on at a time: TILE_ROWS x TILE_COLS scores (8 KiB in
// float), its rows of a and columns of c (with H = 256: 32 KiB and 64 KiB) stay in L1/L2.
constexpr int64_t kTileRows = 32;
constexpr int64_t kTileCols = 64;

// Register blocks of the score and gradient loops: kBlockRows rows of a against kBlockCols rows of
// c share each vector loaded. 2 x 4 keeps the 8 accumulators (scores) or 8 broadcast weights
// (gradients) and the 6 loaded vectors in registers with 32 of them (AVX-512); 2 x 2 with 16.
constexpr int kBlockRows = 2;
constexpr int kBlockCols = kVectorBytes == 64 ? 4 : 2;

// Row statistics (row_statistics's `reduction`).
enum RowReduction : int64_t { kRowLse = 0, kRowLseNegatives = 1, kRowSoftplusNegatives = 2 };
// Weights W = dL/ds of the backward (backward's `kind`).
enum WeightKind : int64_t { kCrossEntropy = 0, kLseNegatives = 1, kSoftplusNegatives = 2 };

// Scores of R rows of a against C rows of c: out[r * out_stride + k] = w . relu(a_r + c_k) + b2.
// Lane l of every pair's accumulator sums h = l, l + L, ... in order, one fused multiply-add each,
// and the lanes are added in horizontal_sum's tree: a pair's score does not depend on R, C or on
// which pass computes it.
template <typename T, int R, int C>
inline void score_block(const T* a_rows, const T* c_rows, const T* w, int64_t hp, T b2, T* out, int64_t out_stride) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[R][C] = {};
  for (int64_t h = 0; h < hp; h += L) {
    const Vec<T> w_h = load(w + h);
    Vec<T> a_h[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a_h[r] = load(a_rows + r * hp + h);
#pragma GCC unroll 8
    for (int k = 0; k < C; ++k) {
      const Vec<T> c_h = load(c_rows + k * hp + h);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][k] = fmadd<T>(w_h, relu<T>(a_h[r] + c_h), acc[r][k]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int k = 0; k < C; ++k) out[r * out_stride + k] = horizontal_sum<T>(acc[r][k]) + b2;
  }
}

template <typename T>
inline T score_pair(const T* a_i, const T* c_j, const T* w, int64_t hp, T b2) {
  T out;
  score_block<T, 1, 1>(a_i, c_j, w, hp, b2, &out, 1);
  return out;
}

// Calls block<R, C>(i, j) over [i0, i1) x [j0, j1) in blocks of kBlockRows x kBlockCols, then the
// ragged edges: remaining rows one at a time against column blocks, remaining columns one at a time.
// Within one row the columns come in increasing order, within one column the rows.
template <typename Block>
inline void for_each_block(int64_t i0, int64_t i1, int64_t j0, int64_t j1, Block&& block) {
  int64_t i = i0;
  for (; i + kBlockRows <= i1; i += kBlockRows) {
    int64_t j = j0;
    for (; j + kBlockCols <= j1; j += kBlockCols) block.template operator()<kBlockRows, kBlockCols>(i, j);
    for (; j < j1; ++j) block.template operator()<kBlockRows, 1>(i, j);
  }
  for (; i < i1; ++i) {
    int64_t j = j0;
    for (; j + kBlockCols <= j1; j += kBlockCols) block.template operator()<1, kBlockCols>(i, j);
    for (; j < j1; ++j) block.template operator()<1, 1>(i, j);
  }
}

// tile[(i - i0) * kTileCols + (j - j0)] = s_ij for i in [i0, i1), j in [j0, j1).
template <typename T>
void score_tile(const T* a, const T* c, const T* w, int64_t hp, T b2, int64_t i0, int64_t i1, int64_t j0,
                int64_t j1, T* tile) {
  for_each_block(i0, i1, j0, j1, [&]<int R, int C>(int64_t i, int64_t j) {
    score_block<T, R, C>(a + i * hp, c + j * hp, w, hp, b2, tile + (i - i0) * kTileCols + (j - j0), kTileCols);
  });
}

template <typename T>
inline T softplus(T s) {
  // As torch.nn.functional.softplus with its threshold: above it, log1p(e^s) = s to working precision.
  const T threshold = sizeof(T) == 8 ? T(40) : T(20);
  return s > threshold ? s : std::log1p(std::exp(s));
}

// Online log-sum-exp: fold the values v[0..n) (entries equal to -inf are skipped) into (max, sum).
template <typename T>
inline void fold_lse(const T* values, int64_t n, T& running_max, T& running_sum) {
  constexpr int L = kLanes<T>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  Vec<T> lane_max = broadcast(neg_inf);
  int64_t k = 0;
  for (; k + L <= n; k += L) lane_max = vmax<T>(lane_max, load(values + k));
  if (k < n) lane_max = vmax<T>(lane_max, load_first(values + k, n - k, neg_inf));
  T tile_max = neg_inf;
  for (int l = 0; l < L; ++l) tile_max = std::max(tile_max, lane_max[l]);
  if (tile_max == neg_inf) return;
  const T new_max = std::max(running_max, tile_max);
  const Vec<T> shift = broadcast(new_max);
  Vec<T> total{};
  for (k = 0; k + L <= n; k += L) total += vexp<T>(load(values + k) - shift);
  if (k < n) total += vexp<T>(load_first(values + k, n - k, neg_inf) - shift);
  running_sum = running_sum * std::exp(running_max - new_max) + horizontal_sum<T>(total);
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

#pragma omp parallel num_threads(threads())
  {
    alignas(64) T tile[kTileRows * kTileCols] = {};
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t i0 = t * kTileRows, i1 = std::min(i0 + kTileRows, p.rows);
      T running_max[kTileRows], running_sum[kTileRows];
      for (int64_t r = 0; r < kTileRows; ++r) running_max[r] = neg_inf, running_sum[r] = T(0);
      for (int64_t j0 = 0; j0 < p.cols; j0 += kTileCols) {
        const int64_t j1 = std::min(j0 + kTileCols, p.cols), width = j1 - j0;
        score_tile(a, c, w, p.hp, b2, i0, i1, j0, j1, tile);
        for (int64_t i = i0; i < i1; ++i) {
          T* row = tile + (i - i0) * kTileCols;
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
          fold_lse(row, width, running_max[i - i0], running_sum[i - i0]);
        }
      }
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = i - i0;
        stat[i] = reduction == kRowSoftplusNegatives ? running_sum[r] : running_max[r] + std::log(running_sum[r]);
      }
    }
  }
  return {stat_t, diag_t};
}

// ---- forward: per-column log-sum-exp over every row (symmetric InfoNCE) ----------------------------

template <typename T>
at::Tensor column_lse_impl(const at::Tensor& a_t, const at::Tensor& c_t, const at::Tensor& w_t,
                           const at::Tensor& b2_t) {
  constexpr int L = kLanes<T>;
  static_assert(kTileCols % L == 0, "a tile's columns are whole vectors");
  const Problem p = check_inputs<T>(a_t, c_t, w_t, b2_t);
  const T* a = a_t.data_ptr<T>();
  const T* c = c_t.data_ptr<T>();
  const T* w = w_t.data_ptr<T>();
  const T b2 = b2_t.item<T>();
  at::Tensor out_t = at::empty({p.cols}, a_t.options());
  T* out = out_t.data_ptr<T>();
  const int64_t n_tiles = (p.cols + kTileCols - 1) / kTileCols;
  const T neg_inf = -std::numeric_limits<T>::infinity();

#pragma omp parallel num_threads(threads())
  {
    // Columns past N in a ragged tile stay -inf: their lanes compute NaNs that are never stored.
    alignas(64) T tile[kTileRows * kTileCols];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t j0 = t * kTileCols, j1 = std::min(j0 + kTileCols, p.cols);
      std::fill(tile, tile + kTileRows * kTileCols, neg_inf);
      // The running (max, sum) of every column, a vector of columns at a time.
      Vec<T> running_max[kTileCols / L], running_sum[kTileCols / L];
      for (int v = 0; v < kTileCols / L; ++v) running_max[v] = broadcast(neg_inf), running_sum[v] = Vec<T>{};
      for (int64_t i0 = 0; i0 < p.rows; i0 += kTileRows) {
        const int64_t i1 = std::min(i0 + kTileRows, p.rows);
        score_tile(a, c, w, p.hp, b2, i0, i1, j0, j1, tile);
        for (int64_t v = 0; v * L < j1 - j0; ++v) {
          Vec<T> tile_max = load(tile + v * L);
          for (int64_t r = 1; r < i1 - i0; ++r) {
            const Vec<T> s = load(tile + r * kTileCols + v * L);
            tile_max = vmax<T>(tile_max, s);
          }
          const Vec<T> new_max = vmax<T>(running_max[v], tile_max);
          Vec<T> total{};
          for (int64_t r = 0; r < i1 - i0; ++r) total += vexp<T>(load(tile + r * kTileCols + v * L) - new_max);
          running_sum[v] = running_sum[v] * vexp<T>(running_max[v] - new_max) + total;
          running_max[v] = new_max;
        }
      }
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t k = j - j0;
        out[j] = running_max[k / L][k % L] + std::log(running_sum[k / L][k % L]);
      }
    }
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

  // The tile of scores becomes the tile of weights, in place, a vector of columns at a time (the
  // lanes past j1 compute values that are never read).
  void apply(T* tile, int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    constexpr int L = kLanes<T>;
    for (int64_t i = i0; i < i1; ++i) {
      T* row = tile + (i - i0) * kTileCols;
      const Vec<T> g = broadcast(row_grad[i]);
      for (int64_t j = j0; j < j1; j += L) {
        const Vec<T> s = load(row + (j - j0));
        Vec<T> weight;
        if (kind == kCrossEntropy) {
          weight = g * vexp<T>(s - row_shift[i]);
          if (col_grad != nullptr) {
            const int64_t n = std::min<int64_t>(L, j1 - j);
            weight += load_first(col_grad + j, n, T(0)) * vexp<T>(s - load_first(col_shift + j, n, T(0)));
          }
        } else if (kind == kLseNegatives) {
          weight = g * vexp<T>(s - row_shift[i]);
          // |s| > clip: the clamp's gradient is 0 (and e^{clamp(s)} = e^{s} where it is not).
          if (has_clip) weight = (s > clip) | (s < -clip) ? Vec<T>{} : weight;
        } else {
          weight = g / (vexp<T>(-s) + T(1));
        }
        store(row + (j - j0), weight);
      }
      if (i >= j0 && i < j1) {
        T& diagonal = row[i - j0];
        diagonal = kind == kCrossEntropy ? diagonal - (row_grad[i] + (col_grad != nullptr ? col_grad[i] : T(0))) : T(0);
      }
    }
  }
};

// The gradient sums of one block of pairs (R rows from i, C columns from j) with weights W:
//   da_i += sum_j W_ij [a_i + c_j > 0],  dc_j += sum_i W_ij [a_i + c_j > 0],  dw += sum_ij W_ij relu(a_i + c_j)
// (the factor w of da and dc goes in at the end). Each H vector's sums are added in the block's
// fixed order; a block of zero weights (the diagonal of an off-diagonal sum, clipped scores) adds nothing.
template <typename T, int R, int C>
inline void accumulate_block(const T* a_rows, const T* c_rows, const T* weights, int64_t hp, T* da_rows, T* dc_rows,
                             T* dw) {
  constexpr int L = kLanes<T>;
  Vec<T> weight[R][C];
  bool any = false;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int k = 0; k < C; ++k) {
      const T value = weights[r * kTileCols + k];
      any |= value != T(0);
      weight[r][k] = broadcast(value);
    }
  }
  if (!any) return;
  for (int64_t h = 0; h < hp; h += L) {
    Vec<T> a_h[R], d_a[R], d_c[C], d_w = load(dw + h);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a_h[r] = load(a_rows + r * hp + h), d_a[r] = load(da_rows + r * hp + h);
#pragma GCC unroll 8
    for (int k = 0; k < C; ++k) {
      const Vec<T> c_h = load(c_rows + k * hp + h);
      d_c[k] = load(dc_rows + k * hp + h);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const Vec<T> z = a_h[r] + c_h;
        const Vec<T> active = z > T(0) ? weight[r][k] : Vec<T>{};
        d_a[r] += active;
        d_c[k] += active;
        d_w = fmadd<T>(active, z, d_w);  // W relu(z): 0 where z <= 0
      }
      store(dc_rows + k * hp + h, d_c[k]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) store(da_rows + r * hp + h, d_a[r]);
    store(dw + h, d_w);
  }
}

// The sweep is split into a fixed grid of work items: row groups (whole row tiles) x column chunks
// (whole column tiles), at most kGroups of each, their bounds depending on B and N only. Item (g, k)
// owns slot k of the da partials, slot g of the dc partials and slot (g, k) of dw's and db's; the
// partials are added in slot order at the end. Memory: (min(kGroups, column tiles) * B
// + min(kGroups, row tiles) * N) * H numbers of partials beyond the outputs (none where one slot).
constexpr int64_t kGroups = 8;

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
  const int64_t n_col_tiles = (p.cols + kTileCols - 1) / kTileCols;
  const int64_t n_groups = std::min(kGroups, n_row_tiles), n_chunks = std::min(kGroups, n_col_tiles);
  const int64_t n_items = n_groups * n_chunks;
  at::Tensor da_t = at::zeros_like(a_t), dc_t = at::zeros_like(c_t);
  // One slot: the sweep writes the gradient itself.
  at::Tensor da_partial_t = n_chunks > 1 ? at::zeros({n_chunks, p.rows, p.hp}, a_t.options()) : da_t;
  at::Tensor dc_partial_t = n_groups > 1 ? at::zeros({n_groups, p.cols, p.hp}, a_t.options()) : dc_t;
  at::Tensor dw_partial_t = at::zeros({n_items, p.hp}, a_t.options());
  at::Tensor db_partial_t = at::zeros({n_items}, a_t.options());
  T* da_partial = da_partial_t.data_ptr<T>();
  T* dc_partial = dc_partial_t.data_ptr<T>();
  T* dw_partial = dw_partial_t.data_ptr<T>();
  T* db_partial = db_partial_t.data_ptr<T>();

#pragma omp parallel num_threads(threads())
  {
    // Zeros past a ragged tile's columns: the weights' vectors read them, nothing uses them.
    alignas(64) T tile[kTileRows * kTileCols] = {};
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t g = item / n_chunks, k = item % n_chunks;
      T* da = da_partial + k * p.rows * p.hp;
      T* dc = dc_partial + g * p.cols * p.hp;
      T* dw = dw_partial + item * p.hp;
      T db = T(0);
      for (int64_t ti = g * n_row_tiles / n_groups; ti < (g + 1) * n_row_tiles / n_groups; ++ti) {
        const int64_t i0 = ti * kTileRows, i1 = std::min(i0 + kTileRows, p.rows);
        for (int64_t tj = k * n_col_tiles / n_chunks; tj < (k + 1) * n_col_tiles / n_chunks; ++tj) {
          const int64_t j0 = tj * kTileCols, j1 = std::min(j0 + kTileCols, p.cols);
          score_tile(a, c, w, p.hp, b2, i0, i1, j0, j1, tile);
          weights.apply(tile, i0, i1, j0, j1);
          for_each_block(i0, i1, j0, j1, [&]<int R, int C>(int64_t i, int64_t j) {
            accumulate_block<T, R, C>(a + i * p.hp, c + j * p.hp, tile + (i - i0) * kTileCols + (j - j0), p.hp,
                                      da + i * p.hp, dc + j * p.hp, dw);
          });
          for (int64_t i = i0; i < i1; ++i) {
            for (int64_t j = j0; j < j1; ++j) db += tile[(i - i0) * kTileCols + (j - j0)];
          }
        }
      }
      db_partial[item] = db;
    }
  }

  // da = w * sum_k da_partial[k], dc = w * sum_g dc_partial[g], in slot order; ds/d(a_ih + c_jh) =
  // w_h [a_ih + c_jh > 0]: the factor w_h, left out of the sweep, goes in once here.
  for (auto [out, partial, n, slots] : {std::tuple<T*, const T*, int64_t, int64_t>{da_t.data_ptr<T>(), da_partial, p.rows, n_chunks},
                                        std::tuple<T*, const T*, int64_t, int64_t>{dc_t.data_ptr<T>(), dc_partial, p.cols, n_groups}}) {
#pragma omp parallel for schedule(static) num_threads(threads())
    for (int64_t r = 0; r < n; ++r) {
      T* out_r = out + r * p.hp;
      const T* first = partial + r * p.hp;  // out_r itself where there is one slot
      if (first != out_r) std::copy(first, first + p.hp, out_r);
      for (int64_t s = 1; s < slots; ++s) {
        const T* slot_r = partial + (s * n + r) * p.hp;
        for (int64_t h = 0; h < p.hp; ++h) out_r[h] += slot_r[h];
      }
      for (int64_t h = 0; h < p.hp; ++h) out_r[h] *= w[h];
    }
  }
  at::Tensor dw_t = at::zeros({p.hp}, a_t.options());
  T* dw = dw_t.data_ptr<T>();
  T db = T(0);
  for (int64_t item = 0; item < n_items; ++item) {
    for (int64_t h = 0; h < p.hp; ++h) dw[h] += dw_partial[item * p.hp + h];
    db += db_partial[item];
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
  m.attr("GROUPS") = kGroups;
  m.def("row_statistics", &row_statistics, release,
        "(statistic (B,), diagonal scores (B,)): reduction 0 row log-sum-exp, 1 off-diagonal log-sum-exp of the "
        "scores clamped to [-clip, clip] (no clamp when clip is NaN), 2 off-diagonal softplus sums");
  m.def("column_lse", &column_lse, release, "column log-sum-exp over every row (N,)");
  m.def("diagonal", &diagonal, release, "s_ii for i < B (B,)");
  m.def("backward", &backward, release,
        "(da, dc, dw, db) of sum W_ij s_ij: kind 0 cross entropy (rows, and columns when col_grad is given), "
        "1 off-diagonal log-sum-exp (clip NaN: none), 2 off-diagonal softplus");
}
