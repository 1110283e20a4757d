"""What the benchmark scripts share: loading a float model and the calibration options.

Scripts run as ``python benchmarks/NAME.py``, so this module is importable as ``common``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def checkpoint(name: str) -> Path:
    """A packaged model (``cqjax.data.MODELS``) or a checkpoint directory / hub id."""
    from cqjax import data
    from cqjax.io import hf

    return data.model_dir(name) if name in data.MODELS else hf.resolve(name)


def load_float(name: str) -> tuple[Path, Any, Any, Any]:
    """``(directory, ir, float model, tokenizer)`` of :func:`checkpoint` ``name``."""
    from cqjax.api import load_tokenizer
    from cqjax.io import hf

    directory = checkpoint(name)
    ir = hf.import_checkpoint(directory)
    return directory, ir, hf.to_model(ir), load_tokenizer(directory)


def add_calibration_args(ap: argparse.ArgumentParser, rows: int = 16) -> None:
    """``--calib-source`` (self | squad | a text file), ``--calib-rows``, ``--calib-length``."""
    ap.add_argument("--calib-source", default="self")
    ap.add_argument("--calib-rows", type=int, default=rows)
    ap.add_argument("--calib-length", type=int, default=512)


#: Multiple-choice tasks the benchmarks report (``--limit`` documents each).
TASKS = ("arc_easy", "piqa", "hellaswag")

#: Recipe variants measured with the same allocation and fixed widths: the plain data-free recipe,
#: GPTQ-style error feedback in the rotated or unrotated basis, activation-aware scales, both.
VARIANTS = ("plain", "rotated", "unrotated", "awq", "awq+rotated")


def recipe(variant: str, embed_bits: int):
    """The recipe of one of :data:`VARIANTS` from the config group (:func:`cqjax.recipes.recipe`;
    linears' widths come from an allocation or overrides, 2 is the fallback), embeddings and the
    LM head at ``embed_bits``."""
    from cqjax import recipes

    if variant not in VARIANTS:
        raise ValueError(f"recipe variant {variant!r}; allowed: {VARIANTS}")
    name = "cq-ef" if variant in ("rotated", "unrotated", "awq+rotated") else "cq"
    steps = {"pack": {"basis": "unrotated"}} if variant == "unrotated" else {}
    if variant.startswith("awq"):
        steps["awq"] = {"_target_": "cqjax.passes.awq.ActivationScale"}
    return recipes.recipe(name, bits=2, embed_bits=embed_bits, steps=steps)


def machine() -> dict[str, Any]:
    """Where a benchmark ran: platform, processor, the cores this process may use, load."""
    import os
    import platform

    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": len(os.sched_getaffinity(0)), "loadavg_at_end": os.getloadavg()}


def write_result(path: str, result: dict) -> None:
    """``result`` as indented JSON at ``path``, atomically (temp file + rename)."""
    import json
    import os

    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
