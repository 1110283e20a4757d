"""Gemma 4's audio tower (transformers' ``Gemma4AudioModel``) and its embedder into the text model
(``Gemma4MultimodalEmbedder``), held by the multimodal Gemma 4
(:class:`cqjax.models.gemma4_multimodal.Gemma4ForConditionalGeneration`) as ``audio_tower`` and
``embed_audio``.

:func:`audio_soft_tokens` computes what transformers' ``Gemma4Model.get_audio_features`` does:
log-mel features ``[B, frames, mels]`` (:func:`cqjax.eval.gemma4_features.log_mel`) and their
mask through

=====================================  ======================================================
module                                 what it does
=====================================  ======================================================
``subsample_conv_projection``          two 3x3 stride-2 convolutions over (time, mel), each
                                       after zeroing padded frames, then a LayerNorm over
                                       channels (no bias) and ReLU; the mask keeps every
                                       other frame; a linear projects (mel, channel) to
                                       ``hidden_size``: ``T' = ceil(ceil(frames / 2) / 2)``
``layers/N`` (a conformer block)       half-step feed-forward, chunked local self-attention,
                                       light convolution, half-step feed-forward, RMSNorm;
                                       activations clipped to ``gradient_clipping``
``self_attn``                          blocks of ``attention_chunk_size`` queries attend to a
                                       context of ``chunk + context_left - 1 + context_right``
                                       keys; a relative position term (sinusoids through
                                       ``relative_k_proj``, Transformer-XL shift); queries
                                       scaled by ``softplus(per_dim_scale)``; ``tanh``
                                       soft-capped logits; keys that are padding or outside
                                       ``(q - context_left + 1, q + context_right)`` masked
``lconv1d``                            GLU, a causal depthwise convolution, RMSNorm
``output_proj``                        ``hidden_size`` -> ``output_proj_dims`` (biased)
``embed_audio``                        RMSNorm without weight, then a linear to the text
                                       model's ``hidden_size``
=====================================  ======================================================

IR paths are transformers' module names under ``audio_tower/`` and ``embed_audio/``
(:func:`audio_hf_name` gives the checkpoint tensor, :func:`audio_params` lists them all), all
of tower ``audio``; ``N/`` below stands for ``audio_tower/layers/N/``:

=================================================  ======  ===============================
IR path                                            role    stored
=================================================  ======  ===============================
``N/self_attn/q_proj/linear/kernel``               linear  ``[in, out]``
``N/self_attn/q_proj/input_min`` (``input_max``,   other   scalar
``output_min``, ``output_max``)
``N/self_attn/relative_k_proj/kernel``             linear  ``[in, out]``
``N/self_attn/per_dim_scale``                      other   ``[head_dim]``
``N/lconv1d/depthwise_conv1d/kernel``              other   ``[hidden, 1, width]``
``N/feed_forward1/pre_layer_norm/scale``           norm    ``[hidden]``
``audio_tower/subsample_conv_projection/``         conv    ``[3 x 3 x in, out]``
``layer0/conv/kernel`` (and ``layer1``)
``audio_tower/output_proj/kernel``, ``/bias``      linear  ``[hidden, output_proj_dims]``,
                                                   bias    ``[output_proj_dims]``
``embed_audio/embedding_projection/kernel``        linear  ``[output_proj_dims, text hidden]``
=================================================  ======  ===============================

Every ``Gemma4ClippableLinear`` (q/k/v/post, the feed-forward and light-convolution linears) is
a linear at ``.../linear/kernel`` that passes quantize like any other, with its four clip
bounds beside it as float scalars (role ``other``, absent when ``use_clipped_linears`` is
false): clipping the input before a quantized matmul and its output after keeps their meaning.
The two subsampling convolutions are quantizable like Whisper's, as the linear of their
unfolded input (the checkpoint's ``[out, in, 3, 3]``, window position major). The depthwise
convolution stays float in the checkpoint's layout: it is no matmul (each channel has its own
taps), so no packed format applies, and it holds ``hidden x width`` weights per layer (5 120 of
the released tower's ~25 M per layer).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqjax.errors import ConfigError
from cqjax.ir import TensorMeta
from cqjax.models import layers
from cqjax.models.families import check_keys, expect
from cqjax.models.gemma4_vision import ClippableLinear, MultimodalEmbedder

# transformers' Gemma4AudioConfig defaults, used for keys a config leaves out.
DEFAULTS: dict[str, Any] = dict(
    hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, hidden_act="silu",
    subsampling_conv_channels=[128, 32], conv_kernel_size=5, residual_weight=0.5, attention_chunk_size=12,
    attention_context_left=13, attention_context_right=0, attention_logit_cap=50.0,
    attention_invalid_logits_value=-1.0e9, use_clipped_linears=True, rms_norm_eps=1e-6,
    gradient_clipping=1e10, output_proj_dims=1536,
)
#: The IR path prefixes of the audio tower and its embedder (all of tower ``audio``).
AUDIO_PREFIXES = ("audio_tower/", "embed_audio/")
#: The eps of transformers' ``Gemma4RMSNorm`` where the audio tower builds one without passing
#: ``rms_norm_eps`` (the feed-forward norms and the block's three norms).
DEFAULT_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma4AudioConfig:
    """A Gemma 4 ``audio_config``, normalized (hashable: it is static model structure), with the
    text model's ``hidden_size`` that the embedder projects to."""

    hidden_size: int
    num_layers: int
    num_heads: int
    act: str
    conv_channels: tuple[int, int]
    conv_kernel_size: int
    residual_weight: float
    chunk_size: int
    context_left: int
    context_right: int
    logit_cap: float
    invalid_logit: float
    clipped_linears: bool
    rms_norm_eps: float
    gradient_clipping: float
    output_dims: int
    text_hidden_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def context_size(self) -> int:
        """Keys each block of queries sees: ``chunk + context_left - 1 + context_right``."""
        return self.chunk_size + self.context_left - 1 + self.context_right


def parse_audio_config(raw: dict, source: str, *, text_hidden_size: int) -> Gemma4AudioConfig:
    """transformers ``Gemma4AudioConfig`` dict (a Gemma 4 config's ``audio_config``) →
    :class:`Gemma4AudioConfig`; ConfigError names the key that is unknown or unsupported.

    Args:
      raw: the ``audio_config`` mapping.
      source: where it came from, for errors (``config.json``).
      text_hidden_size: the text model's ``hidden_size`` (the embedder's output).
    """
    where = f"{source} (audio_config)"
    check_keys(raw, frozenset(DEFAULTS), where)
    expect(raw, "model_type", ("gemma4_audio",), where, "gemma4_audio")
    raw = {**DEFAULTS, **raw}
    act = expect(raw, "hidden_act", tuple(layers.ACTIVATIONS), where)
    channels = raw["subsampling_conv_channels"]
    if not (isinstance(channels, (list, tuple)) and len(channels) == 2 and all(int(c) >= 1 for c in channels)):
        raise ConfigError(f"{where}: config key 'subsampling_conv_channels' = {channels!r}; two positive "
                          "channel counts expected (the two subsampling convolutions)")
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    if hidden % heads or hidden % 2:
        raise ConfigError(f"{where}: config key 'hidden_size' = {hidden} must be even and a multiple of "
                          f"num_attention_heads = {heads}")
    for key, low in (("attention_chunk_size", 1), ("attention_context_left", 1), ("attention_context_right", 0),
                     ("conv_kernel_size", 1), ("output_proj_dims", 1), ("num_hidden_layers", 1)):
        if int(raw[key]) < low:
            raise ConfigError(f"{where}: config key {key!r} = {raw[key]} must be at least {low}")
    return Gemma4AudioConfig(
        hidden_size=hidden, num_layers=int(raw["num_hidden_layers"]), num_heads=heads, act=act,
        conv_channels=(int(channels[0]), int(channels[1])), conv_kernel_size=int(raw["conv_kernel_size"]),
        residual_weight=float(raw["residual_weight"]), chunk_size=int(raw["attention_chunk_size"]),
        context_left=int(raw["attention_context_left"]), context_right=int(raw["attention_context_right"]),
        logit_cap=float(raw["attention_logit_cap"]), invalid_logit=float(raw["attention_invalid_logits_value"]),
        clipped_linears=bool(raw["use_clipped_linears"]), rms_norm_eps=float(raw["rms_norm_eps"]),
        gradient_clipping=float(raw["gradient_clipping"]), output_dims=int(raw["output_proj_dims"]),
        text_hidden_size=int(text_hidden_size))


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _clip(x: jax.Array, bound: float) -> jax.Array:
    """transformers' ``gradient_clipping`` of activations: to ``±min(bound, dtype max)``."""
    bound = min(bound, float(jnp.finfo(x.dtype).max))
    return jnp.clip(x, -bound, bound)


class Conv2d(nnx.Module):
    """A 3x3 convolution with stride 2 and padding 1 and no bias over ``x [B, T, F, C]``, as the
    matmul of its unfolded input: ``kernel [3 x 3 x in, out]``, window position (row-major)
    major. The kernel records its ``window``, ``(3, 3)``, by which the Hugging Face export folds
    it back to ``[out, in, 3, 3]`` (:func:`cqjax.io.export.checkpoint_layout`)."""

    def __init__(self, in_ch: int, out_ch: int, dtype=jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((9 * in_ch, out_ch), dtype), role="conv", window=(3, 3))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, F, in]`` → ``[B, ceil(T / 2), ceil(F / 2), out]``."""
        t, f = (x.shape[1] + 1) // 2, (x.shape[2] + 1) // 2
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        cols = [xp[:, i: i + 2 * t - 1: 2, j: j + 2 * f - 1: 2] for i in range(3) for j in range(3)]
        return layers.matmul(jnp.concatenate(cols, axis=-1), self.kernel.get_value())


class SubSampleConvLayer(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, eps: float, dtype=jnp.float32):
        self.conv = Conv2d(in_ch, out_ch, dtype)
        self.norm = layers.LayerNorm(out_ch, eps=eps, bias=False, dtype=dtype)

    def __call__(self, x, mask):
        x = self.conv(x * mask[:, :, None, None].astype(x.dtype))
        return jax.nn.relu(self.norm(x)), mask[:, ::2]


class SubSampleConvProjection(nnx.Module):
    def __init__(self, cfg: Gemma4AudioConfig, dtype=jnp.float32):
        c0, c1 = cfg.conv_channels
        self.layer0 = SubSampleConvLayer(1, c0, cfg.rms_norm_eps, dtype)
        self.layer1 = SubSampleConvLayer(c0, c1, cfg.rms_norm_eps, dtype)
        # transformers sizes the projection's input (c0 // 4) * c1: right when the mel bins,
        # a quarter of them left after two stride-2 convolutions, number c0 (128 released);
        # features with another count are refused when called.
        self.input_proj_linear = layers.Linear((c0 // 4) * c1, cfg.hidden_size, dtype=dtype)

    def __call__(self, features, mask):
        x, mask = self.layer0(features[..., None], mask)
        x, mask = self.layer1(x, mask)
        b, t, f, c = x.shape
        k = self.input_proj_linear.kernel.get_value().shape[0]
        if f * c != k:
            raise ValueError(f"gemma4 audio: features with {features.shape[-1]} mel bins leave {f} x {c} = {f * c} "
                             f"inputs for input_proj_linear, which takes {k}")
        return self.input_proj_linear(x.reshape(b, t, f * c)), mask


def relative_positions(cfg: Gemma4AudioConfig) -> np.ndarray:
    """float32 ``[context_size // 2 + 1, hidden_size]``: ``[sin, cos]`` of the relative positions
    ``context_size // 2 ... 0`` (transformers' ``Gemma4AudioRelPositionalEncoding``)."""
    n = cfg.hidden_size // 2
    inv = np.exp(np.arange(n, dtype=np.float32) * np.float32(-math.log(10_000.0) / max(n - 1, 1)))
    angles = np.arange(cfg.context_size // 2, -1, -1, dtype=np.float32)[:, None] * inv
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def blocked_mask(valid: jax.Array, cfg: Gemma4AudioConfig) -> jax.Array:
    """Boolean ``[B, blocks, chunk, context]``: whether query ``chunk·n + i`` sees key
    ``chunk·n + j - (context_left - 1)`` (the key is a real frame and lies within
    ``0 <= q - k < context_left - 1`` or ``0 < k - q < context_right``), from ``valid [B, T]``."""
    t = valid.shape[1]
    c, past = cfg.chunk_size, cfg.context_left - 1
    blocks = -(-t // c)
    q = np.arange(blocks * c).reshape(blocks, c, 1)
    k = (np.arange(blocks) * c)[:, None, None] + np.arange(cfg.context_size)[None, None, :] - past
    dist = q - k
    window = ((dist >= 0) & (dist < past)) | ((dist < 0) & (-dist < cfg.context_right))
    keys = jnp.asarray(valid, bool)[:, np.clip(k, 0, t - 1)] & ((k >= 0) & (k < t))[None]
    return keys & window[None]


def _rel_shift(x: jax.Array, context: int) -> jax.Array:
    """Transformer-XL's shift ``[..., chunk, positions]`` → ``[..., chunk, context]`` (as
    transformers: pad to ``context + 1`` columns, flatten, drop the tail, fold)."""
    *lead, c, p = x.shape
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, context + 1 - p)])
    return x.reshape(*lead, c * (context + 1))[..., : c * context].reshape(*lead, c, context)


class Attention(nnx.Module):
    """Chunked local attention with a relative position term (see the module table).

    Not :func:`cqjax.models.layers.dot_product_attention`: the position term is added to the
    logits before the soft cap, and every block of queries has its own window of keys."""

    def __init__(self, cfg: Gemma4AudioConfig, dtype=jnp.float32):
        d, clipped = cfg.hidden_size, cfg.clipped_linears
        self.q_proj = ClippableLinear(d, d, clipped=clipped, dtype=dtype)
        self.k_proj = ClippableLinear(d, d, clipped=clipped, dtype=dtype)
        self.v_proj = ClippableLinear(d, d, clipped=clipped, dtype=dtype)
        self.post = ClippableLinear(d, d, clipped=clipped, dtype=dtype)
        self.relative_k_proj = layers.Linear(d, d, dtype=dtype)
        self.per_dim_scale = nnx.Param(jnp.zeros((cfg.head_dim,), dtype), role="other")
        self.config = cfg

    def _context(self, x: jax.Array) -> jax.Array:
        """``[B, T, H, D]`` → each block's keys ``[B, blocks, context, H, D]`` (zero outside)."""
        cfg, t = self.config, x.shape[1]
        blocks = -(-t // cfg.chunk_size)
        x = jnp.pad(x, ((0, 0), (cfg.context_left - 1, cfg.context_right + cfg.chunk_size - 1), (0, 0), (0, 0)))
        return x[:, np.arange(blocks)[:, None] * cfg.chunk_size + np.arange(cfg.context_size)[None, :]]

    def __call__(self, x, positions, allowed):
        """``x [B, T, D]``, ``positions`` (:func:`relative_positions`), ``allowed`` (:func:`blocked_mask`)."""
        cfg = self.config
        b, t, _ = x.shape
        h, hd, c = cfg.num_heads, cfg.head_dim, cfg.chunk_size
        blocks = -(-t // c)
        split = lambda y: y.astype(jnp.float32).reshape(b, t, h, hd)  # noqa: E731
        scale = hd ** -0.5 / math.log(2) * jax.nn.softplus(self.per_dim_scale[...].astype(jnp.float32))
        q = split(self.q_proj(x)) * scale
        k = split(self.k_proj(x)) * (math.log(1 + math.e) / math.log(2))
        v = split(self.v_proj(x))
        q = jnp.pad(q, ((0, 0), (0, blocks * c - t), (0, 0), (0, 0))).reshape(b, blocks, c, h, hd)
        k, v = self._context(k), self._context(v)
        rel = self.relative_k_proj(positions).astype(jnp.float32).reshape(-1, h, hd)
        logits = jnp.einsum("bnqhd,bnkhd->bhnqk", q, k)
        logits = logits + _rel_shift(jnp.einsum("bnqhd,phd->bhnqp", q, rel), cfg.context_size)
        logits = jnp.tanh(logits / cfg.logit_cap) * cfg.logit_cap
        logits = jnp.where(allowed[:, None], logits, cfg.invalid_logit)
        out = jnp.einsum("bhnqk,bnkhd->bnqhd", jax.nn.softmax(logits, axis=-1), v)
        return self.post(out.reshape(b, blocks * c, h * hd)[:, :t].astype(x.dtype))


class FeedForward(nnx.Module):
    """``x + residual_weight · norm(ffw_2(act(ffw_1(norm(x)))))``, activations clipped."""

    def __init__(self, cfg: Gemma4AudioConfig, dtype=jnp.float32):
        d = cfg.hidden_size
        self.ffw_layer_1 = ClippableLinear(d, 4 * d, clipped=cfg.clipped_linears, dtype=dtype)
        self.ffw_layer_2 = ClippableLinear(4 * d, d, clipped=cfg.clipped_linears, dtype=dtype)
        self.pre_layer_norm = layers.RMSNorm(d, eps=DEFAULT_EPS, dtype=dtype)
        self.post_layer_norm = layers.RMSNorm(d, eps=DEFAULT_EPS, dtype=dtype)
        self.act, self.bound, self.residual_weight = cfg.act, cfg.gradient_clipping, cfg.residual_weight

    def __call__(self, x):
        h = self.ffw_layer_1(self.pre_layer_norm(_clip(x, self.bound)))
        h = self.ffw_layer_2(layers.ACTIVATIONS[self.act](h))
        return x + self.post_layer_norm(_clip(h, self.bound)) * self.residual_weight


class DepthwiseCausalConv1d(nnx.Module):
    """``out[t, c] = Σ_j kernel[c, 0, j] · x[t - width + 1 + j, c]`` (zeros before the start);
    the kernel keeps the checkpoint's ``[channels, 1, width]`` (role ``other``, see the module)."""

    def __init__(self, channels: int, width: int, dtype=jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((channels, 1, width), dtype), role="other")

    def __call__(self, x):
        w = self.kernel[...].astype(x.dtype)
        width, t = w.shape[-1], x.shape[1]
        xp = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
        out = xp[:, :t] * w[:, 0, 0]
        for j in range(1, width):
            out = out + xp[:, j: j + t] * w[:, 0, j]
        return out


class LightConv1d(nnx.Module):
    def __init__(self, cfg: Gemma4AudioConfig, dtype=jnp.float32):
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.linear_start = ClippableLinear(d, 2 * d, clipped=cfg.clipped_linears, dtype=dtype)
        self.linear_end = ClippableLinear(d, d, clipped=cfg.clipped_linears, dtype=dtype)
        self.depthwise_conv1d = DepthwiseCausalConv1d(d, cfg.conv_kernel_size, dtype)
        self.pre_layer_norm = layers.RMSNorm(d, eps=eps, dtype=dtype)
        self.conv_norm = layers.RMSNorm(d, eps=eps, dtype=dtype)
        self.act, self.bound = cfg.act, cfg.gradient_clipping

    def __call__(self, x):
        value, gate = jnp.split(self.linear_start(self.pre_layer_norm(x)), 2, axis=-1)
        h = self.depthwise_conv1d(value * jax.nn.sigmoid(gate))
        h = self.conv_norm(_clip(h, self.bound))
        return x + self.linear_end(layers.ACTIVATIONS[self.act](h))


class AudioLayer(nnx.Module):
    """A conformer block (transformers' ``Gemma4AudioLayer``)."""

    def __init__(self, cfg: Gemma4AudioConfig, dtype=jnp.float32):
        d = cfg.hidden_size
        self.feed_forward1 = FeedForward(cfg, dtype)
        self.feed_forward2 = FeedForward(cfg, dtype)
        self.self_attn = Attention(cfg, dtype)
        self.lconv1d = LightConv1d(cfg, dtype)
        self.norm_pre_attn = layers.RMSNorm(d, eps=DEFAULT_EPS, dtype=dtype)
        self.norm_post_attn = layers.RMSNorm(d, eps=DEFAULT_EPS, dtype=dtype)
        self.norm_out = layers.RMSNorm(d, eps=DEFAULT_EPS, dtype=dtype)
        self.bound = cfg.gradient_clipping

    def __call__(self, x, positions, allowed):
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(_clip(x, self.bound)), positions, allowed)
        x = x + self.norm_post_attn(_clip(h, self.bound))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clip(x, self.bound))


class AudioModel(nnx.Module):
    """transformers' ``Gemma4AudioModel``: ``(features [B, frames, mels], mask [B, frames]) ->
    (hidden [B, T', output_proj_dims], mask [B, T'])``."""

    def __init__(self, cfg: Gemma4AudioConfig, dtype=jnp.float32):
        self.config = cfg
        self.subsample_conv_projection = SubSampleConvProjection(cfg, dtype)
        self.layers = nnx.List([AudioLayer(cfg, dtype) for _ in range(cfg.num_layers)])
        self.output_proj = layers.Linear(cfg.hidden_size, cfg.output_dims, bias=True, dtype=dtype)

    def __call__(self, features, mask):
        x, mask = self.subsample_conv_projection(features, mask)
        positions = jnp.asarray(relative_positions(self.config), x.dtype)
        allowed = blocked_mask(mask, self.config)
        for layer in self.layers:
            x = layer(x, positions, allowed)
        return self.output_proj(x), mask


def audio_soft_tokens(model: nnx.Module, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The soft tokens of audio for the text model (transformers' ``Gemma4Model.get_audio_features``:
    its ``pooler_output`` and ``attention_mask``).

    Args:
      model: a module holding ``audio_tower`` (:class:`AudioModel`) and ``embed_audio``
        (``MultimodalEmbedder(cfg.output_dims, cfg.text_hidden_size, eps=cfg.rms_norm_eps)``,
        :class:`cqjax.models.gemma4_vision.MultimodalEmbedder`).
      features: float ``[B, frames, mels]`` (:func:`cqjax.eval.gemma4_features.log_mel`).
      mask: bool ``[B, frames]``, True on real frames.

    Returns:
      ``(tokens [B, T', text hidden_size], mask bool [B, T'])`` with
      ``T' = ceil(ceil(frames / 2) / 2)``; the text model takes only the tokens where ``mask``
      is True, in order, at its audio placeholders
      (:func:`cqjax.models.gemma4_vision.scatter_soft_tokens`).
    """
    hidden, mask = model.audio_tower(jnp.asarray(features), jnp.asarray(mask, bool))
    return model.embed_audio(hidden), mask


def soft_token_counts(mask: np.ndarray) -> np.ndarray:
    """Soft tokens per clip ``[C]`` of a features mask ``[C, frames]``: the real frames among those
    the two stride-2 subsampling convolutions keep (every fourth, as :class:`SubSampleConvLayer`
    subsamples the mask)."""
    return np.asarray(mask, bool)[:, ::4].sum(-1)


# ---------------------------------------------------------------------------------------------
# Checkpoint names
# ---------------------------------------------------------------------------------------------


def audio_hf_name(path: str) -> str:
    """``audio_tower/layers/0/self_attn/q_proj/linear/kernel`` →
    ``model.audio_tower.layers.0.self_attn.q_proj.linear.weight`` (bare parameters keep their
    names: ``per_dim_scale``, the clip bounds, ``output_proj/bias``).

    >>> audio_hf_name("embed_audio/embedding_projection/kernel")
    'model.embed_audio.embedding_projection.weight'
    """
    if not path.startswith(AUDIO_PREFIXES):
        raise ValueError(f"{path}: not a path of the audio tower or its embedder ({AUDIO_PREFIXES})")
    return "model." + re.sub(r"/(kernel|scale)$", "/weight", path).replace("/", ".")


def audio_params(cfg: Gemma4AudioConfig, dtype: str = "float32") -> dict[str, TensorMeta]:
    """``{IR path: TensorMeta}`` of every parameter of ``audio_tower`` and ``embed_audio``: its
    role, tower ``audio``, checkpoint tensor (:func:`audio_hf_name`) and IR shape."""
    from cqjax.io.hf import param_roles  # the importer's reading of roles (cqjax.io imports the models)

    out = {}
    for prefix, build in (("audio_tower", lambda: AudioModel(cfg)),
                          ("embed_audio", lambda: MultimodalEmbedder(cfg.output_dims, cfg.text_hidden_size,
                                                                     eps=cfg.rms_norm_eps))):
        for path, (shape, role) in param_roles(nnx.eval_shape(build)).items():
            full = f"{prefix}/{path}"
            out[full] = TensorMeta(role=role, tower="audio", hf_name=audio_hf_name(full), shape=shape, dtype=dtype)
    return out
