// pybind11 module cqjax._xla_ext: FFI handler capsules and CPU features.
#include <pybind11/pybind11.h>

#include "cqjax/cpu_features.h"
#include "cqjax/ffi_handlers.h"

namespace py = pybind11;

namespace {

template <typename Fn>
py::capsule EncapsulateHandler(Fn* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

PYBIND11_MODULE(_xla_ext, m) {
  m.doc() = "cqjax XLA FFI CPU kernels (C++).";

  m.def(
      "registrations",
      []() {
        py::dict d;
        d["cqjax_scale"] = EncapsulateHandler(CqjaxScale);
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

#ifdef CQJAX_VERSION
  m.attr("__version__") = CQJAX_VERSION;
#endif
}
