"""The perplexity protocol: how a tokenized text becomes fixed-shape scored windows.

The whole text is tokenized once with ``add_special_tokens=False``. With ``C = context``:

=================  ===========================================================================
window row         ``[BOS] + C-1 text tokens`` when the tokenizer has a BOS id, else ``C`` text
                   tokens; rows are right-padded to exactly ``C`` (``mask`` False on padding)
window ``k``       text tokens ``[k * stride, k * stride + C - bos)``
stride             new scored tokens per window, ``1 <= stride <= C - 1``; default ``C - 1``
scored tokens      each text token is scored exactly once, in the first window that holds it
                   with at least one token (or BOS) before it: window 0 scores all its tokens,
                   later windows their last ``stride``. Without BOS, text token 0 is never
                   scored (nothing predicts it).
default layout     with BOS and ``stride = C - 1``: non-overlapping windows of ``C - 1`` text
                   tokens, every one scored (the first one predicted from BOS alone); without
                   BOS: windows of ``C`` tokens overlapping by one token
``max_tokens``     stop after exactly ``min(max_tokens, scorable tokens)`` scored tokens; the
                   last window is cut after its last scored token
=================  ===========================================================================

The protocol dict records all of this plus ``tokens_sha256``, a hash of the window rows and
score masks, so two runs agree on the protocol iff they score the same tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from cqjax.eval.texts import TextSource, load_text


@dataclasses.dataclass(frozen=True)
class Windows:
    """Fixed-shape rows for scoring.

    Attributes:
      tokens: int32[N, C] token ids (0 on padding).
      mask: bool[N, C], True on real tokens.
      score: bool[N, C], True on tokens whose log-probability counts (never column 0).
      protocol: JSON-serializable description (see the module docstring).
    """

    tokens: np.ndarray
    mask: np.ndarray
    score: np.ndarray
    protocol: dict[str, Any]

    @property
    def num_scored(self) -> int:
        return int(self.score.sum())


def tokens_digest(*arrays: np.ndarray) -> str:
    """sha256 over the little-endian bytes and shapes of the given arrays."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.astype(a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def protocol_hash(protocol: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serializable protocol dict (sorted keys)."""
    blob = json.dumps(protocol, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_windows(ids: np.ndarray, *, context: int, stride: int | None = None,
                 max_tokens: int | None = 65_536, bos_id: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cuts a token sequence into scored windows (see the module docstring).

    Args:
      ids: int[L] token ids of the whole text.
      context: window length ``C`` in tokens, BOS included.
      stride: scored tokens per window after the first; default ``C - 1``.
      max_tokens: number of tokens to score; None scores the whole text.
      bos_id: BOS id prepended to every window, or None.

    Returns:
      ``(tokens int32[N, C], mask bool[N, C], score bool[N, C])``.

    Example:
      >>> t, m, s = plan_windows(np.arange(10, 17), context=4, bos_id=1, max_tokens=None)
      >>> t.tolist()
      [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 0, 0]]
      >>> s.sum(axis=1).tolist()
      [3, 3, 1]
    """
    ids = np.asarray(ids).astype(np.int64).reshape(-1)
    bos = bos_id is not None
    if context < 2:
        raise ValueError(f"perplexity context must be >= 2 tokens, got {context}")
    stride = context - 1 if stride is None else int(stride)
    if not 1 <= stride <= context - 1:
        raise ValueError(f"perplexity stride must be in [1, context-1] = [1, {context - 1}], got {stride}")
    n_text = context - int(bos)
    first = 0 if bos else 1  # first scorable text position
    target = max(len(ids) - first, 0)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        target = min(target, int(max_tokens))
    rows_t, rows_s = [], []
    scored, prev_end, k = 0, first, 0
    while scored < target:
        begin = k * stride
        s0 = max(prev_end, begin + first)
        s1 = min(begin + n_text, len(ids), s0 + (target - scored))
        if s1 <= s0:
            raise AssertionError(f"window {k} scores nothing (begin={begin}, s0={s0}, s1={s1})")
        row = np.zeros(context, np.int64)
        sc = np.zeros(context, bool)
        body = ids[begin:s1]
        if bos:
            row[0] = bos_id
        row[int(bos):int(bos) + len(body)] = body
        sc[s0 - begin + int(bos):s1 - begin + int(bos)] = True
        rows_t.append(row)
        rows_s.append((sc, int(bos) + len(body)))
        scored += s1 - s0
        prev_end = s1
        k += 1
    n = len(rows_t)
    tokens = np.zeros((n, context), np.int32)
    mask = np.zeros((n, context), bool)
    score = np.zeros((n, context), bool)
    for i, (row, (sc, length)) in enumerate(zip(rows_t, rows_s)):
        tokens[i] = row
        mask[i, :length] = True
        score[i] = sc
    assert not score[:, 0].any() and int(score.sum()) == target
    return tokens, mask, score


def tokenizer_info(tokenizer) -> dict[str, Any]:
    """Name, vocabulary size and BOS id of a Hugging Face tokenizer."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    return {"name": name.rstrip("/").split("/")[-1], "vocab_size": int(len(tokenizer)),
            "bos_token_id": getattr(tokenizer, "bos_token_id", None)}


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prepare_windows(tokenizer, text: TextSource | None = None, *, source: str = "wikipedia",
                    path: str | None = None, context: int = 512, stride: int | None = None,
                    max_tokens: int | None = 65_536, bos: bool | None = None) -> Windows:
    """Tokenizes a text and plans its perplexity windows.

    Args:
      tokenizer: a Hugging Face tokenizer.
      text: a loaded text; default ``load_text(source, path=path)``.
      source: built-in text source name (see :func:`cqjax.eval.texts.load_text`).
      path: a text file to use instead of ``source``.
      context: window length in tokens, BOS included (default 512).
      stride: scored tokens per window; default ``context - 1`` (non-overlapping with BOS).
      max_tokens: scored tokens (default 65,536); None for the whole text.
      bos: prepend BOS; default True iff the tokenizer has ``bos_token_id``.

    Returns:
      The :class:`Windows` with its protocol.
    """
    text = text if text is not None else load_text(source, path=path)
    tok_info = tokenizer_info(tokenizer)
    if bos is None:
        bos = tok_info["bos_token_id"] is not None
    if bos and tok_info["bos_token_id"] is None:
        raise ValueError(f"bos=True but tokenizer {tok_info['name']!r} has no bos_token_id")
    ids = np.asarray(encode(tokenizer, text.text), np.int64)
    tokens, mask, score = plan_windows(ids, context=context, stride=stride, max_tokens=max_tokens,
                                       bos_id=tok_info["bos_token_id"] if bos else None)
    protocol = {
        "kind": "perplexity",
        "text": text.describe(),
        "tokenizer": tok_info,
        "text_tokens": int(len(ids)),
        "context": int(context),
        "stride": int(context - 1 if stride is None else stride),
        "bos": bool(bos),
        "max_tokens": None if max_tokens is None else int(max_tokens),
        "windows": int(tokens.shape[0]),
        "scored_tokens": int(score.sum()),
        "tokens_sha256": tokens_digest(tokens, mask, score),
    }
    return Windows(tokens=tokens, mask=mask, score=score, protocol=protocol)


def iter_batches(n_rows: int, batch_size: int):
    """Yields ``(start, stop)`` row ranges of at most ``batch_size`` rows."""
    for start in range(0, n_rows, batch_size):
        yield start, min(start + batch_size, n_rows)


def pad_batch(tokens: np.ndarray, mask: np.ndarray, score: np.ndarray, batch_size: int):
    """Pads rows up to ``batch_size`` with dummy rows that score nothing.

    Dummy rows hold token 0 with ``mask[:, 0] = True`` (a fully masked row could make a
    model's attention produce NaN; those values are never summed anyway).
    """
    n = tokens.shape[0]
    if n == batch_size:
        return tokens, mask, score
    extra = batch_size - n
    t = np.concatenate([tokens, np.zeros((extra, tokens.shape[1]), tokens.dtype)])
    dummy_mask = np.zeros((extra, tokens.shape[1]), bool)
    dummy_mask[:, 0] = True
    m = np.concatenate([mask, dummy_mask])
    s = np.concatenate([score, np.zeros((extra, tokens.shape[1]), bool)])
    return t, m, s
