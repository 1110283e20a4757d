// Runtime CPU feature detection.
//
// Kernels are compiled per instruction set with function-level
// __attribute__((target(...))) and chosen at run time from these flags; the
// extension is never built with -march=native, so one wheel runs everywhere.
#ifndef CQJAX_CPU_FEATURES_H_
#define CQJAX_CPU_FEATURES_H_

namespace cqjax {

// Instruction-set extensions of the running CPU. Flags of the other
// architecture are always false.
struct CpuFeatures {
  // x86-64
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vnni = false;
  bool avx512vbmi = false;
  bool avx512vl = false;
  // aarch64
  bool neon = false;
  bool dotprod = false;
};

// Detects the features once and returns the cached result (thread-safe).
const CpuFeatures& GetCpuFeatures();

}  // namespace cqjax

#endif  // CQJAX_CPU_FEATURES_H_
