"""Decode attention on the CPU that reads the paged KV pool in place: a small C++ kernel, built on first use.

The portable path gathers every decoding sequence's blocks into a contiguous copy and runs SDPA
over it. On a CPU both halves are slow for decode's shapes: the gather copies the whole context of
every row each layer, and SDPA's CPU kernel is tuned for long query blocks, not one query per
head. Measured on this project's 2-core machine (``benchmarks/decode_attention.py``, 2026-11-26,
docs/PERFORMANCE.md), one layer over 16 rows of 464 tokens: the tiny model's shape 264-376 µs
against 108-161 µs here; the 3B shape (head dim 128, 8 query heads per KV head) 8.8-14 ms against
2.9-4.0 ms; the tiny model's whole decode step at batch 16, 1.2x faster.

The kernel (``cpu_decode.cpp``) is compiled with the machine's C++ compiler for this CPU
(``-march=native``) and the model's head dim (~0.5 s) into localvl's cache, keyed by the source,
the compiler, the CPU and the head dim, and loaded with ctypes: no build step at install, nothing
to compile against torch. OpenMP where the compiler has it and the library then loads (it shares
torch's runtime); else one thread. Where there is no compiler, the build fails or the kernel
disagrees with SDPA on a self-test, the engine keeps the portable path and logs why once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from localvl.engine.kv_cache import check_decode_kernel

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# Tried in turn: the first that compiles and loads is used (OpenMP and -march=native where they work).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3", "-mcpu=native"],
    ["-O3"],
)

_libraries: dict[int, ctypes.CDLL] = {}  # by head dim: each build instantiates one
_failed: dict[int, str] = {}


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    lines = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return platform.machine() + "\n" + "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    from localvl.models.tiny import default_cache_dir

    return default_cache_dir() / "kernels"


def _compile(compiler: str, target: Path, dim: int) -> None:
    """Build ``target`` with the first flag set that compiles and whose library loads: clang can
    compile OpenMP code that needs a runtime (libomp) this machine lacks."""
    errors = []
    for flags in _FLAG_SETS:
        command = [compiler, "-std=c++17", "-shared", "-fPIC", *flags, f"-DLOCALVL_HEAD_DIM={dim}", "-o", str(target), str(SOURCE)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            errors.append((result.stderr.strip().splitlines() or [f"status {result.returncode}"])[-1])
            continue
        try:
            ctypes.CDLL(str(target))
            return
        except OSError as error:
            errors.append(str(error))
    raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {errors[0]}")


def _build(dim: int) -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++; or set CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(), _cpu_identity().encode(),
                                     repr(_FLAG_SETS).encode(), str(dim).encode()])).hexdigest()[:20]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"localvl-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        target = folder / f"cpu_decode-{dim}-{key}.so"
        try:
            if not target.exists():
                folder.mkdir(parents=True, exist_ok=True)
                partial = folder / f".{target.name}.{os.getpid()}"
                started = time.perf_counter()
                try:
                    _compile(compiler, partial, dim)
                except BaseException:
                    partial.unlink(missing_ok=True)
                    raise
                os.replace(partial, target)  # whole or absent, with several processes building at once
                logger.info("built the CPU decode kernel for this machine in %.1f s: %s", time.perf_counter() - started, target)
                for stale in folder.glob(f"cpu_decode-{dim}-*.so"):  # an older source's, compiler's or CPU's build
                    if stale != target:
                        stale.unlink(missing_ok=True)
            return ctypes.CDLL(str(target))
        except OSError:  # a read-only or unusable cache folder (containers): the temporary folder instead
            continue
    raise RuntimeError("no writable folder for the compiled kernel")


def _load(dim: int) -> ctypes.CDLL | None:
    if dim not in _libraries and dim not in _failed:
        try:
            library = _build(dim)
            function = library.localvl_paged_decode
            function.restype = ctypes.c_int
            i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
            function.argtypes = [i32, ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, ptr, i64, i64,
                                 i32, i32, i32, i32, i32, ctypes.c_float, i32]
            _libraries[dim] = library
        except Exception as error:
            _failed[dim] = f"{type(error).__name__}: {error}"
    return _libraries.get(dim)


def paged_decode(
    q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """``q [rows, heads, dim]`` over pool blocks ``[blocks, block_size, kv_heads, dim]`` → ``[rows, heads, dim]``.

    Row r attends to its first ``lengths[r]`` tokens, found through ``tables[r]`` (block ids).
    """
    rows, heads, dim = q.shape
    _, block_size, kv_heads, _ = key_blocks.shape
    if not _takes(q.dtype, block_size, heads, kv_heads, dim):
        raise ValueError(f"the CPU decode kernel does not take this shape ({q.dtype}, head dim {dim}, "
                         f"{heads} heads over {kv_heads}, blocks of {block_size})")
    library = _load(dim)
    if library is None:
        raise ValueError(f"the CPU decode kernel could not be built for head dim {dim}: {_failed.get(dim)}")
    if q.stride(2) != 1:
        q = q.contiguous()
    tables = tables if tables.dtype == torch.int64 and tables.stride(1) == 1 else tables.to(torch.int64).contiguous()
    lengths = lengths if lengths.dtype == torch.int32 and lengths.is_contiguous() else lengths.to(torch.int32).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    status = library.localvl_paged_decode(
        _DTYPES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1),
        key_blocks.data_ptr(), value_blocks.data_ptr(), key_blocks.stride(0), key_blocks.stride(1), key_blocks.stride(2),
        tables.data_ptr(), tables.stride(0), tables.shape[1], lengths.data_ptr(), key_blocks.shape[0],
        out.data_ptr(), out.stride(0), out.stride(1),
        rows, heads, kv_heads, dim, block_size, scale, torch.get_num_threads(),
    )
    if status == 3:
        raise ValueError("a block table or length points outside the KV pool")
    if status:
        raise ValueError(f"the CPU decode kernel does not take this shape (status {status})")
    return out


def _takes(dtype: torch.dtype, block_size: int, heads: int, kv_heads: int, dim: int) -> bool:
    """Whether the kernel is written for this shape (cpu_decode.cpp's limits)."""
    return dtype in _DTYPES and not heads % kv_heads and heads // kv_heads <= 16 and not dim % 16 and dim <= 256 and not block_size % 16


def usable(dtype: torch.dtype, block_size: int, heads: int, kv_heads: int, dim: int) -> bool:
    """Whether the kernel builds here and agrees with SDPA on a small case of this model's shape."""
    if not _takes(dtype, block_size, heads, kv_heads, dim):
        logger.info("CPU decode kernel not used: it takes no %s, head dim %d, %d heads over %d or block size %d",
                    dtype, dim, heads, kv_heads, block_size)
        return False
    if _load(dim) is None:
        logger.warning("CPU decode kernel not used (decode attention gathers instead): %s", _failed[dim])
        return False
    try:
        check_decode_kernel(paged_decode, torch.device("cpu"), dtype, block_size, heads, kv_heads, dim)
    except Exception as error:
        logger.warning("CPU decode kernel not used (decode attention gathers instead): %s: %s", type(error).__name__, str(error)[:200])
        return False
    return True
