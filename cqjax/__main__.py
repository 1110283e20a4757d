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

from pathlib import Path

import sys

import hydra
from omegaconf import DictConfig

import cqjax.config  # noqa: F401  (registers the structured config schema `cqjax_schema`)
from cqjax.errors import CqjaxError


def config_dir() -> str:
    """Returns the absolute path of the Hydra config directory.

    Returns:
        ``<repo>/conf`` when this module runs from a source checkout (a
        ``pyproject.toml`` and ``conf/config.yaml`` beside the package),
        else the installed package data ``cqjax/conf``.

    Raises:
        FileNotFoundError: neither location holds ``config.yaml``.
    """
    pkg = Path(__file__).resolve().parent
    repo = pkg.parent
    if (repo / "pyproject.toml").is_file() and (repo / "conf" / "config.yaml").is_file():
        return str(repo / "conf")
    installed = pkg / "conf"
    if (installed / "config.yaml").is_file():
        return str(installed)
    raise FileNotFoundError(
        f"cqjax: no Hydra config found: neither {repo / 'conf' / 'config.yaml'} "
        f"nor {installed / 'config.yaml'} exists; reinstall cqjax (`pip install .`)."
    )


@hydra.main(version_base=None, config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    """Runs cqjax with the composed Hydra config ``cfg``."""
    from cqjax.cli import run  # imported lazily: --help and --cfg need no CLI

    try:
        run(cfg)
    except CqjaxError as e:
        print(f"cqjax: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
