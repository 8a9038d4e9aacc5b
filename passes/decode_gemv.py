"""Few-row float32 matmuls on CPU as one fused multiply-reduce per row.

Stage: ``"post_grad"`` (Inductor has decomposed ``linear`` into ``mm`` / ``addmm`` on a
permuted weight; nothing runs after us but lowering).

Why: a decode step multiplies a handful of rows (one per sequence or beam) by every
weight, so it is bound by reading the weights. ``F.linear`` / ``aten.mm`` in float32
on CPU goes to MKL (or oneDNN), whose few-row path reads them slowly on the development
machine (AMD EPYC, AVX2): 5-8 GB/s out of ~27 GB/s the memory gives two threads. Written
as ``out[i] = (W * x[i]).sum(-1)`` for each row ``i``, Inductor fuses the ``M``
reductions (same ranges, same weight) into one vectorised C++ loop with ``M``
accumulators that reads each weight row once. ``benchmarks/bench_decode_gemv.py``
(a compiled step with the small Seamless decoder's shapes, 92 MB of weights): 1.7x,
2.9x and 1.9x Inductor's MKL calls at 1, 4 and 8 rows (``docs/passes/decode_gemv.md``).
It is a rewrite of the graph, so the weights stay ordinary tensors.

What it matches: ``aten.mm(x, w_t)`` and ``aten.addmm(bias, x, w_t)`` (``beta = alpha =
1``) where

- ``x`` is ``(M, K)`` with a static ``M <= MAX_ROWS`` (a decode step's rows);
- ``w_t`` is ``(K, N)`` with strides ``(1, K)``: the transpose of a contiguous ``(N, K)``
  weight, as ``nn.Linear`` produces; ``N * K >= MIN_WEIGHT`` elements (smaller weights
  stay in cache, where the library call is as good);
- everything is float32 on CPU.

What it leaves alone (each recorded as ``gemv_skipped`` with the reason): other dtypes
(bfloat16 at one row measured 0.7-1.0x the library call on AVX2), devices, a dynamic
or larger ``M`` (prefill), a weight that is not a transposed contiguous matrix, small
weights, ``addmm`` with ``beta``/``alpha``.

Exactness: the sums run in another order than MKL's, so outputs differ by float32
rounding only (tested against eager at ``1e-5``).

int8 weights: ``aten._weight_int8pack_mm(x, q, scales)`` (weight-only int8, float32
``x``, a static ``1 <= M <= MAX_ROWS``, CPU) becomes ``mmgen_cpu.int8_gemv``, our C++
kernel (``kernels/cpu_gemv.py``), when it is loaded: torch's kernel has no fast float32
path on AVX2, and the multiply-reduce form is slow for 8-bit loads in Inductor's CPU code
(``docs/passes/decode_gemv.md``). Same int8 math, another summation order.

Counters: ``gemv_rewritten``, ``gemv_skipped`` (int8 details start with ``int8``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from torch_mmgen_opt.graph_utils import GraphPass, PassContext, aten, emit_node, tensor_meta

log = logging.getLogger("torch_mmgen_opt")

__all__ = ["MAX_ROWS", "MIN_WEIGHT", "PASS", "decode_gemv"]

MAX_ROWS = 8
MIN_WEIGHT = 64 * 1024  # elements (256 KiB in float32)


def _reason_skipped(node: fx.Node) -> str | None:
    """Why ``node`` (an mm / addmm) must not be rewritten; ``None`` if it may."""
    if node.target is aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "addmm with beta/alpha"
        _, x, w_t = node.args[:3]
    else:
        x, w_t = node.args[:2]
    xv, wv, out = tensor_meta(x), tensor_meta(w_t), tensor_meta(node)
    if xv is None or wv is None or out is None:
        return "no tensor metadata"
    if xv.device.type != "cpu" or wv.device.type != "cpu":
        return f"device {xv.device.type} (CPU only)"
    if xv.dtype != torch.float32 or wv.dtype != torch.float32 or out.dtype != torch.float32:
        return f"dtype {xv.dtype} (float32 only)"
    rows = xv.shape[0]
    if not isinstance(rows, int):
        return "dynamic row count"
    if rows > MAX_ROWS:
        return f"{rows} rows > {MAX_ROWS}"
    if rows < 1:
        return "no rows"
    K, N = wv.shape
    if not isinstance(K, int) or not isinstance(N, int):
        return "dynamic weight shape"
    if tuple(wv.stride()) != (1, K):
        return "weight is not the transpose of a contiguous matrix"
    if N * K < MIN_WEIGHT:
        return f"weight {N}x{K} under {MIN_WEIGHT} elements"
    if node.target is aten.addmm.default:
        bias = tensor_meta(node.args[0])
        if bias is None or bias.dtype != torch.float32:
            return "bias is not a float32 tensor"
    return None


def _rewrite(graph: fx.Graph, node: fx.Node) -> None:
    if node.target is aten.addmm.default:
        bias, x, w_t = node.args[:3]
    else:
        bias, (x, w_t) = None, node.args[:2]
    rows = tensor_meta(x).shape[0]
    with graph.inserting_before(node):
        w = emit_node(graph, aten.permute.default, (w_t, [1, 0]))  # (N, K), contiguous
        outs = []
        for i in range(rows):
            xi = emit_node(graph, aten.select.int, (x, 0, i))  # (K,)
            prod = emit_node(graph, aten.mul.Tensor, (w, xi))  # (N, K)
            row = emit_node(graph, aten.sum.dim_IntList, (prod, [1]))  # (N,)
            outs.append(emit_node(graph, aten.unsqueeze.default, (row, 0)))
        out = emit_node(graph, aten.cat.default, (outs, 0)) if rows > 1 else outs[0]
        if bias is not None:
            out = emit_node(graph, aten.add.Tensor, (out, bias))
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _int8_reason_skipped(node: fx.Node) -> str | None:
    """Why an ``aten._weight_int8pack_mm(x, q, scales)`` must not become the int8
    kernel; ``None`` if it may."""
    x, q, scales = node.args[:3]
    xv, qv, sv = tensor_meta(x), tensor_meta(q), tensor_meta(scales)
    if xv is None or qv is None or sv is None:
        return "no tensor metadata"
    if any(v.device.type != "cpu" for v in (xv, qv, sv)):
        return f"device {xv.device.type} (CPU only)"
    if xv.dtype != torch.float32 or sv.dtype != torch.float32:
        return f"activations {xv.dtype} (float32 only; torch's kernel is fast with bfloat16)"
    if qv.dtype != torch.int8 or qv.dim() != 2 or xv.dim() != 2 or sv.dim() != 1:
        return "not an int8 (N, K) weight with (M, K) rows"
    rows = xv.shape[0]
    if not all(isinstance(d, int) for d in (*xv.shape, *qv.shape)):
        return "dynamic shape"
    if not 1 <= rows <= MAX_ROWS:
        return f"{rows} rows (1 to {MAX_ROWS})"
    from torch_mmgen_opt.kernels import cpu_gemv

    # loaded before the compile began (api.inductor_patches builds it when the config
    # quantizes), so the pass manager's uuid already says the op may appear
    if not cpu_gemv.is_loaded():
        return "the int8 CPU kernel is not loaded (built when optimize() quantizes)"
    return None


def _rewrite_int8(graph: fx.Graph, node: fx.Node) -> None:
    with graph.inserting_before(node):
        out = emit_node(graph, torch.ops.mmgen_cpu.int8_gemv.default, tuple(node.args[:3]))
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def decode_gemv(graph: fx.Graph, ctx: PassContext) -> int:
    """Rewrite every eligible few-row float32 CPU mm / addmm and int8 weight-only
    product; returns how many."""
    if ctx.device is not None and ctx.device.type != "cpu":
        return 0  # nothing on a CUDA graph qualifies; skip without noise
    done = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten._weight_int8pack_mm.default:
            reason = _int8_reason_skipped(node)
            if reason is not None:
                ctx.record("gemv_skipped", node, f"int8: {reason}")
                continue
            shape = tuple(tensor_meta(node).shape)
            _rewrite_int8(graph, node)
            ctx.record("gemv_rewritten", node, f"{shape[0]} rows x {shape[1]} outputs, int8")
            done += 1
            continue
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        reason = _reason_skipped(node)
        if reason is not None:
            ctx.record("gemv_skipped", node, reason)
            continue
        shape = tuple(tensor_meta(node).shape)
        _rewrite(graph, node)
        ctx.record("gemv_rewritten", node, f"{shape[0]} rows x {shape[1]} outputs")
        done += 1
    return done


def _enabled(config: Any) -> bool:
    return bool(config.decode_gemv)


PASS = GraphPass(
    name="decode_gemv",
    stage="post_grad",
    fn=decode_gemv,
    enabled=_enabled,
    source_file=__file__,
)
