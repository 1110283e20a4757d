"""PNG plots of a report and of a sweep (matplotlib's Agg backend; no display needed).

=====================  ===========================================================================
file                   shows
=====================  ===========================================================================
tensor_errors.png      relative weight error ``‖W − Ŵ‖² / ‖W‖²`` of every quantized tensor by layer,
                       one line per kind of tensor (q_proj, up_proj, ...); embeddings and the LM
                       head as dashed horizontal lines
metrics.png            float vs quantized: perplexity (with KL and top-1) and task accuracies
                       with their standard errors
pareto.png             (sweeps) perplexity and KL against stored bits/weight, one line per pipeline
                       (allocated budgets apart), the Pareto fronts of cqjax's configurations and
                       of the RTN / GPTQ baselines, the float model as a dashed line
=====================  ===========================================================================
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

_PLAIN = FuncFormatter(lambda y, _: f"{y:g}")


def _log_labels(ax) -> None:
    """Plain numbers on a log y axis; minor ticks labelled only when it spans under ~1.5 decades
    (more would print overlapping labels such as 2e5 3e5 ... 9e5)."""
    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_formatter(_PLAIN)
    ax.yaxis.set_minor_formatter(_PLAIN if lo > 0 and hi / lo < 30 else NullFormatter())

_LAYER = re.compile(r"(?:^|.*/)layers/(\d+)/(.+)$")
FLOAT_COLOR, QUANT_COLOR = "#4c72b0", "#dd8452"


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _kind(rest: str) -> str:
    return re.sub(r"/(kernel|embedding|weight)$", "", rest)


def _subtitle(report: dict[str, Any]) -> str:
    q = (report.get("config") or {}).get("quant") or {}
    bpw = report["bits_per_weight"]["quantized_tensors"]
    name = report.get("pipeline_name") or "artifact"
    bits = f", {q['bits']}-bit linears / {q.get('embed_bits') or q['bits']}-bit embeddings" if (
        report.get("pipeline") and q.get("bits")) else ""
    return f"{name}{bits}" + (f", {bpw:.2f} stored bits/weight" if bpw is not None else "")


def tensor_errors(report: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Per-tensor relative error by layer (None when no tensor has one)."""
    rows = [t for t in report["tensors"] if t.get("rel_error") is not None]
    if not rows:
        return None
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    flat: list[dict] = []
    for t in rows:
        m = _LAYER.match(t["path"])
        if m:
            series[_kind(m.group(2))].append((int(m.group(1)), t["rel_error"]))
        else:
            flat.append(t)
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for kind in sorted(series):
        pts = sorted(series[kind])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linewidth=1.2, label=kind)
    for i, t in enumerate(flat):
        ax.axhline(t["rel_error"], linestyle="--", linewidth=1.2, color=f"C{(len(series) + i) % 10}",
                   label=f"{_kind(t['path'])} ({t['bits']}-bit)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _log_labels(ax)
    ax.set_xlabel("layer index")
    ax.set_ylabel("relative weight error ‖W − Ŵ‖² / ‖W‖²  (log scale)")
    ax.set_title(f"{report['model']}: weight error of each quantized tensor\n{_subtitle(report)}", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="best", title="tensor (lines: per layer)", title_fontsize=8)
    return _save(fig, path)


def metrics(report: dict[str, Any], path: str | os.PathLike) -> Path | None:
    """Float vs quantized perplexity (speech recognizers: word error rate) and task (or retrieval)
    accuracies (None without evaluations)."""
    evals = report["evals"]
    ppl = evals.get("perplexity") or evals.get("wer")
    tasks = [n for n in evals if n not in ("perplexity", "cosine", "wer")]
    if not ppl and not tasks:
        return None
    panels = (1 if ppl else 0) + (1 if tasks else 0)
    fig = Figure(figsize=(5 + 3.5 * panels, 4.8), layout="constrained")
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    i = 0
    if ppl:
        ax = axes[i]
        i += 1
        vals = [("float", ppl["baseline"], FLOAT_COLOR), ("quantized", ppl["quantized"], QUANT_COLOR)]
        vals = [v for v in vals if v[1] is not None]
        bars = ax.bar([v[0] for v in vals], [v[1] for v in vals], color=[v[2] for v in vals], width=0.6)
        ax.bar_label(bars, fmt="%.2f" if "perplexity" in evals else "%.3f", fontsize=9)
        if "wer" in evals:
            ax.set_ylabel("word error rate (lower is better)")
            ax.set_title(f"Word error rate on {ppl['n']} sentences", fontsize=10)
        else:
            ax.set_ylabel("perplexity (lower is better)")
            extra = []
            if ppl.get("kl") is not None:
                extra.append(f"KL {ppl['kl']:.3f} nats/token")
            if ppl.get("top1") is not None:
                extra.append(f"top-1 agreement {ppl['top1']:.3f}")
            ax.set_title(f"Perplexity on {ppl.get('tokens', 0):,} tokens" + ("\n" + ", ".join(extra) if extra else ""),
                         fontsize=10)
        ax.margins(y=0.15)
    if tasks:
        ax = axes[i]
        xs = range(len(tasks))
        w = 0.38
        for off, key, label, color in ((-w / 2, "baseline", "float", FLOAT_COLOR),
                                       (w / 2, "quantized", "quantized", QUANT_COLOR)):
            ys = [evals[t][key] for t in tasks]
            if all(y is None for y in ys):
                continue
            ys = [float("nan") if y is None else y for y in ys]
            bars = ax.bar([x + off for x in xs], ys, w, yerr=[evals[t]["stderr"] for t in tasks], capsize=3,
                          color=color, label=label)
            ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
        ax.set_xticks(list(xs), [f"{t}\n(n={evals[t]['n']})" for t in tasks])
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (higher is better)")
        ax.set_title(("Retrieval" if tasks == ["retrieval"] else "Multiple-choice")
                     + " accuracy (error bars: ±1 stderr)", fontsize=10)
        ax.legend(loc="upper right", fontsize=9)
    fig.suptitle(f"{report['model']}: float vs quantized ({_subtitle(report)})", fontsize=11)
    return _save(fig, path)


#: Pipelines that are baselines rather than cqjax's recipe (the front is drawn for the rest).
BASELINES = ("rtn", "gptq")


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto-optimal points (no other point is smaller and better), by increasing size."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _sweep_label(r: dict[str, Any]) -> tuple[str, str]:
    """(line label, point annotation) of a sweep job: pipeline (+ "allocated"), bits or budget."""
    q = (r.get("config") or {}).get("quant") or {}
    label = r.get("pipeline_name") or "quantized"
    if q.get("bpw") is not None:
        return f"{label} allocated", f"{q['bpw']:g} bpw"
    return label, f"{q.get('bits')}-bit"


#: The two panels of a sweep's pareto.png by the kind of model swept: the key of ``evals`` that
#: marks the kind, and the axis titles of (its first metric, its second).
PARETO_PANELS = {
    "perplexity": (("perplexity (log scale, lower is better)", "Perplexity vs size"),
                   ("KL(float ‖ quantized), nats/token (log scale)", "Divergence from the float model vs size")),
    "retrieval": (("retrieval error, 1 − top-1 accuracy (log scale)", "Retrieval vs size"),
                  ("1 − cosine to the float embeddings (log scale)", "Divergence from the float model vs size")),
    "wer": (("word error rate (log scale)", "Transcription vs size"),
            ("share of transcriptions that differ from the float model's (log scale)",
             "Divergence from the float model vs size")),
}


def _sweep_point(evals: dict[str, Any], kind: str) -> tuple[float | None, float | None, float | None]:
    """``(quantized, divergence, float)`` of a job: perplexity, KL and the float perplexity; or
    (sentence encoders) retrieval error, 1 − mean cosine and the float retrieval error; or
    (speech recognizers) word error rate, the share of changed transcriptions and the float WER."""
    e = evals.get(kind) or {}
    if kind == "perplexity":
        return e.get("quantized"), e.get("kl"), e.get("baseline")
    if kind == "wer":
        changed = None if e.get("changed") is None else e["changed"] / max(e["n"], 1)
        return e.get("quantized"), changed, e.get("baseline")
    err = lambda acc: None if acc is None else 1.0 - acc  # noqa: E731
    return err(e.get("quantized")), err((evals.get("cosine") or {}).get("quantized")), err(e.get("baseline"))


def pareto(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Perplexity and KL (sentence encoders: retrieval error and 1 − cosine) against stored
    bits/weight, one line per (model, pipeline), with the Pareto front of cqjax's configurations
    and of the baselines (:data:`BASELINES`). A sweep over both kinds plots the more common one."""
    kinds = [k for r in rows for k in PARETO_PANELS if k in r.get("evals", {})]
    if not kinds:
        return None
    kind = max(PARETO_PANELS, key=kinds.count)
    pts: dict[str, list[tuple[float, float | None, float | None, str]]] = defaultdict(list)
    floats: dict[str, float] = {}
    fronts: dict[str, list[tuple[float, float, float | None]]] = defaultdict(list)
    several = len({x["model"] for x in rows}) > 1
    for r in rows:
        y, div, base = _sweep_point(r.get("evals", {}), kind)
        if base is not None:
            floats[r["model"]] = base
        bpw = r["bits_per_weight"]["quantized_tensors"]
        if bpw is None or y is None:
            continue
        label, note = _sweep_label(r)
        family = "baselines" if (r.get("pipeline_name") or "") in BASELINES else "cqjax"
        if several:
            label, family = f"{r['model']} {label}", f"{r['model']} {family}"
        pts[label].append((bpw, y, div, note))
        fronts[family].append((bpw, y, div))
    if not pts:
        return None
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, label in enumerate(sorted(pts)):
        line = sorted(pts[label])
        xs = [p[0] for p in line]
        ax1.plot(xs, [p[1] for p in line], marker="o", color=f"C{i}", label=label, alpha=0.8)
        for x, y, _, note in line:
            ax1.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        kl = [(p[0], p[2]) for p in line if p[2] is not None]
        if kl:
            ax2.plot([k[0] for k in kl], [k[1] for k in kl], marker="o", color=f"C{i}", label=label, alpha=0.8)
    for family in sorted(f for f in fronts if len(fronts[f]) > 1):
        style = {"color": "black" if "cqjax" in family else "gray", "linewidth": 2.5, "alpha": 0.35,
                 "drawstyle": "steps-post", "zorder": 0}
        f1 = _front([(x, y) for x, y, _ in fronts[family]])
        ax1.plot(*zip(*f1), label=f"{family} Pareto front", **style)
        f2 = _front([(x, k) for x, _, k in fronts[family] if k is not None])
        if f2:
            ax2.plot(*zip(*f2), label=f"{family} Pareto front", **style)
    for model, y in floats.items():
        ax1.axhline(y, linestyle="--", color="gray", label=f"{model} float (16 bits/weight)")
    for ax, (ylabel, title) in zip((ax1, ax2), PARETO_PANELS[kind]):
        ax.set_yscale("log")
        ax.set_xlabel("stored bits/weight (quantized tensors)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    for ax in (ax1, ax2):
        ax.margins(x=0.12, y=0.08)
        _log_labels(ax)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="pipeline", title_fontsize=8)
    models = sorted({r["model"] for r in rows})
    fig.suptitle(f"{', '.join(models)}: quality vs stored bits/weight ({len(rows)} jobs)", fontsize=11)
    return _save(fig, path)


def report_plots(report: dict[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """Writes tensor_errors.png and metrics.png where there is something to show; returns names."""
    out = []
    for name, fn in (("metrics.png", metrics), ("tensor_errors.png", tensor_errors)):
        if fn(report, Path(out_dir) / name) is not None:
            out.append(name)
    return out
