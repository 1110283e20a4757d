"""A malformed checkpoint fails at import with an error naming the file, tensor or key."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from cqjax.errors import CheckpointError, ConfigError
from cqjax.io import hf

CONFIG = dict(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=12,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              tie_word_embeddings=True, rms_norm_eps=1e-6)


def tensors(cfg=CONFIG):
    d, f, v, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], 4
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "model.layers.0.input_layernorm.weight": (d,),
              "model.layers.0.post_attention_layernorm.weight": (d,),
              "model.layers.0.self_attn.q_proj.weight": (d, d),
              "model.layers.0.self_attn.k_proj.weight": (kv, d),
              "model.layers.0.self_attn.v_proj.weight": (kv, d),
              "model.layers.0.self_attn.o_proj.weight": (d, d),
              "model.layers.0.mlp.gate_proj.weight": (f, d), "model.layers.0.mlp.up_proj.weight": (f, d),
              "model.layers.0.mlp.down_proj.weight": (d, f)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def write(path, config=CONFIG, weights=None, sharded=False):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    weights = tensors() if weights is None else weights
    if not sharded:
        save_file(weights, path / "model.safetensors")
        return path
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, path / shard)
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def test_valid_checkpoint_imports_lazily(tmp_path):
    ir = hf.import_checkpoint(write(tmp_path / "ok", sharded=True))
    assert len(ir.params) == 11
    model = hf.to_model(ir)
    assert np.asarray(model(np.zeros((1, 3), np.int32))).shape == (1, 3, 11)


def test_missing_config(tmp_path):
    path = write(tmp_path / "c")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        hf.import_checkpoint(path)


def test_missing_shard_names_the_file(tmp_path):
    path = write(tmp_path / "s", sharded=True)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        hf.import_checkpoint(path)


def test_missing_tensor_names_it(tmp_path):
    weights = tensors()
    del weights["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        hf.import_checkpoint(write(tmp_path / "t", weights=weights))


def test_wrong_shape_names_tensor_and_file(tmp_path):
    weights = tensors()
    weights["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 8), np.float32)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[5, 8\], expected \[4, 8\]"):
        hf.import_checkpoint(write(tmp_path / "w", weights=weights))


def test_unknown_config_key_names_it(tmp_path):
    with pytest.raises(ConfigError, match="'use_magic_attention'"):
        hf.import_checkpoint(write(tmp_path / "k", config={**CONFIG, "use_magic_attention": True}))


def test_bookkeeping_config_keys_do_not_block_an_import(tmp_path):
    """Keys transformers itself writes when it saves (private ``_``-prefixed ones, version
    stamps) change no math: the import accepts them and builds the same model."""
    extra = {"_model_name_or_path": "some/model", "_commit_hash": "abc", "mlx_version": "0.1"}
    ir = hf.import_checkpoint(write(tmp_path / "b", config={**CONFIG, **extra}))
    ref = hf.import_checkpoint(write(tmp_path / "r"))
    tokens = np.arange(6, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(hf.to_model(ir)(tokens)), np.asarray(hf.to_model(ref)(tokens)))


def test_stale_quantization_config_of_a_dequantized_checkpoint_is_accepted(tmp_path):
    """A checkpoint dequantized to float keeps its quantization_config: the tensors decide."""
    stale = {"quantization_config": {"quant_method": "gptq", "bits": 4}}
    ir = hf.import_checkpoint(write(tmp_path / "d", config={**CONFIG, **stale}))
    ref = hf.import_checkpoint(write(tmp_path / "r"))
    tokens = np.arange(6, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(hf.to_model(ir)(tokens)), np.asarray(hf.to_model(ref)(tokens)))
    name = "model.layers.0.self_attn.q_proj.weight"
    packed = {**tensors(), name: np.zeros(tensors()[name].shape, np.int8)}
    with pytest.raises(CheckpointError, match=rf"{name}' is int8, not floating point: the checkpoint is quantized \(gptq\)"):
        hf.import_checkpoint(write(tmp_path / "q", config={**CONFIG, **stale}, weights=packed))
    with pytest.raises(CheckpointError, match=rf"{name}' is int8, not floating point; cqjax imports float"):
        hf.import_checkpoint(write(tmp_path / "i", weights=packed))


def test_unsupported_value_names_key(tmp_path):
    with pytest.raises(ConfigError, match="'hidden_act' = 'relu'"):
        hf.import_checkpoint(write(tmp_path / "v", config={**CONFIG, "hidden_act": "relu"}))


def test_unsupported_architecture(tmp_path):
    with pytest.raises(CheckpointError, match="model_type='mamba'.*supported"):
        hf.import_checkpoint(write(tmp_path / "a", config={**CONFIG, "model_type": "mamba"}))


@pytest.mark.parametrize("keep", [4, 60, -100])
def test_truncated_safetensors(tmp_path, keep):
    path = write(tmp_path / "tr")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        hf.import_checkpoint(path)


def test_unused_tensor_is_reported(tmp_path):
    weights = {**tensors(), "model.vision_tower.patch.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(CheckpointError, match="vision_tower"):
        hf.import_checkpoint(write(tmp_path / "u", weights=weights))


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "p"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(CONFIG))
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="no \\*.safetensors.*pickle"):
        hf.import_checkpoint(path)


def test_hub_id_without_network_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="model.path"):
        hf.import_checkpoint("no-such-org/no-such-model")


def test_non_finite_weight_names_the_tensor(tmp_path):
    w = tensors()
    w["model.layers.0.mlp.up_proj.weight"][3, 2] = np.nan
    ir = hf.import_checkpoint(write(tmp_path / "nan", weights=w))
    with pytest.raises(CheckpointError, match=r"model.safetensors:model.layers.0.mlp.up_proj.weight: tensor "
                                              r"layers/0/mlp/up_proj/kernel has a non-finite value \(nan\)"):
        hf.check_finite(ir)
    hf.check_finite(hf.import_checkpoint(write(tmp_path / "ok")))


def test_shard_index_may_not_point_outside_the_checkpoint(tmp_path):
    path = write(tmp_path / "s", sharded=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    outside = tmp_path / "elsewhere.safetensors"
    (path / "model-00001-of-00002.safetensors").rename(outside)
    index["weight_map"] = {k: ("../elsewhere.safetensors" if v.startswith("model-00001") else v)
                           for k, v in index["weight_map"].items()}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard '../elsewhere.safetensors' is not a .safetensors file inside"):
        hf.import_checkpoint(path)


@pytest.mark.parametrize("key, value", [("head_dim", 2 ** 31), ("hidden_size", 0), ("num_hidden_layers", 2 ** 40)])
def test_config_sizes_are_bounded_before_anything_is_built(tmp_path, key, value):
    path = write(tmp_path / "c", config={**CONFIG, key: value})
    with pytest.raises(ConfigError, match=r"config.json: config\.\w+=\d+ is out of bounds"):
        hf.import_checkpoint(path)


# -- mistral, phi3, gemma2: every config key is understood or refused by name ------------------

NEW_FAMILIES = {
    "mistral": dict(CONFIG, model_type="mistral", sliding_window=4),
    "phi3": dict(CONFIG, model_type="phi3", original_max_position_embeddings=16, resid_pdrop=0.0,
                 embd_pdrop=0.0, auto_map={"AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}),
    "gemma2": dict(CONFIG, model_type="gemma2", head_dim=4, query_pre_attn_scalar=4, sliding_window=4,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_act="gelu_pytorch_tanh",
                   cache_implementation="hybrid", sliding_window_size=4),
    "qwen3_moe": dict(CONFIG, model_type="qwen3_moe", num_local_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=6, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                      router_aux_loss_coef=0.001, output_router_logits=False, max_window_layers=1,
                      use_sliding_window=False, sliding_window=None),
}


def parse(config):
    from cqjax.models import registry

    return registry.for_model_type(config["model_type"], "config.json").parse_config(config, "config.json")


@pytest.mark.parametrize("family", sorted(NEW_FAMILIES))
def test_new_families_accept_their_keys(family):
    """Dropout rates, remote-code names and generation-time cache settings change no math."""
    cfg = parse(NEW_FAMILIES[family])
    assert cfg.family == family


@pytest.mark.parametrize("family, key, value", [
    ("mistral", "layer_types", ["sliding_attention", "full_attention"]),  # Ministral's alternation
    ("mistral", "attn_logit_softcapping", 30.0),
    ("mistral", "use_sliding_window", True),
    ("phi3", "full_attn_mod", 2),  # Phi-4-mini remote code
    ("phi3", "qk_layernorm", True),
    ("gemma2", "rope_local_base_freq", 10000.0),  # Gemma3's local rope
    ("gemma2", "use_adarms", True),
    ("qwen3_moe", "shared_expert_intermediate_size", 16),  # Qwen2-MoE's shared expert
    ("qwen3_moe", "layer_types", ["sliding_attention"]),  # transformers' Qwen3-MoE ignores it
    ("qwen3_moe", "first_k_dense_replace", 1),  # DeepSeek's dense-first layers
])
def test_new_families_refuse_unknown_math_keys_by_name(tmp_path, family, key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}' is not understood by the {family} importer"):
        hf.import_checkpoint(write(tmp_path / "k", config={**NEW_FAMILIES[family], key: value}))


@pytest.mark.parametrize("family, key, value, message", [
    ("mistral", "attention_bias", True, "'attention_bias' = True"),
    ("mistral", "rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "'rope_type' = 'yarn'"),
    ("phi3", "mlp_bias", True, "'mlp_bias' = True"),
    ("phi3", "rope_scaling", {"type": "dynamic", "factor": 2.0}, "'rope_type' = 'dynamic'"),
    ("phi3", "rope_scaling", {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0, 2.0]},
     "'short_factor' must list 2 factors"),
    ("phi3", "partial_rotary_factor", 0.3, "'partial_rotary_factor' = 0.3"),
    ("gemma2", "use_bidirectional_attention", True, "'use_bidirectional_attention' = True"),
    ("gemma2", "hidden_activation", "relu", "'hidden_activation' = 'relu'"),
    ("qwen3_moe", "num_experts_per_tok", 5, "'num_experts_per_tok' = 5 must be in 1..4"),
    ("qwen3_moe", "decoder_sparse_step", 0, "'decoder_sparse_step' = 0"),
    ("qwen3_moe", "num_experts", 8, "'num_experts' and 'num_local_experts' disagree"),
    ("qwen3_moe", "hidden_act", "gelu", "'hidden_act' = 'gelu'"),
])
def test_new_families_refuse_unsupported_values_by_name(family, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse({**NEW_FAMILIES[family], key: value})


def phi3_tensors():
    """The llama-shaped tensors of CONFIG with q/k/v and gate/up fused as Phi-3 saves them."""
    w = tensors()
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    w[attn + "qkv_proj.weight"] = np.concatenate([w.pop(attn + f"{p}_proj.weight") for p in "qkv"])
    w[mlp + "gate_up_proj.weight"] = np.concatenate([w.pop(mlp + "gate_proj.weight"), w.pop(mlp + "up_proj.weight")])
    return w


def test_phi3_fused_tensor_is_split_lazily(tmp_path):
    w = phi3_tensors()
    ir = hf.import_checkpoint(write(tmp_path / "ok", config=NEW_FAMILIES["phi3"], weights=w))
    k = ir.params["layers/0/self_attn/k_proj/kernel"]
    assert k.source == "model.safetensors:model.layers.0.self_attn.qkv_proj.weight[8:12]"
    np.testing.assert_array_equal(k.load(), w["model.layers.0.self_attn.qkv_proj.weight"][8:12].T)


@pytest.mark.parametrize("rows, match", [
    (14, r"has shape \[14, 8\]; rows 12:16 \(for layers/0/self_attn/v_proj/kernel\) are outside it"),
    (20, r"has 20 rows; the phi3 model uses rows \[\(0, 8\), \(8, 12\), \(12, 16\)\]")])
def test_phi3_fused_tensor_of_the_wrong_size_names_it(tmp_path, rows, match):
    w = phi3_tensors()
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    w[qkv] = np.resize(w[qkv], (rows, 8))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{re.escape(qkv)}' " + match):
        hf.import_checkpoint(write(tmp_path / "bad", config=NEW_FAMILIES["phi3"], weights=w))


def qwen3_moe_tensors(experts=4):
    """CONFIG's attention with layer 0's 4 experts stacked as transformers' model holds them
    (``experts`` of them in ``gate_up_proj``)."""
    w = tensors()
    rng, mlp = np.random.default_rng(1), "model.layers.0.mlp."
    for p in ("gate", "up", "down"):
        w.pop(mlp + f"{p}_proj.weight")
    w[mlp + "gate.weight"] = rng.standard_normal((4, 8)).astype(np.float32)
    w[mlp + "experts.gate_up_proj"] = rng.standard_normal((experts, 12, 8)).astype(np.float32)
    w[mlp + "experts.down_proj"] = rng.standard_normal((4, 8, 6)).astype(np.float32)
    for p in ("q", "k"):
        w[f"model.layers.0.self_attn.{p}_norm.weight"] = np.ones(4, np.float32)
    return w


def test_qwen3_moe_stacked_experts_are_sliced_lazily(tmp_path):
    w = qwen3_moe_tensors()
    ir = hf.import_checkpoint(write(tmp_path / "ok", config=NEW_FAMILIES["qwen3_moe"], weights=w))
    up = ir.params["layers/0/mlp/experts/2/up_proj/kernel"]
    assert up.source == "model.safetensors:model.layers.0.mlp.experts.gate_up_proj[2][6:12]"
    np.testing.assert_array_equal(up.load(), w["model.layers.0.mlp.experts.gate_up_proj"][2, 6:12].T)
    np.testing.assert_array_equal(ir.params["layers/0/mlp/experts/3/down_proj/kernel"].load(),
                                  w["model.layers.0.mlp.experts.down_proj"][3].T)


@pytest.mark.parametrize("experts, match", [
    (3, r"has shape \[3, 12, 8\]; the slice \[3\]\[0:6\] \(for layers/0/mlp/experts/3/gate_proj/kernel\) "
        r"is outside it"),
    (5, r"has shape \[5, 12, 8\] \(5 experts of 12 rows\); the qwen3_moe model uses \{expert: rows\} "
        r"\{0: \[\(0, 6\), \(6, 12\)\], 1: ")])
def test_qwen3_moe_stacked_tensor_of_the_wrong_expert_count_names_it(tmp_path, experts, match):
    w = qwen3_moe_tensors(experts)
    name = re.escape("model.layers.0.mlp.experts.gate_up_proj")
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' " + match):
        hf.import_checkpoint(write(tmp_path / "bad", config=NEW_FAMILIES["qwen3_moe"], weights=w))
