"""Our C++ kernels: few-row matrix products of a decode step on CPU.

- ``torch.ops.mmgen_cpu.int8_gemv(x, q, scales)`` computes ``(x @ q.T) * scales`` for
  ``x`` ``(M, K)`` float32 with ``1 <= M <= 8``, ``q`` ``(N, K)`` int8 and ``scales``
  ``(N,)`` float32: the weight-only int8 linear of a decode step
  (``kernels/quant.py``'s ``"int8"`` scheme). ``passes/decode_gemv.py`` puts it in place
  of ``aten._weight_int8pack_mm`` in compiled CPU decode graphs.
- ``torch.ops.mmgen_cpu.panel_gemv(x, panels, bias, n)`` computes ``x @ W.T + bias`` in
  float32 or bfloat16 (accumulated in float32) for a weight packed once into panels of
  16 output features
  (:func:`pack_panels`); ``kernels/gemv_linear.py``'s ``GemvLinear`` calls it for a decode
  step's few rows.

Why hand-written kernels: a decode step is bound by reading its weights.

int8: weights are a quarter of float32's bytes, but on the development machine (AMD
EPYC, AVX2, torch 2.13) neither shipped path reads them fast with float32 activations:
``_weight_int8pack_mm`` took 41-59 ms where the float32 matrix-vector code took 2.4 ms
(12 weights of 2048 x 512, 4 rows), and Inductor's CPU code for an int8 multiply-reduce
loads 8-bit data through a temporary buffer (``Vectorized<int8_t>::loadu(ptr, 8)``),
2.9x slower than float32. This kernel widens 16 weights at a time with AVX2 and
multiplies them into the ``M`` rows of ``x``.

float32 and bfloat16: MKL's few-row path and Inductor's multiply-reduce loop (``decode_gemv``) both
walk the weight row by row and end every output feature with a horizontal sum of each
row's accumulator. With the weight stored as panels of 16 features (feature fastest),
one vector load of a panel serves every row with ``x[m, k]`` broadcast, there are no
horizontal sums, and the weight is one sequential stream (``docs/passes/decode_gemv.md``
has the measurements).

Both are in ``csrc/cpu_gemv.cpp``.

Build: the source ships with the package and is compiled on first use with the C++
compiler Inductor uses (``$CXX`` or ``c++``; ``-O3``, AVX2/FMA and AVX-512F where
``torch.backends.cpu.get_cpu_capability()`` reports them, OpenMP like ATen), linked
against the installed torch, into a per-user cache keyed by the source, torch version
and flags (``$TORCH_MMGEN_OPT_CACHE``, default ``~/.cache/torch_mmgen_opt``); ~15 s
once, then loaded in milliseconds. A library built earlier is loaded when this module is
imported, so Inductor's cached graphs that call the ops find them. If the build fails (no
compiler, unsupported platform) a warning is logged once and :func:`ensure_loaded`
returns ``False``: callers then keep torch's ops (``_weight_int8pack_mm``, ``F.linear``).
``TORCH_MMGEN_OPT_NO_CPP_KERNELS=1`` disables the build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("torch_mmgen_opt")

__all__ = ["MAX_ROWS", "PANEL", "cache_token", "ensure_loaded", "panel_gemv", "int8_gemv", "is_loaded",
           "library_path", "pack_panels"]

MAX_ROWS = 8
PANEL = 16  # output features per panel of panel_gemv's packed weight
_SOURCE = Path(__file__).with_name("csrc") / "cpu_gemv.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "failed": None}


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _isa_flags() -> list[str]:
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an old or unusual build: compile portable code
        return []
    if capability == "AVX512":
        return ["-mavx2", "-mfma", "-mavx512f"]
    return ["-mavx2", "-mfma"] if capability == "AVX2" else []


def _flags() -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *_isa_flags()]


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_MMGEN_OPT_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torch_mmgen_opt"


def library_path() -> Path:
    """Where the library for this source, torch and flags is (or will be) built."""
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(torch.__version__.encode())
    key.update(" ".join(_flags()).encode())
    return _cache_dir() / f"mmgen_cpu_gemv_{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    from torch.utils import cpp_extension
    from torch.utils._filelock import FileLock

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=600):
        if target.exists():  # another process built it while we waited
            return
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        includes = [f"-I{p}" for p in cpp_extension.include_paths()]
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = os.path.join(tmp, target.name)
            cmd = [cxx, str(_SOURCE), *_flags(), *includes, f"-L{torch_lib}",
                   f"-Wl,-rpath,{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10", "-o", out]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            os.replace(out, target)


def _load(path: Path) -> None:
    torch.ops.load_library(str(path))

    @torch.library.register_fake("mmgen_cpu::int8_gemv")
    def _(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        torch._check(x.dim() == 2 and q.dim() == 2 and x.shape[1] == q.shape[1])
        return x.new_empty((x.shape[0], q.shape[0]))

    @torch.library.register_fake("mmgen_cpu::panel_gemv")
    def _(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        torch._check(x.dim() == 2 and panels.dim() == 3 and x.shape[1] == panels.shape[1])
        return x.new_empty((x.shape[0], n))

    _state["loaded"] = True


def is_loaded() -> bool:
    return bool(_state["loaded"])


def ensure_loaded() -> bool:
    """Build (first time on this machine) and load the library; ``False`` if that is
    not possible here (the reason is logged once)."""
    if _state["loaded"]:
        return True
    if _state["failed"] is not None:
        return False
    with _lock:
        if _state["loaded"]:
            return True
        if os.environ.get("TORCH_MMGEN_OPT_NO_CPP_KERNELS") == "1":
            _state["failed"] = "disabled by TORCH_MMGEN_OPT_NO_CPP_KERNELS=1"
            return False
        try:
            path = library_path()
            if not path.exists():
                log.info("building the CPU matrix-vector kernels (once) into %s", path)
                _build(path)
            _load(path)
        except Exception as e:  # noqa: BLE001 - no kernel: the caller keeps torch's op
            _state["failed"] = f"{type(e).__name__}: {e}"
            log.warning("torch_mmgen_opt: the CPU matrix-vector kernels are unavailable (%s); "
                        "decode steps keep torch's ops (aten._weight_int8pack_mm, F.linear)",
                        _state["failed"])
            return False
    return True


def cache_token() -> str:
    """Part of the pass manager's uuid: graphs compiled with and without the kernel
    must not share Inductor cache entries."""
    return f"cpu_gemv:{int(is_loaded())}"


# The wrappers check their arguments here, in Python, with the error a user mistake
# deserves (TypeError / ValueError), before the library's own TORCH_CHECKs: on the lent
# GPU image (torch 2.11+cu130, CXX=/opt/gcc/bin/g++) a C++ exception thrown from any
# extension library, torch's own load_inline included, segfaulted the process (2026-12-04).
def _check_cpu(name: str, **tensors: torch.Tensor) -> None:
    for arg, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"{name}: {arg} is on {t.device}; pass CPU tensors")


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"{name}: x must be (M, K) with 1 to {MAX_ROWS} rows, got shape "
                         f"{tuple(x.shape)}; use torch's op for more rows")


def _check_int8_args(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    name = "int8_gemv"
    if x.dtype != torch.float32 or scales.dtype != torch.float32 or q.dtype != torch.int8:
        raise TypeError(f"{name}: float32 x and scales and an int8 q, got {x.dtype}, "
                        f"{scales.dtype} and {q.dtype}")
    _check_cpu(name, x=x, q=q, scales=scales)
    _check_rows(name, x)
    if q.dim() != 2 or scales.dim() != 1 or q.shape[1] != x.shape[1] or scales.shape[0] != q.shape[0]:
        raise ValueError(f"{name}: shapes do not match: x {tuple(x.shape)}, q {tuple(q.shape)} "
                         f"(N, K), scales {tuple(scales.shape)} (N,)")


def _check_panel_args(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, n: int) -> None:
    name = "panel_gemv"
    if panels.dtype not in (torch.float32, torch.bfloat16) or x.dtype != panels.dtype:
        raise TypeError(f"{name}: float32 or bfloat16 x and panels of the same dtype, got "
                        f"{x.dtype} and {panels.dtype}")
    _check_cpu(name, x=x, panels=panels)
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be (M, K), got shape {tuple(x.shape)}")
    if panels.dim() != 3 or panels.shape[2] != PANEL or panels.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: x has {x.shape[1]} features; panels must be (P, {x.shape[1]}, "
                         f"{PANEL}) from pack_panels, got {tuple(panels.shape)}")
    p = panels.shape[0]
    if not (p - 1) * PANEL < n <= p * PANEL:
        raise ValueError(f"{name}: {n} outputs do not fit {p} panels of {PANEL}; pass the "
                         "weight's row count")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.dtype != panels.dtype
                             or bias.device.type != "cpu"):
        raise ValueError(f"{name}: bias must be ({n},) of {panels.dtype} on the CPU, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``(x @ q.T) * scales`` through the kernel (see the module docstring)."""
    _check_int8_args(x, q, scales)
    if not ensure_loaded():
        raise RuntimeError(f"the int8 CPU kernel is unavailable: {_state['failed']}")
    return torch.ops.mmgen_cpu.int8_gemv(x, q, scales)


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """``W (N, K)`` -> ``(ceil(N / 16), K, 16)`` panels of its dtype, ``panels[p, k, j] =
    W[16 p + j, k]``, zero past ``N``: :func:`panel_gemv`'s layout (a copy; the weight
    is not changed)."""
    if weight.dim() != 2:
        raise ValueError(f"pack_panels: expected a (N, K) weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"pack_panels: float32 or bfloat16 weights, got {weight.dtype}")
    n, k = weight.shape
    p = -(-n // PANEL)
    padded = weight.detach().new_zeros(p * PANEL, k)
    padded[:n].copy_(weight.detach())
    return padded.view(p, PANEL, k).transpose(1, 2).contiguous()


def panel_gemv(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """``x (M, K) @ W.T + bias`` for ``panels = pack_panels(W)`` with ``n`` rows of ``W``."""
    _check_panel_args(x, panels, bias, n)
    if not ensure_loaded():
        raise RuntimeError(f"the CPU matrix-vector kernels are unavailable: {_state['failed']}")
    return torch.ops.mmgen_cpu.panel_gemv(x, panels, bias, n)


def _load_if_built() -> None:
    """At import: load a library built earlier (cheap), never build."""
    if os.environ.get("TORCH_MMGEN_OPT_NO_CPP_KERNELS") == "1":
        return
    try:
        path = library_path()
        if path.exists():
            with _lock:
                if not _state["loaded"]:
                    _load(path)
    except Exception as e:  # noqa: BLE001 - a stale or broken file: rebuilt on demand
        log.debug("could not load %s: %s", "the CPU matrix-vector kernels", e)


_load_if_built()
