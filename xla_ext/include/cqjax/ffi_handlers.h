// XLA FFI handler symbols exported by the cqjax extension.
//
// Each symbol is an XLA_FFI_Handler* defined with
// XLA_FFI_DEFINE_HANDLER_SYMBOL; Python wraps it in a PyCapsule and registers
// it with jax.ffi.register_ffi_target(name, capsule, platform="cpu").
//
// | target name   | operands        | attributes   | result        |
// |---------------|-----------------|--------------|---------------|
// | cqjax_scale   | x: f32[...]     | scale: f32   | x * scale     |
#ifndef CQJAX_FFI_HANDLERS_H_
#define CQJAX_FFI_HANDLERS_H_

#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* CqjaxScale(XLA_FFI_CallFrame* call_frame);
}

#endif  // CQJAX_FFI_HANDLERS_H_
