"""Static shapes for the decode graph: prove them, specialise what the cache bounds,
report what would break CUDA graph capture.

Stage: ``"dynamo"``. This is the only stage where (1) the ShapeEnv still knows each
symbol's source (``L['input_ids'].size()[0]``), so messages can name it, (2) a
specialisation guard added here becomes a Dynamo guard *before* Inductor lowers the
graph, so the code it generates is static, (3) placeholders still carry Dynamo's
static-address marks (``meta["tensor_dict"]["_dynamo_static_input_type"]``), which tell a
KV-cache buffer from an ordinary input, and (4) nodes carry ``nn_module_stack`` and the
user's source line for :func:`~torch_mmgen_opt.graph_utils.node_location`.

What it matches: a graph that writes a static KV cache, i.e. an in-place ``index_copy_``
along dim 2 (or ``index_put_`` / ``__setitem__``) into a 4-D placeholder marked as a
static address (``torch_mmgen_opt.runtime.static_cache.StaticKVCache`` buffers, or
transformers' ``StaticCache``). A graph without such a write is left alone (returns 0).

On every such graph (prefill and decode) it reports what prevents CUDA graph capture,
as ``cudagraph_blocker`` events: host syncs (``.item()``, ``.tolist()``, ``.cpu()``...),
data-dependent shapes (unbacked symbols), CPU tensors in a CUDA graph, and in-place
writes into inputs that are not static addresses.

On a *decode* graph (every cache write adds one token), it proves with sympy over the
ShapeEnv that no dimension depends on the step:

- every symbol left in the graph's sizes (after the ShapeEnv's replacements) is
  classified; a symbol that sizes the batch axis of a cache write is bounded by the
  cache (``1 <= s <= max_batch_size``, checked on its value range or hint) and constant
  for a whole request, so it is specialised to its current value (a guard: one graph per
  batch size, never one per step) -> ``dim_specialized``;
- any other symbol can change with the step (a key length, a sliced cache): it is left
  as is and reported with the op, its source line and the symbol's source ->
  ``dynamic_dim`` (plus one warning), rather than a silent recompile storm;
- when every size is an integer afterwards -> ``kv_cache_static`` (once per graph).

Invariants relied on: Dynamo's ``example_value`` fake tensors on every node; cache
buffers are static addresses (``StaticKVCache`` marks them).

Counters: ``kv_cache_static``, ``dim_specialized``, ``dynamic_dim``, ``cudagraph_blocker``.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, guard_int

from torch_mmgen_opt.graph_utils import GraphPass, PassContext, node_location

log = logging.getLogger("torch_mmgen_opt")

_VIEW_METHODS = {"view", "reshape", "narrow", "transpose", "select", "__getitem__", "expand"}
_HOST_SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"}
_HOST_SYNC_FUNCTIONS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu}


def _val(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _root(node: Any) -> fx.Node | None:
    """The placeholder a chain of views/slices starts from."""
    while isinstance(node, fx.Node):
        if node.op == "placeholder":
            return node
        if node.op == "call_method" and node.target in _VIEW_METHODS:
            node = node.args[0]
        elif node.op == "call_function" and node.target is operator.getitem:
            node = node.args[0]
        else:
            return None
    return None


def _is_static_address(node: fx.Node | None) -> bool:
    if node is None:
        return False
    return node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") is not None


def _write_of(node: fx.Node) -> tuple[fx.Node, Any] | None:
    """``(destination, new_len)`` if ``node`` writes into a static 4-D buffer along the
    sequence dim; ``new_len`` is the number of positions written (int or SymInt)."""
    if node.op == "call_method" and node.target == "index_copy_":
        dst, dim, index = node.args[0], node.args[1], node.args[2]
        if dim not in (2, -2):
            return None
        new_len = _val(index).shape[0] if _val(index) is not None else None
    elif node.op == "call_method" and node.target == "index_put_":
        dst, indices = node.args[0], node.args[1]
        index = indices[2] if isinstance(indices, (list, tuple)) and len(indices) == 3 else None
        new_len = _val(index).shape[0] if _val(index) is not None else None
    elif node.op == "call_function" and node.target is operator.setitem:
        dst, value = node.args[0], node.args[2]
        new_len = _val(value).shape[-2] if _val(value) is not None and _val(value).dim() >= 2 else None
    else:
        return None
    root = _root(dst)
    val = _val(root)
    if not _is_static_address(root) or val is None or val.dim() != 4 or new_len is None:
        return None
    return dst, new_len


def _shape_env(graph: fx.Graph) -> Any:
    for node in graph.nodes:
        val = _val(node)
        if isinstance(val, torch.Tensor):
            mode = getattr(val, "fake_mode", None)
            if mode is not None and mode.shape_env is not None:
                return mode.shape_env
    return None


def _exprs(val: Any) -> list[Any]:
    if not isinstance(val, torch.Tensor):
        return []
    return [d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d) for d in val.shape]


def _report_blockers(graph: fx.Graph, ctx: PassContext) -> int:
    n = 0
    on_cuda = ctx.device is not None and ctx.device.type == "cuda"
    for node in graph.nodes:
        val = _val(node)
        reason = ""
        if node.op == "call_method" and node.target in _HOST_SYNC_METHODS:
            reason = f"host sync: .{node.target}()"
        elif node.op == "call_function" and node.target in _HOST_SYNC_FUNCTIONS:
            reason = f"host sync: {getattr(node.target, '__name__', node.target)}"
        elif val is not None and free_unbacked_symbols(val):
            reason = f"data-dependent shape from {node.target}"
        elif (
            on_cuda
            and isinstance(val, torch.Tensor)
            and val.device.type == "cpu"
            and val.dim() > 0
        ):
            reason = "CPU tensor in a CUDA graph" + (" (input)" if node.op == "placeholder" else "")
        elif (
            node.op == "call_method"
            and isinstance(node.target, str)
            and node.target.endswith("_")
            and not node.target.startswith("_")
        ):
            root = _root(node.args[0])
            if root is not None and not _is_static_address(root):
                reason = f"in-place {node.target} into input {root.name}, not a static address"
        if reason:
            ctx.record("cudagraph_blocker", node, reason)
            n += 1
    return n


def _op_name(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"input {node.name}"
    target = node.target
    return str(target) if isinstance(target, str) else getattr(target, "__name__", str(target))


def _hints(shape_env: Any) -> dict[Any, Any]:
    # torch >= 2.12 renamed var_to_val; 2.11 only has the old name.
    hints = getattr(shape_env, "backed_var_to_val", None)
    return hints if hints is not None else shape_env.var_to_val


def _source_name(source: Any) -> str:
    name = source.name
    return name() if callable(name) else str(name)


def _specialisable(sym: sympy.Symbol, writes: list[tuple[fx.Node, Any]], shape_env: Any) -> int | None:
    """``sym``'s bound if it sizes the batch axis of a cache write, else ``None``."""
    for dst, _ in writes:
        root_val = _val(_root(dst))
        dst_val = _val(dst)
        if dst_val is None or not isinstance(dst_val.shape[0], torch.SymInt):
            continue
        if dst_val.shape[0].node.expr.free_symbols == {sym}:
            bound = int(root_val.shape[0])
            upper = shape_env.var_to_range.get(sym) if shape_env is not None else None
            hint = _hints(shape_env).get(sym) if shape_env is not None else None
            if upper is not None and upper.upper.is_finite and int(upper.upper) <= bound:
                return bound
            if hint is not None and 1 <= int(hint) <= bound:
                return bound
    return None


def static_kv_shapes(graph: fx.Graph, ctx: PassContext) -> int:
    """Check (and where proven safe, specialise) the shapes of a static-KV graph."""
    writes = [w for w in (_write_of(n) for n in graph.nodes) if w is not None]
    if not writes:
        return 0
    _report_blockers(graph, ctx)
    if not all(isinstance(new_len, int) and new_len == 1 for _, new_len in writes):
        return 0  # a prefill graph: its token dim may be symbolic (bucketed lengths)
    shape_env = _shape_env(graph)

    def simplify(expr: Any) -> Any:
        return shape_env.replace(expr) if shape_env is not None else expr

    changed = 0
    reported: set[Any] = set()
    # Ops first, so that a message names the op that uses a symbol, not the input.
    ordered = [n for n in graph.nodes if n.op != "placeholder"]
    ordered += [n for n in graph.nodes if n.op == "placeholder"]
    for node in ordered:
        val = _val(node)
        for axis, expr in enumerate(_exprs(val)):
            expr = simplify(expr)
            for sym in sorted(expr.free_symbols - reported, key=str):
                if _specialisable(sym, writes, shape_env) is not None:
                    dim = val.shape[axis]
                    value = guard_int(dim)  # a guard: one graph per batch size
                    ctx.record("dim_specialized", node, f"{sym} -> {value} (batch, bounded by the cache)")
                    changed += 1
                else:
                    sources = ", ".join(
                        _source_name(s)
                        for s in (shape_env.var_to_sources.get(sym, []) if shape_env else [])
                    )
                    message = (
                        f"decode graph: dim {axis} of {_op_name(node)} ({expr}) is symbolic"
                        f"{f' from {sources}' if sources else ''} and not bounded by the KV "
                        "cache, so it may change every step; write the cache at "
                        "cache_position and mask it instead of slicing it to the current length"
                    )
                    ctx.record("dynamic_dim", node, message)
                    log.warning("mmgen static_kv_shapes: %s (%s)", message, node_location(node))
                reported.add(sym)
    all_static = all(
        isinstance(simplify(e), sympy.Integer) for n in graph.nodes for e in _exprs(_val(n))
    )
    if all_static:
        ctx.record(
            "kv_cache_static",
            writes[0][0],
            f"decode graph: {len(writes)} cache writes, every dim static",
        )
    return changed


PASS = GraphPass(
    name="static_kv_shapes",
    stage="dynamo",
    fn=static_kv_shapes,
    enabled=lambda cfg: cfg.static_kv,
    source_file=__file__,
)
