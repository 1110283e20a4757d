"""Mixed precision vs uniform widths: does the allocator spend a bit budget where it hurts least?

For one model: uniform 2- and 3-bit CQ, then allocated configurations at the budget halfway
between their stored sizes (and any ``--bpw``), with each sensitivity proxy, and the baseline
"promote a random set of tensors to the same budget" (several seeds). Embeddings and the LM head
stay at ``--embed-bits`` in every configuration. Reports perplexity, KL and top-1 against the
float model on the same windows, and the share of the uniform 2→3-bit gap in log-perplexity
each configuration recovers. Calibration (self-generated rows by default) and the Fisher pass
are timed.

    python benchmarks/allocate.py --model smollm2-135m --json alloc.json --md alloc.md
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import numpy as np
from transformers import AutoTokenizer

from cqjax import data, quant_stats, runtime
from cqjax import eval as ev
from cqjax import pipeline as pl
from cqjax.calib import calibrate
from cqjax.eval.scoring import from_nnx
from cqjax.io import hf
from cqjax.io.atomic import write_json, write_text
from cqjax.passes.allocate import AllocateBits
from cqjax.passes.common import is_eligible
from cqjax.passes.recipes import cq_pipeline


def log(msg: str) -> None:
    print(f"[allocate] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--embed-bits", type=int, default=4)
    ap.add_argument("--bpw", type=float, nargs="*", default=[], help="extra budgets (stored bits/weight)")
    ap.add_argument("--proxies", nargs="+", default=["fisher", "hessian", "weight"])
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--calib-source", default="self")
    ap.add_argument("--calib-rows", type=int, default=16)
    ap.add_argument("--calib-length", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--json", required=True)
    ap.add_argument("--md")
    args = ap.parse_args(argv)

    directory = data.model_dir(args.model) if args.model in data.MODELS else hf.resolve(args.model)
    ir = hf.import_checkpoint(directory)
    model = hf.to_model(ir)
    tok = AutoTokenizer.from_pretrained(directory)
    evdata = ev.prepare(tok, ev.EvalConfig(max_tokens=args.max_tokens, tasks=(), progress=False))
    ref = from_nnx(model)
    base = ev.evaluate_model(ref, evdata, model_id=f"{args.model}@{hf.checkpoint_fingerprint(directory)}")

    needs = [p for p in args.proxies if p in ("fisher", "hessian")]
    calib = calibrate(model, ir, tok, needs, source=args.calib_source, rows=args.calib_rows,
                      length=args.calib_length)
    timing = {f"calibration_{k}": v for k, v in calib.timing.items()}
    ctx = pl.Context(calibration=calib)
    log(f"calibration: {timing}")

    fixed = {"role:embedding": args.embed_bits, "role:per_layer_embedding": args.embed_bits,
             "role:lm_head": args.embed_bits}
    results = []
    result = {"model": args.model, "protocol": base["perplexity"]["protocol"],
              "calibration": {"source": args.calib_source, "rows": args.calib_rows, "length": args.calib_length,
                              "eval_text": "BoolQ Wikipedia passages (disjoint)"},
              "timing": timing, "machine": platform.platform(), "runtime": "dequantized", "rows": results}

    def evaluate(name: str, ir_in, alloc_s: float = 0.0) -> dict:
        q, _ = pl.run(cq_pipeline(bits=2, embed_bits=args.embed_bits), ir_in, ctx, progress=False)
        sim = ev.evaluate_model(from_nnx(runtime.dequantized_model(q)), evdata, reference=ref)["similarity"]
        bits = [int(q.params[p].bits) for p, m in ir.meta.items() if is_eligible(p, m) and m.role == "linear"]
        row = {"config": name, "bits_per_weight": quant_stats.storage(q)["bits_per_weight"]["quantized_tensors"],
               "perplexity": sim["perplexity"], "kl": sim["kl"], "top1": sim["top1"],
               "linear_bits": {str(b): bits.count(b) for b in sorted(set(bits))}, "allocate_s": alloc_s}
        results.append(row)
        log(f"{name}: bpw {row['bits_per_weight']:.3f} ppl {row['perplexity']:.3f} kl {row['kl']:.4f} "
            f"linear bits {row['linear_bits']}")
        write(result, args)
        return row

    def allocated(name: str, **kw) -> dict:
        t = time.perf_counter()
        out = AllocateBits(fixed=fixed, choices=(2, 3), **kw)(ir, ctx)
        return evaluate(name, out, time.perf_counter() - t)

    u2 = evaluate("uniform 2", AllocateBits(bpw=16, choices=(2,), fixed=fixed, proxy="weight")(ir, ctx))
    u3 = evaluate("uniform 3", AllocateBits(bpw=16, choices=(3,), fixed=fixed, proxy="weight")(ir, ctx))
    for bpw in [0.5 * (u2["bits_per_weight"] + u3["bits_per_weight"])] + list(args.bpw):
        for proxy in args.proxies:
            allocated(f"allocated {bpw:.3f} ({proxy})", bpw=bpw, proxy=proxy)
        for seed in range(args.random_seeds):
            allocated(f"random {bpw:.3f} (seed {seed})", bpw=bpw, random_seed=seed)
    gap = math.log(u2["perplexity"]) - math.log(u3["perplexity"])
    for r in results:
        r["gap_recovered"] = (math.log(u2["perplexity"]) - math.log(r["perplexity"])) / gap if gap else None
    write(result, args)
    return 0


def write(result: dict, args) -> None:
    write_json(args.json, result)
    if not args.md:
        return
    lines = [f"# {result['model']}: bit allocation at a fixed budget", "",
             "| config | stored bits/weight | perplexity | KL | top-1 | 2→3 gap recovered | linears per width |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rec = r.get("gap_recovered")
        lines.append(f"| {r['config']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {r['kl']:.4f} "
                     f"| {r['top1']:.4f} | {'—' if rec is None else f'{rec:.1%}'} | {r['linear_bits']} |")
    lines += ["", f"Calibration: {result['calibration']}; timing (s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in result["timing"].items()),
              f"Quantized models evaluated with the {result['runtime']} runtime; machine {result['machine']}."]
    write_text(args.md, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
