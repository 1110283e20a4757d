// XLA FFI handlers: decode buffers and attributes, then call plain kernels.
#include <cstddef>
#include <cstdint>

#include "cqjax/ffi_handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace cqjax {
namespace {

// Plain kernel: y[i] = x[i] * scale.
void ScaleF32(const float* x, float scale, float* y, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) y[i] = x[i] * scale;
}

ffi::Error ScaleImpl(ffi::Buffer<ffi::F32> x, float scale,
                     ffi::ResultBuffer<ffi::F32> y) {
  if (x.element_count() != y->element_count()) {
    return ffi::Error::InvalidArgument(
        "cqjax_scale: operand and result element counts differ");
  }
  ScaleF32(x.typed_data(), scale, y->typed_data(), x.element_count());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace cqjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(CqjaxScale, cqjax::ScaleImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
