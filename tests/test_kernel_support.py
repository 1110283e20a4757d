"""Shared helpers for the CQ kernel tests: random CQ weights and a NumPy model of the kernel.

The kernel's integer scheme (``xla_ext/include/cqjax/cq_kernel.h``) emulated in NumPy:
per (row, block) int8 activations ``xq = rint(Rx * 127 / max|Rx|)``, per block int8 codebook
levels ``lq = rint(cb * 127 / max|cb|)``, exact integer block dots, float combination.
Also reads/writes the golden text file shared with the C++ test
(``tests/golden/cq_kernel_v1.txt``).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.formats import cq as fmt
from cqjax.kernels.qarrays import CQArray
from cqjax.formats import rotation

GOLDEN_TXT = Path(__file__).parent / "golden" / "cq_kernel_v1.txt"


def make_cq(rng: np.random.Generator, N: int, K: int, bits: int, *, seed: int = 0,
            block: int = 128, min_block: int = 16, transposed: bool = True) -> CQArray:
    """A random CQ weight: codes, norms in [0.5, 1.5), per-block-size codebooks (sizes differ)."""
    blocks = fmt.block_plan(K, block, min_block)
    kpad = sum(blocks)
    codes = rng.integers(0, 1 << bits, (N, kpad)).astype(np.uint8)
    norms = (rng.random((N, len(blocks))) + 0.5).astype(np.float16)
    base = np.sort(rng.standard_normal(1 << bits))
    books = {b: base * (1.0 + 0.37 * np.log2(block // b)) + 0.01 * i
             for i, b in enumerate(sorted(set(blocks)))}
    cbs = np.stack([books[b] for b in blocks]).astype(np.float16)
    rot = rotation.make_rotation(K, blocks, seed)
    return CQArray(codes=jnp.asarray(fmt.pack_codes(codes, bits)), norms=jnp.asarray(norms),
                   codebooks=jnp.asarray(cbs), s1=jnp.asarray(rot.s1), s2=jnp.asarray(rot.s2),
                   perm=jnp.asarray(rot.perm), bits=bits, blocks=blocks, K=K,
                   transposed=transposed, seed=seed)


def operands(q: CQArray) -> tuple:
    return (q.codes, q.norms, q.codebooks, q.s1, q.s2, q.perm)


def int8_model(x: np.ndarray, q: CQArray) -> np.ndarray:
    """NumPy emulation of the kernel: ``[M, K] -> [M, N]`` float64 (see the module docstring)."""
    blocks = q.blocks
    offs = fmt.block_offsets(blocks)
    rot = rotation.Rotation(blocks=blocks, seed=0, s1=np.asarray(q.s1), s2=np.asarray(q.s2),
                               perm=np.asarray(q.perm))
    xr = rotation.rotate_rows_np(np.asarray(x, np.float32), rot).astype(np.float32)
    codes = fmt.unpack_codes(np.asarray(q.codes), q.bits, sum(blocks)).astype(np.int64)
    norms = np.asarray(q.norms).astype(np.float64)
    cbs = np.asarray(q.codebooks).astype(np.float32)
    y = np.zeros((x.shape[0], codes.shape[0]))
    for j, (lo, hi) in enumerate(zip(offs[:-1], offs[1:])):
        seg = xr[:, lo:hi]
        amax = np.abs(seg).max(axis=1, keepdims=True)
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
        xq = np.clip(np.rint(seg * inv), -127, 127).astype(np.int64)
        cmax = np.abs(cbs[j]).max()
        cinv = np.float32(127) / cmax if cmax > 0 else np.float32(0)
        lq = np.clip(np.rint(cbs[j] * cinv), -127, 127).astype(np.int64)
        cs = cmax / 127.0 if cmax > 0 else 1.0
        isum = xq @ lq[codes[:, lo:hi]].T  # [M, N]
        y += isum * (amax.astype(np.float64) / 127.0) * cs * norms[:, j][None, :]
    return y


def float_model(x: np.ndarray, q: CQArray) -> np.ndarray:
    """The float math of the pure-JAX path in NumPy (float64): ``(R x) · Ŵᵀ``, fast eagerly."""
    return rotate_np(x, q) @ decode_np(q).T


def decode_np(q: CQArray) -> np.ndarray:
    """Decoded rotated rows ``[N, Kpad]`` in float64."""
    kpad = sum(q.blocks)
    codes = fmt.unpack_codes(np.asarray(q.codes), q.bits, kpad).astype(np.int64)
    block_id = np.repeat(np.arange(len(q.blocks)), q.blocks)
    cbs = np.asarray(q.codebooks).astype(np.float64)
    return cbs[block_id[None, :], codes] * np.repeat(np.asarray(q.norms).astype(np.float64), q.blocks, axis=1)


def rotate_np(x, q):
    rot = rotation.Rotation(blocks=q.blocks, seed=0, s1=np.asarray(q.s1), s2=np.asarray(q.s2),
                               perm=np.asarray(q.perm))
    return rotation.rotate_rows_np(np.asarray(x, np.float64), rot)


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30))


# ------------------------------------------------------------------ golden text file

GOLDEN_CASES = [  # (bits, M, N, K)
    (1, 2, 3, 100), (2, 3, 5, 200), (3, 1, 4, 576), (4, 3, 3, 40), (2, 1, 2, 17), (3, 2, 3, 8),
]
INT_KEYS = ("blocks", "codes", "norms", "codebooks", "s1", "s2", "perm", "ids")
FLOAT_KEYS = ("x", "y_int8", "y_float", "rows")


def _dot_jnp(q, x):
    return q._dot_rows_jnp(x)


def _take_jnp(q, ids):
    return q._take_rows_jnp(ids)


dot_jnp = jax.jit(_dot_jnp)
take_jnp = jax.jit(_take_jnp)


def golden_cases(rng: np.random.Generator) -> list[dict]:
    """Builds the golden cases (``y_float``/``rows`` from the pure-JAX reference)."""
    out = []
    for bits, M, N, K in GOLDEN_CASES:
        q = make_cq(rng, N, K, bits, seed=bits * 7 + K)
        x = rng.standard_normal((M, K)).astype(np.float32)
        ids = np.array([N - 1, 0, N // 2], np.int32)
        out.append({
            "bits": bits, "M": M, "N": N, "K": K,
            "blocks": np.asarray(q.blocks, np.int64),
            "x": x,
            "codes": np.asarray(q.codes).reshape(-1),
            "norms": np.asarray(q.norms).view(np.uint16).reshape(-1),
            "codebooks": np.asarray(q.codebooks).view(np.uint16).reshape(-1),
            "s1": np.asarray(q.s1), "s2": np.asarray(q.s2), "perm": np.asarray(q.perm),
            "y_int8": int8_model(x, q).astype(np.float32),
            "y_float": np.asarray(jax.jit(_dot_jnp)(q, jnp.asarray(x))),
            "ids": ids,
            "rows": np.asarray(jax.jit(_take_jnp)(q, jnp.asarray(ids))),
        })
    return out


def write_golden(cases: list[dict], path: Path = GOLDEN_TXT) -> None:
    lines = ["# CQ kernel golden vectors, layout v1 (tests/test_kernel_support.py; read by",
             "# tests/test_kernel.py and xla_ext/tests/cq_kernel_test.cc).",
             "# case bits M N K, then 'key count values...' lines, then 'end'.",
             "# norms/codebooks are float16 bit patterns; y_int8 is the NumPy model of the",
             "# kernel's int8 scheme, y_float and rows the pure-JAX reference."]
    for c in cases:
        lines.append(f"case {c['bits']} {c['M']} {c['N']} {c['K']}")
        for key in INT_KEYS[:-1] + FLOAT_KEYS[:1] + ("y_int8", "y_float", "ids", "rows"):
            v = np.asarray(c[key]).reshape(-1)
            if key in FLOAT_KEYS:
                vals = " ".join(np.format_float_scientific(np.float32(t), unique=True) for t in v)
            else:
                vals = " ".join(str(int(t)) for t in v)
            lines.append(f"{key} {v.size} {vals}")
        lines.append("end")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def read_golden(path: Path = GOLDEN_TXT) -> list[dict]:
    cases, cur = [], None
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if parts[0] == "case":
            cur = dict(zip(("bits", "M", "N", "K"), map(int, parts[1:])))
        elif parts[0] == "end":
            cases.append(cur)
        else:
            n = int(parts[1])
            dt = np.float32 if parts[0] in FLOAT_KEYS else np.int64
            cur[parts[0]] = np.array(parts[2:2 + n], dtype=np.float64 if dt == np.float32 else np.int64).astype(dt)
    return cases


def golden_to_cq(c: dict) -> CQArray:
    blocks = tuple(int(b) for b in c["blocks"])
    nb = len(blocks)
    return CQArray(
        codes=jnp.asarray(c["codes"].astype(np.uint8).reshape(c["N"], -1)),
        norms=jnp.asarray(c["norms"].astype(np.uint16).view(np.float16).reshape(c["N"], nb)),
        codebooks=jnp.asarray(c["codebooks"].astype(np.uint16).view(np.float16).reshape(nb, -1)),
        s1=jnp.asarray(c["s1"].astype(np.int8)), s2=jnp.asarray(c["s2"].astype(np.int8)),
        perm=jnp.asarray(c["perm"].astype(np.int32)), bits=c["bits"], blocks=blocks, K=c["K"],
        transposed=True)
