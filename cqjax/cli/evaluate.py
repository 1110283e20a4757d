"""``mode=eval``: evaluate ``artifact=DIR``, against its float model when it is known."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cqjax.cli import encoders
from cqjax.cli.common import (Timings, finish, fingerprint, float_forward, log, model_dir, quantized_forward,
                              report)
from cqjax.config import eval_config
from cqjax.errors import ConfigError


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluates ``cfg.artifact`` into ``out_dir``: against ``+model=...`` if given, else the
    float checkpoint the artifact records (if it still exists), else standalone."""
    from cqjax import api
    from cqjax import eval as ev
    from cqjax.io import artifact, hf

    t = Timings()
    path = Path(os.path.expanduser(cfg.artifact))
    with t("load artifact"):
        q = api.load(path, verify=cfg.verify)
    recipe = q.recipe or {}
    directory = None
    if cfg.model is not None:
        directory = model_dir(cfg.model)
    elif recipe.get("source") and Path(recipe["source"]).is_dir():
        directory = Path(recipe["source"])
    else:
        log("float model unknown or not found: evaluating the artifact standalone (no baseline, KL, top-1)")
    tok_dir = artifact.tokenizer_dir(path) or directory
    if tok_dir is None:
        raise ConfigError(f"artifact={str(path)!r} has no tokenizer/ and its float model is unknown: "
                          "add +model=<name> (or +model=hf model.path=DIR) to name the float model")
    tokenizer = api.load_tokenizer(tok_dir)
    task = encoders.task_of(q.ir.family)
    if task is not None:
        return _task(task, cfg, out_dir, t, q, path, directory, tokenizer, tok_dir)
    with t("tokenize eval data"):
        data = ev.prepare(tokenizer, eval_config(cfg.eval))
    base = ref = fir = None
    if directory is not None:
        with t("import float"):
            fir = hf.import_checkpoint(directory)
            ref = float_forward(fir, None, cfg.eval.streamed)
        name = cfg.model.name if cfg.model is not None else recipe.get("model", directory.name)
        with t("eval float"):
            base = ev.evaluate_model(ref, data, model_id=f"{name}@{fingerprint(directory)}")
    with t("eval quantized"):
        quant = ev.evaluate_model(quantized_forward(q.ir, packed=cfg.eval.packed, streamed=cfg.eval.streamed), data,
                                  reference=ref)
    return _finish(cfg, out_dir, t, q, path, directory, fir, base, quant)


def _finish(cfg, out_dir, t, q, path, directory, fir, base, quant) -> dict[str, Any]:
    from cqjax import quant_stats

    recipe = q.recipe or {}
    rows = quant_stats.tensors(q.ir, fir, progress=cfg.eval.progress)
    out = report(cfg, "eval", t, ir=q.ir, rows=rows, base=base, quant=quant, passes=q.report,
                 model=cfg.model.name if cfg.model is not None else recipe.get("model", path.name),
                 checkpoint=None if directory is None else str(directory), artifact=str(path),
                 pipeline_name=recipe.get("method"), pipeline=[p.get("name") for p in q.report] or None)
    if recipe.get("bits") is not None:
        out["config"]["quant"] = {k: recipe.get(k) for k in ("bits", "embed_bits", "block", "codebook", "seed")}
    return finish(out, cfg, out_dir)


def _task(task, cfg, out_dir, t, q, path, directory, tokenizer, tok_dir) -> dict[str, Any]:
    """``mode=eval`` of a sentence encoder's artifact (retrieval and, with its float model,
    cosine similarity to it; :mod:`cqjax.cli.encoders`) or a speech recognizer's (word error
    rate; :mod:`cqjax.cli.speech`)."""
    from cqjax.io import hf

    with t("tokenize eval data"):
        data = task.prepare(cfg, tokenizer, Path(tok_dir), q.ir.config)
    if data is None:
        key = "eval.encoder.pairs" if task is encoders else "eval.speech.sentences"
        raise ConfigError(f"{key}=0: mode=eval of a {q.ir.family} model has nothing to evaluate")
    base = reference = fir = None
    if directory is not None:
        with t("import float"):
            fir = hf.import_checkpoint(directory)
        with t("eval float"):
            base, reference = task.evaluate(hf.to_model(fir, dtype=None), data, progress=cfg.eval.progress)
    with t("eval quantized"):
        quant, _ = task.evaluate(task.quantized_model(q.ir, packed=cfg.eval.packed), data,
                                     reference=reference, progress=cfg.eval.progress)
    return _finish(cfg, out_dir, t, q, path, directory, fir, base, quant)
