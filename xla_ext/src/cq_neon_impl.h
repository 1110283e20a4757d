// CQ lookup-matmul NEON body, templated on the int8 dot product D (included by
// cq_neon.cc and cq_neon_dot.cc; the latter is compiled with +dotprod).
#ifndef CQJAX_CQ_NEON_IMPL_H_
#define CQJAX_CQ_NEON_IMPL_H_
#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cqjax/cq_kernel.h"
#include "cqjax/formats.h"

namespace cqjax {
namespace cq {
namespace neon_impl {

constexpr int kMaxMB = 4;

inline uint8x16_t ByteMask128(uint64_t mask) {
  uint8_t b[16];
  for (int i = 0; i < 16; ++i) b[i] = (mask >> i) & 1 ? 0xFF : 0;
  return vld1q_u8(b);
}

template <class D, int BITS, int MB>
void Rows128(const Plan& p, const Prepared& q, const uint8_t* codes, const uint16_t* norms,
             int n0, int n1, int m0, float* y, int N, float* nf, float* wsc) {
  constexpr int LB = BITS == 3 ? 2 : BITS;
  constexpr int PER = 8 / LB;
  const int nb = p.nblocks, nch = p.nchunks, W = nb + 16;
  const size_t xstride = static_cast<size_t>(nch) * PER * 16;
  const int tail = p.plane_bytes - (nch - 1) * 16;  // 1..16
  const uint8x16_t low = vdupq_n_u8((1 << LB) - 1);
  const uint8x16_t one = vdupq_n_u8(1);
  const uint16x8_t nib = vdupq_n_u16(0x0F);
  const uint16x8_t nibhi = vdupq_n_u16(0x0F00);
  const int8_t* xr = q.xr.data() + m0 * xstride;
  uint8_t tmp[32];

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
    float32x4_t facc[MB];
    #pragma GCC unroll 8
    for (int mi = 0; mi < MB; ++mi) facc[mi] = vdupq_n_f32(0.0f);
    for (int c = 0; c < nch; ++c) {
      const uint8_t* lo = row + c * 16;
      const uint8_t* hp = row + p.hi_offset + c * 8;
      if (c == nch - 1 && tail < 16) {
        std::memset(tmp, 0, sizeof tmp);
        std::memcpy(tmp, lo, tail);
        if (BITS == 3) std::memcpy(tmp + 16, hp, tail / 2);
        lo = tmp;
        hp = tmp + 16;
      }
      const uint8x16_t v = vld1q_u8(lo);
      uint8x16_t e = vdupq_n_u8(0);
      if (BITS == 3) {
        const uint16x8_t h16 = vmovl_u8(vld1_u8(hp));
        e = vreinterpretq_u8_u16(vorrq_u16(vandq_u16(h16, nib), vandq_u16(vshlq_n_u16(h16, 4), nibhi)));
      }
      int32x4_t acc[MB];
      #pragma GCC unroll 8
      for (int mi = 0; mi < MB; ++mi) acc[mi] = vdupq_n_s32(0);
      const int lf = p.lut_first[c];
      const int nl = q.lut_count_eff[c];
      const int8x16_t lut0 = vld1q_s8(reinterpret_cast<const int8_t*>(q.lut.data() + p.lut_block[lf] * 16));
      for (int f = 0; f < PER; ++f) {
        uint8x16_t idx = vandq_u8(vshlq_u8(v, vdupq_n_s8(static_cast<int8_t>(-f * LB))), low);
        if (BITS == 3) {
          const uint8x16_t hb = vandq_u8(vshlq_u8(e, vdupq_n_s8(static_cast<int8_t>(-f))), one);
          idx = vorrq_u8(idx, vshlq_n_u8(hb, 2));
        }
        int8x16_t wv = vqtbl1q_s8(lut0, idx);
        for (int t = 1; t < nl; ++t) {
          const int8x16_t lt = vld1q_s8(reinterpret_cast<const int8_t*>(q.lut.data() + p.lut_block[lf + t] * 16));
          wv = vbslq_s8(ByteMask128(p.lut_mask[lf + t]), vqtbl1q_s8(lt, idx), wv);
        }
        const int8_t* xp = xr + (static_cast<size_t>(c) * PER + f) * 16;
        #pragma GCC unroll 8
        for (int mi = 0; mi < MB; ++mi) acc[mi] = D::Dot(acc[mi], wv, vld1q_s8(xp + mi * xstride));
      }
      const int32_t* li = p.lane_block.data() + c * 4;
      const float* ws0 = wsc + p.chunk_b0[c];
      #pragma GCC unroll 8
      for (int mi = 0; mi < MB; ++mi) {
        const float* ws = ws0 + mi * W;
        const float sv[4] = {ws[li[0]], ws[li[1]], ws[li[2]], ws[li[3]]};
        facc[mi] = vfmaq_f32(facc[mi], vcvtq_f32_s32(acc[mi]), vld1q_f32(sv));
      }
    }
    #pragma GCC unroll 8
    for (int mi = 0; mi < MB; ++mi) y[static_cast<size_t>(m0 + mi) * N + n] = vaddvq_f32(facc[mi]);
  }
}

template <class D, int BITS>
void Dispatch128(const Plan& p, const Prepared& q, const uint8_t* codes, const uint16_t* norms,
                 int n0, int n1, float* y, int N) {
  const int nb = p.nblocks;
  std::vector<float> nf(nb + 16, 0.0f), wsc(static_cast<size_t>(kMaxMB) * (nb + 16), 0.0f);
  for (int m0 = 0; m0 < q.M; m0 += kMaxMB) {
    switch (std::min(kMaxMB, q.M - m0)) {
      case 1: Rows128<D, BITS, 1>(p, q, codes, norms, n0, n1, m0, y, N, nf.data(), wsc.data()); break;
      case 2: Rows128<D, BITS, 2>(p, q, codes, norms, n0, n1, m0, y, N, nf.data(), wsc.data()); break;
      case 3: Rows128<D, BITS, 3>(p, q, codes, norms, n0, n1, m0, y, N, nf.data(), wsc.data()); break;
      default: Rows128<D, BITS, 4>(p, q, codes, norms, n0, n1, m0, y, N, nf.data(), wsc.data());
    }
  }
}

template <class D>
void DispatchBits(const Plan& p, const Prepared& q, const uint8_t* codes, const uint16_t* norms,
                  int n0, int n1, float* y, int N) {
  switch (p.bits) {
    case 1: return Dispatch128<D, 1>(p, q, codes, norms, n0, n1, y, N);
    case 2: return Dispatch128<D, 2>(p, q, codes, norms, n0, n1, y, N);
    case 3: return Dispatch128<D, 3>(p, q, codes, norms, n0, n1, y, N);
    default: return Dispatch128<D, 4>(p, q, codes, norms, n0, n1, y, N);
  }
}

}  // namespace neon_impl
}  // namespace cq
}  // namespace cqjax

#endif  // CQJAX_CQ_NEON_IMPL_H_
