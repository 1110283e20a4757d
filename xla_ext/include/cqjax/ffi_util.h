// Small helpers shared by the FFI handlers.
#ifndef CQJAX_FFI_UTIL_H_
#define CQJAX_FFI_UTIL_H_

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace cqjax {

// "[d0, d1, ...]": a buffer's dimensions for an error message.
inline std::string DimsStr(xla::ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

}  // namespace cqjax

#endif  // CQJAX_FFI_UTIL_H_
