// cqjax_attention_bf16: grouped-query attention over a bfloat16 KV cache, for
// decoding (a few query rows per head group). XLA's CPU backend widens a
// bfloat16 cache to float32 on every step (its dynamic-update-slice and the
// dots that read the cache), so the cache is stored as its uint16 bits, updated
// in place by XLA, and read here: each key and value widened in registers,
// scores, mask, softmax and the weighted sum of values in one pass over the
// cache, float32 throughout.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "cqjax/cq_kernel.h"
#include "cqjax/ffi_handlers.h"
#include "cqjax/ffi_util.h"
#include "cqjax/parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace cqjax {
namespace attn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::max();  // layers._NEG_INF

#define CQJAX_INLINE inline __attribute__((always_inline))

CQJAX_INLINE float Bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// exp(x) for x <= 0 to ~2e-7 relative (Cody-Waite reduction, degree-6
// polynomial, 2^n from the exponent bits); written so loops over it vectorize.
CQJAX_INLINE float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Shape {
  int N, R, D, Dv, S, T, kv;  // N = B·KV groups, R = G·T rows per group (row r is position r % T)
  float scale, softcap;       // softcap 0: none
};

// Scores of one query row over S slots -> their softmax over the slots its mask
// row lets it attend. A row with no slot to attend (padding) averages every
// value, as softmax over equal scores does in the JAX reference.
CQJAX_INLINE void Softmax(const Shape& sh, const bool* m, float* sr) {
  const int S = sh.S;
  if (sh.softcap > 0) {
    for (int s = 0; s < S; ++s) sr[s] = std::tanh(sr[s] / sh.softcap) * sh.softcap;
  }
  for (int s = 0; s < S; ++s) sr[s] = m[s] ? sr[s] : kNegInf;
  float mx = kNegInf;
  for (int s = 0; s < S; ++s) mx = std::max(mx, sr[s]);
  for (int s = 0; s < S; ++s) sr[s] = ExpNonPositive(sr[s] - mx);
  float sum = 0.0f;
  for (int s = 0; s < S; ++s) sum += sr[s];
  const float inv = 1.0f / sum;
  for (int s = 0; s < S; ++s) sr[s] *= inv;
}

// One head group n: q [R, D], k [D, S] and v [S, Dv] as bfloat16 bits, mask
// rows [T, S] of its batch row; out [R, Dv]. scores: R·(S + D) floats of scratch.
CQJAX_INLINE void GroupBody(const Shape& sh, const float* q, const uint16_t* k, const uint16_t* v,
                            const bool* mask, float* out, float* scores) {
  const int R = sh.R, D = sh.D, Dv = sh.Dv, S = sh.S;
  std::fill(scores, scores + static_cast<size_t>(R) * S, 0.0f);
  for (int d = 0; d < D; ++d) {
    const uint16_t* kd = k + static_cast<size_t>(d) * S;
    for (int r = 0; r < R; ++r) {
      const float qd = q[static_cast<size_t>(r) * D + d] * sh.scale;
      float* sr = scores + static_cast<size_t>(r) * S;
      for (int s = 0; s < S; ++s) sr[s] += qd * Bf16(kd[s]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* sr = scores + static_cast<size_t>(r) * S;
    Softmax(sh, mask + static_cast<size_t>(r % sh.T) * S, sr);
    float* o = out + static_cast<size_t>(r) * Dv;
    std::fill(o, o + Dv, 0.0f);
    for (int s = 0; s < S; ++s) {
      const float p = sr[s];
      const uint16_t* vs = v + static_cast<size_t>(s) * Dv;
      for (int j = 0; j < Dv; ++j) o[j] += p * Bf16(vs[j]);
    }
  }
}

void GroupGeneric(const Shape& sh, const float* q, const uint16_t* k, const uint16_t* v,
                  const bool* mask, float* out, float* scores) {
  GroupBody(sh, q, k, v, mask, out, scores);
}

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx2,fma"))) void GroupAvx2(const Shape& sh, const float* q,
                                                   const uint16_t* k, const uint16_t* v,
                                                   const bool* mask, float* out, float* scores) {
  GroupBody(sh, q, k, v, mask, out, scores);
}

// 16 bfloat16 values (their bits) widened to float32.
__attribute__((target("avx512f,avx512bw,avx2,fma"))) inline __m512 WidenAvx512(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// C[R, N] = A[R, X] · B[X, N] with B bfloat16 bits (row stride ldb): 4 rows of
// A by 64 columns of B at a time, their sums in 16 registers, so each element
// of B is loaded and widened once per 4 rows.
__attribute__((target("avx512f,avx512bw,avx2,fma"))) void GemmBf16Avx512(
    const float* A, int R, int X, const uint16_t* B, int ldb, int N, float* C, int ldc) {
  for (int r0 = 0; r0 < R; r0 += 4) {
    const int nr = std::min(4, R - r0);
    int n = 0;
    for (; n + 64 <= N; n += 64) {
      __m512 acc[4][4];
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps();
      for (int x = 0; x < X; ++x) {
        const uint16_t* b = B + static_cast<size_t>(x) * ldb + n;
        // B's rows are ldb apart (a key cache's rows are slots apart): fetch the
        // next block of each row ahead, as no hardware prefetcher follows
        // that many strided streams.
        _mm_prefetch(reinterpret_cast<const char*>(b + 256), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + 288), _MM_HINT_T0);
        const __m512 b0 = WidenAvx512(b), b1 = WidenAvx512(b + 16), b2 = WidenAvx512(b + 32), b3 = WidenAvx512(b + 48);
        for (int i = 0; i < 4; ++i) {
          if (i >= nr) break;
          const __m512 a = _mm512_set1_ps(A[static_cast<size_t>(r0 + i) * X + x]);
          acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
          acc[i][2] = _mm512_fmadd_ps(a, b2, acc[i][2]);
          acc[i][3] = _mm512_fmadd_ps(a, b3, acc[i][3]);
        }
      }
      for (int i = 0; i < nr; ++i)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(C + static_cast<size_t>(r0 + i) * ldc + n + 16 * c, acc[i][c]);
    }
    for (; n + 16 <= N; n += 16) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int x = 0; x < X; ++x) {
        const __m512 b0 = WidenAvx512(B + static_cast<size_t>(x) * ldb + n);
        for (int i = 0; i < nr; ++i)
          acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(A[static_cast<size_t>(r0 + i) * X + x]), b0, acc[i]);
      }
      for (int i = 0; i < nr; ++i) _mm512_storeu_ps(C + static_cast<size_t>(r0 + i) * ldc + n, acc[i]);
    }
    for (; n < N; ++n) {
      for (int i = 0; i < nr; ++i) {
        float sum = 0.0f;
        for (int x = 0; x < X; ++x) sum += A[static_cast<size_t>(r0 + i) * X + x] * Bf16(B[static_cast<size_t>(x) * ldb + n]);
        C[static_cast<size_t>(r0 + i) * ldc + n] = sum;
      }
    }
  }
}

// GroupBody with both products as register-blocked GEMMs: the keys and the
// values are each read once per 4 query rows.
__attribute__((target("avx512f,avx512bw,avx2,fma"))) void GroupAvx512(
    const Shape& sh, const float* q, const uint16_t* k, const uint16_t* v, const bool* mask,
    float* out, float* scores) {
  const int R = sh.R, D = sh.D, S = sh.S;
  float* qs = scores + static_cast<size_t>(R) * S;  // R·D scaled queries after the scores
  for (int i = 0; i < R * D; ++i) qs[i] = q[i] * sh.scale;
  GemmBf16Avx512(qs, R, D, k, S, S, scores, S);
  for (int r = 0; r < R; ++r) Softmax(sh, mask + static_cast<size_t>(r % sh.T) * S, scores + static_cast<size_t>(r) * S);
  GemmBf16Avx512(scores, R, S, v, sh.Dv, sh.Dv, out, sh.Dv);
}
#endif

using GroupFn = void (*)(const Shape&, const float*, const uint16_t*, const uint16_t*, const bool*,
                         float*, float*);

// The variant for the CQ kernels' active path (CQJAX_KERNEL_PATH /
// set_kernel_path force it, so tests reach every variant on one machine).
GroupFn Pick(std::string* error) {
  cq::Path path;
  if (!cq::ActivePath(&path, error)) return nullptr;
#if defined(__x86_64__) || defined(_M_X64)
  if (path == cq::Path::kAvx512 || path == cq::Path::kAvx512Vbmi) return GroupAvx512;
  if (path == cq::Path::kAvx2) return GroupAvx2;
#endif
  return GroupGeneric;
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::U16> k,
                         ffi::Buffer<ffi::U16> v, ffi::Buffer<ffi::PRED> mask, float scale,
                         float softcap, ffi::ResultBuffer<ffi::F32> out) {
  const char* who = "cqjax_attention_bf16";
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  auto od = out->dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 3 || od.size() != 3) {
    return ffi::Error::InvalidArgument(std::string(who) + ": expected q [N, R, D], k [N, D, S], v [N, S, Dv], "
                                       "mask [B, T, S], out [N, R, Dv]; got q " + DimsStr(qd) + ", k " +
                                       DimsStr(kd) + ", v " + DimsStr(vd) + ", mask " + DimsStr(md));
  }
  Shape sh{static_cast<int>(qd[0]), static_cast<int>(qd[1]), static_cast<int>(qd[2]),
           static_cast<int>(vd[2]), static_cast<int>(kd[2]), static_cast<int>(md[1]), 0, scale,
           softcap};
  const int B = static_cast<int>(md[0]);
  const bool ok = B > 0 && sh.N % B == 0 && sh.T > 0 && sh.R % sh.T == 0 && kd[0] == sh.N &&
                  kd[1] == sh.D && vd[0] == sh.N && vd[1] == sh.S && md[2] == sh.S &&
                  od[0] == sh.N && od[1] == sh.R && od[2] == sh.Dv;
  if (!ok) {
    return ffi::Error::InvalidArgument(std::string(who) + ": inconsistent shapes q " + DimsStr(qd) + ", k " +
                                       DimsStr(kd) + ", v " + DimsStr(vd) + ", mask " + DimsStr(md) + ", out " +
                                       DimsStr(od));
  }
  sh.kv = sh.N / B;
  std::string err;
  const GroupFn group = Pick(&err);
  if (!group) return ffi::Error::InvalidArgument(std::string(who) + ": " + err);
  const size_t need = static_cast<size_t>(sh.R) * (sh.S + sh.D);
  const float* qp = q.typed_data();
  const uint16_t* kp = k.typed_data();
  const uint16_t* vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  ParallelFor(&pool, PoolThreads(pool), sh.N, [&](int n) {
    thread_local std::vector<float> scratch;  // grows once per thread, reused by every call
    if (scratch.size() < need) scratch.resize(need);
    group(sh, qp + static_cast<size_t>(n) * sh.R * sh.D, kp + static_cast<size_t>(n) * sh.D * sh.S,
          vp + static_cast<size_t>(n) * sh.S * sh.Dv, mp + static_cast<size_t>(n / sh.kv) * sh.T * sh.S,
          op + static_cast<size_t>(n) * sh.R * sh.Dv, scratch.data());
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace attn
}  // namespace cqjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(CqjaxAttentionBf16, cqjax::attn::AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q [N, R, D]
                                  .Arg<ffi::Buffer<ffi::U16>>()    // k [N, D, S], bfloat16 bits
                                  .Arg<ffi::Buffer<ffi::U16>>()    // v [N, S, Dv], bfloat16 bits
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // mask [B, T, S]
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>());
