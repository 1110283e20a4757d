"""Our Flax forward pass against transformers' torch forward on tiny random checkpoints.

Each case writes a tiny random model with transformers (fp32), imports it with cqjax and
compares logits on right-padded sequences (only real tokens are compared).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cqjax.io import hf  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

MOE = dict(TINY, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)

CASES = {
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=False),
    "llama-tied-llama3rope-bias": lambda: transformers.LlamaConfig(
        **TINY, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False),
    "qwen3-sliding": lambda: transformers.Qwen3Config(
        **TINY, head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=1),
    # E=4 experts, top-2; layer 1 dense (mlp_only_layers), then with renormalized top-k weights,
    # every other layer sparse (decoder_sparse_step) and a sliding window on every layer.
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**MOE, mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_moe-normtopk-step-sliding": lambda: transformers.Qwen3MoeConfig(
        **MOE, norm_topk_prob=True, decoder_sparse_step=2, use_sliding_window=True, sliding_window=5),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **TINY, head_dim=32, sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                   "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}}),
    "gemma3-softcap": lambda: transformers.Gemma3TextConfig(
        **TINY, head_dim=16, sliding_window=4, attn_logit_softcapping=20.0, final_logit_softcapping=5.0),
    "mistral-sliding": lambda: transformers.MistralConfig(**TINY, sliding_window=5),
    "mistral-full": lambda: transformers.MistralConfig(**TINY, sliding_window=None, tie_word_embeddings=True),
    "phi3": lambda: transformers.Phi3Config(**TINY, pad_token_id=0, eos_token_id=1),
    # Partial rotary (half of each 16-wide head), a sliding window of 6, and longrope with an
    # original length of 12: the 19-token batch takes the long factors, a short one the short.
    "phi3-partial-longrope-sliding": lambda: transformers.Phi3Config(
        **{**TINY, "max_position_embeddings": 48}, pad_token_id=0, eos_token_id=1, partial_rotary_factor=0.5,
        sliding_window=6, original_max_position_embeddings=12, tie_word_embeddings=True,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 2.1, 3.7],
                      "long_factor": [1.5, 2.9, 5.3, 9.1]}),
    "gemma2": lambda: transformers.Gemma2Config(
        **TINY, head_dim=16, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
        final_logit_softcapping=3.0),
    "gemma2-nocap-gelu": lambda: transformers.Gemma2Config(
        **TINY, head_dim=32, sliding_window=3, attn_logit_softcapping=None, final_logit_softcapping=None,
        hidden_activation="gelu", layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        tie_word_embeddings=False),
}

#: Cases whose q/k projections are scaled up, so attention logits reach their soft cap (at the
#: default init they stay near 0, where ``tanh`` is the identity and a missing cap would pass).
QK_GAIN = {"gemma2": 12.0}
#: MoE router and expert weights scaled up from transformers' init (std 0.02): the router's
#: top-k is then far from ties and the experts' outputs are far above the parity tolerance.
ROUTER_GAIN, EXPERT_GAIN = 5.0, 10.0


def write_checkpoint(config, directory, dtype=torch.float32, seed=0, qk_gain=1.0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random norm weights, so a wrong norm offset cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
            if "q_proj" in name or "k_proj" in name:
                p.mul_(qk_gain)
            if name.endswith("mlp.gate.weight"):  # a MoE router: decisive routing, not near-ties
                p.mul_(ROUTER_GAIN)
            if ".experts." in name:  # experts that move the logits, so a routing bug shows
                p.mul_(EXPERT_GAIN)
    model.to(dtype).save_pretrained(directory)
    return model.float()


def batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(3, 19)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    mask[1, 11:] = False
    mask[2, 4:] = False
    return tokens, mask


def torch_logits(model, tokens, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()


def assert_matches(model, ref, vocab, name, seed=0, atol=1e-4, length=19):
    """Our logits vs transformers' on a right-padded batch, compared on real tokens only."""
    tokens, mask = batch(vocab, seed)
    tokens, mask = tokens[:, :length], mask[:, :length]
    ours = np.asarray(model(tokens, mask))
    theirs = torch_logits(ref, tokens, mask)
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs)[mask]
    assert diff.max() < atol, f"{name}: max abs logit diff {diff.max():.2e}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_transformers(name, tmp_path):
    ref = write_checkpoint(CASES[name](), tmp_path, qk_gain=QK_GAIN.get(name, 1.0))
    model, ir = hf.load(tmp_path)
    assert_matches(model, ref, TINY["vocab_size"], name)


def test_bf16_checkpoint(tmp_path):
    write_checkpoint(CASES["llama"](), tmp_path, dtype=torch.bfloat16)
    model, ir = hf.load(tmp_path)
    assert {m.dtype for m in ir.meta.values()} == {"bfloat16"}
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_matches(model, ref, TINY["vocab_size"], "bf16", seed=1)


def test_ir_roles_and_layout(tmp_path):
    write_checkpoint(CASES["llama"](), tmp_path)
    ir = hf.import_checkpoint(tmp_path)
    m = ir.meta["layers/0/self_attn/q_proj/kernel"]
    assert (m.role, m.tower, m.hf_name) == ("linear", "text", "model.layers.0.self_attn.q_proj.weight")
    assert m.shape == (64, 64)
    assert ir.meta["layers/1/mlp/down_proj/kernel"].shape == (96, 64)  # [in, out]
    assert ir.meta["embed_tokens/embedding"].role == "embedding"
    assert ir.meta["lm_head/kernel"].role == "lm_head"
    assert ir.meta["norm/scale"].role == "norm"


def test_gemma2_parity_sees_the_attention_softcap(tmp_path):
    """transformers' Gemma2 caps attention logits (Gemma3 does not): dropping the cap from the
    imported config moves the logits far past the parity tolerance, so the parity case checks it."""
    import dataclasses

    ref = write_checkpoint(CASES["gemma2"](), tmp_path, qk_gain=QK_GAIN["gemma2"])
    ir = hf.import_checkpoint(tmp_path)
    assert (ir.config.attn_softcap, ir.config.final_softcap) == (4.0, 3.0)
    uncapped = hf.to_model(dataclasses.replace(ir, config=dataclasses.replace(ir.config, attn_softcap=None)))
    tokens, mask = batch(TINY["vocab_size"])
    diff = np.abs(np.asarray(uncapped(tokens, mask)) - torch_logits(ref, tokens, mask))[mask]
    assert diff.max() > 1e-2


def test_phi3_longrope_short_and_long_factors(tmp_path):
    """longrope picks its factor set per call from the longest position, as transformers does:
    12 tokens (within the original 12) take the short factors, 13 the long ones."""
    ref = write_checkpoint(CASES["phi3-partial-longrope-sliding"](), tmp_path)
    model, ir = hf.load(tmp_path)
    assert ir.config.rotary_dim == 8
    for length in (12, 13):
        assert_matches(model, ref, TINY["vocab_size"], f"phi3 longrope, {length} tokens", length=length)


def test_phi3_fused_tensors_split_into_plain_linears(tmp_path):
    write_checkpoint(CASES["phi3"](), tmp_path)
    ir = hf.import_checkpoint(tmp_path)
    q, k, v = (ir.meta[f"layers/1/self_attn/{p}_proj/kernel"] for p in "qkv")
    assert (q.role, q.shape, q.hf_name) == ("linear", (64, 64), "model.layers.1.self_attn.qkv_proj.weight[0:64]")
    assert (k.shape, k.hf_name) == ((64, 32), "model.layers.1.self_attn.qkv_proj.weight[64:96]")
    assert v.hf_name == "model.layers.1.self_attn.qkv_proj.weight[96:128]"
    assert ir.meta["layers/1/mlp/up_proj/kernel"].hf_name == "model.layers.1.mlp.gate_up_proj.weight[96:192]"
    fused = np.asarray(ir.params["layers/1/mlp/gate_proj/kernel"].reader())
    np.testing.assert_array_equal(hf.load_leaf(ir, "layers/1/mlp/gate_proj/kernel"), fused.T)


def test_qwen3_moe_imports_experts_as_plain_linears(tmp_path):
    write_checkpoint(CASES["qwen3_moe"](), tmp_path)
    ir = hf.import_checkpoint(tmp_path)
    assert ir.config.moe_layers == (0, 2) and (ir.config.num_experts, ir.config.top_k_experts) == (4, 2)
    m = ir.meta["layers/2/mlp/experts/3/gate_proj/kernel"]
    assert (m.role, m.shape, m.hf_name) == ("linear", (64, 48), "model.layers.2.mlp.experts.3.gate_proj.weight")
    assert ir.meta["layers/2/mlp/experts/3/down_proj/kernel"].shape == (48, 64)
    assert (ir.meta["layers/0/mlp/gate/kernel"].role, ir.meta["layers/0/mlp/gate/kernel"].shape) == ("router", (64, 4))
    assert ir.meta["layers/1/mlp/gate_proj/kernel"].shape == (64, 96)  # mlp_only_layers: dense
    assert not any(p.startswith("layers/1/mlp/experts") for p in ir.meta)


@pytest.mark.parametrize("change", [dict(norm_topk_prob=False), dict(top_k_experts=1)])
def test_qwen3_moe_parity_sees_the_routing(tmp_path, change):
    """Renormalizing the top-k weights or not, or routing to one expert fewer, moves the logits
    far past the parity tolerance (the routing is exercised, not drowned by the dense path)."""
    import dataclasses

    ref = write_checkpoint(CASES["qwen3_moe-normtopk-step-sliding"](), tmp_path)
    ir = hf.import_checkpoint(tmp_path)
    assert (ir.config.norm_topk_prob, ir.config.moe_layers, ir.config.sliding_window) == (True, (1,), 5)
    changed = hf.to_model(dataclasses.replace(ir, config=dataclasses.replace(ir.config, **change)))
    tokens, mask = batch(TINY["vocab_size"])
    diff = np.abs(np.asarray(changed(tokens, mask)) - torch_logits(ref, tokens, mask))[mask]
    assert diff.max() > 1e-2
