"""Conversion speed of the data-free recipe on a real model: seconds per pass, MB/s of input
weights, peak RSS, and stored bits/weight; writes JSON.

    python benchmarks/convert.py                       # SmolLM2-135M, CQ 3-bit, embed 4
    python benchmarks/convert.py --bits 2 3 4 --json out/convert.json
    python benchmarks/convert.py --model /path/to/checkpoint --method rtn

MB/s is input bytes / total pipeline seconds, with input bytes counted two ways: the eligible
tensors at bf16 (2 bytes/param, the headline figure) and at their source dtype. The baseline
measured in the same run is reading the eligible tensors (materializing the lazy leaves).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a cqjax.data model name or a checkpoint dir")
    ap.add_argument("--bits", type=int, nargs="+", default=[3])
    ap.add_argument("--embed-bits", type=int, default=4)
    ap.add_argument("--method", default="cq", choices=["cq", "rtn"])
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import jax

    from cqjax import data, pipeline, quant_stats
    from cqjax.io import hf
    from cqjax.ir import materialize
    from cqjax.quant_stats import is_eligible
    from cqjax.recipes import recipe

    path = args.model if os.path.isdir(args.model) else data.model_dir(args.model)
    ir = hf.import_checkpoint(path)
    eligible = [p for p, m in ir.meta.items() if is_eligible(p, m)]
    n_params = sum(int(np.prod(ir.meta[p].shape)) for p in eligible)
    src_bytes = sum(int(np.prod(ir.meta[p].shape)) * np.dtype(_np_dtype(ir.meta[p].dtype)).itemsize for p in eligible)
    bf16_bytes = 2 * n_params

    start = time.perf_counter()  # baseline: just reading the eligible tensors
    for p in eligible:
        np.asarray(materialize(ir.params[p]), np.float32).sum()
    read_s = time.perf_counter() - start

    runs = []
    for bits in args.bits:
        pipe = recipe(args.method, bits=bits, embed_bits=args.embed_bits, block=args.block)
        qir, report = pipeline.run(pipe, ir, progress=False)
        total = sum(r["seconds"] for r in report)
        st = quant_stats.storage(qir)
        runs.append({"bits": bits, "embed_bits": args.embed_bits, "method": args.method, "seconds": total,
                     "passes": {r["name"]: r["seconds"] for r in report},
                     "mb_per_s_bf16": bf16_bytes / total / 1e6, "mb_per_s_source": src_bytes / total / 1e6,
                     "bits_per_weight": st["bits_per_weight"], "bytes": st["bytes"]})
        print(f"{args.method} {bits}-bit (embed {args.embed_bits}): {total:.2f} s "
              f"({', '.join(f'{k} {v:.2f}' for k, v in runs[-1]['passes'].items())}) -> "
              f"{runs[-1]['mb_per_s_bf16']:.0f} MB/s bf16, {runs[-1]['mb_per_s_source']:.0f} MB/s source; "
              f"{st['bits_per_weight']['quantized_tensors']:.3f} bits/weight "
              f"({st['bits_per_weight']['model']:.3f} whole model)", flush=True)
        del qir
    result = {"model": str(path), "eligible_params": n_params, "input_bytes": {"bf16": bf16_bytes, "source": src_bytes},
              "baseline_read_seconds": read_s, "runs": runs, "peak_rss_mb": peak_rss_mb(),
              "machine": {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                          "platform": platform.platform(), "processor": platform.processor(),
                          "python": sys.version.split()[0], "numpy": np.__version__, "jax": jax.__version__}}
    print(f"read baseline {read_s:.2f} s; peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    if args.json:
        from cqjax.io.atomic import write_json

        write_json(args.json, result)
    return result


def _np_dtype(name: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


if __name__ == "__main__":
    main()
