"""The characterization report of :mod:`torch_mmgen_opt.profiling` and its renderings.

- :class:`PhaseStats` and :class:`CharacterizationReport`: time per phase and per
  operator class, filled in by :func:`torch_mmgen_opt.profiling.characterize`;
- the phase marks: :meth:`CharacterizationReport.phase` and :func:`phase` (a no-op
  outside a characterization), which put a ``record_function`` span around each phase
  and time it on the host clock;
- formatting: :meth:`CharacterizationReport.rows`, ``to_markdown`` and ``to_dict``, and
  the stacked-bar figure :func:`plot_characterization`.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._profiling_classify import CLASSES

_PHASE_PREFIX = "## mmgen phase: "
_RUN_SPAN = "## mmgen run ##"
_CURRENT: contextvars.ContextVar[CharacterizationReport | None] = contextvars.ContextVar(
    "mmgen_characterization", default=None
)

# --------------------------------------------------------------------------- the report


@dataclass
class PhaseStats:
    """One phase: ``calls`` entries (decode steps for ``decode``), ``tokens`` produced or
    consumed, ``wall_s`` measured around the phase (host clock, device synchronised),
    ``classes``: seconds per operator class, ``idle`` included."""

    name: str
    calls: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    classes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0.0))

    @property
    def accounted_s(self) -> float:
        return sum(self.classes.values())


class CharacterizationReport:
    """Where the time went, per phase and per operator class. Built by :func:`characterize`.

    ``info`` holds what the workload recorded with :meth:`note` (batch, prompt length,
    generated tokens, final sequence length...); ``notes`` what the analysis could not do.
    """

    def __init__(self, label: str = "", device: str = "cpu") -> None:
        self.label = label
        self.device = device
        self.phases: dict[str, PhaseStats] = {}
        self.info: dict[str, Any] = {}
        self.notes: list[str] = []
        self._recording = False
        self._open: str | None = None
        self.run_wall_s = 0.0

    # -- used by the workload while it runs
    @contextlib.contextmanager
    def phase(self, name: str, *, tokens: int = 0) -> Iterator[None]:
        """Mark a phase of the workload: ``with report.phase("decode", tokens=B): step()``.

        Repeated entries accumulate (one call per decode step). Nested marks are ignored.
        """
        if not self._recording or self._open is not None:
            yield
            return
        from torch.profiler import record_function

        _sync(self.device)
        self._open = name
        t0 = time.perf_counter()
        try:
            with record_function(f"{_PHASE_PREFIX}{name} ##"):
                yield
                _sync(self.device)
        finally:
            self._open = None
            stats = self.phases.setdefault(name, PhaseStats(name))
            stats.calls += 1
            stats.tokens += int(tokens)
            stats.wall_s += time.perf_counter() - t0

    def note(self, **info: Any) -> None:
        """Record facts about the run (sequence lengths, batch, ...)."""
        self.info.update(info)

    # -- results
    @property
    def total_s(self) -> float:
        return sum(p.wall_s for p in self.phases.values())

    def class_totals(self) -> dict[str, float]:
        out = dict.fromkeys(CLASSES, 0.0)
        for p in self.phases.values():
            for c, s in p.classes.items():
                out[c] += s
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "device": self.device,
            "info": dict(self.info),
            "notes": list(self.notes),
            "total_s": self.total_s,
            "classes_s": self.class_totals(),
            "phases": {
                n: {"calls": p.calls, "tokens": p.tokens, "wall_s": p.wall_s,
                    "classes_s": dict(p.classes)}
                for n, p in self.phases.items()
            },
        }

    def rows(self) -> list[dict[str, Any]]:
        """One table row per phase plus a total: ms, ms per call, % per class."""
        rows = []
        items = list(self.phases.values())
        total = PhaseStats("total", calls=sum(p.calls for p in items),
                           tokens=sum(p.tokens for p in items), wall_s=self.total_s,
                           classes=self.class_totals())
        for p in [*items, total]:
            acc = p.accounted_s or 1.0
            row: dict[str, Any] = {
                "phase": p.name, "calls": p.calls, "tokens": p.tokens,
                "wall ms": 1e3 * p.wall_s, "ms/call": 1e3 * p.wall_s / max(p.calls, 1),
            }
            for c in CLASSES:
                row[f"{c} %"] = 100.0 * p.classes[c] / acc
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        from_info = ", ".join(f"{k}={v}" for k, v in self.info.items())
        head = f"**{self.label or 'characterization'}** ({self.device}" + (
            f"; {from_info})" if from_info else ")"
        )
        lines = [head, "", _markdown_table(self.rows())]
        idle = "wall time not covered by any kernel" if self.device.startswith("cuda") else (
            "wall time outside top-level operators (Python/framework overhead)"
        )
        lines.append(f"Class shares are of the profiled time; idle = {idle}.")
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path, **kwargs: Any) -> Path:
        return plot_characterization([self], path, **kwargs)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={1e3 * p.wall_s:.1f}ms/{p.calls}" for n, p in self.phases.items())
        return f"CharacterizationReport({self.label!r}, {self.device}, {parts})"


@contextlib.contextmanager
def phase(name: str, *, tokens: int = 0) -> Iterator[None]:
    """Mark a phase for the characterization in progress; a no-op otherwise.

    Runtimes call this around their prefill and each decode step, so that
    ``characterize`` of a ``generate`` call splits prefill from decode.
    """
    report = _CURRENT.get()
    if report is None:
        yield
        return
    with report.phase(name, tokens=tokens):
        yield


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- figure

_COLORS = {
    "linear": "#1f77b4", "attention": "#d62728", "norm": "#9467bd", "elementwise": "#2ca02c",
    "kv_cache": "#ff7f0e", "conv": "#8c564b", "other": "#7f7f7f", "idle": "#dddddd",
}


_WHOLE = "\0whole"


def _whole(report: CharacterizationReport) -> PhaseStats:
    return PhaseStats(_WHOLE, calls=1, wall_s=report.total_s, classes=report.class_totals())


def plot_characterization(
    reports: Sequence[CharacterizationReport],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Stacked bars, one bar per report (before/after), split by operator class: a
    "whole run" panel (milliseconds per run, comparable even when the reports mark
    different phases) then one panel per phase (milliseconds per call, i.e. per decode
    step for ``decode``; phases under 5% of a run only count in the whole). Writes a PNG."""
    if not reports:
        raise ValueError("plot_characterization needs at least one report")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    for r in reports:
        names += [n for n in r.phases if n not in names
                  and r.phases[n].wall_s >= 0.05 * r.total_s]  # slivers only in "whole run"
    if len(names) > 1 or any(set(r.phases) != set(names) for r in reports):
        names.insert(0, _WHOLE)
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 + 2.2 * len(names) * max(1, len(reports) / 2), 4.2),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, r in enumerate(reports):
            p = _whole(r) if name == _WHOLE else r.phases.get(name)
            if p is None:
                continue
            acc = p.accounted_s or 1.0
            bottom = 0.0
            for c in CLASSES:
                h = 1e3 * p.wall_s / max(p.calls, 1) * p.classes[c] / acc
                ax.bar(i, h, bottom=bottom, color=_COLORS[c], edgecolor="white", linewidth=0.5,
                       hatch="//" if c == "idle" else None, label=c)
                bottom += h
        ax.set_xticks(range(len(reports)), [r.label or f"#{i}" for i, r in enumerate(reports)],
                      rotation=20, ha="right", fontsize=8)
        per = "step" if name == "decode" else ("run" if name == _WHOLE else "call")
        if name == _WHOLE:
            ax.set_title("whole run", fontsize=9)
        else:
            calls = "/".join(str(r.phases[name].calls) for r in reports if name in r.phases)
            ax.set_title(f"{name} ({calls} calls)", fontsize=9)
        ax.set_ylabel(f"ms per {per}", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    fig.legend([seen[c] for c in CLASSES if c in seen], [c for c in CLASSES if c in seen],
               loc="center right", fontsize=8, frameon=False)
    dev = reports[0].device
    fig.suptitle(title or f"Where the time goes ({dev}; idle = "
                 + ("GPU waiting for the host)" if dev.startswith("cuda") else "framework overhead)"),
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.85, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
