// y = x @ w for a few float32 rows x [M, K] and a bfloat16 or int8 matrix w [K, N], in float32.
//
// Generating one piece reads every weight once per character, so batch-1 sampling is bound by
// memory bandwidth and narrower weights make it faster; XLA's CPU dot, however, runs a one-row
// bfloat16 product several times slower than the float32 one and has no int8-weight product. These
// kernels stream w once: each bfloat16 is widened exactly to float32 (a 16-bit shift), each int8
// converted exactly and its 8-row group's sum multiplied by the block's float32 scale, so the only
// rounding is float32 arithmetic. Built by cpu_matmul.py with -O3 -march=native: AVX-512
// intrinsics where the machine has them, plain loops for the compiler to vectorize elsewhere.
//
// Work is split over K into slabs of contiguous rows (sequential streams for the prefetchers), each
// participant summing into its own partial result. The caller and the tasks it schedules on XLA's
// intra-op pool claim slabs from a shared counter, so the caller never waits for a task that has
// not started: a pool busy elsewhere delays nothing and cannot deadlock.

#include <algorithm>
#include <atomic>
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

// p[j] += sum over 8 rows i of a[i] * w[i * n + j] (times s[j] for int8), for j in [j0, n).
template <typename W>
inline void Group8(const float* a, const W* __restrict__ r, const float* __restrict__ s,
                   float* __restrict__ p, int64_t n, int64_t j0) {
  for (int64_t j = j0; j < n; ++j) {
    const float sum = ((a[0] * Widen(r[j]) + a[1] * Widen(r[n + j])) +
                       (a[2] * Widen(r[2 * n + j]) + a[3] * Widen(r[3 * n + j]))) +
                      ((a[4] * Widen(r[4 * n + j]) + a[5] * Widen(r[5 * n + j])) +
                       (a[6] * Widen(r[6 * n + j]) + a[7] * Widen(r[7 * n + j])));
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
                         float* __restrict__ p, int64_t n) {
  __m512 av[8];
  for (int i = 0; i < 8; ++i) av[i] = _mm512_set1_ps(a[i]);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    // Two chains of four: a shorter dependency path for the out-of-order core to overlap.
    __m512 low = _mm512_mul_ps(av[0], Widen16(r + j));
    __m512 high = _mm512_mul_ps(av[4], Widen16(r + 4 * n + j));
    for (int i = 1; i < 4; ++i) {
      low = _mm512_fmadd_ps(av[i], Widen16(r + i * n + j), low);
      high = _mm512_fmadd_ps(av[4 + i], Widen16(r + (4 + i) * n + j), high);
    }
    const __m512 sum = _mm512_add_ps(low, high);
    const __m512 before = _mm512_loadu_ps(p + j);
    if constexpr (kScaled<W>) {
      _mm512_storeu_ps(p + j, _mm512_fmadd_ps(_mm512_loadu_ps(s + j), sum, before));
    } else {
      _mm512_storeu_ps(p + j, _mm512_add_ps(before, sum));
    }
  }
  Group8(a, r, s, p, n, j);
}
#else
template <typename W>
inline void Group8Vector(const float* a, const W* r, const float* s, float* p, int64_t n) {
  Group8(a, r, s, p, n, 0);
}
#endif

// part[m, :] += x[m, k0:k1] @ w[k0:k1, :], int8 row k scaled by scales[k / kQuantBlock].
// k0 and k1 - k0 are multiples of 8, so an 8-row group never straddles two scale blocks.
template <typename W>
void SumRows(const float* x, const W* w, const float* scales, float* part, int64_t m_rows,
             int64_t k_dim, int64_t n_dim, int64_t k0, int64_t k1) {
  const int64_t n = n_dim;
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    const float* s = kScaled<W> ? scales + (k / kQuantBlock) * n : nullptr;
    for (int64_t m = 0; m < m_rows; ++m) {
      Group8Vector(x + m * k_dim + k, w + k * n, s, part + m * n, n);
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

template <typename W>
struct Job {
  const float* x;
  const W* w;
  const float* scales;
  float* y;
  int64_t m_rows, k_dim, n_dim, slab, slabs, seats;
  std::unique_ptr<float[]> partials;  // one [M, N] sum per seat after the caller's (y itself)
  std::unique_ptr<std::atomic<bool>[]> seated;
  std::atomic<int64_t> next_seat{0};
  std::atomic<int64_t> next_slab{0};
  std::atomic<int64_t> done{0};

  void Run() {
    const int64_t seat = next_seat.fetch_add(1);
    if (seat >= seats) return;
    float* sum = seat == 0 ? y : partials.get() + (seat - 1) * m_rows * n_dim;
    bool first = true;
    for (int64_t s = next_slab.fetch_add(1); s < slabs; s = next_slab.fetch_add(1)) {
      if (first && seat > 0) {
        std::fill(sum, sum + m_rows * n_dim, 0.f);
        seated[seat].store(true, std::memory_order_relaxed);
        first = false;
      }
      SumRows(x, w, scales, sum, m_rows, k_dim, n_dim, s * slab, std::min(k_dim, (s + 1) * slab));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename W>
ffi::Error Matmul(ffi::ThreadPool& pool, const float* x, int64_t x_elements, const W* w,
                  int64_t k_dim, int64_t n_dim, const float* scales, float* y) {
  auto job = std::make_shared<Job<W>>();
  job->x = x;
  job->w = w;
  job->scales = scales;
  job->y = y;
  job->m_rows = x_elements / k_dim;
  job->k_dim = k_dim;
  job->n_dim = n_dim;
  job->seats = std::max<int64_t>(1, pool.num_threads());
  // Several slabs per seat: a task woken late still finds work, and none is left to one thread.
  job->slab = std::max<int64_t>(8, (k_dim / (4 * job->seats)) / 8 * 8);
  job->slabs = (k_dim + job->slab - 1) / job->slab;
  const int64_t size = job->m_rows * n_dim;
  job->partials.reset(new float[(job->seats - 1) * size]);
  job->seated.reset(new std::atomic<bool>[job->seats]);
  for (int64_t i = 0; i < job->seats; ++i) job->seated[i].store(false);
  std::fill(y, y + size, 0.f);  // before any task can start summing into it
  for (int64_t i = 1; i < job->seats; ++i) pool.Schedule([job] { job->Run(); });
  job->Run();
  // Every slab is claimed; the ones still running belong to tasks already at work.
  while (job->done.load(std::memory_order_acquire) < job->slabs) std::this_thread::yield();
  for (int64_t seat = 1; seat < job->seats; ++seat) {
    if (!job->seated[seat].load(std::memory_order_relaxed)) continue;
    const float* part = job->partials.get() + (seat - 1) * size;
    for (int64_t i = 0; i < size; ++i) y[i] += part[i];
  }
  return ffi::Error::Success();
}

ffi::Error CheckShapes(ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> w_dims) {
  if (w_dims.size() != 2) return ffi::Error::InvalidArgument("w must be 2-D");
  if (x_dims.size() == 0 || x_dims.back() != w_dims[0]) {
    return ffi::Error::InvalidArgument("x's last dimension must equal w's first");
  }
  return ffi::Error::Success();
}

ffi::Error Bf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  if (auto e = CheckShapes(x.dimensions(), w.dimensions()); e.failure()) return e;
  return Matmul(pool, x.typed_data(), x.element_count(),
                reinterpret_cast<const uint16_t*>(w.typed_data()), w.dimensions()[0],
                w.dimensions()[1], nullptr, y->typed_data());
}

ffi::Error Int8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                    ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> y) {
  if (auto e = CheckShapes(x.dimensions(), w.dimensions()); e.failure()) return e;
  const int64_t k_dim = w.dimensions()[0], n_dim = w.dimensions()[1];
  const auto s_dims = scales.dimensions();
  if (k_dim % kQuantBlock != 0 || s_dims.size() != 2 || s_dims[0] != k_dim / kQuantBlock ||
      s_dims[1] != n_dim) {
    return ffi::Error::InvalidArgument("scales must be [K / 32, N] for w [K, N], K % 32 == 0");
  }
  return Matmul(pool, x.typed_data(), x.element_count(), w.typed_data(), k_dim, n_dim,
                scales.typed_data(), y->typed_data());
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
