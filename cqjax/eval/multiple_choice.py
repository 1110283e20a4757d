"""Multiple-choice accuracy by continuation log-likelihood (ARC, PIQA, HellaSwag, ...).

Scoring protocol, per request ``(context, continuation)``:

==================  ==========================================================================
whitespace          trailing whitespace of the context moves to the front of the continuation
                    (the data already puts the space there: ``"...\\nAnswer:"`` + ``" choice"``)
tokens              ``[BOS] + encode(context) + encode(continuation)``, each part tokenized
                    separately with ``add_special_tokens=False``; BOS only if the tokenizer has
                    one
score               log P(continuation tokens | everything before them), summed
too long            context tokens dropped from the left (BOS kept) to fit the largest bucket;
                    counted in ``protocol["truncated"]``
shapes              each row is right-padded to the smallest bucket length ``T`` that holds it;
                    a bucket's batches all have ``max(1, tokens_per_batch // T)`` rows, so XLA
                    compiles once per bucket used; the output head runs only at the
                    ``C`` positions that predict continuation tokens (``C`` = the bucket's
                    longest continuation rounded up to 8)
acc                 ``argmax_i ll_i == label``
acc_per_char        ``argmax_i ll_i / len(continuation_i)``, length in characters of the
                    request's continuation string (leading space included)
stderr              ``sqrt(p (1 - p) / n)`` for each accuracy
==================  ==========================================================================

Documents are the first ``limit`` in file order. Contexts are not shared across choices: each
choice is its own row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cqjax.progress import Progress
from cqjax.eval.scoring import BoundForward, Forward, LogLikelihoodScorer, as_scorer
from cqjax.eval.texts import iter_requests
from cqjax.eval.windows import encode, tokenizer_info, tokens_digest

# Padded row lengths. With SmolLM2's tokenizer, 1,000 docs each of ARC-Easy, PIQA and HellaSwag
# are 388 k real tokens: these buckets pad them to 1.22x (64/128/256/512 would pad to 1.77x)
# for 8 compilations of ~2 s each on 2 cores.
DEFAULT_BUCKETS = (32, 48, 64, 96, 128, 192, 256, 512)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where a task's documents come from.

    Attributes:
      task: ``oe_eval_tasks`` directory.
      variant: variant directory.
      zero_shot_from_doc: build each request as ``(doc["query"], " " + choice)`` from the
        document instead of using the file's context (which may hold few-shot examples). For
        ``rc_0shot`` files both give the same requests.
      split: the dataset split, for the record.
    """

    task: str
    variant: str
    zero_shot_from_doc: bool
    split: str


# ARC's rc_0shot file holds only the 570 validation documents, so ARC uses the test split's
# documents (2,376 Easy / 1,172 Challenge) with zero-shot requests rebuilt from each document.
TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("arc_easy", "test_rc_5shot", True, "test"),
    "arc_challenge": TaskSpec("arc_challenge", "test_rc_5shot", True, "test"),
    "arc_easy_val": TaskSpec("arc_easy", "rc_0shot", False, "validation"),
    "piqa": TaskSpec("piqa", "rc_0shot", False, "validation"),
    "hellaswag": TaskSpec("hellaswag", "rc_0shot", False, "validation"),
}


@dataclasses.dataclass(frozen=True)
class MCDoc:
    """One multiple-choice document: shared context, one continuation per choice, gold index."""

    doc_id: int
    context: str
    continuations: tuple[str, ...]
    label: int


def load_docs(name: str, limit: int | None = 1000) -> list[MCDoc]:
    """The first ``limit`` documents of a task in :data:`TASKS`, or of ``"<task>/<variant>"``.

    Raises:
      ValueError: an unknown task name, or a file whose rows disagree on a document's label.
    """
    if name in TASKS:
        spec = TASKS[name]
    elif "/" in name:
        task, variant = name.split("/", 1)
        spec = TaskSpec(task, variant, False, "?")
    else:
        raise ValueError(f"unknown multiple-choice task {name!r}; expected one of {sorted(TASKS)} "
                         "or '<task>/<variant>'")
    rows_by_doc: dict[int, list[dict]] = {}
    for row in iter_requests(spec.task, spec.variant):
        did = int(row["doc_id"])
        if did not in rows_by_doc:
            if limit is not None and len(rows_by_doc) >= limit:
                break
            rows_by_doc[did] = []
        rows_by_doc[did].append(row)
    docs = []
    for did, rows in rows_by_doc.items():
        rows = sorted(rows, key=lambda r: int(r["idx"]))
        labels = {int(r["label"]) for r in rows}
        if len(labels) != 1:
            raise ValueError(f"{spec.task}/{spec.variant} doc {did}: rows disagree on label {labels}")
        if spec.zero_shot_from_doc:
            doc = rows[0]["doc"]
            docs.append(MCDoc(did, doc["query"], tuple(" " + c for c in doc["choices"]), int(doc["gold"])))
        else:
            contexts = {r["request"]["context"] for r in rows}
            if len(contexts) != 1:
                raise ValueError(f"{spec.task}/{spec.variant} doc {did}: choices have different contexts")
            docs.append(MCDoc(did, rows[0]["request"]["context"],
                              tuple(r["request"]["continuation"] for r in rows), labels.pop()))
    return docs


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Moves the context's trailing whitespace to the front of the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


@dataclasses.dataclass(frozen=True)
class PackedRequests:
    """Token rows for a list of requests, grouped by bucket length.

    Attributes:
      rows: per request, the token ids ``[BOS] + context + continuation`` after truncation.
      n_cont: per request, the number of scored (continuation) tokens at the end of its row.
      truncated: how many requests lost context tokens.
      bos: whether BOS starts every row.
    """

    rows: list[np.ndarray]
    n_cont: np.ndarray
    truncated: int
    bos: bool


def pack_requests(tokenizer, requests: Sequence[tuple[str, str]], *, max_len: int,
                  bos: bool | None = None) -> PackedRequests:
    """Tokenizes ``(context, continuation)`` requests (see the module docstring)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    bos = (bos_id is not None) if bos is None else bos
    if bos and bos_id is None:
        raise ValueError("bos=True but the tokenizer has no bos_token_id")
    head = [int(bos_id)] if bos else []
    ctx_cache: dict[str, list[int]] = {}
    rows, n_cont, truncated = [], [], 0
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = split_whitespace(context, continuation)
        if ctx not in ctx_cache:
            ctx_cache[ctx] = encode(tokenizer, ctx) if ctx else []
        ctx_ids, cont_ids = ctx_cache[ctx], encode(tokenizer, cont)
        if not cont_ids:
            raise ValueError(f"request {i}: continuation {continuation!r} has no tokens")
        room = max_len - len(head) - len(cont_ids)
        if room < len(ctx_ids):
            truncated += 1
            if room < 0 or (room == 0 and not head):
                raise ValueError(f"request {i}: continuation of {len(cont_ids)} tokens does not fit "
                                 f"in the largest bucket ({max_len} tokens)")
            ctx_ids = ctx_ids[len(ctx_ids) - room:] if room > 0 else []
        if not head and not ctx_ids:
            raise ValueError(f"request {i}: empty context and no BOS: the first continuation token "
                             "has nothing to condition on")
        rows.append(np.asarray(head + list(ctx_ids) + list(cont_ids), np.int32))
        n_cont.append(len(cont_ids))
    return PackedRequests(rows=rows, n_cont=np.asarray(n_cont, np.int64), truncated=truncated,
                          bos=bool(bos))


def scored_width(n_cont: np.ndarray, T: int) -> int:
    """Scored positions per row for one bucket: the longest continuation rounded up to 8."""
    return int(min(T - 1, max(8, -(-int(np.max(n_cont)) // 8) * 8)))


def score_packed(scorer: LogLikelihoodScorer, packed: PackedRequests, *,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, tokens_per_batch: int = 2048,
                 progress: Progress | None = None) -> np.ndarray:
    """Returns float64[N]: log P(continuation | context) of each packed request."""
    buckets = sorted(int(b) for b in buckets)
    lengths = np.asarray([len(r) for r in packed.rows], np.int64)
    if len(lengths) and lengths.max() > buckets[-1]:
        raise ValueError(f"a request of {lengths.max()} tokens exceeds the largest bucket {buckets[-1]}")
    which = np.searchsorted(np.asarray(buckets), lengths, side="left")
    out = np.zeros(len(packed.rows), np.float64)
    batches, chunks = [], []
    for b_idx, T in enumerate(buckets):
        idx = np.nonzero(which == b_idx)[0]
        if not len(idx):
            continue
        bs = max(1, tokens_per_batch // T)
        C = scored_width(packed.n_cont[idx], T)
        for start in range(0, len(idx), bs):
            chunk = idx[start:start + bs]
            tok = np.zeros((bs, T), np.int32)
            mask = np.zeros((bs, T), bool)
            mask[:, 0] = True  # dummy rows (see windows.pad_batch) score nothing
            pos = np.zeros((bs, C), np.int32)
            target = np.zeros((bs, C), np.int32)
            valid = np.zeros((bs, C), bool)
            for j, r in enumerate(chunk):
                L, n = lengths[r], packed.n_cont[r]
                tok[j, :L] = packed.rows[r]
                mask[j, :L] = True
                pos[j, :n] = np.arange(L - n - 1, L - 1)
                target[j, :n] = packed.rows[r][L - n:]
                valid[j, :n] = True
            batches.append((tok, mask, pos, target, valid))
            chunks.append(chunk)
    on_batch = None if progress is None else (lambda j: progress.update(len(chunks[j])))
    sums = scorer.score_at_batches(batches, on_batch=on_batch, progress=progress is not None and progress.enabled)
    for chunk, ll in zip(chunks, sums):
        out[chunk] = ll[:len(chunk)]
    return out


@dataclasses.dataclass(frozen=True)
class MCResult:
    """Accuracy of one model on one task.

    Attributes:
      acc, acc_per_char: accuracies (see the module docstring).
      stderr, stderr_per_char: their binomial standard errors.
      n: documents.
      loglikelihoods: per document, the log-likelihood of each choice.
      labels: per document, the gold index.
      protocol: JSON-serializable description.
      seconds: wall time of scoring (compiles included).
    """

    acc: float
    acc_per_char: float
    stderr: float
    stderr_per_char: float
    n: int
    loglikelihoods: list[list[float]]
    labels: list[int]
    protocol: dict[str, Any]
    seconds: float

    def to_dict(self, details: bool = False) -> dict[str, Any]:
        """``{"acc", "acc_per_char", "stderr", "stderr_per_char", "n", "seconds", "protocol"}``;
        ``details=True`` adds ``loglikelihoods`` and ``labels``."""
        d = {"acc": self.acc, "acc_per_char": self.acc_per_char, "stderr": self.stderr,
             "stderr_per_char": self.stderr_per_char, "n": self.n, "seconds": round(self.seconds, 3),
             "protocol": self.protocol}
        if details:
            d.update(loglikelihoods=self.loglikelihoods, labels=self.labels)
        return d


def binomial_stderr(p: float, n: int) -> float:
    """``sqrt(p (1 - p) / n)`` (0 for n = 0)."""
    return math.sqrt(p * (1.0 - p) / n) if n else 0.0


@dataclasses.dataclass(frozen=True)
class MCTaskData:
    """A task's documents tokenized, with the protocol that identifies them."""

    name: str
    docs: list[MCDoc]
    packed: PackedRequests
    protocol: dict[str, Any]


def prepare_task(tokenizer, name: str, *, limit: int | None = 1000,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, tokens_per_batch: int = 2048,
                 bos: bool | None = None) -> MCTaskData:
    """Loads and tokenizes a task; no model needed (so the protocol can key a cache)."""
    docs = load_docs(name, limit)
    requests = [(d.context, c) for d in docs for c in d.continuations]
    packed = pack_requests(tokenizer, requests, max_len=max(buckets), bos=bos)
    spec = TASKS.get(name)
    flat = np.concatenate([np.concatenate([[len(r), k], r]) for r, k in zip(packed.rows, packed.n_cont)]
                          ) if packed.rows else np.zeros(0)
    protocol = {
        "kind": "multiple_choice",
        "task": name,
        "source": f"{spec.task}/{spec.variant}" if spec else name,
        "split": spec.split if spec else "?",
        "requests": "zero-shot from doc" if spec and spec.zero_shot_from_doc else "file",
        "limit": limit,
        "docs": len(docs),
        "requests_n": len(requests),
        "bos": packed.bos,
        "buckets": [int(b) for b in sorted(buckets)],
        "tokens_per_batch": int(tokens_per_batch),
        "truncated": packed.truncated,
        "tokenizer": tokenizer_info(tokenizer),
        "labels_sha256": tokens_digest(np.asarray([d.label for d in docs], np.int64),
                                       np.asarray([len(d.continuations) for d in docs], np.int64)),
        "tokens_sha256": tokens_digest(np.asarray(flat, np.int64)),
    }
    return MCTaskData(name=name, docs=docs, packed=packed, protocol=protocol)


def evaluate_task(forward: Forward | BoundForward | LogLikelihoodScorer, data: MCTaskData, *,
                  progress: bool = True) -> MCResult:
    """Scores every choice of every document and returns the accuracies.

    Args:
      forward: the model forward, or a :class:`LogLikelihoodScorer` to reuse compilations.
      data: from :func:`prepare_task`.
      progress: progress line on stderr.
    """
    scorer = as_scorer(forward)
    prog = Progress(data.name, len(data.packed.rows), unit="req", enabled=progress)
    ll = score_packed(scorer, data.packed, buckets=data.protocol["buckets"],
                      tokens_per_batch=data.protocol["tokens_per_batch"], progress=prog)
    prog.close()
    per_doc, correct, correct_pc, pos = [], 0, 0, 0
    for d in data.docs:
        k = len(d.continuations)
        lls = ll[pos:pos + k]
        pos += k
        chars = np.asarray([max(len(c), 1) for c in d.continuations], np.float64)
        correct += int(np.argmax(lls) == d.label)
        correct_pc += int(np.argmax(lls / chars) == d.label)
        per_doc.append([float(x) for x in lls])
    n = len(data.docs)
    acc = correct / n if n else 0.0
    acc_pc = correct_pc / n if n else 0.0
    return MCResult(acc=acc, acc_per_char=acc_pc, stderr=binomial_stderr(acc, n),
                    stderr_per_char=binomial_stderr(acc_pc, n), n=n, loglikelihoods=per_doc,
                    labels=[d.label for d in data.docs], protocol=data.protocol, seconds=prog.elapsed)
