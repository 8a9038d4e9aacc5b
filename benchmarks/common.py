"""Shared pieces of every benchmark: timing, machine facts, bandwidth roofline, results.

Rules every benchmark follows (see docs/benchmarking.md):
- variants are compared as ratios measured in the same process run;
- compile time (first call) is reported apart from steady state (median of repeats);
- devices are synchronised around timers;
- the table goes to ``benchmarks/results/<name>-<device>-<date>.md`` with date, machine,
  torch version and device.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = [
    "RESULTS_DIR",
    "env_info",
    "markdown_table",
    "measure_read_bandwidth",
    "sync",
    "time_call",
    "timed_first_call",
    "write_results",
]


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], Any],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    repeats: int = 10,
    min_time_s: float = 0.0,
) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time_s:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def timed_first_call(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[float, Any]:
    """Seconds taken by the first call (compile time for compiled callables) and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device: str | torch.device = "cpu") -> dict[str, str]:
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} ({_cpu_name()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)",
        "torch": torch.__version__,
        "device": "cpu",
    }
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def measure_read_bandwidth(device: str | torch.device = "cpu", nbytes: int = 1 << 30) -> float:
    """Achievable read bandwidth in bytes/s.

    CPU: a plain read (``sum`` over a float32 buffer far larger than the caches). CUDA: a
    device-to-device copy, counting bytes read plus bytes written (the copy roofline).
    """
    device = torch.device(device)
    if device.type == "cuda":
        x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        y = torch.empty_like(x)
        t = time_call(lambda: y.copy_(x), device=device, warmup=3, repeats=20)
        return 2 * x.numel() * 4 / t
    x = torch.rand(nbytes // 8 // 4 * 4, dtype=torch.float32)  # nbytes/2: fits in memory easily
    t = time_call(lambda: x.sum(), device=device, warmup=2, repeats=7)
    return x.numel() * 4 / t


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0].keys())
    for row in rows[1:]:
        for c in row:
            if c not in cols:
                cols.append(c)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    title: str,
    sections: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    *,
    device: str | torch.device = "cpu",
    notes: str = "",
    results_dir: Path | None = None,
) -> Path:
    """Write ``sections`` (heading, rows) as one dated Markdown file; returns its path."""
    info = env_info(device)
    results_dir = results_dir or RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d")
    dev = "cuda" if torch.device(device).type == "cuda" else "cpu"
    path = results_dir / f"{name}-{dev}-{stamp}.md"
    parts = [f"# {title}", ""]
    parts += [f"- {k}: {v}" for k, v in info.items()]
    parts.append("")
    if notes:
        parts += [notes.strip(), ""]
    for heading, rows in sections:
        parts += [f"## {heading}", "", markdown_table(rows)]
    path.write_text("\n".join(parts))
    return path


def figure_path(results_md: Path, suffix: str) -> Path:
    """Where a figure that belongs to ``results_md`` goes: same folder and stem,
    ``-<suffix>.png`` (``harness-cpu-2026-01-01-levers.png``)."""
    results_md = Path(results_md)
    return results_md.with_name(f"{results_md.stem}-{suffix}.png")


def append_figures(results_md: Path, items: Sequence[tuple[str | None, Any]]) -> Path:
    """Append to a results file written by :func:`write_results`: ``(caption, png_path)``
    embeds a figure (linked relative to the file), ``(None, text)`` appends Markdown."""
    results_md = Path(results_md)
    parts = [results_md.read_text().rstrip("\n"), ""]
    for caption, item in items:
        if caption is None:
            parts += [str(item).rstrip("\n"), ""]
        else:
            rel = os.path.relpath(Path(item).resolve(), results_md.resolve().parent)
            parts += [f"## {caption}", "", f"![{caption}]({rel})", ""]
    results_md.write_text("\n".join(parts))
    return results_md
