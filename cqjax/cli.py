"""What ``python -m cqjax`` does with its composed Hydra config (schema: :mod:`cqjax.config`).

=========================  ==========================================================================
mode                       does
=========================  ==========================================================================
``convert`` (default)      imports ``model``, quantizes it with ``pipeline`` (bit widths from
                           ``quant``), evaluates the float baseline (cached by model + protocol) and
                           the quantized model against it, writes ``artifact/``, ``report.json``,
                           ``report.md`` and PNG plots; ``~pipeline``: the float model only
``eval``                   evaluates ``artifact=DIR``, against its float model when the artifact
                           records one (or ``+model=...`` names it), else standalone
``generate``               continues ``prompt="..."`` with ``artifact=DIR`` (KV cache; greedy, or
                           sampled with ``generate.temperature``)
=========================  ==========================================================================

Every config value is checked (:func:`cqjax.config.validate`) and the pipeline is instantiated
before any model is read, so a bad key or value fails in a second. report.json follows the
schema in :mod:`cqjax.report`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cqjax.config import Mode, eval_config, validate, validate_inputs
from cqjax.errors import CheckpointError, ConfigError
from cqjax.io.atomic import write_json, write_text

MODES = tuple(m.name for m in Mode)


def log(msg: str) -> None:
    print(f"[cqjax] {msg}", file=sys.stderr, flush=True)


class Timings(dict):
    """``{step: seconds}`` of the run's steps, in order; ``with t("eval float"): ...``."""

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[step] = self.get(step, 0.0) + time.perf_counter() - start
            log(f"{step}: {self[step]:.1f} s")


def model_dir(model_cfg: DictConfig) -> Path:
    """The local checkpoint directory of a ``model`` config: path, packaged model or hub id.

    Raises:
      ConfigError: the hub id cannot be reached (says how to set ``model.path``), or nothing is set.
      CheckpointError: ``model.path`` does not exist.
    """
    from cqjax import data
    from cqjax.io import hf

    name = model_cfg.get("name")
    if model_cfg.get("path"):
        return hf.resolve(os.path.expanduser(model_cfg.path))
    if model_cfg.get("packaged"):
        return data.model_dir(model_cfg.packaged)
    if model_cfg.get("source"):
        try:
            return hf.resolve(model_cfg.source)
        except CheckpointError as e:
            cause = e.__cause__ or e
            raise ConfigError(
                f"model {name!r}: {model_cfg.source!r} is a Hugging Face hub id and is not available offline "
                f"(no local copy, and the hub could not be reached: {type(cause).__name__}). Download the "
                f"checkpoint where there is network access and point model.path at the directory (config.json "
                f"+ *.safetensors + tokenizer files): python -m cqjax +model={name} model.path=/path/to/checkpoint"
            ) from e
    raise ConfigError(f"model {name!r}: set model.path=DIR (a local checkpoint directory)")


def fingerprint(directory: Path) -> str:
    """The float model's cache identity (shared with ``benchmarks/quality.py``)."""
    from cqjax.io.hf import checkpoint_fingerprint

    return checkpoint_fingerprint(directory)


class _TensorProgress:
    """Runs a leaf-wise :class:`cqjax.pipeline.Pass` tensor by tensor with a progress line."""

    def __init__(self, inner: Any, label: str):
        self.inner, self.label = inner, label
        self.unwrapped = inner  # for steps that rerun it (cqjax.passes.awq.compose): no progress lines
        self.name, self.may_change = inner.name, inner.may_change

    def selected(self, ir):
        return self.inner.selected(ir)

    def __call__(self, ir, ctx=None):
        from cqjax.eval.progress import Progress
        from cqjax.pipeline import Context

        ctx = Context() if ctx is None else ctx
        paths = self.inner.selected(ir)
        bar = Progress(f"pass {self.label}", total=len(paths), unit="tensors", every_s=5.0, tag="cqjax")
        params, meta = {}, {}
        for path in paths:
            params[path], meta[path] = self.inner.rewrite(path, ir.params[path], ir.meta[path], ctx)
            bar.update(1)
        bar.close()
        return ir.replace(params=params, meta=meta)


def _instantiate_error(name: str, pcfg: DictConfig, e: Exception) -> ConfigError:
    cause = e
    while cause.__cause__ is not None and type(cause).__name__ == "InstantiationException":
        cause = cause.__cause__
    msg = str(cause)
    if isinstance(cause, TypeError) and "unexpected keyword" in msg:
        import dataclasses

        from hydra.utils import get_class

        try:
            fields = [f.name for f in dataclasses.fields(get_class(pcfg._target_))]
            msg += f"; allowed keys of pipeline.{name}: {fields}"
        except Exception:  # noqa: BLE001 - the original message is still useful
            pass
    return ConfigError(f"pipeline.{name} ({pcfg.get('_target_')}): {msg}")


def _allocator(cfg: DictConfig, steps: list, overrides: dict | None):
    """The ``allocate`` step of ``quant.bpw``: measured with the pipeline's own grid (RTN when
    a round-to-nearest pass quantizes, else CQ); ``overrides`` and ``embed_bits`` stay fixed."""
    from cqjax.passes.allocate import AllocateBits
    from cqjax.passes.common import EMBED_ROLES
    from cqjax.passes.gptq import GPTQRoundToNearest
    from cqjax.passes.rtn import RoundToNearest

    q = cfg.quant
    fixed = dict(overrides or {})
    if q.embed_bits is not None:
        fixed.update({f"role:{r}": q.embed_bits for r in EMBED_ROLES if f"role:{r}" not in fixed})
    def leaves(p):
        p = getattr(p, "inner", p)
        sub = getattr(p, "steps", None) or ([("", p.recipe)] if getattr(p, "recipe", None) is not None else [])
        return [p] + [x for _, q in sub for x in leaves(q)]

    inner = [x for _, p in steps for x in leaves(p)]
    method = "rtn" if any(isinstance(p, (RoundToNearest, GPTQRoundToNearest)) for p in inner) else "cq"
    return AllocateBits(bpw=float(q.bpw), choices=tuple(q.choices), proxy=q.proxy, fixed=fixed or None,
                        method=method, block=q.block, seed=q.seed)


def build_pipeline(cfg: DictConfig, progress: bool = True):
    """The named chain of ``cfg.pipeline``; passes with ``bits: null`` get the ``quant`` rules,
    and ``quant.bpw`` puts the bit allocator (``allocate``) first."""
    from hydra.utils import instantiate

    from cqjax.passes.awq import compose
    from cqjax.passes.common import bits_rules
    from cqjax.pipeline import Pass, named_chain

    q = cfg.quant
    overrides = OmegaConf.to_container(q.overrides, resolve=True) if q.get("overrides") else None
    rules = bits_rules(q.bits, q.embed_bits, overrides)
    steps = []
    for name, pcfg in cfg.pipeline.items():
        if pcfg is None:
            continue
        extra = {"bits": rules} if "bits" in pcfg and pcfg.bits is None else {}
        try:
            p = instantiate(pcfg, _partial_=True)(**extra)
        except Exception as e:  # noqa: BLE001 - hydra wraps the real error; name the pass
            raise _instantiate_error(name, pcfg, e) from e
        if progress and isinstance(p, Pass) and type(p).__call__ is Pass.__call__:
            p = _TensorProgress(p, name)
        steps.append((name, p))
    try:
        steps = list(compose(steps).steps)  # an `awq` step wraps the quantizing steps
    except ValueError as e:
        raise ConfigError(f"pipeline: {e}") from e
    if q.get("bpw") is not None:  # first, on the float IR (never inside a wrapping step)
        try:
            steps.insert(0, ("allocate", _allocator(cfg, steps, overrides)))
        except ValueError as e:
            raise ConfigError(f"quant.bpw={q.bpw}: {e}") from e
    return named_chain(*steps)


def _choice(group: str) -> str | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _tensor_rows(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in ("path", "role", "bits", "rel_error", "bytes", "bits_per_weight")} for r in rows]


def finish(report: dict[str, Any], cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Adds plots, checks the schema, writes report.json and report.md, prints the markdown."""
    from cqjax.report import check_schema, markdown
    from cqjax.report.plots import report_plots

    report["plots"] = report_plots(report, out_dir) if cfg.report.plots else []
    check_schema(report)
    write_json(out_dir / "report.json", report)
    md = markdown(report)
    write_text(out_dir / "report.md", md)
    print(md)
    log(f"wrote {out_dir / 'report.json'}, report.md" + "".join(f", {p}" for p in report["plots"]))
    return report


def _base_report(cfg: DictConfig, mode: str) -> dict[str, Any]:
    return {"model": None, "mode": mode, "pipeline_name": None, "pipeline": None,
            "overrides": _overrides(), "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)}


def convert(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """``mode=convert``: import, quantize, evaluate float and quantized, write artifact and report."""
    from cqjax import eval as ev
    from cqjax import pipeline as pl
    from cqjax import quant_stats
    from cqjax.api import load_tokenizer
    from cqjax.eval.scoring import from_nnx
    from cqjax.io import artifact, hf
    from cqjax.report import evals_table

    start, t = time.perf_counter(), Timings()
    recipe = build_pipeline(cfg, progress=cfg.eval.progress) if cfg.pipeline else None
    directory = model_dir(cfg.model)
    with t("import"):
        log(f"importing {directory}")
        ir = hf.import_checkpoint(directory)
        model = hf.to_model(ir)
        tokenizer = load_tokenizer(directory)
    ecfg = eval_config(cfg.eval)
    with t("tokenize eval data"):
        data = ev.prepare(tokenizer, ecfg)
    with t("eval float"):
        base = ev.evaluate_model(from_nnx(model), data, model_id=f"{cfg.model.name}@{fingerprint(directory)}")
    qir, passes, quant, rows, calib = ir, [], None, [], None
    if recipe is not None:
        if recipe.needs:
            with t("calibrate"):
                calib = _calibrate(cfg, model, ir, tokenizer, recipe.needs)
        with t("quantize"):
            log(f"quantizing: {', '.join(name for name, _ in recipe.steps)}")
            qir, passes = pl.run(recipe, ir, pl.Context(rng_seed=cfg.seed, calibration=calib or {}, log=log))
        with t("tensor errors"):
            rows = quant_stats.tensors(qir, ir, progress=cfg.eval.progress)
        with t("save artifact"):
            extra = {"recipe": {"method": _choice("pipeline") or "custom", "model": cfg.model.name,
                                "source": str(directory), **OmegaConf.to_container(cfg.quant, resolve=True),
                                "calibration": None if calib is None else calib.describe()},
                     "passes": passes}
            artifact.save(qir, out_dir / "artifact", tokenizer_from=directory, extra=extra)
            log(f"saved {out_dir / 'artifact'}")
        with t("eval quantized"):
            quant = ev.evaluate_model(from_nnx(_eval_model(qir, cfg.eval.packed)), data, reference=from_nnx(model))
    stored = quant_stats.storage(qir, quant_stats.tensors(qir) if not rows else rows)
    report = _base_report(cfg, "convert")
    report.update({
        "model": cfg.model.name, "family": ir.family, "checkpoint": str(directory),
        "artifact": str(out_dir / "artifact") if recipe is not None else None,
        "pipeline_name": _choice("pipeline") if recipe is not None else None,
        "pipeline": None if recipe is None else [name for name, _ in recipe.steps],
        "parameters": ir.num_params(),
        "bits_per_weight": stored["bits_per_weight"] if recipe else {"quantized_tensors": None, "model": None},
        "bytes": {"float": stored["bytes"]["float"], "quantized": stored["bytes"]["quantized"] if recipe else None},
        "evals": evals_table(base, quant),
        "tensors": _tensor_rows(rows),
        "passes": [{"name": p["name"], "seconds": p["seconds"]} for p in passes],
        "quantized_runtime": None if recipe is None else _runtime(cfg),
        "calibration": None if calib is None else {**calib.describe(), "rows": cfg.calib.rows,
                                                   "length": cfg.calib.length},
        "timings": dict(t), "seconds": time.perf_counter() - start,
    })
    return finish(report, cfg, out_dir)


def _calibrate(cfg: DictConfig, model, ir, tokenizer, needs):
    """The statistics the pipeline's passes read, from ``cfg.calib`` rows (see :mod:`cqjax.calib`)."""
    from cqjax.calib import calibrate

    c = cfg.calib
    log(f"calibrating ({', '.join(sorted(needs))}) on {c.rows} x {c.length} tokens from {c.source!r}")
    calib = calibrate(model, ir, tokenizer, needs, source=os.path.expanduser(c.source) if c.source not in
                      ("self", "squad") else c.source, rows=c.rows, length=c.length, seed=c.seed,
                      progress=cfg.eval.progress)
    log(f"calibration: {calib.describe()}")
    return calib


def _eval_model(qir, packed: bool):
    """The model to evaluate: the packed runtime, or (default) :func:`cqjax.runtime.dequantized_model`
    (the same function up to float rounding, several times faster on CPU)."""
    from cqjax import runtime
    from cqjax.io import hf

    return hf.to_model(qir) if packed else runtime.dequantized_model(qir)


def _runtime(cfg: DictConfig) -> str:
    return "packed" if cfg.eval.packed else "dequantized to float32"


def evaluate_artifact(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """``mode=eval``: evaluate ``cfg.artifact`` (vs its float model when known)."""
    from cqjax import api, quant_stats
    from cqjax import eval as ev
    from cqjax.eval.scoring import from_nnx
    from cqjax.io import artifact, hf
    from cqjax.report import evals_table

    start, t = time.perf_counter(), Timings()
    path = Path(os.path.expanduser(cfg.artifact))
    with t("load artifact"):
        q = api.load(path)
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
    with t("tokenize eval data"):
        data = ev.prepare(tokenizer, eval_config(cfg.eval))
    base = ref = fir = None
    if directory is not None:
        with t("import float"):
            fir = hf.import_checkpoint(directory)
            ref = from_nnx(hf.to_model(fir))
        name = cfg.model.name if cfg.model is not None else recipe.get("model", directory.name)
        with t("eval float"):
            base = ev.evaluate_model(ref, data, model_id=f"{name}@{fingerprint(directory)}")
    with t("eval quantized"):
        quant = ev.evaluate_model(from_nnx(_eval_model(q.ir, cfg.eval.packed)), data,
                                  reference=ref)
    rows = quant_stats.tensors(q.ir, fir, progress=cfg.eval.progress)
    stored = quant_stats.storage(q.ir, rows)
    report = _base_report(cfg, "eval")
    report.update({
        "model": cfg.model.name if cfg.model is not None else recipe.get("model", path.name),
        "family": q.ir.family, "checkpoint": None if directory is None else str(directory),
        "artifact": str(path), "pipeline_name": recipe.get("method"),
        "pipeline": [p.get("name") for p in q.report] or None, "parameters": q.ir.num_params(),
        "bits_per_weight": stored["bits_per_weight"], "bytes": {k: stored["bytes"][k] for k in ("float", "quantized")},
        "evals": evals_table(base, quant), "tensors": _tensor_rows(rows),
        "passes": [{"name": p["name"], "seconds": p["seconds"]} for p in q.report if "seconds" in p],
        "quantized_runtime": _runtime(cfg), "timings": dict(t), "seconds": time.perf_counter() - start,
    })
    if recipe.get("bits") is not None:
        report["config"]["quant"] = {k: recipe.get(k) for k in ("bits", "embed_bits", "block", "codebook", "seed")}
    return finish(report, cfg, out_dir)


def generate(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """``mode=generate``: continue ``cfg.prompt`` with ``cfg.artifact``; prints and writes generation.json."""
    from cqjax import api

    path = Path(os.path.expanduser(cfg.artifact))
    start = time.perf_counter()
    q = api.load(path)
    if q.tokenizer_path is None:
        raise ConfigError(f"artifact={str(path)!r} has no tokenizer/ directory: cannot encode prompt")
    g = cfg.generate
    log(f"generating up to {g.max_new_tokens} tokens ({'greedy' if g.temperature == 0 else f'T={g.temperature}'})")
    text = api.generate(q, None, cfg.prompt, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                        top_k=g.top_k, seed=g.seed)
    out = {"artifact": str(path), "prompt": cfg.prompt, "completion": text,
           "settings": OmegaConf.to_container(g, resolve=True), "seconds": time.perf_counter() - start}
    write_json(out_dir / "generation.json", out)
    print(cfg.prompt + text)
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validates ``cfg``, then runs ``cfg.mode`` into Hydra's run directory (or the current one)."""
    from hydra.core.hydra_config import HydraConfig

    validate(cfg)
    if cfg.pipeline and cfg.mode == Mode.convert:
        build_pipeline(cfg, progress=False)  # instantiate every pass now: bad values fail before any work
    validate_inputs(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(os.getcwd())
    out_dir.mkdir(parents=True, exist_ok=True)
    return {Mode.convert: convert, Mode.eval: evaluate_artifact, Mode.generate: generate}[cfg.mode](cfg, out_dir)
