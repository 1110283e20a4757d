"""Bridge to the C++ extension ``cqjax._xla_ext``: XLA FFI targets and CPU info.

Importing this module registers every handler of the extension with
``jax.ffi.register_ffi_target(..., platform="cpu")`` once; wrappers call them
through ``jax.ffi.ffi_call``.

| target          | wrapper            | operands                               | static attributes     |
|-----------------|--------------------|----------------------------------------|-----------------------|
| cqjax_scale     | :func:`scale`      | x: f32[...]                            | scale: f32            |
| cqjax_cq_matmul | :func:`cq_matmul`  | x f32[..., K], codes, norms, codebooks,| bits, blocks, rotate  |
|                 |                    | s1, s2, perm (a CQ weight, layout v1)  |                       |
| cqjax_cq_gather | :func:`cq_gather`  | ids i32[...], codes, norms, codebooks, | bits, blocks, k,      |
|                 |                    | s1, s2, perm                           | rotate                |
| cqjax_attention | :func:`attention_bf16` | q f32[N, R, D], k u16[N, D, S],    | scale, softcap        |
| _bf16           |                    | v u16[N, S, Dv] (bf16 bits), mask      |                       |

The CQ kernels' scheme (int8 activations and int8 codebook levels, exact int32 block dots)
and their SIMD paths are documented in ``xla_ext/include/cqjax/cq_kernel.h``; the path is
chosen at run time from the CPU's features, forced with ``CQJAX_KERNEL_PATH`` or
:func:`set_kernel_path`; threads come from XLA's intra-op pool, capped with
``CQJAX_KERNEL_THREADS`` or :func:`set_kernel_threads`.

Example:
    >>> import jax.numpy as jnp
    >>> from cqjax import _ffi
    >>> _ffi.scale(jnp.ones(3, jnp.float32), 2.0).tolist()
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

try:
    from cqjax import _xla_ext
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "cqjax._xla_ext (the compiled extension) is missing: cqjax was imported "
        "from a source tree that was never built. Install it with `pip install .` "
        "or, for development, `pip install --no-build-isolation -e .`."
    ) from e

__all__ = [
    "TARGETS",
    "active_kernel_path",
    "attention_bf16",
    "cpu_features",
    "cq_gather",
    "cq_matmul",
    "kernel_paths",
    "scale",
    "set_kernel_path",
    "set_kernel_threads",
]


def _register() -> tuple[str, ...]:
    names = []
    for name, capsule in _xla_ext.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        names.append(name)
    return tuple(sorted(names))


TARGETS: tuple[str, ...] = _register()
"""Names of the FFI targets registered for the CPU platform."""


def cpu_features() -> dict[str, bool]:
    """Returns the instruction-set extensions of the running CPU.

    Detected at run time (the extension is not built with ``-march=native``).

    Returns:
        ``{name: bool}`` for ``avx2, fma, avx512f, avx512bw, avx512vnni,
        avx512vbmi`` (x86-64) and ``neon, dotprod`` (aarch64); the other
        architecture's flags are False.
    """
    return {k: bool(v) for k, v in _xla_ext.cpu_features().items()}


def scale(x: jax.Array, factor: float) -> jax.Array:
    """Multiplies a float32 array by a constant in the C++ ``cqjax_scale`` handler.

    Works under ``jit`` and ``vmap`` (elementwise, ``vmap_method="broadcast_all"``).

    Args:
        x: float32 array of any shape.
        factor: the constant; static (an FFI attribute compiled into the HLO),
            so a new value recompiles.

    Returns:
        ``x * factor`` as float32, same shape as ``x``.

    Raises:
        TypeError: ``x`` is not float32.
    """
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        raise TypeError(f"cqjax_scale: x must be float32, got {x.dtype}")
    call = jax.ffi.ffi_call(
        "cqjax_scale",
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        vmap_method="broadcast_all",
    )
    return call(x, scale=np.float32(factor))


def kernel_paths() -> dict[str, bool]:
    """``{path: usable}`` for the CQ kernel paths (compiled in and supported by this CPU)."""
    return {k: bool(v) for k, v in _xla_ext.kernel_paths().items()}


def active_kernel_path() -> str:
    """The CQ kernel path that calls use now (override, ``CQJAX_KERNEL_PATH`` or the best).

    Raises:
        ValueError: ``CQJAX_KERNEL_PATH`` names an unknown or unsupported path.
    """
    return _xla_ext.active_kernel_path()


def set_kernel_path(name: str | None) -> None:
    """Forces a CQ kernel path (``"ref"``, ``"avx2"``, ``"avx512"``, ``"avx512vbmi"``,
    ``"neon"``, ``"neon_dot"``) for later calls; ``None`` restores the default. Takes effect at run
    time (no retrace needed).

    Raises:
        ValueError: the path is unknown or this CPU/binary does not support it.
    """
    _xla_ext.set_kernel_path(name)


def set_kernel_threads(n: int) -> None:
    """Caps the threads one CQ kernel call uses (0: all of XLA's intra-op pool)."""
    _xla_ext.set_kernel_threads(int(n))


def _check(cond: bool, who: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{who}: {msg}")


def _weight_operands(who, codes, norms, codebooks, s1, s2, perm, bits, blocks):
    blocks = tuple(int(b) for b in blocks)
    kpad = sum(blocks)
    _check(bits in (1, 2, 3, 4, 8), who, f"bits={bits} not in (1, 2, 3, 4, 8)")
    _check(kpad % 8 == 0 and all(b > 0 and b & (b - 1) == 0 for b in blocks), who,
           f"blocks={blocks} must be powers of two summing to a multiple of 8")
    codes, norms, codebooks = jnp.asarray(codes), jnp.asarray(norms), jnp.asarray(codebooks)
    _check(codes.ndim == 2 and codes.dtype == jnp.uint8 and codes.shape[1] == kpad * bits // 8, who,
           f"codes must be uint8 [N, {kpad * bits // 8}], got {codes.dtype} {codes.shape}")
    n = codes.shape[0]
    _check(norms.shape == (n, len(blocks)), who,
           f"norms must be [{n}, {len(blocks)}], got {norms.shape}")
    _check(codebooks.shape == (len(blocks), 1 << bits), who,
           f"codebooks must be [{len(blocks)}, {1 << bits}], got {codebooks.shape}")
    rot = []
    for name, a, dt in (("s1", s1, jnp.int8), ("s2", s2, jnp.int8), ("perm", perm, jnp.int32)):
        a = jnp.asarray(a)
        _check(a.shape == (kpad,), who, f"{name} must be [{kpad}], got {a.shape}")
        rot.append(a.astype(dt))
    ops = (codes, norms.astype(jnp.float16), codebooks.astype(jnp.float16), *rot)
    attrs = dict(bits=np.int32(bits), blocks=np.asarray(blocks, np.int64))
    return n, kpad, ops, attrs


def cq_matmul(x, codes, norms, codebooks, s1, s2, perm, *, bits: int, blocks, rotate: bool = True):
    """``y = (R x) · Ŵᵀ`` for a CQ-packed weight in the C++ kernel (CPU).

    ``Ŵ[n, k] = codebooks[j, code(n, k)] * norms[n, j]`` (k in block j, layout v1) holds the
    rotated rows; ``R`` is the rotation ``(s1, s2, perm)`` over ``blocks``. Activations and
    codebook levels are quantized to int8 inside the kernel (see ``cq_kernel.h``): results
    differ from the float reference by about 1% of ``|y|`` relative RMS.

    Works under ``jit`` and ``vmap`` over ``x`` (``vmap_method="expand_dims"``); vmapping
    over stacked weights is rejected.

    Args:
        x: float activations ``[..., K]`` (``K <= sum(blocks)``; ``[..., sum(blocks)]``
            already rotated when ``rotate=False``); cast to float32.
        codes: uint8 ``[N, sum(blocks) * bits / 8]``.
        norms: float16 ``[N, len(blocks)]``.
        codebooks: float16 ``[len(blocks), 2**bits]``.
        s1, s2: int8 ±1 ``[Kpad]``; perm: int32 ``[Kpad]`` (each index inside its block).
        bits: 1, 2, 3, 4 (SIMD) or 8 (reference path only).
        blocks: the block plan (static).
        rotate: rotate ``x`` in the kernel (default) or take it as already rotated.

    Returns:
        float32 ``[..., N]``.

    Raises:
        ValueError: shapes or dtypes that do not fit (at trace time; the kernel checks again).
    """
    who = "cq_matmul"
    n, kpad, ops, attrs = _weight_operands(who, codes, norms, codebooks, s1, s2, perm, bits, blocks)
    x = jnp.asarray(x)
    _check(x.ndim >= 1, who, "x must be [..., K]")
    K = x.shape[-1]
    if rotate:
        _check(1 <= K <= kpad, who, f"x has K={K}, expected 1..{kpad}")
    else:
        _check(K == kpad, who, f"x has K={K}; an unrotated call expects Kpad={kpad}")
    call = jax.ffi.ffi_call(
        "cqjax_cq_matmul",
        jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32),
        vmap_method="expand_dims",
    )
    return call(x.astype(jnp.float32), *ops, rotate=np.int32(bool(rotate)), **attrs)


def cq_gather(ids, codes, norms, codebooks, s1, s2, perm, *, bits: int, blocks, K: int,
              rotate: bool = True):
    """Decoded rows ``R^T Ŵ[ids]`` cropped to ``K`` (the quantized embedding lookup), float32.

    Exact float decode (no int8): equal to the pure-JAX ``take_rows`` to float32 rounding.
    An id outside ``[0, N)`` raises at run time (never read out of bounds).

    Args:
        ids: integer token ids ``[...]`` (cast to int32).
        codes, norms, codebooks, s1, s2, perm, bits, blocks: as in :func:`cq_matmul`.
        K: the unpadded row length.
        rotate: undo the rotation (default) or return rotated rows.

    Returns:
        float32 ``[..., K]``.
    """
    who = "cq_gather"
    n, kpad, ops, attrs = _weight_operands(who, codes, norms, codebooks, s1, s2, perm, bits, blocks)
    _check(1 <= K <= kpad, who, f"K={K} must be in 1..{kpad}")
    ids = jnp.asarray(ids)
    _check(jnp.issubdtype(ids.dtype, jnp.integer), who, f"ids must be integers, got {ids.dtype}")
    call = jax.ffi.ffi_call(
        "cqjax_cq_gather",
        jax.ShapeDtypeStruct(ids.shape + (K,), jnp.float32),
        vmap_method="expand_dims",
    )
    return call(ids.astype(jnp.int32), *ops, k=np.int32(K), rotate=np.int32(bool(rotate)), **attrs)


def attention_bf16(q, k, v, mask, *, scale: float, softcap: float | None = None):
    """Grouped-query attention over a bfloat16 KV cache held as its ``uint16`` bits.

    Args:
      q: float32 ``[N, R, D]``: ``N = B·KV`` head groups, ``R = G·T`` rows (row ``r`` is the
        query at new position ``r % T``).
      k: uint16 ``[N, D, S]`` bfloat16 bits of the cached keys.
      v: uint16 ``[N, S, Dv]`` bfloat16 bits of the cached values.
      mask: bool ``[B, T, S]``: which cached slots each new position attends.
      scale: the scores' factor; softcap: ``tanh(s / c) · c`` of the scaled scores, or None.

    Returns:
      float32 ``[N, R, Dv]``: softmax over the unmasked slots of the scores, times the values
      (a row with no slot to attend averages every value, as the JAX reference does).
    """
    who = "cqjax_attention_bf16"
    _check(k.dtype == jnp.uint16 and v.dtype == jnp.uint16, who, f"k, v must be uint16, got {k.dtype}, {v.dtype}")
    call = jax.ffi.ffi_call(who, jax.ShapeDtypeStruct((q.shape[0], q.shape[1], v.shape[2]), jnp.float32))
    return call(q.astype(jnp.float32), k, v, mask.astype(jnp.bool_), scale=np.float32(scale),
                softcap=np.float32(0.0 if softcap is None else softcap))

