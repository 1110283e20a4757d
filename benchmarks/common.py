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
