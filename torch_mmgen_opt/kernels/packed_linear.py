"""float32 ``nn.Linear`` on CPU through oneDNN with the weight packed once, ahead of time.

Why: a decode step multiplies a few rows (one token, or one per beam) by every weight.
On the development machine (AMD EPYC, AVX2, torch 2.13) eager ``F.linear`` in float32
goes through MKL, whose small-M path is slow there: with 4 rows and the weights read from
memory, oneDNN's ``_linear_pointwise`` on a weight reordered once into its blocked layout
ran 1.4x (512x512), 1.8-2.2x (2048x512, 512x2048) and 3.2x (8192x512) faster than
``F.linear`` (:func:`measure_gain`); at 64+ rows the two are within 1.0-1.3x, and for tiny
weights (64x64) the packed call is slower. Inductor does the same packing only under
``freezing=True`` and, for float32, picks MKL's packed GEMM instead. So this is module
preparation, not a graph pass: each chosen ``nn.Linear`` is swapped for a
:class:`PackedLinear` whose forward calls ``mmgen::packed_linear``, an op Inductor keeps
as one extern call.

Exactness: the packed kernel sums in another order than MKL: outputs differ from
``F.linear`` by float32 rounding only (about 1e-6 relative; tested).

Choice per layer (``mode``): ``True`` packs every eligible layer, ``"auto"`` packs a
layer only where the packed kernel measured at least 10% faster than ``F.linear`` for its
``(rows, out, in)`` shape on this machine, weights cycled through more memory than the
last-level cache holds (timed once per shape and process; 1-2 s per shape at the small
Seamless shapes). Eligible:
a plain ``nn.Linear`` on CPU in float32 with oneDNN available; anything else is left as
is and the reason recorded.

Contract: weights are constant after packing (inference), as with ``weight_norm``
folding or Inductor's freezing. The ``weight`` Parameter is kept (tied weights, state
dicts and ``.to()`` keep working), so a packed layer holds its weight twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

log = logging.getLogger("torch_mmgen_opt")

__all__ = ["PackedLinear", "pack_linears_", "packed_linear", "packing_available", "measure_gain"]

_lib = torch.library.Library("mmgen", "FRAGMENT")  # noqa: TOR901 - ops of this package
_lib.define("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor")


def _packed_linear_impl(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _packed_linear_meta(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


# A plain dispatcher kernel (not torch.library.custom_op): a decode step makes dozens of
# these calls and custom_op's Python wrapping cost ~60 us each here. The packed weight is
# an MKLDNN tensor, so the op needs a kernel for that dispatch key as well.
_lib.impl("packed_linear", _packed_linear_impl, "CPU")
_lib.impl("packed_linear", _packed_linear_impl, "MkldnnCPU")
_lib.impl("packed_linear", _packed_linear_meta, "Meta")


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``packed = pack(W)``: ``x (..., K) -> (..., N)``."""
    return torch.ops.mmgen.packed_linear(x, packed, bias, out_features)


def packing_available() -> bool:
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class PackedLinear(nn.Module):
    """Drop-in for a float32 CPU ``nn.Linear``: same ``weight`` / ``bias`` Parameters,
    forward through the packed copy of the weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # not a buffer: an opaque MKLDNN tensor has no storage for state_dict or .to()
        self.packed = _pack(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)  # traced away when not taken
        return packed_linear(x, self.packed, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, packed=onednn"
        )


_GAINS: dict[tuple[int, int, int, int], float] = {}


def _interleaved_best(fns: list[Any], rounds: int = 3) -> list[float]:
    """Best seconds of each of ``fns``, timed in alternating rounds so a load spike from
    another process hits every candidate alike; the minimum over rounds is the least
    disturbed sample."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


# Weights cycled through per timing: more than a last-level cache holds, so every call
# reads its weight from memory as in a real decode step (one 1 MB weight called in a
# loop stays in cache and favours a different kernel than the step sees).
_COLD_BYTES = 40 << 20
# "auto" does not time layers whose float32 weight is smaller than this: packing measured
# 0.2-0.45x at 64-256 wide weights (64x64 .. 256x64) and each timing costs ~1 s there.
_MIN_AUTO_BYTES = 256 << 10


@torch.no_grad()
def measure_gain(rows: int, out_features: int, in_features: int) -> float:
    """``F.linear`` seconds / packed seconds for ``(rows, in) x (out, in)^T`` in float32
    on this machine, weights read from memory (not cache); timed once per shape and
    thread count per process."""
    key = (rows, out_features, in_features, torch.get_num_threads())
    if key not in _GAINS:
        g = torch.Generator().manual_seed(0)
        copies = max(2, _COLD_BYTES // (4 * out_features * in_features))
        ws = [torch.randn(out_features, in_features, generator=g) for _ in range(copies)]
        ps = [_pack(w) for w in ws]
        b = torch.randn(out_features, generator=g)
        x = torch.randn(rows, in_features, generator=g)

        def dense() -> None:
            for w in ws:
                F.linear(x, w, b)

        def packed() -> None:
            for p in ps:
                packed_linear(x, p, b, out_features)

        t_dense, t_packed = _interleaved_best([dense, packed])
        _GAINS[key] = t_dense / t_packed
    return _GAINS[key]


def _reason_not_eligible(mod: nn.Module) -> str | None:
    if type(mod) is not nn.Linear:
        return "not a plain nn.Linear"
    w = mod.weight
    if w.device.type != "cpu":
        return f"on {w.device.type}: packing is for CPU"
    if w.dtype != torch.float32:
        return f"{w.dtype}: the packed oneDNN path here is float32 only"
    return None


def pack_linears_(
    root: nn.Module, mode: bool | str = "auto", rows: int = 1, report: Any = None,
    threshold: float = 1.1, prefix: str = "",
) -> dict[str, str]:
    """Swap, in place, the chosen ``nn.Linear`` submodules of ``root`` for
    :class:`PackedLinear`. ``rows``: how many rows a call multiplies at the hot shape
    (1 per token in decode, the beam size in beam search), for ``"auto"``'s timing.

    Returns ``{layer name: "packed" or the reason it was left}``; counters
    ``mmgen.linear_packed`` / ``mmgen.linear_not_packed`` and, with ``report`` (a
    ``PassReport``), one event per layer.
    """
    from ..graph_utils import PassEvent

    if mode not in (True, False, "auto"):
        raise ValueError(f"pack_linear must be True, False or 'auto', got {mode!r}")
    result: dict[str, str] = {}
    if mode is False:
        return result
    available = packing_available()
    for name, mod in list(root.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        reason = None if available else "oneDNN is not available in this torch build"
        reason = reason or _reason_not_eligible(mod)
        if reason is None and mode == "auto" and mod.weight.numel() * 4 < _MIN_AUTO_BYTES:
            reason = "weight under 256 KiB: packing measured slower at such sizes"
        if reason is None and mode == "auto":
            gain = measure_gain(rows, mod.out_features, mod.in_features)
            if gain < threshold:
                reason = f"measured {gain:.2f}x at {rows} rows: not worth it"
        kind = "linear_packed" if reason is None else "linear_not_packed"
        if reason is None:
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, PackedLinear(mod))
        result[name] = "packed" if reason is None else reason
        counters["mmgen"][kind] += 1
        if report is not None:
            where = f"{prefix}.{name}" if prefix else name
            report.events.append(PassEvent("pack_linear", "prepare", kind, where, reason or ""))
    n = sum(v == "packed" for v in result.values())
    log.debug("pack_linear: %d of %d linear layers packed", n, len(result))
    return result
