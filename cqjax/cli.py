"""What ``python -m cqjax`` does with its composed Hydra config.

``mode=convert`` imports the model, quantizes it with ``pipeline`` (``conf/pipeline/``, bit widths
from ``conf/quant/``), evaluates the float baseline and the quantized model (perplexity on
Wikipedia prose, KL and top-1 agreement against the float model, multiple-choice accuracy; see
``conf/eval/``) and writes ``artifact/``, ``report.json`` and ``report.md`` into the Hydra run
directory. ``~pipeline`` (no pipeline) evaluates the float model only. Float baselines are cached by
(model, protocol).
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


def evals_table(base: dict[str, Any], quant: dict[str, Any] | None) -> dict[str, Any]:
    """The report's ``evals`` section from :func:`cqjax.eval.evaluate_model` outputs."""
    out: dict[str, Any] = {}
    if "perplexity" in base:
        p, sim = base["perplexity"], (quant or {}).get("similarity", {})
        out["perplexity"] = {"baseline": p["perplexity"], "quantized": sim.get("perplexity"),
                             "kl": sim.get("kl"), "top1": sim.get("top1"), "tokens": p["tokens"],
                             "protocol": p["protocol"]}
    for name, r in base.items():
        if isinstance(r, dict) and "acc" in r:
            q = (quant or {}).get(name, {})
            out[name] = {"baseline": r["acc"], "quantized": q.get("acc"), "stderr": r["stderr"], "n": r["n"],
                         "baseline_per_char": r.get("acc_per_char"), "quantized_per_char": q.get("acc_per_char"),
                         "protocol": r.get("protocol")}
    return out


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    bpw, nbytes = report["bits_per_weight"], report["bytes"]
    lines = [f"# cqjax report: {report['model']}", "",
             f"Pipeline: {report['pipeline'] or 'none (float model only)'}; parameters {report['parameters']:,}; "
             f"stored bits/weight: {_fmt(bpw['quantized_tensors'], '.3f')} (quantized tensors), "
             f"{_fmt(bpw['model'], '.3f')} (whole model); bytes {nbytes['float']:,} (16-bit) → "
             f"{_fmt(nbytes['quantized'], ',')}; wall time {report['seconds']:.0f} s.", "",
             "| metric | float | quantized | KL / ± stderr | top-1 / n |", "|---|---|---|---|---|"]
    for name, e in report["evals"].items():
        if name == "perplexity":
            lines.append(f"| perplexity ({e['tokens']:,} tokens) | {e['baseline']:.3f} | {_fmt(e['quantized'], '.3f')} "
                         f"| {_fmt(e['kl'], '.4f')} | {_fmt(e['top1'], '.4f')} |")
        else:
            lines.append(f"| {name} acc | {e['baseline']:.4f} | {_fmt(e['quantized'], '.4f')} | ±{e['stderr']:.4f} | {e['n']} |")
    if report["passes"]:
        lines += ["", "Passes: " + ", ".join(f"{p['name']} {p['seconds']:.1f} s" for p in report["passes"])]
    p = report["evals"].get("perplexity", {}).get("protocol")
    if p:
        lines += ["", "Perplexity protocol: " + json.dumps(p, sort_keys=True)]
    return "\n".join(lines) + "\n"


def build_pipeline(cfg: DictConfig):
    """The named chain of ``cfg.pipeline``; passes with ``bits: null`` get the ``quant`` rules."""
    from hydra.utils import instantiate

    from cqjax.passes.common import bits_rules
    from cqjax.pipeline import named_chain

    q = cfg.quant
    overrides = OmegaConf.to_container(q.overrides, resolve=True) if q.get("overrides") else None
    rules = bits_rules(q.bits, q.embed_bits, overrides)
    steps = []
    for name, pcfg in cfg.pipeline.items():
        if pcfg is None:
            continue
        extra = {"bits": rules} if "bits" in pcfg and pcfg.bits is None else {}
        try:
            steps.append((name, instantiate(pcfg, _partial_=True)(**extra)))
        except Exception as e:  # noqa: BLE001 - hydra wraps the real error; name the pass
            raise ConfigError(f"pipeline.{name}: {e}") from e
    return named_chain(*steps)


def convert(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from cqjax import eval as ev
    from cqjax import pipeline as pl
    from cqjax import quant_stats
    from cqjax.eval.scoring import from_nnx
    from cqjax.io import artifact, hf

    if cfg.get("model") is None:
        raise ConfigError("no model chosen: add +model=<name> (see conf/model/) or +model=hf model.path=DIR")
    start = time.perf_counter()
    recipe = build_pipeline(cfg) if cfg.get("pipeline") else None
    directory = model_dir(cfg.model)
    log(f"importing {directory}")
    ir = hf.import_checkpoint(directory)
    model = hf.to_model(ir)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ecfg = eval_config(cfg)
    log("tokenizing evaluation data")
    data = ev.prepare(tokenizer, ecfg)
    base = ev.evaluate_model(from_nnx(model), data, model_id=f"{cfg.model.name}@{fingerprint(directory)}")
    qir, passes, quant, rows = ir, [], None, []
    if recipe is not None:
        log(f"quantizing: {', '.join(name for name, _ in recipe.steps)}")
        qir, passes = pl.run(recipe, ir, pl.Context(rng_seed=cfg.seed))
        log(f"saving {out_dir / 'artifact'}")
        artifact.save(qir, out_dir / "artifact", tokenizer_from=directory)
        quant = ev.evaluate_model(from_nnx(hf.to_model(qir)), data, reference=from_nnx(model))
        rows = quant_stats.tensors(qir, ir)
    stored = quant_stats.storage(qir)
    report = {
        "model": cfg.model.name, "family": ir.family, "checkpoint": str(directory),
        "pipeline": None if recipe is None else [name for name, _ in recipe.steps],
        "config": OmegaConf.to_container(cfg, resolve=True),
        "parameters": ir.num_params(),
        "bits_per_weight": stored["bits_per_weight"] if recipe else {"quantized_tensors": None, "model": None},
        "bytes": {"float": stored["bytes"]["float"], "quantized": stored["bytes"]["quantized"] if recipe else None},
        "evals": evals_table(base, quant),
        "tensors": [{k: r.get(k) for k in ("path", "role", "bits", "rel_error", "bytes")} for r in rows],
        "passes": [{"name": p["name"], "seconds": p["seconds"]} for p in passes],
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
