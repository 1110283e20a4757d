"""Quantization passes: one module per pass; pure array math lives in ``<pass>_core.py``."""
