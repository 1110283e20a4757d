"""Gemma 4's audio tower: cqjax's tower and embedder against transformers' soft tokens
(``Gemma4Model.get_audio_features``), the IR mapping through the importer, the log-mel
features, config errors, and the tower quantized on both kernel paths.

Each case saves a tiny random ``Gemma4ForConditionalGeneration`` with text and audio (fp32;
random norm weights, ``per_dim_scale`` and finite clip bounds, so that a skipped clip, norm or
scale cannot hide) and imports it through the ``gemma4`` family; the soft tokens are those of
its ``audio_tower`` and ``embed_audio``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from cqjax import api, runtime  # noqa: E402
from cqjax.errors import CheckpointError, ConfigError  # noqa: E402
from cqjax.eval import gemma4_features  # noqa: E402
from cqjax.io import hf  # noqa: E402
from cqjax.kernels import backend  # noqa: E402
from cqjax.kernels.qarrays import is_quantized  # noqa: E402
from cqjax.models import gemma4_audio as ga  # noqa: E402

# Odd sizes: 3 heads of 8, 11 mel bins (a quarter of them, 3, left after subsampling = 12 // 4).
AUDIO = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, subsampling_conv_channels=[12, 5],
             output_proj_dims=20, conv_kernel_size=3)
TEXT = dict(vocab_size=64, hidden_size=28, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, hidden_size_per_layer_input=4, vocab_size_per_layer_input=64,
            layer_types=["full_attention"])
MELS = 11
CASES = {
    # a right context; 45 frames -> 12 soft tokens in 3 blocks of 4
    "right-context": dict(attention_chunk_size=4, attention_context_left=5, attention_context_right=2),
    # the released layout: no right context, context_left = chunk + 1
    "left-only": dict(attention_chunk_size=3, attention_context_left=4, attention_context_right=0),
    # no clip bounds; GELU; a soft cap, residual weight, eps and activation clip that bind
    "unclipped": dict(use_clipped_linears=False, hidden_act="gelu_pytorch_tanh", attention_chunk_size=5,
                      attention_context_left=3, attention_context_right=1, attention_logit_cap=1.5,
                      residual_weight=0.7, rms_norm_eps=1e-2, gradient_clipping=2.0),
}


def write_checkpoint(directory, case: str, seed: int = 0, finite_bounds: bool = True, **changes):
    """A random tiny multimodal Gemma 4 (text + audio, ``changes`` to the audio config of
    ``case``) saved to ``directory``; returns the torch model. ``finite_bounds`` False keeps
    transformers' initial clip bounds, ±inf."""
    audio = {**AUDIO, **CASES[case], **changes}
    cfg = transformers.Gemma4Config(text_config=TEXT, audio_config=audio, vision_config=None)
    torch.manual_seed(seed)
    model = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "audio" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim < 2 else 0.25))
        for name, b in model.named_buffers():
            if finite_bounds and name.endswith(("input_min", "output_min")):
                b.copy_(-0.6 - torch.rand((), generator=gen))
            elif finite_bounds and name.endswith(("input_max", "output_max")):
                b.copy_(0.6 + torch.rand((), generator=gen))
    model.save_pretrained(directory)
    return model


def inputs(seed=0, frames=45):
    """Features ``[2, frames, MELS]`` and a mask with the second clip 30 frames long."""
    rng = np.random.default_rng(seed)
    mask = np.ones((2, frames), bool)
    mask[1, 30:] = False
    return rng.standard_normal((2, frames, MELS)).astype(np.float32), mask


def theirs(ref, features, mask):
    with torch.no_grad():
        out = ref.model.get_audio_features(torch.tensor(features), torch.tensor(mask), return_dict=True)
    return out.pooler_output.numpy(), out.attention_mask.numpy()


def soft_tokens(model, features, mask):
    """:func:`audio_soft_tokens` as numpy, jitted afresh (the kernel mode is read when tracing)."""
    tokens, token_mask = nnx.jit(lambda m, f, k: ga.audio_soft_tokens(m, f, k))(model, features, mask)
    return np.asarray(tokens), np.asarray(token_mask)


def relative(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_soft_tokens_match_transformers(case, tmp_path):
    ref = write_checkpoint(tmp_path, case)
    ir = hf.import_checkpoint(tmp_path)
    features, mask = inputs()
    tokens, token_mask = soft_tokens(hf.to_model(ir), features, mask)
    want, want_mask = theirs(ref, features, mask)
    assert tokens.shape == want.shape == (2, 12, TEXT["hidden_size"])
    np.testing.assert_array_equal(token_mask, want_mask)
    assert want_mask.sum(1).tolist() == [12, 8]  # the padded clip: ceil(ceil(30 / 2) / 2) tokens
    assert relative(tokens, want) < 1e-5  # every position, padding included


def test_infinite_clip_bounds_mean_no_clip_and_pass_the_finite_check(tmp_path):
    """transformers initializes the bounds to ±inf: clipping then does nothing, and such a
    checkpoint quantizes (the open bounds pass :func:`cqjax.io.hf.check_finite`, which
    api.quantize and the CLI run); NaN, an infinity on a bound's other side or anywhere else
    still fails it."""
    ref = write_checkpoint(tmp_path, "left-only", finite_bounds=False, num_hidden_layers=1)
    ir = hf.import_checkpoint(tmp_path)
    bound = "audio_tower/layers/0/self_attn/q_proj/input_min"
    assert float(hf.load_leaf(ir, bound)) == -np.inf
    features, mask = inputs(1, frames=17)
    assert relative(soft_tokens(hf.to_model(ir), features, mask)[0], theirs(ref, features, mask)[0]) < 1e-5
    q = api.quantize(ir, bits=4, progress=False)
    assert float(hf.load_leaf(q.ir, bound)) == -np.inf
    for path, value in ((bound, np.nan), (bound, np.inf), (bound.replace("input_min", "output_max"), -np.inf),
                        ("layers/0/layer_scalar", np.full((1,), np.inf, np.float32)),
                        ("audio_tower/layers/0/self_attn/q_proj/linear/kernel", np.full((24, 24), np.inf, np.float32))):
        with pytest.raises(CheckpointError, match=f"tensor {path} has a non-finite value"):
            hf.check_finite(ir.replace(params={path: np.asarray(value, np.float32)}))


@pytest.mark.parametrize("case", ["right-context", "unclipped"])
def test_ir_paths_roles_and_checkpoint_names(case, tmp_path):
    write_checkpoint(tmp_path, case)
    ir = hf.import_checkpoint(tmp_path)
    meta = {p: m for p, m in ir.meta.items() if p.startswith(ga.AUDIO_PREFIXES)}
    assert meta == ga.audio_params(ir.config.audio)  # the listing is what the importer reads
    assert {m.tower for p, m in ir.meta.items() if p not in meta} == {"text"}
    roles = {p: m.role for p, m in meta.items()}
    quantizable = sorted(p.removeprefix("audio_tower/layers/0/") for p, r in roles.items()
                         if r in ("linear", "conv") and p.startswith("audio_tower/layers/0/"))
    assert quantizable == sorted([f"{m}/linear/kernel" for m in (
        "feed_forward1/ffw_layer_1", "feed_forward1/ffw_layer_2", "feed_forward2/ffw_layer_1",
        "feed_forward2/ffw_layer_2", "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/post",
        "lconv1d/linear_start", "lconv1d/linear_end")] + ["self_attn/relative_k_proj/kernel"])
    sub = "audio_tower/subsample_conv_projection/"
    assert (roles[sub + "layer0/conv/kernel"], meta[sub + "layer0/conv/kernel"].shape) == ("conv", (9, 12))
    assert (roles[sub + "layer1/conv/kernel"], meta[sub + "layer1/conv/kernel"].shape) == ("conv", (108, 5))
    proj = sub + "input_proj_linear/kernel"
    assert (roles[proj], meta[proj].shape) == ("linear", (15, 24))  # (3 mel x 5 channels, hidden)
    assert roles[sub + "layer1/norm/scale"] == "norm" and sub + "layer1/norm/bias" not in meta
    depthwise = "audio_tower/layers/1/lconv1d/depthwise_conv1d/kernel"
    assert (roles[depthwise], meta[depthwise].shape) == ("other", (24, 1, 3))
    assert meta[depthwise].hf_name == "model.audio_tower.layers.1.lconv1d.depthwise_conv1d.weight"
    assert roles["audio_tower/layers/0/self_attn/per_dim_scale"] == "other"
    assert (roles["audio_tower/output_proj/bias"], meta["embed_audio/embedding_projection/kernel"].shape) == (
        "bias", (20, 28))
    bound = "audio_tower/layers/1/lconv1d/linear_end/output_max"
    if ir.config.audio.clipped_linears:
        assert (roles[bound], meta[bound].shape, meta[bound].hf_name) == (
            "other", (), "model.audio_tower.layers.1.lconv1d.linear_end.output_max")
        assert sum(p.endswith(("_min", "_max")) for p in meta) == 2 * 10 * 4  # layers x clippable x bounds
    else:
        assert not any(p.endswith(("_min", "_max")) for p in meta)
    # a 2-D convolution's kernel row (i * 3 + j) * in + c holds weight[:, c, i, j]
    w = load_file(tmp_path / "model.safetensors")["model.audio_tower.subsample_conv_projection.layer1.conv.weight"]
    np.testing.assert_array_equal(np.asarray(hf.load_leaf(ir, sub + "layer1/conv/kernel"))[(2 * 3 + 1) * 12 + 7],
                                  w[:, 7, 2, 1])


def _raw_audio_config(**changes):
    return {**transformers.Gemma4AudioConfig(**AUDIO).to_dict(), **changes}


@pytest.mark.parametrize("changes, key", [
    ({"frobnicate_heads": 3}, "frobnicate_heads"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"subsampling_conv_channels": [12, 5, 3]}, "subsampling_conv_channels"),
    ({"num_attention_heads": 5}, "hidden_size"),
    ({"attention_context_left": 0}, "attention_context_left"),
    ({"model_type": "gemma3n_audio"}, "model_type"),
])
def test_unsupported_audio_config_raises_naming_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        ga.parse_audio_config(_raw_audio_config(**changes), "config.json", text_hidden_size=28)


def test_wrong_mel_count_is_an_error_naming_it(tmp_path):
    write_checkpoint(tmp_path, "left-only", num_hidden_layers=1)
    with pytest.raises(ValueError, match="15 mel bins"):
        soft_tokens(hf.load(tmp_path)[0], np.zeros((2, 45, 15), np.float32), inputs()[1])


# ---------------------------------------------------------------------------------------------
# Log-mel features
# ---------------------------------------------------------------------------------------------


def _clips(rate=16_000):
    rng = np.random.default_rng(0)
    t = np.arange(int(1.37 * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    return [tone, (0.1 * rng.standard_normal(int(0.61 * rate))).astype(np.float32)]


@pytest.mark.parametrize("options", [
    {},  # the released extractor
    dict(feature_size=MELS, frame_length_ms=25.0, hop_length_ms=12.5, preemphasis=0.97, fft_overdrive=True,
         input_scale_factor=2.0, mel_floor=1e-5, min_frequency=60.0, max_frequency=7600.0,
         per_bin_mean=list(np.linspace(-1, 1, MELS)), per_bin_stddev=list(np.linspace(0.5, 2, MELS))),
    dict(preemphasis=0.5, preemphasis_htk_flavor=False),
])
def test_log_mel_matches_transformers_feature_extractor(options):
    extractor = transformers.Gemma4AudioFeatureExtractor(**options)
    clips = _clips()
    want = extractor(clips, return_tensors="np")
    # the saved config keeps the frame and hop in samples, not the *_ms they came from
    saved = {**extractor.to_dict(), **{k: v for k, v in options.items() if k.endswith("_ms")}}
    cfg = gemma4_features.parse_features(saved, "processor_config.json")
    features, mask = gemma4_features.log_mel(clips, cfg)
    np.testing.assert_array_equal(mask, want["input_features_mask"])
    assert features.shape == want["input_features"].shape and features.dtype == np.float32
    assert np.abs(features - want["input_features"]).max() < 1e-4
    one, _ = gemma4_features.log_mel(clips[1], cfg)  # a single clip pads only to itself
    np.testing.assert_allclose(one, extractor([clips[1]], return_tensors="np")["input_features"], atol=1e-4)


def test_log_mel_truncates_to_max_length():
    audio = (0.1 * np.random.default_rng(1).standard_normal(481_000)).astype(np.float32)
    features, mask = gemma4_features.log_mel(audio)
    want = transformers.Gemma4AudioFeatureExtractor()([audio], return_tensors="np")
    assert features.shape == want["input_features"].shape == (1, 2999, 128)  # 30 s
    np.testing.assert_array_equal(mask, want["input_features_mask"])
    assert np.abs(features - want["input_features"]).max() < 1e-4


@pytest.mark.parametrize("changes, key", [
    ({"dither": 1e-4}, "dither"),
    ({"padding_side": "left"}, "padding_side"),
    ({"frame_length": 400}, "frame_length"),
    ({"per_bin_mean": [0.0, 1.0]}, "per_bin_mean"),
    ({"spectrogram_power": 2}, "spectrogram_power"),
])
def test_feature_config_errors_name_the_key(changes, key):
    raw = {**transformers.Gemma4AudioFeatureExtractor().to_dict(), **changes}
    with pytest.raises(ConfigError, match=key):
        gemma4_features.parse_features(raw, "processor_config.json")


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def quantized(tmp_path):
    """``(float IR, 4-bit CQ Quantized)`` of the tiny text model with a one-layer audio tower."""
    write_checkpoint(tmp_path, "right-context", num_hidden_layers=1)
    ir = hf.import_checkpoint(tmp_path)
    return ir, api.quantize(ir, bits=4, progress=False)


def test_quantized_tower_runs_on_both_kernel_paths(quantized):
    """4-bit CQ quantizes every linear and both subsampling convolutions of the tower and the
    embedder, nothing else of them. The C++ kernel rounds activations to int8 per block (each matmul
    within ~3e-2 of exact, test_kernel_backend), 16 of them in a row here."""
    ir, q = quantized
    for path, meta in q.ir.meta.items():
        if meta.tower == "audio":
            assert is_quantized(q.ir.params[path]) == (meta.role in ("linear", "conv")), path
    features, mask = inputs(2)
    with backend.use_kernel("jax"):
        ours = soft_tokens(q.model, features, mask)[0]
    assert rel_norm(ours, soft_tokens(hf.to_model(ir), features, mask)[0]) < 0.5  # 4 bits: near the float tower
    if backend.ffi_available():
        with backend.use_kernel("ffi"):
            kernel = soft_tokens(q.model, features, mask)[0]
        assert not np.array_equal(kernel, ours) and rel_norm(kernel, ours) < 0.1


@pytest.mark.slow  # ~15 s of CPU: two compiles of the quantized tower
def test_quantized_tower_computes_what_its_decoded_weights_do(quantized):
    ir, q = quantized
    features, mask = inputs(3)
    with backend.use_kernel("jax"):
        ours = soft_tokens(q.model, features, mask)[0]
    assert relative(ours, soft_tokens(runtime.dequantized_model(q.ir), features, mask)[0]) < 1e-5


def rel_norm(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
