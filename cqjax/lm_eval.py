"""The lm-evaluation-harness model ``cqjax``: a cqjax artifact or a float checkpoint under lm-eval.

lm-eval 0.4.13 reads no plugin entry point for models, so this module registers the model in
lm-eval's registry (:func:`register`) and ``python -m cqjax.lm_eval`` runs lm-eval's own CLI
with it registered::

    python -m cqjax.lm_eval run --model cqjax --model_args artifact=out/smollm2-cq3 \\
        --tasks arc_easy,piqa --batch_size auto

From Python: ``register()`` and then ``lm_eval.simple_evaluate(model="cqjax", model_args=...)``,
or pass an instance, ``simple_evaluate(model=CQJaxLM(artifact=...), ...)``. Importing this
module does not import lm-eval; :class:`CQJaxLM` and :func:`register` do.

Model arguments (``--model_args key=value,...``):

====================  =====================================================================
``artifact=DIR``      a quantized artifact (:func:`cqjax.api.load`), with its tokenizer
``model=DIR``         or a float Hugging Face checkpoint (:func:`cqjax.io.hf.load`)
``tokenizer=DIR``     tokenizer files from elsewhere (default: the artifact's / checkpoint's)
``packed``            artifacts only: run the packed runtime instead of the weights decoded
                      once to float32 (default False, like ``cqjax eval``: the same function
                      up to float rounding, several times faster on CPU)
``add_bos_token``     prepend BOS to every row (default: iff the tokenizer has a BOS token,
                      cqjax's own protocol)
``max_length``        the longest input row in tokens (default 2048); contexts are cut
                      from the left to fit, as lm-eval's ``hf`` model does
``max_gen_toks``      default generation budget (256) when a task gives none
``tokens_per_batch``  rows per batch ``max(1, tokens_per_batch // T)`` when ``batch_size`` is
                      ``auto`` or not given (default 2048)
``batch_size``        rows per batch (an integer), or ``auto``; ``max_batch_size`` caps it
``dtype``             weight dtype of the model (default ``float32``)
``seed``              sampling seed of ``generate_until`` when a task asks for sampling
====================  =====================================================================

Conventions, those of lm-eval's :class:`~lm_eval.api.model.TemplateLM` (which this model
subclasses) and its ``hf`` model:

================  ========================================================================
whitespace        trailing whitespace of a context moves to the front of its continuation
tokens            ``encode(context + continuation)`` split after ``len(encode(context))``
                  tokens; an empty context is the prefix token (BOS, else EOS) alone
score             ``(sum log P(continuation tokens), every one of them the argmax)``
shapes            rows right-padded to the smallest of a few bucket lengths ``T``; batches of
                  ``batch_size`` rows (a bucket's last one: the next power of two), so XLA
                  compiles about once per bucket; the output head runs only at the positions
                  that predict continuation tokens
rolling           lm-eval's disjoint rolling windows of ``max_length`` over the text's
                  tokens (no BOS of its own), conditioned on the prefix token
generation        greedy (sampling when a task sets a temperature > 0 and not ``do_sample=False``),
                  one request at a time through :class:`cqjax.runtime.Decoder`; stops at
                  EOS, at ``max_gen_toks``, or as soon as the decoded text holds an ``until``
                  string, and the text is cut before the first one
================  ========================================================================

With the default BOS rule these are the requests :mod:`cqjax.eval.multiple_choice` scores,
whenever ``encode(context + continuation)`` equals ``encode(context) + encode(continuation)``
(cqjax tokenizes the two parts apart); lm-eval's ``acc`` / ``acc_norm`` are cqjax's
``acc`` / ``acc_per_char`` when a task's choices carry their leading space and
``target_delimiter`` is empty.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

NAME = "cqjax"

#: Padded input lengths: cqjax's multiple-choice buckets, then 1.5x / 2x steps to ``max_length``.
BASE_BUCKETS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)

log = logging.getLogger(__name__)


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError("cqjax.lm_eval needs lm-eval: `pip install lm-eval==0.4.13` "
                          "(it is in cqjax's `test` extra)") from e


def buckets_for(max_length: int) -> tuple[int, ...]:
    """The padded row lengths up to ``max_length`` (which is always the last).

    >>> buckets_for(100)
    (32, 48, 64, 96, 100)
    >>> buckets_for(4096)[-3:]
    (2048, 3072, 4096)
    """
    seq = list(BASE_BUCKETS)
    while seq[-1] < max_length:
        seq.append(seq[-2] * 2)
    return tuple(b for b in seq if b < max_length) + (int(max_length),)


def _round_up_pow2(n: int, floor: int = 8) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _pieces(n: int) -> list[int]:
    """``n`` as descending powers of two (prefill chunks: few distinct shapes to compile)."""
    return [1 << k for k in range(n.bit_length() - 1, -1, -1) if n >> k & 1]


@functools.lru_cache(maxsize=8)
def _score_step(fn, hidden_fn, head_fn):
    """Jitted ``step(params, tokens, mask, positions, targets, valid) -> (ll [B], greedy [B])``:
    the summed ``log P(targets)`` from the logits at ``positions`` and whether every target is
    the argmax there (the head runs at ``positions`` only when the forward is split at it)."""
    import jax
    import jax.numpy as jnp

    def logits_at(params, tokens, mask, positions):
        if hidden_fn is not None:
            h = jnp.take_along_axis(hidden_fn(params, tokens, mask), positions[..., None], axis=1)
            return head_fn(params, h)
        return jnp.take_along_axis(fn(params, tokens, mask), positions[..., None], axis=1)

    def step(params, tokens, mask, positions, targets, valid):
        lg = logits_at(params, tokens, mask, positions).astype(jnp.float32)
        picked = jnp.take_along_axis(lg, targets[..., None], axis=-1)[..., 0]
        ll = jnp.sum(jnp.where(valid, picked - jax.nn.logsumexp(lg, axis=-1), 0.0), axis=1)
        greedy = jnp.all(jnp.where(valid, jnp.argmax(lg, axis=-1) == targets, True), axis=1)
        return ll, greedy

    return jax.jit(step)


def _load(artifact: str | None, model: str | None, tokenizer: str | None, packed: bool, dtype: str):
    """``(nnx model, tokenizer, description)`` from the model arguments."""
    import jax.numpy as jnp

    from cqjax import api, runtime
    from cqjax.io import hf

    if (artifact is None) == (model is None):
        raise ValueError("cqjax lm-eval model: give exactly one of artifact=DIR (a cqjax artifact) or "
                         f"model=DIR (a Hugging Face checkpoint); got artifact={artifact!r}, model={model!r}")
    dt = jnp.dtype(dtype)
    if artifact is not None:
        q = api.load(artifact, dtype=dt)
        net = q.model if packed else runtime.dequantized_model(q.ir)
        tok_dir, source = q.tokenizer_path, f"artifact={artifact}"
    else:
        net, _ = hf.load(model, dtype=dt)
        tok_dir, source = Path(model), f"model={model}"
    tok_dir = tokenizer if tokenizer is not None else tok_dir
    if tok_dir is None:
        raise ValueError(f"cqjax lm-eval model: {source} has no tokenizer files; pass tokenizer=DIR")
    if not (hasattr(net, "hidden_states") and hasattr(net, "logits")):
        raise ValueError(f"cqjax lm-eval model: {source} is a {type(net).__name__}, not a causal language model")
    return net, api.load_tokenizer(tok_dir), source


class _CQJaxLMImpl:
    """The model's behaviour; :func:`_lm_class` mixes it into lm-eval's ``TemplateLM``."""

    backend = "causal"

    def __init__(self, artifact: str | None = None, model: str | None = None, tokenizer: str | None = None, *,
                 packed: bool = False, add_bos_token: bool | None = None, max_length: int = 2048,
                 max_gen_toks: int = 256, tokens_per_batch: int = 2048, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, dtype: str = "float32", seed: int = 0,
                 device: str | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise TypeError(f"cqjax lm-eval model: unknown model_args {sorted(unknown)}; see `help(cqjax.lm_eval)`")
        del device  # lm-eval's torch device: JAX places the model on its default backend
        from cqjax import runtime
        from cqjax.eval.scoring import from_nnx

        self.model, self.tokenizer, self.source = _load(artifact, model, tokenizer, bool(packed), dtype)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        self.add_bos_token = (bos is not None) if add_bos_token is None else bool(add_bos_token)
        if self.add_bos_token and bos is None:
            raise ValueError(f"cqjax lm-eval model: add_bos_token=True but the tokenizer of {self.source} has no BOS")
        self._max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        self.tokens_per_batch, self.seed = int(tokens_per_batch), int(seed)
        self.batch_size = None if batch_size in (None, "") or str(batch_size).startswith("auto") else int(batch_size)
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        self.buckets = buckets_for(self._max_length)
        self._bound = from_nnx(runtime.prepare(self.model))
        self._step = _score_step(self._bound.fn, self._bound.hidden_fn, self._bound.head_fn)

    # -- tokenization (lm-eval's TemplateLM contract) ----------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "cqjax")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``; BOS first when the model uses one (:attr:`add_bos_token`),
        unless ``add_special_tokens=False`` or (``None``) the string already starts with it."""
        ids = list(self.tokenizer(string, add_special_tokens=False)["input_ids"])
        if add_special_tokens is False or not self.add_bos_token:
            return ids
        bos_text = self.tokenizer.bos_token
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            return ids
        return [int(self.tokenizer.bos_token_id)] + ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # -- scoring -------------------------------------------------------------------------------
    def _rows_per_batch(self, T: int) -> int:
        bs = self.batch_size if self.batch_size is not None else max(1, self.tokens_per_batch // T)
        return min(bs, self.max_batch_size) if self.max_batch_size else bs

    def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                     progress: bool = False) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), greedy)`` of each ``(context ids, continuation ids)``.

        The row ``context + continuation`` keeps its last ``max_length + 1`` tokens; the model
        reads all but the last.

        Raises:
          ValueError: an empty continuation, or one longer than ``max_length``.
        """
        import jax.numpy as jnp

        from cqjax.progress import Progress

        rows, n_cont = [], []
        for i, (ctx, cont) in enumerate(pairs):
            if not len(cont):
                raise ValueError(f"cqjax lm-eval model: request {i} has an empty continuation")
            if len(cont) > self._max_length:
                raise ValueError(f"cqjax lm-eval model: request {i}'s continuation has {len(cont)} tokens, "
                                 f"more than max_length={self._max_length}")
            full = (list(ctx) + list(cont))[-(self._max_length + 1):]
            if len(full) < 2:
                raise ValueError(f"cqjax lm-eval model: request {i} has no context token to condition on")
            rows.append(np.asarray(full, np.int32))
            n_cont.append(len(cont))
        lengths = np.asarray([len(r) - 1 for r in rows], np.int64)
        which = np.searchsorted(np.asarray(self.buckets), lengths, side="left")
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        prog = Progress(f"{NAME} loglikelihood", len(rows), unit="req", enabled=progress, tag="cqjax.lm_eval")
        for b_idx, T in enumerate(self.buckets):
            idx = np.nonzero(which == b_idx)[0]
            if not len(idx):
                continue
            bs = self._rows_per_batch(T)
            C = min(T, _round_up_pow2(max(n_cont[r] for r in idx)))
            for start in range(0, len(idx), bs):
                chunk = idx[start:start + bs]
                B = min(bs, _round_up_pow2(len(chunk), floor=1))  # a short last batch: fewer dummy rows
                tok = np.zeros((B, T), np.int32)
                mask = np.zeros((B, T), bool)
                mask[:, 0] = True  # dummy rows attend to one token and score nothing
                pos = np.zeros((B, C), np.int32)
                target = np.zeros((B, C), np.int32)
                valid = np.zeros((B, C), bool)
                for j, r in enumerate(chunk):
                    L, n = lengths[r], n_cont[r]
                    tok[j, :L] = rows[r][:-1]
                    mask[j, :L] = True
                    pos[j, :n] = np.arange(L - n, L)
                    target[j, :n] = rows[r][-n:]
                    valid[j, :n] = True
                ll, greedy = self._step(self._bound.params, jnp.asarray(tok), jnp.asarray(mask), jnp.asarray(pos),
                                        jnp.asarray(target), jnp.asarray(valid))
                ll, greedy = np.asarray(ll, np.float64), np.asarray(greedy)
                for j, r in enumerate(chunk):
                    out[r] = (float(ll[j]), bool(greedy[j]))
                prog.update(len(chunk))
        prog.close()
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.score_tokens([(ctx, cont) for _, ctx, cont in requests], progress=not disable_tqdm)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Per text, the summed log-likelihood of all its tokens over lm-eval's disjoint windows."""
        from lm_eval import utils

        pairs, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            windows = utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length, context_len=1)
            for ctx, cont in map(utils.make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owner.append(i)
        scores = self.score_tokens(pairs, progress=not disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from cqjax.progress import Progress

        out = []
        prog = Progress(f"{NAME} generate_until", len(requests), unit="req", enabled=not disable_tqdm,
                        tag="cqjax.lm_eval")
        for req in requests:
            context, gen_kwargs = req.args
            text = self.generate_text(context, gen_kwargs)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
            prog.update(1)
        prog.close()
        return out

    def generate_text(self, context: str, gen_kwargs: dict | None = None) -> str:
        """The continuation of ``context`` under lm-eval's ``gen_kwargs`` (``until``,
        ``max_gen_toks``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``); see the module docstring."""
        from cqjax import runtime
        from cqjax.textgen import TextStream

        kwargs = copy.deepcopy(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(u, str) for u in until):
            raise TypeError(f"cqjax lm-eval model: gen_kwargs['until'] must be a string or a list of strings, "
                            f"got {gen_kwargs.get('until')!r}")
        eos = self.eot_token_id
        if eos is not None:  # as lm-eval's hf model: the EOS text stops too
            until.append(self.tok_decode([eos], skip_special_tokens=False))
        until = [u for u in until if u]
        max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = kwargs.pop("do_sample", None)
        if not (temperature > 0 if do_sample is None else do_sample):  # as lm-eval's hf model
            temperature = 0.0
        top_k = kwargs.pop("top_k", None)
        top_k = int(top_k) if top_k and temperature > 0 else None
        top_p = kwargs.pop("top_p", None)
        top_p = float(top_p) if top_p is not None and temperature > 0 else None
        if kwargs:
            log.warning("cqjax lm-eval model: generation kwargs %s ignored", sorted(kwargs))
        ids = self.tok_encode(context) or [self.prefix_token_id]
        ids = ids[-max(1, self._max_length - max_gen):]
        size = -(-(len(ids) + max_gen) // 256) * 256  # cache sizes in steps of 256: few compilations
        dec = runtime.Decoder(self.model, batch=1, max_len=size, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=self.seed)
        start = 0
        for n in _pieces(len(ids)):
            nxt = dec.prefill(np.asarray(ids[start:start + n], np.int32)[None])
            start += n
        stream = TextStream(self.tokenizer, until, eos=() if eos is None else (eos,))
        while max_gen > 0 and not stream.push(int(nxt[0])) and len(stream.ids) < max_gen:
            nxt = dec.step(nxt)
        return stream.close()


@functools.cache
def _lm_class() -> type:
    """The ``lm_eval.api.model.TemplateLM`` subclass (built on first use: lm-eval is optional)."""
    _require_lm_eval()
    from lm_eval.api.model import TemplateLM

    class CQJaxLM(_CQJaxLMImpl, TemplateLM):
        """lm-eval model ``cqjax`` (see :mod:`cqjax.lm_eval`).

        Example:
          >>> lm = CQJaxLM(artifact="out/smollm2-cq3")        # doctest: +SKIP
          >>> lm.score_tokens([([1, 520], [33, 90])])          # doctest: +SKIP
          [(-9.31..., False)]
        """

    CQJaxLM.__module__ = __name__
    CQJaxLM.__qualname__ = "CQJaxLM"
    return CQJaxLM


def register() -> type:
    """Registers :class:`CQJaxLM` in lm-eval's model registry as ``cqjax`` (idempotent); returns it."""
    cls = _lm_class()
    import lm_eval.models  # noqa: F401  # the built-in models first: lm-eval adds them only to an empty registry
    from lm_eval.api.registry import model_registry

    model_registry.register(NAME)(cls)
    return cls


def __getattr__(name: str):
    if name == "CQJaxLM":
        return _lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's CLI with the ``cqjax`` model registered: ``python -m cqjax.lm_eval run --model cqjax ...``."""
    register()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    from cqjax.lm_eval import main as _main  # the importable module's class, not a copy in __main__

    _main()
