"""Model-level quality per stored bit: cqjax recipes vs round-to-nearest on one model.

For each configuration (method × bits, embeddings at ``--embed-bits``): stored bits/weight,
perplexity, KL(float ‖ quantized) and top-1 agreement against the float model on the same
windows, and optionally multiple-choice accuracy. The float model is the baseline, measured in
the same run (its multiple-choice results come from the eval cache when present).

    python benchmarks/quality.py --model smollm2-135m --bits 4 3 2 --methods cq rtn \\
        --max-tokens 16384 --limit 0 --json quality.json --md quality.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

from common import TASKS, load_float

from cqjax import api, data, runtime
from cqjax import eval as ev
from cqjax.eval.scoring import from_nnx
from cqjax.io import hf
from cqjax.io.atomic import write_json, write_text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help=f"packaged model {data.MODELS} or a checkpoint dir")
    ap.add_argument("--methods", nargs="+", default=["cq", "rtn"], choices=["cq", "rtn"])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    ap.add_argument("--embed-bits", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=65536, help="scored perplexity tokens")
    ap.add_argument("--limit", type=int, default=0, help="documents per task (0: no multiple choice)")
    ap.add_argument("--runtime", choices=["dequantized", "packed"], default="dequantized",
                    help="evaluate quantized models with weights decoded once (same function up to "
                         "float rounding, compiles shared with the float model) or the packed runtime")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md")
    args = ap.parse_args(argv)

    directory, ir, model, tok = load_float(args.model)
    tasks = TASKS if args.limit else ()
    cfg = ev.EvalConfig(max_tokens=args.max_tokens, limit=args.limit or None, tasks=tasks, progress=False)
    evdata = ev.prepare(tok, cfg)
    ref = from_nnx(model)
    rows = []
    # Same model id as the CLI's float baseline, so both share the eval cache.
    model_id = f"{args.model}@{hf.checkpoint_fingerprint(directory)}"
    base = ev.evaluate_model(ref, evdata, model_id=model_id)
    rows.append({"method": "float", "bits": 16, "bits_per_weight": 16.0, "model_bits_per_weight": 16.0,
                 "perplexity": base["perplexity"]["perplexity"], "kl": 0.0, "top1": 1.0,
                 **accuracy(base, tasks)})
    print(f"float: ppl {rows[0]['perplexity']:.3f}", file=sys.stderr, flush=True)
    result = {"model": args.model, "protocol": base["perplexity"]["protocol"],
              "tasks": {t: base[t]["protocol"] for t in tasks}, "runtime": args.runtime,
              "machine": {"platform": platform.platform(), "python": platform.python_version()},
              "rows": rows}
    for method in args.methods:
        for bits in args.bits:
            t0 = time.perf_counter()
            q = api.quantize(ir, bits=bits, embed_bits=args.embed_bits, method=method, progress=False)
            qmodel = q.model if args.runtime == "packed" else runtime.dequantized_model(q.ir)
            out = ev.evaluate_model(from_nnx(qmodel), evdata, reference=ref)
            sim = out["similarity"]
            rows.append({"method": method, "bits": bits, "embed_bits": args.embed_bits,
                         "bits_per_weight": q.storage["bits_per_weight"]["quantized_tensors"],
                         "model_bits_per_weight": q.storage["bits_per_weight"]["model"],
                         "perplexity": sim["perplexity"], "kl": sim["kl"], "top1": sim["top1"],
                         **accuracy(out, tasks), "seconds": time.perf_counter() - t0})
            r = rows[-1]
            print(f"{method} {bits}: bpw {r['bits_per_weight']:.3f} ppl {r['perplexity']:.3f} "
                  f"kl {r['kl']:.4f} top1 {r['top1']:.4f} acc {r['accuracy']}", file=sys.stderr, flush=True)
            write(result, args, tasks)  # after every row: a long run keeps what it measured
    write(result, args, tasks)
    return 0


def accuracy(out: dict, tasks) -> dict:
    return {"accuracy": {t: out[t]["acc"] for t in tasks}, "stderr": {t: out[t]["stderr"] for t in tasks},
            "n": {t: out[t]["n"] for t in tasks}}


def write(result: dict, args, tasks) -> None:
    write_json(args.json, result)
    if not args.md:
        return
    n = {t: result["rows"][0]["n"][t] for t in tasks}
    head = ("| method | bits | stored bits/weight (quantized tensors / model) | perplexity | KL | top-1 |"
            + "".join(f" {t} (n={n[t]}) |" for t in tasks))
    lines = [f"# {args.model}: quality per stored bit", "", head, "|" + "---|" * (6 + len(tasks))]
    for r in result["rows"]:
        acc = "".join(f" {r['accuracy'][t]:.3f} ± {r['stderr'][t]:.3f} |" for t in tasks)
        lines.append(f"| {r['method']} | {r['bits']} | {r['bits_per_weight']:.3f} / {r['model_bits_per_weight']:.3f} "
                     f"| {r['perplexity']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} |{acc}")
    lines += ["", f"Quantized models evaluated with the {result['runtime']} runtime.",
              "", "Perplexity protocol: " + json.dumps(result["protocol"], sort_keys=True),
              "", f"Machine: {result['machine']['platform']}"]
    write_text(args.md, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
