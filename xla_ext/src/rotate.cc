// The CQ rotation (see cqjax/rotate.h). The transform has a plain and an AVX2
// build, chosen at run time; both do the same adds and subtracts on the same
// values (the AVX2 one 8 lanes at a time), so they round identically.
#include "cqjax/rotate.h"

#include <cmath>

#include "cqjax/cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace cqjax {
namespace {

using Transform = void (*)(float*, int);

void FwhtPlain(float* v, int b) {
  for (int h = 1; h < b; h *= 2) {
    for (int i = 0; i < b; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        const float a = v[j], c = v[j + h];
        v[j] = a + c;
        v[j + h] = a - c;
      }
    }
  }
}

#if defined(__x86_64__)
// Stages h = 1, 2, 4 within one register of 8: lane j (the low one of its
// pair) gets v[j] + v[j + h], lane j + h gets v[j] - v[j + h], as FwhtPlain.
__attribute__((target("avx2"))) inline __m256 Fwht8(__m256 a) {
  __m256 t = _mm256_permute_ps(a, 0xB1);  // [1, 0, 3, 2]
  a = _mm256_blend_ps(_mm256_add_ps(a, t), _mm256_sub_ps(t, a), 0xAA);
  t = _mm256_permute_ps(a, 0x4E);  // [2, 3, 0, 1]
  a = _mm256_blend_ps(_mm256_add_ps(a, t), _mm256_sub_ps(t, a), 0xCC);
  t = _mm256_permute2f128_ps(a, a, 0x01);  // halves swapped
  return _mm256_blend_ps(_mm256_add_ps(a, t), _mm256_sub_ps(t, a), 0xF0);
}

__attribute__((target("avx2"))) void FwhtAvx2(float* v, int b) {
  if (b < 8) return FwhtPlain(v, b);
  for (int i = 0; i < b; i += 8) _mm256_storeu_ps(v + i, Fwht8(_mm256_loadu_ps(v + i)));
  for (int h = 8; h < b; h *= 2) {
    for (int i = 0; i < b; i += 2 * h) {
      for (int j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(v + j), c = _mm256_loadu_ps(v + j + h);
        _mm256_storeu_ps(v + j, _mm256_add_ps(a, c));
        _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, c));
      }
    }
  }
}
#endif

Transform Best() {
#if defined(__x86_64__)
  static const Transform t = GetCpuFeatures().avx2 ? FwhtAvx2 : FwhtPlain;
  return t;
#else
  return FwhtPlain;
#endif
}

}  // namespace

void Fwht(float* v, int b) { Best()(v, b); }

void RotateRow(const float* x, int k, const int8_t* s1, const int8_t* s2, const int32_t* perm,
               const int* blocks, int nblocks, int kpad, float* out) {
  const Transform fwht = Best();
  for (int i = 0; i < kpad; ++i) out[i] = perm[i] < k ? x[perm[i]] * s2[i] : 0.0f;
  for (int j = 0, o = 0; j < nblocks; o += blocks[j], ++j) {
    const int b = blocks[j];
    fwht(out + o, b);
    const float scale = 1.0f / std::sqrt(static_cast<float>(b));
    for (int i = o; i < o + b; ++i) out[i] *= scale * s1[i];
  }
}

}  // namespace cqjax
