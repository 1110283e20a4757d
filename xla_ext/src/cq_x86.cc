// CQ lookup-matmul, x86 paths: AVX2 (vpshufb + vpmaddubsw) and AVX-512 VNNI
// (vpshufb + vpdpbusd). Compiled with per-function target attributes and
// chosen at run time (cq_common.cc); see cqjax/cq_kernel.h for the scheme.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cqjax/cq_kernel.h"
#include "cqjax/formats.h"

#define CQ_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,fma,f16c,avx2")))
#define CQ_AVX512_VBMI                                                                \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx512vbmi,fma,f16c,avx2")))
#define CQ_AVX2 __attribute__((target("avx2,fma")))

namespace cqjax {
namespace cq {
namespace {

constexpr int kMaxMB = 4;  // activation rows per pass over the weights (AVX2: 16 registers)
constexpr int kMaxMB512 = 8;  // the same with AVX-512's 32 registers
// The code rows are read once, in order: each chunk asks for the bytes this far ahead (the
// hardware prefetcher alone left batch-1 calls waiting on the code loads: 576x576 4-bit
// 37.8 -> 24.9 us per call on a Xeon; 512-4096 measured alike).
constexpr int kPrefetchBytes = 1024;

#define CQ512_TARGET CQ_AVX512
#define CQ512_NS avx512_shuffle
#define CQ512_VBMI 0
#include "cq_avx512_impl.h"
#undef CQ512_TARGET
#undef CQ512_NS
#undef CQ512_VBMI
#define CQ512_TARGET CQ_AVX512_VBMI
#define CQ512_NS avx512_vbmi
#define CQ512_VBMI 1
#include "cq_avx512_impl.h"
#undef CQ512_TARGET
#undef CQ512_NS
#undef CQ512_VBMI

// ---------------------------------------------------------------- AVX2

CQ_AVX2 inline __m256i Lut256(const uint8_t* lut16) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut16)));
}

CQ_AVX2 inline __m256i ByteMask256(uint64_t mask) {
  alignas(32) uint8_t b[32];
  for (int i = 0; i < 32; ++i) b[i] = (mask >> i) & 1 ? 0xFF : 0;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
}

CQ_AVX2 inline float Hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int BITS, int MB>
CQ_AVX2 void Rows256(const Plan& p, const Prepared& q, const uint8_t* codes,
                     const uint16_t* norms, int n0, int n1, int m0, float* y, int N, float* nf,
                     float* wsc) {
  constexpr int LB = BITS == 3 ? 2 : BITS;
  constexpr int PER = 8 / LB;
  const int nb = p.nblocks, nch = p.nchunks, W = nb + 16;
  const size_t xstride = static_cast<size_t>(nch) * PER * 32;
  const int tail = p.plane_bytes - (nch - 1) * 32;  // 1..32
  const __m256i low = _mm256_set1_epi8(static_cast<char>((1 << LB) - 1));
  const __m256i four = _mm256_set1_epi8(4);
  const __m256i nib = _mm256_set1_epi16(0x0F);
  const __m256i nibhi = _mm256_set1_epi16(0x0F00);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xr = q.xr.data() + m0 * xstride;
  alignas(32) uint8_t tmp[48];

  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = codes + static_cast<size_t>(n) * p.row_bytes;
    const uint16_t* nh = norms + static_cast<size_t>(n) * nb;
    for (int j = 0; j < nb; ++j) nf[j] = formats::HalfToFloat(nh[j]);
    #pragma GCC unroll 8
    for (int mi = 0; mi < MB; ++mi) {
      const float* fx = q.fx.data() + static_cast<size_t>(m0 + mi) * nb;
      float* w = wsc + mi * W;
      for (int j = 0; j < nb; ++j) w[j] = nf[j] * fx[j];
    }
    __m256 facc[MB];
    #pragma GCC unroll 8
    for (int mi = 0; mi < MB; ++mi) facc[mi] = _mm256_setzero_ps();
    for (int c = 0; c < nch; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(row + c * 32 + kPrefetchBytes), _MM_HINT_T0);
      const uint8_t* lo = row + c * 32;
      const uint8_t* hp = row + p.hi_offset + c * 16;
      if (c == nch - 1 && tail < 32) {  // never read past the row's last byte
        std::memset(tmp, 0, sizeof tmp);
        std::memcpy(tmp, lo, tail);
        if (BITS == 3) std::memcpy(tmp + 32, hp, tail / 2);
        lo = tmp;
        hp = tmp + 32;
      }
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo));
      __m256i e = _mm256_setzero_si256();
      if (BITS == 3) {
        const __m256i h16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hp)));
        e = _mm256_or_si256(_mm256_and_si256(h16, nib),
                            _mm256_and_si256(_mm256_slli_epi16(h16, 4), nibhi));
      }
      __m256i acc[MB];
      #pragma GCC unroll 8
      for (int mi = 0; mi < MB; ++mi) acc[mi] = _mm256_setzero_si256();
      const int lf = p.lut_first[c];
      const int nl = q.lut_count_eff[c];
      const __m256i lut0 = Lut256(q.lut.data() + p.lut_block[lf] * 16);
#pragma GCC unroll 8
      for (int f = 0; f < PER; ++f) {
        __m256i idx = _mm256_and_si256(_mm256_srli_epi16(v, f * LB), low);
        if (BITS == 3) {
          __m256i hb = f == 0   ? _mm256_slli_epi16(e, 2)
                       : f == 1 ? _mm256_slli_epi16(e, 1)
                       : f == 2 ? e
                                : _mm256_srli_epi16(e, 1);
          idx = _mm256_or_si256(idx, _mm256_and_si256(hb, four));
        }
        __m256i wv = _mm256_shuffle_epi8(lut0, idx);
        for (int t = 1; t < nl; ++t) {
          const __m256i w2 = _mm256_shuffle_epi8(Lut256(q.lut.data() + p.lut_block[lf + t] * 16), idx);
          wv = _mm256_blendv_epi8(wv, w2, ByteMask256(p.lut_mask[lf + t]));
        }
        const __m256i aw = _mm256_sign_epi8(wv, wv);
        const int8_t* xp = xr + (static_cast<size_t>(c) * PER + f) * 32;
        #pragma GCC unroll 8
        for (int mi = 0; mi < MB; ++mi) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + mi * xstride));
          const __m256i p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
          acc[mi] = _mm256_add_epi32(acc[mi], _mm256_madd_epi16(p16, ones));
        }
      }
      const __m256i li = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.lane_block.data() + c * 8));
      const int b0 = p.chunk_b0[c];
      #pragma GCC unroll 8
      for (int mi = 0; mi < MB; ++mi) {
        const __m256 s = _mm256_permutevar8x32_ps(_mm256_loadu_ps(wsc + mi * W + b0), li);
        facc[mi] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[mi]), s, facc[mi]);
      }
    }
    #pragma GCC unroll 8
    for (int mi = 0; mi < MB; ++mi) y[static_cast<size_t>(m0 + mi) * N + n] = Hsum256(facc[mi]);
  }
}

template <int BITS>
CQ_AVX2 void Dispatch256(const Plan& p, const Prepared& q, const uint8_t* codes,
                         const uint16_t* norms, int n0, int n1, float* y, int N) {
  const int nb = p.nblocks;
  std::vector<float> nf(nb + 16, 0.0f), wsc(static_cast<size_t>(kMaxMB) * (nb + 16), 0.0f);
  for (int m0 = 0; m0 < q.M; m0 += kMaxMB) {
    switch (std::min(kMaxMB, q.M - m0)) {
      case 1: Rows256<BITS, 1>(p, q, codes, norms, n0, n1, m0, y, N, nf.data(), wsc.data()); break;
      case 2: Rows256<BITS, 2>(p, q, codes, norms, n0, n1, m0, y, N, nf.data(), wsc.data()); break;
      case 3: Rows256<BITS, 3>(p, q, codes, norms, n0, n1, m0, y, N, nf.data(), wsc.data()); break;
      default: Rows256<BITS, 4>(p, q, codes, norms, n0, n1, m0, y, N, nf.data(), wsc.data());
    }
  }
}

}  // namespace

CQ_AVX2 int QuantizeBlockAvx2(const float* v, int b, int8_t* xq, float* amax, bool* finite) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps(), poison = _mm256_setzero_ps();
  for (int k = 0; k < b; k += 8) {
    const __m256 x = _mm256_loadu_ps(v + k);
    poison = _mm256_add_ps(poison, _mm256_mul_ps(x, _mm256_setzero_ps()));
    mx = _mm256_max_ps(_mm256_andnot_ps(sign, x), mx);  // a NaN lane keeps mx (second operand)
  }
  alignas(32) float lanes[8], bad[8];
  _mm256_store_ps(lanes, mx);
  _mm256_store_ps(bad, poison);
  float m = 0.0f;
  bool ok = true;
  for (int i = 0; i < 8; ++i) {
    m = std::max(m, lanes[i]);
    ok = ok && bad[i] == 0.0f;
  }
  const float inv = m > 0.0f && std::isfinite(m) ? 127.0f / m : 0.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  __m256i acc = _mm256_setzero_si256();
  for (int k = 0; k < b; k += 8) {
    // round half to even (as nearbyint in the default mode), then clamp as the reference does
    // (max/min return their second operand for a NaN lane: -127, as std::max(-127.f, NaN))
    __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + k), vinv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
    const __m256i qi = _mm256_cvttps_epi32(q);
    acc = _mm256_add_epi32(acc, qi);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(xq + k), _mm_packs_epi16(w, w));
  }
  alignas(32) int32_t s[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(s), acc);
  *amax = m;
  *finite = ok;
  return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

void MatmulRowsAvx512(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                      const uint16_t* norms, int n0, int n1, float* y, int N, bool vbmi) {
  if (vbmi) return avx512_vbmi::Rows(plan, prep, codes, norms, n0, n1, y, N);
  avx512_shuffle::Rows(plan, prep, codes, norms, n0, n1, y, N);
}

void MatmulRowsAvx2(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                    const uint16_t* norms, int n0, int n1, float* y, int N) {
  switch (plan.bits) {
    case 1: return Dispatch256<1>(plan, prep, codes, norms, n0, n1, y, N);
    case 2: return Dispatch256<2>(plan, prep, codes, norms, n0, n1, y, N);
    case 3: return Dispatch256<3>(plan, prep, codes, norms, n0, n1, y, N);
    default: return Dispatch256<4>(plan, prep, codes, norms, n0, n1, y, N);
  }
}

}  // namespace cq
}  // namespace cqjax
#endif  // x86
