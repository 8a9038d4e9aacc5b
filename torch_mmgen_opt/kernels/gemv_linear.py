"""float32 / bfloat16 ``nn.Linear`` of a CPU decode step through our panel kernel.

A decode step multiplies a few rows (one token, or one per beam) by every weight and is
bound by reading the weights. :class:`GemvLinear` keeps the layer's ``weight`` and
``bias`` Parameters and a copy of the weight packed once into panels of 16 output
features (``kernels/cpu_gemv.py: pack_panels``); a call with at most
``cpu_gemv.MAX_ROWS`` rows goes through ``mmgen_cpu::panel_gemv``, which streams each
panel once for every row with no horizontal sums; more rows (a prefill, the text-to-unit
stage) go through ``F.linear`` on the original weight. In a compiled graph the row count
is static, so only one branch is traced, and the op is one extern call.

Against ``passes/decode_gemv.py`` (Inductor's multiply-reduce loop, the default where
this kernel is not used): the pass needs no copy and fuses the layer's norms into its
loops, but its loops end every output feature with horizontal sums; measured in
``docs/passes/decode_gemv.md``.

Exactness: another summation order than ``F.linear``: float32 rounding only (tested at
the shapes of a decode step). bfloat16 is accumulated in float32 and rounded once, as
the library's bfloat16 GEMM does. Contract: weights are constant after packing (inference),
as with ``kernels/packed_linear.py``; a packed layer holds its weight twice.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from . import cpu_gemv

log = logging.getLogger("torch_mmgen_opt")

__all__ = ["MIN_WEIGHT", "GemvLinear", "gemv_linears_"]

# Smaller weights sit in cache, where the library call is as good (as decode_gemv's bound)
MIN_WEIGHT = 1 << 16


class GemvLinear(nn.Module):
    """Drop-in for a float32 or bfloat16 CPU ``nn.Linear`` whose calls have at most
    ``cpu_gemv.MAX_ROWS`` rows (see the module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("panels", cpu_gemv.pack_panels(linear.weight), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = math.prod(x.shape[:-1])
        if (
            rows > cpu_gemv.MAX_ROWS
            or x.dtype != self.weight.dtype
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return F.linear(x, self.weight, self.bias)  # traced away when not taken
        y = torch.ops.mmgen_cpu.panel_gemv(x.reshape(rows, self.in_features), self.panels,
                                         self.bias, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, packed=panels"
        )


def _reason_not_eligible(mod: nn.Module) -> str | None:
    if type(mod) is not nn.Linear:
        return "not a plain nn.Linear"
    w = mod.weight
    if w.device.type != "cpu":
        return f"on {w.device.type}: the kernel is for CPU"
    if w.dtype not in (torch.float32, torch.bfloat16):
        return f"{w.dtype}: the kernel is for float32 and bfloat16"
    if w.numel() < MIN_WEIGHT:
        return f"{w.shape[0]}x{w.shape[1]} weight: small weights stay in cache, where F.linear is as good"
    return None


def gemv_linears_(root: nn.Module, report: Any = None, prefix: str = "") -> dict[str, str]:
    """Swap, in place, the eligible ``nn.Linear`` submodules of ``root`` for
    :class:`GemvLinear`: plain ``nn.Linear``, float32 or bfloat16, on CPU, at least ``MIN_WEIGHT``
    weight elements. Nothing is swapped if the kernel cannot be built here.

    Returns ``{layer name: "gemv" or the reason it was left}``; counters
    ``mmgen.linear_gemv`` / ``mmgen.linear_not_gemv`` and, with ``report`` (a
    ``PassReport``), one event per layer.
    """
    from ..graph_utils import PassEvent

    result: dict[str, str] = {}
    available = cpu_gemv.ensure_loaded()
    for name, mod in list(root.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        reason = None if available else "the CPU matrix-vector kernels could not be built here"
        reason = reason or _reason_not_eligible(mod)
        if reason is None:
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, GemvLinear(mod))
        result[name] = "gemv" if reason is None else reason
        kind = "linear_gemv" if reason is None else "linear_not_gemv"
        counters["mmgen"][kind] += 1
        if report is not None:
            where = f"{prefix}.{name}" if prefix else name
            report.events.append(PassEvent("gemv_linear", "prepare", kind, where, reason or ""))
    log.debug("gemv_linear: %d of %d linear layers swapped", sum(v == "gemv" for v in result.values()),
              len(result))
    return result
