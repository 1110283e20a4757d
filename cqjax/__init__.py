"""cqjax: compiler-style post-training quantization for JAX.

The public API (loaded on first use, so ``import cqjax`` stays light):

>>> import cqjax
>>> sorted(cqjax.__all__)
['Quantized', 'generate', 'load', 'quantize', 'save', 'storage']
"""

from __future__ import annotations

import importlib

_EXPORTS = {"Quantized": "cqjax.api", "quantize": "cqjax.api", "save": "cqjax.api", "load": "cqjax.api",
            "generate": "cqjax.api", "storage": "cqjax.quant_stats"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cqjax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
