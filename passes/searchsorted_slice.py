"""Binary searches over a slice, rewritten to search the whole tensor and shift.

Stage: ``"post_grad"`` (functional aten graph; views are still view ops).

Why: Inductor in torch < 2.13 lowers ``searchsorted`` / ``bucketize`` on CUDA with the
boundaries' buffer name, size and stride but not their storage offset
(pytorch/pytorch#182343). Boundaries that are a slice such as ``offsets[1:]`` (the usual
way to map jagged rows to sequence ids) are then searched from the wrong first element:
a silently wrong result. We measured it on an H100 with torch 2.11 in the HSTU model's
``padded_to_jagged``: every history shorter than the padded length came back shifted
(``docs/workloads/hstu.md``). A dynamic slice crashes the same lowering instead.

The rewrite, for a 1-D ``s = x[a:b]`` (step 1) of a sorted ``x`` of length ``n``::

    searchsorted(s, v)  ==  clamp(searchsorted(x, v) - a, 0, b - a)

``searchsorted(x, v)`` counts the elements of ``x`` before ``v``'s insertion point (``<``
or, with ``right``, ``<=``); they are a prefix ``[0, c)`` of ``x`` because ``x`` is sorted,
and the count inside ``[a, b)`` is ``clamp(c - a, 0, b - a)``. The upper clamp is dropped
when the slice runs to the end (``c <= n`` already). ``bucketize(v, s)`` is the same search
with the arguments swapped. The result is identical on every device and version (integer
arithmetic), so the pass runs everywhere: it never depends on which torch has the fix.

Left alone (``searchsorted_skipped`` with the reason): a ``sorter`` (its indices refer to
the slice), boundaries of more than one dimension, a slice with a step, a slice bound that
is symbolic, or boundaries that are not a slice (nothing to fix; not recorded).

Counters: ``searchsorted_unsliced``, ``searchsorted_skipped``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch.fx as fx

from torch_mmgen_opt.graph_utils import (
    GraphPass,
    PassContext,
    aten,
    emit_node,
    is_target,
    tensor_meta,
)

__all__ = ["PASS", "searchsorted_slice"]

# target -> index of the boundaries argument
_BOUNDARIES_ARG = {
    aten.searchsorted.Tensor: 0,
    aten.searchsorted.Scalar: 0,
    aten.bucketize.Tensor: 1,
    aten.bucketize.Scalar: 1,
}
_SAME_VALUES = (aten.clone.default, aten.alias.default)  # boundaries seen through these


def _slice_bounds(node: fx.Node) -> tuple[fx.Node, int, int | None] | str | None:
    """``(base, start, length or None)`` when ``node`` (the boundaries) is a rewritable
    slice; a reason string when it is a slice we must leave; ``None`` when no slice."""
    src = node
    while is_target(src, *_SAME_VALUES):
        src = src.args[0]
    if not is_target(src, aten.slice.Tensor):
        return None
    base, dim, start, end, step = (list(src.args) + [0, None, None, 1][len(src.args) - 1:])[:5]
    val = tensor_meta(base)
    if val is None or val.dim() != 1:
        return "boundaries of more than one dimension"
    if dim not in (0, -1) or step != 1:
        return f"slice with step {step}"
    n = val.shape[0]
    n = n if isinstance(n, int) else None
    start = 0 if start is None else start
    if not isinstance(start, int) or (end is not None and not isinstance(end, int)):
        return "symbolic slice bounds"
    if start < 0:
        if n is None:
            return "negative start on a dynamic length"
        start = max(start + n, 0)
    if n is not None:
        start = min(start, n)
    if end is None or end >= sys.maxsize // 2 or (n is not None and end >= n):
        return base, start, None  # to the end: the count cannot exceed the slice
    if end < 0:
        if n is None:
            return "negative end on a dynamic length"
        end = end + n
    return base, start, max(end - start, 0)


def searchsorted_slice(graph: fx.Graph, ctx: PassContext) -> int:
    """Rewrite every search over a 1-D slice to a search over its base; returns how many."""
    done = 0
    work = [n for n in graph.nodes if n.op == "call_function" and n.target in _BOUNDARIES_ARG]
    while work:
        node = work.pop()
        pos = _BOUNDARIES_ARG[node.target]
        found = _slice_bounds(node.args[pos])
        if found is None:
            continue
        if node.kwargs.get("sorter") is not None:
            found = "sorter given (its indices refer to the slice)"
        if isinstance(found, str):
            ctx.record("searchsorted_skipped", node, found)
            continue
        base, start, length = found
        args: list[Any] = list(node.args)
        args[pos] = base
        with graph.inserting_before(node):
            whole = emit_node(graph, node.target, tuple(args), dict(node.kwargs))
            out = emit_node(graph, aten.sub.Tensor, (whole, start)) if start else whole
            out = emit_node(graph, aten.clamp_min.default, (out, 0))
            if length is not None:  # (aten.clamp decomposes into these two; no lowering)
                out = emit_node(graph, aten.clamp_max.default, (out, length))
        for key in ("stack_trace", "nn_module_stack"):
            if key in node.meta:
                whole.meta[key] = node.meta[key]
        ctx.record("searchsorted_unsliced", node,
                   f"slice [{start}:{'' if length is None else start + length}]")
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
        work.append(whole)  # its base may itself be a slice
    return done


PASS = GraphPass(
    name="searchsorted_slice",
    stage="post_grad",
    fn=searchsorted_slice,
    enabled=lambda config: True,
    source_file=__file__,
)
