// CQ lookup-matmul, AArch64 NEON path (vqtbl1q LUT + vmull_s8); the dotprod
// variant lives in cq_neon_dot.cc (compiled with +dotprod). See cqjax/cq_kernel.h.
#if defined(__aarch64__)
#include "cq_neon_impl.h"

namespace cqjax {
namespace cq {

void MatmulRowsNeonDot(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                       const uint16_t* norms, int n0, int n1, float* y, int N);

namespace {
struct DotPlain {
  static inline int32x4_t Dot(int32x4_t acc, int8x16_t w, int8x16_t x) {
    const int16x8_t lo = vmull_s8(vget_low_s8(w), vget_low_s8(x));
    const int16x8_t hi = vmull_s8(vget_high_s8(w), vget_high_s8(x));
    return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
  }
};
}  // namespace

void MatmulRowsNeon(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                    const uint16_t* norms, int n0, int n1, float* y, int N, bool dot) {
  if (dot) return MatmulRowsNeonDot(plan, prep, codes, norms, n0, n1, y, N);
  neon_impl::DispatchBits<DotPlain>(plan, prep, codes, norms, n0, n1, y, N);
}

}  // namespace cq
}  // namespace cqjax
#endif  // __aarch64__
