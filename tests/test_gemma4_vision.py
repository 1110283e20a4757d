"""Gemma 4 with images: our Flax forward against transformers' ``Gemma4ForConditionalGeneration``
(fp32) on a tiny random checkpoint, the IR it imports to, config errors, and its quantization.

The checkpoint has random norm weights, position table, clamp bounds (finite, and active: see
:func:`test_vision_tower_matches_transformers`), standardization and layer scalars; its text
model has per-layer embeddings, sliding and full layers and bidirectional image attention
(``use_bidirectional_attention="vision"``). A right-padded batch of two rows holds three images
of different shapes (6, 1 and 6 soft tokens); a 6-token image is longer than the sliding window.
"""

from __future__ import annotations

import dataclasses
import doctest
import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cqjax import api  # noqa: E402
from cqjax.errors import ConfigError  # noqa: E402
from cqjax.io import artifact, hf  # noqa: E402
from cqjax.ir import IR  # noqa: E402
from cqjax.kernels import backend  # noqa: E402
from cqjax.kernels.qarrays import is_quantized  # noqa: E402
from cqjax.models import gemma4_vision as gv  # noqa: E402
from cqjax.models import gemma4_audio as ga  # noqa: E402
from cqjax.models import gemma4_multimodal as mm  # noqa: E402
from cqjax.models.gemma4 import Gemma4Config, parse_gemma4  # noqa: E402
from cqjax.runtime import forward_fn  # noqa: E402

S, F = "sliding_attention", "full_attention"
TEXT = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=5, num_hidden_layers=3, layer_types=[S, S, F], vocab_size_per_layer_input=97,
            hidden_size_per_layer_input=8, per_layer_config={2: {"head_dim": 32}}, initializer_range=0.1,
            use_bidirectional_attention="vision")
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, patch_size=2, pooling_kernel_size=2, position_embedding_size=16, use_clipped_linears=True,
              standardize=True, initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 100.0})
AUDIO = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
             conv_kernel_size=3, attention_chunk_size=4, attention_context_left=5, output_proj_dims=16)
IMAGE, BOI, EOI = 90, 91, 92
IDS = dict(image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI, video_token_id=93, audio_token_id=94,
           boa_token_id=95, eoa_token_index=96)
MAX_PATCHES = 24  # 4x6 patches: 6 soft tokens at pooling 2


def write_multimodal(directory, audio=None, seed=0, text=TEXT):
    """A random checkpoint whose scales, bounds and tables are not their (identity) defaults."""
    cfg = transformers.Gemma4Config(text_config=text, vision_config=VISION, audio_config=audio,
                                    initializer_range=0.1, **IDS)
    torch.manual_seed(seed)
    model = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    rand = lambda shape: torch.rand(shape, generator=gen)  # noqa: E731
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("position_embedding_table"):
                p.normal_(0.0, 0.5, generator=gen)
        for name, b in model.named_buffers():
            if name.endswith(("input_min", "output_min")):
                b.copy_(-0.3 - rand(b.shape))
            elif name.endswith(("input_max", "output_max")):
                b.copy_(0.3 + rand(b.shape))
            elif name.endswith(("std_scale", "layer_scalar")):
                b.copy_(0.5 + rand(b.shape))
            elif name.endswith("std_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    model.save_pretrained(directory)
    return model


def images(seed=0):
    """``(pixel_values, image_position_ids)`` of three images: 4x6, 2x2 and 6x4 patches."""
    rng = np.random.default_rng(seed)
    pv, pos = zip(*(gv.patchify(rng.random((h, w, 3)), 2, MAX_PATCHES) for h, w in ((8, 12), (4, 4), (12, 8))))
    return np.stack(pv).astype(np.float32), np.stack(pos)


def image_prompt(counts):
    """Two right-padded rows: images 0 and 1 in the first, image 2 in the second."""
    rows = [[2, 5, BOI, *[IMAGE] * counts[0], EOI, 7, 8, BOI, *[IMAGE] * counts[1], EOI, 11, 12, 13],
            [2, 3, BOI, *[IMAGE] * counts[2], EOI, 11, 12, 13, 14, 15, 16]]
    tokens = np.zeros((2, max(map(len, rows))), np.int32)
    mask = np.zeros(tokens.shape, bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, True
    return tokens, mask


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma4-vision")
    return directory, write_multimodal(directory)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return hf.load(ckpt[0])


@pytest.fixture(scope="module")
def prompt():
    pv, pos = images()
    counts = gv.soft_token_counts(pos, VISION["pooling_kernel_size"])
    assert counts.tolist() == [6, 1, 6]
    return (*image_prompt(counts), pv, pos)


def torch_logits(ref, tokens, mask, pv=None, pos=None, bidirectional=True):
    t = lambda a, dtype=torch.long: None if a is None else torch.tensor(a, dtype=dtype)  # noqa: E731
    with torch.no_grad():
        return ref(input_ids=t(tokens), attention_mask=t(mask), pixel_values=t(pv, torch.float32),
                   image_position_ids=t(pos), mm_token_type_ids=t(tokens == IMAGE) if bidirectional else None
                   ).logits.numpy()


def image_logits(model, tokens, pv, pos, mask):
    """Our logits of a text+image prompt (:func:`cqjax.models.gemma4_multimodal.prompt_logits`)."""
    return mm.prompt_logits(model, tokens, mask, pixel_values=pv, image_position_ids=pos)


def assert_close(ours, theirs, what, rel=1e-4):
    """``max |Δ| <= rel · max(1, max |theirs|)`` (f32 parity)."""
    diff, scale = np.abs(ours - theirs).max(), max(1.0, np.abs(theirs).max())
    assert diff <= rel * scale, f"{what}: max abs diff {diff:.2e} (scale {scale:.2e})"


def tower_output(model, pv, pos):
    """Our vision tower's valid rows (what transformers' ``Gemma4VisionModel`` returns), jitted."""
    graphdef, state = nnx.split(model.vision_tower)
    h, valid = jax.jit(lambda s, a, b: nnx.merge(graphdef, s)(a, b))(state, pv, pos)
    return np.asarray(h)[np.asarray(valid)]


# ---------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------


def test_vision_tower_matches_transformers(ckpt, loaded, prompt):
    """The tower alone (``Gemma4VisionModel``: padding stripped) and the soft tokens in the text
    model's width (``get_image_features``); the clamp bounds are active (at ±inf the soft tokens
    move), so the parity sees them."""
    ref, (model, ir), (_, _, pv, pos) = ckpt[1], loaded, prompt
    with torch.no_grad():
        tower = ref.model.vision_tower(pixel_values=torch.tensor(pv), pixel_position_ids=torch.tensor(pos))
        soft = torch.cat(ref.model.get_image_features(torch.tensor(pv), torch.tensor(pos)).pooler_output).numpy()
    assert_close(tower_output(model, pv, pos), tower.last_hidden_state.numpy(), "vision tower", rel=1e-5)
    ours = gv.image_soft_tokens(model, pv, pos)
    assert ours.shape == (13, TEXT["hidden_size"])
    assert_close(ours, soft, "image soft tokens", rel=1e-5)
    unclamped = {p: np.float32(np.inf if p.endswith("_max") else -np.inf)
                 for p in ir.params if p.endswith(("_min", "_max"))}
    moved = np.abs(gv.image_soft_tokens(hf.to_model(ir.replace(params=unclamped)), pv, pos) - ours).max()
    assert moved > 100 * 1e-5 * max(1.0, np.abs(soft).max())


def test_image_prompt_matches_transformers(ckpt, loaded, prompt):
    """Text+image logits with the bidirectional image blocks of sliding layers, and (the same
    weights with ``vision_bidirectional`` off) transformers' causal masks without
    ``mm_token_type_ids``; the two differ, so each parity sees its mask."""
    ref, (model, ir), (tokens, mask, pv, pos) = ckpt[1], loaded, prompt
    assert ir.config.vision_bidirectional
    ours = image_logits(model, tokens, pv, pos, mask)
    theirs = torch_logits(ref, tokens, mask, pv, pos)
    assert_close(ours[mask], theirs[mask], "image prompt (bidirectional images)")
    causal = hf.to_model(dataclasses.replace(ir, config=dataclasses.replace(ir.config, vision_bidirectional=False)))
    ours_causal = image_logits(causal, tokens, pv, pos, mask)
    assert_close(ours_causal[mask], torch_logits(ref, tokens, mask, pv, pos, bidirectional=False)[mask],
                 "image prompt (causal)")
    assert np.abs(ours_causal - ours)[mask].max() > 0.1


def test_text_prompt_equals_the_text_model(ckpt, loaded):
    """Without images the full model computes what the text model of its text leaves computes
    (bit for bit, through the runtime) and what transformers computes, also for a stray
    placeholder (embedded as the pad token by both)."""
    ref, (model, ir) = ckpt[1], loaded
    tokens = np.random.default_rng(1).integers(0, IMAGE, (2, 12)).astype(np.int32)
    mask = np.ones(tokens.shape, bool)
    mask[1, 7:] = False
    text_cfg = Gemma4Config(**{f.name: getattr(ir.config, f.name) for f in dataclasses.fields(Gemma4Config)})
    text_paths = [p for p in ir.params if not gv.is_vision_path(p)]
    text = hf.to_model(IR(family="gemma4", config=text_cfg, params={p: ir.params[p] for p in text_paths},
                          meta={p: ir.meta[p] for p in text_paths}))
    forward = forward_fn(model)
    ours = np.asarray(forward(tokens, mask))
    np.testing.assert_array_equal(ours, np.asarray(forward_fn(text)(tokens, mask)))
    assert_close(ours[mask], torch_logits(ref, tokens, mask)[mask], "text prompt")
    tokens[0, 3] = IDS["audio_token_id"]
    assert_close(np.asarray(forward(tokens, mask))[mask], torch_logits(ref, tokens, mask)[mask], "stray placeholder")


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def test_ir_layout_roles_and_towers(loaded):
    ir = loaded[1]
    expect = {  # path: (role, tower, shape, hf_name)
        "vision_tower/patch_embedder/input_proj/kernel":
            ("linear", "vision", (12, 32), "model.vision_tower.patch_embedder.input_proj.weight"),
        "vision_tower/patch_embedder/position_embedding_table":
            ("other", "vision", (2, 16, 32), "model.vision_tower.patch_embedder.position_embedding_table"),
        "vision_tower/encoder/layers/1/self_attn/k_proj/linear/kernel":
            ("linear", "vision", (32, 16), "model.vision_tower.encoder.layers.1.self_attn.k_proj.linear.weight"),
        "vision_tower/encoder/layers/0/mlp/down_proj/output_max":
            ("other", "vision", (), "model.vision_tower.encoder.layers.0.mlp.down_proj.output_max"),
        "vision_tower/encoder/layers/0/self_attn/q_norm/scale":
            ("norm", "vision", (8,), "model.vision_tower.encoder.layers.0.self_attn.q_norm.weight"),
        "vision_tower/encoder/layers/0/post_feedforward_layernorm/scale":
            ("norm", "vision", (32,), "model.vision_tower.encoder.layers.0.post_feedforward_layernorm.weight"),
        "vision_tower/std_scale": ("other", "vision", (32,), "model.vision_tower.std_scale"),
        "embed_vision/embedding_projection/kernel":
            ("linear", "vision", (32, 64), "model.embed_vision.embedding_projection.weight"),
        "layers/2/self_attn/q_proj/kernel":
            ("linear", "text", (64, 4 * 32), "model.language_model.layers.2.self_attn.q_proj.weight"),
        "embed_tokens_per_layer/embedding":
            ("per_layer_embedding", "text", (97, 3 * 8), "model.language_model.embed_tokens_per_layer.weight"),
    }
    for path, want in expect.items():
        m = ir.meta[path]
        assert (m.role, m.tower, m.shape, m.hf_name) == want, path
    vision = [p for p in ir.meta if ir.meta[p].tower == "vision"]
    assert len([p for p in vision if p.endswith("/kernel")]) == 1 + 2 * 7 + 1  # input_proj, 7 per layer, embedder
    assert all(ir.meta[p].role == "linear" for p in vision if p.endswith("/kernel"))
    assert "lm_head/kernel" not in ir.meta  # tied to the token table
    assert isinstance(loaded[0], mm.Gemma4ForConditionalGeneration)


def test_audio_tower_imports_beside_the_vision_tower(tmp_path):
    """A checkpoint with an ``audio_config`` imports its audio tower too: every tensor of tower
    ``audio`` with the role, shape and checkpoint name :func:`cqjax.models.gemma4_audio.audio_params`
    gives, the other towers unchanged."""
    write_multimodal(tmp_path / "audio", audio=AUDIO)
    write_multimodal(tmp_path / "no-audio")
    ir = hf.import_checkpoint(tmp_path / "audio")
    audio = {p: m for p, m in ir.meta.items() if m.tower == "audio"}
    assert audio == ga.audio_params(ir.config.audio)
    assert ir.meta["audio_tower/subsample_conv_projection/layer1/conv/kernel"].role == "conv"
    assert {p: m for p, m in ir.meta.items() if m.tower != "audio"} == dict(
        hf.import_checkpoint(tmp_path / "no-audio").meta)


def _raw(ckpt):
    return json.loads((ckpt[0] / "config.json").read_text())


@pytest.mark.parametrize("where, changes, key", [
    ("vision_config", {"frobnicate": 1}, "frobnicate"),
    ("vision_config", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_parameters.rope_type"),
    ("vision_config", {"rope_parameters": {"rope_theta": 1.0, "factor": 2.0}}, "rope_parameters.factor"),
    ("vision_config", {"head_dim": 6}, "head_dim"),
    ("vision_config", {"num_key_value_heads": 3}, "num_attention_heads"),
    ("vision_config", {"hidden_activation": "relu"}, "hidden_activation"),
    ("text_config", {"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ("text_config", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    (None, {"frobnicate_tokens": 3}, "frobnicate_tokens"),
    (None, {"text_config": None}, "text_config"),
])
def test_unsupported_config_raises_naming_the_key(ckpt, where, changes, key):
    raw = _raw(ckpt)
    (raw[where] if where else raw).update(changes)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        parse_gemma4(raw, "config.json")
    assert where is None or where in str(e.value)


def test_placeholders_must_match_the_images(loaded, prompt):
    tokens, mask, pv, pos = prompt
    short = tokens.copy()
    short[0, 3] = 7  # one image placeholder less
    with pytest.raises(ValueError, match="12 image placeholders .* give 13 soft tokens"):
        image_logits(loaded[0], short, pv, pos, mask)
    with pytest.raises(ValueError, match="position table has 16 rows"):
        image_logits(loaded[0], tokens, pv, np.where(pos >= 0, pos + 12, pos), mask)


def test_module_doctests():
    assert doctest.testmod(gv, verbose=False).failed == 0


def test_patchify_matches_the_image_processor():
    """:func:`patchify` gives what transformers' processor gives for an image it does not resize
    (28x40 pixels at patch 2, pooling 2: 280 patches = 70 soft tokens)."""
    from PIL import Image

    pixels = np.random.default_rng(3).integers(0, 256, (28, 40, 3), dtype=np.uint8)
    proc = transformers.models.gemma4.image_processing_pil_gemma4.Gemma4ImageProcessorPil(
        patch_size=2, pooling_kernel_size=2, max_soft_tokens=70)
    out = proc(Image.fromarray(pixels), return_tensors="np")
    pv, pos = gv.patchify(pixels / 255.0, 2, 280)
    np.testing.assert_allclose(out["pixel_values"][0], pv, atol=1e-6)
    np.testing.assert_array_equal(out["image_position_ids"][0], pos)
    assert gv.soft_token_counts(pos[None], 2).tolist() == [70]


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(ckpt):
    return api.quantize(ckpt[0], bits=4, progress=False)


@pytest.fixture(scope="module")
def quantized_soft(quantized, prompt):
    """The 4-bit model's soft tokens on the pure-JAX runtime."""
    with backend.use_kernel("jax"):
        return gv.image_soft_tokens(quantized.model, *prompt[2:])


def rel_error(ours, ref):
    """``‖ours − ref‖ / ‖ref − mean‖`` (centered per row)."""
    return np.linalg.norm(ours - ref) / np.linalg.norm(ref - ref.mean(-1, keepdims=True))


def test_vision_linears_are_quantized_and_run_on_both_kernel_paths(quantized, quantized_soft, loaded, prompt):
    """Every linear of the tower and the embedder is quantized and its other leaves come back
    bit-identical; 4-bit soft tokens stay near the float ones; the C++ kernel computes the
    pure-JAX runtime's soft tokens within its int8 activation rounding."""
    (model, ir), pv, pos = loaded, *prompt[2:]
    for p in (p for p in ir.params if gv.is_vision_path(p)):
        if ir.meta[p].role == "linear":
            assert is_quantized(quantized.ir.params[p]), p
        else:
            np.testing.assert_array_equal(hf.load_leaf(quantized.ir, p), hf.load_leaf(ir, p), err_msg=p)
    assert rel_error(quantized_soft, gv.image_soft_tokens(model, pv, pos)) < 0.3
    if backend.ffi_available():
        with backend.use_kernel("ffi"):
            assert rel_error(gv.image_soft_tokens(quantized.model, pv, pos), quantized_soft) < 5e-2


def test_save_load_round_trip_gives_identical_soft_tokens(quantized, quantized_soft, prompt, tmp_path):
    api.save(quantized, tmp_path / "art")
    back = api.load(tmp_path / "art")
    assert back.ir.config == quantized.ir.config
    assert artifact.read_manifest(tmp_path / "art")["config"]["__dataclass__"] == "Gemma4MultimodalConfig"
    assert back.ir.meta["vision_tower/encoder/layers/0/self_attn/q_proj/input_min"].shape == ()
    with backend.use_kernel("jax"):
        np.testing.assert_array_equal(gv.image_soft_tokens(back.model, *prompt[2:]), quantized_soft)


@pytest.fixture(scope="module")
def quantized_logits(quantized, prompt):
    """The 4-bit model's logits of the image prompt on the pure-JAX runtime."""
    tokens, mask, pv, pos = prompt
    with backend.use_kernel("jax"):
        return image_logits(quantized.model, tokens, pv, pos, mask)


@pytest.mark.slow  # ~20 s on 2 cores: compiles the whole 4-bit model for both kernel paths
def test_quantized_image_prompt_runs_on_both_kernel_paths(quantized, quantized_logits, loaded, prompt):
    """A text+image prompt through the 4-bit model: the C++ kernel's logits are the pure-JAX
    runtime's within the int8 tolerance of test_gemma4, both near the float model's."""
    tokens, mask, pv, pos = prompt
    ours = quantized_logits[mask]
    assert rel_error(ours, image_logits(loaded[0], tokens, pv, pos, mask)[mask]) < 0.75
    if backend.ffi_available():
        with backend.use_kernel("ffi"):
            assert rel_error(image_logits(quantized.model, tokens, pv, pos, mask)[mask], ours) < 5e-2


@pytest.mark.slow  # ~15 s on 2 cores alone (the 4-bit model's compile), ~5 s after the test above
def test_export_runs_in_transformers_with_the_quantized_image_logits(quantized, quantized_logits, ckpt, prompt,
                                                                     tmp_path):
    """The exported checkpoint (decoded weights under transformers' names, scalars as scalars)
    loads in transformers, which computes the pure-JAX runtime's image-prompt logits."""
    from cqjax.io import export

    tokens, mask, pv, pos = prompt
    out = export.export_hf(quantized.ir, tmp_path / "hf", config_from=ckpt[0])
    ref = transformers.Gemma4ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert_close(quantized_logits[mask], torch_logits(ref, tokens, mask, pv, pos)[mask], "export")
