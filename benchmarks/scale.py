"""Conversion at scale: throughput, peak memory and kill/resume of a streamed conversion.

    python benchmarks/scale.py --json out/scale.json                  # the full benchmark
    python benchmarks/scale.py --json out/quick.json --layers 2 --packaged ""   # a quick check

``llama-3-8b-shaped``: a synthetic checkpoint with Llama-3-8B's shapes (bf16, seeded random
weights, 4 safetensors shards of ~4 GB, 16 GB in all) is written to ``--workdir`` and converted
data-free (``pipeline=cq``, 3 bits) by :func:`cqjax.stream.convert` in a child process, as
the CLI converts it, without the evaluation (its float model alone would need 16 GB). Then the
same conversion is started again, killed with SIGKILL once half the tensors are written, and
resumed (``resume=True``); ``resume_identical`` compares the resumed artifact's files with the
uninterrupted one's, byte for byte. Everything written is deleted at the end (``--keep``: not).

Packaged models (``--packaged``, default SmolLM2-135M): the CLI main job
``python -m cqjax +model=NAME pipeline=P quant.bits=3 eval=quick`` for ``P`` in
``--packaged-recipes`` (default ``cq cq-ef``), evaluation included, each in its own process;
for ``cq`` and ``cq-ef`` (data-free streamed; calibrated block by block) also a kill at half its
tensors and a ``resume=true`` run in the same run directory.

``qwen2.5-1.5b-shaped`` (``--calibrated-layers``, default 28; 0 skips it): a synthetic checkpoint
with Qwen2.5-1.5B's shapes (bf16, tied embeddings, 3.1 GB) converted by the CLI with
``pipeline=cq-ef`` (self-generated calibration rows, then block by block), ``eval=none``;
``calibration_rows_s`` is the time to sample the rows.

Per record: ``{"model", "recipe", "bytes" (float weights read), "seconds", "mb_s", "peak_rss_mb"
(the child's own peak, from wait4), "resume_s", "resume_identical", ...}``. Baselines measured
in the same run: ``read_mb_s`` (reading every tensor of the checkpoint to float32 in a child
process: the floor a conversion cannot beat) and ``idle_rss_mb`` (the peak of a child that only
imports cqjax and initializes JAX).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

#: Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json).
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
             "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
             "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001}
#: Qwen2.5-1.5B (Qwen/Qwen2.5-1.5B config.json): 1.54B parameters, tied embeddings, q/k/v biases.
QWEN25_15B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
              "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
              "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131072,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
              "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 21,
              "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643}
SHARD_BYTES = 4 << 30


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a llama-style ``cfg`` (qwen2: with q/k/v biases; tied: no ``lm_head``)."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}
        if cfg["model_type"] == "qwen2":
            out |= {p + "self_attn.q_proj.bias": (d,), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,)}
    out["model.norm.weight"] = (d,)
    return out if cfg.get("tie_word_embeddings") else out | {"lm_head.weight": (v, d)}


def write_checkpoint(path: Path, cfg: dict, seed: int = 0) -> int:
    """Writes ``cfg``'s llama checkpoint (bf16, seeded N(0, 0.02) weights, norms 1) in shards of
    ~:data:`SHARD_BYTES`, tensor by tensor; returns its bytes."""
    import ml_dtypes

    from cqjax.io.artifact_writer import safetensors_header

    shapes = llama_shapes(cfg)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    shards, cur, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    shards.append(cur)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        head, order = safetensors_header([(n, bf16, shapes[n], 2 * int(np.prod(shapes[n]))) for n in names],
                                         {"format": "pt"})
        with open(path / file, "wb") as f:
            f.write(head)
            for name, _, shape, _ in order:
                n = int(np.prod(shape))
                if len(shape) == 1:  # norms 1, biases 0
                    f.write((np.zeros if name.endswith(".bias") else np.ones)(n, bf16).tobytes())
                    continue
                for lo in range(0, n, 1 << 24):
                    x = rng.standard_normal(min(1 << 24, n - lo), dtype=np.float32)
                    x *= 0.02
                    f.write(x.astype(bf16).tobytes())
                total += 2 * n
                weight_map[name] = file
        for name in names:
            weight_map[name] = file
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    return sum(2 * int(np.prod(s)) for s in shapes.values())


def run_child(args: list[str], *, kill_when=None, env=None) -> dict:
    """Runs ``args``; returns ``{"seconds", "peak_rss_mb", "rc", "killed", "stdout"}``.

    ``kill_when()`` (polled every 0.2 s) true: the child is sent SIGKILL. The child runs in the
    temp directory, not the caller's: ``python -m cqjax`` started from a checkout's root would
    import the source tree there, which has no compiled extension when cqjax is installed from
    a wheel (as CI installs it)."""
    start = time.perf_counter()
    out = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tempfile.gettempdir())
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if kill_when is not None and not killed and kill_when():
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024,
            "rc": proc.returncode, "killed": killed, "stdout": out.read().decode(errors="replace")[-4000:]}


def digest(directory: Path) -> dict[str, str]:
    out = {}
    for name in ("weights.safetensors", "manifest.json"):
        h = hashlib.sha256()
        with open(directory / name, "rb") as f:
            while chunk := f.read(64 << 20):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


def parts_done(directory: Path) -> int:
    from cqjax.io.artifact_writer import partial_dir

    parts = partial_dir(directory)
    return len(list(parts.glob("[0-9]*.json"))) if parts.is_dir() else 0


def child_convert(src: str, out: str, bits: int, resume: bool) -> None:
    """The conversion a child process runs: what the CLI does for a data-free recipe, without
    evaluation (import lazily, stream into the artifact)."""
    from cqjax import pipeline, recipes, stream
    from cqjax.io import hf

    ir = hf.import_checkpoint(src)
    recipe = recipes.recipe("cq", bits=bits)
    stream.convert(recipe, ir, out, ctx=pipeline.Context(rng_seed=0), resume=resume,
                   key=hf.checkpoint_fingerprint(Path(src)),
                   extra={"recipe": {"method": "cq", "bits": bits}}, progress=True)


def child_read(src: str) -> None:
    """Reads every tensor to float32 (the baseline)."""
    from cqjax.io import hf
    from cqjax.ir import materialize
    from cqjax.stream import BLOCK_PARAMS

    ir = hf.import_checkpoint(src)
    for path, meta in ir.meta.items():
        leaf = ir.params[path]
        if len(meta.shape) == 2 and np.prod(meta.shape) > BLOCK_PARAMS:
            rows = leaf.reader()  # in row blocks, as the conversion reads it
            step = max(1, BLOCK_PARAMS // rows.shape[1])
            for lo in range(0, rows.shape[0], step):
                np.asarray(rows[lo:lo + step], np.float32).sum()
        else:
            np.asarray(materialize(leaf), np.float32).sum()


def child_idle() -> None:
    import jax.numpy as jnp

    import cqjax  # noqa: F401

    jnp.zeros(4).block_until_ready()


def check_disk(work: Path, cfg: dict, factor: float, what: str, hint: str) -> None:
    """Exits unless ``work`` has ``factor`` times ``cfg``'s bf16 checkpoint + 1 GB free."""
    need = factor * 2 * sum(int(np.prod(s)) for s in llama_shapes(cfg).values()) + (1 << 30)
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"scale.py: {work} has {free / 1e9:.1f} GB free; {what} need ~{need / 1e9:.1f} GB{hint}")


def synthetic(args, work: Path) -> list[dict]:
    cfg = {**LLAMA3_8B, "num_hidden_layers": args.layers}
    src = work / "llama-3-8b-shaped"
    check_disk(work, cfg, 1.6, f"the {args.layers}-layer checkpoint and two artifacts", " (use --workdir or --layers)")
    t = time.perf_counter()
    nbytes = write_checkpoint(src, cfg)
    write_s = time.perf_counter() - t
    print(f"wrote {src} ({nbytes / 1e9:.2f} GB) in {write_s:.0f} s", flush=True)
    me = [sys.executable, __file__]
    read = run_child([*me, "--child", "read", str(src)])
    once = run_child([*me, "--child", "convert", str(src), str(work / "once"), "--bits", str(args.bits)])
    if once["rc"]:
        raise SystemExit(f"conversion failed:\n{once['stdout']}")
    n = len(llama_shapes(cfg))
    killed = run_child([*me, "--child", "convert", str(src), str(work / "resumed"), "--bits", str(args.bits)],
                       kill_when=lambda: parts_done(work / "resumed") >= n // 2)
    at = parts_done(work / "resumed")
    resumed = run_child([*me, "--child", "convert", str(src), str(work / "resumed"), "--bits", str(args.bits),
                         "--resume"])
    if resumed["rc"]:
        raise SystemExit(f"resumed conversion failed:\n{resumed['stdout']}")
    record = {"model": "llama-3-8b-shaped", "recipe": f"cq {args.bits}-bit (data-free, streamed)",
              "layers": args.layers, "tensors": n, "bytes": nbytes, "seconds": once["seconds"],
              "mb_s": nbytes / 1e6 / once["seconds"], "peak_rss_mb": once["peak_rss_mb"],
              "killed_after_tensors": at, "kill_signal": "SIGKILL" if killed["killed"] else None,
              "resume_s": resumed["seconds"], "resume_peak_rss_mb": resumed["peak_rss_mb"],
              "resume_identical": killed["killed"] and digest(work / "once") == digest(work / "resumed"),
              "artifact_bytes": (work / "once" / "weights.safetensors").stat().st_size,
              "baseline": {"read_s": read["seconds"], "read_mb_s": nbytes / 1e6 / read["seconds"],
                           "read_peak_rss_mb": read["peak_rss_mb"], "checkpoint_write_s": write_s},
              "targets": {"mb_s": 100, "peak_rss_mb": 3000}}
    print(json.dumps(record), flush=True)
    return [record]


def packaged(args, work: Path) -> list[dict]:
    from cqjax import data

    out = []
    for name in args.packaged:
        src = data.model_dir(name)
        nbytes = sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))
        for recipe in args.packaged_recipes:
            cmd = [sys.executable, "-m", "cqjax", f"+model={name}", f"pipeline={recipe}", f"quant.bits={args.bits}",
                   "eval=quick", "report.plots=false"]
            run_dir = work / f"{name}-{recipe}"
            once = run_child([*cmd, f"hydra.run.dir={run_dir}"])
            if once["rc"]:
                raise SystemExit(f"{name} {recipe} failed:\n{once['stdout']}")
            report = json.loads((run_dir / "report.json").read_text())
            quantize_s = report["timings"].get("quantize")
            record = {"model": name, "recipe": f"{recipe} {args.bits}-bit, eval=quick (CLI)", "bytes": nbytes,
                      "seconds": once["seconds"], "quantize_s": quantize_s,
                      "mb_s": nbytes / 1e6 / quantize_s if quantize_s else None,
                      "peak_rss_mb": once["peak_rss_mb"], "timings": report["timings"],
                      "perplexity": report["evals"].get("perplexity", {}).get("quantized"),
                      "resume_s": None, "resume_identical": None}
            if recipe in ("cq", "cq-ef"):
                again = work / f"{name}-{recipe}-resumed"
                n = len(json.loads((run_dir / "artifact" / "manifest.json").read_text())["tensors"])
                killed = run_child([*cmd, f"hydra.run.dir={again}"],
                                   kill_when=lambda: parts_done(again / "artifact") >= n // 2)
                resumed = run_child([*cmd, f"hydra.run.dir={again}", "resume=true"])
                if resumed["rc"]:
                    raise SystemExit(f"{name} resume failed:\n{resumed['stdout']}")
                record |= {"resume_s": resumed["seconds"], "resume_peak_rss_mb": resumed["peak_rss_mb"],
                           "resume_identical": killed["killed"] and
                           digest(run_dir / "artifact") == digest(again / "artifact")}
            record["targets"] = {"peak_rss_mb": 1000 if recipe == "cq" else 1500}
            print(json.dumps(record), flush=True)
            out.append(record)
    return out


def calibrated(args, work: Path) -> list[dict]:
    """``qwen2.5-1.5b-shaped`` (bf16, seeded random weights) through the CLI with the calibrated
    recipe (``pipeline=cq-ef``, self-generated calibration rows, block-by-block conversion),
    without evaluation; the tokenizer files are SmolLM2's (only its BOS id is used)."""
    from cqjax import data

    cfg = {**QWEN25_15B, "num_hidden_layers": args.calibrated_layers}
    src = work / "qwen2.5-1.5b-shaped"
    check_disk(work, cfg, 1.5, "the 1.5B-shaped checkpoint and its artifact", " (use --workdir)")
    nbytes = write_checkpoint(src, cfg, seed=1)
    for f in Path(data.model_dir("smollm2-135m")).glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, src / f.name)
    run_dir = work / "qwen-cq-ef"
    once = run_child([sys.executable, "-m", "cqjax", "+model=hf", f"model.path={src}", "pipeline=cq-ef",
                      f"quant.bits={args.bits}", "eval=none", "report.plots=false", f"hydra.run.dir={run_dir}"])
    if once["rc"]:
        raise SystemExit(f"qwen2.5-1.5b-shaped cq-ef failed:\n{once['stdout']}")
    report = json.loads((run_dir / "report.json").read_text())
    record = {"model": "qwen2.5-1.5b-shaped", "recipe": f"cq-ef {args.bits}-bit, eval=none (CLI)",
              "layers": args.calibrated_layers, "parameters": report["parameters"], "bytes": nbytes,
              "seconds": once["seconds"], "quantize_s": report["timings"].get("quantize"),
              "calibration_rows_s": report["calibration"]["tokens_s"],
              "calibration_tokens": report["calibration"]["tokens"],
              "mb_s": nbytes / 1e6 / report["timings"]["quantize"], "peak_rss_mb": once["peak_rss_mb"],
              "timings": report["timings"], "resume_s": None, "resume_identical": None,
              "targets": {"peak_rss_mb": 4000, "calibration_rows_s": 300}}
    print(json.dumps(record), flush=True)
    return [record]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--workdir", default=None, help="where the checkpoint and artifacts go (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=LLAMA3_8B["num_hidden_layers"],
                    help="layers of the synthetic checkpoint (32: Llama-3-8B)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--packaged", nargs="*", default=["smollm2-135m"], help="packaged models (cqjax.data)")
    ap.add_argument("--packaged-recipes", nargs="*", default=["cq", "cq-ef"])
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--calibrated-layers", type=int, default=QWEN25_15B["num_hidden_layers"],
                    help="layers of the 1.5B-shaped checkpoint converted with cq-ef (0: skip it; 28: Qwen2.5-1.5B)")
    ap.add_argument("--keep", action="store_true", help="keep what was written")
    args = ap.parse_args(argv)
    args.packaged = [p for p in args.packaged if p]
    work = Path(tempfile.mkdtemp(prefix="cqjax-scale-", dir=args.workdir))
    try:
        idle = run_child([sys.executable, __file__, "--child", "idle"])
        records = (([] if args.no_synthetic else synthetic(args, work)) + packaged(args, work)
                   + (calibrated(args, work) if args.calibrated_layers else []))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "scale", "machine": machine(), "idle_rss_mb": idle["peak_rss_mb"], "records": records}
    write_result(args.json, result)
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "convert":
            child_convert(rest[0], rest[1], int(rest[rest.index("--bits") + 1]), "--resume" in rest)
        elif kind == "read":
            child_read(rest[0])
        else:
            child_idle()
    else:
        main()
