"""The perplexity cost of a quantized KV cache (``runtime.kv_bits``) at a long context.

    python benchmarks/kv_cache.py --json kv.json                         # SmolLM2, 2,048 context
    python benchmarks/kv_cache.py --json kv.json --models gemma3-270m --windows 4

For each model (the float model, and with ``--artifact-bits N`` also its data-free CQ N-bit
artifact, cached as in ``decode.py``) it scores ``--windows`` windows of ``--context`` tokens of
the packaged Wikipedia text (consecutive, BOS first, every token after the first scored), reading
every key and value through a fresh KV cache of each width (:func:`cqjax.runtime.cached_logits`):
``none`` (float32), 16 (bfloat16), 8 and 4 bits (:mod:`cqjax.kv_cache`). The float-cache row is the baseline
of the same run. Decode speed with each cache: ``python benchmarks/decode.py --kv-bits none 8 4
--prompt-tokens 2016``.

Output: ``{"machine", "context", "windows", "records": [{"model", "weights", "kv_bits",
"perplexity", "nll", "delta_nll", "kl_to_float_cache", "cache_bytes_per_token", "seconds"}]}``
(``delta_nll`` and ``kl_to_float_cache``: against the same weights with the float cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ("smollm2-135m", "gemma3-270m")


def windows(model: str, context: int, n: int):
    import numpy as np
    from decode import prompt_ids

    ids = prompt_ids(model, context * n)
    return np.asarray(ids[: context * n], np.int32).reshape(n, context)


def _jitted_stats():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def stats(logits, ref_logits, row):
        """``(sum of nll, sum of KL(ref ‖ this))`` over a window's scored positions."""
        logp = jax.nn.log_softmax(logits[:-1], -1)
        ref = jax.nn.log_softmax(ref_logits[:-1], -1)
        nll = -jnp.sum(jnp.take_along_axis(logp, row[1:, None], -1))
        return nll, jnp.sum(jnp.exp(ref) * (ref - logp))

    return stats


def score(model, rows, widths) -> dict:
    """``{kv_bits: (mean nll, mean KL to the float cache, seconds)}``, window by window (the
    float-cache logits of one window at a time are the reference)."""
    import jax.numpy as jnp

    from cqjax import runtime

    stats = _jitted_stats()
    sums = {kv: [0.0, 0.0, 0.0] for kv in widths}
    for row in rows:
        ref = None
        for kv in widths:  # None first
            t0 = time.perf_counter()
            logits = runtime.cached_logits(model, row[None], kv)[0]
            ref = logits if ref is None else ref
            nll, kl = stats(logits, ref, jnp.asarray(row))
            sums[kv][0] += float(nll)
            sums[kv][1] += float(kl)
            sums[kv][2] += time.perf_counter() - t0
    n = rows.shape[0] * (rows.shape[1] - 1)
    return {kv: (a / n, b / n, c) for kv, (a, b, c) in sums.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"], choices=MODELS)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--kv-bits", nargs="+", default=["none", "8", "4"], choices=("none", "16", "8", "4"))
    ap.add_argument("--artifact-bits", type=int, nargs="*", default=[4], help="also the CQ artifacts of these widths")
    ap.add_argument("--embed-bits", type=int, default=4)
    args = ap.parse_args(argv)
    import math

    from common import machine, write_result
    from decode import artifact_dir

    from cqjax import api, data
    from cqjax.io import hf
    from cqjax.kv_cache import cache_bytes_per_token
    from cqjax import runtime

    widths = [None if k == "none" else int(k) for k in args.kv_bits]
    if widths[0] is not None:
        widths = [None] + [w for w in widths if w is not None]  # the baseline runs first
    records = []
    for name in args.models:
        rows = windows(name, args.context, args.windows)
        weights = [("float", lambda: hf.to_model(hf.import_checkpoint(data.model_dir(name))))]
        weights += [(f"cq{b}", lambda b=b: api.load(artifact_dir(name, b, args.embed_bits), verify=False).model)
                    for b in args.artifact_bits]
        for label, build in weights:
            model = build()
            results = score(model, rows, widths)
            for kv, (nll, kl, seconds) in results.items():
                rec = {"model": name, "weights": label, "kv_bits": kv, "perplexity": round(math.exp(nll), 4),
                       "nll": round(nll, 5), "delta_nll": round(nll - results[None][0], 5), "kl_to_float_cache": round(kl, 6),
                       "cache_bytes_per_token": cache_bytes_per_token(runtime.empty_caches(model, 1, 1, kv)),
                       "seconds": round(seconds, 1)}
                print(json.dumps(rec), file=sys.stderr, flush=True)
                records.append(rec)
    write_result(args.json, {"machine": machine(), "context": args.context, "windows": args.windows,
                             "records": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
