"""After a ``-m`` sweep: summary.md (one row per job) and pareto.png in the sweep directory.

:class:`SweepSummary` is a Hydra callback (``conf/config.yaml``: ``hydra.callbacks``); Hydra
calls :meth:`SweepSummary.on_multirun_end` once every job has finished. It reads each job's
report.json (``<sweep dir>/<job subdir>/report.json``) and can be re-run by hand. A job that
failed left ``error.json`` instead (:func:`record_failure`; the other jobs ran on): summary.md
lists it with its error, and the sweep exits with status 1 once the summary is written.

>>> write_summary("multirun/2026-01-01/12-00-00")          # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cqjax.io.atomic import write_text


ERROR = "error.json"


def record_failure(job_dir: str | os.PathLike, overrides: list[str], error: BaseException) -> Path:
    """Writes ``error.json`` (the job's overrides and its error) into a failed job's directory."""
    from cqjax.io.atomic import write_json

    return write_json(Path(job_dir) / ERROR, {"overrides": overrides, "error": f"{type(error).__name__}: {error}"})


def failures(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """``[{"job", "overrides", "error"}]`` of the jobs under ``sweep_dir`` that failed."""
    out = []
    for path in sorted(Path(sweep_dir).glob(f"*/{ERROR}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        try:
            out.append({"job": path.parent.name, **json.loads(path.read_text())})
        except (OSError, json.JSONDecodeError) as e:
            out.append({"job": path.parent.name, "overrides": [], "error": f"(unreadable {path}: {e})"})
    return out


def collect(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The report.json of every job under ``sweep_dir``, in job order, with ``job`` set."""
    rows = []
    for path in sorted(Path(sweep_dir).glob("*/report.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"[cqjax] sweep summary: skipping {path}: {e}", file=sys.stderr)
            continue
        report["job"] = path.parent.name
        rows.append(report)
    # Name each job by the overrides that differ between jobs (what the sweep varied).
    sets = [set(r.get("overrides") or []) for r in rows]
    common = set.intersection(*sets) if sets else set()
    for r in rows:
        varied = [o for o in r.get("overrides") or [] if o not in common]
        if varied:
            r["job"] = f"{r['job']}: {' '.join(varied)}"
    return rows


def write_summary(sweep_dir: str | os.PathLike) -> list[Path]:
    """Writes summary.md and pareto.png into ``sweep_dir``; returns the files written."""
    from cqjax.report.markdown import summary_table
    from cqjax.report.plots import pareto

    sweep_dir = Path(sweep_dir)
    rows, failed = collect(sweep_dir), failures(sweep_dir)
    if not rows and not failed:
        return []
    text = summary_table(rows) if rows else "# cqjax sweep\n\nNo job finished.\n"
    if failed:
        text += "\n## Failed jobs\n\n| job | overrides | error |\n|---|---|---|\n" + "".join(
            f"| {f['job']} | {' '.join(f['overrides'])} | {_cell(f['error'])} |\n" for f in failed)
    out = [write_text(sweep_dir / "summary.md", text)]
    png = pareto(rows, sweep_dir / "pareto.png") if rows else None
    if png is not None:
        out.append(png)
    return out


class SweepSummary(Callback):
    """Hydra callback: summary.md and pareto.png after a multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        written = write_summary(sweep_dir)
        if written:
            print(f"[cqjax] sweep summary: {', '.join(str(p) for p in written)}", file=sys.stderr, flush=True)
        failed = failures(sweep_dir)
        if failed:
            print(f"[cqjax] {len(failed)} sweep job(s) failed: {', '.join(f['job'] for f in failed)} "
                  "(see summary.md)", file=sys.stderr, flush=True)
            sys.exit(1)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:300]
