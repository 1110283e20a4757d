"""Resident memory: give freed heap pages back to the OS."""

from __future__ import annotations

import ctypes
from typing import Any

_MALLOC_TRIM: Any = None  # glibc's malloc_trim, resolved on first use (False where there is none)


def trim_heap() -> None:
    """Hands the heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    glibc keeps what Python and XLA free resident in its arenas (XLA's worker threads spread it
    over several), so after a phase that allocated and freed a lot (tokenizing evaluation
    texts, converting, a block of a streamed evaluation) resident memory stays at that phase's
    peak although nothing is held. Cheap (milliseconds): call it between phases.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)
