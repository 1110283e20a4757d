"""Mixed precision vs uniform widths, with and without error feedback: quality per stored bit.

For one model: uniform CQ at ``--uniform`` widths, then allocated configurations at the budget
halfway between the stored sizes of uniform 2- and 3-bit (and any ``--bpw``), with each
sensitivity proxy, the baseline "promote a random set of tensors to the same budget" (several
seeds), and the same with calibrated recipes (``--variants``: GPTQ-style error feedback,
activation-aware scales). Embeddings and the LM head stay
at ``--embed-bits`` in every configuration. Reports stored bits/weight, perplexity, KL and top-1
against the float model on the same windows, multiple-choice accuracy (``--limit`` documents per
task), and the share of the uniform 2→3-bit gap in log-perplexity each configuration recovers.
Calibration (self-generated rows by default: disjoint from the BoolQ evaluation text) and each
proxy's measurement are timed; one measurement per proxy serves every budget.

    python benchmarks/allocate.py --model smollm2-135m --json alloc.json --md alloc.md
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time

from common import TASKS, VARIANTS, add_calibration_args, load_float, recipe

from cqjax import quant_stats, runtime
from cqjax import eval as ev
from cqjax import pipeline as pl
from cqjax.calib import calibrate
from cqjax.eval.scoring import from_nnx
from cqjax.io import hf
from cqjax.io.atomic import write_json, write_text
from cqjax.passes.allocate import AllocateBits
from cqjax.ir import EMBED_ROLES


def log(msg: str) -> None:
    print(f"[allocate] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--embed-bits", type=int, default=4)
    ap.add_argument("--uniform", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--bpw", type=float, nargs="*", default=[], help="extra budgets (stored bits/weight)")
    ap.add_argument("--choices", type=int, nargs="+", default=[2, 3, 4], help="widths the allocator may use")
    ap.add_argument("--proxies", nargs="+", default=["fisher", "hessian", "weight"])
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=["rotated"], choices=VARIANTS[1:],
                    help="calibrated recipes besides the plain one: error feedback (rotated, unrotated basis), "
                         "activation-aware scales (awq), or both (awq+rotated)")
    ap.add_argument("--variant-proxies", nargs="*", default=["fisher"], help="proxies also run with the variants")
    add_calibration_args(ap)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--limit", type=int, default=0, help="documents per multiple-choice task (0: none)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md")
    args = ap.parse_args(argv)

    directory, ir, model, tok = load_float(args.model)
    tasks = TASKS if args.limit else ()
    evdata = ev.prepare(tok, ev.EvalConfig(max_tokens=args.max_tokens, tasks=tasks, limit=args.limit or None,
                                           progress=False))
    ref = from_nnx(model)
    base = ev.evaluate_model(ref, evdata, model_id=f"{args.model}@{hf.checkpoint_fingerprint(directory)}")

    needs = {p for p in args.proxies if p in ("fisher", "hessian")} | ({"hessian"} if args.variants else set())
    calib = calibrate(model, ir, tok, needs, source=args.calib_source, rows=args.calib_rows,
                      length=args.calib_length)
    ctx = pl.Context(calibration=calib, log=log)
    timing = {f"calibration_{k}": v for k, v in calib.timing.items()}
    log(f"calibration: {calib.describe()}")

    fixed = {f"role:{r}": args.embed_bits for r in EMBED_ROLES}
    choices = tuple(sorted(set(args.choices) | set(args.uniform)))
    plans = {}

    def plan(proxy: str, variant: str = "plain"):
        """The proxy's measurement with the variant's own recipe (measured once, then reused)."""
        if (proxy, variant) not in plans:
            t = time.perf_counter()
            alloc = AllocateBits(recipe=recipe(variant, args.embed_bits), bpw=16, choices=choices, proxy=proxy,
                                 fixed=fixed)
            plans[proxy, variant] = alloc.plan(ir, ctx)
            timing[f"measure_{proxy}_{variant}_s"] = time.perf_counter() - t
            log(f"measured {proxy} with the {variant} recipe: {timing[f'measure_{proxy}_{variant}_s']:.0f} s")
        return plans[proxy, variant]

    for proxy in args.proxies:
        plan(proxy)
    any_plan = next(iter(plans.values()))

    results: list[dict] = []
    result = {"model": args.model, "protocol": base["perplexity"]["protocol"],
              "tasks": {t: base[t]["protocol"] for t in tasks},
              "float": {"perplexity": base["perplexity"]["perplexity"],
                        "accuracy": {t: base[t]["acc"] for t in tasks}, "n": {t: base[t]["n"] for t in tasks}},
              "calibration": {"source": args.calib_source, "rows": args.calib_rows, "length": args.calib_length,
                              "eval_text": "BoolQ Wikipedia passages (disjoint from every calibration source)"},
              "timing": timing, "machine": platform.platform(), "runtime": "dequantized to float32",
              "rows": results}

    def evaluate(name: str, alloc: AllocateBits, measured, variant: str) -> dict:
        t = time.perf_counter()
        ir_in = alloc.apply(ir, alloc.choose(measured), measured, ctx)
        q, _ = pl.run(alloc.recipe, ir_in, ctx, progress=False)
        quantize_s = time.perf_counter() - t
        out = ev.evaluate_model(from_nnx(runtime.dequantized_model(q)), evdata, reference=ref)
        sim = out["similarity"]
        bits = [int(q.params[p].bits) for p, m in ir.meta.items() if m.role == "linear" and p in measured.costs]
        row = {"config": name, "variant": variant,
               "bits_per_weight": quant_stats.storage(q)["bits_per_weight"]["quantized_tensors"],
               "perplexity": sim["perplexity"], "kl": sim["kl"], "top1": sim["top1"],
               "accuracy": {t_: out[t_]["acc"] for t_ in tasks}, "stderr": {t_: out[t_]["stderr"] for t_ in tasks},
               "linear_bits": {str(b): bits.count(b) for b in sorted(set(bits))},
               "quantize_s": quantize_s, "seconds": time.perf_counter() - t}
        results.append(row)
        log(f"{name} [{variant}]: bpw {row['bits_per_weight']:.3f} ppl {row['perplexity']:.3f} "
            f"kl {row['kl']:.4f} top1 {row['top1']:.4f} acc {row['accuracy']} linear bits {row['linear_bits']} "
            f"({row['seconds']:.0f} s)")
        write(result, args, tasks)
        return row

    variants = ["plain"] + list(args.variants)
    uniform = {}
    for variant in variants:
        for b in args.uniform:
            alloc = AllocateBits(recipe=recipe(variant, args.embed_bits), bpw=16, choices=(b,), fixed=fixed,
                                 proxy="weight")
            uniform[(variant, b)] = evaluate(f"uniform {b}", alloc, any_plan, variant)
    budgets = list(args.bpw)
    if ("plain", 2) in uniform and ("plain", 3) in uniform:
        budgets.insert(0, 0.5 * (uniform[("plain", 2)]["bits_per_weight"] + uniform[("plain", 3)]["bits_per_weight"]))
    for bpw in budgets:
        for variant in variants:
            for proxy in args.proxies if variant == "plain" else [p for p in args.variant_proxies if p in args.proxies]:
                alloc = AllocateBits(recipe=recipe(variant, args.embed_bits), bpw=bpw, choices=tuple(args.choices),
                                     proxy=proxy, fixed=fixed)
                evaluate(f"allocated {bpw:.3f} ({proxy})", alloc, plan(proxy, variant), variant)
        for seed in range(args.random_seeds):
            alloc = AllocateBits(recipe=recipe("plain", args.embed_bits), bpw=bpw, choices=tuple(args.choices),
                                 fixed=fixed, random_seed=seed)
            evaluate(f"random {bpw:.3f} (seed {seed})", alloc, any_plan, "plain")
    if ("plain", 2) in uniform and ("plain", 3) in uniform:
        lo, hi = math.log(uniform[("plain", 2)]["perplexity"]), math.log(uniform[("plain", 3)]["perplexity"])
        for r in results:
            r["gap_recovered"] = (lo - math.log(r["perplexity"])) / (lo - hi) if lo != hi else None
    write(result, args, tasks)
    return 0


def write(result: dict, args, tasks) -> None:
    write_json(args.json, result)
    if not args.md:
        return
    fl = result["float"]
    head = ("| config | recipe | stored bits/weight | perplexity | KL | top-1 | 2→3 gap recovered |"
            + "".join(f" {t} |" for t in tasks) + " linears per width |")
    lines = [f"# {result['model']}: bit allocation and error feedback", "",
             f"Float: perplexity {fl['perplexity']:.3f}"
             + "".join(f", {t} {fl['accuracy'][t]:.3f} (n={fl['n'][t]})" for t in tasks) + ".", "",
             head, "|" + "---|" * (8 + len(tasks))]
    for r in result["rows"]:
        rec = r.get("gap_recovered")
        acc = "".join(f" {r['accuracy'][t]:.3f} ± {r['stderr'][t]:.3f} |" for t in tasks)
        lines.append(f"| {r['config']} | {r['variant']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} "
                     f"| {r['kl']:.4f} | {r['top1']:.4f} | {'—' if rec is None else f'{rec:.1%}'} |{acc} "
                     f"{r['linear_bits']} |")
    lines += ["", f"Calibration: {result['calibration']}; timing (s): "
              + ", ".join(f"{k} {v:.0f}" for k, v in result["timing"].items()),
              f"Quantized models evaluated {result['runtime']}; machine {result['machine']}."]
    write_text(args.md, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
