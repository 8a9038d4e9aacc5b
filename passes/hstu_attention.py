"""HSTU SiLU attention -> one fused op (``torch.ops.mmgen.hstu_attention``).

Part of the attention-fusion lever (``OptimizeConfig.attention``), a sibling of
``passes/fuse_attention.py``, which handles softmax attention; this file handles the
pointwise attention of HSTU (generative recommenders), which has no softmax and which no
Inductor pattern knows.

Stage: ``"joint"`` (Inductor's ``joint_custom_pre_pass``, functional aten graph with
Inductor's decompositions, fake-tensor ``meta["val"]`` on every node).

What it matches (eager HSTU code: ``models/hstu.py``, generative-recommenders' reference)::

    s = bmm(view(expand(Q)), view(expand(K^T)))          # then viewed to (B, H, N, M)
    s = s * alpha                                        # optional scalar(s), mul or div
    s = s + bias                                         # optional, broadcast to (B, H, N, M)
    a = silu(s)                                          # aten.silu, x*sigmoid(x) or
                                                         # x / (1 + exp(-x)) (decomposed)
    a = a * scale | a / n | a * mask | where(mask, a, 0) # any order, at most one mask
    out = view(bmm(view(expand(a)), view(expand(V))))   # (B, H, N, dv)

and replaces ``out`` with ``hstu_attention(Q, K, V, bias, mask, alpha, scale)``.

Invariants relied on:
- ``Q``, ``K^T``, ``V`` are recovered through ``view``/``_unsafe_view``/``clone``/``expand``
  only; each must already have the full (B, H, ...) shape (no broadcast in the batch dims).
- Every intermediate (scores, each pointwise step, the weights fed to the second bmm) has
  no user outside the chain: if the scores or weights are reused (returned, logged,
  summed...) nothing is rewritten. The activation must be SiLU exactly.
- Every node of the chain keeps the scores' dtype (no silent type promotion).

Where it fires (``AttentionConfig.backend``): ``"auto"`` only on CUDA with Triton, where the
op runs a Triton kernel that never writes the (N, N) scores; on CPU the chain is left to
Inductor, whose code generation already fuses bias, SiLU, scale and mask into one loop
between the two GEMMs, while an opaque op would run the unfused reference. ``"sdpa"``
(always fuse) fires on every device (the op's CPU path is the exact reference), which is
how the CPU tests exercise the rewrite. ``"inductor"`` never fires.

Counters: ``hstu_attention_fused`` per rewrite; ``hstu_attention_skipped`` per match left
alone because of the device/backend decision.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from torch_mmgen_opt.graph_utils import GraphPass, PassContext, aten, is_target, tensor_meta
from torch_mmgen_opt.kernels import hstu as hstu_kernels

__all__ = ["PASS", "hstu_attention_pass"]

_VIEW_LIKE = (aten.view, aten._unsafe_view, aten.reshape, aten.clone, aten.expand)


@dataclasses.dataclass
class _Match:
    q: fx.Node  # (B, H, N, d)
    kt: fx.Node  # (B, H, d, M)
    v: fx.Node  # (B, H, M, dv)
    bias: fx.Node | None
    mask: fx.Node | None
    alpha: float
    scale: float
    pv: fx.Node  # the second bmm
    out: fx.Node  # its 4-D view, replaced
    chain: list[fx.Node]  # nodes that die with the rewrite


def _number(x: object) -> float | None:
    if isinstance(x, numbers.Number) and not isinstance(x, bool):
        return float(x)
    return None


def _is_zero(x: object) -> bool:
    if _number(x) == 0.0:
        return True
    return (
        is_target(x, aten.scalar_tensor, aten.full)
        and _number(x.args[-1] if is_target(x, aten.full) else x.args[0]) == 0.0
    )


def _strip_views(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Follow view/clone/expand back to their source; returns (source, nodes passed)."""
    passed = []
    while is_target(node, *_VIEW_LIKE):
        passed.append(node)
        node = node.args[0]
    return node, passed


def _silu_input(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """If ``node`` computes silu(x): (x, the nodes of the silu)."""
    if is_target(node, aten.silu):
        return node.args[0], [node]
    if is_target(node, aten.mul) and len(node.args) == 2:
        a, b = node.args
        for x, sig in ((a, b), (b, a)):
            if is_target(sig, aten.sigmoid) and sig.args[0] is x and isinstance(x, fx.Node):
                return x, [node, sig]
    if is_target(node, aten.div) and len(node.args) == 2:
        x, den = node.args
        # x / (1 + exp(-x)): Inductor's decomposition of silu
        if is_target(den, aten.add) and isinstance(x, fx.Node):
            e, one = den.args
            if _number(one) != 1.0:
                e, one = one, e
            if (
                _number(one) == 1.0
                and is_target(e, aten.exp)
                and is_target(e.args[0], aten.neg)
                and e.args[0].args[0] is x
            ):
                return x, [node, den, e, e.args[0]]
    return None


def _walk_weights(node: fx.Node) -> tuple[fx.Node, list[fx.Node], float, fx.Node | None] | None:
    """From the attention weights back to silu: (silu input, chain, scale, mask)."""
    chain: list[fx.Node] = []
    scale, mask = 1.0, None
    while True:
        silu = _silu_input(node)
        if silu is not None:
            x, nodes = silu
            return x, chain + nodes, scale, mask
        if is_target(node, aten.mul, aten.div) and len(node.args) == 2:
            a, b = node.args
            if _number(b) is not None and isinstance(a, fx.Node):
                c = _number(b)
                if c == 0.0 and is_target(node, aten.div):
                    return None
                scale = scale * c if is_target(node, aten.mul) else scale / c
                chain.append(node)
                node = a
                continue
            if is_target(node, aten.mul) and _number(a) is not None and isinstance(b, fx.Node):
                scale *= _number(a)
                chain.append(node)
                node = b
                continue
            if is_target(node, aten.mul) and mask is None:
                # a tensor factor: the mask is the side that does not lead to silu
                for x, m in ((a, b), (b, a)):
                    rest = _walk_weights(x) if isinstance(x, fx.Node) else None
                    if rest is not None and rest[3] is None and isinstance(m, fx.Node):
                        silu_x, nodes, s, _ = rest
                        return silu_x, chain + [node] + nodes, scale * s, m
            return None
        if is_target(node, aten.where) and len(node.args) == 3 and mask is None:
            cond, a, b = node.args
            if _is_zero(b) and isinstance(a, fx.Node):
                mask, nxt = cond, a
            elif _is_zero(a) and is_target(cond, aten.bitwise_not, aten.logical_not):
                mask, nxt = cond.args[0], b
                chain.append(cond)
            else:
                return None
            if isinstance(a, fx.Node) and is_target(a, aten.scalar_tensor, aten.full):
                chain.append(a)
            if isinstance(b, fx.Node) and is_target(b, aten.scalar_tensor, aten.full):
                chain.append(b)
            chain.append(node)
            node = nxt
            continue
        return None


def _walk_scores(x: fx.Node) -> tuple[fx.Node, list[fx.Node], float, fx.Node | None] | None:
    """From the silu input back to the score bmm: (bmm, chain, alpha, bias)."""
    chain: list[fx.Node] = []
    bias = None
    if is_target(x, aten.add) and len(x.args) == 2 and not x.kwargs.get("alpha"):
        a, b = x.args
        for s, bb in ((a, b), (b, a)):
            if isinstance(s, fx.Node) and isinstance(bb, fx.Node) and _scores_source(s) is not None:
                bias = bb
                chain.append(x)
                x = s
                break
        else:
            return None
    alpha = 1.0
    while is_target(x, aten.mul, aten.div) and len(x.args) == 2 and _number(x.args[1]) is not None:
        c = _number(x.args[1])
        if c == 0.0 and is_target(x, aten.div):
            return None
        alpha = alpha * c if is_target(x, aten.mul) else alpha / c
        chain.append(x)
        x = x.args[0]
    if not is_target(x, aten.view, aten._unsafe_view, aten.reshape):
        return None
    bmm = x.args[0]
    if not is_target(bmm, aten.bmm):
        return None
    return bmm, chain + [x, bmm], alpha, bias


def _scores_source(node: fx.Node) -> fx.Node | None:
    """``node`` is scores (optionally times scalars) viewed from a bmm."""
    while is_target(node, aten.mul, aten.div) and _number(node.args[1]) is not None:
        node = node.args[0]
    if is_target(node, aten.view, aten._unsafe_view, aten.reshape) and is_target(
        node.args[0], aten.bmm
    ):
        return node.args[0]
    return None


def _shape(node: object) -> tuple | None:
    val = tensor_meta(node)
    return tuple(val.shape) if val is not None else None


def _match(pv: fx.Node) -> _Match | None:
    if len(pv.users) != 1:
        return None
    (out,) = pv.users
    if not is_target(out, aten.view, aten._unsafe_view, aten.reshape):
        return None
    out_shape = _shape(out)
    if out_shape is None or len(out_shape) != 4:
        return None
    weights, w_views = _strip_views(pv.args[0])
    v4, _ = _strip_views(pv.args[1])
    walked = _walk_weights(weights)
    if walked is None:
        return None
    silu_x, w_chain, scale, mask = walked
    scored = _walk_scores(silu_x)
    if scored is None:
        return None
    qk, s_chain, alpha, bias = scored
    q4, _ = _strip_views(qk.args[0])
    kt4, _ = _strip_views(qk.args[1])

    scores_shape = _shape(s_chain[-2])  # the 4-D view of the score bmm
    q_shape = _shape(q4)
    if scores_shape is None or q_shape is None or len(scores_shape) != 4 or len(q_shape) != 4:
        return None
    B, H, N, dv = out_shape
    M, d = scores_shape[3], q_shape[3]
    if tuple(scores_shape[:3]) != (B, H, N):
        return None
    if (q_shape, _shape(kt4), _shape(v4)) != ((B, H, N, d), (B, H, d, M), (B, H, M, dv)):
        return None
    for extra in (bias, mask):
        if extra is not None:
            shape = _shape(extra)
            try:
                if shape is None or torch.broadcast_shapes(shape, scores_shape) != scores_shape:
                    return None
            except RuntimeError:
                return None
    dtype = tensor_meta(qk).dtype
    if any(tensor_meta(t).dtype != dtype for t in (q4, kt4, v4)):
        return None
    chain = w_views + w_chain + s_chain
    if any(tensor_meta(n) is None or tensor_meta(n).dtype != dtype
           for n in chain if not is_target(n, aten.scalar_tensor, aten.full, aten.bitwise_not,
                                           aten.logical_not)):
        return None
    # Nothing of the chain may be used outside it (scores or weights reused -> leave it).
    inside = set(chain) | {pv}
    if any(u not in inside for n in chain for u in n.users):
        return None
    return _Match(q4, kt4, v4, bias, mask, alpha, scale, pv, out, chain)


def _decide(ctx: PassContext) -> tuple[bool, str]:
    backend = ctx.config.attention.backend
    if backend == "inductor":
        return False, "backend='inductor': the chain is left to Inductor's code generation"
    if backend == "sdpa":
        return True, ""
    device = ctx.device
    if device is not None and device.type == "cuda" and hstu_kernels.HAS_TRITON:
        return True, ""
    where = device.type if device is not None else "unknown device"
    return False, f"{where}: Inductor fuses the pointwise chain between the GEMMs itself"


def _set_meta(node: fx.Node) -> None:
    args = fx.map_arg(node.args, lambda n: n.meta["val"])
    fake_mode = detect_fake_mode([a for a in args if isinstance(a, torch.Tensor)])
    if fake_mode is None:
        return
    with fake_mode:
        node.meta["val"] = node.target(*args)


def hstu_attention_pass(graph: fx.Graph, ctx: PassContext) -> int:
    """Rewrite every HSTU SiLU attention of ``graph``; returns the rewrites made."""
    fuse, reason = _decide(ctx)
    rewrites = 0
    for pv in list(graph.nodes):
        if not is_target(pv, aten.bmm) or pv.graph is not graph:
            continue
        m = _match(pv)
        if m is None:
            continue
        if not fuse:
            ctx.record("hstu_attention_skipped", m.out, reason)
            continue
        with graph.inserting_before(pv):
            k4 = graph.call_function(aten.permute.default, (m.kt, [0, 1, 3, 2]))
            _set_meta(k4)
            fused = graph.call_function(
                torch.ops.mmgen.hstu_attention.default,
                (m.q, k4, m.v, m.bias, m.mask, m.alpha, m.scale),
            )
            _set_meta(fused)
        fused.meta.setdefault("stack_trace", m.out.meta.get("stack_trace"))
        m.out.replace_all_uses_with(fused)
        graph.erase_node(m.out)
        _erase_dead([m.pv, *m.chain, *_strip_views(m.pv.args[1])[1]], graph)
        ctx.record(
            "hstu_attention_fused",
            fused,
            f"alpha={m.alpha:g} scale={m.scale:g} bias={m.bias is not None} "
            f"mask={m.mask is not None}",
        )
        rewrites += 1
    return rewrites


def _erase_dead(nodes: list[fx.Node], graph: fx.Graph) -> None:
    """Erase ``nodes`` (all pure) that lost their users, users first."""
    pending = list(dict.fromkeys(nodes))
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if node.graph is graph and not node.users:
                inputs = [a for a in node.all_input_nodes if is_target(a, *_VIEW_LIKE)]
                graph.erase_node(node)
                pending.remove(node)
                pending.extend(i for i in inputs if i not in pending)
                changed = True


PASS = GraphPass(
    name="hstu_attention",
    stage="joint",
    fn=hstu_attention_pass,
    enabled=lambda cfg: cfg.attention.fuse,
    source_file=__file__,
)
