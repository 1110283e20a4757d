"""Whisper speech recognizers (``model_type: whisper``): an audio encoder and a text decoder.

The model computes what transformers' ``WhisperForConditionalGeneration`` computes: log-mel
features ``[B, mels, 3000]`` (:mod:`cqjax.eval.speech` makes them) through two convolutions
(GELU, the second with stride 2), fixed sinusoidal positions and pre-LayerNorm blocks give the
encoder states ``[B, 1500, D]``; the decoder embeds tokens plus learned positions, and each
block runs causal self-attention, cross-attention to the encoder states and an MLP; its logits
come from the token table (a tied head).

IR paths are transformers' module names under ``encoder/`` (tower ``audio``) and ``decoder/``
(tower ``text``), with ``/`` for ``.``:

=============================================  ==========================================  =========
IR path                                        checkpoint tensor                           role
=============================================  ==========================================  =========
``encoder/conv1/kernel``                       ``model.encoder.conv1.weight``              conv
``encoder/embed_positions/embedding``          ``model.encoder.embed_positions.weight``    other
``encoder/layers/0/self_attn/q_proj/kernel``   ``model.encoder.layers.0.self_attn.q_proj.weight``  linear
``encoder/layers/0/fc1/kernel``                ``model.encoder.layers.0.fc1.weight``       linear
``decoder/embed_tokens/embedding``             ``model.decoder.embed_tokens.weight``       embedding
``decoder/layers/0/encoder_attn/k_proj/kernel`` ``model.decoder.layers.0.encoder_attn.k_proj.weight``  linear
=============================================  ==========================================  =========

A convolution's kernel is stored as the linear that multiplies its unfolded input: ``[kernel
width x in channels, out]`` with the window position major (the checkpoint's ``[out, in,
width]``; :func:`cqjax.io.hf.import_checkpoint` reshapes it). Convolutions and position tables
stay float (1.4% of tiny.en's parameters).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from cqjax.errors import ConfigError
from cqjax.models import layers, registry
from cqjax.models.families import check_keys, expect, require

#: The encoder's convolution width.
CONV_WIDTH = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class WhisperConfig:
    """A Whisper model's sizes and special tokens, normalized from its Hugging Face config."""

    family: str = "whisper"
    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn: int
    decoder_ffn: int
    num_mel_bins: int
    max_source_positions: int
    max_target_positions: int
    decoder_start_token_id: int
    eos_token_id: int
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    act: str = "gelu"


WHISPER_KEYS = frozenset({
    "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "num_mel_bins", "max_source_positions",
    "max_target_positions", "decoder_start_token_id", "activation_function", "scale_embedding",
    "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids", "num_hidden_layers", "dropout",
    "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop", "init_std",
    "is_encoder_decoder", "max_length", "use_weighted_layer_sum", "classifier_proj_size",
    "apply_spec_augment", "mask_time_prob", "mask_time_length", "mask_time_min_masks", "mask_feature_prob",
    "mask_feature_length", "mask_feature_min_masks", "median_filter_width", "use_cache", "alignment_heads",
    "lang_ids"})


def parse_whisper(raw: dict, source: str) -> WhisperConfig:
    """A ``model_type: whisper`` config.json as a :class:`WhisperConfig`; errors name the key."""
    check_keys(raw, WHISPER_KEYS, source)
    act = expect(raw, "activation_function", ("gelu",), source, "gelu")
    if raw.get("scale_embedding"):
        raise ConfigError(f"{source}: config key 'scale_embedding' = true is not supported")
    if raw.get("tie_word_embeddings") is False:
        raise ConfigError(f"{source}: config key 'tie_word_embeddings' = false: only Whisper's tied output head "
                          "(proj_out = the token table) is supported")
    d = require(raw, "d_model", source)
    for key in ("encoder_attention_heads", "decoder_attention_heads"):
        if d % require(raw, key, source):
            raise ConfigError(f"{source}: config key 'd_model' = {d} is not a multiple of {key} = {raw[key]}")
    eos = raw.get("eos_token_id", 50256)
    return WhisperConfig(
        vocab_size=require(raw, "vocab_size", source), d_model=d,
        encoder_layers=require(raw, "encoder_layers", source), decoder_layers=require(raw, "decoder_layers", source),
        encoder_heads=raw["encoder_attention_heads"], decoder_heads=raw["decoder_attention_heads"],
        encoder_ffn=require(raw, "encoder_ffn_dim", source), decoder_ffn=require(raw, "decoder_ffn_dim", source),
        num_mel_bins=require(raw, "num_mel_bins", source),
        max_source_positions=require(raw, "max_source_positions", source),
        max_target_positions=require(raw, "max_target_positions", source),
        decoder_start_token_id=require(raw, "decoder_start_token_id", source),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
        suppress_tokens=tuple(int(t) for t in raw.get("suppress_tokens") or ()),
        begin_suppress_tokens=tuple(int(t) for t in raw.get("begin_suppress_tokens") or ()), act=act)


class Conv1d(nnx.Module):
    """A 1-D convolution (padding ``width // 2``) as a matmul over the unfolded input."""

    def __init__(self, in_ch: int, out_ch: int, *, width: int = CONV_WIDTH, stride: int = 1, dtype=jnp.float32):
        self.kernel = nnx.Param(jnp.zeros((width * in_ch, out_ch), dtype), role="conv")
        self.bias = nnx.Param(jnp.zeros((out_ch,), dtype), role="bias")
        self.width, self.stride = width, stride

    def __call__(self, x):
        """``x [B, T, C]`` → ``[B, ceil(T / stride), out]``."""
        pad = self.width // 2
        xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
        n = (x.shape[1] + 2 * pad - self.width) // self.stride + 1
        cols = [xp[:, j: j + self.stride * (n - 1) + 1: self.stride] for j in range(self.width)]
        return layers.matmul(jnp.concatenate(cols, axis=-1), self.kernel.get_value()) + self.bias[...]


class Attention(nnx.Module):
    """Multi-head attention with biased q, v and out projections (k has none, as in Whisper)."""

    def __init__(self, d: int, heads: int, dtype=jnp.float32):
        self.q_proj = layers.Linear(d, d, bias=True, dtype=dtype)
        self.k_proj = layers.Linear(d, d, bias=False, dtype=dtype)
        self.v_proj = layers.Linear(d, d, bias=True, dtype=dtype)
        self.out_proj = layers.Linear(d, d, bias=True, dtype=dtype)
        self.heads = heads

    def kv(self, source):
        """Keys and values of ``source [B, S, d]`` as attention reads them (:func:`layers.kv_layout`)."""
        b, s, d = source.shape
        split = (b, s, self.heads, d // self.heads)
        return layers.kv_layout(self.k_proj(source).reshape(split), self.v_proj(source).reshape(split))

    def __call__(self, x, kv, mask):
        b, t, d = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, d // self.heads)
        out = layers.dot_product_attention(q, *kv, mask, scale=(d // self.heads) ** -0.5)
        return self.out_proj(out.reshape(b, t, d))


def _norm(d, dtype):
    return layers.LayerNorm(d, eps=1e-5, dtype=dtype)


class _Block(nnx.Module):
    """The MLP every block ends with: ``fc2(act(fc1(final_layer_norm(x))))``."""

    def _mlp(self, cfg: WhisperConfig, ffn: int, dtype):
        self.fc1 = layers.Linear(cfg.d_model, ffn, bias=True, dtype=dtype)
        self.fc2 = layers.Linear(ffn, cfg.d_model, bias=True, dtype=dtype)
        self.final_layer_norm = _norm(cfg.d_model, dtype)
        self.act = cfg.act

    def fc(self, x):
        return self.fc2(layers.ACTIVATIONS[self.act](self.fc1(x)))


class EncoderLayer(_Block):
    def __init__(self, cfg: WhisperConfig, dtype=jnp.float32):
        d = cfg.d_model
        self.self_attn, self.self_attn_layer_norm = Attention(d, cfg.encoder_heads, dtype), _norm(d, dtype)
        self._mlp(cfg, cfg.encoder_ffn, dtype)

    def __call__(self, x):
        h = self.self_attn_layer_norm(x)
        b, t, _ = x.shape
        x = x + self.self_attn(h, self.self_attn.kv(h), jnp.ones((b, t, t), bool))
        return x + self.fc(self.final_layer_norm(x))


class DecoderLayer(_Block):
    def __init__(self, cfg: WhisperConfig, dtype=jnp.float32):
        d = cfg.d_model
        self.self_attn, self.self_attn_layer_norm = Attention(d, cfg.decoder_heads, dtype), _norm(d, dtype)
        self.encoder_attn, self.encoder_attn_layer_norm = Attention(d, cfg.decoder_heads, dtype), _norm(d, dtype)
        self._mlp(cfg, cfg.decoder_ffn, dtype)

    def __call__(self, x, cross_kv, mask):
        h = self.self_attn_layer_norm(x)
        x = x + self.self_attn(h, self.self_attn.kv(h), mask)
        b, t, _ = x.shape
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), cross_kv,
                                  jnp.ones((b, t, cross_kv[1].shape[1]), bool))
        return x + self.fc(self.final_layer_norm(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: WhisperConfig, dtype=jnp.float32):
        d = cfg.d_model
        self.conv1 = Conv1d(cfg.num_mel_bins, d, dtype=dtype)
        self.conv2 = Conv1d(d, d, stride=2, dtype=dtype)
        self.embed_positions = layers.Embed(cfg.max_source_positions, d, role="other", dtype=dtype)
        self.layers = nnx.List([EncoderLayer(cfg, dtype) for _ in range(cfg.encoder_layers)])
        self.layer_norm = _norm(d, dtype)

    def __call__(self, features):
        """``features [B, mels, 2 * positions]`` → ``[B, positions, D]``."""
        gelu = layers.ACTIVATIONS["gelu"]
        x = gelu(self.conv2(gelu(self.conv1(jnp.swapaxes(features.astype(jnp.float32), 1, 2)))))
        n = self.embed_positions.embedding.get_value().shape[0]
        if x.shape[1] != n:
            raise ValueError(f"whisper encoder: features give {x.shape[1]} positions, the model has {n} "
                             f"(features must be [B, mels, {2 * n}])")
        x = x + self.embed_positions(jnp.arange(n), x.dtype)[None]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class Decoder(nnx.Module):
    def __init__(self, cfg: WhisperConfig, dtype=jnp.float32):
        d = cfg.d_model
        self.embed_tokens = layers.Embed(cfg.vocab_size, d, dtype=dtype)
        self.embed_positions = layers.Embed(cfg.max_target_positions, d, role="other", dtype=dtype)
        self.layers = nnx.List([DecoderLayer(cfg, dtype) for _ in range(cfg.decoder_layers)])
        self.layer_norm = _norm(d, dtype)

    def cross_kv(self, states) -> list:
        """Each block's cross-attention keys and values of the encoder ``states`` (computed once
        per utterance)."""
        return [layer.encoder_attn.kv(states) for layer in self.layers]

    def __call__(self, tokens, cross_kv):
        """Hidden states ``[B, T, D]`` of ``tokens [B, T]`` (causal)."""
        t = tokens.shape[1]
        x = self.embed_tokens(tokens) + self.embed_positions(jnp.arange(t))[None]
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tokens.shape[0], t, t))
        for layer, kv in zip(self.layers, cross_kv):
            x = layer(x, kv, causal)
        return self.layer_norm(x)


class SpeechToText(nnx.Module):
    """``model(features, tokens) -> logits [B, T, vocab]`` (float32), as transformers'
    ``WhisperForConditionalGeneration`` with ``decoder_input_ids=tokens``."""

    def __init__(self, cfg: WhisperConfig, dtype=jnp.float32):
        self.config = cfg
        self.encoder = Encoder(cfg, dtype)
        self.decoder = Decoder(cfg, dtype)

    def logits(self, tokens, cross_kv):
        return self.decoder.embed_tokens.attend(self.decoder(tokens, cross_kv)).astype(jnp.float32)

    def __call__(self, features, tokens):
        return self.logits(tokens, self.decoder.cross_kv(self.encoder(features)))


def whisper_hf_name(path: str, cfg: WhisperConfig) -> str:
    """``encoder/layers/0/fc1/kernel`` → ``model.encoder.layers.0.fc1.weight``."""
    name = re.sub(r"/(kernel|scale|embedding)$", "/weight", path)
    return "model." + name.replace("/", ".")


def whisper_ignorable(name: str, cfg: WhisperConfig) -> bool:
    """A saved copy of the tied output head."""
    return name == "proj_out.weight"


def whisper_tower(path: str) -> str:
    return "audio" if path.startswith("encoder/") else "text"


registry.register(registry.Family(name="whisper", model_types=("whisper",), parse_config=parse_whisper,
                                  build=SpeechToText, hf_name=whisper_hf_name, ignorable=whisper_ignorable,
                                  kind="speech_to_text", tower=whisper_tower))
