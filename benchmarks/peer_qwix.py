"""Qwix (the JAX quantization library) as a peer quantizer of linears.

Qwix's weight-only PTQ (``PtqProvider``) quantizes a kernel with ``qwix.quantize``: symmetric
absmax integers per tile of the contracting axis (here the input dim), one scale per tile and
output channel. Applied here kernel by kernel with that same call, on the same float weights as
every other method (its op interception of a model's ``__call__`` is not needed for weight-only
quantization, and would not see cqjax's custom lookup ops). Qwix needs tiles that divide the
input dim, so a kernel whose input dim ``group`` does not divide gets the largest power of two
that does. Stored bytes are charged as a packed format would store them: ``bits`` per weight
plus an fp16 scale per tile (Qwix itself keeps 2- and 3-bit values in 4-bit containers and its
scales in float32 unless told otherwise, i.e. more).
"""

from __future__ import annotations

import numpy as np


def tile(K: int, group: int) -> int:
    """``group`` if it divides ``K``, else the largest power of two below it that does."""
    t = group
    while K % t:
        t //= 2
    return t


def quantize(rows: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, int]:
    """``(decoded float32 [out, in], stored bytes)`` of one weight ``rows [out, in]``."""
    import jax.numpy as jnp
    import qwix

    N, K = rows.shape
    t = tile(K, group)
    q = qwix.quantize(jnp.asarray(rows, jnp.float32), f"int{bits}", channelwise_axes=[0], tiled_axes={1: t},
                      calibration_method="absmax", scale_dtype=jnp.float16)
    w_hat = np.asarray(qwix.dequantize(q), np.float32)
    return np.ascontiguousarray(w_hat), int(N * K * bits / 8 + 2 * N * (K // t))
