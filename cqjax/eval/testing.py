"""Tiny deterministic stand-ins for tests: fake forwards with exact NumPy references, a tokenizer.

==========================  ==================================================================
:func:`bigram_forward`      logits[t] = table[tokens[t]]; NaN at padded positions, so any
                            leak of padding into a sum shows up
:func:`prefix_forward`      logits[t] = table[tokens[t]] + mean(emb[tokens[:t+1]]) @ out:
                            causal and position dependent, to catch misaligned windows
:func:`log_softmax_np`      float64 NumPy log-softmax for hand-computed expectations
:func:`tiny_tokenizer`      a byte-level BPE (vocab ~300) trained on a few sentences, with
                            ``<s>`` as BOS, wrapped in ``PreTrainedTokenizerFast``
==========================  ==================================================================
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: Which technology was developed most recently?\nAnswer: cellular telephone",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Goal: How do I ready a guinea pig cage?\nAnswer: Provide bedding made of paper strips.",
    "Ethanol fuel -- All biomass goes through at least some of these steps.",
    "Older than The Game by 23 years, the Harvard-Yale Regatta was the original rivalry.",
)


def bigram_table(vocab: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    """A fixed random float32[V, V] logit table."""
    return (np.random.default_rng(seed).standard_normal((vocab, vocab)) * scale).astype(np.float32)


def bigram_forward(table: np.ndarray):
    """``forward(tokens, mask) -> table[tokens]`` with NaN logits where ``mask`` is False."""
    t = jnp.asarray(table)

    def forward(tokens, mask):
        return jnp.where(mask[..., None], t[tokens], jnp.nan)

    return forward


def prefix_forward(table: np.ndarray, emb: np.ndarray, out: np.ndarray):
    """``logits[t] = table[x_t] + (sum_{s<=t, mask} emb[x_s] / (t + 1)) @ out``; NaN on padding."""
    t_, e_, o_ = jnp.asarray(table), jnp.asarray(emb), jnp.asarray(out)

    def forward(tokens, mask):
        h = jnp.where(mask[..., None], e_[tokens], 0.0)
        h = jnp.cumsum(h, axis=1) / jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.float32)[None, :, None]
        return jnp.where(mask[..., None], t_[tokens] + h @ o_, jnp.nan)

    return forward


def prefix_logits_np(table: np.ndarray, emb: np.ndarray, out: np.ndarray, row: np.ndarray) -> np.ndarray:
    """float64[L, V] logits of :func:`prefix_forward` for one unpadded row."""
    h = np.cumsum(emb[row].astype(np.float64), axis=0) / np.arange(1, len(row) + 1)[:, None]
    return table[row].astype(np.float64) + h @ out.astype(np.float64)


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def tiny_tokenizer(vocab_size: int = 300, bos: bool = True):
    """A byte-level BPE tokenizer trained on :data:`SENTENCES` (deterministic, no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(SENTENCES) * 4, trainer=trainer)
    kwargs = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   name_or_path="tiny-bpe", **kwargs)
