"""What ``mode=convert`` and ``mode=eval`` do differently for speech recognizers (family kind
``speech_to_text``, e.g. ``+model=whisper-tiny-en``): the word error rate of greedy
transcriptions of synthesized speech (:mod:`cqjax.eval.speech`) instead of perplexity and
tasks, and calibration (Hessians) on spoken sentences that the evaluation never reads."""

from __future__ import annotations

from typing import Any

from flax import nnx
from omegaconf import DictConfig

from cqjax.errors import ConfigError


def check_calibration(cfg: DictConfig, recipe) -> None:
    """A speech recognizer is calibrated on its own audio (:func:`calibrate`): Hessians and the
    Fisher of its transcripts, so ``calib.source`` does not apply and a recipe that needs
    calibration token rows (``cq-tune``) is refused."""
    if recipe is None or not recipe.needs.calibration:
        return
    if recipe.needs.rows:
        raise ConfigError("pipeline: a speech recognizer is calibrated with statistics of spoken sentences only, "
                          "so cq-tune (which tunes on token rows) does not run on it yet: use pipeline=cq-ef "
                          "(its default, with quant.bpw for a bit allocation), cq or rtn")


def enabled(cfg: DictConfig) -> bool:
    return cfg.eval.speech.sentences != 0


def prepare(cfg: DictConfig, tokenizer, directory, config):
    """``(sentences, audio)`` of ``eval.speech`` (None when the evaluation is off)."""
    from cqjax.cli.common import log
    from cqjax.eval.speech import clips

    if not enabled(cfg):
        return None
    return clips(cfg.eval.speech.sentences, log=log), tokenizer, cfg.eval.speech.batch


def evaluate(model: nnx.Module, data, *, reference: Any = None, progress: bool = True) -> tuple[dict[str, Any], list]:
    """``(results, transcriptions)``: ``{"wer": {"wer", "n", "protocol"}}`` of ``model`` on the
    clips of :func:`prepare`; ``reference`` (the float model's transcriptions) adds how many
    transcriptions changed."""
    from cqjax.eval.speech import MAX_NEW_TOKENS, transcribe, word_error_rate

    (texts, audio), tokenizer, batch = data
    hyps = transcribe(model, tokenizer, audio, batch=batch, progress=progress)
    out = {"wer": word_error_rate(texts, hyps), "n": len(texts),
           "protocol": {"source": "BoolQ Wikipedia sentences spoken by espeak-ng (en-us, 150 wpm), 16 kHz",
                        "decoding": f"greedy, no timestamps, at most {MAX_NEW_TOKENS} tokens",
                        "normalizer": "transformers EnglishTextNormalizer (no spelling map)",
                        "examples": [{"reference": r, "hypothesis": h} for r, h in list(zip(texts, hyps))[:3]]}}
    if reference is not None:
        out["changed"] = sum(a != b for a, b in zip(hyps, reference))
    return {"wer": out}, hyps


def quantized_model(qir, *, packed: bool) -> nnx.Module:
    """The quantized recognizer to evaluate: its packed runtime, or its weights decoded once."""
    from cqjax.cli.encoders import quantized_model as decoded_or_packed

    return decoded_or_packed(qir, packed=packed)


def calibrate(cfg: DictConfig, model, ir, tokenizer, needs):
    """:func:`cqjax.calib.calibrate.calibrate_speech` of the statistics ``needs`` on ``calib.rows``
    spoken sentences that no evaluation of ``eval.speech.sentences`` reads."""
    from cqjax.calib.calibrate import calibrate_speech
    from cqjax.cli.common import log

    log(f"calibrating ({', '.join(sorted(needs.statistics))}) on {cfg.calib.rows} sentences spoken by espeak-ng "
        "(not among the evaluation's)")
    calib = calibrate_speech(model, ir, tokenizer, cfg.calib.rows, needs=needs.statistics,
                             skip=max(200, cfg.eval.speech.sentences), log=log, progress=cfg.eval.progress)
    log(f"calibration: {calib.describe()}")
    return calib
