// XLA FFI handlers for the CQ kernels: decode and check buffers and
// attributes, prepare the activation, split rows over XLA's intra-op pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cqjax/cq_kernel.h"
#include "cqjax/ffi_handlers.h"
#include "cqjax/ffi_util.h"
#include "cqjax/parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace cqjax {
namespace cq {

namespace {

std::atomic<int> g_max_threads{0};  // 0: every thread of the pool

int EnvThreads() {
  static const int v = [] {
    const char* s = std::getenv("CQJAX_KERNEL_THREADS");
    return s ? std::max(0, std::atoi(s)) : 0;
  }();
  return v;
}

std::shared_ptr<const Plan> CachedPlan(int bits, ffi::Span<const int64_t> blocks, int K, Path path,
                                       std::string* error) {
  static std::mutex mu;
  static std::map<std::tuple<int, std::vector<int64_t>, int, int>, std::shared_ptr<const Plan>> cache;
  auto key = std::make_tuple(bits, std::vector<int64_t>(blocks.begin(), blocks.end()), K,
                             static_cast<int>(path));
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto plan = std::make_shared<Plan>();
  *error = MakePlan(bits, blocks.begin(), static_cast<int>(blocks.size()), K, path, plan.get());
  if (!error->empty()) return nullptr;
  if (cache.size() > 4096) cache.clear();
  cache.emplace(key, plan);
  return plan;
}

// Checks dims == [1..., expect...] (leading size-1 dims come from vmap's
// expand_dims); returns "" or an error naming the operand.
std::string CheckTrailing(const char* who, const char* name, ffi::Span<const int64_t> d,
                          std::initializer_list<int64_t> expect) {
  const size_t n = expect.size();
  bool ok = d.size() >= n;
  for (size_t i = 0; ok && i + n < d.size(); ++i) ok = d[i] == 1;
  size_t i = 0;
  for (int64_t e : expect) {
    if (!ok) break;
    ok = d[d.size() - n + i] == e;
    ++i;
  }
  if (ok) return "";
  std::string want = "[";
  i = 0;
  for (int64_t e : expect) want += (i++ ? ", " : "") + std::to_string(e);
  return std::string(who) + ": " + name + " has shape " + DimsStr(d) + ", expected " + want +
         "] (with optional leading 1s; vmapping over stacked weights is not supported)";
}

struct Common {
  std::shared_ptr<const Plan> plan;
  Path path = Path::kRef;
  int N = 0;
};

std::string CheckWeights(const char* who, int bits, ffi::Span<const int64_t> blocks, int K,
                         bool rotate, ffi::Buffer<ffi::U8>& codes, ffi::Buffer<ffi::F16>& norms,
                         ffi::Buffer<ffi::F16>& codebooks, ffi::Buffer<ffi::S8>& s1,
                         ffi::Buffer<ffi::S8>& s2, ffi::Buffer<ffi::S32>& perm, Common* out) {
  std::string err;
  if (!ActivePath(&out->path, &err)) return std::string(who) + ": " + err;
  out->plan = CachedPlan(bits, blocks, K, out->path, &err);
  if (!out->plan) return std::string(who) + ": " + err;
  const Plan& p = *out->plan;
  auto cd = codes.dimensions();
  if (cd.size() < 2) return std::string(who) + ": codes must be [N, row_bytes], got " + DimsStr(cd);
  out->N = static_cast<int>(cd[cd.size() - 2]);
  for (auto& e : {CheckTrailing(who, "codes", cd, {out->N, p.row_bytes}),
                  CheckTrailing(who, "norms", norms.dimensions(), {out->N, p.nblocks}),
                  CheckTrailing(who, "codebooks", codebooks.dimensions(), {p.nblocks, 1 << bits}),
                  CheckTrailing(who, "s1", s1.dimensions(), {p.Kpad}),
                  CheckTrailing(who, "s2", s2.dimensions(), {p.Kpad}),
                  CheckTrailing(who, "perm", perm.dimensions(), {p.Kpad})}) {
    if (!e.empty()) return e;
  }
  if (rotate) {
    err = CheckRotation(p, s1.typed_data(), s2.typed_data(), perm.typed_data());
    if (!err.empty()) return std::string(who) + ": " + err;
  }
  return "";
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                      ffi::Buffer<ffi::F16> norms, ffi::Buffer<ffi::F16> codebooks,
                      ffi::Buffer<ffi::S8> s1, ffi::Buffer<ffi::S8> s2,
                      ffi::Buffer<ffi::S32> perm, int32_t bits, ffi::Span<const int64_t> blocks,
                      int32_t rotate, ffi::ResultBuffer<ffi::F32> y) {
  const char* who = "cqjax_cq_matmul";
  auto xd = x.dimensions();
  if (xd.size() == 0) return ffi::Error::InvalidArgument(std::string(who) + ": x must be [..., K]");
  const int xk = static_cast<int>(xd.back());
  const int64_t M64 = xk ? static_cast<int64_t>(x.element_count()) / xk : 0;
  int64_t kpad = 0;
  for (int64_t b : blocks) kpad += b;
  if (!rotate && xk != kpad) {
    return ffi::Error::InvalidArgument(std::string(who) + ": x has K=" + std::to_string(xk) +
                                       " but an unrotated call needs Kpad=" + std::to_string(kpad));
  }
  Common cm;
  std::string err = CheckWeights(who, bits, blocks, xk, rotate != 0, codes, norms, codebooks, s1,
                                 s2, perm, &cm);
  if (!err.empty()) return ffi::Error::InvalidArgument(err);
  const Plan& p = *cm.plan;
  const int N = cm.N;
  auto yd = y->dimensions();
  if (yd.size() != xd.size() || yd.back() != N ||
      static_cast<int64_t>(y->element_count()) != M64 * N) {
    return ffi::Error::InvalidArgument(std::string(who) + ": result has shape " + DimsStr(yd) +
                                       ", expected x's leading dims + [" + std::to_string(N) + "]");
  }
  const int M = static_cast<int>(M64);
  if (M == 0 || N == 0) return ffi::Error::Success();
  // Reused across calls on this thread; helpers get a pointer (a thread_local
  // named inside a lambda would be the helper's own instance).
  thread_local Prepared tl_prep;
  Prepared* pp = &tl_prep;
  PrepareCodebooks(p, reinterpret_cast<const uint16_t*>(codebooks.typed_data()), cm.path, pp);
  ResizePrepared(p, M, pp);
  const int nthreads = PoolThreads(pool);
  const int8_t* r1 = rotate ? s1.typed_data() : nullptr;
  const float* xp = x.typed_data();
  const int mtile = 8;
  const int mtasks = (M + mtile - 1) / mtile;
  const Path path = cm.path;
  ParallelFor(&pool, nthreads, mtasks, [&](int t) {
    PrepareRows(p, xp, xk, r1, s2.typed_data(), perm.typed_data(), t * mtile,
                std::min(M, (t + 1) * mtile), path, pp);
  });
  int tile = (N + nthreads * 8 - 1) / (nthreads * 8);
  tile = std::min(64, std::max(4, (tile + 3) / 4 * 4));
  const int ntasks = (N + tile - 1) / tile;
  const uint8_t* cp = codes.typed_data();
  const uint16_t* np_ = reinterpret_cast<const uint16_t*>(norms.typed_data());
  float* yp = y->typed_data();
  ParallelFor(&pool, nthreads, ntasks, [&](int t) {
    MatmulRows(p, *pp, cp, np_, t * tile, std::min(N, (t + 1) * tile), path, yp, N);
  });
  return ffi::Error::Success();
}

ffi::Error GatherImpl(ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::U8> codes,
                      ffi::Buffer<ffi::F16> norms, ffi::Buffer<ffi::F16> codebooks,
                      ffi::Buffer<ffi::S8> s1, ffi::Buffer<ffi::S8> s2, ffi::Buffer<ffi::S32> perm,
                      int32_t bits, ffi::Span<const int64_t> blocks, int32_t k, int32_t rotate,
                      ffi::ResultBuffer<ffi::F32> out) {
  const char* who = "cqjax_cq_gather";
  Common cm;
  std::string err = CheckWeights(who, bits, blocks, k, rotate != 0, codes, norms, codebooks, s1,
                                 s2, perm, &cm);
  if (!err.empty()) return ffi::Error::InvalidArgument(err);
  const Plan& p = *cm.plan;
  const int64_t nids = static_cast<int64_t>(ids.element_count());
  auto od = out->dimensions();
  if (od.size() == 0 || od.back() != k || static_cast<int64_t>(out->element_count()) != nids * k) {
    return ffi::Error::InvalidArgument(std::string(who) + ": result has shape " + DimsStr(od) +
                                       ", expected ids' shape + [" + std::to_string(k) + "]");
  }
  const int32_t* id = ids.typed_data();
  for (int64_t i = 0; i < nids; ++i) {
    if (id[i] < 0 || id[i] >= cm.N) {
      return ffi::Error::InvalidArgument(std::string(who) + ": ids[" + std::to_string(i) + "]=" +
                                         std::to_string(id[i]) + " is outside [0, " +
                                         std::to_string(cm.N) + ")");
    }
  }
  GatherRows(p, id, static_cast<int>(nids), codes.typed_data(),
             reinterpret_cast<const uint16_t*>(norms.typed_data()),
             reinterpret_cast<const uint16_t*>(codebooks.typed_data()),
             rotate ? s1.typed_data() : nullptr, s2.typed_data(), perm.typed_data(),
             out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

void SetMaxThreads(int n) { g_max_threads.store(std::max(0, n)); }
int MaxThreads() { return g_max_threads.load() > 0 ? g_max_threads.load() : EnvThreads(); }

}  // namespace cq
}  // namespace cqjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(CqjaxCqMatmul, cqjax::cq::MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::U8>>()    // codes
                                  .Arg<ffi::Buffer<ffi::F16>>()   // norms
                                  .Arg<ffi::Buffer<ffi::F16>>()   // codebooks
                                  .Arg<ffi::Buffer<ffi::S8>>()    // s1
                                  .Arg<ffi::Buffer<ffi::S8>>()    // s2
                                  .Arg<ffi::Buffer<ffi::S32>>()   // perm
                                  .Attr<int32_t>("bits")
                                  .Attr<ffi::Span<const int64_t>>("blocks")
                                  .Attr<int32_t>("rotate")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CqjaxCqGather, cqjax::cq::GatherImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()   // ids
                                  .Arg<ffi::Buffer<ffi::U8>>()    // codes
                                  .Arg<ffi::Buffer<ffi::F16>>()   // norms
                                  .Arg<ffi::Buffer<ffi::F16>>()   // codebooks
                                  .Arg<ffi::Buffer<ffi::S8>>()    // s1
                                  .Arg<ffi::Buffer<ffi::S8>>()    // s2
                                  .Arg<ffi::Buffer<ffi::S32>>()   // perm
                                  .Attr<int32_t>("bits")
                                  .Attr<ffi::Span<const int64_t>>("blocks")
                                  .Attr<int32_t>("k")
                                  .Attr<int32_t>("rotate")
                                  .Ret<ffi::Buffer<ffi::F32>>());
