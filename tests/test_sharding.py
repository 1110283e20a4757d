"""Sharded conversion and inference on 8 simulated CPU devices equal the single-device run.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX starts, so each
check runs this file as a child process (``python test_sharding.py CHECK DIR``) and reads back
what it found. Markers ``sharding`` and ``slow`` (``python -m pytest -m sharding tests``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import TINY_EVAL, checkpoint, cqjax  # noqa: F401  (checkpoint: a fixture)

pytestmark = [pytest.mark.sharding, pytest.mark.slow]
DEVICES = 8


def child(check: str, tmp_path: Path, devices: int = DEVICES) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, check, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_conversion_and_inference_equal_one_device(tmp_path):
    got = child("convert_and_infer", tmp_path)
    assert got["devices"] == DEVICES
    assert got["artifact_identical"] and got["loaded_placement_equal"]
    # every kernel with a multiple of 8 output features is split; the 37-row vocab is not
    split = got["placement"]
    assert split and all(spec in ("P('model',)", "P(None, 'model')") for spec in split.values())
    assert not any("embed" in p for p in split) and any("mlp" in p for p in split)
    assert got["float_logits_max_abs_diff"] <= 1e-4 * got["float_logits_scale"]
    assert got["quant_logits_max_abs_diff"] <= 1e-4 * got["quant_logits_scale"]
    assert got["logits_sharding"] == "P('data',)"


def test_cli_on_a_mesh_gives_the_single_device_artifact_and_metrics(checkpoint, tmp_path):
    """``mesh.shape=[2,4]``: the same artifact bytes, and perplexity, KL and top-1 of the float and
    quantized models within float-reduction noise of the one-device run."""
    path, text = checkpoint
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu"}
    reports = {}
    for name, extra in [("one", []), ("mesh", ["mesh.shape=[2,4]"])]:
        run_dir = tmp_path / name
        proc = cqjax(["+model=hf", f"model.path={path}", "pipeline=cq", "quant.bits=3", f"eval.perplexity.path={text}",
                      *TINY_EVAL, "eval.tasks=[]", "report.plots=false", f"hydra.run.dir={run_dir}", *extra],
                     tmp_path, tmp_path / f"cache-{name}", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[name] = json.loads((run_dir / "report.json").read_text())
    assert "mesh: 8 devices (data 2 x model 4)" in proc.stderr
    for f in ("weights.safetensors", "manifest.json"):
        assert (tmp_path / "one" / "artifact" / f).read_bytes() == (tmp_path / "mesh" / "artifact" / f).read_bytes()
    one, mesh = reports["one"]["evals"]["perplexity"], reports["mesh"]["evals"]["perplexity"]
    for key in ("baseline", "quantized"):
        assert mesh[key] == pytest.approx(one[key], rel=1e-4)
    assert mesh["kl"] == pytest.approx(one["kl"], rel=1e-2, abs=1e-6) and mesh["top1"] == one["top1"]


def test_two_processes_through_jax_distributed_equal_one_device(tmp_path):
    """Two processes with 4 simulated devices each form one 8-device mesh
    (``jax.distributed.initialize``): the conversion saved from it and its logits equal the
    single-device ones."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _checkpoint(tmp_path)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, __file__, "distributed", str(tmp_path), str(i), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [g["process"] for g in got] == [0, 1] and all(g["global_devices"] == 8 for g in got)
    assert all(g["local_devices"] == 4 for g in got)
    assert got[0]["placement"] and got[0]["placement"] == got[1]["placement"]
    one = child("one_device", tmp_path, devices=1)
    for g in got:
        diff = max(abs(a - b) for a, b in zip(g["logits"], one["logits"]))
        assert diff <= 1e-4 * max(map(abs, one["logits"])), diff
    assert _files(tmp_path / "distributed") == _files(tmp_path / "one")


def test_mesh_errors_name_the_config_keys(tmp_path):
    got = child("errors", tmp_path, devices=2)
    assert "mesh.shape=[4]" in got["too_many"] and "needs 4 devices" in got["too_many"]
    assert "mesh.axes" in got["mismatch"]


# ----------------------------------------------------------------------------- child side


def _checkpoint(tmp: Path) -> Path:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from test_import_errors import write
    from test_quant_passes import tensors
    from test_recipes import CFG

    weights = {k: v.astype(np.float32) for k, v in tensors(CFG, seed=3, scale=0.05).items()}
    return write(tmp / "ckpt", config=CFG, weights=weights, sharded=True)


def _files(d: Path) -> dict:
    from cqjax.io import artifact

    return {n: (d / n).read_bytes() for n in (artifact.WEIGHTS, artifact.MANIFEST)}


def _logits(ir, tokens):
    import numpy as np

    from cqjax import runtime
    from cqjax.io import hf
    from cqjax.kernels import backend

    with backend.use_kernel("jax"):
        return runtime.forward_fn(hf.to_model(ir))(tokens, np.ones(tokens.shape, bool))


def convert_and_infer(tmp: Path) -> dict:
    import jax
    import numpy as np

    import cqjax
    from cqjax import sharding
    from cqjax.io import hf

    ckpt = _checkpoint(tmp)
    mesh = sharding.make_mesh((2, 4))
    kw = {"method": "cq", "bits": 3, "progress": False}
    one, split = cqjax.quantize(ckpt, **kw), cqjax.quantize(ckpt, mesh=mesh, **kw)
    cqjax.save(one, tmp / "one")
    cqjax.save(split, tmp / "sharded")
    tokens = np.random.default_rng(0).integers(0, 37, (4, 16)).astype(np.int32)
    out = {"devices": len(jax.devices()), "artifact_identical": _files(tmp / "one") == _files(tmp / "sharded"),
           "placement": sharding.placement(split.ir)}
    loaded = cqjax.load(tmp / "sharded", mesh=mesh)
    out["loaded_placement_equal"] = sharding.placement(loaded.ir) == out["placement"]
    float_ir = hf.import_checkpoint(ckpt)
    for name, a, b in [("float", float_ir, sharding.shard_ir(float_ir, mesh)), ("quant", one.ir, loaded.ir)]:
        ref = _logits(a, tokens)
        with sharding.use_mesh(mesh):
            got = _logits(b, tokens)
        out[f"{name}_logits_max_abs_diff"] = float(np.max(np.abs(np.asarray(ref) - np.asarray(got))))
        out[f"{name}_logits_scale"] = float(np.max(np.abs(np.asarray(ref))))
        out["logits_sharding"] = str(got.sharding.spec)
    return out


def _quantized_logits(q, tokens):
    import numpy as np

    from cqjax import sharding

    logits = _logits(q.ir, tokens)
    return np.asarray(sharding.to_host(logits)).ravel()[::7].tolist()  # a sample of every row


def distributed(tmp: Path, process: str, port: str) -> dict:
    import jax
    import numpy as np

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(process))
    import cqjax
    from cqjax import sharding

    ckpt = tmp / "ckpt"  # written by the test before it starts the processes
    mesh = sharding.make_mesh((2, 4))
    q = cqjax.quantize(ckpt, method="cq", bits=3, progress=False, mesh=mesh)
    cqjax.save(q, tmp / "distributed")
    tokens = np.random.default_rng(0).integers(0, 37, (4, 16)).astype(np.int32)
    with sharding.use_mesh(mesh):
        logits = _quantized_logits(q, tokens)
    return {"process": jax.process_index(), "global_devices": len(jax.devices()),
            "local_devices": len(jax.local_devices()), "placement": sharding.placement(q.ir), "logits": logits}


def one_device(tmp: Path) -> dict:
    import numpy as np

    import cqjax

    q = cqjax.quantize(tmp / "ckpt", method="cq", bits=3, progress=False)
    cqjax.save(q, tmp / "one")
    tokens = np.random.default_rng(0).integers(0, 37, (4, 16)).astype(np.int32)
    return {"logits": _quantized_logits(q, tokens)}


def errors(tmp: Path) -> dict:
    from cqjax import sharding
    from cqjax.errors import ConfigError

    out = {}
    for name, kw in [("too_many", {"shape": (4,), "axes": ("model",)}), ("mismatch", {"shape": (1, 2), "axes": ("model",)})]:
        try:
            sharding.make_mesh(**kw)
        except ConfigError as e:
            out[name] = str(e)
    return out


if __name__ == "__main__":
    check, directory, *args = sys.argv[1:]
    print(json.dumps(globals()[check](Path(directory), *args)))
