"""Gemma 4's audio features: log-mel spectrograms in numpy, as transformers'
``Gemma4AudioFeatureExtractor`` computes them (``input_features`` and ``input_features_mask``).

================  ============================================================================
step              how (the released checkpoints' values)
================  ============================================================================
batch             each clip cut to ``max_length`` samples (480 000: 30 s at 16 kHz), then all
                  right-padded with zeros to the longest; both lengths rounded up to a
                  multiple of ``pad_to_multiple_of`` (128)
framing           ``frame_length // 2`` zeros in front (semicausal: frame 0 is centred on the
                  first sample); windows of ``frame_length + 1`` samples every ``hop_length``
                  (``frame_length_ms`` 20 = 320 samples, ``hop_length_ms`` 10 = 160); the extra
                  sample feeds the preemphasis, else it is dropped
spectrum          periodic Hann window of ``frame_length``, magnitude ``|rfft|`` of
                  ``fft_length`` points (the next power of two, 512; doubled by ``fft_overdrive``)
mel               HTK-scale triangular filters (unnormalized) from ``min_frequency`` to
                  ``max_frequency``, ``log(mel + mel_floor)``, then the optional per-bin mean
                  and standard deviation
mask              a frame is valid when the last sample of its window is real audio; the
                  features of invalid frames are zero
================  ============================================================================

>>> import numpy as np
>>> features, mask = log_mel([np.zeros(16_000, np.float32), np.zeros(8_000, np.float32)])
>>> features.shape, mask.sum(axis=1).tolist()
((2, 99, 128), [99, 49])
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from cqjax.errors import ConfigError
from cqjax.eval.speech import triangular_filters


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """The feature extractor's parameters (its constructor's, with the same defaults), plus
    the truncation and padding its ``__call__`` applies (``max_length``, ``pad_to_multiple_of``)."""

    feature_size: int = 128
    sampling_rate: int = 16_000
    frame_length_ms: float = 20.0
    hop_length_ms: float = 10.0
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = False
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-3
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None
    max_length: int = 480_000
    pad_to_multiple_of: int = 128

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        return (1 << (self.frame_length - 1).bit_length()) * (2 if self.fft_overdrive else 1)


#: Keys of a saved extractor config that do not change the features: the class name, the
#: padding value (it only ever fills frames the mask zeroes) and whether a mask is returned.
_BOOKKEEPING = frozenset({"feature_extractor_type", "processor_class", "padding_value", "return_attention_mask"})
#: Saved keys that transformers recomputes from the ``*_ms`` keys: they must agree.
_DERIVED = ("frame_length", "hop_length", "fft_length")


def parse_features(raw: dict, source: str) -> FeatureConfig:
    """A saved ``Gemma4AudioFeatureExtractor`` config (the ``feature_extractor`` entry of
    ``processor_config.json``) as a :class:`FeatureConfig`.

    The saved ``frame_length`` and ``hop_length`` are in samples; transformers recomputes them
    from ``frame_length_ms`` and ``hop_length_ms`` (20 and 10 unless given), so a saved value
    that disagrees is an error rather than a silent change.

    Raises:
      ConfigError: naming a key that is unknown, contradicts another, or asks for what this
        module does not compute (``dither`` > 0 adds random noise; ``padding_side`` 'left').
    """
    fields = {f.name for f in dataclasses.fields(FeatureConfig)} - {"max_length", "pad_to_multiple_of"}
    unknown = sorted(set(raw) - fields - _BOOKKEEPING - set(_DERIVED) - {"dither", "padding_side"})
    if unknown:
        raise ConfigError(f"{source}: feature extractor key {unknown[0]!r} is not understood (unknown keys: {unknown})")
    if raw.get("dither", 0.0):
        raise ConfigError(f"{source}: feature extractor key 'dither' = {raw['dither']} adds random noise; "
                          "only 0 is supported")
    if raw.get("padding_side", "right") != "right":
        raise ConfigError(f"{source}: feature extractor key 'padding_side' = {raw['padding_side']!r}; "
                          "only 'right' is supported")
    defaults = FeatureConfig()
    values = {k: tuple(float(v) for v in np.ravel(raw[k])) if k.startswith("per_bin_")
              else type(getattr(defaults, k))(raw[k]) for k in fields if raw.get(k) is not None}
    cfg = FeatureConfig(**values)
    for k in ("per_bin_mean", "per_bin_stddev"):
        if getattr(cfg, k) is not None and len(getattr(cfg, k)) != cfg.feature_size:
            raise ConfigError(f"{source}: feature extractor key {k!r} has {len(getattr(cfg, k))} values for "
                              f"feature_size {cfg.feature_size}")
    for k in _DERIVED:
        if k in raw and raw[k] != getattr(cfg, k):
            raise ConfigError(f"{source}: feature extractor key {k!r} = {raw[k]} disagrees with the "
                              f"{getattr(cfg, k)} that the sampling rate and the *_ms keys give")
    return cfg


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.cache
def mel_filters(cfg: FeatureConfig) -> np.ndarray:
    """HTK-scale triangular filters ``[fft_length // 2 + 1, feature_size]`` (no normalization)."""
    fft_freqs = np.linspace(0, cfg.sampling_rate // 2, cfg.fft_length // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(cfg.min_frequency), _hz_to_mel(cfg.max_frequency),
                                   cfg.feature_size + 2))
    return triangular_filters(fft_freqs, edges)


def log_mel(audio: np.ndarray | Sequence[np.ndarray], cfg: FeatureConfig = FeatureConfig()
            ) -> tuple[np.ndarray, np.ndarray]:
    """Features of mono clips at ``cfg.sampling_rate`` (see the module table).

    Args:
      audio: a batch of clips (a sequence of 1-D arrays, or a 2-D array), or one clip
        ``[samples]`` as a batch of one (which transformers' extractor fails on: it takes a 1-D
        array's samples for clips).
      cfg: the extractor's parameters.

    Returns:
      ``(features float32 [B, frames, feature_size], mask bool [B, frames])``, as
      ``Gemma4AudioFeatureExtractor(...)(audio, return_tensors="np")`` gives
      ``input_features`` and ``input_features_mask``.
    """
    clips = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 else list(audio)
    # transformers' padding stores the samples as float32; the spectrum is computed in float64.
    m = cfg.pad_to_multiple_of
    limit = -(-cfg.max_length // m) * m  # transformers rounds the cut up to the padding multiple too
    clips = [np.asarray(a, np.float32).reshape(-1)[:limit].astype(np.float64) for a in clips]
    n = -(-max(c.size for c in clips) // m) * m
    fl, hop, left = cfg.frame_length, cfg.hop_length, cfg.frame_length // 2
    wave = np.zeros((len(clips), left + n))
    real = np.zeros((len(clips), left + n), bool)
    for i, c in enumerate(clips):
        wave[i, left:left + c.size] = c * cfg.input_scale_factor
        real[i, left:left + c.size] = True
    if wave.shape[1] > fl:
        windows = np.lib.stride_tricks.sliding_window_view(wave, fl + 1, axis=-1)[:, ::hop]
    else:  # shorter than one window: no frames
        windows = np.zeros((len(clips), 0, fl + 1))
    p = cfg.preemphasis
    if p > 0.0 and cfg.preemphasis_htk_flavor:
        frames = np.concatenate([windows[..., :1] * (1.0 - p), windows[..., 1:-1] - p * windows[..., :-2]], axis=-1)
    elif p > 0.0:
        frames = windows[..., 1:] - p * windows[..., :-1]
    else:
        frames = windows[..., :-1]
    hann = np.hanning(fl + 1)[:-1].astype(np.float32)  # periodic, as the extractor stores it
    spectrum = np.abs(np.fft.rfft(frames * hann, n=cfg.fft_length, axis=-1))
    features = np.log(spectrum @ mel_filters(cfg) + cfg.mel_floor)
    if cfg.per_bin_mean is not None:
        features = features - np.asarray(cfg.per_bin_mean)
    if cfg.per_bin_stddev is not None:
        features = features / np.asarray(cfg.per_bin_stddev)
    mask = real[:, np.arange(windows.shape[1]) * hop + fl]
    return (features * mask[..., None]).astype(np.float32), mask
