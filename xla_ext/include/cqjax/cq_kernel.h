// CQ lookup-matmul and embedding-gather kernels (plain C++, no XLA types).
//
// y[m, n] = sum_k (R x_m)[k] * w_n[k], w_n[k] = cb[j][code(n, k)] * norm[n, j]
// (R: the block-local randomized Walsh-Hadamard rotation of cqjax.passes.
// rotate_core; the weight rows are stored rotated, so the activation is
// rotated here, once per call).
//
// Integer scheme (every path, so that all paths agree to float rounding):
//
// | quantity         | how                                                   |
// |------------------|-------------------------------------------------------|
// | activation       | per (row m, block j): sx = max|Rx| / 127,             |
// |                  | xq = round(Rx / sx) in [-127, 127] (int8)             |
// | codebook         | per block j: cs = max|cb_j| / 127,                    |
// |                  | lq = round(cb_j / cs) in [-127, 127] (int8 LUT)       |
// | block dot        | isum = sum_k lq[code k] * xq[k]  (exact int32)        |
// | result           | y = sum_j norm[n, j] * sx[m, j] * cs[j] * isum        |
//
// Paths (one signature, chosen at run time, forced by CQJAX_KERNEL_PATH):
//
// | path        | decode                          | dot                      |
// |-------------|---------------------------------|--------------------------|
// | ref         | scalar UnpackCode               | scalar int32             |
// | avx2        | vpshufb LUT, 32-byte chunks     | vpmaddubsw (sign trick)  |
// | avx512      | vpshufb LUT, 64-byte chunks     | vpdpbusd (VNNI), u8 LUT  |
// |             |                                 | offset +128 folded into  |
// |             |                                 | the accumulator's start  |
// | avx512vbmi  | vpermb on a 64-byte table that  | as avx512                |
// |             | repeats the levels: no masking  |                          |
// | neon        | vqtbl1q LUT, 16-byte chunks     | vmull_s8 + pairwise adds |
// | neon_dot    | vqtbl1q LUT, 16-byte chunks     | vdotq_s32 (dotprod)      |
//
// SIMD paths read the codes in their packed order: byte i of a chunk holds
// codes i*per + f (field f); the activation is reordered to match, so the
// packed layout (v1) is used as is. Each 32-bit accumulator lane covers 4
// bytes of one block; a plan where a lane would straddle two blocks (1-bit
// codes with 16-wide blocks at odd offsets) runs the reference path.
#ifndef CQJAX_CQ_KERNEL_H_
#define CQJAX_CQ_KERNEL_H_

#include <cstdint>
#include <string>
#include <vector>

namespace cqjax {
namespace cq {

enum class Path : int { kRef = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3, kNeonDot = 4, kAvx512Vbmi = 5 };
inline constexpr int kNumPaths = 6;

const char* PathName(Path p);
// Parses a path name ("ref", "avx2", "avx512", "avx512vbmi", "neon", "neon_dot"); false if unknown.
bool ParsePath(const std::string& name, Path* out);
// Compiled into this binary and supported by the running CPU.
bool PathSupported(Path p);
// The fastest supported path.
Path BestPath();
// The path used by calls: the override (SetPathOverride), else CQJAX_KERNEL_PATH
// (read once), else BestPath(). An unsupported forced path is an error.
bool ActivePath(Path* out, std::string* error);
// -1 clears the override.
void SetPathOverride(int path);
int PathOverride();

// Everything that depends only on (bits, blocks, K) and the path.
struct Plan {
  int bits = 0, K = 0, Kpad = 0, nblocks = 0, row_bytes = 0;
  std::vector<int> blocks, offs;  // offs: nblocks + 1 starts along Kpad
  // SIMD chunking (V = 0 for the reference path).
  int V = 0;            // bytes of the lane plane per chunk (16, 32, 64)
  int lanes = 0;        // V / 4 int32 lanes
  int per = 0;          // codes per byte of the lane plane (8 / bits, 4 for 3-bit)
  int plane_bytes = 0;  // bytes of the lane plane per row
  int hi_offset = 0;    // 3-bit: byte offset of the 1-bit plane in a row
  int nchunks = 0;
  bool simd = false;    // false: run the reference path
  std::vector<int32_t> chunk_b0;    // [nchunks] first block of the chunk
  std::vector<int32_t> lane_block;  // [nchunks][lanes] block - b0 (< lanes)
  // Byte masks of blocks within each chunk: for chunk c, nlut[c] entries of
  // (block j, 64-bit byte mask); the first entry covers the whole chunk.
  std::vector<int32_t> lut_count, lut_first;
  std::vector<int32_t> lut_block;
  std::vector<uint64_t> lut_mask;
};

// Validates (bits, blocks, K) and fills a plan for `path`; returns "" or an error.
std::string MakePlan(int bits, const int64_t* blocks, int nblocks, int K, Path path,
                     Plan* plan);

// The activation (and codebook) quantized for one call.
struct Prepared {
  int M = 0;
  std::vector<int8_t> lq;      // [nblocks][16] int8 levels (0 beyond 2^bits)
  std::vector<uint8_t> lut;    // [nblocks][16] table for the path (lq, or lq + 128)
  std::vector<uint8_t> lut64;  // [nblocks][64] lut64[i] = lut[i % 2^lane_bits] (vpermb)
  std::vector<int32_t> lut_count_eff;  // [nchunks] 1 where a chunk's blocks share one table
  std::vector<float> cs;       // [nblocks]
  std::vector<int8_t> xq;      // [M][Kpad] natural order (reference path)
  std::vector<int8_t> xr;      // [M][nchunks * per * V] chunk order (SIMD paths)
  std::vector<float> fx;       // [M][nblocks] sx * cs
  std::vector<int32_t> bias;   // [M][nchunks][lanes] (u8-LUT paths)
};

// Quantizes the codebooks (f16 bits [nblocks][2^bits]) into `prep`.
void PrepareCodebooks(const Plan& plan, const uint16_t* codebooks, Path path, Prepared* prep);

// Rotates (when rot_s1 != nullptr) and quantizes activation rows m0..m1 of
// x[M][xk] (xk = K when rotating, Kpad when x is already rotated). `prep`
// must be sized by ResizePrepared first; rows are independent (thread-safe
// for disjoint ranges).
void ResizePrepared(const Plan& plan, int M, Prepared* prep);
void PrepareRows(const Plan& plan, const float* x, int xk, const int8_t* s1, const int8_t* s2,
                 const int32_t* perm, int m0, int m1, Path path, Prepared* prep);

// y[m][n] for m in [0, M), n in [n0, n1); y has row stride N.
void MatmulRows(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                const uint16_t* norms, int n0, int n1, Path path, float* y, int N);

// Reference-path pieces (also used by tests).
void MatmulRowsRef(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                   const uint16_t* norms, int n0, int n1, float* y, int N);
// One block of a rotated activation row to int8: xq[k] = round(v[k] * 127 / amax) (ties to
// even), returned: the sum of xq, *amax = max |v[k]| (non-finite values skipped) and
// *finite = whether every v[k] is finite. The scalar version is the reference.
int QuantizeBlockRef(const float* v, int b, int8_t* xq, float* amax, bool* finite);
#if defined(__x86_64__) || defined(__i386__)
int QuantizeBlockAvx2(const float* v, int b, int8_t* xq, float* amax, bool* finite);  // b % 8 == 0
void MatmulRowsAvx2(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                    const uint16_t* norms, int n0, int n1, float* y, int N);
void MatmulRowsAvx512(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                      const uint16_t* norms, int n0, int n1, float* y, int N, bool vbmi);
#endif
#if defined(__aarch64__)
void MatmulRowsNeon(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                    const uint16_t* norms, int n0, int n1, float* y, int N, bool dot);
#endif

// Embedding gather: out[i][0..K) = R^T (cb[j][code] * norm[j])[ids[i]], float32.
// ids must already be checked to lie in [0, rows).
void GatherRows(const Plan& plan, const int32_t* ids, int nids, const uint8_t* codes,
                const uint16_t* norms, const uint16_t* codebooks, const int8_t* s1,
                const int8_t* s2, const int32_t* perm, float* out);

// Checks that perm keeps every index inside its own block (no out-of-bounds
// gathers); returns "" or an error.
std::string CheckRotation(const Plan& plan, const int8_t* s1, const int8_t* s2,
                          const int32_t* perm);

}  // namespace cq
}  // namespace cqjax

#endif  // CQJAX_CQ_KERNEL_H_
