"""Calibration: token sequences and the activation statistics that calibrated passes read.

>>> from cqjax.calib import SOURCES
>>> SOURCES
('self', 'squad', 'wikipedia')
"""

from cqjax.calib.calibrate import STATS, calibrate
from cqjax.calib.sequences import SOURCES, calibration_tokens
from cqjax.calib.stats import Calibration, collect

__all__ = ["SOURCES", "STATS", "Calibration", "calibrate", "calibration_tokens", "collect"]
