"""The default pipelines: the data-free CQ recipe and the round-to-nearest baseline.

==============  ==============================================================================
pipeline        passes (names as in reports and Hydra)
==============  ==============================================================================
cq_pipeline     ``rotate`` (:class:`Rotate`) → ``codebook`` (:class:`FitCodebook`) → ``pack``
rtn_pipeline    ``rtn`` (:class:`RoundToNearest`)
==============  ==============================================================================

Both quantize every eligible tensor (linears, embeddings, LM head, per-layer embeddings):
``bits`` for linears, ``embed_bits`` for embeddings and the LM head, ``overrides`` (a mapping
filter → bits, first match wins) before either.

>>> [name for name, _ in cq_pipeline(bits=2).steps]
['rotate', 'codebook', 'pack']
>>> rtn_pipeline(bits=4).steps[0][1].block
128
"""

from __future__ import annotations

from typing import Any

from cqjax.passes.common import bits_rules
from cqjax.passes.cq import FitCodebook, Pack, Rotate
from cqjax.passes.rtn import RoundToNearest
from cqjax.pipeline import Chain, named_chain


def cq_pipeline(bits: int = 3, embed_bits: int | None = 4, block: int = 128, seed: int = 0,
                codebook: str = "analytic", gain: str = "none", overrides: Any = None,
                error_feedback: str | None = None) -> Chain:
    """Rotate → fit codebook → pack.

    Args:
      bits: bit width of linear layers.
      embed_bits: bit width of embeddings and the LM head (None: same rules as linears).
      block: rotation/norm block size along the input dim.
      seed: rotation seed (combined with a per-path seed).
      codebook: ``"analytic"`` (data-free) or ``"fitted"`` (Lloyd–Max on the tensor).
      gain: norm gain, ``"none"``, ``"ls"`` or ``"norm"``.
      overrides: ``{filter: bits}`` rules tried first.
      error_feedback: None, or the basis (``"rotated"`` | ``"unrotated"``) of GPTQ-style error
        feedback: ``pack`` is then :class:`~cqjax.passes.gptq.ErrorFeedbackPack`, which reads
        calibration Hessians (``gain`` must stay ``"none"``).
    """
    if error_feedback is None:
        pack = Pack(gain=gain)
    else:
        from cqjax.passes.gptq import ErrorFeedbackPack

        pack = ErrorFeedbackPack(basis=error_feedback, gain=gain)
    return named_chain(("rotate", Rotate(block=block, seed=seed)),
                       ("codebook", FitCodebook(bits=bits_rules(bits, embed_bits, overrides), mode=codebook)),
                       ("pack", pack))


def rtn_pipeline(bits: int = 3, embed_bits: int | None = 4, block: int = 128, overrides: Any = None) -> Chain:
    """Asymmetric round-to-nearest with an fp16 scale and zero per block (the baseline)."""
    return named_chain(("rtn", RoundToNearest(bits=bits_rules(bits, embed_bits, overrides), block=block)))


PIPELINES = {"cq": cq_pipeline, "rtn": rtn_pipeline}
