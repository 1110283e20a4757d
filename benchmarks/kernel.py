"""CQ lookup-matmul kernel vs XLA's dense f32 dot vs the pure-JAX path, weights streamed.

``python benchmarks/kernel.py --json OUT.json [--quick] [--e2e] [--kl]``

Each record (one per shape, bits, batch, threads)::

  {"shape": [N, K], "bits", "batch", "threads", "kernel_us", "xla_f32_us", "jax_ref_us",
   "weight_bytes", "read_bw_gbs", "bandwidth_fraction", "path", "layers"}

* ``weight_bytes``: packed bytes the kernel reads per layer (codes + fp16 norms).
* Weights are **streamed**: each measurement cycles through enough distinct layers that their
  bytes exceed the last-level cache several times (``--stream-mb``), for the kernel and for
  XLA's f32 weights alike; the time is per layer call (dispatch included).
* ``read_bw_gbs``: measured in the same run at the same thread count, the higher of a C++
  streaming-read loop and XLA's f32 matvec streamed over distinct weights (its bytes / time).
* ``bandwidth_fraction = weight_bytes / kernel time / read_bw_gbs``.
* ``xla_f32_us``: ``x @ W`` with W stored ``[in, out]`` (XLA's fast layout); ``jax_ref_us``:
  the pure-JAX path of :class:`cqjax.kernels.qarrays.CQArray` (rotate, decode, einsum), jitted,
  on fewer layers and repetitions (it is 100x slower).
* Threads: each thread count runs in a child process pinned to that many CPUs
  (``sched_setaffinity`` before JAX starts), so XLA's pool and the kernel both get exactly them.

The kernel path (``avx512vbmi``/``avx512``/``avx2``/``neon_dot``/``neon``/``ref``) is recorded
per record; the kernel quantizes activations to int8 (``--kl`` measures what that costs at model
level). Also a ``chained`` record: 4096x4096 layers applied in sequence inside one jit.
``--e2e`` adds greedy-decode tokens/s of SmolLM2-135M (float, CQ 4 and 2 bits through the
kernel and through pure JAX) and, when ``llama-cpp-python`` is installed (``setup_peers.sh``),
llama.cpp on the same model at F32, Q4_K_M and Q2_K with the same prompt, tokens and threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

SHAPES = [(576, 1536), (1536, 576), (2048, 8192), (4096, 4096), (8192, 2048)]  # [N, K]
BITS = [1, 2, 3, 4]
BATCHES = [1, 4, 16, 64]
THREADS = [1, 2]


def _llc_bytes() -> int:
    try:
        txt = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
        return int(txt[:-1]) * (1024 if txt.endswith("K") else 1024 * 1024)
    except (OSError, ValueError):
        return 32 << 20


def _best_per_call(fn, layers, reps: int) -> float:
    """Best over ``reps`` passes of the mean seconds per call while cycling through ``layers``."""
    out = None
    for layer in layers[: min(2, len(layers))]:  # warm up (compile)
        out = fn(*layer)
    out.block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for layer in layers:
            out = fn(*layer)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t) / len(layers))
    return best


def child(args) -> list[dict]:
    """Runs in a process pinned to ``args.threads`` CPUs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cqjax import _ffi, _xla_ext
    from cqjax.formats import cq as fmt
    from cqjax.kernels.qarrays import CQArray
    from cqjax.formats import rotation

    threads = args.threads
    _ffi.set_kernel_threads(threads)
    stream = max(args.stream_mb << 20, 2 * _llc_bytes())
    rng = np.random.default_rng(0)
    path = _ffi.active_kernel_path()
    records = []
    cpp_bw = _xla_ext.stream_read_gbs(max(stream, 256 << 20), threads, 5)
    f32_bw = 0.0

    dot = jax.jit(lambda x, w: x @ w)
    kern = {}

    def kernel_fn(bits, blocks):
        key = (bits, blocks)
        if key not in kern:
            kern[key] = jax.jit(lambda x, *w: _ffi.cq_matmul(x, *w, bits=bits, blocks=blocks))
        return kern[key]

    ref = jax.jit(lambda q, x: q._dot_rows_jnp(x))
    shapes = [tuple(s) for s in json.loads(args.shapes)]
    for N, K in shapes:
        nf32 = max(2, -(-stream // (N * K * 4)))
        wf = [jnp.asarray(rng.standard_normal((K, N), dtype=np.float32)) for _ in range(nf32)]
        f32_us = {}
        for batch in args.batches:
            x = jnp.asarray(rng.standard_normal((batch, K)), jnp.float32)
            t = _best_per_call(dot, [(x, w) for w in wf], args.reps)
            f32_us[batch] = t * 1e6
            if batch == 1:
                f32_bw = max(f32_bw, N * K * 4 / t / 1e9)
        del wf
        read_bw = max(cpp_bw, f32_bw)
        for bits in args.bits:
            blocks = fmt.block_plan(K)
            kpad = sum(blocks)
            wbytes = N * (kpad * bits // 8 + 2 * len(blocks))
            nl = max(2, -(-stream // wbytes))
            cb = np.tile(np.sort(rng.standard_normal(1 << bits)), (len(blocks), 1)).astype(np.float16)
            rot = rotation.make_rotation(K, blocks, 0)
            rot_ops = (jnp.asarray(cb), jnp.asarray(rot.s1), jnp.asarray(rot.s2), jnp.asarray(rot.perm))
            layers = []
            for _ in range(nl):
                codes = jnp.asarray(rng.integers(0, 256, (N, kpad * bits // 8), dtype=np.uint8))
                norms = jnp.asarray((rng.random((N, len(blocks))) + 0.5).astype(np.float16))
                layers.append((codes, norms, *rot_ops))
            q = CQArray(codes=layers[0][0], norms=layers[0][1], codebooks=rot_ops[0], s1=rot_ops[1],
                        s2=rot_ops[2], perm=rot_ops[3], bits=bits, blocks=blocks, K=K, transposed=True)
            f = kernel_fn(bits, blocks)
            for batch in args.batches:
                x = jnp.asarray(rng.standard_normal((batch, K)), jnp.float32)
                t = _best_per_call(f, [(x, *w) for w in layers], args.reps)
                jr = None
                if not args.no_ref:
                    jr = _best_per_call(ref, [(q, x)], 2) * 1e6
                records.append({
                    "shape": [N, K], "bits": bits, "batch": batch, "threads": threads,
                    "kernel_us": round(t * 1e6, 2), "xla_f32_us": round(f32_us[batch], 2),
                    "jax_ref_us": None if jr is None else round(jr, 2), "weight_bytes": wbytes,
                    "read_bw_gbs": round(read_bw, 2),
                    "bandwidth_fraction": round(wbytes / t / 1e9 / read_bw, 4),
                    "path": path, "layers": nl, "cpp_read_bw_gbs": round(cpp_bw, 2),
                    "xla_f32_read_bw_gbs": round(f32_bw, 2),
                })
                print(json.dumps(records[-1]), file=sys.stderr, flush=True)
            del layers
    if args.chain:
        records += chained(args, threads, path, max(cpp_bw, f32_bw))
    return records


def chained(args, threads, path, read_bw) -> list[dict]:
    """4096x4096 layers applied in sequence inside one jit (no per-call dispatch)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cqjax import _ffi
    from cqjax.formats import cq as fmt
    from cqjax.formats import rotation

    rng = np.random.default_rng(1)
    N = K = 4096
    out = []
    blocks = fmt.block_plan(K)
    rot = rotation.make_rotation(K, blocks, 0)
    for bits in args.bits:
        wbytes = N * (K * bits // 8 + 2 * len(blocks))
        nl = max(4, -(-(max(args.stream_mb << 20, 2 * _llc_bytes())) // wbytes))
        cb = jnp.asarray(np.tile(np.sort(rng.standard_normal(1 << bits)), (len(blocks), 1)).astype(np.float16))
        ws = [(jnp.asarray(rng.integers(0, 256, (N, K * bits // 8), dtype=np.uint8)),
               jnp.asarray((rng.random((N, len(blocks))) + 0.5).astype(np.float16))) for _ in range(nl)]

        @jax.jit
        def chain(x, ws):
            for codes, norms in ws:
                y = _ffi.cq_matmul(x, codes, norms, cb, rot.s1, rot.s2, rot.perm, bits=bits, blocks=blocks)
                x = y * (1.0 / 64.0)
            return x

        x = jnp.asarray(rng.standard_normal((1, K)), jnp.float32)
        chain(x, ws).block_until_ready()
        best = float("inf")
        for _ in range(args.reps):
            t = time.perf_counter()
            chain(x, ws).block_until_ready()
            best = min(best, (time.perf_counter() - t) / nl)
        out.append({"shape": [N, K], "bits": bits, "batch": 1, "threads": threads, "chained": True,
                    "kernel_us": round(best * 1e6, 2), "weight_bytes": wbytes, "layers": nl,
                    "read_bw_gbs": round(read_bw, 2),
                    "bandwidth_fraction": round(wbytes / best / 1e9 / read_bw, 4), "path": path})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def e2e(args) -> dict:
    """Greedy decode tokens/s, SmolLM2-135M: float vs CQ 4/2 bits (kernel and pure JAX)."""
    import jax
    import numpy as np

    from cqjax import api, data, runtime
    from cqjax.io import hf
    from cqjax.kernels import backend

    directory = data.model_dir("smollm2-135m")
    ir = hf.import_checkpoint(directory)
    prompt = np.arange(1, 17, dtype=np.int32)[None, :] + 100
    res = {"model": "smollm2-135m", "prompt_tokens": 16, "new_tokens": args.e2e_tokens, "rows": []}

    def tps(model, mode):
        # runtime caches its jitted decode step per model structure, and the kernel mode is
        # read at trace time: start each mode from empty caches.
        runtime._decode_step.cache_clear()
        jax.clear_caches()
        with backend.use_kernel(mode):
            # compile: the same cache size as the timed run (the KV cache holds prompt + new tokens)
            runtime.generate(model, prompt, max_new_tokens=args.e2e_tokens)
            best = float("inf")
            for _ in range(3):  # best of 3, as for llama.cpp below
                t = time.perf_counter()
                runtime.generate(model, prompt, max_new_tokens=args.e2e_tokens)
                best = min(best, time.perf_counter() - t)
            return args.e2e_tokens / best

    res["rows"].append({"model": "float", "mode": "jax", "tokens_per_s": round(tps(hf.to_model(ir), "jax"), 2)})
    print(json.dumps(res["rows"][-1]), file=sys.stderr, flush=True)
    for bits in (4, 2):
        q = api.quantize(ir, bits=bits, embed_bits=4, progress=False)
        for mode in ("ffi", "jax"):
            res["rows"].append({"model": f"cq{bits}", "mode": mode, "tokens_per_s": round(tps(q.model, mode), 2)})
            print(json.dumps(res["rows"][-1]), file=sys.stderr, flush=True)
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        res["llama_cpp"] = "not installed (bash benchmarks/setup_peers.sh)"
        return res
    for ftype in ("F32", "Q4_K_M", "Q2_K"):
        tps_, stored = llama_tps(ftype, prompt[0], args.e2e_tokens)
        res["rows"].append({"model": f"llama.cpp {ftype}", "mode": "llama.cpp", "tokens_per_s": round(tps_, 2),
                            "bits_per_weight": round(stored["bits_per_weight"], 3),
                            "tensor_types": stored["tensor_types"]})
        print(json.dumps(res["rows"][-1]), file=sys.stderr, flush=True)
    return res


def llama_tps(ftype: str, prompt, new_tokens: int) -> tuple[float, dict]:
    """Greedy decode tokens/s of llama.cpp on the same model (its F32 GGUF quantized to ``ftype``),
    same prompt, token count and threads (all CPUs, as the cqjax rows), prompt included; and the
    file's stored bits/weight and tensor types (k-quants fall back to other types where a row
    length is not a multiple of 256, as SmolLM2's 576 is)."""
    import peer_llamacpp as lc
    from llama_cpp import Llama

    from cqjax import data

    work = lc.work_dir("smollm2-135m")
    path = lc.float_f32(data.gguf_path("smollm2-135m"), work / "float-f32.gguf")
    if ftype != "F32":
        path = lc.quantize(path, work / f"{ftype}.gguf", ftype, os.cpu_count())
    llm = Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=os.cpu_count(),
                n_threads_batch=os.cpu_count(), verbose=False)

    def run() -> float:
        t = time.perf_counter()
        for n, _ in enumerate(llm.generate([int(x) for x in prompt], top_k=1, temp=0.0, reset=True), 1):
            if n == new_tokens:
                break
        return time.perf_counter() - t

    run()  # warm-up
    return new_tokens / min(run() for _ in range(3)), lc.storage(path)


def kl(args) -> dict:
    """Mean per-token KL(pure JAX || kernel) of CQ SmolLM2-135M on real text (same weights)."""
    from transformers import AutoTokenizer

    from cqjax import api, data
    from cqjax.eval.scoring import BoundForward, from_nnx
    from cqjax.eval.similarity import similarity
    from cqjax.eval.windows import prepare_windows
    from cqjax.io import hf
    from cqjax.kernels import backend

    directory = data.model_dir("smollm2-135m")
    ir = hf.import_checkpoint(directory)
    windows = prepare_windows(AutoTokenizer.from_pretrained(directory), max_tokens=args.kl_tokens)
    out = {"model": "smollm2-135m", "tokens": args.kl_tokens, "rows": []}

    def with_mode(bound, mode):
        def fn(params, tokens, mask):
            with backend.use_kernel(mode):
                return bound.fn(params, tokens, mask)
        return BoundForward(fn, bound.params)

    for bits in args.kl_bits:
        q = api.quantize(ir, bits=bits, embed_bits=4, progress=False)
        b = from_nnx(q.model)
        r = similarity(with_mode(b, "ffi"), with_mode(b, "jax"), windows, progress=False)
        out["rows"].append({"bits": bits, "embed_bits": 4, "kl_jax_vs_kernel": r.kl, "top1": r.top1,
                            "ppl_kernel": r.perplexity, "ppl_jax": r.ref_perplexity})
        print(json.dumps(out["rows"][-1]), file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true", help="4096x4096 and 576x1536 only, batch 1 and 16")
    ap.add_argument("--shapes", default=json.dumps(SHAPES))
    ap.add_argument("--bits", type=int, nargs="+", default=BITS)
    ap.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    ap.add_argument("--threads-list", type=int, nargs="+", default=THREADS)
    ap.add_argument("--stream-mb", type=int, default=96, help="bytes of distinct layers per measurement")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-ref", action="store_true", help="skip the (slow) pure-JAX timings")
    ap.add_argument("--no-chain", dest="chain", action="store_false")
    ap.add_argument("--no-kernel", action="store_true", help="skip the kernel records (only --kl/--e2e)")
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--e2e-tokens", type=int, default=32)
    ap.add_argument("--kl", action="store_true", help="model-level KL of the int8 kernel vs pure JAX")
    ap.add_argument("--kl-bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--kl-tokens", type=int, default=4096)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes = json.dumps([(4096, 4096), (576, 1536)])
        args.batches = [1, 16]
    if args.child:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
        recs = child(args)
        with open(args.json, "w") as f:
            json.dump(recs, f)
        return 0
    records = []
    for threads in [] if args.no_kernel else args.threads_list:
        tmp = args.json + f".t{threads}.tmp"
        cmd = [sys.executable, __file__, "--child", "1", "--threads", str(threads), "--json", tmp,
               "--shapes", args.shapes, "--stream-mb", str(args.stream_mb), "--reps", str(args.reps),
               "--bits", *map(str, args.bits), "--batches", *map(str, args.batches)]
        if args.no_ref:
            cmd.append("--no-ref")
        if not args.chain:
            cmd.append("--no-chain")
        subprocess.run(cmd, check=True)
        with open(tmp) as f:
            records += json.load(f)
        os.remove(tmp)
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
              "records": records}
    if args.kl:
        result["kl"] = kl(args)
    if args.e2e:
        result["e2e"] = e2e(args)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
