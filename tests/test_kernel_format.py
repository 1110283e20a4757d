"""The C++ layout header ``xla_ext/include/cqjax/formats.h`` mirrors ``cqjax/formats/cq.py``:
block plans, pack/unpack bytes (random rows and the v1 golden file), float16 decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cqjax import _xla_ext
from cqjax.formats import LAYOUT_VERSION, SUPPORTED_BITS, block_plan, pack_codes, unpack_codes

GOLDEN = Path(__file__).parent / "golden" / "cq_pack_v1.json"


def test_layout_version_matches():
    assert _xla_ext.LAYOUT_VERSION == LAYOUT_VERSION == 1


@pytest.mark.parametrize("block, min_block", [(128, 16), (64, 8), (32, 32), (256, 16)])
def test_block_plans_agree(block, min_block):
    for K in list(range(1, 300)) + [576, 1000, 1536, 4096, 5000]:
        assert tuple(_xla_ext.formats_block_plan(K, block, min_block)) == block_plan(K, block, min_block), K


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("kpad", [8, 16, 24, 136, 576])
def test_pack_and_unpack_agree(bits, kpad):
    rng = np.random.default_rng(bits * 100 + kpad)
    codes = rng.integers(0, 1 << bits, (3, kpad)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    for r in range(3):
        assert _xla_ext.formats_pack_row(codes[r].tobytes(), bits) == packed[r].tobytes()
        assert _xla_ext.formats_unpack_row(packed[r].tobytes(), bits, kpad) == codes[r].tobytes()
    np.testing.assert_array_equal(unpack_codes(packed, bits, kpad), codes)


def test_golden_v1_bytes_unpack_in_cpp():
    g = json.loads(GOLDEN.read_text())
    assert g["layout_version"] == 1
    for K, blocks in g["block_plans"].items():
        assert tuple(_xla_ext.formats_block_plan(int(K))) == tuple(blocks)
    checked = 0
    for bits, case in g["pack"].items():
        for codes, hexrow in zip(case["codes"], case["packed_hex"]):
            row = bytes.fromhex(hexrow)
            assert _xla_ext.formats_unpack_row(row, int(bits), len(codes)) == bytes(codes)
            assert _xla_ext.formats_pack_row(bytes(codes), int(bits)) == row
            checked += 1
    assert checked >= 5


def test_half_to_float_matches_numpy():
    bits = np.arange(0, 1 << 16, 7, dtype=np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    got = np.array([_xla_ext.formats_half_to_float(int(b)) for b in bits], np.float32)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(got[finite], ref[finite])
    assert np.all(np.isnan(got[np.isnan(ref)])) and np.array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
