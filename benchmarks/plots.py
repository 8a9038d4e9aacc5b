"""Figures of the benchmark harness (matplotlib, Agg backend: no display needed).

- :func:`plot_levers`: per workload, the decode speedup of every row over eager (a row
  below 1.0 is a lever that does not pay on this device; a row that could not run is
  marked "n/a") and the fraction of the bandwidth roofline each row reaches.
- :func:`torch_mmgen_opt.profiling.plot_characterization` (re-exported): stacked bars of
  where the time goes, eager against the final configuration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torch_mmgen_opt.profiling import plot_characterization  # noqa: E402

__all__ = ["plot_characterization", "plot_levers"]


def plot_levers(workloads: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Two panels per workload: decode speedup over eager, % of the read roofline.

    ``workloads``: the dicts returned by ``benchmarks.harness.run_workload`` (``name``,
    ``rows`` of ``RowResult`` with ``label``, ``status``, ``metrics``).
    """
    n = len(workloads)
    height = max(2.5, 0.45 * max(len(w["rows"]) for w in workloads) + 1.2)
    fig, axes = plt.subplots(n, 2, figsize=(11, height * n), squeeze=False)
    for (ax_s, ax_r), w in zip(axes, workloads):
        rows = list(w["rows"])
        labels = [r.label for r in rows]
        y = list(range(len(rows)))[::-1]
        for yi, r in zip(y, rows):
            if r.status != "ok":
                reason = r.status if len(r.status) < 60 else r.status[:57] + "..."
                for ax in (ax_s, ax_r):
                    ax.text(0.02, yi, f"n/a ({reason})", va="center", fontsize=7, color="#888888",
                            transform=ax.get_yaxis_transform())
                continue
            s = r.metrics.get("speedup decode", 1.0)
            f = r.metrics.get("% roofline", 0.0)
            if not (math.isfinite(s) and math.isfinite(f)):
                for ax in (ax_s, ax_r):
                    ax.text(0.02, yi, "decode time within noise", va="center", fontsize=7,
                            color="#888888", transform=ax.get_yaxis_transform())
                continue
            ax_s.barh(yi, s, color="#2ca02c" if s >= 1.0 else "#d62728")
            ax_s.text(s, yi, f" {s:.2f}x", va="center", fontsize=8)
            ax_r.barh(yi, f, color="#1f77b4")
            ax_r.text(f, yi, f" {f:.0f}%", va="center", fontsize=8)
        for ax in (ax_s, ax_r):
            ax.set_yticks(y, labels, fontsize=8)
            ax.margins(x=0.2)
        ax_s.axvline(1.0, color="black", linewidth=0.8)
        ax_s.set_xlabel("decode speedup over eager (x)", fontsize=8)
        ax_s.set_title(f"{w['name']}: levers, stacked top to bottom", fontsize=9)
        ax_r.set_xlabel("achieved bandwidth, % of measured read roofline", fontsize=8)
        ax_r.set_title(f"{w['name']}: fraction of the roofline", fontsize=9)
        ax_r.set_yticklabels([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
