"""One call from a float model to the :class:`Calibration` a pipeline's passes need.

A pass declares the statistics it reads from ``ctx.calibration`` in its
:class:`cqjax.pipeline.Needs`: ``"hessian"`` (input second moments of every linear, from
:func:`cqjax.calib.stats.collect`) and ``"fisher"`` (the diagonal Fisher of every eligible
tensor, from :func:`cqjax.calib.fisher.fisher_diag`; a sentence encoder's of its embedding,
a speech recognizer's of its transcripts). :func:`calibrate` draws the token rows
once (:func:`cqjax.calib.sequences.calibration_tokens`), keeps them (``Calibration.rows``, for
passes that need the rows themselves) and gathers only what is asked for, timing each step.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from cqjax.calib.fisher import embedding_loss, fisher_diag, next_token_loss, transcript_loss
from cqjax.calib.sequences import calibration_tokens
from cqjax.calib.stats import Calibration, collect
from cqjax.ir import IR

STATS = ("hessian", "fisher")


def calibrate(model, ir: IR, tokenizer, needs: Iterable[str], *, source: str = "self", rows: int = 16,
              length: int = 512, seed: int = 0, progress: bool = True) -> Calibration:
    """Calibration statistics ``needs`` (a subset of :data:`STATS`) of the float ``model``.

    Args:
      model: the float Flax model built from ``ir``.
      ir: its IR (roles and eligibility).
      tokenizer: the model's tokenizer (BOS for self-generated rows, text sources).
      needs: statistics to gather.
      source: ``"self"``, ``"squad"`` or a text file (:mod:`cqjax.calib.sequences`).
      rows, length: calibration rows and tokens per row.
      seed: sampling seed of self-generated rows.
      progress: progress lines on stderr.

    Returns:
      A :class:`Calibration` whose ``timing`` holds the seconds of each step.

    Raises:
      ValueError: an unknown statistic or source.
    """
    needs = _checked(needs)
    start = time.perf_counter()
    timing: dict[str, float] = {}
    t = time.perf_counter()
    tokens = calibration_tokens(source, tokenizer=tokenizer, model=model, n=rows, length=length, seed=seed,
                                progress=progress)
    timing["tokens_s"] = time.perf_counter() - t
    stats: dict[str, dict] = {}
    if "hessian" in needs:
        t = time.perf_counter()
        stats = {p: dict(v) for p, v in collect(model, ir, tokens, source=source, progress=progress).items()}
        timing["hessian_s"] = time.perf_counter() - t
    if "fisher" in needs:
        t = time.perf_counter()
        if hasattr(model, "sentence_embedding"):  # a sentence encoder: no next token to predict
            directions = np.random.default_rng(seed).standard_normal((len(tokens), ir.config.hidden_size))
            _add_fisher(stats, model, ir, (tokens, directions.astype(np.float32)), embedding_loss, progress)
        else:
            _add_fisher(stats, model, ir, tokens, next_token_loss, progress)
        timing["fisher_s"] = time.perf_counter() - t
    return Calibration(stats, source=source, tokens=int(tokens.size), seconds=time.perf_counter() - start,
                       timing=timing, rows=tokens)


def calibrate_speech(model, ir: IR, tokenizer, rows: int, *, needs: Iterable[str] = ("hessian",), skip: int = 200,
                     log=None, progress: bool = True) -> Calibration:
    """Calibration statistics ``needs`` of a speech recognizer on ``rows`` BoolQ sentences
    spoken by espeak-ng, after the first ``skip`` (the evaluation's), each teacher-forced with its
    own text: Hessians of its kernels' inputs (:func:`cqjax.calib.stats.collect_speech`) and the
    diagonal Fisher of its eligible tensors (:func:`fisher_diag` of
    :func:`cqjax.calib.fisher.transcript_loss`)."""
    from cqjax.calib.stats import collect_speech
    from cqjax.eval.speech import calibration_sentences, clips, log_mel, teacher_tokens

    needs = _checked(needs)
    start = time.perf_counter()
    texts, audio = clips(calibration_sentences(rows, skip=skip), log=log)
    features = np.stack([log_mel(a, ir.config.num_mel_bins) for a in audio])
    tokens, mask = teacher_tokens(tokenizer, ir.config, texts)
    timing = {"audio_s": time.perf_counter() - start}
    source, stats = "espeak-ng BoolQ sentences", {}
    if "hessian" in needs:
        t = time.perf_counter()
        stats = {p: dict(v) for p, v in collect_speech(model, ir, features, tokens, mask, source=source,
                                                       progress=progress).items()}
        timing["hessian_s"] = time.perf_counter() - t
    if "fisher" in needs:
        t = time.perf_counter()
        _add_fisher(stats, model, ir, (features, tokens, mask), transcript_loss, progress)
        timing["fisher_s"] = time.perf_counter() - t
    return Calibration(stats, source=source, tokens=int(mask.sum()), seconds=time.perf_counter() - start,
                       rows=tokens, timing=timing)


def _checked(needs: Iterable[str]) -> set[str]:
    """``needs`` as a set; an unknown statistic is a ValueError naming the allowed ones."""
    needs = set(needs)
    if needs - set(STATS):
        raise ValueError(f"calibration statistics {sorted(needs - set(STATS))}: allowed {STATS}")
    return needs


def _add_fisher(stats: dict[str, dict], model, ir: IR, rows, loss, progress: bool) -> None:
    """Adds ``"fisher"`` (:func:`fisher_diag` of ``loss`` over ``rows``) to ``stats`` for every
    eligible tensor of ``ir``."""
    from cqjax.quant_stats import is_eligible

    paths = [p for p, m in ir.meta.items() if is_eligible(p, m)]
    for p, f in fisher_diag(model, rows, paths, loss=loss, progress=progress).items():
        stats.setdefault(p, {})["fisher"] = f
