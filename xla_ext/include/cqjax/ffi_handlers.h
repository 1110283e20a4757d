// XLA FFI handler symbols exported by the cqjax extension.
//
// Each symbol is an XLA_FFI_Handler* defined with
// XLA_FFI_DEFINE_HANDLER_SYMBOL; Python wraps it in a PyCapsule and registers
// it with jax.ffi.register_ffi_target(name, capsule, platform="cpu").
//
// | target name   | operands        | attributes   | result        |
// |---------------|-----------------|--------------|---------------|
// | cqjax_scale   | x: f32[...]     | scale: f32   | x * scale     |
// | cqjax_cq_matmul | x f32[..., K], codes u8[N, RB], norms f16[N, nb],  |
// |               | codebooks f16[nb, 2^bits], s1/s2 s8[Kpad], perm s32[Kpad] |
// |               | bits, blocks, rotate | y f32[..., N] = (R x) . W^T |
// | cqjax_cq_gather | ids s32[...], codes, norms, codebooks, s1, s2, perm |
// |               | bits, blocks, k, rotate | f32[..., k] decoded rows |
// | cqjax_attention_bf16 | q f32[N, R, D], k u16[N, D, S], v u16[N, S, Dv] (bf16 bits), |
// |               | mask pred[B, T, S] | scale, softcap | f32[N, R, Dv] attention |
#ifndef CQJAX_FFI_HANDLERS_H_
#define CQJAX_FFI_HANDLERS_H_

#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* CqjaxScale(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* CqjaxCqMatmul(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* CqjaxCqGather(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* CqjaxAttentionBf16(XLA_FFI_CallFrame* call_frame);
}

namespace cqjax {
namespace cq {
// Caps the threads a CQ kernel call uses (0: every thread of XLA's pool, or
// CQJAX_KERNEL_THREADS when set).
void SetMaxThreads(int n);
int MaxThreads();
}  // namespace cq
}  // namespace cqjax

#endif  // CQJAX_FFI_HANDLERS_H_
