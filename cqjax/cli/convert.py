"""``mode=convert``: import, quantize, evaluate float and quantized, write artifact and report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cqjax.cli import encoders
from cqjax.cli.common import (Timings, choice, finish, fingerprint, float_forward, log, model_dir,
                              quantized_forward, report)
from cqjax.config import eval_config


def run(cfg: DictConfig, out_dir: Path, recipe) -> dict[str, Any]:
    """Converts ``cfg.model`` with ``recipe`` (:func:`cqjax.recipes.build` of ``cfg``; None: the
    float model only) into ``out_dir``.

    Order: import (lazy), the ``quant`` rules checked against the model (an override matching
    nothing fails here, before any work), evaluation data, the float baseline, calibration if
    the recipe needs it, the passes, tensor errors, the artifact, the quantized evaluation.
    A data-free recipe (:func:`cqjax.stream.leafwise_steps`) instead streams: passes, tensor
    errors and the artifact tensor by tensor (resumable with ``resume=true``), then both
    evaluations. A recipe whose passes read only each tensor's Hessian
    (:func:`cqjax.stream_calibrated.plan`, e.g. ``cq-ef``; with ``quant.bpw`` the allocator's
    statistics are taken block by block first; ``cq-tune``'s tuning runs block by block too)
    draws its calibration rows and then converts block by block (``calib.carry``; resumable too). With ``eval.streamed``
    (default) both models are evaluated block by block (:class:`cqjax.eval.streamed.StreamedLM`),
    reading the float weights from the checkpoint.
    """
    from cqjax import eval as ev
    from cqjax import pipeline as pl
    from cqjax import quant_stats, recipes, stream, stream_calibrated
    from cqjax.api import load_tokenizer
    from cqjax.io import artifact, hf
    from cqjax.memory import trim_heap

    t = Timings()
    directory = model_dir(cfg.model)
    task = encoders.task_of(encoders.family_of(directory))  # None: a causal LM
    encoder = task is not None
    if encoder:
        task.check_calibration(cfg, recipe)
    streamed = recipe is not None and not recipe.needs and stream.leafwise_steps(recipe) is not None
    blockwise = (recipe is not None and not streamed and recipe.needs.calibration and cfg.calib.carry != "whole"
                 and not encoder and stream_calibrated.plan(recipe) is not None)
    with t("import"):
        log(f"importing {directory}")
        ir = hf.import_checkpoint(directory)
        skipped = recipes.check_rules(cfg, ir) if recipe is not None else []
        if recipe is not None:
            recipes.check_budget(recipe, ir)
            if not (streamed or blockwise):  # these check each tensor as they read it
                hf.check_finite(ir)
        model = None if streamed or blockwise else hf.to_model(ir)
        tokenizer = load_tokenizer(directory)
    evaluate = task.enabled(cfg) if encoder else bool(cfg.eval.perplexity.enabled or cfg.eval.tasks)
    if evaluate:
        check_eval_memory(ir, float_dtype=None if streamed or blockwise else "float32", quantized=recipe is not None,
                          packed=cfg.eval.packed, streamed=cfg.eval.streamed and not encoder)
    for s in skipped:
        log(f"rule {s['rule']} -> {s['bits']} bits ({s['from']}) matches no tensor of this model: skipped")
    if cfg.resume and recipe is not None and not (streamed or blockwise):
        log(f"resume=true: pipeline {choice('pipeline') or 'custom'} needs the whole float model, so it runs in "
            "memory and starts from the beginning (data-free and block-by-block recipes resume)")
    with t("tokenize eval data"):
        data = (task.prepare(cfg, tokenizer, directory, ir.config) if encoder
                else ev.prepare(tokenizer, eval_config(cfg.eval)))
    trim_heap()
    qir, passes, quant, rows, calib = ir, [], None, [], None
    extra = None if recipe is None else {"recipe": {
        "method": choice("pipeline") or "custom", "model": cfg.model.name, "source": str(directory),
        **OmegaConf.to_container(cfg.quant, resolve=True), "calibration": None}}
    if streamed:
        # Tensor by tensor from the memory-mapped checkpoint into the artifact: the float model is
        # built only afterwards, in the checkpoint's dtype, as the evaluation's reference.
        with t("quantize"):
            log(f"quantizing tensor by tensor: {', '.join(name for name, _ in recipe.steps)}")
            ctx = pl.Context(rng_seed=cfg.seed, log=log, progress=cfg.eval.progress)
            passes, rows = stream.convert(recipe, ir, out_dir / "artifact", ctx=ctx, extra=extra,
                                          tokenizer_from=directory, resume=cfg.resume,
                                          key=fingerprint(directory), progress=cfg.eval.progress)
            qir = artifact.load(out_dir / "artifact", verify=False)
            log(f"saved {out_dir / 'artifact'}")
        trim_heap()
    if blockwise:
        with t("calibrate"):
            calib = _calibration_rows(cfg, ir, tokenizer, recipe.needs)
        trim_heap()
        with t("quantize"):
            log(f"quantizing block by block (calibration carried through the {cfg.calib.carry} prefix): "
                f"{', '.join(name for name, _ in recipe.steps)}")
            extra["recipe"]["calibration"] = calib.describe()
            ctx = pl.Context(rng_seed=cfg.seed, log=log, progress=cfg.eval.progress)
            passes, rows = stream_calibrated.convert(
                recipe, ir, out_dir / "artifact", tokens=calib.rows, ctx=ctx, extra=extra, tokenizer_from=directory,
                resume=cfg.resume, key=fingerprint(directory), progress=cfg.eval.progress, carry=cfg.calib.carry)
            qir = artifact.load(out_dir / "artifact", verify=False)
            log(f"saved {out_dir / 'artifact'}")
        calib = calib.with_tensors([p for p, m in qir.meta.items() if m.info.get("error_feedback") not in (None, "none")])
        trim_heap()
    base = reference = None
    if evaluate and encoder:
        with t("eval float"):
            base, reference = task.evaluate(model if model is not None else hf.to_model(ir, dtype=None), data,
                                                progress=cfg.eval.progress)
    elif evaluate:
        reference = float_forward(ir, model, cfg.eval.streamed)
        with t("eval float"):
            base = ev.evaluate_model(reference, data, model_id=f"{cfg.model.name}@{fingerprint(directory)}")
    if recipe is not None and not (streamed or blockwise):
        if recipe.needs.calibration:
            with t("calibrate"):
                calib = getattr(task, "calibrate", _calibrate)(cfg, model, ir, tokenizer, recipe.needs)
        with t("quantize"):
            log(f"quantizing: {', '.join(name for name, _ in recipe.steps)}")
            ctx = pl.Context(rng_seed=cfg.seed, calibration=calib or {}, rows=None if calib is None else calib.rows,
                             log=log, progress=cfg.eval.progress)
            qir, passes = pl.run(recipe, ir, ctx)
        with t("tensor errors"):
            rows = quant_stats.tensors(qir, ir, progress=cfg.eval.progress)
        with t("save artifact"):
            extra["recipe"]["calibration"] = None if calib is None else calib.describe()
            artifact.save(qir, out_dir / "artifact", tokenizer_from=directory, extra={**extra, "passes": passes})
            log(f"saved {out_dir / 'artifact'}")
        if cfg.eval.streamed:
            model = None  # the streamed evaluation reads the float weights block by block
    if recipe is not None and evaluate and encoder:
        with t("eval quantized"):
            quant, _ = task.evaluate(task.quantized_model(qir, packed=cfg.eval.packed), data,
                                         reference=reference, progress=cfg.eval.progress)
    elif recipe is not None and evaluate:
        with t("eval quantized"):
            quant = ev.evaluate_model(quantized_forward(qir, packed=cfg.eval.packed, streamed=cfg.eval.streamed),
                                      data, reference=reference)
    out = report(cfg, "convert", t, ir=qir, rows=rows, base=base, quant=quant, passes=passes,
                 model=cfg.model.name, checkpoint=str(directory),
                 artifact=str(out_dir / "artifact") if recipe is not None else None,
                 pipeline_name=choice("pipeline") if recipe is not None else None,
                 pipeline=None if recipe is None else [name for name, _ in recipe.steps],
                 allocation=None if recipe is None else recipes.allocation_report(recipe),
                 skipped_rules=skipped,
                 calibration=None if calib is None else {**calib.describe(), "rows": len(calib.rows),
                                                         "length": cfg.calib.length})
    return finish(out, cfg, out_dir)


def _calibrate(cfg: DictConfig, model, ir, tokenizer, needs):
    """The calibration the recipe reads (statistics and rows), from ``cfg.calib`` rows."""
    from cqjax.calib import calibrate

    c = cfg.calib
    rows = max(c.rows, needs.rows)
    what = sorted(needs.statistics) + (["rows"] if needs.rows else [])
    log(f"calibrating ({', '.join(what)}) on {rows} x {c.length} tokens from {c.source!r}")
    calib = calibrate(model, ir, tokenizer, needs.statistics, source=os.path.expanduser(c.source) if c.source not in
                      ("self", "squad") else c.source, rows=rows, length=c.length, seed=c.seed,
                      progress=cfg.eval.progress)
    log(f"calibration: {calib.describe()}")
    return calib


def _calibration_rows(cfg: DictConfig, ir, tokenizer, needs):
    """The calibration rows of ``cfg.calib`` (statistics come later, block by block): a
    :class:`cqjax.calib.stats.Calibration` without statistics. Self-generated rows need the
    float model, built in its stored dtype for them alone (bf16 weights sample as bf16
    inference does: :func:`cqjax.calib.sequences.half_precision_dots`) and dropped."""
    import time

    from cqjax.calib import calibration_tokens
    from cqjax.calib.sequences import half_precision_dots
    from cqjax.calib.stats import Calibration
    from cqjax.io import hf

    c = cfg.calib
    rows = max(c.rows, needs.rows)
    source = os.path.expanduser(c.source) if c.source not in ("self", "squad") else c.source
    log(f"calibration rows: {rows} x {c.length} tokens from {c.source!r}")
    start = time.perf_counter()
    model = half_precision_dots(hf.to_model(ir, dtype=None)) if source == "self" else None
    # an 8-bit KV cache where the attention reads one: a quarter of the float32 cache's memory
    kv_bits = 8 if model is not None and all(getattr(layer.self_attn, "rotated_cache", False)
                                              for layer in model.layers) else None
    tokens = calibration_tokens(source, tokenizer=tokenizer, model=model, n=rows, length=c.length, seed=c.seed,
                                progress=cfg.eval.progress, kv_bits=kv_bits)
    seconds = time.perf_counter() - start
    return Calibration({}, source=c.source, tokens=int(tokens.size), seconds=seconds, timing={"tokens_s": seconds},
                       rows=tokens)


def check_eval_memory(ir, *, float_dtype: str | None, quantized: bool, packed: bool, streamed: bool = False) -> None:
    """Fails before any work when evaluating cannot fit in this machine's available memory.

    Evaluation holds the float model (``float_dtype``; None: each tensor's own dtype) and, for a
    quantized model, its dequantized float32 copy (``packed``: its stored codes, ~1 byte per
    weight at most); ``streamed``, only what is outside the blocks and the largest block of each.
    Activations come on top, so this is a lower bound.
    """
    import numpy as np

    from cqjax.errors import ConfigError

    def held(paths):
        size = lambda p: int(np.prod(ir.meta[p].shape))  # noqa: E731
        return (sum(size(p) * np.dtype(float_dtype or ir.meta[p].dtype).itemsize for p in paths),
                0 if not quantized else sum(size(p) for p in paths) * (1 if packed else 4))

    params = ir.num_params()
    if streamed:
        blocks: dict[str, list[str]] = {}
        for p in ir.meta:
            parts = p.split("/")
            blocks.setdefault("/".join(parts[:2]) if parts[0] == "layers" else "", []).append(p)
        rest = held(blocks.pop("", []))
        largest = max((held(paths) for paths in blocks.values()), key=sum, default=(0, 0))
        float_bytes, quant_bytes = rest[0] + largest[0], rest[1] + largest[1]
    else:
        float_bytes, quant_bytes = held(list(ir.meta))
    available = _available_memory()
    if available is not None and float_bytes + quant_bytes > available:
        what = "outside the blocks and the largest block of " if streamed else ""
        raise ConfigError(
            f"evaluating this {params / 1e9:.2f}B-parameter model needs at least "
            f"{(float_bytes + quant_bytes) / 1e9:.1f} GB ({what}the float model {float_bytes / 1e9:.1f} GB"
            + (f", the quantized one {'packed' if packed else 'dequantized to float32'} {quant_bytes / 1e9:.1f} GB"
               if quantized else "")
            + f"), and this machine has {available / 1e9:.1f} GB available: convert without evaluation "
            "(eval=none; a data-free pipeline such as pipeline=cq streams tensor by tensor) and evaluate "
            "the artifact where it fits (mode=eval artifact=DIR)")


def _available_memory() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
