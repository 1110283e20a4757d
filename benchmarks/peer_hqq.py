"""HQQ (half-quadratic quantization, ``hqq`` on CPU torch) as a peer quantizer of linears.

Each linear weight ``[out, in]`` is quantized as ``HQQLinear`` would (``hqq_base_quant_config``
settings: asymmetric, ``axis=1`` groups of ``group`` consecutive weights in row-major order,
optimized scale/zero, zero rounded at 4 bits), with scale and zero kept in fp16 as HQQ stores
them for an fp16 compute dtype, then decoded once to float32 for scoring. Stored bytes are what
HQQ keeps: the packed codes tensor as it packs them (3 bits go 10 per int32, i.e. 3.2 bits)
plus an fp16 scale and zero per group.
"""

from __future__ import annotations

import numpy as np


def quantize(rows: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, int]:
    """``(decoded float32 [out, in], stored bytes)`` of one weight ``rows [out, in]``."""
    import torch
    from hqq.core.quantize import Quantizer

    W = torch.from_numpy(np.ascontiguousarray(rows, np.float32))
    W_q, meta = Quantizer.quantize(W, nbits=bits, channel_wise=True, group_size=group, optimize=True,
                                   round_zero=bits == 4, axis=1, bitpack=True, compute_dtype=torch.float16,
                                   device="cpu")
    meta["scale"] = meta["scale"].to(torch.float16).float()
    meta["zero"] = meta["zero"].to(torch.float16).float()
    meta["compute_dtype"] = torch.float32
    w_hat = Quantizer.dequantize(W_q, meta).numpy()
    nbytes = W_q.numel() * W_q.element_size() + 2 * (meta["scale"].numel() + meta["zero"].numel())
    return np.ascontiguousarray(w_hat, np.float32), int(nbytes)
