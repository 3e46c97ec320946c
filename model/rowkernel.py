"""GPT-2 arithmetic for one or two fp32 rows, from a small C library compiled on first use (`rowkernel.c`).

Why: a request decodes one row at a time, two with guidance, and there a step is a chain of matrix-vector products
and small ops. On the AMD EPYC (Zen 4) this project runs on, oneDNN and MKL read one row's weights slowly and spend
~50-100 us per call besides, and every small torch op costs 20-30 us, so for the default model most of a step was
overhead. Two entry points:
- `linear`: x @ W.T + b (+ GELU, + a residual) over [out, in] weights, read once whatever the row count. The default
  model's 33 matrices of a one-row step: 1.8 ms, against 3.4 ms through oneDNN.
- `DecodeBlocks`: every transformer block of a decode step (layer norms, the matrices, the KV-cache write, attention,
  residuals) in one call and one parallel region: the default model's decode step at one row 3.2 ms, against 4.9 ms
  with the torch ops around `linear` (and ~6 ms before either), when it still took one call per block.

The library is built with the machine's C compiler (`$CC`, else `cc`; `-O3 -march=native -fopenmp`) into a cache
directory (`$HNAAS_KERNEL_CACHE`, else `~/.cache/hnaas/kernels`), keyed by the source, the compiler and the CPU, so a
shared home directory never hands one machine another's build. It runs on torch's own OpenMP runtime (the library
asks for libgomp.so.1 by name, which torch has already loaded) and its thread count. Without a compiler, or with
`HNAAS_ROW_KERNEL=0`, `load()` gives None and the engine keeps its oneDNN/MKL paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rowkernel.c")
MAX_ROWS = 2  # `linear`: from 4 rows on, oneDNN's packed weights are as fast or faster (gpt2-124M matrices)
BLOCK_ROWS = 4  # `DecodeBlocks`: two requests with guidance; at 4 rows its saved ops still outweigh oneDNN's matrices
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120


@dataclass(frozen=True)
class Kernels:
    """The compiled library's entry points (ctypes functions; ctypes.CDLL releases the GIL while they run)."""

    rows_linear: Callable[..., None]
    decode_blocks: Callable[..., None]
    decode_attention: Callable[..., None]
    sample: Callable[..., int]


@functools.cache
def load() -> Kernels | None:
    """The compiled kernels, or None where they cannot be had (the reason is logged once)."""
    if os.environ.get("HNAAS_ROW_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        log.info("row kernel off (HNAAS_ROW_KERNEL)")
        return None
    try:
        library = ctypes.CDLL(str(_build()))
        rows, layer = library.hnaas_rows_linear, library.hnaas_decode_blocks
        attention, sample = library.hnaas_decode_attention, library.hnaas_sample
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        log.warning("row kernel unavailable, so decode steps run on torch ops (requests alone at about half "
                    "speed): %s", exc)
        return None
    pointer, size, number = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    rows.restype = layer.restype = attention.restype = None
    rows.argtypes = [pointer] * 5 + [size] * 3 + [ctypes.c_int] * 2
    layer.argtypes = ([pointer, pointer, size, pointer, pointer] + [size] + [pointer] + [size] * 5 +
                      [pointer, number, pointer, ctypes.c_int])
    attention.argtypes = [pointer] * 4 + [size] * 4 + [number] + [pointer] * 2 + [ctypes.c_int]
    sample.restype = size
    sample.argtypes = [pointer, size, size] + [pointer] * 4 + [size, pointer, pointer]
    return Kernels(rows, layer, attention, sample)


def linear(kernels: Kernels, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None, *,
           add: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """GELU?(x @ weight.T + bias) + add. weight: [out, in] contiguous fp32 on the CPU; x: [n, in]."""
    n, inputs = x.shape
    outputs = weight.shape[0]
    if weight.dtype != torch.float32 or not weight.is_contiguous() or weight.shape[1] != inputs:
        raise ValueError(f"the row kernel needs a contiguous fp32 [out, {inputs}] matrix, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    x = _floats(x)
    bias = None if bias is None else _floats(bias)
    add = None if add is None else _floats(add.expand(n, outputs))
    y = torch.empty(n, outputs, dtype=torch.float32)
    kernels.rows_linear(weight.data_ptr(), x.data_ptr(), _address(bias), _address(add), y.data_ptr(), n, outputs,
                        inputs, 1 if gelu else 0, torch.get_num_threads())
    return y


def sample(kernels: Kernels, logits: torch.Tensor, uniforms: torch.Tensor, temperature: torch.Tensor,
           top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`engine.sample_tokens` for a few rows of fp32 logits [n, V] on the CPU, with uniforms [n, R]: the tokens, and
    how many rows it left at -1 for the caller (greedy, top-k, and the rare row whose R - 1 draws were all outside
    its nucleus)."""
    n, vocab = logits.shape
    if logits.dtype != torch.float32 or uniforms.dim() != 2 or uniforms.shape[0] != n:
        raise ValueError("the sampling kernel needs fp32 logits [n, V] and uniforms [n, R]")
    logits = logits.contiguous()
    uniforms = uniforms.to(torch.float64).contiguous()
    temperature, top_p = _floats(temperature.reshape(n)), _floats(top_p.reshape(n))
    top_k = top_k.reshape(n).to(torch.long).contiguous()
    tokens = torch.empty(n, dtype=torch.long)
    scratch = torch.empty(3 * vocab, dtype=torch.float32)
    left = kernels.sample(logits.data_ptr(), n, vocab, temperature.data_ptr(), top_k.data_ptr(), top_p.data_ptr(),
                          uniforms.data_ptr(), uniforms.shape[1], scratch.data_ptr(), tokens.data_ptr())
    return tokens, left


class DecodeBlocks:
    """GPT-2's blocks (pre-norm, tanh GELU) run by the compiled `hnaas_decode_blocks`, all of them in one call, for a
    few rows at a time: what `CachedGPT2.decode` does with ~15 torch ops per block. The weights are checked once here
    (the kernel reads raw memory) and must outlive this object; the caller keeps them."""

    def __init__(self, kernels: Kernels, blocks: Sequence[Sequence[torch.Tensor]], heads: int, eps: float,
                 scales: Sequence[float]) -> None:
        """blocks: per block, ln_1 weight, bias; attention [3d, d], bias; projection [d, d], bias; ln_2 weight, bias;
        fc [inner, d], bias; mlp projection [d, inner], bias."""
        self.kernels, self.heads, self.eps, self.scales = kernels, heads, eps, list(scales)
        self.d, self.inner = blocks[0][0].shape[0], blocks[0][8].shape[0]
        d, inner = self.d, self.inner
        shapes = ((d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (inner, d), (inner,), (d, inner), (d,))
        for block in blocks:
            for tensor, shape in zip(block, shapes, strict=True):
                if tensor.dtype != torch.float32 or not tensor.is_contiguous() or tuple(tensor.shape) != shape:
                    raise ValueError(f"the decode kernel needs contiguous fp32 weights of shape {shape}, got "
                                     f"{tensor.dtype} {tuple(tensor.shape)}")
        if d % heads or len(self.scales) != len(blocks):
            raise ValueError("heads must divide the width, and each block needs its attention scale")
        self.blocks = len(blocks)
        # what the kernel reads: each block's 12 tensor addresses, and the scales, as C arrays made once
        self.addresses = (ctypes.c_void_p * (12 * len(blocks)))(*[t.data_ptr() for block in blocks for t in block])
        self.c_scales = (ctypes.c_float * len(blocks))(*self.scales)

    def __call__(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Run every block over x [n, d] (contiguous fp32, updated in place), row r in cache slot r at positions[r]
        (a CPU integer tensor [n]), writing each row's keys and values into the caches [blocks, slots, heads,
        capacity, head_dim]."""
        n = x.shape[0]
        if not (x.dtype == torch.float32 and x.is_contiguous() and tuple(x.shape) == (n, self.d)):
            raise ValueError(f"the decode kernel needs a contiguous fp32 [n, {self.d}] input")
        rows, length, layer_bytes = _check_step(keys, values, positions, n, self.blocks, self.heads, self.d)
        scratch = torch.empty(n * (5 * self.d + self.inner) + n * self.heads * length, dtype=torch.float32)
        self.kernels.decode_blocks(x.data_ptr(), self.addresses, self.blocks, keys.data_ptr(), values.data_ptr(),
                                   layer_bytes // 4, rows.data_ptr(), n, self.d, self.inner, self.heads, keys.shape[3],
                                   self.c_scales, self.eps, scratch.data_ptr(), torch.get_num_threads())


class DecodeAttention:
    """The attention of decode steps with more rows than DecodeBlocks takes, whose matrices stay with oneDNN: one
    compiled call per layer writes each row's new key and value into the cache and attends over that row's own
    positions (no mask, ragged or not). In torch that is an indexed cache write, two batched matrix products, a
    scale, a mask and a softmax, and the products read the cache at ~11 GB/s on the AMD machine (43 of ~110 ms of a
    gpt2-124M step at 32 rows and 200 positions); the kernel reads each (row, head)'s keys and values as one
    contiguous run each."""

    def __init__(self, kernels: Kernels, heads: int, d: int, scales: Sequence[float]) -> None:
        if d % heads:
            raise ValueError("heads must divide the width")
        self.kernels, self.heads, self.d, self.scales = kernels, heads, d, list(scales)

    def step(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
             ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """For one decode step of rows at `positions` (row r in cache slot r): checks the caches [layers, slots,
        heads, capacity, head_dim] and the positions once, and gives `attend(layer, qkv [n, 3d]) -> a [n, d]`."""
        n = positions.shape[0]
        rows, length, layer_bytes = _check_step(keys, values, positions, n, len(self.scales), self.heads, self.d)
        scores = torch.empty(n * self.heads * length, dtype=torch.float32)
        threads, capacity = torch.get_num_threads(), keys.shape[3]

        def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
            if not (qkv.dtype == torch.float32 and qkv.is_contiguous() and tuple(qkv.shape) == (n, 3 * self.d)):
                raise ValueError(f"the attention kernel needs a contiguous fp32 [{n}, {3 * self.d}] input")
            a = torch.empty(n, self.d, dtype=torch.float32)
            offset = layer * layer_bytes
            self.kernels.decode_attention(qkv.data_ptr(), keys.data_ptr() + offset, values.data_ptr() + offset,
                                          rows.data_ptr(), n, self.d, self.heads, capacity, self.scales[layer],
                                          a.data_ptr(), scores.data_ptr(), threads)
            return a

        return attend


def _check_step(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, n: int, layers: int, heads: int,
                d: int) -> tuple[torch.Tensor, int, int]:
    """What the kernels need of one decode step's caches and positions, checked before C writes to raw memory:
    the positions as C longs, the attention length (max position + 1) and the bytes of one layer's cache."""
    if any(cache.dtype != torch.float32 or not cache.is_contiguous() or cache.dim() != 5 or cache.shape != keys.shape
           for cache in (keys, values)) or (keys.shape[0], keys.shape[2], keys.shape[2] * keys.shape[4]) != (
               layers, heads, d):
        raise ValueError("the decode kernel needs contiguous fp32 key and value caches that fit the model")
    slots, capacity = keys.shape[1], keys.shape[3]
    rows = positions.to(torch.long).contiguous()  # the kernel reads it as C longs
    where = rows.tolist()
    if len(where) != n or n > slots or min(where, default=0) < 0 or max(where, default=0) >= capacity:
        raise ValueError(f"{n} rows need positions in [0, {capacity})")  # else the kernel writes out of bounds
    return rows, max(where, default=0) + 1, keys[0].numel() * 4


def _floats(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _build() -> Path:
    """The shared library for this source, compiler and CPU, compiled now unless the cache has it."""
    compiler = shlex.split(os.environ.get("CC") or "cc")
    source = SOURCE.read_bytes()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    key = hashlib.sha256(b"\0".join(s.encode() if isinstance(s, str) else s for s in (
        source, " ".join(compiler), version, " ".join(FLAGS), platform.machine(), _cpu_flags()))).hexdigest()[:16]
    cache = Path(os.environ.get("HNAAS_KERNEL_CACHE") or
                 Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hnaas" / "kernels")
    library = cache / f"rowkernel-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    # compiled beside its final name and renamed into place, so a concurrent start never loads half a file
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / library.name
        done = subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                              text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f"{compiler[0]} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, library)
    log.info("row kernel compiled: %s", library)
    return library


def _cpu_flags() -> str:
    """The CPU's model and feature flags (what -march=native compiles for); "" where /proc/cpuinfo is missing."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
    except OSError:
        return ""
    return "".join(sorted(set(lines)))
