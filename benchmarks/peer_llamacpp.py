"""llama.cpp as a peer quantizer (``llama-cpp-python``; install with ``setup_peers.sh``).

The float model every method starts from is the packaged GGUF dequantized (DATA.md). For
llama.cpp it is written back as an F32 GGUF with the source file's metadata and tensor layout
(so llama.cpp's q/k permutation and Gemma's ``w + 1`` norms stay as llama.cpp expects them),
then quantized with ``llama_model_quantize`` (no importance matrix), and scored through a
:func:`forward` that calls llama.cpp on the same token rows as every other model
(``jax.pure_callback``), so perplexity, KL and multiple choice use cqjax's scorers unchanged.

Grid alignment (the source weights sit on a ~4-bit llama.cpp grid): :func:`gaussian_f32` writes
the same file with every 2-D tensor replaced by Gaussian data of the same shape and standard
deviation; quantizing both and comparing the relative weight errors tells whether the format
represents the source grid (error far below its Gaussian error) or not.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: llama.cpp file types the harness uses (``LLAMA_FTYPE_MOSTLY_*``).
FTYPES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q4_0")
FLOAT_TYPES = ("F32", "F16", "BF16")


def work_dir(model: str) -> Path:
    """Where the F32 and quantized GGUFs of a packaged model are kept (reused across runs)."""
    from cqjax.data import registry

    d = registry.cache_dir() / "peers" / model
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_f32(src: Path, dst: Path, transform: Callable[[str, np.ndarray], np.ndarray]) -> Path:
    import gguf

    from cqjax.io.gguf import dequantize_tensor

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(transform(t.name, dequantize_tensor(t, str(src))), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def float_f32(src: Path, dst: Path) -> Path:
    """The source GGUF dequantized to F32 (the float model, in llama.cpp's layout)."""
    return dst if dst.exists() else _write_f32(src, dst, lambda name, w: w)


def gaussian_f32(src: Path, dst: Path, seed: int = 0) -> Path:
    """Like :func:`float_f32`, every 2-D tensor replaced by N(0, its std) of the same shape."""
    if dst.exists():
        return dst
    rng = np.random.default_rng(seed)

    def gauss(name: str, w: np.ndarray) -> np.ndarray:
        return (rng.standard_normal(w.shape, np.float32) * np.float32(w.std())) if w.ndim == 2 else w

    return _write_f32(src, dst, gauss)


def quantize(src: Path, dst: Path, ftype: str, threads: int) -> Path:
    """``llama_model_quantize`` of an F32 GGUF to ``ftype`` (one of :data:`FTYPES`)."""
    import llama_cpp

    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) failed with code {rc}")
    os.replace(tmp, dst)
    return dst


def storage(path: Path) -> dict[str, Any]:
    """Stored bits/weight of the eligible (2-D) tensors of a GGUF, float types counted at 16 bits
    (cqjax's definition), and the tensor types used."""
    import gguf

    params = nbytes = 0
    types: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) < 2 or min(int(d) for d in t.shape) == 1:
            continue
        n = int(np.prod([int(d) for d in t.shape]))
        kind = t.tensor_type.name
        params += n
        nbytes += 2 * n if kind in FLOAT_TYPES else int(t.n_bytes)
        types[kind] = types.get(kind, 0) + 1
    return {"params": params, "bytes": nbytes, "bits_per_weight": 8 * nbytes / params, "tensor_types": types}


def weight_error(float_path: Path, q_path: Path) -> float:
    """``Σ‖w − ŵ‖² / Σ‖w‖²`` over the 2-D tensors of two GGUFs of the same model."""
    import gguf

    from cqjax.io.gguf import dequantize_tensor
    from cqjax.quant_stats import error_sums, pooled_rel_error

    ref = {t.name: t for t in gguf.GGUFReader(float_path).tensors if len(t.shape) >= 2}
    return pooled_rel_error(error_sums(dequantize_tensor(ref[t.name]), dequantize_tensor(t))
                            for t in gguf.GGUFReader(q_path).tensors if t.name in ref)


class Runner:
    """A llama.cpp model that returns logits for every position of a token row."""

    def __init__(self, path: Path, *, n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                         n_threads=threads, n_threads_batch=threads, verbose=False)
        self.n_ctx, self.vocab = n_ctx, self.llm.n_vocab()

    def row_logits(self, tokens: np.ndarray) -> np.ndarray:
        """float32 ``[len(tokens), V]``: the logits at each position (fresh context per row)."""
        if len(tokens) > self.n_ctx:
            raise ValueError(f"llama.cpp runner: row of {len(tokens)} tokens exceeds n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm.eval([int(t) for t in tokens])
        return np.array(self.llm.scores[: len(tokens)], np.float32)

    def forward(self) -> Callable:
        """A cqjax scoring forward ``(tokens [B, T], mask [B, T]) -> logits [B, T, V]`` (padded
        positions get zeros; the scorers never read them)."""
        import jax
        import jax.numpy as jnp

        def host(tokens, mask):
            tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
            out = np.zeros(tokens.shape + (self.vocab,), np.float32)
            for b in range(tokens.shape[0]):
                n = int(mask[b].sum())
                if n:
                    out[b, :n] = self.row_logits(tokens[b, :n])
            return out

        def forward(tokens, mask):
            shape = jax.ShapeDtypeStruct(tokens.shape + (self.vocab,), jnp.float32)
            return jax.pure_callback(host, shape, tokens, mask)

        return forward
