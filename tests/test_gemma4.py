"""Gemma 4 text models: our Flax forward against transformers' torch forward, and config errors.

Each case writes a tiny random ``Gemma4ForCausalLM`` (fp32, random norm weights, layer scalars
and router scales, so that a wrong offset or a skipped scalar cannot hide), imports it and
compares logits on right-padded sequences (real tokens only).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_export import assert_export_matches, runtime_logits  # noqa: E402
from test_parity import assert_matches, write_checkpoint  # noqa: E402

from safetensors.numpy import load_file, save_file  # noqa: E402

from cqjax import api, runtime  # noqa: E402
from cqjax.errors import ConfigError  # noqa: E402
from cqjax.io import export, hf  # noqa: E402
from cqjax.kernels import backend  # noqa: E402
from cqjax.kernels.qarrays import is_quantized  # noqa: E402

S, F = "sliding_attention", "full_attention"
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=5, max_position_embeddings=128,
            vocab_size_per_layer_input=97, hidden_size_per_layer_input=8, initializer_range=0.1)
WIDE_FULL = {"head_dim": 32, "num_key_value_heads": 1}


def config(**kw):
    return transformers.Gemma4TextConfig(**{**BASE, **kw})


CASES = {
    # PLE; sliding/full layers, full layers with their own head_dim and kv heads; proportional RoPE
    "ple-sliding-full": lambda: config(
        num_hidden_layers=4, layer_types=[S, F, S, F], per_layer_config={1: WIDE_FULL, 3: WIDE_FULL}),
    # layers 3 (sliding) and 4 (full) reuse the keys/values of layers 2 and 1
    "kv-shared": lambda: config(
        num_hidden_layers=5, layer_types=[S, F, S, S, F], num_kv_shared_layers=2,
        per_layer_config={1: WIDE_FULL, 4: WIDE_FULL}),
    "kv-shared-double-wide-mlp": lambda: config(
        num_hidden_layers=4, layer_types=[S, F, S, F], num_kv_shared_layers=2, use_double_wide_mlp=True),
    # the legacy global_* keys; k == v on full layers
    "k-eq-v": lambda: config(
        num_hidden_layers=3, layer_types=[S, F, F], attention_k_eq_v=True, global_head_dim=24,
        num_global_key_value_heads=1),
    "moe": lambda: config(
        num_hidden_layers=2, layer_types=[S, F], enable_moe_block=True, num_experts=5, top_k_experts=2,
        moe_intermediate_size=24, per_layer_config={}),
    # no PLE, untied head, biases, softcapped logits, scaled proportional RoPE
    "softcap-untied-noPLE": lambda: config(
        num_hidden_layers=3, layer_types=[S, S, F], hidden_size_per_layer_input=0, tie_word_embeddings=False,
        attention_bias=True, final_logit_softcapping=3.0, per_layer_config={2: {"head_dim": 32}},
        rope_parameters={S: {"rope_type": "default", "rope_theta": 100.0},
                         F: {"rope_type": "proportional", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                             "factor": 4.0}}),
}


def write_gemma4(cfg, directory, seed=0):
    """A random checkpoint whose scalars and router scales are not all ones."""
    model = write_checkpoint(cfg, directory, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layer_scalar", "per_expert_scale")):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("router.scale"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_transformers(name, tmp_path):
    ref = write_gemma4(CASES[name](), tmp_path)
    model, ir = hf.load(tmp_path)
    assert_matches(model, ref, BASE["vocab_size"], name)


def test_ir_layout_and_roles(tmp_path):
    write_gemma4(CASES["moe"](), tmp_path)
    ir = hf.import_checkpoint(tmp_path)
    roles = {p: m.role for p, m in ir.meta.items()}
    assert roles["embed_tokens_per_layer/embedding"] == "per_layer_embedding"
    assert ir.meta["embed_tokens_per_layer/embedding"].shape == (97, 2 * 8)
    assert roles["layers/0/router/proj/kernel"] == "router"
    assert ir.meta["layers/0/router/proj/kernel"].shape == (64, 5)  # [in, out]
    # every expert is a gated MLP of 2-D [in, out] linears, sliced from the stacked tensors
    experts = sorted(p for p in ir.meta if "/experts/" in p)
    assert len(experts) == 2 * 5 * 3  # layers x experts x gate/up/down
    assert all(roles[p] == "linear" for p in experts)
    assert ir.meta["layers/1/experts/4/gate_proj/kernel"].shape == (64, 24)
    assert ir.meta["layers/1/experts/4/up_proj/kernel"].shape == (64, 24)
    assert ir.meta["layers/1/experts/4/down_proj/kernel"].shape == (24, 64)
    gate_up = "model.layers.1.experts.gate_up_proj"
    assert ir.meta["layers/1/experts/3/gate_proj/kernel"].hf_name == gate_up + "[3][0:24]"
    assert ir.meta["layers/1/experts/3/up_proj/kernel"].hf_name == gate_up + "[3][24:48]"
    assert ir.meta["layers/1/experts/2/down_proj/kernel"].hf_name == "model.layers.1.experts.down_proj[2]"
    stacked = load_file(tmp_path / "model.safetensors")
    np.testing.assert_array_equal(hf.load_leaf(ir, "layers/1/experts/3/up_proj/kernel"),
                                  stacked[gate_up][3, 24:].T)
    assert ir.meta["layers/0/router/scale"].hf_name == "model.layers.0.router.scale"
    assert ir.meta["layers/0/router/per_expert_scale"].hf_name == "model.layers.0.router.per_expert_scale"
    assert ir.meta["layers/0/layer_scalar"].hf_name == "model.layers.0.layer_scalar"
    assert roles["layers/0/self_attn/k_norm/scale"] == "norm"
    assert "lm_head/kernel" not in roles  # tied


# ---------------------------------------------------------------------------------------------
# MoE experts: quantized one by one, on both kernel paths, saved, loaded and exported
# ---------------------------------------------------------------------------------------------


def tokens(seed=0, shape=(2, 12)):
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], shape).astype(np.int32)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma4-moe")
    write_gemma4(CASES["moe"](), directory)
    return directory


@pytest.fixture(scope="module")
def moe_q(moe_ckpt):
    return api.quantize(moe_ckpt, bits=4, progress=False)


def test_per_expert_checkpoint_imports_like_the_stacked_one(moe_ckpt, tmp_path):
    """One 2-D tensor per expert (``model.layers.N.experts.e.gate_proj.weight`` ...) imports to
    the same IR leaves as transformers' stacked ``gate_up_proj`` / ``down_proj``."""
    flat, i = {}, CASES["moe"]().moe_intermediate_size
    for name, array in load_file(moe_ckpt / "model.safetensors").items():
        base, _, leaf = name.rpartition(".")
        if leaf == "gate_up_proj":
            for e, w in enumerate(array):
                flat[f"{base}.{e}.gate_proj.weight"], flat[f"{base}.{e}.up_proj.weight"] = w[:i], w[i:]
        elif base.endswith(".experts") and leaf == "down_proj":
            for e, w in enumerate(array):
                flat[f"{base}.{e}.down_proj.weight"] = w
        else:
            flat[name] = array
    (tmp_path / "config.json").write_text((moe_ckpt / "config.json").read_text())
    save_file(flat, tmp_path / "model.safetensors", metadata={"format": "pt"})
    per, stacked = hf.import_checkpoint(tmp_path), hf.import_checkpoint(moe_ckpt)
    assert per.meta["layers/0/experts/1/up_proj/kernel"].hf_name == "model.layers.0.experts.1.up_proj.weight"
    assert set(per.params) == set(stacked.params)
    for path in per.params:
        np.testing.assert_array_equal(hf.load_leaf(per, path), hf.load_leaf(stacked, path))


def test_every_expert_is_quantized_and_runs_on_both_kernel_paths(moe_q, moe_ckpt):
    experts = [p for p in moe_q.ir.params if "/experts/" in p]
    assert len(experts) == 2 * 5 * 3
    assert all(is_quantized(moe_q.ir.params[p]) for p in experts)
    assert not any(is_quantized(moe_q.ir.params[f"layers/{i}/router/{name}"])
                   for i in range(2) for name in ("proj/kernel", "scale", "per_expert_scale"))
    ids = tokens()
    ours = runtime_logits(moe_q.model, ids, "jax")
    assert rel_error(ours, runtime_logits(hf.load(moe_ckpt)[0], ids)) < 0.5  # 4-bit experts stay near the float model
    if backend.ffi_available():  # the C++ kernels round activations to int8 per block: close, not equal
        assert rel_error(runtime_logits(moe_q.model, ids, "ffi"), ours) < 5e-2


def rel_error(ours, ref):
    """``‖ours − ref‖ / ‖ref − mean‖`` over every logit (centered per row)."""
    return np.linalg.norm(ours - ref) / np.linalg.norm(ref - ref.mean(-1, keepdims=True))


def test_moe_save_load_round_trip_gives_identical_logits(moe_q, tmp_path):
    api.save(moe_q, tmp_path / "art")
    back = api.load(tmp_path / "art")
    assert back.ir.meta["layers/0/experts/2/up_proj/kernel"].hf_name == \
        "model.layers.0.experts.gate_up_proj[2][24:48]"
    np.testing.assert_array_equal(runtime_logits(back.model, tokens()), runtime_logits(moe_q.model, tokens()))


def test_moe_export_runs_in_transformers_with_the_quantized_logits(moe_q, moe_ckpt, tmp_path):
    out = export.export_hf(moe_q.ir, tmp_path / "hf", config_from=moe_ckpt)
    written = load_file(out / "model.safetensors")
    assert set(written) == set(load_file(moe_ckpt / "model.safetensors"))  # the stacked layout
    assert written["model.layers.0.experts.gate_up_proj"].shape == (5, 48, 64)
    assert written["model.layers.0.experts.down_proj"].shape == (5, 64, 24)
    assert_export_matches(moe_q, out, tokens(1))


def test_kv_shared_layers_have_no_kv_weights(tmp_path):
    write_gemma4(CASES["kv-shared"](), tmp_path)
    ir = hf.import_checkpoint(tmp_path)
    assert "layers/2/self_attn/k_proj/kernel" in ir.params
    assert not any(p.startswith(("layers/3/self_attn/k", "layers/3/self_attn/v")) for p in ir.params)
    assert ir.meta["layers/4/self_attn/q_proj/kernel"].shape == (64, 4 * 32)
    # the layers that reuse another layer's keys read them from its cache, bfloat16 ones too
    model = hf.to_model(ir)
    prompt = np.asarray([[3, 9, 27, 11, 5]], np.int32)
    plain = runtime.generate(model, prompt, max_new_tokens=6)
    assert np.array_equal(runtime.generate(model, prompt, max_new_tokens=6, kv_bits=16), plain)


def _raw_config(tmp_path, **changes):
    transformers.Gemma4TextConfig(**BASE, num_hidden_layers=2).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(changes)
    return raw


@pytest.mark.parametrize("changes, key", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"use_bidirectional_attention": "vision"}, "use_bidirectional_attention"),
    ({"per_layer_config": {"1": {"intermediate_size": 8}}}, "per_layer_config[1].intermediate_size"),
    ({"rope_parameters": {F: {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}}}, "rope_type"),
    ({"enable_moe_block": True}, "num_experts"),
    ({"model_type": "gemma4"}, "text model"),
])
def test_unsupported_config_raises_naming_the_key(tmp_path, changes, key):
    from cqjax.models.gemma4 import parse_gemma4

    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_gemma4(_raw_config(tmp_path, **changes), "config.json")


def test_unknown_key_fails_import(tmp_path):
    write_gemma4(config(num_hidden_layers=2, layer_types=[S, F]), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["frobnicate_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="frobnicate_heads"):
        hf.import_checkpoint(tmp_path)
