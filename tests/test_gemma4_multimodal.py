"""Gemma 4 in full (text, vision and audio): prompts with audio against transformers'
``Gemma4ForConditionalGeneration`` (fp32), greedy decoding from text+image and text+audio prompts
through the KV cache, the whole model quantized (4 bits, and the ``mobile`` bundle's widths), saved,
loaded, run on both kernel paths and exported back to transformers.

The tiny random checkpoint is test_gemma4_vision's (per-layer embeddings, sliding and full
layers, bidirectional image attention, finite clip bounds that bind) with an audio tower beside
the vision tower; the bundle's widths are checked on one whose text model has a mixture of
experts. Audio comes as two clips, the second padded: 6 and 4 soft tokens.
"""

from __future__ import annotations

import doctest
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from omegaconf import OmegaConf  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from test_gemma4_vision import (AUDIO, BOI, EOI, IDS, IMAGE, TEXT, assert_close, images, rel_error,  # noqa: E402
                                write_multimodal)

from cqjax import api, runtime  # noqa: E402
from cqjax.config import config_dir  # noqa: E402
from cqjax.errors import ConfigError  # noqa: E402
from cqjax.io import export, hf  # noqa: E402
from cqjax.kernels import backend  # noqa: E402
from cqjax.kernels.qarrays import is_quantized  # noqa: E402
from cqjax.models import gemma4, gemma4_audio as ga, gemma4_multimodal as mm  # noqa: E402
from cqjax.models.gemma4 import parse_gemma4  # noqa: E402
from cqjax.quant_stats import is_eligible  # noqa: E402

MOE_TEXT = {**TEXT, "enable_moe_block": True, "num_experts": 3, "top_k_experts": 2, "moe_intermediate_size": 24}
AUD, BOA, EOA = IDS["audio_token_id"], IDS["boa_token_id"], IDS["eoa_token_index"]
MELS = AUDIO["subsampling_conv_channels"][0]


def clips(seed=0):
    """``(input_features [2, 23, MELS], input_features_mask)``: the second clip 13 frames long."""
    mask = np.ones((2, 23), bool)
    mask[1, 13:] = False
    return np.random.default_rng(seed).standard_normal((2, 23, MELS)).astype(np.float32), mask


def rows(*rows):
    """Right-padded ``(tokens, mask)``."""
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    mask = np.zeros(tokens.shape, bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, True
    return tokens, mask


def audio(n):
    return [BOA, *[AUD] * n, EOA]


def image(n):
    return [BOI, *[IMAGE] * n, EOI]


#: name: (rows, uses images, uses audio); the images give 6, 1 and 6 soft tokens, the clips 6 and 4.
PROMPTS = {
    "text+audio": ([[2, 5, *audio(6), 7, 8], [2, 3, 4, *audio(4), 11, 12, 13, 14]], False, True),
    "text+image+audio": ([[2, *image(6), 5, *audio(6), 7, *image(1), 8], [2, 3, *audio(4), *image(6), 11, 12]],
                         True, True),
}


def prompt(name):
    """``(tokens, mask, inputs)`` of a :data:`PROMPTS` entry."""
    tokens, mask = rows(*PROMPTS[name][0])
    _, with_images, with_audio = PROMPTS[name]
    inputs = {}
    if with_images:
        inputs |= dict(zip(("pixel_values", "image_position_ids"), images()))
    if with_audio:
        inputs |= dict(zip(("input_features", "input_features_mask"), clips()))
    return tokens, mask, inputs


def torch_inputs(tokens, mask, inputs):
    """transformers' keyword arguments of a prompt (``mm_token_type_ids`` marks the images)."""
    t = lambda a, dtype=torch.long: torch.tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    out = dict(input_ids=t(tokens), attention_mask=t(mask), mm_token_type_ids=t(tokens == IMAGE))
    for key, value in inputs.items():
        out[key] = t(value, {"pixel_values": torch.float32, "input_features": torch.float32,
                             "input_features_mask": torch.bool}.get(key, torch.long))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma4-full")
    return directory, write_multimodal(directory, audio=AUDIO)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return hf.load(ckpt[0])


# ---------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_audio_prompt_matches_transformers(name, ckpt, loaded):
    ref, model = ckpt[1], loaded[0]
    tokens, mask, inputs = prompt(name)
    ours = mm.prompt_logits(model, tokens, mask, **inputs)
    with torch.no_grad():
        theirs = ref(**torch_inputs(tokens, mask, inputs)).logits.numpy()
    assert_close(ours[mask], theirs[mask], name, rel=1e-5)


def test_prompt_inputs_are_checked_against_the_placeholders(loaded):
    model = loaded[0]
    tokens, _, inputs = prompt("text+image+audio")
    assert sorted(model.prompt_inputs(tokens, **inputs, pixel_values_videos=None)) == sorted(inputs)
    short = tokens.copy()
    short[0, 11] = 7  # one audio placeholder less
    assert tokens[0, 11] == AUD
    with pytest.raises(ValueError, match=f"9 audio placeholders \\(audio_token_id {AUD}\\); the audio gives 10"):
        model.prompt_inputs(short, **inputs)
    with pytest.raises(ValueError, match="input_features and input_features_mask go together"):
        model.prompt_inputs(tokens, input_features=inputs["input_features"])
    with pytest.raises(ValueError, match=r"\['pixel_values_videos'\] are not read"):
        model.prompt_inputs(tokens, pixel_values_videos=inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"input_features \[2, 23\] and input_features_mask \[2, 23\]"):
        model.prompt_inputs(tokens, input_features=inputs["input_features"][..., 0],
                            input_features_mask=inputs["input_features_mask"])


@pytest.mark.parametrize("changes, key", [
    ({"audio_config": {"frobnicate": 1}}, r"\(audio_config\): config key 'frobnicate'"),
    ({"audio_config": {"hidden_act": "relu"}}, r"\(audio_config\): config key 'hidden_act'"),
    ({"audio_token_id": None}, "config key 'audio_token_id' = None"),
])
def test_audio_config_errors_name_the_key(ckpt, changes, key):
    raw = json.loads((ckpt[0] / "config.json").read_text())
    for k, v in changes.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
    with pytest.raises(ConfigError, match=key):
        parse_gemma4(raw, "config.json")


def test_module_doctests():
    for module in (gemma4, mm, ga):
        assert doctest.testmod(module, verbose=False).failed == 0, module.__name__


# ---------------------------------------------------------------------------------------------
# Generation through the KV cache
# ---------------------------------------------------------------------------------------------


def test_generate_from_a_multimodal_prompt_gives_transformers_greedy_tokens(ckpt, loaded):
    """Two prompts of different lengths with images and audio, left-padded into one batch: the
    images' soft tokens see each other in the cached prefill (bidirectional on sliding layers)
    as in transformers' generate, and the decode steps read text only. The tokens see both
    towers: with causal image blocks row 0 decodes other tokens, with other audio row 1 does."""
    ref, model = ckpt[1], loaded[0]
    prompts = [[2, 5, *image(6), 9, *audio(6), *image(1), 7, 8], [2, 3, *audio(4), *image(6), 11]]
    inputs = dict(zip(("pixel_values", "image_position_ids"), images()))
    inputs |= dict(zip(("input_features", "input_features_mask"), clips()))
    ours = runtime.generate(model, prompts, max_new_tokens=6, **inputs)
    tokens, mask = runtime.left_pad(prompts)
    with torch.no_grad():
        theirs = ref.generate(**torch_inputs(tokens, mask, inputs), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, pad_token_id=0).numpy()[:, tokens.shape[1]:]
    assert [row[len(p):].tolist() for row, p in zip(ours, prompts)] == theirs.tolist()


def test_decoder_refuses_inputs_a_model_does_not_read(tmp_path):
    from test_gemma4 import CASES, write_gemma4

    write_gemma4(CASES["kv-shared"](), tmp_path)
    text_only = runtime.Decoder(hf.load(tmp_path)[0], batch=1, max_len=8)
    with pytest.raises(ValueError, match=r"Gemma4ForCausalLM reads tokens only; got inputs \['pixel_values'\]"):
        text_only.prefill(np.ones((1, 4), np.int32), pixel_values=np.zeros((1, 4, 12)))


# ---------------------------------------------------------------------------------------------
# Quantized (4 bits; the mobile bundle's widths), saved, loaded, on both kernel paths, exported
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(ckpt):
    return api.quantize(ckpt[0], bits=4, progress=False)


@pytest.fixture(scope="module")
def quantized_logits(quantized):
    """The 4-bit model's logits of the text+image+audio prompt, pure JAX."""
    tokens, mask, inputs = prompt("text+image+audio")
    with backend.use_kernel("jax"):
        return mm.prompt_logits(quantized.model, tokens, mask, **inputs)


#: conf/bundle/mobile.yaml's rules, as ``bundle=mobile`` gives them to ``quant.roles``.
MOBILE = OmegaConf.to_container(OmegaConf.load(f"{config_dir()}/bundle/mobile.yaml"))["roles"]


def test_mobile_bundle_quantizes_every_tower_at_its_width(tmp_path):
    """``bundle=mobile quant.bits=4`` on the full model with experts: every linear and
    convolution of the three towers (each expert one by one), the embeddings and the per-layer
    table are quantized at the bundle's widths (towers 2, text linears 4); everything else
    comes back bit-identical."""
    write_multimodal(tmp_path, audio=AUDIO, text=MOE_TEXT)
    ir = hf.import_checkpoint(tmp_path)
    q = api.quantize(ir, bits=4, roles=MOBILE, progress=False).ir
    for path, meta in ir.meta.items():
        leaf = q.params[path]
        if not is_eligible(path, meta):
            np.testing.assert_array_equal(hf.load_leaf(q, path), hf.load_leaf(ir, path), err_msg=path)
            continue
        bits = {"vision": 2, "audio": 2}.get(meta.tower, {"per_layer_embedding": 2}.get(meta.role, 4))
        assert is_quantized(leaf) and int(leaf.bits) == bits, path
    towers = {(m.tower, m.role) for p, m in ir.meta.items() if is_quantized(q.params[p])}
    assert {("vision", "linear"), ("audio", "linear"), ("audio", "conv"), ("text", "linear")} <= towers
    experts = [p for p in ir.meta if "/experts/" in p]
    assert len(experts) == 3 * 3 * 3 and all(is_quantized(q.params[p]) for p in experts)
    assert not is_quantized(q.params["layers/0/router/proj/kernel"])


def test_quantized_artifact_round_trips(quantized, tmp_path):
    """4 bits: every linear and convolution of the three towers is quantized; save and load give
    back the config (both towers), the metadata and every leaf as it was (quantized leaves: the
    same arrays and format fields)."""
    assert all(is_quantized(quantized.ir.params[p]) for p, m in quantized.ir.meta.items()
               if m.role in ("linear", "conv"))
    api.save(quantized, tmp_path / "art")
    back = api.load(tmp_path / "art")
    assert back.ir.config == quantized.ir.config and back.ir.config.audio is not None
    assert dict(back.ir.meta) == dict(quantized.ir.meta)
    for path in quantized.ir.params:
        ours, theirs = jax.tree_util.tree_flatten(hf.load_leaf(back.ir, path)), jax.tree_util.tree_flatten(
            hf.load_leaf(quantized.ir, path))
        assert ours[1] == theirs[1], path
        for a, b in zip(ours[0], theirs[0]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
    assert isinstance(back.model, mm.Gemma4ForConditionalGeneration)


@pytest.mark.slow  # ~15 s on 2 cores (30 s under load): compiles the whole 4-bit model for both kernel paths
def test_quantized_prompt_runs_on_both_kernel_paths(quantized, quantized_logits):
    """A text+image+audio prompt through the quantized model: the C++ kernel's logits are the
    pure-JAX runtime's within its int8 activation rounding (as test_gemma4). The pure-JAX
    logits are those of the decoded weights: see the export test below."""
    if not backend.ffi_available():
        pytest.skip("the C++ kernel is not built")
    tokens, mask, inputs = prompt("text+image+audio")
    with backend.use_kernel("ffi"):
        kernel = mm.prompt_logits(quantized.model, tokens, mask, **inputs)[mask]
    assert not np.array_equal(kernel, quantized_logits[mask])
    assert rel_error(kernel, quantized_logits[mask]) < 5e-2


def test_float_export_writes_the_checkpoint_back(loaded, ckpt, tmp_path):
    """Exporting the float IR writes every tensor of the source checkpoint back bit for bit,
    the audio tower's convolutions folded back to ``[out, in, 3, 3]``."""
    out = export.export_hf(loaded[1], tmp_path / "hf", config_from=ckpt[0])
    written, source = load_file(out / "model.safetensors"), load_file(ckpt[0] / "model.safetensors")
    assert set(written) == set(source)
    conv = "model.audio_tower.subsample_conv_projection.layer1.conv.weight"
    assert written[conv].shape == (AUDIO["subsampling_conv_channels"][1], MELS, 3, 3)
    for name, array in source.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)


@pytest.mark.slow  # ~12 s on 2 cores alone (the 4-bit model's compile), ~2 s after the test above
def test_quantized_export_runs_in_transformers_with_the_quantized_logits(quantized, quantized_logits, ckpt,
                                                                         tmp_path):
    tokens, mask, inputs = prompt("text+image+audio")
    out = export.export_hf(quantized.ir, tmp_path / "hf", config_from=ckpt[0])
    ref = transformers.Gemma4ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(**torch_inputs(tokens, mask, inputs)).logits.numpy()
    assert_close(quantized_logits[mask], theirs[mask], "export", rel=1e-4)
