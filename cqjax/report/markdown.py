"""report.md for one run and summary.md for a sweep (one row per job)."""

from __future__ import annotations

from typing import Any

MB = 1e6


def _f(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _delta(b: Any, q: Any, spec: str, rel: bool = False) -> str:
    if b is None or q is None:
        return "—"
    if rel and b:
        return f"{100 * (q - b) / b:+.1f}%"
    return format(q - b, "+" + spec)


def quality_table(evals: dict[str, Any]) -> list[str]:
    """Markdown rows: one per metric, float vs quantized."""
    lines = ["| metric | float | quantized | change | notes |", "|---|---|---|---|---|"]
    p = evals.get("perplexity")
    if p:
        notes = (f"KL(float ‖ quantized) {_f(p.get('kl'), '.4f')} nats/token, top-1 agreement "
                 f"{_f(p.get('top1'), '.3f')}; {p.get('tokens', 0):,} tokens")
        lines.append(f"| perplexity (lower is better) | {_f(p['baseline'], '.3f')} | {_f(p['quantized'], '.3f')} "
                     f"| {_delta(p['baseline'], p['quantized'], '.3f', rel=True)} | {notes} |")
    for name, e in evals.items():
        if name == "perplexity":
            continue
        if name == "cosine":
            lines.append(f"| cosine to float embeddings (mean) | 1 | {_f(e['quantized'], '.4f')} | "
                         f"{_delta(1.0, e['quantized'], '.4f')} | least {_f(e['min'], '.4f')}, n={e['n']} texts |")
            continue
        if name == "wer":
            changed = "" if e.get("changed") is None else f"; {e['changed']} transcriptions differ from float's"
            lines.append(f"| word error rate (lower is better) | {_f(e['baseline'], '.3f')} | "
                         f"{_f(e['quantized'], '.3f')} | {_delta(e['baseline'], e['quantized'], '.3f')} | "
                         f"n={e['n']} sentences{changed} |")
            continue
        if name == "retrieval":
            lines.append(f"| retrieval accuracy (top-1) | {_f(e['baseline'], '.3f')} | {_f(e['quantized'], '.3f')} "
                         f"| {_delta(e['baseline'], e['quantized'], '.3f')} | ±{e['stderr']:.3f} (stderr), "
                         f"n={e['n']} questions |")
            continue
        lines.append(f"| {name} accuracy | {_f(e['baseline'], '.3f')} | {_f(e['quantized'], '.3f')} "
                     f"| {_delta(e['baseline'], e['quantized'], '.3f')} | ±{e['stderr']:.3f} (stderr), "
                     f"n={e['n']} documents |")
    return lines


def _protocol_lines(evals: dict[str, Any], runtime: str | None = None) -> list[str]:
    out = []
    p = evals.get("perplexity")
    if p:
        pr = p.get("protocol") or {}
        text = pr.get("text") or {}
        name = text.get("source") if isinstance(text, dict) else text
        out.append(f"- Perplexity: {name or 'text'}, {p.get('tokens', 0):,} scored tokens in windows of "
                   f"{pr.get('context', '?')} tokens (BOS + text), stride {pr.get('stride', '?')}. "
                   f"KL and top-1 compare the quantized model's next-token distribution with the float "
                   f"model's on the same tokens.")
    if runtime == "packed":
        out.append("- The quantized model was scored through its packed runtime (`eval.packed=true`).")
    elif runtime:
        out.append(f"- The quantized model was scored with its weights {runtime} once (the same function "
                   "as the packed runtime up to float rounding; `eval.packed=true` scores the packed runtime).")
    r = evals.get("retrieval")
    if r:
        pr = r.get("protocol") or {}
        out.append(f"- Retrieval: {r['n']} SQuAD questions, each against all {r['n']} paragraphs ({pr.get('source')}); "
                   f"texts truncated to {pr.get('max_length')} tokens; embeddings = {pr.get('pooling')}. Cosine "
                   "compares each question's and paragraph's quantized embedding with its float embedding.")
    w = evals.get("wer")
    if w:
        pr = w.get("protocol") or {}
        out.append(f"- Word error rate: {w['n']} {pr.get('source')}; {pr.get('decoding')}; both sides through "
                   f"{pr.get('normalizer')}; jiwer's WER over all sentences.")
    for name, e in evals.items():
        if name not in ("perplexity", "retrieval", "cosine", "wer"):
            pr = e.get("protocol") or {}
            how = ("zero-shot requests rebuilt from the documents" if pr.get("requests") == "zero-shot from doc"
                   else "requests as written")
            out.append(f"- {name}: first {e['n']} documents of {pr.get('source', name)} ({pr.get('split', '?')} split), "
                       f"{how}; accuracy = the choice with the highest summed log-likelihood.")
    return out


def markdown(report: dict[str, Any]) -> str:
    """report.md: what was done, the quality table, the protocol, bits and error per tower (when
    the model has several), timings, the worst tensors, plots."""
    bpw, nbytes = report["bits_per_weight"], report["bytes"]
    cfg = report.get("config") or {}
    q = cfg.get("quant") or {}
    passes = report.get("pipeline")
    if passes:
        what = (f"quantized with **{report.get('pipeline_name') or 'custom'}** ({' → '.join(passes)}), "
                f"{q.get('bits')}-bit linears, {q.get('embed_bits') or q.get('bits')}-bit embeddings/LM head")
    elif report.get("mode") == "eval":
        what = "an existing artifact"
    else:
        what = "float model only (no pipeline)"
    lines = [f"# cqjax report: {report['model']}", "",
             f"Mode **{report.get('mode', 'convert')}**: {what}.", "",
             "| | float (16-bit) | quantized |", "|---|---|---|",
             f"| stored bits/weight, quantized tensors | 16 | {_f(bpw['quantized_tensors'], '.3f')} |",
             f"| stored bits/weight, whole model | 16 | {_f(bpw['model'], '.3f')} |",
             f"| size (MB) | {nbytes['float'] / MB:,.1f} | "
             f"{'—' if nbytes['quantized'] is None else format(nbytes['quantized'] / MB, ',.1f')} |",
             f"| parameters | {report.get('parameters', 0):,} | |", "",
             "## Quality", ""]
    lines += quality_table(report["evals"]) if report["evals"] else ["(no evaluation)"]
    proto = _protocol_lines(report["evals"], report.get("quantized_runtime"))
    if proto:
        lines += ["", "## Protocol", "", *proto]
    towers = report.get("towers") or {}
    if len(towers) > 1:
        lines += ["", "## Per tower", "", "| tower | parameters | stored bits/weight | mean relative error |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {t['params']:,} | {t['bits_per_weight']:.3f} | {_f(t['rel_error'], '.4f')} |"
                  for name, t in towers.items()]
    lines += ["", "## Time", ""]
    if report["passes"]:
        lines.append("Passes: " + ", ".join(f"{p['name']} {p['seconds']:.1f} s" for p in report["passes"]) + ".")
    if report.get("timings"):
        lines.append("Steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["timings"].items()) + ".")
    lines.append(f"Wall time: {report.get('seconds', 0):.0f} s.")
    errs = sorted((t for t in report["tensors"] if t.get("rel_error") is not None),
                  key=lambda t: -t["rel_error"])
    if errs:
        lines += ["", "## Largest relative weight errors ‖W − Ŵ‖² / ‖W‖²", "",
                  "| tensor | role | bits | relative error |", "|---|---|---|---|"]
        lines += [f"| `{t['path']}` | {t['role']} | {t['bits']} | {t['rel_error']:.4f} |" for t in errs[:8]]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _row_value(r: dict[str, Any], path: str) -> Any:
    x: Any = r
    for k in path.split("."):
        x = x.get(k) if isinstance(x, dict) else None
    return x


def summary_table(rows: list[dict[str, Any]]) -> str:
    """summary.md of a sweep: one row per job (``rows`` are report.json dicts plus ``job``)."""
    tasks = sorted({n for r in rows for n in r.get("evals", {}) if n not in ("perplexity", "cosine")})
    lm = any("perplexity" in r.get("evals", {}) for r in rows) or not tasks
    cosine = any("cosine" in r.get("evals", {}) for r in rows)
    head = ["job", "model", "pipeline", "bits", "embed bits", "bits/weight (quantized tensors)",
            "bits/weight (model)", "size MB",
            *(["perplexity float", "perplexity quantized", "KL", "top-1"] if lm else []),
            *(["cosine to float: mean (least)"] if cosine else []),
            *[f"{t} acc (float → quantized)" for t in tasks], "seconds"]
    lines = ["# cqjax sweep summary", "", f"{len(rows)} jobs. Quality against stored bits/weight: pareto.png.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q = _row_value(r, "config.quant") or {}
        p = r.get("evals", {}).get("perplexity", {})
        cells = [r.get("job", ""), r["model"], r.get("pipeline_name") or ("float" if not r.get("pipeline") else "?"),
                 (f"allocated to {q['bpw']:g}" if q.get("bpw") is not None else _f(q.get("bits"), "d"))
                 if r.get("pipeline") else "—",
                 _f(q.get("embed_bits") if r.get("pipeline") else None, "d"),
                 _f(r["bits_per_weight"]["quantized_tensors"], ".3f"), _f(r["bits_per_weight"]["model"], ".3f"),
                 _f(None if r["bytes"]["quantized"] is None else r["bytes"]["quantized"] / MB,
                    ".1f" if (r["bytes"]["quantized"] or 0) >= 10 * MB else ".3f"),
                 *([_f(p.get("baseline"), ".3f"), _f(p.get("quantized"), ".3f"), _f(p.get("kl"), ".4f"),
                    _f(p.get("top1"), ".3f")] if lm else [])]
        if cosine:
            c = r.get("evals", {}).get("cosine") or {}
            cells.append(f"{_f(c.get('quantized'), '.4f')} ({_f(c.get('min'), '.3f')})" if c else "—")
        for t in tasks:
            e = r.get("evals", {}).get(t) or {}
            cells.append(f"{_f(e.get('baseline'), '.3f')} → {_f(e.get('quantized'), '.3f')}" if e else "—")
        cells.append(_f(r.get("seconds"), ".0f"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
