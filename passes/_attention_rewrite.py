"""Graph editing for :mod:`fuse_attention`, apart from the SDPA splice itself.

- :func:`_emit` (``graph_utils.emit_node``): insert one aten node with its ``meta["val"]``,
  the building block of every rewrite;
- :func:`_build_mask`: one SDPA ``attn_mask`` from the masks a :class:`_Site` collected;
- :func:`_guard`: softmax over a non-last dim -> ``permute -> softmax(last) -> permute``
  (the correctness guard for pytorch/pytorch#196468);
- :func:`_shield`: ``squeeze(softmax(unsqueeze(X, -2)))``, which leaves a chain to
  Inductor's codegen without its ``fuse_attention`` patterns matching it;
- :func:`_erase_dead`: drop the nodes a rewrite (or a rolled-back one) left unused.

Tracing and splicing SDPA (``_sdpa_graph``, ``_fuse``) stay in ``fuse_attention.py``.
"""

from __future__ import annotations

import torch.fx as fx

from torch_mmgen_opt.graph_utils import aten, emit_node, fake_mode_of
from torch_mmgen_opt.passes._attention_match import _Site, _Softmax, _val

# ----------------------------------------------------------------------- emitting nodes

# shared with every pass that inserts nodes
_emit = emit_node
_fake_mode = fake_mode_of


# ----------------------------------------------------------------------------- the mask


def _build_mask(graph: fx.Graph, site: _Site) -> fx.Node | None:
    """One SDPA ``attn_mask`` from the collected masks (inserted before ``site.out``)."""
    s = site.scores
    additive: list[fx.Node] = []
    for mask, coef in s.additive:
        additive.append(mask if coef == 1.0 else _emit(graph, aten.mul.Tensor, (mask, coef)))
    device = _val(site.q).device
    for cond, keep_if, fill, coef, mdtype in s.finite_fills:
        kw = {"dtype": mdtype, "device": device}
        zero = _emit(graph, aten.scalar_tensor.default, (0.0,), kw, like=site.q)
        neg = _emit(graph, aten.scalar_tensor.default, (fill * coef,), kw, like=site.q)
        args = (cond, zero, neg) if keep_if else (cond, neg, zero)
        additive.append(_emit(graph, aten.where.self, args))
    keep: fx.Node | None = None
    for cond, keep_if in s.keep:
        c = cond if keep_if else _emit(graph, aten.bitwise_not.default, (cond,))
        keep = c if keep is None else _emit(graph, aten.bitwise_and.Tensor, (keep, c))
    total: fx.Node | None = None
    for m in additive:
        total = m if total is None else _emit(graph, aten.add.Tensor, (total, m))
    if total is not None and keep is not None:
        ninf = _emit(
            graph,
            aten.scalar_tensor.default,
            (float("-inf"),),
            {"dtype": _val(total).dtype, "device": device},
            like=site.q,
        )
        return _emit(graph, aten.where.self, (keep, total, ninf))
    return total if total is not None else keep


# --------------------------------------------------------------------- softmax rewrites


def _shield(graph: fx.Graph, sm: _Softmax) -> None:
    """Leave the chain to Inductor's codegen: ``squeeze(softmax(unsqueeze(X, -2)), -2)``
    computes the same reductions but no ``fuse_attention`` pattern matches it."""
    with graph.inserting_before(sm.out):
        x5 = _emit(graph, aten.unsqueeze.default, (sm.x, -2))
        out = _softmax_nodes(graph, x5, -1)
        back = _emit(graph, aten.squeeze.dim, (out, -2))
    sm.out.replace_all_uses_with(back)


def _guard(graph: fx.Graph, sm: _Softmax) -> None:
    """Softmax over non-last dim ``d`` -> ``permute -> softmax(last) -> permute``."""
    perm = list(range(sm.ndim))
    perm[sm.dim], perm[-1] = perm[-1], perm[sm.dim]
    with graph.inserting_before(sm.out):
        xp = _emit(graph, aten.permute.default, (sm.x, perm))
        out = _softmax_nodes(graph, xp, -1)
        back = _emit(graph, aten.permute.default, (out, perm))
    sm.out.replace_all_uses_with(back)


def _softmax_nodes(graph: fx.Graph, x: fx.Node, dim: int) -> fx.Node:
    amax = _emit(graph, aten.amax.default, (x, [dim], True))
    sub = _emit(graph, aten.sub.Tensor, (x, amax))
    exp = _emit(graph, aten.exp.default, (sub,))
    total = _emit(graph, aten.sum.dim_IntList, (exp, [dim], True))
    return _emit(graph, aten.div.Tensor, (exp, total))


def _erase_dead(graph: fx.Graph, candidates: set[fx.Node]) -> None:
    candidates = candidates | {
        u for n in candidates for u in n.users if not u.users and not u.is_impure()
    }
    for node in reversed(list(graph.nodes)):
        if node in candidates and not node.users and not node.is_impure():
            graph.erase_node(node)
