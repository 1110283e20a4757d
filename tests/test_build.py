"""The built package: the C++ extension, its FFI targets, and the shipped Hydra app."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

import cqjax
from cqjax import _ffi

REPO = Path(__file__).resolve().parents[1]
FEATURES = {"avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avx512vbmi", "neon", "dotprod"}


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "cqjax", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_extension_is_compiled_and_installed():
    ext = Path(_ffi._xla_ext.__file__)
    assert ext.suffix in {".so", ".pyd"}
    assert ext.parent.name == "cqjax"
    assert "cqjax_scale" in _ffi.TARGETS


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 3, 4)])
def test_scale_matches_jnp(shape):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    got = _ffi.scale(x, -1.75)
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x * np.float32(-1.75)))


def test_scale_under_jit_and_vmap():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3, 5)), jnp.float32)
    ref = x * np.float32(0.5)
    f = jax.jit(lambda a: _ffi.scale(a, 0.5))
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), np.asarray(ref))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(jax.vmap(jax.vmap(lambda r: _ffi.scale(r, 0.5))))(x)), np.asarray(ref)
    )


def test_scale_rejects_non_f32():
    with pytest.raises(TypeError, match="float32"):
        _ffi.scale(jnp.ones(3, jnp.bfloat16), 2.0)


def test_cpu_features_are_bools_detected_at_run_time():
    feats = _ffi.cpu_features()
    assert set(feats) == FEATURES
    assert all(type(v) is bool for v in feats.values())
    machine = platform.machine().lower()
    if machine in {"x86_64", "amd64"}:
        assert not feats["neon"] and not feats["dotprod"]
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            line = next(l for l in cpuinfo.read_text().splitlines() if l.startswith("flags"))
            flags = set(line.split(":", 1)[1].split())
            names = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw",
                     "avx512vnni": "avx512_vnni", "avx512vbmi": "avx512vbmi"}
            assert {k: v in flags for k, v in names.items()} == {k: feats[k] for k in names}
    elif machine in {"aarch64", "arm64"}:
        assert feats["neon"] and not feats["avx2"]


def test_hydra_config_is_shipped():
    from cqjax.__main__ import config_dir

    conf = Path(config_dir())
    assert (conf / "config.yaml").is_file()
    pkg = Path(cqjax.__file__).resolve().parent
    if pkg.parent != REPO:  # a normal (non-editable) install: configs are package data
        assert conf == pkg / "conf"
        assert {p.name for p in (REPO / "conf").glob("*.yaml")} <= {p.name for p in conf.glob("*.yaml")}


def test_cli_cfg_job_from_another_directory(tmp_path):
    res = _run_cli("--cfg", "job", "+probe=7", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = OmegaConf.create(res.stdout)
    assert "mode" in cfg and cfg.probe == 7
    assert not (tmp_path / "outputs").exists()


def test_cli_help_from_another_directory(tmp_path):
    res = _run_cli("--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Hydra" in res.stdout
