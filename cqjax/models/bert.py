"""BERT-family sentence encoders (all-MiniLM-L6-v2 and other ``model_type: bert`` checkpoints).

The encoder computes what transformers' ``BertModel`` computes for ``last_hidden_state``
(post-LayerNorm blocks, bidirectional attention over the real tokens, exact GELU), and
:meth:`SentenceEncoder.sentence_embedding` what sentence-transformers defines for its
mean-pooling models: the mean of the real tokens' last hidden states, L2-normalized.

IR paths follow transformers' module names with the blocks under ``layers/<i>`` (as in every
other family, so block-wise code finds them):

===========================================  ===========================================  ========
IR path                                      checkpoint tensor                            role
===========================================  ===========================================  ========
``embeddings/word_embeddings/embedding``     ``embeddings.word_embeddings.weight``        embedding
``embeddings/position_embeddings/embedding``  ``embeddings.position_embeddings.weight``    other
``embeddings/token_type_embeddings/embedding`` ``embeddings.token_type_embeddings.weight``  other
``embeddings/LayerNorm/scale``, ``bias``     ``embeddings.LayerNorm.weight``, ``bias``    norm, bias
``layers/0/attention/query/kernel``          ``encoder.layer.0.attention.self.query.weight``  linear
``layers/0/attention/output/kernel``         ``encoder.layer.0.attention.output.dense.weight``  linear
``layers/0/attention_norm/scale``            ``encoder.layer.0.attention.output.LayerNorm.weight``  norm
``layers/0/intermediate/kernel``             ``encoder.layer.0.intermediate.dense.weight``  linear
``layers/0/output/kernel``                   ``encoder.layer.0.output.dense.weight``      linear
``layers/0/output_norm/scale``               ``encoder.layer.0.output.LayerNorm.weight``  norm
===========================================  ===========================================  ========

The position and token-type tables are added to every token (0.9% of MiniLM's parameters):
they keep role ``other`` and stay float, as norms do. The pooler (``pooler.dense``, a [CLS]
head that mean-pooling models do not use) and the ``position_ids`` buffer are not imported.
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
from cqjax.models.transformer import default_side


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """A BERT encoder's sizes, normalized from its Hugging Face config."""

    family: str = "bert"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    act: str = "gelu"
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


BERT_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "type_vocab_size",
    "layer_norm_eps", "position_embedding_type", "gradient_checkpointing", "classifier_dropout"})


def parse_bert(raw: dict, source: str) -> BertConfig:
    """A ``model_type: bert`` config.json as a :class:`BertConfig`; errors name the key."""
    check_keys(raw, BERT_KEYS, source)
    expect(raw, "position_embedding_type", ("absolute",), source, "absolute")
    act = expect(raw, "hidden_act", ("gelu",), source, "gelu")
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        raise ConfigError(f"{source}: config key 'is_decoder'/'add_cross_attention': only BERT encoders are supported")
    hidden, heads = require(raw, "hidden_size", source), require(raw, "num_attention_heads", source)
    if hidden % heads:
        raise ConfigError(f"{source}: config key 'hidden_size' = {hidden} is not a multiple of "
                          f"num_attention_heads = {heads}")
    return BertConfig(vocab_size=require(raw, "vocab_size", source), hidden_size=hidden,
                      intermediate_size=require(raw, "intermediate_size", source),
                      num_layers=require(raw, "num_hidden_layers", source), num_heads=heads,
                      max_positions=int(raw.get("max_position_embeddings", 512)),
                      type_vocab_size=int(raw.get("type_vocab_size", 2)),
                      layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)), act=act,
                      pad_token_id=raw.get("pad_token_id"))


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, dtype=jnp.float32):
        self.word_embeddings = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.position_embeddings = layers.Embed(cfg.max_positions, cfg.hidden_size, role="other", dtype=dtype)
        self.token_type_embeddings = layers.Embed(cfg.type_vocab_size, cfg.hidden_size, role="other", dtype=dtype)
        self.LayerNorm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, tokens, positions, token_types, dtype):
        x = (self.word_embeddings(tokens, dtype) + self.position_embeddings(positions, dtype)
             + self.token_type_embeddings(token_types, dtype))
        return self.LayerNorm(x)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, dtype=jnp.float32):
        d = cfg.hidden_size
        self.query = layers.Linear(d, d, bias=True, dtype=dtype)
        self.key = layers.Linear(d, d, bias=True, dtype=dtype)
        self.value = layers.Linear(d, d, bias=True, dtype=dtype)
        self.output = layers.Linear(d, d, bias=True, dtype=dtype)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x, valid):
        b, t, _ = x.shape
        q, k, v = (proj(x).reshape(b, t, self.num_heads, self.head_dim) for proj in (self.query, self.key, self.value))
        mask = jnp.broadcast_to(valid[:, None, :], (b, t, t))
        out = layers.dot_product_attention(q, *layers.kv_layout(k, v), mask, scale=self.head_dim ** -0.5)
        return self.output(out.reshape(b, t, -1))


class EncoderLayer(nnx.Module):
    """Post-norm block: ``h = LN(x + attn(x))``, ``LN(h + out(act(inter(h))))``."""

    def __init__(self, cfg: BertConfig, dtype=jnp.float32):
        self.attention = SelfAttention(cfg, dtype)
        self.attention_norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.intermediate = layers.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype)
        self.output = layers.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype)
        self.output_norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.act = cfg.act

    def __call__(self, x, valid):
        h = self.attention_norm(x + self.attention(x, valid))
        return self.output_norm(h + self.output(layers.ACTIVATIONS[self.act](self.intermediate(h))))


class SentenceEncoder(nnx.Module):
    """A BERT encoder: ``model(tokens, mask) -> last hidden states [B, T, D]`` (float32).

    ``tokens [B, T]`` as the tokenizer gives them ([CLS] ... [SEP], right-padded) and a boolean
    ``mask [B, T]`` (True on real tokens); token types default to 0 (one segment).
    """

    def __init__(self, cfg: BertConfig, dtype=jnp.float32):
        self.config = cfg
        self.embeddings = Embeddings(cfg, dtype)
        self.layers = nnx.List([EncoderLayer(cfg, dtype) for _ in range(cfg.num_layers)])
        self.dtype = dtype

    def embed(self, tokens, mask=None, positions=None, token_types=None):
        """``(x, side)``: the first block's input and ``{"valid"}`` (the block protocol of
        :class:`cqjax.models.transformer.OutputHead`)."""
        side = default_side(tokens, mask, positions)
        if token_types is None:
            token_types = jnp.zeros(tokens.shape, jnp.int32)
        return self.embeddings(tokens, side["positions"], token_types, self.dtype), {"valid": side["valid"]}

    def block(self, i, x, side, cache=None, layer=None):
        layer = self.layers[i] if layer is None else layer
        return layer(x, side["valid"]), side, cache

    def __call__(self, tokens, mask=None, token_types=None):
        x, side = self.embed(tokens, mask, token_types=token_types)
        for i in range(len(self.layers)):
            x, side, _ = self.block(i, x, side)
        return x.astype(jnp.float32)

    def sentence_embedding(self, tokens, mask):
        """L2-normalized mean of the real tokens' last hidden states, ``[B, D]``."""
        return mean_pool(self(tokens, mask), mask)


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """sentence-transformers' mean pooling then ``Normalize``: ``[B, T, D], [B, T] -> [B, D]``."""
    m = mask.astype(hidden.dtype)[..., None]
    pooled = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


_HF_NAMES = (
    (r"embeddings/(\w+)/embedding", r"embeddings.\1.weight"),
    (r"embeddings/LayerNorm/scale", "embeddings.LayerNorm.weight"),
    (r"embeddings/LayerNorm/bias", "embeddings.LayerNorm.bias"),
    (r"layers/(\d+)/attention/(query|key|value)/(kernel|bias)", r"encoder.layer.\1.attention.self.\2.\3"),
    (r"layers/(\d+)/attention/output/(kernel|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"layers/(\d+)/attention_norm/(scale|bias)", r"encoder.layer.\1.attention.output.LayerNorm.\2"),
    (r"layers/(\d+)/intermediate/(kernel|bias)", r"encoder.layer.\1.intermediate.dense.\2"),
    (r"layers/(\d+)/output/(kernel|bias)", r"encoder.layer.\1.output.dense.\2"),
    (r"layers/(\d+)/output_norm/(scale|bias)", r"encoder.layer.\1.output.LayerNorm.\2"),
)


def bert_hf_name(path: str, cfg: BertConfig) -> str:
    """``layers/0/attention/query/kernel`` → ``encoder.layer.0.attention.self.query.weight``."""
    for pattern, repl in _HF_NAMES:
        if re.fullmatch(pattern, path):
            return re.sub(r"\.(kernel|scale)$", ".weight", re.sub(pattern, repl, path))
    raise KeyError(f"no checkpoint name for BERT parameter {path}")


def bert_ignorable(name: str, cfg: BertConfig) -> bool:
    """The pooler and the position-id buffer are not used."""
    return name.startswith("pooler.") or name == "embeddings.position_ids"


registry.register(registry.Family(name="bert", model_types=("bert",), parse_config=parse_bert,
                                  build=SentenceEncoder, hf_name=bert_hf_name, ignorable=bert_ignorable,
                                  kind="encoder"))
