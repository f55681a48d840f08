// XLA FFI kernels for sampling on a CPU: y = x @ w for a few float32 rows x [M, K] and a bfloat16
// or int8 matrix w [K, N], in float32; y = x @ w for any rows and a float32 w in column blocks; and
// attention of a few queries over a KV cache.
//
// Generating one piece reads every weight once per character, so batch-1 sampling is bound by
// memory bandwidth and narrower weights make it faster; XLA's CPU dot, however, runs a one-row
// bfloat16 product several times slower than the float32 one and has no int8-weight product. The
// matmul kernels stream w once: each bfloat16 is widened exactly to float32 (a 16-bit shift), each
// int8 converted exactly and its 8-row group's sum multiplied by the block's float32 scale, so the
// only rounding is float32 arithmetic. XLA's attention over a cache reads all of its capacity at
// every step; the attention kernel reads only the keys each query may see.
// Built by cpu_kernels.py with -O3 -march=native: AVX-512 intrinsics where the machine has them,
// plain loops for the compiler to vectorize elsewhere.
//
// Work is split into items (slabs of contiguous weight rows, each participant summing into its own
// partial result; column blocks; one cache row per batch row and head), which the caller and the
// tasks it schedules on XLA's intra-op pool claim from a shared counter (ParallelFor).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kQuantBlock = 32;  // rows sharing one int8 scale

inline float Widen(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float Widen(int8_t q) { return float(q); }

// int8 weights carry a float32 scale per block of rows; bfloat16 ones are exact.
template <typename W>
constexpr bool kScaled = std::is_same_v<W, int8_t>;

// Where weight (i, j) of an 8-row group lies: r[i * row + (j / 16) * tile + j % 16]. bfloat16
// matrices are row-major (row = n, tile = 16), as XLA's dot takes them at larger batches; int8
// ones are stored in tiles of 8 rows x 16 columns (row = 16, tile = 128, n % 16 == 0), so that a
// group is one sequential stream: 8 rows' streams ran at 0.6x the bandwidth on one core.
struct Layout {
  int64_t row, tile;
};

inline int64_t Column(const Layout& layout, int64_t j) { return (j / 16) * layout.tile + j % 16; }

// p[j] += sum over the group's 8 rows i of a[i] * w(i, j) (times s[j] for int8), j in [j0, n).
template <typename W>
inline void Group8(const float* a, const W* __restrict__ r, const float* __restrict__ s,
                   float* __restrict__ p, int64_t n, int64_t j0, const Layout& layout) {
  const int64_t row = layout.row;
  for (int64_t j = j0; j < n; ++j) {
    const W* c = r + Column(layout, j);
    const float sum = ((a[0] * Widen(c[0]) + a[1] * Widen(c[row])) +
                       (a[2] * Widen(c[2 * row]) + a[3] * Widen(c[3 * row]))) +
                      ((a[4] * Widen(c[4 * row]) + a[5] * Widen(c[5 * row])) +
                       (a[6] * Widen(c[6 * row]) + a[7] * Widen(c[7 * row])));
    if constexpr (kScaled<W>) {
      p[j] += s[j] * sum;
    } else {
      p[j] += sum;
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 weights widened to float32 with one instruction pair: GCC's own vectorization of the loop
// above widens in two steps through 16-bit lanes with extra shuffles, at about half the speed.
inline __m512 Widen16(const uint16_t* w) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

inline __m512 Widen16(const int8_t* w) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}

template <typename W>
inline void Group8Vector(const float* a, const W* __restrict__ r, const float* __restrict__ s,
                         float* __restrict__ p, int64_t n, const Layout& layout) {
  const int64_t row = layout.row;
  __m512 av[8];
  for (int i = 0; i < 8; ++i) av[i] = _mm512_set1_ps(a[i]);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const W* c = r + Column(layout, j);
    // Two chains of four: a shorter dependency path for the out-of-order core to overlap.
    __m512 low = _mm512_mul_ps(av[0], Widen16(c));
    __m512 high = _mm512_mul_ps(av[4], Widen16(c + 4 * row));
    for (int i = 1; i < 4; ++i) {
      low = _mm512_fmadd_ps(av[i], Widen16(c + i * row), low);
      high = _mm512_fmadd_ps(av[4 + i], Widen16(c + (4 + i) * row), high);
    }
    const __m512 sum = _mm512_add_ps(low, high);
    const __m512 before = _mm512_loadu_ps(p + j);
    if constexpr (kScaled<W>) {
      _mm512_storeu_ps(p + j, _mm512_fmadd_ps(_mm512_loadu_ps(s + j), sum, before));
    } else {
      _mm512_storeu_ps(p + j, _mm512_add_ps(before, sum));
    }
  }
  Group8(a, r, s, p, n, j, layout);
}
#else
template <typename W>
inline void Group8Vector(const float* a, const W* r, const float* s, float* p, int64_t n,
                         const Layout& layout) {
  Group8(a, r, s, p, n, 0, layout);
}
#endif

// part[m, :] += x[m, k0:k1] @ w[k0:k1, :], int8 row k scaled by scales[k / kQuantBlock]. Each
// 8-row group takes 8 n contiguous weights in either layout. k0 and k1 - k0 are multiples of 8,
// so a group never straddles two scale blocks; rows past the last whole group (row-major only,
// int8's K is a multiple of 32) are summed one by one.
template <typename W>
void SumRows(const float* x, const W* w, const float* scales, float* part, int64_t m_rows,
             int64_t k_dim, int64_t n_dim, int64_t k0, int64_t k1, const Layout& layout) {
  const int64_t n = n_dim;
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    const float* s = kScaled<W> ? scales + (k / kQuantBlock) * n : nullptr;
    for (int64_t m = 0; m < m_rows; ++m) {
      Group8Vector(x + m * k_dim + k, w + k * n, s, part + m * n, n, layout);
    }
  }
  for (; k < k1; ++k) {
    const float* __restrict__ s = kScaled<W> ? scales + (k / kQuantBlock) * n : nullptr;
    for (int64_t m = 0; m < m_rows; ++m) {
      const float a = x[m * k_dim + k];
      float* __restrict__ p = part + m * n;
      for (int64_t j = 0; j < n; ++j) p[j] += a * Widen(w[k * n + j]) * (kScaled<W> ? s[j] : 1.f);
    }
  }
}

// Calls work(seat, item) for every item in [0, count), on the caller and on up to seats - 1 tasks
// of XLA's intra-op pool, each participant with its own seat in [0, seats); returns when every
// item is done. Items are claimed from a shared counter, so the caller never waits for a task that
// has not started: a pool busy elsewhere delays nothing and cannot deadlock. A task that starts
// late finds no item left and touches only the counters, which it keeps alive.
struct Counters {
  std::atomic<int64_t> next_seat{0};
  std::atomic<int64_t> next_item{0};
  std::atomic<int64_t> done{0};
};

template <typename Work>
void ParallelFor(ffi::ThreadPool& pool, int64_t seats, int64_t count, const Work& work) {
  auto counters = std::make_shared<Counters>();
  auto run = [counters, count, work = &work] {
    const int64_t seat = counters->next_seat.fetch_add(1);
    for (int64_t i = counters->next_item.fetch_add(1); i < count;
         i = counters->next_item.fetch_add(1)) {
      (*work)(seat, i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < seats; ++i) pool.Schedule(decltype(run)(run));
  run();
  // Every item is claimed; the ones still running belong to tasks already at work.
  while (counters->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

int64_t Seats(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

template <typename W>
ffi::Error Matmul(ffi::ThreadPool& pool, const float* x, int64_t x_elements, const W* w,
                  int64_t k_dim, int64_t n_dim, const float* scales, const Layout& layout,
                  float* y) {
  const int64_t m_rows = x_elements / k_dim, seats = Seats(pool), size = m_rows * n_dim;
  // Several slabs per seat: a task woken late still finds work, and none is left to one thread.
  const int64_t slab = std::max<int64_t>(8, (k_dim / (4 * seats)) / 8 * 8);
  const int64_t slabs = (k_dim + slab - 1) / slab;
  // Seat 0 sums into y itself, the others into their own partial sums, added at the end.
  std::unique_ptr<float[]> partials(new float[(seats - 1) * size]);
  std::unique_ptr<bool[]> seated(new bool[seats]());
  std::fill(y, y + size, 0.f);  // before any task can start summing into it
  ParallelFor(pool, seats, slabs, [&](int64_t seat, int64_t s) {
    float* sum = seat == 0 ? y : partials.get() + (seat - 1) * size;
    if (seat > 0 && !seated[seat]) {
      std::fill(sum, sum + size, 0.f);
      seated[seat] = true;
    }
    SumRows(x, w, scales, sum, m_rows, k_dim, n_dim, s * slab, std::min(k_dim, (s + 1) * slab),
            layout);
  });
  for (int64_t seat = 1; seat < seats; ++seat) {
    if (!seated[seat]) continue;
    const float* part = partials.get() + (seat - 1) * size;
    for (int64_t i = 0; i < size; ++i) y[i] += part[i];
  }
  return ffi::Error::Success();
}

// Attention of one query over keys [0, keys) of one head: y = softmax(q . k / sqrt(d)) v.
// `scores` holds `keys` floats.
void AttendOneScalar(const float* q, const float* k, const float* v, int64_t keys, int64_t d,
                     float* scores, float* y) {
  const float scale = 1.f / std::sqrt(float(d));
  float top = -INFINITY;
  for (int64_t s = 0; s < keys; ++s) {
    float dot = 0.f;
    for (int64_t c = 0; c < d; ++c) dot += q[c] * k[s * d + c];
    scores[s] = dot * scale;
    top = std::max(top, scores[s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s < keys; ++s) total += scores[s] = std::exp(scores[s] - top);
  std::fill(y, y + d, 0.f);
  for (int64_t s = 0; s < keys; ++s) {
    for (int64_t c = 0; c < d; ++c) y[c] += scores[s] * v[s * d + c];
  }
  for (int64_t c = 0; c < d; ++c) y[c] /= total;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// e^x for x <= 0, to about 1 ulp: 2^n e^f with f in [-ln2 / 2, ln2 / 2] by its Taylor series.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // e^-104 is a float32 zero
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2, high bits
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);       // and the rest
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) {
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, n);
}

void AttendOne(const float* q, const float* k, const float* v, int64_t keys, int64_t d,
               float* scores, float* y) {
  if (d % 16 != 0) return AttendOneScalar(q, k, v, keys, d, scores, y);
  const float scale = 1.f / std::sqrt(float(d));
  float top = -INFINITY;
  for (int64_t s = 0; s < keys; ++s) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(k + s * d + c), acc);
    }
    scores[s] = _mm512_reduce_add_ps(acc) * scale;
    top = std::max(top, scores[s]);
  }
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < keys; s += 16) {
    const __mmask16 live = keys - s >= 16 ? 0xFFFF : (__mmask16(1) << (keys - s)) - 1;
    const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores + s),
                                       _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(scores + s, live, e);
    total = _mm512_mask_add_ps(total, live, total, e);
  }
  const float inverse = 1.f / _mm512_reduce_add_ps(total);
  for (int64_t c = 0; c < d; c += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t s = 0; s < keys; ++s) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[s]), _mm512_loadu_ps(v + s * d + c), acc);
    }
    _mm512_storeu_ps(y + c, _mm512_mul_ps(acc, _mm512_set1_ps(inverse)));
  }
}
#else
void AttendOne(const float* q, const float* k, const float* v, int64_t keys, int64_t d,
               float* scores, float* y) {
  AttendOneScalar(q, k, v, keys, d, scores, y);
}
#endif

// y = x @ w for float32 x [M, K] and a float32 w stored in column blocks [N / 16, K, 16] (block c
// holds columns 16c..16c+15 of every row), for batches of rows, where XLA's CPU dot reaches ~60%
// of the FMA peak: its row-major weights are read in short strided pieces that the prefetchers do
// not follow. Items are 3 adjacent blocks (48 columns): their weights are read from memory once,
// as 3 sequential streams, and reused from the L2 cache by every 8-row group of x, whose 8 x 48
// sums stay in 24 registers over all of K. x is packed per 8-row group as [K][8], so the
// broadcasts read consecutive floats.
constexpr int64_t kGroupRows = 8, kItemBlocks = 3;

#if defined(__AVX512F__)
template <int64_t kBlocks>
void ColumnBlocks(const float* packed, const float* w, int64_t k_dim, int64_t n_dim, int64_t c0,
                  int64_t m_rows, float* y) {
  for (int64_t g = 0; g * kGroupRows < m_rows; ++g) {
    const float* a = packed + g * k_dim * kGroupRows;
    __m512 acc[kGroupRows][kBlocks];
    for (auto& row : acc) {
      for (auto& sum : row) sum = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < k_dim; ++k) {
      __m512 b[kBlocks];
      for (int64_t v = 0; v < kBlocks; ++v) b[v] = _mm512_loadu_ps(w + ((c0 + v) * k_dim + k) * 16);
      for (int64_t i = 0; i < kGroupRows; ++i) {
        const __m512 x = _mm512_set1_ps(a[k * kGroupRows + i]);
        for (int64_t v = 0; v < kBlocks; ++v) acc[i][v] = _mm512_fmadd_ps(x, b[v], acc[i][v]);
      }
    }
    const int64_t rows = std::min(kGroupRows, m_rows - g * kGroupRows);
    for (int64_t i = 0; i < rows; ++i) {
      float* out = y + (g * kGroupRows + i) * n_dim + c0 * 16;
      for (int64_t v = 0; v < kBlocks; ++v) _mm512_storeu_ps(out + 16 * v, acc[i][v]);
    }
  }
}
#else
template <int64_t kBlocks>
void ColumnBlocks(const float* packed, const float* w, int64_t k_dim, int64_t n_dim, int64_t c0,
                  int64_t m_rows, float* y) {
  for (int64_t g = 0; g * kGroupRows < m_rows; ++g) {
    const float* a = packed + g * k_dim * kGroupRows;
    float acc[kGroupRows][kBlocks * 16] = {};
    for (int64_t k = 0; k < k_dim; ++k) {
      for (int64_t i = 0; i < kGroupRows; ++i) {
        for (int64_t v = 0; v < kBlocks; ++v) {
          const float* b = w + ((c0 + v) * k_dim + k) * 16;
          for (int64_t j = 0; j < 16; ++j) acc[i][16 * v + j] += a[k * kGroupRows + i] * b[j];
        }
      }
    }
    const int64_t rows = std::min(kGroupRows, m_rows - g * kGroupRows);
    for (int64_t i = 0; i < rows; ++i) {
      std::copy(acc[i], acc[i] + kBlocks * 16, y + (g * kGroupRows + i) * n_dim + c0 * 16);
    }
  }
}
#endif

ffi::Error ColumnBlocksImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> y) {
  const auto w_dims = w.dimensions();
  if (w_dims.size() != 3 || w_dims[2] != 16 || x.dimensions().size() == 0 ||
      x.dimensions().back() != w_dims[1]) {
    return ffi::Error::InvalidArgument("x [..., K] @ w needs w in column blocks [N / 16, K, 16]");
  }
  const int64_t k_dim = w_dims[1], blocks = w_dims[0], n_dim = blocks * 16;
  const int64_t m_rows = x.element_count() / k_dim;
  const int64_t groups = (m_rows + kGroupRows - 1) / kGroupRows;
  std::unique_ptr<float[]> packed(new float[groups * k_dim * kGroupRows]());
  for (int64_t m = 0; m < m_rows; ++m) {
    float* group = packed.get() + (m / kGroupRows) * k_dim * kGroupRows + m % kGroupRows;
    const float* row = x.typed_data() + m * k_dim;
    for (int64_t k = 0; k < k_dim; ++k) group[k * kGroupRows] = row[k];
  }
  const int64_t whole = blocks / kItemBlocks, items = whole + blocks % kItemBlocks;
  ParallelFor(pool, Seats(pool), items, [&](int64_t, int64_t item) {
    if (item < whole) {
      ColumnBlocks<kItemBlocks>(packed.get(), w.typed_data(), k_dim, n_dim, item * kItemBlocks,
                                m_rows, y->typed_data());
    } else {  // the blocks past the last whole item, one by one
      ColumnBlocks<1>(packed.get(), w.typed_data(), k_dim, n_dim,
                      whole * kItemBlocks + (item - whole), m_rows, y->typed_data());
    }
  });
  return ffi::Error::Success();
}

ffi::Error Bf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto w_dims = w.dimensions();
  if (w_dims.size() != 2 || x.dimensions().size() == 0 || x.dimensions().back() != w_dims[0]) {
    return ffi::Error::InvalidArgument("x [..., K] @ w [K, N] needs a 2-D w of K rows");
  }
  const int64_t n_dim = w_dims[1];
  return Matmul(pool, x.typed_data(), x.element_count(),
                reinterpret_cast<const uint16_t*>(w.typed_data()), w_dims[0], n_dim, nullptr,
                Layout{n_dim, 16}, y->typed_data());
}

ffi::Error Int8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                    ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> y) {
  const auto w_dims = w.dimensions(), s_dims = scales.dimensions();
  if (w_dims.size() != 4 || w_dims[2] != 8 || w_dims[3] != 16) {
    return ffi::Error::InvalidArgument("int8 w must be tiles [K / 8, N / 16, 8, 16]");
  }
  const int64_t k_dim = w_dims[0] * 8, n_dim = w_dims[1] * 16;
  if (x.dimensions().size() == 0 || x.dimensions().back() != k_dim) {
    return ffi::Error::InvalidArgument("x's last dimension must be w's K");
  }
  if (k_dim % kQuantBlock != 0 || s_dims.size() != 2 || s_dims[0] != k_dim / kQuantBlock ||
      s_dims[1] != n_dim) {
    return ffi::Error::InvalidArgument("scales must be [K / 32, N] for w [K, N], K % 32 == 0");
  }
  return Matmul(pool, x.typed_data(), x.element_count(), w.typed_data(), k_dim, n_dim,
                scales.typed_data(), Layout{16, 128}, y->typed_data());
}

// y [B, N, T, D]: query t of row b attends to keys [0, start[b] + t] of the cache k, v
// [B, N, S, D]; slots past that are never read, so the cost follows the context, not S.
ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> start,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto q_dims = q.dimensions(), k_dims = k.dimensions();
  if (q_dims.size() != 4 || k_dims.size() != 4 || v.dimensions().size() != 4 ||
      !std::equal(k_dims.begin(), k_dims.end(), v.dimensions().begin()) ||
      q_dims[0] != k_dims[0] || q_dims[1] != k_dims[1] || q_dims[3] != k_dims[3] ||
      start.dimensions().size() != 1 || start.dimensions()[0] != q_dims[0]) {
    return ffi::Error::InvalidArgument(
        "attention takes q [B, N, T, D], k and v [B, N, S, D] and start [B]");
  }
  const int64_t heads = q_dims[1], t_dim = q_dims[2], d = q_dims[3], s_dim = k_dims[2];
  const int32_t* first = start.typed_data();
  const int64_t seats = Seats(pool);
  std::unique_ptr<float[]> scores(new float[seats * s_dim]);
  ParallelFor(pool, seats, q_dims[0] * heads, [&](int64_t seat, int64_t row) {
    const int64_t b = row / heads;
    const float* keys = k.typed_data() + row * s_dim * d;
    const float* values = v.typed_data() + row * s_dim * d;
    for (int64_t t = 0; t < t_dim; ++t) {
      const int64_t n_keys = std::clamp<int64_t>(int64_t(first[b]) + t + 1, 1, s_dim);
      const int64_t at = (row * t_dim + t) * d;
      AttendOne(q.typed_data() + at, keys, values, n_keys, d, scores.get() + seat * s_dim,
                y->typed_data() + at);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NotagenBf16Matmul, Bf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(NotagenInt8Matmul, Int8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(NotagenAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(NotagenColumnBlocksMatmul, ColumnBlocksImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
