"""What ``python -m cqjax`` does with its composed Hydra config (schema: :mod:`cqjax.config`).

=========================  ==========================================  ==========================
mode                       does                                        module
=========================  ==========================================  ==========================
``convert`` (default)      imports ``model``, quantizes it with        :mod:`cqjax.cli.convert`
                           ``pipeline`` (widths from ``quant``),
                           evaluates the float baseline (cached by
                           model + protocol) and the quantized model
                           against it, writes ``artifact/``,
                           ``report.json``, ``report.md`` and plots;
                           ``~pipeline``: the float model only
``eval``                   evaluates ``artifact=DIR``, against its     :mod:`cqjax.cli.evaluate`
                           float model when the artifact records one
                           (or ``+model=...`` names it)
``generate``               continues ``prompt="..."`` (or a list,      :mod:`cqjax.cli.generate`
                           one batch) with ``artifact=DIR`` (KV
                           cache; greedy or sampled; streamed; stop
                           strings; ``generate.chat=true``)
``chat``                   talks with ``artifact=DIR`` through its     :mod:`cqjax.cli.generate`
                           chat template, one stdin line per turn
``export``                 writes ``artifact=DIR`` as a dequantized    :mod:`cqjax.cli.export`
                           Hugging Face checkpoint or a GGUF
                           (``export.format``, ``.out``, ``.dtype``)
=========================  ==========================================  ==========================

Every config value is checked (:func:`cqjax.config.validate`) and the pipeline is built
(:func:`cqjax.recipes.build`) before any model is read, so a bad key or value fails in a
second. Shared pieces (logging, timings, the report dict and its files) are in
:mod:`cqjax.cli.common`; report.json follows the schema in :mod:`cqjax.report`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cqjax.config import Mode, validate, validate_inputs

MODES = tuple(m.name for m in Mode)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validates ``cfg``, then runs ``cfg.mode`` into Hydra's run directory (or the current one)."""
    from hydra.core.hydra_config import HydraConfig

    from cqjax import recipes, sharding
    from cqjax.cli import convert, evaluate, export, generate

    validate(cfg)
    _apply_runtime(cfg.runtime)
    recipe = recipes.build(cfg) if cfg.pipeline and cfg.mode == Mode.convert else None  # bad values fail now
    validate_inputs(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(os.getcwd())
    out_dir.mkdir(parents=True, exist_ok=True)
    # With mesh.shape, every model built is split over the devices and batches go along `data`.
    mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes) if cfg.mesh.shape is not None else None
    if mesh is not None:
        from cqjax.cli.common import log

        log(f"mesh: {mesh.size} devices ({' x '.join(f'{a} {n}' for a, n in mesh.shape.items())})")
    with sharding.use_mesh(mesh):
        if cfg.mode == Mode.convert:
            return convert.run(cfg, out_dir, recipe)
        return {Mode.eval: evaluate.run, Mode.generate: generate.run, Mode.chat: generate.chat,
                Mode.export: export.run}[cfg.mode](cfg, out_dir)


def _apply_runtime(r: DictConfig) -> None:
    """``runtime.threads`` and ``runtime.kernel`` for this process (before any JAX computation)."""
    from cqjax import runtime
    from cqjax.kernels import backend

    runtime.set_threads(r.threads)
    if r.kernel != "auto":
        backend.set_kernel(r.kernel)
