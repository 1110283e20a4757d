"""Side by side with the peers: quality per stored bit in one harness.

Every method starts from the same float model (the packaged GGUF dequantized), is scored on the
same tokens with the same scorers (perplexity, KL and top-1 against the float model on the
BoolQ Wikipedia windows; optionally multiple choice), and is charged with cqjax's stored
bits/weight definition (``cqjax.quant_stats``: every eligible tensor, codes + scales + zeros +
norms + codebooks, float tensors at 16 bits):

=============  ===============================================================================
method         configurations
=============  ===============================================================================
cqjax          uniform 2/3/4 (data-free), the same with error feedback (rotated basis),
               allocated budgets (Fisher proxy, error feedback): halfway between uniform 2/3
               and 3/4, ``--budgets`` (4.5 and 5.0; widths {2, 3, 4, 8}; with
               ``--allocate-embeddings`` also over the embeddings), 4-bit with 8-bit
               embeddings
rtn            round-to-nearest, blocks of 128 and 64 (fp16 scale + zero per block)
gptq           GPTQ on the RTN grid, block 128 (our pass; no rotation)
hqq            HQQ at 2/3/4 bits, groups 64 and 128, on the linears
qwix           Qwix (JAX) weight-only PTQ at 2/3/4 bits, tiles of 64 and 128, on the linears
llama.cpp      F32 (a check of the harness), Q2_K, Q3_K_M, Q4_K_M, Q4_0 via ``llama_model_quantize``
=============  ===============================================================================

Embedding policy: cqjax, rtn and gptq rows store embeddings and the LM head at 4 bits with their
own method (``--embed-bits``); HQQ and Qwix quantize linears only, so their rows use cqjax's 4-bit CQ
embeddings (identical to the cqjax rows'); llama.cpp picks its own types per tensor (its file's
bytes are counted).

Grid alignment: the float weights were dequantized from a ~4-bit llama.cpp grid, which some
formats can represent almost exactly. For each data-free configuration, the relative weight
error on the linears ``Σ‖w − ŵ‖² / Σ‖w‖²`` is measured on the model and on Gaussian data of the
same shapes and per-tensor standard deviations; a ratio below ``--grid-ratio`` flags the row
``grid_aligned`` (its quality says little about real float models). Calibrated rows inherit the
flag of their grid (gptq: rtn at the same bits and block; cqjax error feedback: cqjax uniform).

    bash benchmarks/setup_peers.sh
    python benchmarks/peers.py --model smollm2-135m --out peers-smollm2

writes ``DIR/peers.json``, ``DIR/peers.md`` and ``DIR/pareto.png``; a rerun with the same
``--out`` keeps the rows already measured under the same protocol (``--fresh`` to redo them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from common import TASKS, add_calibration_args, load_float, recipe

from cqjax import data, quant_stats, runtime
from cqjax import eval as ev
from cqjax import pipeline as pl
from cqjax.eval.scoring import from_nnx
from cqjax.io import hf
from cqjax.io.atomic import write_json, write_text
from cqjax.ir import materialize
from cqjax.kernels.qarrays import is_quantized
from cqjax.ir import EMBED_ROLES
from cqjax.passes.common import rows_of

METHODS = ("cqjax", "rtn", "gptq", "hqq", "qwix", "llama.cpp")


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def linear_paths(ir) -> list[str]:
    return [p for p, m in ir.meta.items() if m.role == "linear" and len(m.shape) == 2]


def gaussian_ir(ir, seed: int = 0):
    """``ir`` with every linear replaced by N(0, its std) of the same shape (the grid check)."""
    rng = np.random.default_rng(seed)
    params = dict(ir.params)
    for p in linear_paths(ir):
        w = np.asarray(materialize(ir.params[p]), np.float32)
        params[p] = (rng.standard_normal(w.shape, np.float32) * np.float32(w.std()))
    return ir.replace(params=params)


def linear_error(float_ir, q_ir) -> float:
    """``Σ‖w − ŵ‖² / Σ‖w‖²`` over the linears of a quantized IR."""
    dequantize = quant_stats.dequantizer()
    return quant_stats.pooled_rel_error(
        quant_stats.error_sums(materialize(float_ir.params[p]),
                               dequantize(leaf) if is_quantized(leaf) else materialize(leaf))
        for p in linear_paths(float_ir) for leaf in [q_ir.params[p]])


class Harness:
    """Scores models against the float reference and keeps ``peers.json`` up to date."""

    def __init__(self, args, ir, model, tok, directory):
        self.args, self.ir, self.out = args, ir, Path(args.out)
        self.tasks = TASKS if args.limit else ()
        self.evdata = ev.prepare(tok, ev.EvalConfig(max_tokens=args.max_tokens, tasks=self.tasks,
                                                    limit=args.limit or None, progress=False))
        self.ref = from_nnx(model)
        base = ev.evaluate_model(self.ref, self.evdata, model_id=f"{args.model}@{hf.checkpoint_fingerprint(directory)}")
        protocol = {"perplexity": base["perplexity"]["protocol"], "tasks": {t: base[t]["protocol"] for t in self.tasks},
                    "bits_per_weight": "cqjax.quant_stats: eligible tensors, all side data, float at 16 bits",
                    "grid_ratio": args.grid_ratio, "embed_bits": args.embed_bits,
                    "calibration": {"source": args.calib_source, "rows": args.calib_rows, "length": args.calib_length}}
        self.result = {"model": args.model, "protocol": protocol,
                       "float": {"perplexity": base["perplexity"]["perplexity"],
                                 "accuracy": {t: base[t]["acc"] for t in self.tasks}},
                       "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "rows": []}
        old = self.out / "peers.json"
        if old.exists() and not args.fresh:
            prev = json.loads(old.read_text())
            if prev.get("model") == args.model and prev.get("protocol") == protocol:
                self.result["rows"] = prev["rows"]
                log(f"resuming: {len(prev['rows'])} rows from {old}")
        self._gaussian = None

    @property
    def gaussian(self):
        """The grid check's IR: every linear replaced by Gaussian data (drawn once)."""
        if self._gaussian is None:
            self._gaussian = gaussian_ir(self.ir)
        return self._gaussian

    def row(self, method: str, config: str) -> dict | None:
        return next((r for r in self.result["rows"] if r["method"] == method and r["config"] == config), None)

    def done(self, method: str, config: str) -> bool:
        return self.row(method, config) is not None

    def grid(self, method: str, config: str) -> dict | None:
        """The weight error (model / Gaussian) of a data-free row, for calibrated rows on its grid."""
        r = self.row(method, config)
        return r["weight_error"] if r else None

    def score(self, method: str, config: str, forward, bits_per_weight: float, weight_error: dict | None,
              seconds: float, **extra) -> None:
        t = time.perf_counter()
        out = ev.evaluate_model(forward, self.evdata, reference=self.ref)
        sim = out["similarity"]
        ratio = weight_error["ratio"] if weight_error else None
        row = {"method": method, "config": config, "bits_per_weight": bits_per_weight,
               "perplexity": sim["perplexity"], "kl": sim["kl"], "top1": sim["top1"],
               "accuracy": {t_: out[t_]["acc"] for t_ in self.tasks},
               "grid_aligned": bool(ratio is not None and ratio < self.args.grid_ratio),
               "weight_error": weight_error, "quantize_s": seconds, "score_s": time.perf_counter() - t, **extra}
        self.result["rows"].append(row)
        log(f"{method} {config}: bpw {bits_per_weight:.3f} ppl {row['perplexity']:.3f} kl {row['kl']:.4f} "
            f"top1 {row['top1']:.4f} grid ratio {'—' if ratio is None else f'{ratio:.2f}'} "
            f"({seconds:.0f} + {row['score_s']:.0f} s)")
        self.write()

    def score_ir(self, method: str, config: str, q_ir, seconds: float, weight_error: dict | None, **extra) -> None:
        bpw = quant_stats.storage(q_ir)["bits_per_weight"]["quantized_tensors"]
        self.score(method, config, from_nnx(runtime.dequantized_model(q_ir)), bpw, weight_error, seconds, **extra)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "peers.json", self.result)
        write_text(self.out / "peers.md", markdown(self.result))
        plot(self.result, self.out / "pareto.png")


def weight_error(real: float, gauss: float) -> dict:
    return {"model": real, "gaussian": gauss, "ratio": real / gauss if gauss > 0 else None}


def data_free(h: Harness, method: str, config: str, make) -> None:
    """Quantize with pipeline ``make()`` (no calibration), measure the grid check, score."""
    if h.done(method, config):
        return
    t = time.perf_counter()
    q, _ = pl.run(make(), h.ir, progress=False)
    seconds = time.perf_counter() - t
    gq, _ = pl.run(make(), h.gaussian, progress=False)
    we = weight_error(linear_error(h.ir, q), linear_error(h.gaussian, gq))
    h.score_ir(method, config, q, seconds, we)


def run_rtn_gptq(h: Harness, ctx, bits_list, methods) -> None:
    from cqjax import recipes

    e = h.args.embed_bits
    for bits in bits_list:
        for block in (128, 64):
            if "rtn" in methods:
                data_free(h, "rtn", f"{bits}-bit block {block}",
                          lambda bits=bits, block=block: recipes.recipe("rtn", bits=bits, embed_bits=e, block=block))
        if "gptq" in methods and not h.done("gptq", f"{bits}-bit block 128"):
            t = time.perf_counter()
            q, _ = pl.run(recipes.recipe("gptq", bits=bits, embed_bits=e, block=128), h.ir, ctx(), progress=False)
            h.score_ir("gptq", f"{bits}-bit block 128", q, time.perf_counter() - t,
                       h.grid("rtn", f"{bits}-bit block 128"), grid="rtn (same bits, block 128)")


def run_cqjax(h: Harness, ctx, bits_list) -> None:
    from cqjax import recipes
    from cqjax.passes.allocate import AllocateBits

    e = h.args.embed_bits
    for bits in bits_list:
        data_free(h, "cqjax", f"{bits}-bit", lambda bits=bits: recipes.recipe("cq", bits=bits, embed_bits=e))
    plans: dict = {}  # one Fisher measurement (widths 2/3/4/8) per embedding policy serves every allocation
    measured = recipe("rotated", e)  # allocations measure the recipe they run (error feedback)

    def calibrated(config: str, make_input, embed_bits: int = e) -> None:
        """Error feedback (rotated basis) on the IR that ``make_input(ctx)`` returns."""
        if h.done("cqjax", config):
            return
        t = time.perf_counter()
        c = ctx()
        ir_in = make_input(c)
        if ir_in is None:
            return
        q, _ = pl.run(measured if embed_bits == e else recipe("rotated", embed_bits), ir_in, c, progress=False)
        bits = [int(q.params[p].bits) for p in linear_paths(h.ir)]
        grid = h.grid("cqjax", f"{max(set(bits), key=bits.count)}-bit")
        h.score_ir("cqjax", config, q, time.perf_counter() - t, grid, grid="cqjax uniform (same majority width)",
                   linear_bits={str(b): bits.count(b) for b in sorted(set(bits))},
                   embedding_bits={p: int(q.params[p].bits) for p, m in h.ir.meta.items()
                                   if m.role in EMBED_ROLES and is_quantized(q.params[p])})

    def allocated(bpw: float, choices: tuple[int, ...], embed_bits: int = e, free_embeddings: bool = False):
        """The float IR with widths allocated to ``bpw``; embeddings fixed at ``embed_bits``, or
        allocated like the linears if ``free_embeddings``."""
        def make(c):
            fixed = None if free_embeddings else {f"role:{r}": e for r in EMBED_ROLES}
            alloc = AllocateBits(recipe=measured, bpw=bpw, choices=choices, proxy="fisher", fixed=fixed)
            if free_embeddings not in plans:
                t = time.perf_counter()
                plans[free_embeddings] = AllocateBits(recipe=measured, bpw=16, choices=(2, 3, 4, 8), proxy="fisher",
                                                      fixed=fixed).plan(h.ir, c)
                h.result["fisher_measure_s" + ("_with_embeddings" if free_embeddings else "")] = \
                    time.perf_counter() - t
            p = plans[free_embeddings]
            reach = alloc.reach(p)
            if not reach[0] <= bpw <= reach[1] and bpw < 16:
                log(f"skipping bpw={bpw:.2f}: widths {choices} reach {reach[0]:.3f}..{reach[1]:.3f} bits/weight")
                return None
            choice = {**alloc.choose(p), **{path: embed_bits for path in p.fixed}}
            return alloc.apply(h.ir, choice, p, c)
        return make

    for bits in bits_list:
        calibrated(f"{bits}-bit +ef", allocated(16, (bits,)))
    sizes = {b: r["bits_per_weight"] for r in h.result["rows"] if r["method"] == "cqjax"
             for b in bits_list if r["config"] == f"{b}-bit"}
    for a, b in ((2, 3), (3, 4)):
        if a in sizes and b in sizes:
            bpw = 0.5 * (sizes[a] + sizes[b])
            calibrated(f"allocated {bpw:.2f} +ef", allocated(bpw, (2, 3, 4)))
    for bpw in h.args.budgets:
        calibrated(f"allocated {bpw:.2f} +ef (2/3/4/8)", allocated(bpw, (2, 3, 4, 8)))
        if h.args.allocate_embeddings:
            calibrated(f"allocated {bpw:.2f} +ef (2/3/4/8, embeddings too)",
                       allocated(bpw, (2, 3, 4, 8), free_embeddings=True))
    calibrated("4-bit +ef, 8-bit embeddings", allocated(16, (4,), embed_bits=8), embed_bits=8)


def run_linear_peer(h: Harness, method: str, quantize, bits_list) -> None:
    """A peer that quantizes the linears only (``quantize(rows, bits, group) -> (decoded, bytes)``:
    HQQ, Qwix), at each of ``bits_list`` with groups of 64 and 128; its rows use cqjax's CQ
    embeddings at ``--embed-bits`` (identical to the cqjax rows')."""
    from cqjax import recipes

    embeddings = tuple(f"role:{r}" for r in EMBED_ROLES)
    emb, _ = pl.run(pl.masked(recipes.recipe("cq", bits=4, embed_bits=h.args.embed_bits), embeddings), h.ir,
                    progress=False, strict=False)
    gauss = h.gaussian
    for bits in bits_list:
        for group in (64, 128):
            config = f"{bits}-bit group {group}"
            if h.done(method, config):
                continue
            t = time.perf_counter()
            params = {p: emb.params[p] for p, m in h.ir.meta.items() if m.role in EMBED_ROLES}
            nbytes, sums = {}, {"model": [], "gaussian": []}
            for p in linear_paths(h.ir):
                for which, src in (("model", h.ir), ("gaussian", gauss)):
                    rows, transposed = rows_of(src.params[p], h.ir.meta[p])
                    try:
                        w_hat, n = quantize(rows, bits, group)
                    except (AssertionError, RuntimeError, ValueError) as err_:
                        raise RuntimeError(f"{method} {config}: cannot quantize {p} {rows.shape}: {err_}") from err_
                    sums[which].append(quant_stats.error_sums(rows, w_hat))
                    if which == "model":
                        params[p], nbytes[p] = (w_hat.T if transposed else w_hat), n
            seconds = time.perf_counter() - t
            q_ir = h.ir.replace(params={**h.ir.params, **params})
            rows_ = quant_stats.tensors(q_ir, external=nbytes)
            bpw = quant_stats.storage(q_ir, rows_)["bits_per_weight"]["quantized_tensors"]
            h.score(method, config, from_nnx(runtime.dequantized_model(q_ir)), bpw,
                    weight_error(*(quant_stats.pooled_rel_error(v) for v in sums.values())), seconds,
                    embeddings=f"cqjax CQ {h.args.embed_bits}-bit")


def run_llamacpp(h: Harness, work: Path, ftypes) -> None:
    import peer_llamacpp as lc

    src = data.gguf_path(h.args.model) if h.args.model in data.MODELS else None
    if src is None:
        raise SystemExit(f"peers: llama.cpp rows need a packaged model's GGUF ({data.MODELS}); got {h.args.model!r}")
    f32 = lc.float_f32(src, work / "float-f32.gguf")
    gauss = lc.gaussian_f32(src, work / "gaussian-f32.gguf")
    n_ctx = max(h.evdata.config.context, max(h.evdata.config.buckets) if h.tasks else 0)
    for ftype in ("F32",) + tuple(ftypes):
        if h.done("llama.cpp", ftype):
            continue
        t = time.perf_counter()
        if ftype == "F32":
            path, we = f32, None
        else:
            path = lc.quantize(f32, work / f"{ftype}.gguf", ftype, h.args.threads)
            g = lc.quantize(gauss, work / f"gaussian-{ftype}.gguf", ftype, h.args.threads)
            we = weight_error(lc.weight_error(f32, path), lc.weight_error(gauss, g))
        seconds = time.perf_counter() - t
        st = lc.storage(path)
        runner = lc.Runner(path, n_ctx=n_ctx, threads=h.args.threads)
        elig = quant_stats.storage(h.ir)["params"]["eligible"]
        if st["params"] != elig:
            raise RuntimeError(f"{path}: {st['params']} 2-D parameters vs {elig} eligible in cqjax's IR")
        h.score("llama.cpp", ftype, runner.forward(), st["bits_per_weight"], we, seconds,
                tensor_types=st["tensor_types"])
        del runner


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help=f"packaged model {data.MODELS}")
    ap.add_argument("--out", required=True, help="output directory (peers.json, peers.md, pareto.png)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--llama-types", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M", "Q4_0"])
    ap.add_argument("--embed-bits", type=int, default=4)
    ap.add_argument("--budgets", nargs="*", type=float, default=[4.5, 5.0],
                    help="allocated budgets (stored bits/weight) with widths 2/3/4/8 to match the peers' sizes")
    ap.add_argument("--allocate-embeddings", action="store_true",
                    help="also allocate each budget over the embeddings (else fixed at --embed-bits): "
                         "matters where they are most of the model, e.g. Gemma 3 270M")
    ap.add_argument("--max-tokens", type=int, default=4096, help="scored perplexity tokens")
    ap.add_argument("--limit", type=int, default=0, help="documents per multiple-choice task (0: none)")
    ap.add_argument("--grid-ratio", type=float, default=0.5,
                    help="flag grid_aligned when weight error on the model / on Gaussian data is below this")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in DIR/peers.json")
    add_calibration_args(ap)
    args = ap.parse_args(argv)

    missing = [m for m, mod in (("hqq", "hqq"), ("qwix", "qwix"), ("llama.cpp", "llama_cpp"))
               if m in args.methods and not _has(mod)]
    if missing:
        raise SystemExit(f"peers: {', '.join(missing)} not installed; run `bash benchmarks/setup_peers.sh` "
                         f"or leave them out with --methods")
    directory, ir, model, tok = load_float(args.model)
    h = Harness(args, ir, model, tok, directory)
    calib = {}

    def ctx():
        if "c" not in calib:
            from cqjax.calib import calibrate

            c = calibrate(model, ir, tok, {"hessian", "fisher"}, source=args.calib_source, rows=args.calib_rows,
                          length=args.calib_length)
            log(f"calibration: {c.describe()}")
            h.result["calibration_s"] = c.timing
            calib["c"] = pl.Context(calibration=c, log=log)
        return calib["c"]

    if "cqjax" in args.methods:
        run_cqjax(h, ctx, args.bits)
    if {"rtn", "gptq"} & set(args.methods):
        run_rtn_gptq(h, ctx, args.bits, args.methods)
    if "hqq" in args.methods:
        import peer_hqq

        run_linear_peer(h, "hqq", peer_hqq.quantize, args.bits)
    if "qwix" in args.methods:
        import peer_qwix

        run_linear_peer(h, "qwix", peer_qwix.quantize, args.bits)
    if "llama.cpp" in args.methods:
        import peer_llamacpp

        run_llamacpp(h, peer_llamacpp.work_dir(args.model), args.llama_types)
    h.write()
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def verdicts(result: dict) -> list[dict]:
    """For each non-grid-aligned peer row: cqjax's best perplexity at the same or fewer bits/weight."""
    ours = [r for r in result["rows"] if r["method"] == "cqjax"]
    out = []
    for r in result["rows"]:
        if r["method"] == "cqjax" or r["grid_aligned"] or r["bits_per_weight"] >= 15.99:
            continue
        fit = [o for o in ours if o["bits_per_weight"] <= r["bits_per_weight"] + 1e-9]
        best = min(fit, key=lambda o: o["perplexity"]) if fit else None
        out.append({"peer": f"{r['method']} {r['config']}", "bits_per_weight": r["bits_per_weight"],
                    "perplexity": r["perplexity"], "cqjax": best and best["config"],
                    "cqjax_bits_per_weight": best and best["bits_per_weight"],
                    "cqjax_perplexity": best and best["perplexity"],
                    "wins": bool(best and best["perplexity"] <= r["perplexity"])})
    return out


def markdown(result: dict) -> str:
    tasks = list(result["float"]["accuracy"])
    fl = result["float"]
    lines = [f"# {result['model']}: cqjax vs peers at matched stored bits/weight", "",
             f"Float (the dequantized GGUF): perplexity {fl['perplexity']:.3f}"
             + "".join(f", {t} {a:.3f}" for t, a in fl["accuracy"].items()) + ".", "",
             "| method | config | stored bits/weight | perplexity | KL | top-1 |" + "".join(f" {t} |" for t in tasks)
             + " weight error (model / Gaussian) | grid aligned |",
             "|" + "---|" * (8 + len(tasks))]
    for r in sorted(result["rows"], key=lambda r: (r["bits_per_weight"], r["perplexity"])):
        we = r.get("weight_error")
        wes = "—" if not we else f"{we['model']:.4f} / {we['gaussian']:.4f} ({we['ratio']:.2f})"
        if we and r.get("grid"):  # a calibrated row: the figures are its grid's
            wes = f"grid of {r['grid']}: ratio {we['ratio']:.2f}"
        lines.append(f"| {r['method']} | {r['config']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} "
                     f"| {r['kl']:.4f} | {r['top1']:.4f} |" + "".join(f" {r['accuracy'][t]:.3f} |" for t in tasks)
                     + f" {wes} | {'yes' if r['grid_aligned'] else 'no'} |")
    lines += ["", "## cqjax's best at the same or fewer bits/weight, per non-grid-aligned peer row", "",
              "| peer | bits/weight | perplexity | cqjax config | bits/weight | perplexity | cqjax at or below |",
              "|---|---|---|---|---|---|---|"]
    for v in verdicts(result):
        c = ("— | — | —" if v["cqjax"] is None else
             f"{v['cqjax']} | {v['cqjax_bits_per_weight']:.3f} | {v['cqjax_perplexity']:.3f}")
        lines.append(f"| {v['peer']} | {v['bits_per_weight']:.3f} | {v['perplexity']:.3f} | {c} "
                     f"| {'yes' if v['wins'] else 'no'} |")
    lines += ["", "Protocol: " + json.dumps(result["protocol"], sort_keys=True),
              f"Machine: {result['machine']}"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Perplexity and KL vs stored bits/weight, one line (its Pareto front) per method; hollow
    markers are grid-aligned rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("perplexity", "kl")):
        for i, method in enumerate(METHODS):
            rows = [r for r in result["rows"] if r["method"] == method and r["bits_per_weight"] < 15.99]
            if not rows:
                continue
            color = f"C{i}"
            front, best = [], math.inf
            for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
                if not r["grid_aligned"] and r[key] < best:
                    front.append(r)
                    best = r[key]
            ax.plot([r["bits_per_weight"] for r in front], [max(r[key], 1e-6) for r in front], "-", color=color,
                    label=method)
            for r in rows:
                ax.plot(r["bits_per_weight"], max(r[key], 1e-6), "o", color=color,
                        mfc="none" if r["grid_aligned"] else color)
        if key == "perplexity":
            ax.axhline(result["float"]["perplexity"], color="gray", ls=":", label="float")
        ax.set_yscale("log")
        ax.set_xlabel("stored bits/weight")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"{result['model']}: quality per stored bit (hollow: grid-aligned)")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
