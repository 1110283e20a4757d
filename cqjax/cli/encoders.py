"""What ``mode=convert`` and ``mode=eval`` do differently for sentence encoders (family kind
``encoder``, e.g. ``+model=minilm-l6``): retrieval accuracy and cosine similarity to the float
model (:mod:`cqjax.eval.embeddings`) instead of perplexity and tasks; calibration in memory
(the models are small), from a text disjoint from the SQuAD evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from omegaconf import DictConfig

from cqjax.errors import ConfigError


def task_of(family: str):
    """The module that evaluates a family that is not a causal language model: this one for
    sentence encoders, :mod:`cqjax.cli.speech` for speech recognizers; None for a causal LM."""
    import sys

    from cqjax.cli import speech
    from cqjax.models import registry

    return {"encoder": sys.modules[__name__], "speech_to_text": speech}.get(registry.FAMILIES[family].kind)


def family_of(directory: Path) -> str:
    """The family of the checkpoint in ``directory`` (from its config.json; no tensor is read)."""
    from cqjax.io import hf
    from cqjax.models import registry

    raw = hf.read_config(directory)
    return registry.for_model_type(raw["model_type"], str(directory / "config.json")).name


def check_calibration(cfg: DictConfig, recipe) -> None:
    """An encoder's calibration text must not be its evaluation text (SQuAD), and ``self`` (text
    sampled by a language model) does not exist for it."""
    if recipe is None or not recipe.needs.calibration:
        return
    if cfg.calib.source in ("self", "squad"):
        raise ConfigError(f"calib.source={cfg.calib.source!r}: a sentence encoder "
                          + ("samples no text" if cfg.calib.source == "self" else "is evaluated on SQuAD")
                          + "; use calib.source=wikipedia (BoolQ passages) or a text file")


def enabled(cfg: DictConfig) -> bool:
    return cfg.eval.encoder.pairs != 0


def max_length(cfg: DictConfig, directory: Path | None, config: Any) -> int:
    """``eval.encoder.max_length``, else the ``max_seq_length`` of the sentence-transformers
    config in ``directory`` (a checkpoint or an artifact's tokenizer/), else the model's position
    table."""
    if cfg.eval.encoder.max_length is not None:
        return int(cfg.eval.encoder.max_length)
    path = None if directory is None else directory / "sentence_bert_config.json"
    if path is not None and path.is_file():
        return int(json.loads(path.read_text())["max_seq_length"])
    return int(config.max_positions)


def prepare(cfg: DictConfig, tokenizer, directory: Path | None, config: Any):
    """The question/paragraph pairs of ``eval.encoder`` (None when the evaluation is off)."""
    from cqjax.eval.embeddings import prepare_retrieval

    if not enabled(cfg):
        return None
    return prepare_retrieval(tokenizer, n=cfg.eval.encoder.pairs, max_length=max_length(cfg, directory, config))


def evaluate(model: nnx.Module, data, *, reference: np.ndarray | None = None,
             progress: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """``(results, embeddings)``: :func:`cqjax.eval.embeddings.evaluate_encoder` of ``model``
    (weights passed to jit as arguments), its embeddings apart (the report holds no arrays)."""
    from cqjax.eval.embeddings import evaluate_encoder

    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, tokens, mask: nnx.merge(graphdef, st).sentence_embedding(tokens, mask))
    out = evaluate_encoder(lambda tokens, mask: run(state, tokens, mask), data, reference=reference, progress=progress)
    return out, out.pop("embeddings")


def quantized_model(qir, *, packed: bool) -> nnx.Module:
    """The quantized model to evaluate: its packed runtime, or its weights decoded once to
    float32 (see :func:`cqjax.cli.common.quantized_forward`)."""
    from cqjax import runtime
    from cqjax.io import hf

    return runtime.prepare(hf.to_model(qir)) if packed else runtime.dequantized_model(qir)
