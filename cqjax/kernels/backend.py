"""Which implementation a quantized leaf's matmul / lookup runs: the C++ kernel or pure JAX.

==========  ======================================================================
mode        what CQ leaves (1-4 bits) run
==========  ======================================================================
``auto``    the C++ FFI kernel on CPU for layers of at least :data:`AUTO_MIN_WEIGHTS`
            weights, pure JAX elsewhere (``lax.platform_dependent``) and for tiny
            layers (where a call's ~6 us overhead dominates and the exact float
            path costs nothing)
``ffi``     the C++ FFI kernel always (CPU only)
``jax``     pure JAX always (the reference: rotate, decode, einsum)
==========  ======================================================================

The mode comes from :func:`use_kernel` / :func:`set_kernel`, else the environment variable
``CQJAX_KERNEL``, else ``auto``. It is read when a function is **traced**: a jitted function
keeps the mode it was traced with. The kernel quantizes activations to int8 per block (see
``xla_ext/include/cqjax/cq_kernel.h``), so its results differ slightly from the pure-JAX path;
the embedding lookup is exact in both. RTN leaves and 8-bit CQ leaves always run pure JAX.

>>> from cqjax.kernels import backend
>>> with backend.use_kernel("jax"):
...     backend.kernel_mode()
'jax'
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp

MODES = ("auto", "ffi", "jax")
KERNEL_BITS = (1, 2, 3, 4)
AUTO_MIN_WEIGHTS = 1 << 16
"""``auto`` runs the kernel only for weights with at least this many entries (rows x K)."""

_local = threading.local()
_global: list[str | None] = [None]


def _check_mode(mode: str, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where}={mode!r}; allowed: {MODES}")
    return mode


def kernel_mode() -> str:
    """The active mode: the innermost :func:`use_kernel`, :func:`set_kernel`, ``CQJAX_KERNEL``
    or ``"auto"``."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _global[0] is not None:
        return _global[0]
    return _check_mode(os.environ.get("CQJAX_KERNEL", "auto") or "auto", "CQJAX_KERNEL")


def set_kernel(mode: str | None) -> None:
    """Sets the process-wide mode (``None``: back to ``CQJAX_KERNEL`` / ``auto``)."""
    _global[0] = None if mode is None else _check_mode(mode, "set_kernel(mode)")


@contextlib.contextmanager
def _pushed(name: str, value: str) -> Iterator[None]:
    """``value`` on top of this thread's stack ``name`` for the ``with`` body."""
    stack = _local.__dict__.setdefault(name, [])
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


def use_kernel(mode: str) -> contextlib.AbstractContextManager:
    """Runs the ``with`` body (on this thread) with ``mode``; traces inside it use that mode."""
    return _pushed("stack", _check_mode(mode, "use_kernel(mode)"))


DOT_DTYPES = ("float32", "bfloat16")


def dot_dtype() -> str:
    """The operand dtype of the pure-JAX dots traced now: the innermost :func:`use_dot_dtype`,
    else ``"float32"``."""
    stack = getattr(_local, "dots", None)
    return stack[-1] if stack else "float32"


def use_dot_dtype(dtype: str) -> contextlib.AbstractContextManager:
    """Runs the ``with`` body (on this thread) with the pure-JAX weight dots (:func:`dot`) taking
    ``dtype`` operands, accumulated in float32. ``bfloat16`` runs several times faster where the
    CPU has bf16 matrix units (:func:`bf16_dots_fast`) and rounds each operand to 8 significant
    bits: for work whose results are refit anyway (tuning's gradient steps), not for evaluation."""
    if dtype not in DOT_DTYPES:
        raise ValueError(f"dot dtype {dtype!r}; allowed: {DOT_DTYPES}")
    return _pushed("dots", dtype)


def dot(x: jax.Array, w: jax.Array, spec: str = "...k,kn->...n") -> jax.Array:
    """``einsum(spec, x, w)`` in float32, its operands in :func:`dot_dtype`."""
    dt = jnp.dtype(dot_dtype())
    return jnp.einsum(spec, x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)


@functools.lru_cache(maxsize=1)
def bf16_dots_fast() -> bool:
    """Whether bfloat16 dots beat float32 ones on the default backend: TPU and GPU, or a CPU with
    bf16 dot instructions (x86 AVX512-BF16 / AMX-BF16, Arm BF16; read from /proc/cpuinfo)."""
    if jax.default_backend() != "cpu":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16", "bf16"))


@functools.lru_cache(maxsize=1)
def ffi_available() -> bool:
    """True when the compiled extension imports (its targets are then registered)."""
    try:
        from cqjax import _ffi  # noqa: F401
    except ImportError:
        return False
    return True


def _ffi_mod():
    from cqjax import _ffi

    return _ffi


def _uses_kernel(q) -> str | None:
    """``"ffi"``, ``"auto"`` or None (pure JAX) for a CQ leaf under the current mode."""
    mode = kernel_mode()
    if mode == "jax" or getattr(q, "format", None) != "cq" or q.bits not in KERNEL_BITS:
        return None
    if not ffi_available():
        if mode == "ffi":
            raise RuntimeError("CQJAX_KERNEL=ffi but the compiled extension cqjax._xla_ext is missing")
        return None
    if mode == "auto" and q.codes.shape[0] * q.K < AUTO_MIN_WEIGHTS:
        return None
    return mode


def runs_in_jax(q) -> bool:
    """True when a quantized leaf's matmul runs in pure JAX under the current mode on the
    default backend (no kernel: mode ``jax``, no extension, RTN, 8 bits, a tiny layer under
    ``auto``, or ``auto`` on a TPU/GPU host)."""
    mode = _uses_kernel(q)
    return mode is None or (mode == "auto" and jax.default_backend() != "cpu")


def _pick(mode: str, operand, ffi_fn, jax_fn):
    if mode == "ffi":
        return ffi_fn(operand)
    return jax.lax.platform_dependent(operand, cpu=ffi_fn, default=jax_fn)


def dot_rows(q, x, jax_fn):
    """``(R (x / in_scale)) · rowsᵀ`` in float32 for a CQ leaf ``q`` (no division without an
    ``in_scale``): the kernel or ``jax_fn(x)``."""
    mode = _uses_kernel(q)
    if mode is None:
        return jax_fn(x)

    def ffi_fn(v):  # an input scale divides the activation before the kernel rotates it
        return _ffi_mod().cq_matmul(q.scale_input(v), q.codes, q.norms, q.codebooks, q.s1, q.s2, q.perm,
                                    bits=q.bits, blocks=q.blocks)

    return _pick(mode, x.astype(jnp.float32), ffi_fn, lambda v: jax_fn(v).astype(jnp.float32))


def take_rows(q, ids, jax_fn):
    """Decoded rows ``T[ids]`` (float32) for a CQ leaf: the kernel or ``jax_fn(ids)``."""
    mode = _uses_kernel(q)
    if mode is None:
        return jax_fn(ids)

    def ffi_fn(i):
        return q.unscale_rows(_ffi_mod().cq_gather(i, q.codes, q.norms, q.codebooks, q.s1, q.s2, q.perm,
                                                   bits=q.bits, blocks=q.blocks, K=q.K))

    return _pick(mode, jnp.asarray(ids).astype(jnp.int32), ffi_fn,
                 lambda i: jax_fn(i).astype(jnp.float32))


def attention_bf16(qg, k, v, mask, *, scale: float, softcap: float | None, jax_fn):
    """Attention of ``qg [B·KV, R, D]`` over a bfloat16 cache held as ``uint16`` bits (``k [B·KV,
    D, S]``, ``v [B·KV, S, Dv]``) with ``mask [B, T, S]``: the C++ kernel where it runs, else
    ``jax_fn(qg, mask, k, v, scale, softcap)``."""
    mode = kernel_mode()
    if mode == "jax" or not ffi_available():
        if mode == "ffi":
            raise RuntimeError("CQJAX_KERNEL=ffi but the compiled extension cqjax._xla_ext is missing")
        return jax_fn(qg, mask, k, v, scale, softcap)

    def ffi_fn(x):
        return _ffi_mod().attention_bf16(x, k, v, mask, scale=scale, softcap=softcap)

    return _pick(mode, qg.astype(jnp.float32), ffi_fn, lambda x: jax_fn(x, mask, k, v, scale, softcap))

