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
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **TINY, head_dim=32, sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                   "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}}),
    "gemma3-softcap": lambda: transformers.Gemma3TextConfig(
        **TINY, head_dim=16, sliding_window=4, attn_logit_softcapping=20.0, final_logit_softcapping=5.0),
}


def write_checkpoint(config, directory, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random norm weights, so a wrong norm offset cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
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


def assert_matches(model, ref, vocab, name, seed=0, atol=1e-4):
    """Our logits vs transformers' on a right-padded batch, compared on real tokens only."""
    tokens, mask = batch(vocab, seed)
    ours = np.asarray(model(tokens, mask))
    theirs = torch_logits(ref, tokens, mask)
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs)[mask]
    assert diff.max() < atol, f"{name}: max abs logit diff {diff.max():.2e}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_transformers(name, tmp_path):
    ref = write_checkpoint(CASES[name](), tmp_path)
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
