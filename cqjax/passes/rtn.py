"""Round-to-nearest uniform quantization: the baseline, with the recipe's coverage."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from cqjax.formats import cq as fmt
from cqjax.kernels.qarrays import RTNArray, rtn_kpad
from cqjax.passes import rtn_core
from cqjax.passes.common import ELIGIBLE, bits_for, rows_of
from cqjax.pipeline import Pass
from cqjax.select import Rules


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundToNearest(Pass):
    """Asymmetric uniform codes in blocks of ``block`` along the input dim, fp16 scale + zero."""

    default_where = ELIGIBLE
    bits: Any = 3
    block: int = 128

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "bits", Rules.of(self.bits))

    def rewrite(self, path, leaf, meta, ctx):
        rows, transposed = rows_of(leaf, meta)
        bits = bits_for(self.bits, path, meta)
        codes, scales, zeros = rtn_core.rtn_quantize(rows, bits, self.block)
        K = rows.shape[1]
        padded = np.zeros((codes.shape[0], rtn_kpad(K)), np.uint8)
        padded[:, :K] = codes
        q = RTNArray(codes=jnp.asarray(fmt.pack_codes(padded, bits)), scales=jnp.asarray(scales),
                     zeros=jnp.asarray(zeros), bits=bits, blocks=rtn_core.rtn_blocks(K, self.block),
                     K=K, transposed=transposed)
        return q, meta.replace(info={**meta.info, "bits": bits, "block": self.block, "format": "rtn"})
