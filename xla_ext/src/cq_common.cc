// CQ kernels: plan, path selection, activation/codebook preparation, the
// scalar reference and the embedding gather (see cqjax/cq_kernel.h).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cqjax/cpu_features.h"
#include "cqjax/cq_kernel.h"
#include "cqjax/formats.h"
#include "cqjax/rotate.h"

namespace cqjax {
namespace cq {
namespace {

std::atomic<int> g_override{-1};

int EnvPath() {
  static const int v = [] {
    const char* s = std::getenv("CQJAX_KERNEL_PATH");
    if (!s || !*s || std::string(s) == "auto") return -1;
    Path p;
    if (!ParsePath(s, &p)) return -2;  // reported by ActivePath
    return static_cast<int>(p);
  }();
  return v;
}

int LaneBits(int bits) { return bits == 3 ? 2 : bits; }

}  // namespace

const char* PathName(Path p) {
  switch (p) {
    case Path::kRef: return "ref";
    case Path::kAvx2: return "avx2";
    case Path::kAvx512: return "avx512";
    case Path::kNeon: return "neon";
    case Path::kNeonDot: return "neon_dot";
    case Path::kAvx512Vbmi: return "avx512vbmi";
  }
  return "?";
}

bool ParsePath(const std::string& name, Path* out) {
  for (int i = 0; i < kNumPaths; ++i) {
    if (name == PathName(static_cast<Path>(i))) {
      *out = static_cast<Path>(i);
      return true;
    }
  }
  return false;
}

bool PathSupported(Path p) {
  const CpuFeatures& f = GetCpuFeatures();
  switch (p) {
    case Path::kRef:
      return true;
#if defined(__x86_64__) || defined(__i386__)
    case Path::kAvx2:
      return f.avx2 && f.fma;
    case Path::kAvx512:
      return f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni && f.fma;
    case Path::kAvx512Vbmi:
      return f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni && f.avx512vbmi && f.fma;
#endif
#if defined(__aarch64__)
    case Path::kNeon:
      return f.neon;
    case Path::kNeonDot:
      return f.neon && f.dotprod;
#endif
    default:
      return false;
  }
}

Path BestPath() {
  // avx512vbmi (vpermb decode) measured no faster than vpshufb on AMD Zen 4
  // (benchmarks/kernel.py); it stays available to force and to test.
  for (Path p : {Path::kAvx512, Path::kAvx2, Path::kNeonDot, Path::kNeon}) {
    if (PathSupported(p)) return p;
  }
  return Path::kRef;
}

void SetPathOverride(int path) { g_override.store(path); }
int PathOverride() { return g_override.load(); }

bool ActivePath(Path* out, std::string* error) {
  int forced = g_override.load();
  const char* origin = "cqjax kernel path override";
  if (forced < 0) {
    forced = EnvPath();
    origin = "CQJAX_KERNEL_PATH";
  }
  if (forced == -2) {
    *error = std::string("CQJAX_KERNEL_PATH=") + std::getenv("CQJAX_KERNEL_PATH") +
             " is not one of auto, ref, avx2, avx512, avx512vbmi, neon, neon_dot";
    return false;
  }
  if (forced < 0) {
    *out = BestPath();
    return true;
  }
  const Path p = static_cast<Path>(forced);
  if (!PathSupported(p)) {
    *error = std::string(origin) + " forces path '" + PathName(p) +
             "', which this binary/CPU does not support";
    return false;
  }
  *out = p;
  return true;
}

std::string MakePlan(int bits, const int64_t* blocks, int nblocks, int K, Path path,
                     Plan* plan) {
  Plan& p = *plan;
  p = Plan();
  if (!formats::BitsSupported(bits)) {
    return "bits=" + std::to_string(bits) + " is not one of 1, 2, 3, 4, 8";
  }
  if (nblocks < 1) return "blocks must not be empty";
  p.bits = bits;
  p.nblocks = nblocks;
  p.offs.push_back(0);
  for (int j = 0; j < nblocks; ++j) {
    if (!formats::IsPow2(blocks[j]) || blocks[j] > (1 << 16)) {
      return "blocks[" + std::to_string(j) + "]=" + std::to_string(blocks[j]) +
             " is not a power of two <= 65536";
    }
    p.blocks.push_back(static_cast<int>(blocks[j]));
    p.offs.push_back(p.offs.back() + static_cast<int>(blocks[j]));
  }
  p.Kpad = p.offs.back();
  if (p.Kpad % 8) return "sum(blocks)=" + std::to_string(p.Kpad) + " is not a multiple of 8";
  if (K < 1 || K > p.Kpad) {
    return "K=" + std::to_string(K) + " must be in [1, sum(blocks)=" + std::to_string(p.Kpad) + "]";
  }
  p.K = K;
  p.row_bytes = formats::RowBytes(p.Kpad, bits);
  const int lb = LaneBits(bits);
  p.per = 8 / lb;
  p.plane_bytes = p.Kpad * lb / 8;
  p.hi_offset = bits == 3 ? p.Kpad / 4 : 0;
  switch (path) {
    case Path::kAvx512:
    case Path::kAvx512Vbmi: p.V = 64; break;
    case Path::kAvx2: p.V = 32; break;
    case Path::kNeon:
    case Path::kNeonDot: p.V = 16; break;
    default: p.V = 0;
  }
  bool ok = p.V > 0 && bits <= 4;
  for (int j = 0; ok && j < nblocks; ++j) ok = (p.offs[j] * lb) % 32 == 0;
  if (!ok) {
    p.V = 0;
    return "";
  }
  p.simd = true;
  p.lanes = p.V / 4;
  p.nchunks = (p.plane_bytes + p.V - 1) / p.V;
  // block of a lane-plane byte
  auto block_of = [&](int byte) {
    const int k = byte * p.per;
    const int j = static_cast<int>(std::upper_bound(p.offs.begin(), p.offs.end(), k) - p.offs.begin()) - 1;
    return std::min(j, nblocks - 1);
  };
  for (int c = 0; c < p.nchunks; ++c) {
    const int base = c * p.V;
    const int b0 = block_of(base);
    p.chunk_b0.push_back(b0);
    for (int l = 0; l < p.lanes; ++l) {
      const int byte = base + 4 * l;
      const int j = byte < p.plane_bytes ? block_of(byte) : b0;
      p.lane_block.push_back(j - b0);
    }
    p.lut_first.push_back(static_cast<int32_t>(p.lut_block.size()));
    int count = 0;
    int cur = -1;
    for (int i = 0; i < p.V && base + i < p.plane_bytes; ++i) {
      const int j = block_of(base + i);
      if (j != cur) {
        cur = j;
        p.lut_block.push_back(j);
        p.lut_mask.push_back(0);
        ++count;
      }
      p.lut_mask.back() |= uint64_t{1} << i;
    }
    p.lut_mask[p.lut_first.back()] = ~uint64_t{0};  // the first LUT covers the chunk
    p.lut_count.push_back(count);
  }
  return "";
}

void PrepareCodebooks(const Plan& plan, const uint16_t* codebooks, Path path, Prepared* prep) {
  const int L = 1 << plan.bits, nb = plan.nblocks;
  prep->lq.assign(static_cast<size_t>(nb) * L, 0);
  prep->lut.assign(static_cast<size_t>(nb) * 16, 0);
  prep->cs.assign(nb, 1.0f);
  const bool u8 = path == Path::kAvx512 || path == Path::kAvx512Vbmi;
  for (int j = 0; j < nb; ++j) {
    float amax = 0.0f;
    for (int c = 0; c < L; ++c) amax = std::max(amax, std::fabs(formats::HalfToFloat(codebooks[j * L + c])));
    const float cs = amax > 0.0f ? amax / 127.0f : 1.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    prep->cs[j] = cs;
    for (int c = 0; c < L; ++c) {
      float v = std::nearbyint(formats::HalfToFloat(codebooks[j * L + c]) * inv);
      v = std::min(127.0f, std::max(-127.0f, v));
      const int q = static_cast<int>(v);
      prep->lq[static_cast<size_t>(j) * L + c] = static_cast<int8_t>(q);
      if (c < 16) prep->lut[j * 16 + c] = static_cast<uint8_t>(u8 ? q + 128 : q);
    }
  }
  const int lmask = (1 << (plan.bits == 3 ? 2 : std::min(plan.bits, 4))) - 1;
  prep->lut64.resize(static_cast<size_t>(nb) * 64);
  for (int j = 0; j < nb; ++j) {
    for (int i = 0; i < 64; ++i) prep->lut64[j * 64 + i] = prep->lut[j * 16 + (i & lmask)];
  }
  prep->lut_count_eff.assign(plan.lut_count.begin(), plan.lut_count.end());
  for (int c = 0; c < plan.nchunks; ++c) {
    const int lf = plan.lut_first[c];
    bool same = true;
    for (int t = 1; t < plan.lut_count[c]; ++t) {
      same = same && std::memcmp(&prep->lut[plan.lut_block[lf] * 16],
                                 &prep->lut[plan.lut_block[lf + t] * 16], 16) == 0;
    }
    if (same) prep->lut_count_eff[c] = 1;
  }
}

void ResizePrepared(const Plan& plan, int M, Prepared* prep) {
  prep->M = M;
  prep->xq.assign(static_cast<size_t>(M) * plan.Kpad, 0);
  prep->fx.assign(static_cast<size_t>(M) * plan.nblocks, 0.0f);
  if (plan.simd) {
    prep->xr.assign(static_cast<size_t>(M) * plan.nchunks * plan.per * plan.V, 0);
    prep->bias.assign(static_cast<size_t>(M) * plan.nchunks * plan.lanes, 0);
  } else {
    prep->xr.clear();
    prep->bias.clear();
  }
}

int QuantizeBlockRef(const float* v, int b, int8_t* xq, float* amax, bool* finite) {
  float mx = 0.0f, poison = 0.0f;
  for (int k = 0; k < b; ++k) {
    mx = std::max(mx, std::fabs(v[k]));
    poison += v[k] * 0.0f;  // NaN iff some v[k] is NaN or infinite
  }
  const float inv = mx > 0.0f && std::isfinite(mx) ? 127.0f / mx : 0.0f;
  int sum = 0;
  for (int k = 0; k < b; ++k) {
    float q = std::nearbyint(v[k] * inv);
    q = std::min(127.0f, std::max(-127.0f, q));
    xq[k] = static_cast<int8_t>(q);
    sum += xq[k];
  }
  *amax = mx;
  *finite = poison == 0.0f;
  return sum;
}

namespace {

// The scalar loop called libm's nearbyintf per element: a third of a batch-1 call's fixed
// cost at K = 576.
int QuantizeBlock(const float* v, int b, int8_t* xq, float* amax, bool* finite) {
#if defined(__x86_64__) || defined(__i386__)
  static const bool avx2 = GetCpuFeatures().avx2 && GetCpuFeatures().fma;
  if (avx2 && b % 8 == 0) return QuantizeBlockAvx2(v, b, xq, amax, finite);
#endif
  return QuantizeBlockRef(v, b, xq, amax, finite);
}

}  // namespace

void PrepareRows(const Plan& plan, const float* x, int xk, const int8_t* s1, const int8_t* s2,
                 const int32_t* perm, int m0, int m1, Path path, Prepared* prep) {
  const int Kpad = plan.Kpad, nb = plan.nblocks;
  thread_local std::vector<float> v;
  v.resize(Kpad);
  const bool u8 = (path == Path::kAvx512 || path == Path::kAvx512Vbmi) && plan.simd;
  for (int m = m0; m < m1; ++m) {
    const float* xm = x + static_cast<size_t>(m) * xk;
    if (s1) {
      RotateRow(xm, xk, s1, s2, perm, plan.blocks.data(), nb, Kpad, v.data());
    } else {
      for (int k = 0; k < Kpad; ++k) v[k] = k < xk ? xm[k] : 0.0f;
    }
    int8_t* xq = prep->xq.data() + static_cast<size_t>(m) * Kpad;
    for (int j = 0; j < nb; ++j) {
      const int o = plan.offs[j], b = plan.blocks[j];
      float amax = 0.0f;
      bool finite = true;
      const int sum = QuantizeBlock(v.data() + o, b, xq + o, &amax, &finite);
      // NaN in, NaN out: a non-finite activation makes the block's scale NaN, so every output
      // of this row is NaN (as a float matmul would make it), never a finite number.
      prep->fx[static_cast<size_t>(m) * nb + j] =
          finite ? (amax / 127.0f) * prep->cs[j] : std::numeric_limits<float>::quiet_NaN();
      if (u8) {
        // first lane of block j in chunk order
        const int bstart = o / plan.per;  // lane-plane byte where block j starts
        const int c = bstart / plan.V, l = (bstart % plan.V) / 4;
        prep->bias[(static_cast<size_t>(m) * plan.nchunks + c) * plan.lanes + l] = -128 * sum;
      }
    }
    if (plan.simd) {
      int8_t* xr = prep->xr.data() + static_cast<size_t>(m) * plan.nchunks * plan.per * plan.V;
      const int per = plan.per, V = plan.V;
      for (int c = 0; c < plan.nchunks; ++c) {
        for (int f = 0; f < per; ++f) {
          int8_t* dst = xr + (static_cast<size_t>(c) * per + f) * V;
          for (int i = 0; i < V; ++i) {
            const int k = (c * V + i) * per + f;
            dst[i] = k < Kpad ? xq[k] : 0;
          }
        }
      }
    }
  }
}

void MatmulRowsRef(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                   const uint16_t* norms, int n0, int n1, float* y, int N) {
  const int nb = plan.nblocks, L = 1 << plan.bits, Kpad = plan.Kpad;
  std::vector<float> nf(nb);
  std::vector<int> code(Kpad);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = codes + static_cast<size_t>(n) * plan.row_bytes;
    for (int k = 0; k < Kpad; ++k) code[k] = formats::UnpackCode(row, k, plan.bits, Kpad);
    for (int j = 0; j < nb; ++j) nf[j] = formats::HalfToFloat(norms[static_cast<size_t>(n) * nb + j]);
    for (int m = 0; m < prep.M; ++m) {
      const int8_t* xq = prep.xq.data() + static_cast<size_t>(m) * Kpad;
      const float* fx = prep.fx.data() + static_cast<size_t>(m) * nb;
      float acc = 0.0f;
      for (int j = 0; j < nb; ++j) {
        const int8_t* lq = prep.lq.data() + static_cast<size_t>(j) * L;
        int32_t isum = 0;
        for (int k = plan.offs[j]; k < plan.offs[j + 1]; ++k) isum += lq[code[k]] * xq[k];
        acc += nf[j] * fx[j] * static_cast<float>(isum);
      }
      y[static_cast<size_t>(m) * N + n] = acc;
    }
  }
}

void MatmulRows(const Plan& plan, const Prepared& prep, const uint8_t* codes,
                const uint16_t* norms, int n0, int n1, Path path, float* y, int N) {
  if (!plan.simd) path = Path::kRef;
  switch (path) {
#if defined(__x86_64__) || defined(__i386__)
    case Path::kAvx2:
      return MatmulRowsAvx2(plan, prep, codes, norms, n0, n1, y, N);
    case Path::kAvx512:
      return MatmulRowsAvx512(plan, prep, codes, norms, n0, n1, y, N, false);
    case Path::kAvx512Vbmi:
      return MatmulRowsAvx512(plan, prep, codes, norms, n0, n1, y, N, true);
#endif
#if defined(__aarch64__)
    case Path::kNeon:
      return MatmulRowsNeon(plan, prep, codes, norms, n0, n1, y, N, false);
    case Path::kNeonDot:
      return MatmulRowsNeon(plan, prep, codes, norms, n0, n1, y, N, true);
#endif
    default:
      return MatmulRowsRef(plan, prep, codes, norms, n0, n1, y, N);
  }
}

void GatherRows(const Plan& plan, const int32_t* ids, int nids, const uint8_t* codes,
                const uint16_t* norms, const uint16_t* codebooks, const int8_t* s1,
                const int8_t* s2, const int32_t* perm, float* out) {
  const int nb = plan.nblocks, L = 1 << plan.bits, Kpad = plan.Kpad, K = plan.K;
  std::vector<float> cb(static_cast<size_t>(nb) * L), v(Kpad);
  for (size_t i = 0; i < cb.size(); ++i) cb[i] = formats::HalfToFloat(codebooks[i]);
  for (int i = 0; i < nids; ++i) {
    const int64_t n = ids[i];
    const uint8_t* row = codes + n * plan.row_bytes;
    float* o = out + static_cast<size_t>(i) * K;
    std::fill(o, o + K, 0.0f);
    for (int j = 0; j < nb; ++j) {
      const float nf = formats::HalfToFloat(norms[n * nb + j]);
      const float* cbj = cb.data() + static_cast<size_t>(j) * L;
      const int lo = plan.offs[j], b = plan.blocks[j];
      for (int k = lo; k < lo + b; ++k) {
        v[k] = cbj[formats::UnpackCode(row, k, plan.bits, Kpad)] * nf * (s1 ? s1[k] : 1);
      }
      if (s1) {
        Fwht(v.data() + lo, b);
        const float scale = 1.0f / std::sqrt(static_cast<float>(b));
        for (int k = lo; k < lo + b; ++k) v[k] *= scale * s2[k];
      }
    }
    if (s1) {
      for (int k = 0; k < Kpad; ++k) {
        if (perm[k] < K) o[perm[k]] = v[k];
      }
    } else {
      for (int k = 0; k < K; ++k) o[k] = v[k];
    }
  }
}

std::string CheckRotation(const Plan& plan, const int8_t* s1, const int8_t* s2,
                          const int32_t* perm) {
  for (int j = 0; j < plan.nblocks; ++j) {
    for (int k = plan.offs[j]; k < plan.offs[j + 1]; ++k) {
      if (perm[k] < plan.offs[j] || perm[k] >= plan.offs[j + 1]) {
        return "perm[" + std::to_string(k) + "]=" + std::to_string(perm[k]) +
               " leaves its block [" + std::to_string(plan.offs[j]) + ", " +
               std::to_string(plan.offs[j + 1]) + ")";
      }
      if ((s1[k] != 1 && s1[k] != -1) || (s2[k] != 1 && s2[k] != -1)) {
        return "s1/s2[" + std::to_string(k) + "] must be +1 or -1";
      }
    }
  }
  return "";
}

}  // namespace cq
}  // namespace cqjax
