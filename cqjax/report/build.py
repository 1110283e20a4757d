"""The ``evals`` section of report.json and a check of the stable schema (see :mod:`cqjax.report`)."""

from __future__ import annotations

from typing import Any

#: The stable top-level keys of report.json and their types.
SCHEMA_KEYS: dict[str, type | tuple[type, ...]] = {
    "model": str, "bits_per_weight": dict, "bytes": dict, "evals": dict, "tensors": list, "passes": list}
_NUM = (int, float, type(None))


def evals_table(base: dict[str, Any] | None, quant: dict[str, Any] | None) -> dict[str, Any]:
    """The report's ``evals`` from :func:`cqjax.eval.evaluate_model` outputs.

    Args:
      base: the float model's results (None when the float model is unknown).
      quant: the quantized model's results, evaluated with the float model as reference when
        ``base`` is given (None: float only).

    Returns:
      ``{"perplexity": {"baseline", "quantized", "kl", "top1", "tokens", "protocol"},
      "<task>": {"baseline", "quantized", "stderr", "n", ...}}``; for a sentence encoder
      ``{"retrieval": {"baseline", "quantized", "stderr", "n", "protocol"},
      "cosine": {"quantized" (mean), "min", "n"}}``; for a speech recognizer ``{"wer":
      {"baseline", "quantized", "n", "protocol"}}`` (word error rates as fractions).
    """
    base, quant = base or {}, quant or {}
    out: dict[str, Any] = {}
    bp, qp, sim = base.get("perplexity"), quant.get("perplexity"), quant.get("similarity", {})
    if bp or qp:
        ref = bp or qp
        out["perplexity"] = {
            "baseline": bp["perplexity"] if bp else None,
            "quantized": sim.get("perplexity", qp["perplexity"] if qp else None),
            "kl": sim.get("kl"), "top1": sim.get("top1"),
            "tokens": ref["tokens"], "protocol": ref["protocol"]}
    names = [n for n, r in base.items() if isinstance(r, dict) and "acc" in r]
    names += [n for n, r in quant.items() if isinstance(r, dict) and "acc" in r and n not in names]
    for name in names:
        b, q = base.get(name) or {}, quant.get(name) or {}
        ref = b or q
        out[name] = {"baseline": b.get("acc"), "quantized": q.get("acc"), "stderr": ref["stderr"],
                     "n": ref["n"], "protocol": ref.get("protocol")}
        if "acc_per_char" in ref:
            out[name].update(baseline_per_char=b.get("acc_per_char"), quantized_per_char=q.get("acc_per_char"))
    bw, qw = base.get("wer"), quant.get("wer")
    if bw or qw:
        ref = bw or qw
        out["wer"] = {"baseline": bw and bw["wer"], "quantized": qw and qw["wer"], "n": ref["n"],
                      "changed": (qw or {}).get("changed"), "protocol": ref["protocol"]}
    cos = quant.get("cosine")
    if cos:
        out["cosine"] = {"quantized": cos["mean"], "min": cos["min"], "n": cos["n"]}
    return out


def check_schema(report: dict[str, Any]) -> None:
    """Raises ``ValueError`` naming the first key of the stable schema that is missing or mistyped."""
    for key, typ in SCHEMA_KEYS.items():
        if not isinstance(report.get(key), typ):
            raise ValueError(f"report.json: {key!r} must be a {typ}, got {report.get(key)!r}")
    for sect, keys in (("bits_per_weight", ("quantized_tensors", "model")), ("bytes", ("float", "quantized"))):
        for k in keys:
            if k not in report[sect] or not isinstance(report[sect][k], _NUM):
                raise ValueError(f"report.json: {sect}.{k} must be a number or null")
    for name, e in report["evals"].items():
        need = {"perplexity": ("baseline", "quantized", "kl", "top1", "protocol"),
                "cosine": ("quantized", "min", "n"), "wer": ("baseline", "quantized", "n")}.get(name, ("baseline", "quantized", "stderr", "n"))
        for k in need:
            if k not in e:
                raise ValueError(f"report.json: evals.{name}.{k} is missing")
    for i, t in enumerate(report["tensors"]):
        for k in ("path", "role", "bits", "rel_error"):
            if k not in t:
                raise ValueError(f"report.json: tensors[{i}].{k} is missing")
    for i, p in enumerate(report["passes"]):
        if not isinstance(p.get("name"), str) or not isinstance(p.get("seconds"), (int, float)):
            raise ValueError(f"report.json: passes[{i}] needs a name (str) and seconds (number)")
