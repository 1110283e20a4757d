// CQ lookup-matmul, AArch64 NEON + dot-product path (vqtbl1q LUT + vdotq_s32).
// This file alone is compiled with -march=armv8.2-a+dotprod (CMakeLists.txt);
// it is only called when the CPU reports dotprod (cq_common.cc).
#if defined(__aarch64__)
#include "cq_neon_impl.h"

namespace cqjax {
namespace cq {
namespace {
struct DotProd {
  static inline int32x4_t Dot(int32x4_t acc, int8x16_t w, int8x16_t x) {
    return vdotq_s32(acc, w, x);
  }
};
}  // namespace

void MatmulRowsNeonDot(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                       const uint16_t* norms, int n0, int n1, float* y, int N) {
  neon_impl::DispatchBits<DotProd>(plan, prep, codes, norms, n0, n1, y, N);
}

}  // namespace cq
}  // namespace cqjax
#endif  // __aarch64__
