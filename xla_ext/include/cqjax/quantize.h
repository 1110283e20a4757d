// The CQ quantizer's inner loops for weights (the fast path of
// cqjax/passes/codebook_core.py's quantize_rows with gain "none", of
// cqjax/formats/cq.py's pack_codes, and of the rotated-basis error sums of
// cqjax/stream.py). NumPy keeps the plain reference; tests compare both.
//
// Per (row, block j of size b at offset o) of rotated rows x[rows][kpad]:
//   n    = sqrt(sum_k double(x_k)^2)          (summed in NumPy's order, see .cc)
//   u_k  = x_k / float(n > 0 ? n : 1)         (float32)
//   code = #{t : u_k > mids[j][t]}            (float32 compares; a tie goes low)
#ifndef CQJAX_QUANTIZE_H_
#define CQJAX_QUANTIZE_H_

#include <cstdint>

namespace cqjax {

// codes[rows][kpad] and norms[rows][nblocks] (float64, before the fp16
// rounding) of rows r0..r1; mids: [nblocks][nmid] float32 level midpoints.
// Returns false when some norm is not finite (a non-finite input).
bool QuantizeRows(const float* x, long r0, long r1, int kpad, const int* blocks, int nblocks,
                  const float* mids, int nmid, uint8_t* codes, double* norms);

// (sum (x - level[code] * float(norm16))^2, sum x^2) in float64 over rows
// r0..r1 of packed codes (layout v1); levels: [nblocks][2^bits] float32;
// norms: fp16 bits [rows][nblocks].
void RotatedErrorSums(const float* x, const uint8_t* packed, int bits, const uint16_t* norms, long r0,
                      long r1, int kpad, const int* blocks, int nblocks, const float* levels,
                      double* err, double* ref);

// Packs rows r0..r1 of codes[rows][kpad] (layout v1, formats.h PackRow).
// Returns false when a code is >= 2^bits.
bool PackRows(const uint8_t* codes, long r0, long r1, int kpad, int bits, uint8_t* out);

}  // namespace cqjax

#endif  // CQJAX_QUANTIZE_H_
