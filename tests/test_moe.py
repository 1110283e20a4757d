"""Qwen3-MoE: every expert is its own 2-D linear, quantized per expert, in both checkpoint
layouts (one tensor per expert, as transformers saves; stacked 3-D tensors, sliced per expert)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from cqjax import api  # noqa: E402
from cqjax.io import export, hf  # noqa: E402
from cqjax.kernels.qarrays import is_quantized  # noqa: E402
from test_export import assert_export_matches, runtime_logits  # noqa: E402
from test_parity import MOE, TINY, write_checkpoint  # noqa: E402

EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def stack_experts(src, dst):
    """A copy of checkpoint ``src`` with each layer's experts stacked as transformers' model
    holds them: ``gate_up_proj [E, 2I, D]`` (gate rows first) and ``down_proj [E, D, I]``."""
    shutil.copytree(src, dst)
    flat, experts = {}, {}
    for name, array in load_file(src / "model.safetensors").items():
        m = EXPERT.fullmatch(name)
        if m:
            experts.setdefault(m[1], {})[int(m[2]), m[3]] = array
        else:
            flat[name] = array
    for base, w in experts.items():
        n = 1 + max(e for e, _ in w)
        flat[base + ".gate_up_proj"] = np.stack([np.concatenate([w[e, "gate_proj"], w[e, "up_proj"]])
                                                 for e in range(n)])
        flat[base + ".down_proj"] = np.stack([w[e, "down_proj"] for e in range(n)])
    save_file(flat, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """``{layout: checkpoint dir}`` of one tiny Qwen3-MoE: layer 0 sparse (E=4, top-2), layer 1 dense."""
    root = tmp_path_factory.mktemp("moe")
    config = transformers.Qwen3MoeConfig(**{**MOE, "num_hidden_layers": 2}, mlp_only_layers=[1], norm_topk_prob=True)
    write_checkpoint(config, root / "per_expert")
    return {"per_expert": root / "per_expert", "stacked": stack_experts(root / "per_expert", root / "stacked")}


@pytest.fixture(scope="module")
def quantized(ckpts):
    return {layout: api.quantize(d, bits=4, progress=False) for layout, d in ckpts.items()}


def tokens(seed=0, shape=(3, 16)):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], shape).astype(np.int32)


def test_stacked_experts_import_as_slices_of_the_same_linears(ckpts):
    per, ir = hf.load(ckpts["per_expert"])
    stacked, sir = hf.load(ckpts["stacked"])
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    assert sir.meta["layers/0/mlp/experts/3/gate_proj/kernel"].hf_name == gate_up + "[3][0:48]"
    assert sir.meta["layers/0/mlp/experts/3/up_proj/kernel"].hf_name == gate_up + "[3][48:96]"
    assert sir.meta["layers/0/mlp/experts/1/down_proj/kernel"].hf_name == "model.layers.0.mlp.experts.down_proj[1]"
    assert sir.params["layers/0/mlp/experts/3/up_proj/kernel"].source == f"model.safetensors:{gate_up}[3][48:96]"
    for path, m in ir.meta.items():  # the same leaves, bit for bit
        assert sir.meta[path].shape == m.shape
        np.testing.assert_array_equal(hf.load_leaf(sir, path), hf.load_leaf(ir, path))
    np.testing.assert_array_equal(runtime_logits(per, tokens()), runtime_logits(stacked, tokens()))


@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
def test_every_expert_is_quantized_and_the_router_stays_float(quantized, ckpts, layout):
    q = quantized[layout]
    experts = [p for p in q.ir.params if "/mlp/experts/" in p]
    assert len(experts) == 4 * 3  # 4 experts x gate/up/down
    assert all(is_quantized(q.ir.params[p]) for p in experts)
    assert not any(is_quantized(q.ir.params[f"layers/{i}/mlp/gate/kernel"]) for i in (0,))
    assert is_quantized(q.ir.params["layers/1/mlp/gate_proj/kernel"])  # the dense layer too
    # Quantized per expert, the logits stay near the float model's (a tiny random model's
    # logits are nearly flat, so top-1 agreement is no measure; relative error and KL are).
    ids = tokens(1)
    floats = runtime_logits(hf.load(ckpts[layout])[0], ids)
    assert rel_error(runtime_logits(q.model, ids), floats) < 0.5
    assert kl(floats, runtime_logits(q.model, ids)) < 1e-3


def rel_error(ours, floats):
    """``‖ours − floats‖ / ‖floats − mean‖`` over every logit (centered per row)."""
    return np.linalg.norm(ours - floats) / np.linalg.norm(floats - floats.mean(-1, keepdims=True))


def kl(p_logits, q_logits):
    """Mean ``KL(p ‖ q)`` per token, in nats."""
    lp, lq = (x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
              for x in (p_logits, q_logits))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_save_load_round_trip_gives_identical_logits(quantized, tmp_path):
    q = quantized["stacked"]
    api.save(q, tmp_path / "art")
    back = api.load(tmp_path / "art")
    assert back.ir.meta["layers/0/mlp/experts/2/up_proj/kernel"].hf_name == \
        "model.layers.0.mlp.experts.gate_up_proj[2][48:96]"
    np.testing.assert_array_equal(runtime_logits(back.model, tokens()), runtime_logits(q.model, tokens()))


@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
def test_export_runs_in_transformers_with_the_quantized_logits(quantized, ckpts, tmp_path, layout):
    q = quantized[layout]
    out = export.export_hf(q.ir, tmp_path / "hf", config_from=ckpts[layout])
    written = load_file(out / "model.safetensors")
    assert set(written) == set(load_file(ckpts[layout] / "model.safetensors"))  # the source's layout
    if layout == "stacked":
        assert written["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 64)
        assert written["model.layers.0.mlp.experts.down_proj"].shape == (4, 64, 48)
    assert_export_matches(q, out, tokens(2))
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
