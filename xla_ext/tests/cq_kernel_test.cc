// Plain C++ tests of the CQ kernels (no Python, no XLA): every path compiled
// in and supported by this CPU against the reference path on odd sizes, the
// golden vectors shared with pytest, and pack/unpack round trips of
// formats.h. Built and run by xla_ext/scripts/test_kernels.sh (ASan/UBSan on
// the host, NEON under qemu-aarch64).
//
// Usage: cq_kernel_test [tests/golden/cq_kernel_v1.txt]
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cqjax/cpu_features.h"
#include "cqjax/cq_kernel.h"
#include "cqjax/formats.h"

using namespace cqjax;

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    ++g_checks;                                            \
    if (!(cond)) {                                         \
      ++g_failures;                                        \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                   \
      std::fprintf(stderr, "\n");                          \
    }                                                      \
  } while (0)

uint16_t FloatToHalf(float f) {  // round-to-nearest for normal values (test data only)
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  int exp = static_cast<int>((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffff;
  if (exp <= 0) return static_cast<uint16_t>(sign);
  uint32_t h = sign | (exp << 10) | (mant >> 13);
  if (mant & 0x1000) ++h;
  return static_cast<uint16_t>(h);
}

struct Weight {
  int bits = 0, N = 0, K = 0;
  std::vector<int64_t> blocks;
  std::vector<uint8_t> codes;
  std::vector<uint16_t> norms, codebooks;
  std::vector<int8_t> s1, s2;
  std::vector<int32_t> perm;
};

Weight RandomWeight(std::mt19937& rng, int N, int K, int bits, int block, int min_block) {
  Weight w;
  w.bits = bits;
  w.N = N;
  w.K = K;
  for (int b : formats::BlockPlan(K, block, min_block)) w.blocks.push_back(b);
  int kpad = 0;
  for (auto b : w.blocks) kpad += static_cast<int>(b);
  const int nb = static_cast<int>(w.blocks.size()), L = 1 << bits;
  const int rb = formats::RowBytes(kpad, bits);
  std::uniform_int_distribution<int> code(0, L - 1), sign(0, 1);
  std::normal_distribution<float> g;
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  w.codes.resize(static_cast<size_t>(N) * rb);
  std::vector<uint8_t> c(kpad);
  for (int n = 0; n < N; ++n) {
    for (auto& v : c) v = static_cast<uint8_t>(code(rng));
    formats::PackRow(c.data(), kpad, bits, w.codes.data() + static_cast<size_t>(n) * rb);
  }
  for (int i = 0; i < N * nb; ++i) w.norms.push_back(FloatToHalf(u(rng)));
  for (int j = 0; j < nb; ++j) {
    for (int l = 0; l < L; ++l) w.codebooks.push_back(FloatToHalf(g(rng) * (1.0f + 0.1f * (j % 3))));
  }
  int off = 0;
  for (auto b : w.blocks) {
    std::vector<int32_t> p(b);
    for (int i = 0; i < b; ++i) p[i] = off + i;
    std::shuffle(p.begin(), p.end(), rng);
    w.perm.insert(w.perm.end(), p.begin(), p.end());
    off += static_cast<int>(b);
  }
  for (int k = 0; k < kpad; ++k) {
    w.s1.push_back(sign(rng) ? 1 : -1);
    w.s2.push_back(sign(rng) ? 1 : -1);
  }
  return w;
}

std::vector<float> RunPath(const Weight& w, const std::vector<float>& x, int M, cq::Path path) {
  cq::Plan plan;
  const std::string err = cq::MakePlan(w.bits, w.blocks.data(), static_cast<int>(w.blocks.size()),
                                       w.K, path, &plan);
  CHECK(err.empty(), "MakePlan: %s", err.c_str());
  CHECK(cq::CheckRotation(plan, w.s1.data(), w.s2.data(), w.perm.data()).empty(), "rotation");
  cq::Prepared prep;
  cq::PrepareCodebooks(plan, w.codebooks.data(), path, &prep);
  cq::ResizePrepared(plan, M, &prep);
  cq::PrepareRows(plan, x.data(), w.K, w.s1.data(), w.s2.data(), w.perm.data(), 0, M, path, &prep);
  std::vector<float> y(static_cast<size_t>(M) * w.N, -1.0f);
  // two row ranges, as threads would split them
  const int half = w.N / 2;
  cq::MatmulRows(plan, prep, w.codes.data(), w.norms.data(), 0, half, path, y.data(), w.N);
  cq::MatmulRows(plan, prep, w.codes.data(), w.norms.data(), half, w.N, path, y.data(), w.N);
  return y;
}

double RelRms(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * static_cast<double>(a[i] - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

std::vector<cq::Path> Paths() {
  std::vector<cq::Path> out;
  for (int i = 0; i < cq::kNumPaths; ++i) {
    if (cq::PathSupported(static_cast<cq::Path>(i))) out.push_back(static_cast<cq::Path>(i));
  }
  return out;
}

void TestPathsAgainstReference() {
  std::mt19937 rng(42);
  const int sizes[][3] = {{1, 5, 100}, {3, 7, 576}, {7, 129, 200}, {2, 9, 17},
                          {1, 3, 8},   {129, 6, 256}, {5, 33, 1000}, {4, 11, 4096},
                          {6, 10, 300}, {8, 12, 640}};  // every row-tile width of the AVX-512 path (1-8)
  for (int bits = 1; bits <= 4; ++bits) {
    for (auto& s : sizes) {
      for (int layout = 0; layout < 2; ++layout) {
        const int block = layout ? 32 : 128, min_block = layout ? 8 : 16;
        const int M = s[0], N = s[1], K = s[2];
        Weight w = RandomWeight(rng, N, K, bits, block, min_block);
        std::normal_distribution<float> g;
        std::vector<float> x(static_cast<size_t>(M) * K);
        for (auto& v : x) v = g(rng);
        const std::vector<float> ref = RunPath(w, x, M, cq::Path::kRef);
        for (cq::Path p : Paths()) {
          if (p == cq::Path::kRef) continue;
          const double e = RelRms(RunPath(w, x, M, p), ref);
          CHECK(e < 1e-5, "path %s bits=%d M=%d N=%d K=%d block=%d: rel rms %g", cq::PathName(p),
                bits, M, N, K, block, e);
        }
      }
    }
  }
}

void TestNonFiniteActivationsPropagate() {
  // NaN in, NaN out: an activation row with a NaN or an infinity gives non-finite outputs on
  // every path (the int8 quantizer must not turn it into finite numbers); other rows stay finite.
  std::mt19937 rng(7);
  const float bad[] = {std::nanf(""), INFINITY, -INFINITY};
  for (int bits = 1; bits <= 4; ++bits) {
    for (float b : bad) {
      const int M = 3, N = 9, K = 200;
      Weight w = RandomWeight(rng, N, K, bits, 128, 16);
      std::normal_distribution<float> g;
      std::vector<float> x(static_cast<size_t>(M) * K);
      for (auto& v : x) v = g(rng);
      x[1 * K + 150] = b;  // row 1, in the second block
      for (cq::Path p : Paths()) {
        const std::vector<float> y = RunPath(w, x, M, p);
        for (int n = 0; n < N; ++n) {
          CHECK(!std::isfinite(y[1 * N + n]), "path %s bits=%d: output %d of a non-finite row is %g",
                cq::PathName(p), bits, n, y[1 * N + n]);
          CHECK(std::isfinite(y[0 * N + n]) && std::isfinite(y[2 * N + n]), "path %s bits=%d: finite rows",
                cq::PathName(p), bits);
        }
      }
    }
  }
}

void TestQuantizeBlockMatchesReference() {
  // The vectorized activation quantizer gives the reference's bytes, sum, amax and finiteness:
  // ties (x.5 after scaling) round to even, zeros, a lone non-finite value, every block size.
#if defined(__x86_64__) || defined(__i386__)
  if (!GetCpuFeatures().avx2 || !GetCpuFeatures().fma) return;
  std::mt19937 rng(11);
  std::normal_distribution<float> g;
  for (int b : {8, 16, 64, 128, 256}) {
    for (int variant = 0; variant < 6; ++variant) {
      std::vector<float> v(b);
      for (auto& x : v) x = g(rng);
      if (variant == 1) std::fill(v.begin(), v.end(), 0.0f);
      if (variant == 2) {  // ties: amax 127 makes every x.5 a tie
        for (int k = 0; k < b; ++k) v[k] = (k % 2 ? 0.5f : -2.5f) + static_cast<float>(k % 7);
        v[0] = 127.0f;
      }
      if (variant == 3) v[b / 2] = std::nanf("");
      if (variant == 4) v[b - 1] = INFINITY;
      if (variant == 5) v[1] = -INFINITY;
      std::vector<int8_t> q1(b), q2(b);
      float a1, a2;
      bool f1, f2;
      const int s1 = cq::QuantizeBlockRef(v.data(), b, q1.data(), &a1, &f1);
      const int s2 = cq::QuantizeBlockAvx2(v.data(), b, q2.data(), &a2, &f2);
      CHECK(f1 == f2 && (a1 == a2 || (std::isnan(a1) && std::isnan(a2))),
            "quantize b=%d variant=%d: amax %g/%g finite %d/%d", b, variant, a1, a2, f1, f2);
      if (f1) CHECK(s1 == s2 && q1 == q2, "quantize b=%d variant=%d: codes or sum differ", b, variant);
    }
  }
#endif
}

void TestPackRoundTrip() {
  std::mt19937 rng(7);
  for (int bits : {1, 2, 3, 4, 8}) {
    for (int kpad : {8, 16, 24, 136, 1000}) {
      std::vector<uint8_t> c(kpad), row(formats::RowBytes(kpad, bits));
      std::uniform_int_distribution<int> code(0, (1 << bits) - 1);
      for (auto& v : c) v = static_cast<uint8_t>(code(rng));
      formats::PackRow(c.data(), kpad, bits, row.data());
      bool ok = true;
      for (int k = 0; k < kpad; ++k) ok = ok && formats::UnpackCode(row.data(), k, bits, kpad) == c[k];
      CHECK(ok, "pack/unpack bits=%d Kpad=%d", bits, kpad);
    }
  }
  // the layout example of cqjax/formats/cq.py: 2-bit codes [1, 2, 3, 0] -> 0x39
  const uint8_t c[8] = {1, 2, 3, 0, 0, 0, 0, 0};
  uint8_t row[2];
  formats::PackRow(c, 8, 2, row);
  CHECK(row[0] == 0x39 && row[1] == 0, "2-bit example byte %#x", row[0]);
  CHECK(formats::BlockPlan(576) == std::vector<int>({128, 128, 128, 128, 64}), "plan 576");
  CHECK(formats::BlockPlan(100) == std::vector<int>({64, 32, 16}), "plan 100");
  CHECK(formats::BlockPlan(17) == std::vector<int>({16, 16}), "plan 17");
  CHECK(formats::HalfToFloat(0x3c00) == 1.0f && formats::HalfToFloat(0xc000) == -2.0f &&
            formats::HalfToFloat(0x0001) == std::ldexp(1.0f, -24),
        "half to float");
}

void TestGolden(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    std::fprintf(stderr, "golden file %s not found: skipped\n", path.c_str());
    return;
  }
  std::string line;
  std::map<std::string, std::vector<double>> c;
  int bits = 0, M = 0, N = 0, K = 0, ncases = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ss(line);
    std::string key;
    ss >> key;
    if (key == "case") {
      ss >> bits >> M >> N >> K;
      c.clear();
    } else if (key == "end") {
      ++ncases;
      Weight w;
      w.bits = bits;
      w.N = N;
      w.K = K;
      for (double v : c["blocks"]) w.blocks.push_back(static_cast<int64_t>(v));
      for (double v : c["codes"]) w.codes.push_back(static_cast<uint8_t>(v));
      for (double v : c["norms"]) w.norms.push_back(static_cast<uint16_t>(v));
      for (double v : c["codebooks"]) w.codebooks.push_back(static_cast<uint16_t>(v));
      for (double v : c["s1"]) w.s1.push_back(static_cast<int8_t>(v));
      for (double v : c["s2"]) w.s2.push_back(static_cast<int8_t>(v));
      for (double v : c["perm"]) w.perm.push_back(static_cast<int32_t>(v));
      std::vector<float> x(c["x"].begin(), c["x"].end());
      std::vector<float> model(c["y_int8"].begin(), c["y_int8"].end());
      for (cq::Path p : Paths()) {
        const double e = RelRms(RunPath(w, x, M, p), model);
        CHECK(e < 1e-3, "golden case %d path %s: rel rms %g vs the int8 model", ncases,
              cq::PathName(p), e);
      }
      cq::Plan plan;
      cq::MakePlan(bits, w.blocks.data(), static_cast<int>(w.blocks.size()), K, cq::Path::kRef, &plan);
      std::vector<int32_t> ids;
      for (double v : c["ids"]) ids.push_back(static_cast<int32_t>(v));
      std::vector<float> rows(ids.size() * K);
      cq::GatherRows(plan, ids.data(), static_cast<int>(ids.size()), w.codes.data(), w.norms.data(),
                     w.codebooks.data(), w.s1.data(), w.s2.data(), w.perm.data(), rows.data());
      double maxerr = 0;
      for (size_t i = 0; i < rows.size(); ++i) {
        maxerr = std::max(maxerr, std::fabs(rows[i] - c["rows"][i]) / (1e-6 + 1e-5 * std::fabs(c["rows"][i])));
      }
      CHECK(maxerr <= 1.0, "golden case %d gather: error %g x tolerance", ncases, maxerr);
    } else {
      size_t n;
      ss >> n;
      std::vector<double> v(n);
      for (auto& t : v) ss >> t;
      c[key] = std::move(v);
    }
  }
  CHECK(ncases >= 6, "golden cases read: %d", ncases);
}

}  // namespace

int main(int argc, char** argv) {
  std::string paths;
  for (cq::Path p : Paths()) paths += std::string(" ") + cq::PathName(p);
  std::printf("cq_kernel_test: supported paths:%s; best: %s\n", paths.c_str(),
              cq::PathName(cq::BestPath()));
  TestPackRoundTrip();
  TestQuantizeBlockMatchesReference();
  TestPathsAgainstReference();
  TestNonFiniteActivationsPropagate();
  TestGolden(argc > 1 ? argv[1] : "tests/golden/cq_kernel_v1.txt");
  std::printf("cq_kernel_test: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures ? 1 : 0;
}
