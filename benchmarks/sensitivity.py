"""Which cheap sensitivity proxy predicts the real damage? Direct KL on a sample of tensors.

The direct measurement of a tensor's sensitivity is the KL of next-token distributions between
the float model and the model with only that tensor quantized. It costs one evaluation per
(tensor, width): hours for every tensor of a 135M model on 2 cores, so this benchmark measures
it on a sample (``--layers`` × every linear kind, plus the embedding table) and compares it
with the allocator's proxies (:mod:`cqjax.passes.allocate`: ``fisher``, ``hessian``,
``weight``) by Spearman rank correlation, per width and pooled. The allocator's default proxy
is the one that ranks best here.

    python benchmarks/sensitivity.py --model smollm2-135m --json sens.json --md sens.md
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time

import numpy as np
from common import add_calibration_args, load_float

from cqjax import runtime
from cqjax import eval as ev
from cqjax import pipeline as pl
from cqjax.calib import calibrate
from cqjax.eval.scoring import from_nnx
from cqjax.io.atomic import write_json, write_text
from cqjax.passes.allocate import PROXIES, AllocateBits
from cqjax.quant_stats import is_eligible
from cqjax.recipes import recipe


def log(msg: str) -> None:
    print(f"[sensitivity] {msg}", file=sys.stderr, flush=True)


def spearman(a, b) -> float | None:
    """Spearman rank correlation (ties broken by order; fine for continuous measurements);
    None when undefined (fewer than 3 points)."""
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def sample(ir, layers: list[int]) -> list[str]:
    """Every eligible tensor of the given layers, plus the eligible tensors outside layers."""
    out = []
    for p, m in ir.meta.items():
        if not is_eligible(p, m):
            continue
        layer = re.search(r"(?:^|/)layers/(\d+)/", p)
        if layer is None or int(layer.group(1)) in layers:
            out.append(p)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    add_calibration_args(ap)
    ap.add_argument("--max-tokens", type=int, default=2044, help="scored tokens of the direct KL")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md")
    args = ap.parse_args(argv)

    directory, ir, model, tok = load_float(args.model)
    evdata = ev.prepare(tok, ev.EvalConfig(max_tokens=args.max_tokens, tasks=(), progress=False))
    ref = from_nnx(model)
    paths = sample(ir, args.layers)
    log(f"{len(paths)} tensors sampled")
    calib = calibrate(model, ir, tok, {"fisher", "hessian"}, source=args.calib_source, rows=args.calib_rows,
                      length=args.calib_length)
    ctx = pl.Context(calibration=calib)
    where = tuple(re.escape(p) for p in paths)
    proxies = {}
    for proxy in PROXIES:
        plan = AllocateBits(recipe=recipe("cq", bits=2, embed_bits=None), bpw=16, choices=tuple(args.bits),
                            proxy=proxy, where=where).plan(ir, ctx)
        proxies[proxy] = {p: {b: plan.costs[p][b].damage for b in args.bits} for p in paths}
    rows = []
    result = {"model": args.model, "bits": args.bits,
              "protocol": {"text": "wikipedia (BoolQ passages)", "context": 512, "max_tokens": args.max_tokens},
              "calibration": calib.describe(), "machine": platform.platform(), "rows": rows}
    t0 = time.perf_counter()
    for i, path in enumerate(paths):
        for b in args.bits:
            q, _ = pl.run(pl.masked(recipe("cq", bits=b, embed_bits=b), re.escape(path)), ir, progress=False)
            sim = ev.evaluate_model(from_nnx(runtime.dequantized_model(q)), evdata, reference=ref)["similarity"]
            rows.append({"path": path, "role": ir.meta[path].role, "bits": b, "kl": sim["kl"],
                         **{proxy: proxies[proxy][path][b] for proxy in PROXIES}})
            log(f"{i + 1}/{len(paths)} {path} {b}-bit: KL {sim['kl']:.5f} "
                + " ".join(f"{proxy} {rows[-1][proxy]:.4g}" for proxy in PROXIES))
        result["correlation"] = correlations(rows, args.bits)
        result["seconds"] = time.perf_counter() - t0
        write(result, args)
    log(f"Spearman vs direct KL: {result['correlation']}")
    return 0


def correlations(rows: list[dict], bits: list[int]) -> dict:
    out = {}
    for proxy in PROXIES:
        per = {str(b): spearman([r["kl"] for r in rows if r["bits"] == b], [r[proxy] for r in rows if r["bits"] == b])
               for b in bits}
        out[proxy] = {**per, "pooled": spearman([r["kl"] for r in rows], [r[proxy] for r in rows])}
    return out


def write(result: dict, args) -> None:
    write_json(args.json, result)
    if not args.md:
        return
    corr = result["correlation"]
    keys = [str(b) for b in result["bits"]] + ["pooled"]
    lines = [f"# {result['model']}: sensitivity proxies vs the direct KL", "",
             f"{len({r['path'] for r in result['rows']})} tensors quantized alone with the CQ recipe; direct KL "
             f"on {args.max_tokens} tokens. Spearman rank correlation with the direct KL:", "",
             "| proxy | " + " | ".join(f"{k}-bit" if k != "pooled" else "pooled" for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for proxy, c in corr.items():
        lines.append(f"| {proxy} | " + " | ".join("—" if c[k] is None else f"{c[k]:.3f}" for k in keys) + " |")
    lines += ["", "| tensor | bits | direct KL | " + " | ".join(PROXIES) + " |", "|---|---|---|" + "---|" * len(PROXIES)]
    for r in result["rows"]:
        lines.append(f"| `{r['path']}` | {r['bits']} | {r['kl']:.5f} | " + " | ".join(f"{r[p]:.4g}" for p in PROXIES)
                     + " |")
    lines += ["", f"Calibration: {result['calibration']}; {result['seconds']:.0f} s of direct measurements; "
              f"machine {result['machine']}."]
    write_text(args.md, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
