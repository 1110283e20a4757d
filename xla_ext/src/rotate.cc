// The CQ rotation (see cqjax/rotate.h).
#include "cqjax/rotate.h"

#include <cmath>

namespace cqjax {

void Fwht(float* v, int b) {
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

void RotateRow(const float* x, int k, const int8_t* s1, const int8_t* s2, const int32_t* perm,
               const int* blocks, int nblocks, int kpad, float* out) {
  for (int i = 0; i < kpad; ++i) out[i] = perm[i] < k ? x[perm[i]] * s2[i] : 0.0f;
  for (int j = 0, o = 0; j < nblocks; o += blocks[j], ++j) {
    const int b = blocks[j];
    Fwht(out + o, b);
    const float scale = 1.0f / std::sqrt(static_cast<float>(b));
    for (int i = o; i < o + b; ++i) out[i] *= scale * s1[i];
  }
}

}  // namespace cqjax
