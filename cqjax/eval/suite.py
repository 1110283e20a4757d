"""Evaluate one model on everything: perplexity, optional similarity to a reference, MC tasks.

Example:
  >>> cfg = EvalConfig(limit=200)                                             # doctest: +SKIP
  >>> data = prepare(tokenizer, cfg)           # tokenize once, reuse for several models
  >>> base = evaluate_model(float_fwd, data, model_id="smollm2-135m")   # cached baseline
  >>> quant = evaluate_model(q_fwd, data, reference=float_fwd)          # + "similarity"
  >>> quant["arc_easy"]["acc"], quant["similarity"]["kl"]
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from cqjax.eval import cache as _cache
from cqjax.eval.multiple_choice import DEFAULT_BUCKETS, MCTaskData, evaluate_task, prepare_task
from cqjax.eval.perplexity import perplexity
from cqjax.eval.scoring import BoundForward, Forward, LogLikelihoodScorer
from cqjax.eval.similarity import similarity
from cqjax.eval.windows import Windows, prepare_windows


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What to evaluate and how (usable as a Hydra structured config).

    Attributes:
      text: built-in perplexity text (``"wikipedia"`` or ``"wikipedia+squad"``).
      text_path: a text file instead of ``text``.
      context: perplexity window length in tokens, BOS included.
      stride: scored tokens per window; None = ``context - 1`` (non-overlapping with BOS).
      max_tokens: perplexity tokens to score; None = the whole text.
      batch_size: perplexity windows per forward call.
      similarity_batch_size: windows per step of the similarity pass (two models' logits
        live at once: keep it 1 for large vocabularies).
      tasks: multiple-choice tasks (names in ``cqjax.eval.multiple_choice.TASKS``).
      limit: documents per task (first in file order); None = all.
      buckets: padded lengths for multiple-choice rows.
      tokens_per_batch: rows per MC batch are ``max(1, tokens_per_batch // bucket)``.
      run_perplexity: evaluate perplexity (and similarity when a reference is given).
      progress: progress lines on stderr.
    """

    text: str = "wikipedia"
    text_path: str | None = None
    context: int = 512
    stride: int | None = None
    max_tokens: int | None = 65_536
    batch_size: int = 4
    similarity_batch_size: int = 1
    tasks: tuple[str, ...] = ("arc_easy", "piqa", "hellaswag")
    limit: int | None = 1000
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    tokens_per_batch: int = 2048
    run_perplexity: bool = True
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class EvalData:
    """Everything tokenized for one tokenizer and config; reusable across models."""

    config: EvalConfig
    windows: Windows | None
    tasks: dict[str, MCTaskData]


def prepare(tokenizer, config: EvalConfig = EvalConfig()) -> EvalData:
    """Tokenizes the perplexity text and the task requests (no model involved)."""
    windows = None
    if config.run_perplexity:
        windows = prepare_windows(tokenizer, source=config.text, path=config.text_path,
                                  context=config.context, stride=config.stride,
                                  max_tokens=config.max_tokens)
    tasks = {name: prepare_task(tokenizer, name, limit=config.limit, buckets=config.buckets,
                                tokens_per_batch=config.tokens_per_batch) for name in config.tasks}
    return EvalData(config=config, windows=windows, tasks=tasks)


def _log(msg: str, enabled: bool) -> None:
    if enabled:
        print(f"[cqjax.eval] {msg}", file=sys.stderr, flush=True)


def evaluate_model(forward: Forward | BoundForward, data: EvalData, *, model_id: str | None = None,
                   reference: Forward | BoundForward | None = None, use_cache: bool = True,
                   cache_directory: str | os.PathLike | None = None,
                   refresh: bool = False) -> dict[str, Any]:
    """Evaluates one model and returns a JSON-serializable dict.

    Args:
      forward: ``forward(tokens int32[B, T], mask bool[B, T]) -> logits [B, T, V]``.
      data: from :func:`prepare`.
      model_id: a stable name of this exact model (weights included). When given and
        ``use_cache``, perplexity and each task are cached under (model_id, protocol): use it
        for float baselines, not for freshly quantized models.
      reference: a reference (float) forward; adds ``"similarity"`` (KL, top-1, both
        perplexities on the perplexity windows) and takes ``"perplexity"`` from the same pass.
      use_cache: read/write the cache (only with ``model_id``).
      cache_directory: default ``$CQJAX_CACHE/eval``.
      refresh: recompute and overwrite cached entries.

    Returns:
      ``{"model_id", "perplexity": {"value", "nll", "tokens", "protocol", ...},
      "similarity": {"kl", "top1", "perplexity", "ref_perplexity", ...} (with a reference),
      "<task>": {"acc", "acc_per_char", "stderr", "stderr_per_char", "n", "protocol", ...}}``.
    """
    cfg = data.config
    scorer = LogLikelihoodScorer(forward)
    out: dict[str, Any] = {"model_id": model_id}

    def run(kind: str, protocol: dict[str, Any], compute):
        if model_id is None or not use_cache:
            return compute()
        key = {"model": model_id, "kind": kind, "protocol": protocol}
        hit = None if refresh else _cache.load(key, cache_directory)
        if hit is not None:
            _log(f"{kind}: cached result for {model_id}", cfg.progress)
            return hit
        return _cache.cached(key, compute, directory=cache_directory, refresh=True)

    if data.windows is not None:
        if reference is not None:
            sim = similarity(forward, reference, data.windows, batch_size=cfg.similarity_batch_size,
                             progress=cfg.progress)
            out["similarity"] = sim.to_dict()
            out["perplexity"] = {"value": sim.perplexity, "perplexity": sim.perplexity,
                                 "nll": sim.nll, "source": "similarity pass",
                                 "tokens": sim.tokens, "protocol": sim.protocol}
        else:
            out["perplexity"] = run("perplexity", data.windows.protocol, lambda: perplexity(
                scorer, data.windows, batch_size=cfg.batch_size, progress=cfg.progress).to_dict())
    for name, task in data.tasks.items():
        out[name] = run(f"mc_{name}", task.protocol,
                        lambda task=task: evaluate_task(scorer, task, progress=cfg.progress).to_dict())
    return out

