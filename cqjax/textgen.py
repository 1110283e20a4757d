"""Text in, text out: chat templates, stop strings and streamed output over :func:`cqjax.runtime.generate`.

>>> chat_prompt(tok, "Hi!")                            # doctest: +SKIP  (the template's text)
>>> texts = complete(model, tok, ["a", "bc"], stop=["\\n"], max_new_tokens=16)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from cqjax import runtime


def chat_prompt(tokenizer: Any, user: str | None = None, *, system: str | None = None,
                history: Sequence[dict] = ()) -> str:
    """The text of a chat ready for the assistant's reply: ``history`` (``{"role", "content"}``
    turns), then ``user``, rendered by the tokenizer's chat template.

    Raises:
      ValueError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                         "chat_template.jinja): chat needs one; use plain prompts instead")
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    if user is not None:
        messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def eos_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """End-of-sequence ids: the tokenizer's and those the model's config lists (a chat model's
    end-of-turn token is often only in the latter)."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "config", None), "eos_token_id", None)):
        if value is not None:
            ids.update(int(v) for v in np.atleast_1d(value))
    return ids


class TextStream:
    """One row's generated ids turned into text as they come.

    :meth:`push` appends a token and emits (through ``emit``) the text that is now final: held
    back are an incomplete UTF-8 character and any tail that could still become a stop string.
    When a stop string appears, the text is cut before it and :attr:`stopped` is set; an
    end-of-sequence id (``eos``) sets it too and is not appended.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), emit: Callable[[str], None] | None = None,
                 eos: Collection[int] = ()):
        self.tokenizer, self.stop, self.emit, self.eos = tokenizer, tuple(stop), emit, frozenset(eos)
        self.ids: list[int] = []
        self.text, self.shown, self.stopped = "", 0, False

    def push(self, token: int) -> bool:
        """Adds ``token``; returns whether the text is finished (a stop string or EOS was produced)."""
        if self.stopped or int(token) in self.eos:
            self.stopped = True
            return True
        self.ids.append(int(token))
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            self._show(len(self.text))
            return True
        end = len(self.text) - (1 if self.text.endswith("\ufffd") else 0)
        for s in self.stop:  # hold back a tail that is the start of a stop string
            end = min(end, next((len(self.text) - k for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                                 if self.text.endswith(s[:k])), end))
        self._show(end)
        return False

    def close(self) -> str:
        """Emits what was held back; returns the whole text."""
        self._show(len(self.text))
        return self.text

    def _show(self, end: int) -> None:
        if self.emit is not None and end > self.shown:
            self.emit(self.text[self.shown:end])
        self.shown = max(self.shown, end)


def complete(model: Any, tokenizer: Any, prompts: str | Sequence[str], *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop: Sequence[str] = (), stream: Callable[[str], None] | None = None, stop_at_eos: bool = True,
             kv_bits: int | None = None, add_special_tokens: bool = True) -> str | list[str]:
    """Continues text ``prompts`` (one string, or a list decoded as one left-padded batch that
    gives every prompt the tokens it would get alone): each completion ends at the model's EOS
    (``stop_at_eos``), before the first of the ``stop`` strings, or after ``max_new_tokens``.

    Args:
      stream: called with each piece of the completion as soon as it is final (one prompt only).
      add_special_tokens: let the tokenizer add its BOS (False for a chat template's text,
        which has its own).
      Others: as in :func:`cqjax.runtime.generate`.

    Returns:
      The completion (special tokens skipped), or one per prompt.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if stream is not None and len(texts) != 1:
        raise ValueError("stream: only one prompt can be streamed at a time")
    ids = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    eos = eos_ids(tokenizer, model) if stop_at_eos else set()
    rows = [TextStream(tokenizer, stop, stream, eos) for _ in texts]

    def on_tokens(nxt: np.ndarray) -> bool:
        return all([row.push(int(token)) for row, token in zip(rows, nxt)])

    runtime.generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=seed, on_tokens=on_tokens, kv_bits=kv_bits)
    out = [r.close() for r in rows]
    return out[0] if single else out
