"""What the CLI modes share: log lines, step timings, the model directory, and report.json."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cqjax.errors import CheckpointError, ConfigError
from cqjax.io.atomic import write_json, write_text


def log(msg: str) -> None:
    print(f"[cqjax] {msg}", file=sys.stderr, flush=True)


class Timings(dict):
    """``{step: seconds}`` of the run's steps, in order; ``with t("eval float"): ...``."""

    def __init__(self):
        super().__init__()
        self.start = time.perf_counter()

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


def choice(group: str) -> str | None:
    """The option Hydra chose for config group ``group`` (None outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def float_forward(ir, model, streamed: bool):
    """The float model to evaluate: block by block from ``ir`` (lazy leaves, each in its stored
    dtype; :class:`cqjax.eval.streamed.StreamedLM`), or ``model`` whole (built from ``ir`` in its
    stored dtype when None)."""
    from cqjax.eval.scoring import from_nnx
    from cqjax.eval.streamed import StreamedLM
    from cqjax.io import hf

    if streamed:
        return StreamedLM(ir, dtype=None, name="float")
    return from_nnx(model if model is not None else hf.to_model(ir, dtype=None))


def quantized_forward(qir, *, packed: bool, streamed: bool):
    """The quantized model to evaluate: its packed runtime (``packed``), or (default) its weights
    decoded to float32 (:func:`cqjax.runtime.evaluation_leaf`: the same function up to float
    rounding, several times faster on CPU); block by block when ``streamed`` (its embedding
    tables and head then stay packed, see :class:`cqjax.eval.streamed.StreamedLM`)."""
    from cqjax import runtime
    from cqjax.eval.scoring import from_nnx
    from cqjax.eval.streamed import StreamedLM
    from cqjax.io import hf

    if streamed:
        return StreamedLM(qir, packed=packed, name="quantized")
    return from_nnx(runtime.prepare(hf.to_model(qir)) if packed else runtime.dequantized_model(qir))


def tensor_rows(rows: list[dict], ir=None) -> list[dict]:
    """report.json's ``tensors``: the stats rows (:func:`cqjax.quant_stats.tensors`) with the
    allocator's ``predicted_rel_error`` from ``ir``'s metadata where it made one."""
    out = []
    for r in rows:
        row = {k: r.get(k) for k in ("path", "role", "tower", "bits", "rel_error", "bytes", "bits_per_weight")}
        predicted = ir.meta[r["path"]].info.get("predicted_rel_error") if ir is not None else None
        if predicted is not None:
            row["predicted_rel_error"] = predicted
        out.append(row)
    return out


def report(cfg: DictConfig, mode: str, t: Timings, *, ir, rows: list[dict], base, quant, passes: list[dict],
           **fields: Any) -> dict[str, Any]:
    """The report dict of a convert or eval run (see :mod:`cqjax.report` for the schema).

    Args:
      cfg: the run's config.
      mode: ``convert`` or ``eval``.
      t: the run's step timings.
      ir: the IR the report is about (quantized, or the float one without a pipeline).
      rows: its :func:`cqjax.quant_stats.tensors` rows (empty: float only).
      base, quant: :func:`cqjax.eval.evaluate_model` results of the float and quantized models.
      passes: the pass report (``{"name", "seconds"}`` ...).
      **fields: the mode's other keys (``model``, ``checkpoint``, ``artifact``, ...).
    """
    from cqjax import quant_stats
    from cqjax.report import evals_table

    stored = quant_stats.storage(ir, rows or quant_stats.tensors(ir))
    quantized = bool(rows) and any(r["kind"] != "float" for r in rows)
    out = {"model": None, "mode": mode, "pipeline_name": None, "pipeline": None,
           "overrides": _hydra_overrides(), "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
           "family": ir.family, "parameters": ir.num_params(),
           "bits_per_weight": stored["bits_per_weight"] if quantized else {"quantized_tensors": None, "model": None},
           "bytes": {"float": stored["bytes"]["float"], "quantized": stored["bytes"]["quantized"] if quantized else None},
           "evals": evals_table(base, quant), "tensors": tensor_rows(rows, ir),
           "towers": quant_stats.by_tower(rows) if quantized else None,
           "passes": [{"name": p["name"], "seconds": p["seconds"]} for p in passes if "seconds" in p],
           "quantized_runtime": ("packed" if cfg.eval.packed else "dequantized to float32") if quantized else None}
    out.update(fields)
    out.update({"timings": dict(t), "seconds": time.perf_counter() - t.start})
    return out


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


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
