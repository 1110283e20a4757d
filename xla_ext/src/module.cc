// pybind11 module cqjax._xla_ext: FFI handler capsules and CPU features.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cqjax/cpu_features.h"
#include "cqjax/cq_kernel.h"
#include "cqjax/formats.h"
#include "cqjax/quantize.h"
#include "cqjax/rotate.h"
#include "cqjax/stream_read.h"
#include "cqjax/ffi_handlers.h"

namespace py = pybind11;

namespace {

template <typename Fn>
py::capsule EncapsulateHandler(Fn* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

long BlocksSum(const std::vector<int>& blocks) {
  long kpad = 0;
  for (int b : blocks) {
    if (b <= 0 || (b & (b - 1))) throw py::value_error("blocks must be powers of two");
    kpad += b;
  }
  return kpad;
}

}  // namespace

PYBIND11_MODULE(_xla_ext, m) {
  m.doc() = "cqjax XLA FFI CPU kernels (C++).";

  m.def(
      "registrations",
      []() {
        py::dict d;
        d["cqjax_scale"] = EncapsulateHandler(CqjaxScale);
        d["cqjax_cq_matmul"] = EncapsulateHandler(CqjaxCqMatmul);
        d["cqjax_cq_gather"] = EncapsulateHandler(CqjaxCqGather);
        d["cqjax_attention_bf16"] = EncapsulateHandler(CqjaxAttentionBf16);
        return d;
      },
      "Returns {target_name: PyCapsule(XLA_FFI_Handler*)} for every handler.");

  m.def(
      "cpu_features",
      []() {
        const cqjax::CpuFeatures& f = cqjax::GetCpuFeatures();
        py::dict d;
        d["avx2"] = f.avx2;
        d["fma"] = f.fma;
        d["avx512f"] = f.avx512f;
        d["avx512bw"] = f.avx512bw;
        d["avx512vnni"] = f.avx512vnni;
        d["avx512vbmi"] = f.avx512vbmi;
        d["neon"] = f.neon;
        d["dotprod"] = f.dotprod;
        return d;
      },
      "Returns {feature: bool} for the running CPU (detected at run time).");

  namespace cq = cqjax::cq;
  m.def(
      "kernel_paths",
      []() {
        py::dict d;
        for (int i = 0; i < cq::kNumPaths; ++i) {
          const auto p = static_cast<cq::Path>(i);
          d[cq::PathName(p)] = cq::PathSupported(p);
        }
        return d;
      },
      "Returns {path: supported} for the CQ kernel paths (compiled in and CPU-supported).");
  m.def(
      "active_kernel_path",
      []() {
        cq::Path p;
        std::string err;
        if (!cq::ActivePath(&p, &err)) throw py::value_error(err);
        return std::string(cq::PathName(p));
      },
      "The CQ kernel path calls use now (override, CQJAX_KERNEL_PATH, or the best).");
  m.def(
      "set_kernel_path",
      [](py::object name) {
        if (name.is_none()) {
          cq::SetPathOverride(-1);
          return;
        }
        cq::Path p;
        const std::string s = name.cast<std::string>();
        if (!cq::ParsePath(s, &p)) {
          throw py::value_error("unknown CQ kernel path '" + s +
                                "'; known: ref, avx2, avx512, avx512vbmi, neon, neon_dot");
        }
        if (!cq::PathSupported(p)) {
          throw py::value_error("CQ kernel path '" + s + "' is not supported on this CPU/binary");
        }
        cq::SetPathOverride(static_cast<int>(p));
      },
      py::arg("name"), "Forces a CQ kernel path (None restores the default).");
  m.def("set_kernel_threads", &cq::SetMaxThreads, py::arg("n"),
        "Caps the threads of a CQ kernel call (0: all of XLA's intra-op pool).");
  m.def("kernel_threads", &cq::MaxThreads, "The thread cap (0: none).");
  m.attr("LAYOUT_VERSION") = cqjax::formats::kLayoutVersion;

  // formats.h exposed for the test that it mirrors cqjax/formats/cq.py.
  m.def(
      "formats_block_plan",
      [](int K, int block, int min_block) { return cqjax::formats::BlockPlan(K, block, min_block); },
      py::arg("K"), py::arg("block") = 128, py::arg("min_block") = 16);
  m.def(
      "formats_pack_row",
      [](py::bytes codes, int bits) {
        const std::string c = codes;
        const int kpad = static_cast<int>(c.size());
        if (kpad % 8 || !cqjax::formats::BitsSupported(bits)) throw py::value_error("bad Kpad/bits");
        std::string out(cqjax::formats::RowBytes(kpad, bits), '\0');
        cqjax::formats::PackRow(reinterpret_cast<const uint8_t*>(c.data()), kpad, bits,
                                reinterpret_cast<uint8_t*>(&out[0]));
        return py::bytes(out);
      },
      py::arg("codes"), py::arg("bits"));
  m.def(
      "formats_unpack_row",
      [](py::bytes row, int bits, int kpad) {
        const std::string r = row;
        if (kpad % 8 || !cqjax::formats::BitsSupported(bits) ||
            static_cast<int>(r.size()) != cqjax::formats::RowBytes(kpad, bits)) {
          throw py::value_error("bad row size/bits");
        }
        std::string out(kpad, '\0');
        for (int k = 0; k < kpad; ++k) {
          out[k] = static_cast<char>(
              cqjax::formats::UnpackCode(reinterpret_cast<const uint8_t*>(r.data()), k, bits, kpad));
        }
        return py::bytes(out);
      },
      py::arg("row"), py::arg("bits"), py::arg("Kpad"));
  m.def(
      "stream_read_gbs",
      [](std::size_t bytes, int threads, int reps) {
        py::gil_scoped_release release;
        return cqjax::StreamReadGbs(bytes, threads, reps);
      },
      py::arg("bytes"), py::arg("threads") = 1, py::arg("reps") = 5,
      "Best streaming-read bandwidth (GB/s) of a C++ loop over a fresh buffer.");
  m.def("formats_half_to_float", &cqjax::formats::HalfToFloat, py::arg("bits"));

  m.def(
      "rotate_rows",
      [](py::array_t<float, py::array::c_style> rows, py::array_t<int8_t, py::array::c_style> s1,
         py::array_t<int8_t, py::array::c_style> s2, py::array_t<int32_t, py::array::c_style> perm,
         std::vector<int> blocks) {
        if (rows.ndim() != 2) throw py::value_error("rotate_rows: rows must be 2-D [n, K]");
        const long kpad = BlocksSum(blocks);
        const long n = rows.shape(0), k = rows.shape(1);
        if (s1.size() != kpad || s2.size() != kpad || perm.size() != kpad || k > kpad) {
          throw py::value_error("rotate_rows: s1, s2, perm must have sum(blocks) entries and K <= sum(blocks)");
        }
        const int32_t* pp = perm.data();
        for (long i = 0; i < kpad; ++i) {
          if (pp[i] < 0 || pp[i] >= kpad) throw py::value_error("rotate_rows: perm index out of range");
        }
        py::array_t<float> out({n, kpad});
        const float* x = rows.data();
        float* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          for (long r = 0; r < n; ++r) {
            cqjax::RotateRow(x + r * k, static_cast<int>(k), s1.data(), s2.data(), pp, blocks.data(),
                             static_cast<int>(blocks.size()), static_cast<int>(kpad), o + r * kpad);
          }
        }
        return out;
      },
      py::arg("rows"), py::arg("s1"), py::arg("s2"), py::arg("perm"), py::arg("blocks"),
      "R rows for float32 rows [n, K] -> [n, sum(blocks)] (cqjax/rotate.h); releases the GIL.");

  // The weight quantizer's fast paths (cqjax/quantize.h); callers validate, these check sizes.
  m.def(
      "quantize_rows",
      [](py::array_t<float, py::array::c_style> x, std::vector<int> blocks,
         py::array_t<float, py::array::c_style> mids) {
        const long kpad = BlocksSum(blocks);
        if (x.ndim() != 2 || x.shape(1) != kpad || mids.ndim() != 2 ||
            mids.shape(0) != static_cast<long>(blocks.size())) {
          throw py::value_error("quantize_rows: x must be [rows, sum(blocks)], mids [nblocks, levels - 1]");
        }
        const long rows = x.shape(0);
        py::array_t<uint8_t> codes({rows, kpad});
        py::array_t<double> norms({rows, static_cast<long>(blocks.size())});
        bool finite;
        {
          py::gil_scoped_release release;
          finite = cqjax::QuantizeRows(x.data(), 0, rows, static_cast<int>(kpad), blocks.data(),
                                       static_cast<int>(blocks.size()), mids.data(),
                                       static_cast<int>(mids.shape(1)), codes.mutable_data(),
                                       norms.mutable_data());
        }
        return py::make_tuple(codes, norms, finite);
      },
      py::arg("x"), py::arg("blocks"), py::arg("mids"),
      "(codes u8 [rows, Kpad], norms f64 [rows, nblocks], all norms finite) of rotated rows.");
  m.def(
      "rotated_error_sums",
      [](py::array_t<float, py::array::c_style> x, py::array_t<uint8_t, py::array::c_style> packed,
         int bits, py::array_t<uint16_t, py::array::c_style> norms, std::vector<int> blocks,
         py::array_t<float, py::array::c_style> levels) {
        const long kpad = BlocksSum(blocks), nb = static_cast<long>(blocks.size());
        if (!cqjax::formats::BitsSupported(bits) || kpad % 8 || x.ndim() != 2 || x.shape(1) != kpad ||
            packed.ndim() != 2 || packed.shape(0) != x.shape(0) ||
            packed.shape(1) != cqjax::formats::RowBytes(static_cast<int>(kpad), bits) || norms.ndim() != 2 ||
            norms.shape(0) != x.shape(0) || norms.shape(1) != nb || levels.ndim() != 2 ||
            levels.shape(0) != nb || levels.shape(1) != (1L << bits)) {
          throw py::value_error("rotated_error_sums: x [rows, Kpad], packed codes [rows, Kpad*bits/8], "
                                "norms [rows, nblocks], levels [nblocks, 2**bits] must agree");
        }
        double err = 0.0, ref = 0.0;
        {
          py::gil_scoped_release release;
          cqjax::RotatedErrorSums(x.data(), packed.data(), bits, norms.data(), 0, x.shape(0),
                                  static_cast<int>(kpad), blocks.data(), static_cast<int>(nb),
                                  levels.data(), &err, &ref);
        }
        return py::make_tuple(err, ref);
      },
      py::arg("x"), py::arg("packed"), py::arg("bits"), py::arg("norms"), py::arg("blocks"),
      py::arg("levels"),
      "(sum of squared error, sum of squares) of decoded rows against rotated rows x (float64).");
  m.def(
      "pack_codes",
      [](py::array_t<uint8_t, py::array::c_style> codes, int bits) {
        if (codes.ndim() != 2 || !cqjax::formats::BitsSupported(bits) || codes.shape(1) % 8) {
          throw py::value_error("pack_codes: codes must be [rows, Kpad % 8 == 0], bits in 1, 2, 3, 4, 8");
        }
        const long rows = codes.shape(0), kpad = codes.shape(1);
        py::array_t<uint8_t> out({rows, static_cast<long>(cqjax::formats::RowBytes(static_cast<int>(kpad), bits))});
        bool ok;
        {
          py::gil_scoped_release release;
          ok = cqjax::PackRows(codes.data(), 0, rows, static_cast<int>(kpad), bits, out.mutable_data());
        }
        if (!ok) throw py::value_error("pack_codes: a code is >= 2**bits");
        return out;
      },
      py::arg("codes"), py::arg("bits"), "Packed codes [rows, Kpad * bits / 8] (layout v1).");

#ifdef CQJAX_VERSION
  m.attr("__version__") = CQJAX_VERSION;
#endif
}
