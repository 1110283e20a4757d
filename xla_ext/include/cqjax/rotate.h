// The CQ format's block-local randomized Walsh-Hadamard rotation R (see
// cqjax/formats/rotation.py): per block of size b (a power of two),
//   (R v)[k] = s1[k] / sqrt(b) * (H_b (s2 * P v))[k],   (P v)[k] = v[perm[k]],
// with v zero-padded from K to Kpad = sum(blocks). One code path serves the
// quantizer (cqjax._xla_ext.rotate_rows, rotating weight rows) and the
// kernels (rotating activations), so both round identically.
//
// Rounding is fixed by the order of operations below (butterflies in natural
// order, then one multiply by +-1/sqrt(b)): the result does not depend on the
// thread count, the SIMD path or the machine.
#ifndef CQJAX_ROTATE_H_
#define CQJAX_ROTATE_H_

#include <cstdint>

namespace cqjax {

// In-place unnormalized Walsh-Hadamard transform of v[0..b), natural
// (Sylvester) order; b a power of two. AVX2 where the CPU has it (same bits).
void Fwht(float* v, int b);

// out[0..kpad) = R x for one row x[0..k) (k <= kpad): gather by perm (indices
// >= k read zero), multiply by s2, FWHT per block, multiply by s1/sqrt(b).
// blocks: nblocks powers of two summing to kpad.
void RotateRow(const float* x, int k, const int8_t* s1, const int8_t* s2, const int32_t* perm,
               const int* blocks, int nblocks, int kpad, float* out);

}  // namespace cqjax

#endif  // CQJAX_ROTATE_H_
