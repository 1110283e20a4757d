"""The plain C++ kernel tests, ASan/UBSan and NEON (qemu) builds, run from pytest on request.

They take about a minute each on 2 cores, so they are opt-in:
``CQJAX_KERNEL_CPP_TESTS=1 python -m pytest tests/test_kernel_cpp.py`` (or run
``xla_ext/scripts/test_kernels.sh all`` directly).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "xla_ext" / "scripts" / "test_kernels.sh"

pytestmark = pytest.mark.skipif(not os.environ.get("CQJAX_KERNEL_CPP_TESTS"),
                                reason="set CQJAX_KERNEL_CPP_TESTS=1 to build and run the C++ kernel tests")


@pytest.mark.parametrize("mode", ["asan", "neon"])
def test_cpp_kernel_tests(mode, tmp_path):
    if not SCRIPT.exists():
        pytest.skip("source tree not available")
    if mode == "neon" and not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")):
        pytest.skip("g++-aarch64-linux-gnu / qemu-user not installed")
    if not shutil.which("g++"):
        pytest.skip("g++ not installed")
    env = {**os.environ, "CQJAX_KERNEL_TEST_DIR": str(tmp_path)}
    res = subprocess.run(["bash", str(SCRIPT), mode], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " 0 failures" in res.stdout
