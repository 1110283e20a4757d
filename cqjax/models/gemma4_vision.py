"""The Gemma 4 vision tower (transformers' ``Gemma4VisionModel``) and its multimodal embedder.

An image reaches the model as transformers' ``Gemma4ImageProcessor`` leaves it (:func:`patchify`
computes the same from an image already resized): ``pixel_values [N, max_patches, 3·p²]`` in
``[0, 1]`` (each patch row-major, channels last) and ``image_position_ids [N, max_patches, 2]``,
each patch's ``(x, y)`` on the patch grid, ``(-1, -1)`` on padding. The tower computes:

=======================  ========================================================================
step                     what it does (as transformers 5 computes it)
=======================  ========================================================================
patch embedder           ``input_proj(2·(pixels − 0.5))`` plus ``table[0][x] + table[1][y]`` (a
                         ``[2, position_embedding_size, D]`` table; zero on padding)
encoder layers           bidirectional attention over the real patches: q/k RMSNorm (weighted),
                         value RMSNorm (no weight), logits scaled by 1.0, 2-D RoPE (the first
                         half of a head rotated by ``x``, the second by ``y``); a gated MLP; four
                         sandwich norms as the Gemma 4 text layers
``use_clipped_linears``  every encoder linear clamps its input and output to stored bounds
pooler                   padding zeroed; each ``k×k`` block of patches (``pooling_kernel_size``)
                         averaged into one soft token; times ``sqrt(D)``
``standardize``          ``(h − std_bias) · std_scale``
multimodal embedder      ``embedding_projection(rms(h))`` into the text model's width
=======================  ========================================================================

An image of ``h×w`` patches gives ``h·w / k²`` soft tokens; the prompt holds that many
``image_token_id`` placeholders for it (:class:`cqjax.models.gemma4_multimodal.Gemma4ForConditionalGeneration`
puts the soft tokens there, in order). IR paths follow transformers' module names (tower
``vision``):

==========================================================  ===========  =================
IR path                                                     role         shape
==========================================================  ===========  =================
``vision_tower/patch_embedder/input_proj/kernel``           linear       ``[3·p², D]``
``vision_tower/patch_embedder/position_embedding_table``    other        ``[2, P, D]``
``vision_tower/encoder/layers/0/self_attn/q_proj/linear/kernel``  linear  ``[D, H·hd]``
``vision_tower/encoder/layers/0/self_attn/q_proj/input_min``  other      ``[]``
``vision_tower/encoder/layers/0/mlp/gate_proj/linear/kernel``  linear    ``[D, I]``
``vision_tower/encoder/layers/0/input_layernorm/scale``     norm         ``[D]``
``vision_tower/std_bias``, ``vision_tower/std_scale``       other        ``[D]``
``embed_vision/embedding_projection/kernel``                linear       ``[D, D_text]``
==========================================================  ===========  =================

The position table and the clamp bounds stay float; every linear is quantized like the text
model's.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqjax.errors import ConfigError
from cqjax.models import layers
from cqjax.models.families import check_keys, expect

# transformers' Gemma4VisionConfig defaults, for keys a config.json leaves out.
DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                num_key_value_heads=12, head_dim=64, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                pooling_kernel_size=3, patch_size=16, position_embedding_size=10 * 1024,
                use_clipped_linears=False, standardize=False)
#: Keys transformers' vision model never reads (its linears have no bias whatever
#: ``attention_bias`` says; the others are for the image processor or unused).
UNUSED_KEYS = frozenset({"attention_bias", "default_output_length", "global_head_dim"})
VISION_KEYS = frozenset(DEFAULTS) | UNUSED_KEYS | {"rope_parameters"}
ROPE_TYPES = ("default", "axial")  # transformers standardizes a saved "default" to "axial"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma4VisionConfig:
    """A Gemma 4 ``vision_config``, normalized (hashable: it is static model structure)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    act: str
    rms_norm_eps: float
    rope_theta: float
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    clipped_linears: bool
    standardize: bool


def parse_vision_config(raw: dict, source: str) -> Gemma4VisionConfig:
    """A ``vision_config`` mapping → :class:`Gemma4VisionConfig`; ConfigError names bad keys.

    >>> parse_vision_config({"hidden_size": 32, "head_dim": 8, "num_attention_heads": 4,
    ...                      "num_key_value_heads": 4}, "config.json").num_heads
    4
    """
    check_keys(raw, VISION_KEYS, source)
    expect(raw, "model_type", ("gemma4_vision",), source, "gemma4_vision")
    raw = {**DEFAULTS, **raw}
    act = expect(raw, "hidden_activation", tuple(layers.ACTIVATIONS), source)
    rope = dict(raw.get("rope_parameters") or {"rope_type": "axial", "rope_theta": 100.0})
    extra = sorted(set(rope) - {"rope_type", "rope_theta"})
    if extra:
        raise ConfigError(f"{source}: config key 'rope_parameters.{extra[0]}' is not supported (the vision "
                          "tower's RoPE takes rope_type and rope_theta)")
    if rope.get("rope_type", "axial") not in ROPE_TYPES:
        raise ConfigError(f"{source}: config key 'rope_parameters.rope_type' = {rope['rope_type']!r} is not "
                          f"supported; allowed: {ROPE_TYPES}")
    heads, kv, hd = (int(raw[k]) for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    if heads % kv:
        raise ConfigError(f"{source}: config key 'num_attention_heads' = {heads} is not a multiple of "
                          f"num_key_value_heads = {kv}")
    if hd % 4:
        raise ConfigError(f"{source}: config key 'head_dim' = {hd} must be a multiple of 4 (2-D RoPE rotates "
                          "each half of a head in pairs)")
    return Gemma4VisionConfig(
        hidden_size=int(raw["hidden_size"]), intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]), num_heads=heads, num_kv_heads=kv, head_dim=hd, act=act,
        rms_norm_eps=float(raw["rms_norm_eps"]), rope_theta=float(rope.get("rope_theta", 100.0)),
        patch_size=int(raw["patch_size"]), pooling_kernel_size=int(raw["pooling_kernel_size"]),
        position_embedding_size=int(raw["position_embedding_size"]),
        clipped_linears=bool(raw["use_clipped_linears"]), standardize=bool(raw["standardize"]))


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class ClippableLinear(nnx.Module):
    """transformers' ``Gemma4ClippableLinear``: a bias-free linear (``linear/kernel``) that, when
    ``clipped``, clamps its input to ``[input_min, input_max]`` and its output to
    ``[output_min, output_max]`` (scalars stored in the checkpoint)."""

    def __init__(self, in_features: int, out_features: int, *, clipped: bool, dtype=jnp.float32):
        self.linear = layers.Linear(in_features, out_features, dtype=dtype)
        self.clipped = clipped
        if clipped:
            self.input_min, self.input_max, self.output_min, self.output_max = (
                nnx.Param(jnp.zeros((), dtype), role="other") for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.clipped:
            x = jnp.clip(x, self.input_min[...].astype(x.dtype), self.input_max[...].astype(x.dtype))
        y = self.linear(x)
        if self.clipped:
            y = jnp.clip(y, self.output_min[...].astype(y.dtype), self.output_max[...].astype(y.dtype))
        return y


def apply_rope_2d(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """transformers' ``apply_multidimensional_rope`` for 2-D positions: the first half of each
    head of ``x [B, N, H, hd]`` is rotated by ``positions[..., 0]``, the second by
    ``positions[..., 1]``, each with ``inv_freq [hd // 4]``."""
    half = x.shape[-1] // 2
    return jnp.concatenate([layers.apply_rope(x[..., :half], positions[..., 0], inv_freq),
                            layers.apply_rope(x[..., half:], positions[..., 1], inv_freq)], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: Gemma4VisionConfig, dtype=jnp.float32):
        d, hd = cfg.hidden_size, cfg.head_dim
        linear = lambda i, o: ClippableLinear(i, o, clipped=cfg.clipped_linears, dtype=dtype)  # noqa: E731
        self.q_proj = linear(d, cfg.num_heads * hd)
        self.k_proj = linear(d, cfg.num_kv_heads * hd)
        self.v_proj = linear(d, cfg.num_kv_heads * hd)
        self.o_proj = linear(cfg.num_heads * hd, d)
        self.q_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype)
        self.k_norm = layers.RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.eps = cfg.rms_norm_eps
        self.inv_freq = tuple(layers.rope_inv_freq({"rope_theta": cfg.rope_theta}, hd // 2).tolist())

    def __call__(self, x, positions, valid):
        """``x [B, N, D]``, patch ``positions [B, N, 2]``, ``valid [B, N]`` (False on padding)."""
        b, n, _ = x.shape
        inv_freq = np.asarray(self.inv_freq, np.float32)
        heads = lambda proj, h: proj(x).reshape(b, n, h, self.head_dim)  # noqa: E731
        q = apply_rope_2d(self.q_norm(heads(self.q_proj, self.num_heads)), positions, inv_freq)
        k = apply_rope_2d(self.k_norm(heads(self.k_proj, self.num_kv_heads)), positions, inv_freq)
        v = layers.rms(heads(self.v_proj, self.num_kv_heads), self.eps)
        mask = jnp.broadcast_to(valid[:, None, :], (b, n, n))
        out = layers.dot_product_attention(q, *layers.kv_layout(k, v), mask, scale=1.0)
        return self.o_proj(out.reshape(b, n, -1))


class MLP(nnx.Module):
    """``down(act(gate(x)) * up(x))`` of clippable linears (transformers' ``Gemma4VisionMLP``)."""

    def __init__(self, cfg: Gemma4VisionConfig, dtype=jnp.float32):
        d, i, clipped = cfg.hidden_size, cfg.intermediate_size, cfg.clipped_linears
        self.gate_proj = ClippableLinear(d, i, clipped=clipped, dtype=dtype)
        self.up_proj = ClippableLinear(d, i, clipped=clipped, dtype=dtype)
        self.down_proj = ClippableLinear(i, d, clipped=clipped, dtype=dtype)
        self.act = cfg.act

    def __call__(self, x):
        return self.down_proj(layers.ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma4VisionConfig, dtype=jnp.float32):
        norm = lambda: layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)  # noqa: E731
        self.self_attn = Attention(cfg, dtype)
        self.mlp = MLP(cfg, dtype)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def __call__(self, x, positions, valid):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, valid))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Encoder(nnx.Module):
    def __init__(self, cfg: Gemma4VisionConfig, dtype=jnp.float32):
        self.layers = nnx.List([EncoderLayer(cfg, dtype) for _ in range(cfg.num_layers)])

    def __call__(self, x, positions, valid):
        for layer in self.layers:
            x = layer(x, positions, valid)
        return x


class PatchEmbedder(nnx.Module):
    def __init__(self, cfg: Gemma4VisionConfig, dtype=jnp.float32):
        self.input_proj = layers.Linear(3 * cfg.patch_size ** 2, cfg.hidden_size, dtype=dtype)
        self.position_embedding_table = nnx.Param(
            jnp.zeros((2, cfg.position_embedding_size, cfg.hidden_size), dtype), role="other")

    def __call__(self, pixel_values, positions, padding):
        x = self.input_proj(2 * (pixel_values - 0.5))
        table = self.position_embedding_table[...].astype(x.dtype)
        at = jnp.maximum(positions, 0)  # padding (-1) looks up row 0, then is zeroed
        return x + jnp.where(padding[..., None], 0.0, table[0][at[..., 0]] + table[1][at[..., 1]])


def pool(x: jax.Array, positions: jax.Array, padding: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """transformers' ``Gemma4VisionPooler``: ``(soft tokens [B, N / k², D] float32, valid [B, N / k²])``.

    Padding rows are zeroed; patch ``(x, y)`` goes to soft token ``x // k + (w // k)·(y // k)``
    (``w`` the image's width in patches), each the mean of its ``k²`` patches; then all are
    multiplied by ``sqrt(D)``. A soft token no patch maps to is not valid.
    """
    b, n, d = x.shape
    length = n // (k * k)
    x = jnp.where(padding[..., None], 0.0, x).astype(jnp.float32)
    if length == n:
        return x * d ** 0.5, ~padding
    at = jnp.maximum(positions, 0)
    width = at[..., 0].max(axis=-1, keepdims=True) + 1
    cell = at // k
    weights = jax.nn.one_hot(cell[..., 0] + (width // k) * cell[..., 1], length, dtype=jnp.float32) / (k * k)
    return jnp.einsum("bnl,bnd->bld", weights, x) * d ** 0.5, jnp.any(weights != 0, axis=1)


class Gemma4VisionModel(nnx.Module):
    """The vision tower: ``(pixel_values [N, P, 3·p²], image_position_ids [N, P, 2])`` →
    ``(soft tokens [N, P / k², D], valid [N, P / k²])`` (what transformers' ``Gemma4VisionModel``
    returns is the valid rows, concatenated)."""

    def __init__(self, cfg: Gemma4VisionConfig, dtype=jnp.float32):
        self.config = cfg
        self.patch_embedder = PatchEmbedder(cfg, dtype)
        self.encoder = Encoder(cfg, dtype)
        if cfg.standardize:
            self.std_bias = nnx.Param(jnp.zeros((cfg.hidden_size,), dtype), role="other")
            self.std_scale = nnx.Param(jnp.zeros((cfg.hidden_size,), dtype), role="other")

    def __call__(self, pixel_values, image_position_ids):
        cfg = self.config
        k = cfg.pooling_kernel_size
        n = pixel_values.shape[-2]
        if n % (k * k):
            raise ValueError(f"gemma4 vision: {n} patches per image is not a multiple of "
                             f"pooling_kernel_size² = {k * k}")
        positions = jnp.asarray(image_position_ids, jnp.int32)
        padding = jnp.all(positions == -1, axis=-1)
        x = self.patch_embedder(jnp.asarray(pixel_values), positions, padding)
        x = self.encoder(x, positions, ~padding)
        h, valid = pool(x, positions, padding, k)
        if cfg.standardize:
            h = (h - self.std_bias[...].astype(jnp.float32)) * self.std_scale[...].astype(jnp.float32)
        return h.astype(x.dtype), valid


class MultimodalEmbedder(nnx.Module):
    """transformers' ``Gemma4MultimodalEmbedder``: ``embedding_projection(rms(x))`` from the
    tower's width into the text model's."""

    def __init__(self, in_features: int, out_features: int, *, eps: float, dtype=jnp.float32):
        self.embedding_projection = layers.Linear(in_features, out_features, dtype=dtype)
        self.eps = eps

    def __call__(self, x):
        return self.embedding_projection(layers.rms(x, self.eps))


# ---------------------------------------------------------------------------------------------
# Images in a prompt
# ---------------------------------------------------------------------------------------------


def scatter_soft_tokens(x: jax.Array, slots: jax.Array, features: jax.Array, valid: jax.Array) -> jax.Array:
    """``x [B, T, D]`` with the ``j``-th placeholder (``slots [B, T]``, row-major) replaced by the
    ``j``-th valid soft token of ``features [N, L, D]`` (``valid [N, L]``, image by image), as
    transformers' ``masked_scatter``; audio uses it too. The counts must agree (checked outside
    the trace: :meth:`cqjax.models.gemma4_multimodal.Gemma4ForConditionalGeneration.prompt_inputs`)."""
    flat = features.reshape(-1, features.shape[-1])
    order = jnp.nonzero(valid.reshape(-1), size=flat.shape[0], fill_value=0)[0]
    rank = jnp.clip(jnp.cumsum(slots.reshape(-1)) - 1, 0, flat.shape[0] - 1)
    return jnp.where(slots[..., None], flat[order[rank]].reshape(x.shape).astype(x.dtype), x)


def image_spans(slots: jax.Array, positions: jax.Array) -> jax.Array:
    """int32 ``[B, T, 2]``: for each placeholder (``slots [B, T]``), the positions of the first
    and last placeholder of its run (one image's soft tokens); the empty span ``(0, -1)`` off
    them. transformers' ``get_block_sequence_ids_for_mask`` as position ranges, so that the
    keys of a block are found by position in a KV cache too.

    >>> slots = jnp.asarray([[False, True, True, False, True]])
    >>> image_spans(slots, jnp.arange(5)[None] + 10)[0].tolist()
    [[0, -1], [11, 12], [11, 12], [0, -1], [14, 14]]
    """
    t = slots.shape[1]
    index = jnp.arange(t)
    first = jax.lax.cummax(jnp.where(slots & ~jnp.pad(slots[:, :-1], ((0, 0), (1, 0))), index, 0), axis=1)
    last = jax.lax.cummin(jnp.where(slots & ~jnp.pad(slots[:, 1:], ((0, 0), (0, 1))), index, t - 1), axis=1,
                          reverse=True)
    span = jnp.stack([jnp.take_along_axis(positions, first, 1), jnp.take_along_axis(positions, last, 1)], -1)
    return jnp.where(slots[..., None], span, jnp.asarray([0, -1])).astype(jnp.int32)


def soft_token_counts(image_position_ids: np.ndarray, pooling_kernel_size: int) -> np.ndarray:
    """Soft tokens per image ``[N]``: its real patches divided by ``pooling_kernel_size²``."""
    real = np.all(np.asarray(image_position_ids) != -1, axis=-1)
    return real.sum(-1) // pooling_kernel_size ** 2


def check_image_prompt(cfg, tokens: np.ndarray, pixel_values: np.ndarray, image_position_ids: np.ndarray) -> None:
    """Raises ValueError unless the images fit the vision tower of ``cfg`` (a
    :class:`cqjax.models.gemma4_multimodal.Gemma4MultimodalConfig`) and ``tokens`` holds one
    ``image_token_id`` placeholder per soft token they give."""
    v = cfg.vision
    if v is None:
        raise ValueError("gemma4: this checkpoint has no vision tower (no vision_config); it cannot read images")
    pixel_values, positions = np.asarray(pixel_values), np.asarray(image_position_ids)
    p = 3 * v.patch_size ** 2
    if pixel_values.ndim != 3 or pixel_values.shape[-1] != p or positions.shape != (*pixel_values.shape[:2], 2):
        raise ValueError(f"gemma4: pixel_values {list(pixel_values.shape)} and image_position_ids "
                         f"{list(positions.shape)} must be [images, patches, {p}] and [images, patches, 2]")
    if positions.max(initial=0) >= v.position_embedding_size:
        raise ValueError(f"gemma4: image_position_ids reach {positions.max()}; the position table has "
                         f"{v.position_embedding_size} rows")
    slots = int((np.asarray(tokens) == cfg.image_token_id).sum())
    soft = int(soft_token_counts(positions, v.pooling_kernel_size).sum())
    if slots != soft:
        raise ValueError(f"gemma4: the prompt has {slots} image placeholders (image_token_id {cfg.image_token_id}); "
                         f"the images give {soft} soft tokens")


def patchify(image: np.ndarray, patch_size: int, max_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_values [max_patches, 3·p²], image_position_ids [max_patches, 2])`` of one image
    ``[H, W, 3]`` in ``[0, 1]`` already resized, as transformers' ``Gemma4ImageProcessor`` after
    its resize: patches row-major, each ``(row, column, channel)``; padding rows zero at
    position ``(-1, -1)``. ``H`` and ``W`` must be multiples of ``patch_size``; the pooler also
    needs them multiples of ``patch_size · pooling_kernel_size`` (the processor's resize does that).

    >>> pv, pos = patchify(np.zeros((4, 6, 3)), 2, 8)
    >>> pv.shape, pos[:4].tolist(), pos[-1].tolist()
    ((8, 12), [[0, 0], [1, 0], [2, 0], [0, 1]], [-1, -1])
    """
    h, w, c = image.shape
    ph, pw = h // patch_size, w // patch_size
    if c != 3 or ph * patch_size != h or pw * patch_size != w or ph * pw > max_patches:
        raise ValueError(f"patchify: image {list(image.shape)} must be [H, W, 3] with H and W multiples of "
                         f"{patch_size} and at most {max_patches} patches")
    patches = image.reshape(ph, patch_size, pw, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)
    xs, ys = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    pixel_values = np.zeros((max_patches, patches.shape[1]), np.float32)
    positions = np.full((max_patches, 2), -1, np.int64)
    pixel_values[:ph * pw], positions[:ph * pw] = patches, np.stack([xs, ys], -1).reshape(-1, 2)
    return pixel_values, positions


def jit_call(model, fn):
    """``fn(model, *arrays)`` as one jitted call, ``model``'s quantized leaves in their runtime
    layout (:func:`cqjax.runtime.prepare`, under the kernel mode current now)."""
    from cqjax.runtime import prepare

    graphdef, state = nnx.split(prepare(model))
    run = jax.jit(lambda state, *arrays: fn(nnx.merge(graphdef, state), *arrays))
    return lambda *arrays: run(state, *arrays)


def image_soft_tokens(model, pixel_values: np.ndarray, image_position_ids: np.ndarray) -> np.ndarray:
    """The images' soft tokens in the text model's width, ``[n, D_text]``: every image's valid
    tokens, image after image (transformers' ``get_image_features(...).pooler_output``,
    concatenated), jitted by :func:`jit_call`. ``model`` is a
    :class:`cqjax.models.gemma4_multimodal.Gemma4ForConditionalGeneration`."""
    features, valid = jit_call(model, lambda m, pv, pos: m.image_features(pv, pos))(
        jnp.asarray(pixel_values, jnp.float32), jnp.asarray(image_position_ids, jnp.int32))
    return np.asarray(features)[np.asarray(valid)]


def hf_name(path: str) -> str:
    """``vision_tower/encoder/layers/0/mlp/up_proj/linear/kernel`` →
    ``model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight`` (also ``embed_vision/…``)."""
    return "model." + re.sub(r"/(kernel|scale)$", "/weight", path).replace("/", ".")


def is_vision_path(path: str) -> bool:
    """An IR path of the vision tower or its embedder (tower ``vision``)."""
    return path.startswith(("vision_tower/", "embed_vision/"))
