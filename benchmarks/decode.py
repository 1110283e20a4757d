"""Prefill and decode speed of cqjax against llama.cpp on the same weights, one record per
engine and configuration.

    python benchmarks/decode.py --json decode.json                      # SmolLM2, threads 1 and 2
    python benchmarks/decode.py --json d.json --models gemma3-270m --threads 1

Every configuration runs in its own subprocess pinned with ``taskset`` to ``threads`` cores
(llama.cpp with ``n_threads = n_threads_batch = threads``; cqjax with the ``runtime.threads``
setting, :func:`cqjax.runtime.set_threads`), so a peer that crashes is recorded as crashed and
the run goes on, and ``peak_rss_mb`` is that process's own peak. Both engines read the same
prompt (the first ``--prompt-tokens`` tokens of a packaged text), generate ``--new-tokens``
greedy tokens and report the best of ``--reps`` timed runs after one warm-up:
``prefill_tok_s = prompt_tokens / (time to the first new token)`` and
``decode_tok_s = (new_tokens - 1) / (time of the remaining tokens)``.

cqjax configurations: ``float-jax`` (the float model), ``cqN-kernel`` (CQ N bits through the
C++ FFI kernel, ``CQJAX_KERNEL=ffi``) and ``cqN-jax`` (the same artifact in pure JAX, the path
TPU and GPU hosts run), all through the same jitted decode step (:class:`cqjax.runtime.Decoder`),
each with every KV cache of ``--kv-bits`` (``16``, the default: bfloat16, as llama.cpp's default
float16 cache, read by the C++ attention kernel; ``none``: float32; ``8``/``4``:
:mod:`cqjax.kv_cache`).
CQ artifacts are quantized once with the data-free recipe (linears at N bits, embeddings and the
tied head at ``--embed-bits``) and cached. llama.cpp (``bash benchmarks/setup_peers.sh``)
quantizes the model's F32 GGUF to ``F32``, ``Q4_0``, ``Q4_K_M`` and ``Q2_K``.

Output: ``{"machine": ..., "records": [{"engine", "model", "config", "bits_per_weight",
"threads", "prompt_tokens", "new_tokens", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"}, ...]}``
(cqjax records also carry ``kv_bits``: 16, or null for a float32 cache)
(a crashed or failed configuration has ``"status"`` and ``"error"`` instead of speeds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CQ_CONFIGS = ("float-jax", "cq4-kernel", "cq3-kernel", "cq2-kernel", "cq4-jax", "cq3-jax", "cq2-jax")
LLAMA_CONFIGS = ("F32", "Q4_0", "Q4_K_M", "Q2_K")
MODELS = ("smollm2-135m", "gemma3-270m")


def prompt_ids(model: str, n: int) -> list[int]:
    """The first ``n`` tokens of the packaged Wikipedia text, BOS first if the model has one."""
    from cqjax import data
    from cqjax.api import load_tokenizer
    from cqjax.eval import texts

    tok = load_tokenizer(data.model_dir(model))
    ids = tok(texts.load_text("wikipedia").text[: 16 * n], add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    if len(bos) + len(ids) < n:
        raise ValueError(f"the packaged text has only {len(ids)} tokens for a {n}-token prompt")
    return (bos + ids)[:n]


def artifact_dir(model: str, bits: int, embed_bits: int) -> Path:
    """A cached CQ artifact of ``model`` (data-free recipe), written on first use."""
    from cqjax import api, data

    d = data.registry.cache_dir() / "bench" / f"{model}-cq{bits}-e{embed_bits}"
    if not (d / "manifest.json").exists():
        api.save(api.quantize(data.model_dir(model), bits=bits, embed_bits=embed_bits, progress=False), d)
    return d


def time_run(first_and_rest) -> tuple[float, float]:
    """``(seconds to the first token, seconds of the remaining ones)`` of one generation."""
    t0 = time.perf_counter()
    it = first_and_rest()
    next(it)
    t1 = time.perf_counter()
    for _ in it:
        pass
    return t1 - t0, time.perf_counter() - t1


def cqjax_child(args) -> dict:
    from cqjax import runtime

    runtime.set_threads(args.threads)
    import numpy as np

    from cqjax import api, data
    from cqjax.io import hf
    from cqjax.kernels import backend

    if args.config == "float-jax":
        model, bpw, mode = hf.to_model(hf.import_checkpoint(data.model_dir(args.model))), 32.0, "jax"  # float32
    else:
        bits, mode = int(args.config[2]), ("ffi" if args.config.endswith("kernel") else "jax")
        q = api.load(artifact_dir(args.model, bits, args.embed_bits), verify=False)
        model, bpw = q.model, q.storage["bits_per_weight"]["quantized_tensors"]
    backend.set_kernel(mode)
    prompt = np.asarray([args.prompt], np.int32)

    def generation():
        dec = runtime.Decoder(model, batch=1, max_len=prompt.shape[1] + args.new_tokens, kv_bits=args.kv_bit)
        nxt = dec.prefill(prompt)
        yield nxt
        for _ in range(args.new_tokens - 1):
            nxt = dec.step(nxt)
            yield nxt

    time_run(generation)  # compiles the prefill and the step
    runs = [time_run(generation) for _ in range(args.reps)]
    return {"bits_per_weight": round(float(bpw), 3), **speeds(args, runs)}


def llama_file(model: str, config: str) -> Path:
    """The model's F32 GGUF (the packaged GGUF dequantized), quantized to ``config``; cached."""
    import peer_llamacpp as lc

    from cqjax import data

    work = lc.work_dir(model)
    path = lc.float_f32(data.gguf_path(model), work / "float-f32.gguf")
    return path if config == "F32" else lc.quantize(path, work / f"{config}.gguf", config, os.cpu_count())


def llama_child(args) -> dict:
    import peer_llamacpp as lc
    from llama_cpp import Llama

    path = llama_file(args.model, args.config)
    llm = Llama(model_path=str(path), n_ctx=len(args.prompt) + args.new_tokens + 8, n_batch=512,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)

    def generation():
        llm.reset()  # else generate() reuses the previous run's cached prompt and skips the prefill
        for n, tok in enumerate(llm.generate(args.prompt, top_k=1, temp=0.0, reset=True), 1):
            yield tok
            if n == args.new_tokens:
                return

    time_run(generation)
    runs = [time_run(generation) for _ in range(args.reps)]
    bpw = 32.0 if args.config == "F32" else lc.storage(path)["bits_per_weight"]  # storage() counts floats at 16
    return {"bits_per_weight": round(bpw, 3), **speeds(args, runs)}


def speeds(args, runs: list[tuple[float, float]]) -> dict:
    first = min(r[0] for r in runs)
    rest = min(r[1] for r in runs)
    return {"prefill_tok_s": round(len(args.prompt) / first, 2),
            "decode_tok_s": round((args.new_tokens - 1) / rest, 2) if args.new_tokens > 1 else None,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``; ``ru_maxrss`` would carry the parent's peak
    across the fork and exec that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_one(args, engine: str, model: str, config: str, threads: int, prompt: list[int],
            kv_bits: int | None = None) -> dict:
    """One configuration in a ``taskset``-pinned subprocess; a crash or error becomes a record."""
    rec = {"engine": engine, "model": model, "config": config, "threads": threads,
           "prompt_tokens": len(prompt), "new_tokens": args.new_tokens}
    if engine == "cqjax":
        rec["kv_bits"] = kv_bits
    out = Path(args.json + f".{engine}.{config}.t{threads}.kv{kv_bits}.part")
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))[:threads]))
    cmd = ["taskset", "-c", cpus, sys.executable, __file__, "--child", engine, "--json", str(out),
           "--model", model, "--config", config, "--threads", str(threads), "--new-tokens", str(args.new_tokens),
           "--reps", str(args.reps), "--embed-bits", str(args.embed_bits), "--prompt", json.dumps(prompt)]
    cmd += ["--kv-bit", str(kv_bits)] if kv_bits is not None else []
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not out.exists():
        status = f"crashed (signal {-proc.returncode})" if proc.returncode < 0 else f"failed (exit {proc.returncode})"
        rec.update(status=status, error=proc.stderr.strip().splitlines()[-3:])
    else:
        rec.update(json.loads(out.read_text()))
        out.unlink()
    print(json.dumps(rec), file=sys.stderr, flush=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"], choices=MODELS)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CQ_CONFIGS), help=f"cqjax: {CQ_CONFIGS}")
    ap.add_argument("--llama", nargs="*", default=list(LLAMA_CONFIGS), help=f"llama.cpp types: {LLAMA_CONFIGS}")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--embed-bits", type=int, default=4, help="CQ width of embeddings and the tied head")
    ap.add_argument("--kv-bits", nargs="+", default=["16"], choices=("none", "16", "8", "4"),
                    help="cqjax KV cache widths to run each configuration with (none: float32; default 16, "
                         "bfloat16, as llama.cpp's default float16 cache)")
    ap.add_argument("--kv-bit", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=("cqjax", "llama.cpp"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", type=json.loads, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.threads = args.threads[0]
        rec = (cqjax_child if args.child == "cqjax" else llama_child)(args)
        tmp = args.json + ".tmp"
        Path(tmp).write_text(json.dumps(rec))
        os.replace(tmp, args.json)
        return 0
    bad = [c for c in args.configs if c not in CQ_CONFIGS] + [c for c in args.llama if c not in LLAMA_CONFIGS]
    if bad:
        ap.error(f"unknown configurations {bad}; cqjax: {CQ_CONFIGS}, llama.cpp: {LLAMA_CONFIGS}")
    import importlib.util

    have_llama = importlib.util.find_spec("llama_cpp") is not None
    records = []
    for model in args.models:
        prompt = prompt_ids(model, args.prompt_tokens)
        for bits in sorted({int(c[2]) for c in args.configs if c.startswith("cq")}):
            artifact_dir(model, bits, args.embed_bits)  # quantize once, outside the timed children
        for config in args.llama if have_llama else []:
            llama_file(model, config)
        for threads in args.threads:
            for config in args.configs:
                for kv in args.kv_bits:
                    records.append(run_one(args, "cqjax", model, config, threads, prompt,
                                           None if kv == "none" else int(kv)))
            for config in args.llama if have_llama else []:
                records.append(run_one(args, "llama.cpp", model, config, threads, prompt))
    from common import machine, write_result

    write_result(args.json, {"machine": machine(),
                             "llama_cpp": "installed" if have_llama else "not installed (bash benchmarks/setup_peers.sh)",
                             "records": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
