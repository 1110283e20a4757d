"""Property-based fuzzing of the artifact format: every mutant of a saved artifact (a manifest
field changed or removed, a byte of the weights flipped, the file cut short) either loads and
computes bit-identical logits or fails with a ``cqjax.errors`` error naming the file: no silent
change, no crash, no unbounded allocation (mutants run in a subprocess whose address space is
capped). The fast profile runs in the suite; ``-m fuzz_long`` runs the long one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqjax import pipeline, recipes
from cqjax.io import artifact, hf
from test_import_errors import write
from test_quant_passes import ODD, tensors

WORKER = r'''
import json, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
import numpy as np
from cqjax.errors import CqjaxError
from cqjax.io import artifact, hf
tokens = np.array([[1, 5, 9, 30, 2, 7]], np.int32)
for line in open(sys.argv[1]):
    d = line.strip()
    try:
        out = np.asarray(hf.to_model(artifact.load(d))(tokens))
        res = {"status": "ok", "logits": out.tobytes().hex()}
    except CqjaxError as e:
        res = {"status": "error", "type": type(e).__name__, "message": str(e)}
    except MemoryError as e:
        res = {"status": "memory", "message": repr(e)}
    except Exception as e:
        res = {"status": "other", "type": type(e).__name__, "message": str(e)[:500],
               "trace": traceback.format_exc()[-1500:]}
    print(json.dumps({"dir": d, **res}), flush=True)
'''

VALUES = [2 ** 31, 2 ** 62, -1, 0, 1, 3, 7, 10 ** 12, 1.5, float("nan"), "x", "", None, True, [], {}, [2 ** 31],
          [1, 1], [128], {"a": 1}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    ir = hf.import_checkpoint(write(root / "ckpt", config=ODD, weights=tensors(ODD)))
    qir, _ = pipeline.run(recipes.recipe("cq", bits=3, block=32), ir, progress=False)
    return artifact.save(qir, root / "base")


def _paths(doc, prefix=()):
    """Every key path of a JSON document (dict keys and list indices)."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _set(doc, path, value, delete):
    for k in path[:-1]:
        doc = doc[k]
    if delete:
        del doc[path[-1]]
    else:
        doc[path[-1]] = value


mutation = st.one_of(
    st.tuples(st.just("manifest"), st.integers(0, 10 ** 9), st.sampled_from(VALUES), st.booleans()),
    st.tuples(st.just("flip"), st.integers(0, 10 ** 9), st.integers(1, 255), st.just(False)),
    st.tuples(st.just("cut"), st.integers(0, 10 ** 9), st.just(0), st.just(False)),
)


def mutate(base: Path, dst: Path, m) -> str:
    """Writes a mutant of ``base`` at ``dst``; returns what was changed."""
    shutil.copytree(base, dst)
    kind, where, value, delete = m
    if kind == "manifest":
        doc = json.loads((dst / artifact.MANIFEST).read_text())
        paths = [p for p in _paths(doc) if p[0] != "extra"]
        path = paths[where % len(paths)]
        _set(doc, path, value, delete)
        (dst / artifact.MANIFEST).write_text(json.dumps(doc))
        return f"manifest {'/'.join(map(str, path))} {'deleted' if delete else f'= {value!r}'}"
    data = bytearray((dst / artifact.WEIGHTS).read_bytes())
    i = where % len(data)
    if kind == "flip":
        data[i] ^= value
        (dst / artifact.WEIGHTS).write_bytes(bytes(data))
        return f"weights byte {i} ^= {value}"
    (dst / artifact.WEIGHTS).write_bytes(bytes(data[:i]))
    return f"weights cut at {i} of {len(data)}"


def run_mutants(base: Path, tmp: Path, mutations) -> list[tuple[str, dict]]:
    dirs, what = [str(base)], ["(unmutated)"]
    for i, m in enumerate(mutations):
        d = tmp / f"m{i}"
        what.append(mutate(base, d, m))
        dirs.append(str(d))
    listing = tmp / "mutants.txt"
    listing.write_text("\n".join(dirs) + "\n")
    env = {**os.environ, "CQJAX_KERNEL": "auto"}
    proc = subprocess.run([sys.executable, "-P", "-c", WORKER, str(listing)], capture_output=True, text=True, env=env,
                          timeout=1200)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(dirs), f"the worker died (rc {proc.returncode}) after {len(results)} of " \
                                      f"{len(dirs)} mutants, on {what[len(results)]}: {proc.stderr[-2000:]}"
    return list(zip(what, results))


def check(results) -> None:
    (_, ref), *rest = results
    assert ref["status"] == "ok", ref
    bad = []
    for what, r in rest:
        if r["status"] == "ok" and r["logits"] != ref["logits"]:
            bad.append(f"silent: {what}")
        elif r["status"] == "error" and not any(n in r["message"] for n in ("manifest.json", "weights.safetensors")):
            bad.append(f"error without the file: {what}: {r['message'][:200]}")
        elif r["status"] not in ("ok", "error"):
            bad.append(f"{r['status']}: {what}: {r.get('type')}: {r['message'][:200]} {r.get('trace', '')[-600:]}")
    assert not bad, "\n".join(bad)


def _fuzz(base, tmp_path_factory, mutations):
    check(run_mutants(base, tmp_path_factory.mktemp("mutants"), mutations))


@settings(max_examples=1, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(mutation, min_size=60, max_size=60))
def test_every_mutant_is_identical_or_named_fast(base, tmp_path_factory, mutations):
    _fuzz(base, tmp_path_factory, mutations)


@pytest.mark.fuzz_long
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(mutation, min_size=150, max_size=150))
def test_every_mutant_is_identical_or_named_long(base, tmp_path_factory, mutations):
    _fuzz(base, tmp_path_factory, mutations)


@pytest.mark.slow
def test_every_manifest_field_of_one_entry(base, tmp_path_factory):
    """Deterministic coverage: each key of a quantized entry set to each hostile value."""
    doc = json.loads((base / artifact.MANIFEST).read_text())
    i = next(i for i, e in enumerate(doc["tensors"]) if e["kind"] == "cq")
    paths = [p for p in _paths(doc) if p[:2] == ("tensors", i)]
    flat = [p for p in _paths(doc) if p[0] != "extra"]
    picks = [(flat.index(p), v) for p in paths for v in (2 ** 31, -1, "x", None, [2 ** 31])]
    _fuzz(base, tmp_path_factory, [("manifest", w, v, False) for w, v in picks])
    assert len(picks) > 50
