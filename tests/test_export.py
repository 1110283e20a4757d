"""``mode=export export.format=hf``: a dequantized checkpoint that transformers runs with the
logits of cqjax's quantized runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cqjax import api, data  # noqa: E402
from cqjax.errors import CheckpointError  # noqa: E402
from cqjax.io import export, hf  # noqa: E402
from cqjax.kernels import backend  # noqa: E402
from cqjax.runtime import forward_fn  # noqa: E402
from test_parity import CASES, TINY, write_checkpoint  # noqa: E402


def runtime_logits(model, ids, kernel="jax"):
    """cqjax's logits of ``ids`` (``kernel``: the pure-JAX path computes with the decoded
    weights; the C++ kernel also rounds activations to 8 bits)."""
    with backend.use_kernel(kernel):
        return np.asarray(forward_fn(model)(ids, np.ones(ids.shape, bool)))


def logits_both(q, directory, tokens, dtype=torch.float32, kernel="jax"):
    """cqjax's quantized runtime (:func:`runtime_logits`) and transformers on the export."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    return runtime_logits(q.model, tokens, kernel), theirs


def assert_export_matches(q, directory, tokens):
    """transformers on the export computes the pure-JAX runtime's logits (1e-4 relative)."""
    ours, theirs = logits_both(q, directory, tokens)
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())


@pytest.mark.parametrize("config", [
    lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=False, attention_bias=True),
    lambda: transformers.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=4),
    CASES["phi3"],  # fused qkv_proj / gate_up_proj: the IR's row slices written back into one tensor
    CASES["gemma2"],
], ids=["llama-untied-bias", "gemma3", "phi3", "gemma2"])
def test_tiny_export_runs_in_transformers_with_cqjax_logits(tmp_path, config):
    write_checkpoint(config(), tmp_path / "ckpt")
    q = api.quantize(tmp_path / "ckpt", bits=3, embed_bits=4)
    api.save(q, tmp_path / "art")
    q = api.load(tmp_path / "art")
    export.export_hf(q.ir, tmp_path / "hf", config_from=tmp_path / "ckpt", note={"bits": 3})
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 13)).astype(np.int32)
    assert_export_matches(q, tmp_path / "hf", tokens)
    _, theirs = logits_both(q, tmp_path / "hf", tokens)
    # The export is the quantized model, not the float one it came from.
    floats, _ = logits_both(api.Quantized(hf.load(tmp_path / "ckpt")[0], None, [], {}), tmp_path / "hf", tokens)
    assert np.abs(floats - theirs).max() > 1e-3
    header = json.loads((tmp_path / "hf" / "model.safetensors").read_bytes()[8:8 + 100_000].split(b"}}")[0] + b"}}")
    assert json.loads(header["__metadata__"]["cqjax"]) == {"bits": 3}


def test_bfloat16_export_and_refusals(tmp_path):
    write_checkpoint(transformers.LlamaConfig(**TINY), tmp_path / "ckpt")
    q = api.quantize(tmp_path / "ckpt", bits=4)
    export.export_hf(q.ir, tmp_path / "hf", config_from=tmp_path / "ckpt", dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    tokens = np.arange(1, 12, dtype=np.int32)[None]
    ours, theirs = logits_both(q, tmp_path / "hf", tokens, dtype=torch.bfloat16)
    assert np.abs(ours - theirs).max() < 0.1 * max(1.0, np.abs(theirs).max())  # bf16 weights and compute
    with pytest.raises(CheckpointError, match="export.dtype='int8'"):
        export.export_hf(q.ir, tmp_path / "x", config_from=tmp_path / "ckpt", dtype="int8")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        export.export_hf(q.ir, tmp_path / "x", config_from=tmp_path, dtype="float32")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a Hugging Face checkpoint directory"):
        export.export_hf(q.ir, tmp_path / "notes", config_from=tmp_path / "ckpt")
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


@pytest.mark.slow
def test_packaged_model_export_matches_the_quantized_runtime(tmp_path):
    try:
        directory = data.model_dir("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    q = api.quantize(directory, bits=4, embed_bits=4)
    api.save(q, tmp_path / "art")
    q = api.load(tmp_path / "art")
    export.export_hf(q.ir, tmp_path / "hf", config_from=tmp_path / "art" / "tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokens = np.asarray([tok("The quick brown fox jumps over the lazy dog, and then it")["input_ids"]], np.int32)
    ours, theirs = logits_both(q, tmp_path / "hf", tokens)
    diff = np.abs(ours - theirs).max()
    print(f"SmolLM2 4-bit export: max |dlogit| {diff:.2e} against the pure-JAX runtime")
    assert diff <= 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    if backend.ffi_available():  # the C++ kernel's 8-bit activations stay within its own tolerance
        kernel, _ = logits_both(q, tmp_path / "hf", tokens, kernel="ffi")
        print(f"... and {np.abs(kernel - theirs).max():.2e} against the C++ kernel's")
        assert (kernel.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_stacked_expert_slices_are_written_back_into_one_tensor(tmp_path):
    """Slices ``name[e][start:stop]`` / ``name[e]`` of stacked 3-D expert tensors (Qwen3-MoE)
    reassemble into ``[E, rows, in]``; a missing expert or row slice is refused by name."""
    import dataclasses

    from test_import_errors import NEW_FAMILIES, qwen3_moe_tensors, write

    w = qwen3_moe_tensors()
    ir = hf.import_checkpoint(write(tmp_path / "ckpt", config=NEW_FAMILIES["qwen3_moe"], weights=w))
    assert export.split_name("m.experts.gate_up_proj[3][6:12]") == ("m.experts.gate_up_proj", 3, 6)
    assert export.split_name("m.experts.down_proj[1]") == ("m.experts.down_proj", 1, None)
    shapes = export.checkpoint_shapes(ir)
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == (4, 12, 8)
    assert shapes["model.layers.0.mlp.experts.down_proj"] == (4, 8, 6)
    export.export_hf(ir, tmp_path / "hf", config_from=tmp_path / "ckpt")
    from safetensors.numpy import load_file

    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(written) == set(w)
    for name, array in w.items():
        np.testing.assert_array_equal(written[name], array)
    for drop, match in [("layers/0/mlp/experts/2/down_proj/kernel", r"cover experts \[0, 1, 3\]"),
                        ("layers/0/mlp/experts/1/up_proj/kernel", r"row slices of expert 1 \[\(0, 6\)\] do not tile")]:
        partial = dataclasses.replace(ir, meta={p: m for p, m in ir.meta.items() if p != drop})
        with pytest.raises(CheckpointError, match=match):
            export.checkpoint_shapes(partial)
