"""fp32 matrix products for one or two rows, from a small C kernel compiled on first use (`rowkernel.c`).

Why: a request decodes one row at a time, two with guidance, and there a step is a chain of matrix-vector products
that only stream weights from memory. On the AMD EPYC (Zen 4) this project runs on, oneDNN and MKL read one row's
weights slowly and spend ~50-100 us per call besides, which for the default model's small matrices is most of a
step: its 33 matrices of a step take 3.4 ms through oneDNN and 1.8 ms here (measured, one row, 2 threads).

The kernel is built with the machine's C compiler (`$CC`, else `cc`; `-O3 -march=native -fopenmp`) into a cache
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
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rowkernel.c")
MAX_ROWS = 2  # from 4 rows on, oneDNN's packed weights are as fast or faster (measured, gpt2-124M matrices)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 120

RowsLinear = Callable[..., None]


@functools.cache
def load() -> RowsLinear | None:
    """The compiled kernel's entry point, or None where it cannot be had (the reason is logged once)."""
    if os.environ.get("HNAAS_ROW_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        log.info("row kernel off (HNAAS_ROW_KERNEL)")
        return None
    try:
        library = _build()
        fn = ctypes.CDLL(str(library)).hnaas_rows_linear  # CDLL releases the GIL for the call
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        log.info("row kernel unavailable, using oneDNN/MKL for single rows: %s", exc)
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int] * 2
    return fn


def linear(kernel: RowsLinear, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None, *,
           add: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """GELU?(x @ weight.T + bias) + add through the kernel. weight: [out, in] contiguous fp32 on the CPU; x: [n, in]."""
    n, inputs = x.shape
    outputs = weight.shape[0]
    if weight.dtype != torch.float32 or not weight.is_contiguous() or weight.shape[1] != inputs:
        raise ValueError(f"row kernel needs a contiguous fp32 [out, {inputs}] matrix, got {tuple(weight.shape)}")
    x = x.to(torch.float32).contiguous()
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    if add is not None:
        add = add.to(torch.float32).expand(n, outputs).contiguous()
    y = torch.empty(n, outputs, dtype=torch.float32)
    kernel(weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(),
           None if add is None else add.data_ptr(), y.data_ptr(), n, outputs, inputs, 1 if gelu else 0,
           torch.get_num_threads())
    return y


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
