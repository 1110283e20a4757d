"""Output error of GPTQ error feedback vs the plain passes on real layers; writes JSON.

    python benchmarks/gptq_layers.py                          # SmolLM2-135M, layer 5 + q/down of 0, 20
    python benchmarks/gptq_layers.py --layers 5 --extra-layers --bits 2 3 --json out/gptq.json

Runs the float model over ``--calib`` sequences of ``--seq`` tokens (BOS + text) of SQuAD
paragraphs (not in the default ``wikipedia`` perplexity text), capturing ``H = E[x xᵀ]`` of the
inputs of the chosen linears, then ``--heldout`` further sequences for an evaluation Hessian.
Per kernel, bit width and method it reports the relative output error
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` on the held-out and the calibration Hessian, and the seconds the
pass took (the baseline passes are timed in the same run).

Methods: ``pack`` (Rotate → FitCodebook → Pack), ``ef_rotated`` / ``ef_unrotated``
(:class:`cqjax.passes.gptq.ErrorFeedbackPack` on the same rotated leaf), ``rtn``
(RoundToNearest) and ``gptq_rtn`` (:class:`cqjax.passes.gptq.GPTQRoundToNearest`);
``awq`` / ``awq_ef_rotated`` / ``awq_rtn`` (:class:`cqjax.passes.awq.ActivationScale`
searching ``--awq-grid`` exponents on the calibration Hessian around the CQ recipe, the CQ
recipe with rotated-basis error feedback, and RoundToNearest; the row records the chosen
``awq_alpha``). ``--methods`` picks a subset.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

METHODS = ("pack", "rtn", "ef_rotated", "ef_unrotated", "gptq_rtn", "awq", "awq_ef_rotated", "awq_rtn")
KERNELS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
           "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


def decode_rows(leaf) -> np.ndarray:
    """float64 rows ``[N, K]`` of a CQ or RTN leaf, decoded in NumPy."""
    from cqjax.formats import cq as fmt
    from cqjax.formats import rtn
    from cqjax.kernels.qarrays import CQArray
    from cqjax.passes import codebook_core, rtn_core
    from cqjax.formats.rotation import Rotation, unrotate_rows_np

    if isinstance(leaf, CQArray):
        codes = fmt.unpack_codes(np.asarray(leaf.codes), leaf.bits, sum(leaf.blocks))
        rows = codebook_core.dequantize_rows(codes, np.asarray(leaf.norms), leaf.blocks,
                                             list(np.asarray(leaf.codebooks, np.float32)))
        rot = Rotation(leaf.blocks, leaf.seed, np.asarray(leaf.s1), np.asarray(leaf.s2), np.asarray(leaf.perm))
        rows = unrotate_rows_np(rows.astype(np.float64), rot, leaf.K)
    else:
        codes = fmt.unpack_codes(np.asarray(leaf.codes), leaf.bits, rtn.kpad(leaf.K))[:, : leaf.K]
        rows = rtn_core.rtn_dequantize(codes, np.asarray(leaf.scales), np.asarray(leaf.zeros),
                                       leaf.blocks[0]).astype(np.float64)
    if getattr(leaf, "in_scale", None) is not None:  # the leaf stands for decode(codes) / s
        rows = rows / np.asarray(leaf.in_scale, np.float64)
    return rows


def capture_hessians(model, kernels: dict[int, str], seqs: np.ndarray) -> dict[str, tuple[np.ndarray, int]]:
    """``{path: (sum of x xᵀ, tokens)}`` over ``seqs [n, T]`` for the kernels (by array id)."""
    from cqjax.models import layers

    sums: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    original = layers.matmul

    def recording(x, kernel):
        path = kernels.get(id(kernel))
        if path is not None:
            v = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            sums[path] = sums.get(path, 0) + v.T @ v
            count[path] = count.get(path, 0) + v.shape[0]
        return original(x, kernel)

    layers.matmul = recording
    try:
        for s in seqs:
            model(s[None])
    finally:
        layers.matmul = original
    return {p: (sums[p], count[p]) for p in sums}


def rel_output_error(w: np.ndarray, q: np.ndarray, H: np.ndarray) -> float:
    d = w - q
    return float(np.einsum("ij,jk,ik->", d, H, d) / np.einsum("ij,jk,ik->", w, H, w))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="*", default=[5], help="layers with all seven kernels")
    ap.add_argument("--extra-layers", type=int, nargs="*", default=[0, 20], help="layers with q_proj and down_proj")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--percdamp", type=float, nargs="+", default=[0.01],
                    help="damping values (the error-feedback methods run once per value)")
    ap.add_argument("--hessians", default=None,
                    help="an .npz cache of the captured Hessians: read if it exists (written by a run "
                         "with the same text options and a superset of the kernels), else written")
    ap.add_argument("--methods", nargs="+", default=None, help=f"a subset of {METHODS}")
    ap.add_argument("--awq-grid", type=int, default=11, help="exponents searched by the awq methods")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    unknown = sorted(set(args.methods or ()) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {METHODS}")

    from flax import nnx
    from transformers import AutoTokenizer

    from cqjax import data
    from cqjax.eval.texts import squad_paragraphs
    from cqjax.io import atomic, hf
    from cqjax.ir import IR, materialize
    from cqjax.passes.awq import ActivationScale
    from cqjax.passes.cq import FitCodebook, Pack, Rotate
    from cqjax.passes.gptq import ErrorFeedbackPack, GPTQRoundToNearest
    from cqjax.passes.rtn import RoundToNearest
    from cqjax.pipeline import Context, named_chain

    path = args.model if os.path.isdir(args.model) else data.model_dir(args.model)
    ir = hf.import_checkpoint(path)
    model = hf.to_model(ir)
    tok = AutoTokenizer.from_pretrained(path)
    ids = np.asarray(tok("\n\n".join(squad_paragraphs()), add_special_tokens=False)["input_ids"], np.int32)
    n_seq, body = args.calib + args.heldout, args.seq - 1
    if len(ids) < n_seq * body:
        raise SystemExit(f"text has {len(ids)} tokens, need {n_seq * body}")
    seqs = np.concatenate([np.full((n_seq, 1), tok.bos_token_id, np.int32),
                           ids[: n_seq * body].reshape(n_seq, body)], axis=1)

    paths = [f"layers/{i}/{k}/kernel" for i in args.layers for k in KERNELS]
    paths += [f"layers/{i}/{k}/kernel" for i in args.extra_layers for k in ("self_attn/q_proj", "mlp/down_proj")]
    by_id = {}
    for key, var in nnx.to_flat_state(nnx.state(model)):
        p = "/".join(map(str, key))
        if p in paths:
            by_id[id(var.get_value())] = p
    t0 = time.perf_counter()
    if args.hessians and os.path.exists(args.hessians):
        with np.load(args.hessians, allow_pickle=False) as f:
            cal = {p: (f[f"cal:{p}"], int(f[f"ncal:{p}"])) for p in paths}
            held = {p: (f[f"held:{p}"], int(f[f"nheld:{p}"])) for p in paths}
    else:
        cal = capture_hessians(model, by_id, seqs[: args.calib])
        held = capture_hessians(model, by_id, seqs[args.calib:])
        if args.hessians:
            arrays = {}
            for p in paths:
                arrays.update({f"cal:{p}": cal[p][0], f"ncal:{p}": cal[p][1], f"held:{p}": held[p][0],
                               f"nheld:{p}": held[p][1]})
            np.savez(args.hessians, **arrays)
    capture_s = time.perf_counter() - t0
    print(f"Hessians of {len(cal)} kernels from {args.calib}+{args.heldout} x {args.seq} tokens in {capture_s:.1f}s",
          flush=True)

    rows = []
    for p in paths:
        H_cal, n_cal = cal[p][0] / cal[p][1], cal[p][1]
        H_held = held[p][0] / held[p][1]
        kern = np.asarray(materialize(ir.params[p]), np.float32)
        meta = ir.meta[p]
        w = kern.T.astype(np.float64)
        ctx = Context(calibration={p: {"hessian": H_cal, "tokens": n_cal}})
        for bits in args.bits:
            r, m = Rotate().rewrite(p, kern, meta, ctx)
            r, m = FitCodebook(bits=bits).rewrite(p, r, m, ctx)
            methods = [("pack", None, lambda d: Pack().rewrite(p, r, m, ctx)),
                       ("rtn", None, lambda d: RoundToNearest(bits=bits).rewrite(p, kern, meta, ctx))]
            one = IR(ir.family, ir.config, {p: kern}, {p: meta})

            def awq(recipe, one=one, ctx=ctx, p=p):
                out = ActivationScale(grid=args.awq_grid, recipe=recipe)(one, ctx)
                return out.params[p], out.meta[p]

            def cq_recipe(pack, bits=bits):
                return named_chain(("rotate", Rotate()), ("codebook", FitCodebook(bits=bits)), ("pack", pack))

            methods += [("awq", None, lambda d: awq(cq_recipe(Pack()))),
                        ("awq_rtn", None, lambda d: awq(RoundToNearest(bits=bits)))]
            for damp in args.percdamp:
                methods += [
                    ("ef_rotated", damp, lambda d: ErrorFeedbackPack(basis="rotated", percdamp=d).rewrite(p, r, m, ctx)),
                    ("ef_unrotated", damp, lambda d: ErrorFeedbackPack(basis="unrotated", percdamp=d).rewrite(p, r, m, ctx)),
                    ("gptq_rtn", damp, lambda d: GPTQRoundToNearest(bits=bits, percdamp=d).rewrite(p, kern, meta, ctx)),
                    ("awq_ef_rotated", damp,
                     lambda d: awq(cq_recipe(ErrorFeedbackPack(basis="rotated", percdamp=d))))]
            for name, damp, fn in methods:
                if args.methods and name not in args.methods:
                    continue
                start = time.perf_counter()
                leaf, lmeta = fn(damp)
                seconds = time.perf_counter() - start
                q = decode_rows(leaf)
                row = {"path": p, "shape": list(meta.shape), "bits": bits, "method": name, "percdamp": damp,
                       "seconds": seconds,
                       "heldout": rel_output_error(w, q, H_held), "calib": rel_output_error(w, q, H_cal),
                       "weight_mse": float(np.sum((w - q) ** 2) / np.sum(w * w))}
                if "awq_alpha" in lmeta.info:
                    row["awq_alpha"] = lmeta.info["awq_alpha"]
                rows.append(row)
                alpha = f" a={row['awq_alpha']:.1f}" if "awq_alpha" in row else ""
                print(f"{p:34s} {bits}b {name:14s} {damp or 0:5.3f} held {row['heldout']:.4f} calib {row['calib']:.4f} "
                      f"wmse {row['weight_mse']:.4f} {seconds:6.2f}s{alpha}", flush=True)
    result = {"model": str(args.model), "calib_tokens": args.calib * args.seq, "heldout_tokens": args.heldout * args.seq,
              "text": "squad paragraphs (BOS + 511 tokens per sequence)",
              "capture_seconds": capture_s, "rows": rows}
    if args.json:
        atomic.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
