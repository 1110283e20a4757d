"""Round-to-nearest uniform quantization: the baseline, with the recipe's coverage."""

from __future__ import annotations

import dataclasses
from typing import Any

from cqjax.kernels.qarrays import RTNArray
from cqjax.passes import rtn_core
from cqjax.passes.common import bits_for, rows_of
from cqjax.pipeline import Pass
from cqjax.quant_stats import ELIGIBLE
from cqjax.select import Rules


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundToNearest(Pass):
    """Asymmetric uniform codes in blocks of ``block`` along the input dim, fp16 scale + zero."""

    default_where = ELIGIBLE
    row_separable = True  # scales and zeros are per (row, block)
    bits: Any = 3
    block: int = 128

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "bits", Rules.of(self.bits))

    def rewrite(self, path, leaf, meta, ctx):
        rows, transposed = rows_of(leaf, meta)
        bits = bits_for(self.bits, path, meta)
        codes, scales, zeros = rtn_core.rtn_quantize(rows, bits, self.block)
        q = RTNArray.pack(codes, scales, zeros, bits=bits, block=self.block, K=rows.shape[1], transposed=transposed)
        return q, meta.replace(info={**meta.info, "bits": bits, "block": self.block, "format": "rtn"})
