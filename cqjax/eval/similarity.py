"""How close a model's next-token distributions are to a reference model's, on perplexity windows.

One pass over the windows runs both forwards per batch inside one jitted step
(:class:`cqjax.eval.scoring.SimilarityScorer`); only per-row sums leave the device, so at most
one batch of ``[B, T, V]`` logits per model exists at a time (for Gemma 3, V = 262,144 and
``B = 1, T = 512`` is 512 MiB per model in float32).

Example:
  >>> res = similarity(quant_forward, float_forward, prepare_windows(tok))  # doctest: +SKIP
  >>> res.kl, res.top1, res.perplexity, res.ref_perplexity                  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from cqjax.progress import Progress
from cqjax.eval.scoring import SIMILARITY_FIELDS, BoundForward, Forward, SimilarityScorer
from cqjax.eval.windows import Windows, iter_batches, pad_batch


@dataclasses.dataclass(frozen=True)
class SimilarityResult:
    """Model vs reference on the same scored tokens.

    Attributes:
      kl: mean per-token KL(ref || model), nats.
      top1: fraction of scored positions where both models' argmax agree.
      perplexity: the model's perplexity on the windows.
      ref_perplexity: the reference's perplexity on the windows.
      nll, ref_nll: the mean negative log-likelihoods behind the two perplexities, nats.
      tokens: scored tokens.
      protocol: the windows' protocol dict, plus ``batch_size``.
      seconds: wall time of the loop (compiles included).
    """

    kl: float
    top1: float
    perplexity: float
    ref_perplexity: float
    nll: float
    ref_nll: float
    tokens: int
    protocol: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form."""
        return {"kl": self.kl, "top1": self.top1, "perplexity": self.perplexity,
                "ref_perplexity": self.ref_perplexity, "nll": self.nll, "ref_nll": self.ref_nll,
                "tokens": self.tokens,
                "seconds": round(self.seconds, 3), "protocol": self.protocol}


def similarity(forward: Forward | BoundForward | SimilarityScorer,
               ref_forward: Forward | BoundForward | None, windows: Windows, *,
               batch_size: int = 1, progress: bool = True) -> SimilarityResult:
    """Mean KL(ref || model), top-1 agreement and both perplexities in one pass.

    Args:
      forward: the model under test (or a :class:`SimilarityScorer`, then ``ref_forward`` is
        ignored and may be None).
      ref_forward: the reference (float) model.
      windows: from :func:`cqjax.eval.windows.prepare_windows`.
      batch_size: rows per step (fixed shape ``[batch_size, context]``).
      progress: progress line on stderr.
    """
    if isinstance(forward, SimilarityScorer):
        scorer = forward
    else:
        if ref_forward is None:
            raise ValueError("similarity needs ref_forward (or a SimilarityScorer as forward)")
        scorer = SimilarityScorer(forward, ref_forward)
    sums = dict.fromkeys(SIMILARITY_FIELDS, 0.0)
    prog = Progress("similarity", windows.num_scored, unit="tok", enabled=progress)
    batches = [pad_batch(windows.tokens[start:stop], windows.mask[start:stop], windows.score[start:stop], batch_size)
               for start, stop in iter_batches(windows.tokens.shape[0], batch_size)]
    for out in scorer.score_batches(batches, on_batch=lambda j: prog.update(int(batches[j][2].sum())),
                                    progress=progress):
        for k in SIMILARITY_FIELDS:
            sums[k] += float(out[k].sum())
    prog.close()
    n = windows.num_scored
    nll, ref_nll = -sums["logp_model"] / n, -sums["logp_ref"] / n
    return SimilarityResult(kl=sums["kl"] / n, top1=sums["top1"] / n, perplexity=math.exp(nll),
                            ref_perplexity=math.exp(ref_nll), nll=nll, ref_nll=ref_nll, tokens=n,
                            protocol={**windows.protocol, "batch_size": int(batch_size)},
                            seconds=prog.elapsed)
