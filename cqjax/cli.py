"""What ``python -m cqjax`` does with its composed Hydra config.

``mode=convert`` imports the model, evaluates it (perplexity on Wikipedia prose and
multiple-choice accuracy, see ``conf/eval/``) and writes ``report.json`` and ``report.md``
into the Hydra run directory. Float baselines are cached by (model, protocol).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cqjax.errors import ConfigError
from cqjax.io.atomic import write_json, write_text

MODES = ("convert",)


def log(msg: str) -> None:
    print(f"[cqjax] {msg}", file=sys.stderr, flush=True)


def model_dir(model_cfg: DictConfig) -> Path:
    """The local checkpoint directory of a ``model`` config: path, packaged model or hub id."""
    from cqjax import data
    from cqjax.io import hf

    if model_cfg.get("path"):
        return hf.resolve(model_cfg.path)
    if model_cfg.get("packaged"):
        return data.model_dir(model_cfg.packaged)
    if model_cfg.get("source"):
        return hf.resolve(model_cfg.source)
    raise ConfigError(f"model {model_cfg.get('name')!r}: set model.path=DIR (a local checkpoint directory)")


def fingerprint(directory: Path) -> str:
    """A cheap identity of a checkpoint: its config and the names, sizes and mtimes of its shards."""
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for f in sorted(directory.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def eval_config(cfg: DictConfig):
    from cqjax.eval import EvalConfig

    fields = OmegaConf.to_container(cfg.eval, resolve=True)
    fields["tasks"] = tuple(fields.get("tasks") or ())
    try:
        return EvalConfig(**fields)
    except TypeError as e:
        raise ConfigError(f"eval: {e}; allowed keys: {list(EvalConfig.__dataclass_fields__)}") from e


def evals_table(base: dict[str, Any]) -> dict[str, Any]:
    """The report's ``evals`` section from :func:`cqjax.eval.evaluate_model` output."""
    out: dict[str, Any] = {}
    if "perplexity" in base:
        p = base["perplexity"]
        out["perplexity"] = {"baseline": p["perplexity"], "quantized": None, "kl": None, "top1": None,
                             "tokens": p["tokens"], "protocol": p["protocol"]}
    for name, r in base.items():
        if isinstance(r, dict) and "acc" in r:
            out[name] = {"baseline": r["acc"], "quantized": None, "stderr": r["stderr"], "n": r["n"],
                         "baseline_per_char": r.get("acc_per_char"), "protocol": r.get("protocol")}
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# cqjax report: {report['model']}", "",
             f"Parameters: {report['parameters']:,}; float bytes: {report['bytes']['float']:,}; "
             f"wall time {report['seconds']:.0f} s.", "",
             "| metric | float | ± stderr | n |", "|---|---|---|---|"]
    for name, e in report["evals"].items():
        if name == "perplexity":
            lines.append(f"| perplexity ({e['tokens']:,} tokens) | {e['baseline']:.3f} | | |")
        else:
            lines.append(f"| {name} acc | {e['baseline']:.4f} | {e['stderr']:.4f} | {e['n']} |")
    p = report["evals"].get("perplexity", {}).get("protocol")
    if p:
        lines += ["", "Perplexity protocol: " + json.dumps(p, sort_keys=True)]
    return "\n".join(lines) + "\n"


def convert(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from cqjax import eval as ev
    from cqjax.io import hf
    from cqjax.eval.scoring import from_nnx

    if cfg.get("model") is None:
        raise ConfigError("no model chosen: add +model=<name> (see conf/model/) or +model=hf model.path=DIR")
    start = time.perf_counter()
    directory = model_dir(cfg.model)
    log(f"importing {directory}")
    model, ir = hf.load(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ecfg = eval_config(cfg)
    log("tokenizing evaluation data")
    data = ev.prepare(tokenizer, ecfg)
    model_id = f"{cfg.model.name}@{fingerprint(directory)}"
    base = ev.evaluate_model(from_nnx(model), data, model_id=model_id)
    report = {
        "model": cfg.model.name, "family": ir.family, "checkpoint": str(directory),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "parameters": ir.num_params(),
        "bytes": {"float": 2 * ir.num_params(), "quantized": None},  # float counted at 16 bits
        "bits_per_weight": {"quantized_tensors": None, "model": None},
        "evals": evals_table(base), "tensors": [], "passes": [],
        "seconds": time.perf_counter() - start,
    }
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown(report))
    print(markdown(report))
    log(f"wrote {out_dir / 'report.json'} and report.md")
    return report


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs ``cfg.mode``; writes into Hydra's run directory (or the current one outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not one of {MODES}")
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(os.getcwd())
    return convert(cfg, out_dir)
