"""Command-line entry point: ``python -m cqjax [hydra overrides]``.

A Hydra app over ``conf/config.yaml``. The configs are shipped in the wheel as
package data ``cqjax/conf``; in a source checkout (editable install) the
repository's top-level ``conf/`` is used, so edits apply without reinstalling.

The schema under the YAML groups is :mod:`cqjax.config` (registered in Hydra's ConfigStore
at import). Errors of cqjax's own (:class:`cqjax.errors.CqjaxError`: a bad config value, a
missing checkpoint) print one line ``cqjax: error: ...`` and exit with status 2.

Examples:
    python -m cqjax --help                                  # groups, options, the default config
    python -m cqjax --cfg job                               # print the composed config
    python -m cqjax +model=smollm2-135m eval=quick          # convert: quantize, evaluate, report
    python -m cqjax -m +model=smollm2-135m quant.bits=2,3,4 # a sweep: summary.md + pareto.png
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from cqjax.config import config_dir  # importing cqjax.config registers the schema `cqjax_schema`
from cqjax.errors import CqjaxError


@hydra.main(version_base=None, config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    """Runs cqjax with the composed Hydra config ``cfg``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cqjax.cli import run  # imported lazily: --help and --cfg need no CLI

    try:
        run(cfg)
    except Exception as e:  # noqa: BLE001 - a sweep goes on past a failing job; one run reports and exits
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            from cqjax.report.sweep import record_failure

            record_failure(HydraConfig.get().runtime.output_dir, list(HydraConfig.get().overrides.task), e)
            print(f"cqjax: error in this sweep job (recorded; the sweep goes on): {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            return
        if not isinstance(e, CqjaxError):
            raise
        print(f"cqjax: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _without_torch() -> None:
    """Hides torch from this process: the command line never runs it (it is only the tests'
    reference), but transformers imports it whenever it is installed, even to load a tokenizer,
    and that costs ~300 MB resident and seconds of start-up."""
    import os

    sys.modules.setdefault("torch", None)  # `import torch` fails; transformers sees no torch
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # its "PyTorch was not found" advice


if __name__ == "__main__":
    _without_torch()
    main()
