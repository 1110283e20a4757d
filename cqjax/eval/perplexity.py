"""Perplexity of a model on fixed-shape windows (protocol in :mod:`cqjax.eval.windows`).

Example:
  >>> from cqjax.eval import prepare_windows, perplexity
  >>> win = prepare_windows(tokenizer)                       # doctest: +SKIP
  >>> res = perplexity(forward, win, batch_size=1)           # doctest: +SKIP
  >>> res.perplexity, res.protocol["scored_tokens"]          # doctest: +SKIP
  (19.8, 65536)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from cqjax.progress import Progress
from cqjax.eval.scoring import BoundForward, Forward, LogLikelihoodScorer, as_scorer
from cqjax.eval.windows import Windows, iter_batches, pad_batch


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one model on one protocol.

    Attributes:
      perplexity: ``exp(nll)``.
      nll: mean negative log-likelihood per scored token, nats.
      tokens: scored tokens.
      protocol: the windows' protocol dict, plus ``batch_size``.
      seconds: wall time of the scoring loop (compiles included).
    """

    perplexity: float
    nll: float
    tokens: int
    protocol: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form: ``{"value", "perplexity", "nll", "tokens", "tokens_per_s", ...}``."""
        return {"value": self.perplexity, "perplexity": self.perplexity, "nll": self.nll,
                "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 1),
                "protocol": self.protocol}


def perplexity(forward: Forward | BoundForward | LogLikelihoodScorer, windows: Windows, *,
               batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Scores every window and returns the perplexity.

    Every batch has the fixed shape ``[batch_size, context]`` (the last one is padded with
    dummy rows), so the forward compiles once.

    Args:
      forward: the model forward, or a :class:`LogLikelihoodScorer` to reuse its compilations.
      windows: from :func:`cqjax.eval.windows.prepare_windows`.
      batch_size: rows per forward call.
      progress: print a progress line on stderr every ~10 s and at the end.
    """
    scorer = as_scorer(forward)
    n = windows.tokens.shape[0]
    prog = Progress("perplexity", windows.num_scored, unit="tok", enabled=progress)
    batches = [pad_batch(windows.tokens[start:stop], windows.mask[start:stop], windows.score[start:stop], batch_size)
               for start, stop in iter_batches(n, batch_size)]
    sums = scorer.score_batches(batches, on_batch=lambda j: prog.update(int(batches[j][2].sum())), progress=progress)
    total = sum(float(x.sum()) for x in sums)
    prog.close()
    count = windows.num_scored
    nll = -total / count
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=count,
                            protocol={**windows.protocol, "batch_size": int(batch_size)},
                            seconds=prog.elapsed)

