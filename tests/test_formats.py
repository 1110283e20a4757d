"""CQ format: block plan, pack/unpack bit-exactness (NumPy and JAX), golden bytes.

Regenerate the golden file (only when LAYOUT_VERSION changes on purpose):
``CQJAX_REGEN_GOLDEN=1 python -m pytest tests/test_formats.py -k golden``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cqjax.formats import (
    LAYOUT_VERSION,
    SUPPORTED_BITS,
    block_plan,
    pack_codes,
    row_bytes,
    stored_bytes,
    unpack_codes,
    unpack_codes_jnp,
)
from cqjax.formats.cq import pack_codes_reference
from cqjax.passes.codebook_core import analytic_codebook
from cqjax.formats.rotation import make_rotation, rotate_rows_np

GOLDEN = Path(__file__).parent / "golden" / "cq_pack_v1.json"
DETERMINISTIC = settings(derandomize=True, max_examples=60, deadline=None)


@pytest.mark.parametrize(
    "K, blocks",
    [
        (576, (128, 128, 128, 128, 64)),
        (640, (128,) * 5),
        (100, (64, 32, 16)),
        (8, (16,)),
        (128, (128,)),
        (16, (16,)),
        (17, (16, 16)),
        (4096, (128,) * 32),
        (2304, (128,) * 18),
        (1000, (128,) * 7 + (64, 32, 16)),
    ],
)
def test_block_plan_examples(K, blocks):
    assert block_plan(K) == blocks


@DETERMINISTIC
@given(K=st.integers(1, 5000), lb=st.integers(4, 8), lm=st.integers(2, 4))
def test_block_plan_properties(K, lb, lm):
    block, min_block = 1 << lb, 1 << min(lm, lb)
    blocks = block_plan(K, block, min_block)
    assert all(b & (b - 1) == 0 and min_block <= b <= block for b in blocks)
    assert 0 <= sum(blocks) - K < min_block
    assert list(blocks) == sorted(blocks, reverse=True)
    tail = blocks[K // block :]
    exact = tail if sum(blocks) == K else tail[:-1]  # the last block may be the padded one
    assert len(set(exact)) == len(exact)  # greedy: each smaller size at most once


@pytest.mark.parametrize("args", [(0,), (100, 96), (100, 128, 256), (100, 128, 12)])
def test_block_plan_rejects_bad_arguments(args):
    with pytest.raises(ValueError, match="block_plan"):
        block_plan(*args)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    rows = draw(st.integers(0, 7))
    Kpad = 8 * draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31))
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, Kpad), dtype=np.uint8)
    return codes, bits


@DETERMINISTIC
@given(cb=codes_and_bits())
def test_unpack_pack_roundtrip_is_bit_exact(cb):
    codes, bits = cb
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (codes.shape[0], row_bytes(codes.shape[1], bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, codes.shape[1]), codes)
    # uint8 codes go through the C++ packer: the NumPy reference's bytes, also for other dtypes
    assert packed.tobytes() == pack_codes_reference(codes, bits).tobytes()
    assert pack_codes(codes.astype(np.int64), bits).tobytes() == packed.tobytes()


_unpack_jit = jax.jit(unpack_codes_jnp, static_argnums=(1, 2))


@DETERMINISTIC
@given(cb=codes_and_bits())
def test_unpack_jnp_matches_numpy(cb):
    codes, bits = cb
    packed = pack_codes(codes, bits)
    got = np.asarray(_unpack_jit(packed, bits, codes.shape[1]))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, unpack_codes(packed, bits, codes.shape[1]))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_unpack_jnp_leading_dims(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=(6, 48), dtype=np.uint8)
    packed = pack_codes(codes, bits).reshape(2, 3, -1)
    got = np.asarray(_unpack_jit(packed, bits, 48))
    np.testing.assert_array_equal(got.reshape(6, 48), codes)


def test_layout_by_hand():
    k = np.arange(8, dtype=np.uint8)
    assert pack_codes(np.array([[1, 2, 3, 0, 0, 0, 0, 0]], np.uint8), 2).tolist() == [[0x39, 0]]
    assert pack_codes(np.array([[0xA, 0x5, 0, 0, 0, 0, 0, 1]], np.uint8), 4).tolist() == [[0x5A, 0, 0, 0x10]]
    assert pack_codes((k % 2)[None], 1).tolist() == [[0b10101010]]
    # 3 bits: codes 0..7 -> low plane 2 bytes (codes & 3 = 0,1,2,3,0,1,2,3), high plane 1 byte.
    assert pack_codes(k[None], 3).tolist() == [[0b11100100, 0b11100100, 0b11110000]]
    assert pack_codes(k[None], 8).tolist() == [k.tolist()]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        pack_codes(np.full((1, 8), 4, np.uint8), 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(np.zeros((1, 12), np.uint8), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_codes(np.zeros((1, 8), np.uint8), 5)
    with pytest.raises(ValueError, match="expected packed"):
        unpack_codes(np.zeros((1, 3), np.uint8), 2, 16)
    with pytest.raises(ValueError, match="unpack_codes_jnp"):
        unpack_codes_jnp(np.zeros((1, 3), np.uint8), 2, 16)


def test_stored_bytes():
    blocks = block_plan(576)
    # codes + fp16 norms per (row, block) + fp16 codebook per block + 2 sign bitmaps + uint8 perm
    assert stored_bytes(10, 576, 2, blocks) == 10 * (576 * 2 // 8 + 2 * 5) + 5 * 4 * 2 + 2 * 72 + 576
    assert stored_bytes(3, 100, 3, block_plan(100)) == 3 * (112 * 3 // 8 + 2 * 3) + 3 * 8 * 2 + 2 * 14 + 112
    assert stored_bytes(1, 1024, 1, block_plan(1024, 512)) == 128 + 4 + 2 * 2 * 2 + 2 * 128 + 2 * 1024
    with pytest.raises(ValueError, match="cover"):
        stored_bytes(1, 700, 2, blocks)


@pytest.mark.parametrize("K, rows, bits, block", [(40, 72, 3, 32), (576, 5, 2, 128), (100, 3, 4, 64),
                                                  (8, 7, 1, 16), (300, 2, 8, 128), (1024, 2, 2, 512)])
@pytest.mark.parametrize("in_scale", [False, True])
def test_byte_counts_equal_what_is_stored(K, rows, bits, block, in_scale):
    """The formats' byte counts from shapes alone equal the bytes of the encoded leaf arrays."""
    import jax.numpy as jnp

    from cqjax.formats import encoding, rtn
    from cqjax.kernels.qarrays import CQArray, RTNArray

    blocks = block_plan(K, block, 16)
    rot = make_rotation(K, blocks, seed=K)
    scale = jnp.ones((K,), jnp.float16) if in_scale else None
    cq = CQArray.pack(np.zeros((rows, sum(blocks)), np.uint8), np.ones((rows, len(blocks)), np.float16),
                      {b: np.linspace(-1, 1, 1 << bits) for b in blocks}, rot, bits=bits, K=K,
                      transposed=True).replace(in_scale=scale)
    assert encoding.stored_nbytes(cq) == stored_bytes(rows, K, bits, blocks, in_scale=in_scale)
    nb = len(rtn.blocks(K, block))
    r = RTNArray.pack(np.zeros((rows, K), np.uint8), np.ones((rows, nb), np.float16),
                      np.zeros((rows, nb), np.float16), bits=bits, block=block, K=K,
                      transposed=False).replace(in_scale=scale)
    assert encoding.stored_nbytes(r) == rtn.stored_bytes(rows, K, bits, block, in_scale=in_scale)


# ------------------------------------------------------------------------------ golden


def _golden_codes(bits: int) -> np.ndarray:
    """3 x 32 codes from a fixed LCG (x = 1103515245 x + 12345 mod 2^31, byte = bits 16..23)."""
    x, out = 1, []
    for _ in range(3 * 32):
        x = (1103515245 * x + 12345) % (1 << 31)
        out.append((x >> 16) & 0xFF)
    return (np.array(out, np.uint8) & ((1 << bits) - 1)).reshape(3, 32)


def _reference_golden() -> dict:
    """Everything the golden file pins, computed from the reference implementation."""
    pack = {}
    for bits in SUPPORTED_BITS:
        codes = _golden_codes(bits)
        pack[str(bits)] = {
            "codes": codes.tolist(),
            "packed_hex": [row.tobytes().hex() for row in pack_codes(codes, bits)],
        }
    plans = {str(K): list(block_plan(K)) for K in (8, 100, 576, 640, 1000)}
    codebooks = {
        f"d{d}_b{b}": [float(x) for x in analytic_codebook(d, b)] for d in (64, 128) for b in (1, 2, 3, 4)
    }
    rot = make_rotation(40, block_plan(40, block=16, min_block=8), seed=0)
    x = ((np.arange(40) * 7) % 13 - 6).astype(np.float64)[None]
    rotation = {
        "K": 40,
        "blocks": list(rot.blocks),
        "seed": rot.seed,
        "s1": rot.s1.tolist(),
        "s2": rot.s2.tolist(),
        "perm": rot.perm.tolist(),
        "x": x[0].tolist(),
        "Rx": [round(float(v), 12) for v in rotate_rows_np(x, rot)[0]],
    }
    return {
        "layout_version": LAYOUT_VERSION,
        "note": "CQ layout v1 (see cqjax/formats/cq.py); regenerate only on a deliberate layout change",
        "block_plans": plans,
        "pack": pack,
        "analytic_codebooks": codebooks,
        "rotation": rotation,
    }


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def test_golden_file_matches_reference():
    ref = _reference_golden()
    if os.environ.get("CQJAX_REGEN_GOLDEN") == "1":
        text = json.dumps(ref, indent=1)
        text = re.sub(r"\[[^\[\]{}]*\]", lambda m: " ".join(m.group(0).split()), text)  # flat lists inline
        _write_atomic(GOLDEN, text + "\n")
    gold = json.loads(GOLDEN.read_text())
    assert gold["layout_version"] == LAYOUT_VERSION
    assert gold["block_plans"] == ref["block_plans"]
    for bits, entry in gold["pack"].items():
        codes = np.array(entry["codes"], np.uint8)
        packed = np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) for h in entry["packed_hex"]])
        np.testing.assert_array_equal(pack_codes(codes, int(bits)), packed, err_msg=f"bits={bits}")
        np.testing.assert_array_equal(unpack_codes(packed, int(bits), codes.shape[1]), codes)
        assert entry == ref["pack"][bits]
    for name, levels in gold["analytic_codebooks"].items():
        np.testing.assert_allclose(ref["analytic_codebooks"][name], levels, rtol=0, atol=1e-6, err_msg=name)
    g, r = gold["rotation"], ref["rotation"]
    for key in ("K", "blocks", "seed", "s1", "s2", "perm", "x"):
        assert g[key] == r[key], key
    np.testing.assert_allclose(r["Rx"], g["Rx"], rtol=0, atol=1e-9)
