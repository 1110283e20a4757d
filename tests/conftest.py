"""Tests import the INSTALLED cqjax (with its compiled extension), never the bare source tree.

`python -m pytest` puts the current directory (the repo root) first on sys.path, which
would shadow a normal install with the sources, which lack `cqjax/_xla_ext*.so`. Dropping
the repo root here makes `pytest` and `python -m pytest` behave the same; an editable
install (`pip install --no-build-isolation -e .`) still serves the live sources.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
