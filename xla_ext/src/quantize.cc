// The CQ weight quantizer's inner loops (see cqjax/quantize.h). Each loop is
// written so the compiler vectorizes it, and built twice on x86 (baseline and
// AVX2, chosen at run time); -ffp-contract stays off (ISO C++), so both builds
// round identically.
#include "cqjax/quantize.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "cqjax/cpu_features.h"
#include "cqjax/formats.h"

#if defined(__x86_64__)
#define CQJAX_AVX2 __attribute__((target("avx2")))
#endif

namespace cqjax {
namespace {

#define CQJAX_INLINE inline __attribute__((always_inline))

// NumPy's pairwise float64 sum (numpy/_core/src/umath/loops_utils.h.src) of
// a[0..n), n <= 128: sequential below 8 terms, else 8 running sums over the
// multiple of 8 combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)) plus the rest.
CQJAX_INLINE double PairwiseBlock(const double* a, int n) {
  if (n < 8) {
    double res = 0.0;
    for (int i = 0; i < n; ++i) res += a[i];
    return res;
  }
  double r[8];
  for (int j = 0; j < 8; ++j) r[j] = a[j];
  int i = 8;
  for (; i < n - (n % 8); i += 8) {
    for (int j = 0; j < 8; ++j) r[j] += a[i + j];
  }
  double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
  for (; i < n; ++i) res += a[i];
  return res;
}

// Any n: above 128, halves cut at a multiple of 8. np.sum over a contiguous
// axis is exactly this.
double PairwiseSum(const double* a, int n) {
  if (n <= 128) return PairwiseBlock(a, n);
  int n2 = n / 2;
  n2 -= n2 % 8;
  return PairwiseSum(a, n2) + PairwiseSum(a + n2, n - n2);
}

CQJAX_INLINE bool QuantizeImpl(const float* x, long r0, long r1, int kpad, const int* blocks, int nblocks,
                               const float* mids, int nmid, uint8_t* codes, double* norms) {
  bool finite = true;
  int bmax = 0;
  for (int j = 0; j < nblocks; ++j) bmax = blocks[j] > bmax ? blocks[j] : bmax;
  std::vector<double> sq(bmax);
  std::vector<float> u(bmax);
  for (long r = r0; r < r1; ++r) {
    const float* xr = x + r * kpad;
    uint8_t* cr = codes + r * kpad;
    for (int j = 0, o = 0; j < nblocks; o += blocks[j], ++j) {
      const int b = blocks[j];
      const float* xb = xr + o;
      for (int k = 0; k < b; ++k) sq[k] = static_cast<double>(xb[k]) * static_cast<double>(xb[k]);
      const double n = std::sqrt(b <= 128 ? PairwiseBlock(sq.data(), b) : PairwiseSum(sq.data(), b));
      norms[r * nblocks + j] = n;
      finite = finite && std::isfinite(n);
      const float nf = n > 0 ? static_cast<float>(n) : 1.0f;
      for (int k = 0; k < b; ++k) u[k] = xb[k] / nf;
      uint8_t* cb = cr + o;
      for (int k = 0; k < b; ++k) cb[k] = 0;
      const float* m = mids + static_cast<long>(j) * nmid;
      for (int t = 0; t < nmid; ++t) {
        const float mt = m[t];
        for (int k = 0; k < b; ++k) cb[k] += u[k] > mt ? 1 : 0;
      }
    }
  }
  return finite;
}

// Unpacks one row of packed codes (layout v1) into c[0..kpad).
template <int kBits>
CQJAX_INLINE void UnpackPlane(const uint8_t* p, int n, uint8_t* c) {
  constexpr int per = 8 / kBits, mask = (1 << kBits) - 1;
  for (int i = 0; i < n / per; ++i) {
    for (int s = 0; s < per; ++s) c[i * per + s] = (p[i] >> (kBits * s)) & mask;
  }
}

CQJAX_INLINE void UnpackRow(const uint8_t* row, int kpad, int bits, uint8_t* c, uint8_t* tmp) {
  switch (bits) {
    case 1: UnpackPlane<1>(row, kpad, c); break;
    case 2: UnpackPlane<2>(row, kpad, c); break;
    case 4: UnpackPlane<4>(row, kpad, c); break;
    case 8: std::memcpy(c, row, kpad); break;
    case 3:
      UnpackPlane<2>(row, kpad, c);
      UnpackPlane<1>(row + kpad / 4, kpad, tmp);
      for (int k = 0; k < kpad; ++k) c[k] |= tmp[k] << 2;
      break;
  }
}

template <int kBits>
CQJAX_INLINE void PackPlane(const uint8_t* c, int n, uint8_t* p) {
  constexpr int per = 8 / kBits, mask = (1 << kBits) - 1;
  for (int i = 0; i < n / per; ++i) {
    uint8_t v = 0;
    for (int s = 0; s < per; ++s) v |= (c[i * per + s] & mask) << (kBits * s);
    p[i] = v;
  }
}

CQJAX_INLINE bool PackImpl(const uint8_t* codes, long r0, long r1, int kpad, int bits, uint8_t* out) {
  const int rb = formats::RowBytes(kpad, bits);
  std::vector<uint8_t> hi(kpad);
  for (long r = r0; r < r1; ++r) {
    const uint8_t* c = codes + r * kpad;
    uint8_t* p = out + r * rb;
    uint8_t bad = 0;
    for (int k = 0; k < kpad; ++k) bad |= c[k] >> (bits & 7);  // bits 8: >> 0 of a byte below 256
    if (bits < 8 && bad) return false;
    switch (bits) {
      case 1: PackPlane<1>(c, kpad, p); break;
      case 2: PackPlane<2>(c, kpad, p); break;
      case 4: PackPlane<4>(c, kpad, p); break;
      case 8: std::memcpy(p, c, kpad); break;
      case 3:
        PackPlane<2>(c, kpad, p);
        for (int k = 0; k < kpad; ++k) hi[k] = c[k] >> 2;
        PackPlane<1>(hi.data(), kpad, p + kpad / 4);
        break;
    }
  }
  return true;
}

CQJAX_INLINE void ErrorImpl(const float* x, const uint8_t* packed, int bits, const uint16_t* norms, long r0,
                            long r1, int kpad, const int* blocks, int nblocks, const float* levels,
                            double* err, double* ref) {
  const int rb = formats::RowBytes(kpad, bits), nlev = 1 << bits;
  std::vector<uint8_t> c(kpad), tmp(kpad);
  std::vector<float> dq(kpad);
  double e[8] = {0}, w[8] = {0};
  for (long r = r0; r < r1; ++r) {
    const float* xr = x + r * kpad;
    UnpackRow(packed + r * rb, kpad, bits, c.data(), tmp.data());
    for (int j = 0, o = 0; j < nblocks; o += blocks[j], ++j) {
      const float n = formats::HalfToFloat(norms[r * nblocks + j]);
      const float* lv = levels + static_cast<long>(j) * nlev;
      for (int k = o; k < o + blocks[j]; ++k) dq[k] = lv[c[k]] * n;
    }
    for (int k = 0; k < kpad; k += 8) {  // kpad % 8 == 0
      for (int s = 0; s < 8; ++s) {
        const double xv = xr[k + s], d = xv - static_cast<double>(dq[k + s]);
        e[s] += d * d;
        w[s] += xv * xv;
      }
    }
  }
  *err = *ref = 0.0;
  for (int s = 0; s < 8; ++s) {
    *err += e[s];
    *ref += w[s];
  }
}

#if defined(__x86_64__)
CQJAX_AVX2 bool QuantizeAvx2(const float* x, long r0, long r1, int kpad, const int* blocks, int nblocks,
                             const float* mids, int nmid, uint8_t* codes, double* norms) {
  return QuantizeImpl(x, r0, r1, kpad, blocks, nblocks, mids, nmid, codes, norms);
}
CQJAX_AVX2 bool PackAvx2(const uint8_t* codes, long r0, long r1, int kpad, int bits, uint8_t* out) {
  return PackImpl(codes, r0, r1, kpad, bits, out);
}
CQJAX_AVX2 void ErrorAvx2(const float* x, const uint8_t* packed, int bits, const uint16_t* norms, long r0,
                          long r1, int kpad, const int* blocks, int nblocks, const float* levels,
                          double* err, double* ref) {
  ErrorImpl(x, packed, bits, norms, r0, r1, kpad, blocks, nblocks, levels, err, ref);
}
bool UseAvx2() { return GetCpuFeatures().avx2; }
#endif

}  // namespace

bool QuantizeRows(const float* x, long r0, long r1, int kpad, const int* blocks, int nblocks,
                  const float* mids, int nmid, uint8_t* codes, double* norms) {
#if defined(__x86_64__)
  if (UseAvx2()) return QuantizeAvx2(x, r0, r1, kpad, blocks, nblocks, mids, nmid, codes, norms);
#endif
  return QuantizeImpl(x, r0, r1, kpad, blocks, nblocks, mids, nmid, codes, norms);
}

void RotatedErrorSums(const float* x, const uint8_t* packed, int bits, const uint16_t* norms, long r0,
                      long r1, int kpad, const int* blocks, int nblocks, const float* levels,
                      double* err, double* ref) {
#if defined(__x86_64__)
  if (UseAvx2()) return ErrorAvx2(x, packed, bits, norms, r0, r1, kpad, blocks, nblocks, levels, err, ref);
#endif
  ErrorImpl(x, packed, bits, norms, r0, r1, kpad, blocks, nblocks, levels, err, ref);
}

bool PackRows(const uint8_t* codes, long r0, long r1, int kpad, int bits, uint8_t* out) {
#if defined(__x86_64__)
  if (UseAvx2()) return PackAvx2(codes, r0, r1, kpad, bits, out);
#endif
  return PackImpl(codes, r0, r1, kpad, bits, out);
}

}  // namespace cqjax
