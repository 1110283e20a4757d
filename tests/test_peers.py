"""The peers harness's own logic (benchmarks/peers.py, peer_llamacpp.py) without the peers installed:
the F32 GGUF it hands to llama.cpp, its bits/weight accounting and grid check, and the verdicts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peer_llamacpp as lc  # noqa: E402
import peers  # noqa: E402

from cqjax.io.gguf import dequantize_tensor  # noqa: E402


def write_source(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny llama-like GGUF: a Q8_0 [out=3, in=64] weight, an F32 [5, 32] one, an F32 norm."""
    rng = np.random.default_rng(seed)
    w = {"blk.0.attn_q.weight": rng.standard_normal((3, 64)).astype(np.float32),
         "token_embd.weight": rng.standard_normal((5, 32)).astype(np.float32) * 0.1,
         "blk.0.attn_norm.weight": rng.standard_normal(32).astype(np.float32)}
    wr = gguf.GGUFWriter(path, arch="llama")
    wr.add_block_count(1)
    wr.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    wr.add_token_list(["a", "b", "c", "d", "e"])
    q8 = gguf.quants.quantize(w["blk.0.attn_q.weight"], gguf.GGMLQuantizationType.Q8_0)
    wr.add_tensor("blk.0.attn_q.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    wr.add_tensor("token_embd.weight", w["token_embd.weight"])
    wr.add_tensor("blk.0.attn_norm.weight", w["blk.0.attn_norm.weight"])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return w


def test_float_f32_keeps_metadata_and_decodes_every_tensor(tmp_path):
    src = tmp_path / "src.gguf"
    write_source(src)
    dst = lc.float_f32(src, tmp_path / "f32.gguf")
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert b.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    assert b.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c", "d", "e"]
    assert b.fields["llama.block_count"].contents() == 1
    src_t = {t.name: t for t in a.tensors}
    for t in b.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(dequantize_tensor(t), dequantize_tensor(src_t[t.name]))
    assert not list(tmp_path.glob("*.tmp"))


def test_storage_counts_2d_tensors_with_floats_at_16_bits(tmp_path):
    src = tmp_path / "src.gguf"
    write_source(src)
    st = lc.storage(src)
    # Q8_0: 34 bytes per 32 weights; the F32 [5, 32] table at 2 bytes each; the norm is not counted.
    assert st["params"] == 3 * 64 + 5 * 32
    assert st["bytes"] == 3 * 2 * 34 + 2 * 5 * 32
    assert st["tensor_types"] == {"Q8_0": 1, "F32": 1}
    assert st["bits_per_weight"] == pytest.approx(8 * st["bytes"] / st["params"])


def test_weight_error_and_gaussian_copy(tmp_path):
    src = tmp_path / "src.gguf"
    w = write_source(src)
    f32 = lc.float_f32(src, tmp_path / "f32.gguf")
    assert lc.weight_error(f32, f32) == 0.0
    assert lc.weight_error(f32, src) == 0.0  # the F32 copy decodes to exactly what the source stores
    g = lc.gaussian_f32(src, tmp_path / "g.gguf", seed=1)
    gt = {t.name: dequantize_tensor(t) for t in gguf.GGUFReader(g).tensors}
    np.testing.assert_array_equal(gt["blk.0.attn_norm.weight"], w["blk.0.attn_norm.weight"])
    emb = gt["token_embd.weight"]
    assert emb.shape == (5, 32) and not np.allclose(emb, w["token_embd.weight"])
    assert 0.05 < emb.std() < 0.2  # the source table's std is ~0.1
    assert lc.weight_error(f32, g) > 0.5


def row(method, config, bpw, ppl, grid=False):
    return {"method": method, "config": config, "bits_per_weight": bpw, "perplexity": ppl, "kl": 0.1,
            "top1": 0.5, "accuracy": {}, "grid_aligned": grid, "weight_error": None}


def test_verdicts_compare_each_peer_with_cqjax_at_no_more_bits():
    result = {"rows": [row("cqjax", "2-bit", 2.5, 100.0), row("cqjax", "3-bit", 3.4, 30.0),
                       row("hqq", "3-bit g64", 3.7, 40.0), row("hqq", "2-bit g64", 2.4, 500.0),
                       row("llama.cpp", "Q4_K_M", 4.9, 25.0, grid=True), row("llama.cpp", "F32", 16.0, 20.0),
                       row("rtn", "3-bit", 3.45, 20.0)]}
    v = {x["peer"]: x for x in peers.verdicts(result)}
    assert set(v) == {"hqq 3-bit g64", "hqq 2-bit g64", "rtn 3-bit"}  # grid-aligned and float rows left out
    assert v["hqq 3-bit g64"]["wins"] and v["hqq 3-bit g64"]["cqjax"] == "3-bit"
    assert v["hqq 2-bit g64"]["cqjax"] is None and not v["hqq 2-bit g64"]["wins"]
    assert not v["rtn 3-bit"]["wins"] and v["rtn 3-bit"]["cqjax_perplexity"] == 30.0
    md = peers.markdown({"model": "m", "float": {"perplexity": 19.0, "accuracy": {}}, "protocol": {},
                         "machine": {}, **result})
    assert "| hqq | 2-bit g64 | 2.400 | 500.000 |" in md and "| rtn 3-bit | 3.450 | 20.000 | 3-bit | 3.400 | 30.000 | no |" in md


def test_qwix_peer_tiles_and_bytes():
    """Qwix needs tiles that divide the input dim; bytes are bits per weight plus an fp16 scale per tile."""
    import peer_qwix

    assert peer_qwix.tile(576, 128) == 64 and peer_qwix.tile(1536, 128) == 128 and peer_qwix.tile(40, 64) == 8
    pytest.importorskip("qwix")
    rows = np.random.default_rng(0).standard_normal((6, 576)).astype(np.float32)
    w_hat, nbytes = peer_qwix.quantize(rows, 4, 128)
    assert w_hat.shape == rows.shape and nbytes == 6 * 576 * 4 // 8 + 2 * 6 * (576 // 64)
    err = np.sum((rows - w_hat) ** 2) / np.sum(rows ** 2)
    assert 0.003 < err < 0.03  # symmetric absmax int4 on Gaussian rows
