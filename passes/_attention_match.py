"""Matching for :mod:`fuse_attention`: from a ``bmm`` back to a provably safe attention site.

This module only reads the graph. :func:`_match_site` walks from the ``probs @ v`` product
back through the decomposed softmax and the scores chain (casts, constant scales,
additive and ``where`` masks) to the ``q @ k^T`` product, peels constant scales off Q and
K and undoes ``repeat_kv``; the forms it accepts and the reasons it refuses are listed in
the docstring of ``passes/fuse_attention.py``. It returns a :class:`_Site` to fuse, a
:class:`_Softmax` over a non-last dim for the correctness guard, or ``None``, and raises
:class:`_Reject` (the message is the reason) for a near-match that cannot be proven safe.

Also here: the node helpers the rewriting side shares (:func:`_val`, :func:`_same`,
:func:`_static`, :func:`_users`, :func:`_only_user`, :func:`_const`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from torch_mmgen_opt.graph_utils import aten, is_target, prims, tensor_meta

_CAST = prims.convert_element_type.default
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


class _Reject(Exception):
    """A near-match that cannot be proven safe; the message is the reason."""


# ---------------------------------------------------------------------- small helpers


def _val(node: Any) -> torch.Tensor:
    val = tensor_meta(node)
    if val is None:
        raise _Reject(f"no tensor metadata on {node}")
    return val


def _same(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _static(v: Any) -> int | None:
    """A dim as a Python int, or None when it is symbolic."""
    return v if isinstance(v, int) else None


def _users(node: fx.Node) -> set[fx.Node]:
    """Users that matter: dead pure nodes (left by tracing, DCE'd later) are ignored."""
    return {u for u in node.users if u.users or u.op == "output" or u.is_impure()}


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return _users(node) == {user}


def _const(arg: Any) -> float | None:
    """A Python number, or a node that is a literal scalar constant; else None."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if is_target(arg, aten.scalar_tensor.default) and isinstance(arg.args[0], (int, float)):
        return float(arg.args[0])
    if (
        is_target(arg, aten.full.default)
        and list(arg.args[0]) == []
        and isinstance(arg.args[1], (int, float))
    ):
        return float(arg.args[1])
    return None


# ---------------------------------------------------------------------------- matching


@dataclasses.dataclass
class _Softmax:
    x: fx.Node  # the softmax input
    out: fx.Node  # the final div: the probabilities
    dim: int  # normalised to [0, ndim)
    ndim: int
    nodes: tuple[fx.Node, ...]  # amax, sub, exp, sum, div
    exclusive: bool  # no node of the decomposition is used outside it


def _match_softmax(div: Any) -> _Softmax | None:
    if not is_target(div, aten.div.Tensor) or len(div.args) != 2:
        return None
    exp, total = div.args
    if not (is_target(exp, aten.exp.default) and is_target(total, aten.sum.dim_IntList)):
        return None
    sub = exp.args[0]
    if total.args[0] is not exp or not is_target(sub, aten.sub.Tensor):
        return None
    x, amax = sub.args
    if not is_target(amax, aten.amax.default) or amax.args[0] is not x:
        return None
    ndim = _val(x).dim()
    dims = []
    for red in (amax, total):
        dim = list(red.args[1] if len(red.args) > 1 else red.kwargs.get("dim", ()))
        keep = red.args[2] if len(red.args) > 2 else red.kwargs.get("keepdim", False)
        if len(dim) != 1 or not keep:
            return None
        dims.append(dim[0] % ndim)
    if dims[0] != dims[1]:
        return None
    exclusive = (
        _users(x) == {amax, sub}
        and _only_user(amax, sub)
        and _only_user(sub, exp)
        and _users(exp) == {total, div}
        and _only_user(total, div)
    )
    return _Softmax(x, div, dims[0], ndim, (amax, sub, exp, total, div), exclusive)


def _unflatten(node: Any) -> tuple[fx.Node, list[fx.Node]]:
    """A bmm operand ``view3(clone?(expand(X4)))`` -> (X4 or the expand, wrapper nodes)."""
    wrappers: list[fx.Node] = []
    if not is_target(node, *_VIEWS):
        raise _Reject("3-D batched attention: no 4-D (B, H, L, D) operand to recover")
    wrappers.append(node)
    inner = node.args[0]
    if is_target(inner, aten.clone.default):
        wrappers.append(inner)
        inner = inner.args[0]
    x = inner
    if is_target(inner, aten.expand.default):
        wrappers.append(inner)
        if _same(_val(inner.args[0]).shape, _val(inner).shape):
            x = inner.args[0]  # a no-op expand; a real broadcast keeps the expand as operand
    v4, v3 = _val(x), _val(node)
    if v4.dim() != 4 or v3.dim() != 3 or not _same(v4.shape[-2:], v3.shape[-2:]):
        raise _Reject("bmm operand is not a (B, H, L, D) tensor flattened to (B*H, L, D)")
    return x, wrappers


def _peel_scale(node: fx.Node, seen: list[fx.Node]) -> tuple[fx.Node, float]:
    """Strip ``mul/div`` by constants off ``node``; returns (inner node, product)."""
    scale = 1.0
    while is_target(node, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar):
        a, b = node.args[0], node.args[1]
        c = _const(b)
        if c is None and is_target(node, aten.mul.Tensor, aten.mul.Scalar):
            a, c = b, _const(a)
        if c is None or not math.isfinite(c) or c == 0:
            break
        seen.append(node)
        scale *= 1.0 / c if is_target(node, aten.div.Tensor, aten.div.Scalar) else c
        node = a
    return node, scale


def _unrepeat_kv(node: fx.Node, seen: list[fx.Node]) -> tuple[fx.Node, int]:
    """``repeat_kv``: view(clone?(expand(unsqueeze(kv, 2), (B, Hkv, n, S, D)))) -> (kv, n)."""
    if not is_target(node, *_VIEWS):
        return node, 1
    inner = node.args[0]
    chain = [node]
    if is_target(inner, aten.clone.default):
        chain.append(inner)
        inner = inner.args[0]
    if not is_target(inner, aten.expand.default) or not is_target(
        inner.args[0], aten.unsqueeze.default
    ):
        return node, 1
    unsq = inner.args[0]
    kv, out5, out4 = unsq.args[0], _val(inner), _val(node)
    if unsq.args[1] % 5 != 2 or _val(kv).dim() != 4 or out5.dim() != 5 or out4.dim() != 4:
        return node, 1
    n_rep = out5.shape[2]
    b, hkv, s, d = _val(kv).shape
    if not isinstance(n_rep, int) or not _same(out5.shape, (b, hkv, n_rep, s, d)):
        return node, 1
    if not _same(out4.shape, (b, hkv * n_rep, s, d)):
        return node, 1
    seen += chain + [inner, unsq]
    return kv, n_rep


def _leads_to_product(node: Any, depth: int = 24) -> bool:
    """Does ``node`` reach a ``view(bmm)`` through scores-chain ops?"""
    while depth > 0 and isinstance(node, fx.Node):
        depth -= 1
        if is_target(node, *_VIEWS) and is_target(node.args[0], aten.bmm.default):
            return True
        if is_target(node, _CAST, aten.div.Tensor):
            node = node.args[0]
        elif is_target(node, aten.add.Tensor, aten.mul.Tensor):
            return any(_leads_to_product(a, depth) for a in node.args[:2])
        elif is_target(node, aten.where.self):
            return any(_leads_to_product(a, depth) for a in node.args[1:3])
        else:
            return False
    return False


@dataclasses.dataclass
class _Scores:
    product: fx.Node  # view4(bmm(q, k^T))
    scale: float = 1.0
    additive: list[tuple[fx.Node, float]] = dataclasses.field(default_factory=list)
    keep: list[tuple[fx.Node, bool]] = dataclasses.field(default_factory=list)  # (cond, keep_if)
    nodes: list[fx.Node] = dataclasses.field(default_factory=list)
    # where(cond, x, finite fill): (cond, keep_if, fill, coefficient, scores dtype there)
    finite_fills: list[tuple[fx.Node, bool, float, float, torch.dtype]] = dataclasses.field(
        default_factory=list
    )


def _parse_scores(x: fx.Node, shape: Sequence[Any]) -> _Scores:
    """Walk from the softmax input back to ``view4(bmm(...))``, collecting scale and masks."""
    node: Any = x
    outer = 1.0  # product of the scales applied after (outside) the current node
    parsed = _Scores(product=x)
    while True:
        if not isinstance(node, fx.Node):
            raise _Reject("scores chain ends in a constant")
        if node is not x and len(_users(node)) != 1:
            raise _Reject(f"attention scores ({node.name}) are used outside the chain")
        if is_target(node, *_VIEWS) and is_target(node.args[0], aten.bmm.default):
            parsed.product = node
            parsed.scale = outer
            return parsed
        parsed.nodes.append(node)
        if is_target(node, _CAST):
            if node.args[1] not in (torch.float32,) and _val(node).dtype != _val(node.args[0]).dtype:
                raise _Reject(f"scores cast to {node.args[1]} (only upcasts are fused)")
            node = node.args[0]
        elif is_target(node, aten.mul.Tensor, aten.div.Tensor):
            a, b = node.args[0], node.args[1]
            if is_target(node, aten.mul.Tensor) and not _leads_to_product(a):
                a, b = b, a
            if not _leads_to_product(a):
                raise _Reject(f"{node.name}: scale on the wrong side of a division")
            c = _const(b)
            if c is None:
                raise _Reject(f"scale {getattr(b, 'name', b)!r} is a tensor, not a constant")
            if not math.isfinite(c) or c <= 0:
                raise _Reject(f"scale {c} is not a finite positive number")
            outer *= 1.0 / c if is_target(node, aten.div.Tensor) else c
            node = a
        elif is_target(node, aten.add.Tensor):
            if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
                raise _Reject(f"{node.name}: add with alpha")
            a, b = node.args
            la, lb = _leads_to_product(a), _leads_to_product(b)
            if la == lb:
                raise _Reject(f"{node.name}: cannot tell the scores from the mask")
            chain, mask = (a, b) if la else (b, a)
            if not isinstance(mask, fx.Node) or _val(mask).dtype == torch.bool:
                raise _Reject(f"{node.name}: additive mask is not a float tensor")
            if not _same(_val(node).shape, shape):
                raise _Reject(f"{node.name}: mask broadcasts the scores to a larger shape")
            parsed.additive.append((mask, outer))
            node = chain
        elif is_target(node, aten.where.self):
            cond, a, b = node.args
            if _leads_to_product(cond):
                raise _Reject(f"{node.name}: mask condition depends on the scores")
            la, lb = _leads_to_product(a), _leads_to_product(b)
            if la == lb:
                raise _Reject(f"{node.name}: cannot tell the scores from the fill value")
            keep_if = la  # where(cond, scores, fill): keep where cond is True
            chain, fill = (a, b) if la else (b, a)
            c = _const(fill)
            if c is None:
                raise _Reject(f"{node.name}: fill value is a tensor")
            if not _same(_val(node).shape, shape):
                raise _Reject(f"{node.name}: mask broadcasts the scores to a larger shape")
            if isinstance(fill, fx.Node):
                parsed.nodes.append(fill)  # the scalar_tensor constant dies with the chain
            if c == float("-inf"):
                parsed.keep.append((cond, keep_if))
            elif math.isfinite(c):
                parsed.finite_fills.append((cond, keep_if, c, outer, _val(node).dtype))
            else:
                raise _Reject(f"{node.name}: fill value {c}")
            node = chain
        else:
            raise _Reject(f"unsupported op {node.target} between the two products")


@dataclasses.dataclass
class _Site:
    out: fx.Node  # view4(bmm(P, V)), replaced by the SDPA output
    softmax: _Softmax
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    gqa: bool
    scores: _Scores
    dead: list[fx.Node]  # nodes that die once ``out`` is replaced
    k_transposed: bool = False  # ``k`` is K^T in another layout: transpose it back
    repeated: tuple[fx.Node, fx.Node] | None = None  # GQA: the repeat_kv'd k, v (fallback)


def _match_site(bmm2: fx.Node) -> _Site | _Softmax | None:
    """``None``: not attention; a ``_Softmax`` over a non-last dim: guard it; a ``_Site``:
    fuse it. Raises ``_Reject`` for a near-match that cannot be proven safe."""
    p3, v3 = bmm2.args
    # Probabilities side: view3(expand(cast*(softmax))).
    if not is_target(p3, *_VIEWS):
        return None
    node = p3.args[0]
    probs_nodes = [p3]
    if is_target(node, aten.expand.default):
        probs_nodes.append(node)
        node = node.args[0]
    while is_target(node, _CAST, aten.clone.default):
        probs_nodes.append(node)
        node = node.args[0]
    softmax = _match_softmax(node)
    if softmax is None:
        if is_target(node, aten.mul.Tensor) and any(
            _match_softmax(a) is not None for a in node.args[:2]
        ):
            raise _Reject("dropout with p > 0 on the probabilities")
        return None
    if softmax.dim != softmax.ndim - 1:
        return softmax
    if softmax.ndim != 4:
        raise _Reject("3-D batched attention: no 4-D (B, H, L, D) operand to recover")
    if not softmax.exclusive:
        raise _Reject("softmax intermediates are used outside the chain")
    for a, b in zip(probs_nodes[1:] + [softmax.out], probs_nodes):
        if not _only_user(a, b):
            raise _Reject(f"attention probabilities ({a.name}) are returned or reused")
    if len(_users(bmm2)) != 1:
        raise _Reject("the attention product is used in 3-D form")
    out = next(iter(_users(bmm2)))
    if not is_target(out, *_VIEWS) or _val(out).dim() != 4:
        raise _Reject("the attention product is not viewed back to (B, H, T, Dv)")
    if not _only_user(p3, bmm2):
        raise _Reject("attention probabilities are reused")

    shape = _val(softmax.x).shape
    scores = _parse_scores(softmax.x, shape)
    bmm1 = scores.product.args[0]
    if not _only_user(bmm1, scores.product) or (
        scores.product is not softmax.x and len(_users(scores.product)) != 1
    ):
        raise _Reject("raw attention scores are used outside the chain")

    dead = [out, bmm2, *probs_nodes, *softmax.nodes, *scores.nodes, scores.product, bmm1]
    q3, kt3 = bmm1.args
    q, q_wrap = _unflatten(q3)
    kt, k_wrap = _unflatten(kt3)
    v, v_wrap = _unflatten(v3)
    dead += q_wrap + k_wrap + v_wrap
    q, q_scale = _peel_scale(q, dead)
    kt, kt_scale = _peel_scale(kt, dead)
    scale = scores.scale * q_scale * kt_scale
    k = kt
    if is_target(kt, aten.permute.default):
        perm = list(kt.args[1])
        if perm == [0, 1, 3, 2]:
            dead.append(kt)
            k = kt.args[0]
            k, k_scale = _peel_scale(k, dead)
            scale *= k_scale
        else:
            k = None  # a transposing permute of another layout: re-permute below
    else:
        k = None
    k_rep = v_rep = 1
    if k is not None:
        k_kv, k_rep = _unrepeat_kv(k, [])
        v_kv, v_rep = _unrepeat_kv(v, [])
        if k_rep == v_rep and k_rep > 1:
            _unrepeat_kv(k, dead)
            _unrepeat_kv(v, dead)
            repeated = (k, v)
            k, v = k_kv, v_kv
    gqa = k_rep > 1 and k_rep == v_rep
    site = _Site(out, softmax, q, kt if k is None else k, v, scale, gqa, scores, dead, k is None)
    if gqa:
        site.repeated = repeated
    return site
