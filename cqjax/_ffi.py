"""Bridge to the C++ extension ``cqjax._xla_ext``: XLA FFI targets and CPU info.

Importing this module registers every handler of the extension with
``jax.ffi.register_ffi_target(..., platform="cpu")`` once; wrappers call them
through ``jax.ffi.ffi_call``.

| target        | wrapper              | operands    | static attributes |
|---------------|----------------------|-------------|-------------------|
| cqjax_scale   | :func:`scale`        | x: f32[...] | scale: f32        |

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

__all__ = ["TARGETS", "cpu_features", "scale"]


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
