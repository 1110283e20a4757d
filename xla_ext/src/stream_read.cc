// Streaming-read bandwidth probe (see cqjax/stream_read.h).
#include "cqjax/stream_read.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "cqjax/cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace cqjax {
namespace {

uint64_t SumPlain(const uint64_t* p, std::size_t n) {
  uint64_t a = 0, b = 0, c = 0, d = 0;
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a += p[i];
    b += p[i + 1];
    c += p[i + 2];
    d += p[i + 3];
  }
  for (; i < n; ++i) a += p[i];
  return a + b + c + d;
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) uint64_t SumAvx2(const uint64_t* p, std::size_t n) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a = _mm256_add_epi64(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_add_epi64(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
    c = _mm256_add_epi64(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
    d = _mm256_add_epi64(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 12)));
  }
  alignas(32) uint64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t),
                     _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
  return t[0] + t[1] + t[2] + t[3] + SumPlain(p + i, n - i);
}
#endif

uint64_t Sum(const uint64_t* p, std::size_t n) {
#if defined(__x86_64__)
  if (GetCpuFeatures().avx2) return SumAvx2(p, n);
#endif
  return SumPlain(p, n);
}

}  // namespace

double StreamReadGbs(std::size_t bytes, int threads, int reps) {
  threads = std::max(1, threads);
  const std::size_t n = bytes / 8;
  std::vector<uint64_t> buf(n);
  for (std::size_t i = 0; i < n; ++i) buf[i] = i;
  double best = 0.0;
  volatile uint64_t sink = 0;
  for (int r = 0; r < reps; ++r) {
    std::vector<uint64_t> sums(threads);
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    const std::size_t per = n / threads;
    for (int t = 1; t < threads; ++t) {
      pool.emplace_back([&, t] { sums[t] = Sum(buf.data() + t * per, t == threads - 1 ? n - t * per : per); });
    }
    sums[0] = Sum(buf.data(), threads == 1 ? n : per);
    for (auto& th : pool) th.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (auto v : sums) sink = sink + v;
    best = std::max(best, static_cast<double>(n * 8) / s / 1e9);
  }
  return best;
}

}  // namespace cqjax
