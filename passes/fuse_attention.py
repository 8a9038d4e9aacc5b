"""Attention fusion: eager ``matmul -> softmax -> matmul`` into ``scaled_dot_product_attention``.

Stage: ``"joint"`` (Inductor's ``joint_custom_pre_pass``), i.e. on the functional aten
graph *before* Inductor's own ``fuse_attention`` patterns run.

What it matches
---------------
Walking back from every ``bmm`` (the ``probs @ v`` product) through the forms Inductor's
decompositions give at this stage::

    view4(bmm(view3(expand(P)), view3(expand(V))))            # out (B, H, T, Dv)
    P = cast?(div(exp(sub(X, amax(X, d))), sum(exp(...), d)))  # softmax, d the last dim
    X = scores chain of, in any order and number:
          convert_element_type (the HF ``scores.float()``),
          mul/div by a Python constant (the scale),
          add(scores, mask)                 (additive float mask: causal from tril, padding),
          where(cond, scores, fill)         (masked_fill / torch.where with -inf or a
                                             finite fill such as finfo.min)
        ending at view4(bmm(view3(expand(Q)), view3(expand(K^T))))
    Q, K: optional constant scale (``q * d**-0.25``, ``k / s``) peeled off into ``scale``;
    K, V: the ``repeat_kv`` form ``view(clone(expand(unsqueeze(kv, 2))))`` is undone and
          SDPA runs with ``enable_gqa=True`` on the un-repeated (B, Hkv, S, D) tensors.

Dropout at p=0 or in eval mode leaves no node, so it matches; dropout with p>0 does not.
QK-norm (Chameleon) happens upstream of Q and K and needs nothing special.

The replacement is ``F.scaled_dot_product_attention`` traced with Inductor's decompositions
under the graph's fake mode, so the dispatcher picks the kernel it would pick in eager
(``_scaled_dot_product_flash_attention_for_cpu`` on CPU, flash / memory-efficient on
CUDA); if that trace contains no fused kernel (math fallback) the site is left alone.

Why a structural matcher and not Inductor's ``register_replacement`` patterns: the
variants multiply (scale on Q, K or scores, times div/mul, times none/additive/bool/both
masks, times casts, times repeat_kv on K and V), and each would be one traced pattern;
walking the chain once handles all orders and combinations, and knows exactly which node
disqualified a near-match, which is what ``attention_skipped`` reports.

Must not fire (left to Inductor, with ``attention_skipped`` and the reason): softmax
over a dim other than the last, scores or probabilities used outside the chain (returned
or reused), a scale that is a tensor, dropout with p>0, dtypes other than float32 /
bfloat16 / float16, devices other than CPU / CUDA.

Correctness guard (always on, whatever ``AttentionConfig`` says): stock Inductor
(torch 2.13) rewrites ``softmax(q @ k^T * s, dim=-2) @ v`` into SDPA, which normalises
over the last dim: a silently wrong result (pytorch/pytorch#196468). A decomposed softmax
over a non-last dim that feeds a ``bmm`` is rewritten here into the exactly equivalent
``permute -> softmax(last dim) -> permute``, which Inductor's patterns cannot match.

Leaving a chain to Inductor (``backend="inductor"``, or ``"auto"`` deciding so): the
softmax is wrapped as ``squeeze(softmax(unsqueeze(X, -2)))`` (free views, same
reductions) so that Inductor's own ``fuse_attention`` does not turn it into the flash
kernel behind our back; Inductor then generates its bmm + softmax code.

Decision rule (``backend="auto"``, :func:`prefer_sdpa`): measured on the CPU dev machine
(see ``docs/passes/fuse_attention.md``).

Counters (``counters["mmgen"]``): ``attention_fused``, ``attention_left_to_inductor``,
``attention_guarded``, ``attention_skipped`` (event detail: the reason).

Invariants relied on: functional aten graph with ``meta["val"]`` fake tensors on every
node (true at the joint stage and for :func:`torch_mmgen_opt.testing.aten_graph`);
softmax decomposed as ``amax/sub/exp/sum/div``; matmuls as ``expand/view/bmm/view``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from torch_mmgen_opt.graph_utils import GraphPass, PassContext, aten, is_target, prims, tensor_meta

__all__ = ["PASS", "fuse_attention", "prefer_sdpa"]

_CAST = prims.convert_element_type.default
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUPPORTED_DEVICES = ("cpu", "cuda")
_CPU_DECODE_MAX_KV = 128  # see prefer_sdpa
_FUSED_KERNELS = tuple(
    op
    for op in (
        getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None),
        getattr(aten, "_scaled_dot_product_flash_attention", None),
        getattr(aten, "_scaled_dot_product_efficient_attention", None),
        getattr(aten, "_scaled_dot_product_cudnn_attention", None),
    )
    if op is not None
)


class _Reject(Exception):
    """A near-match that cannot be proven safe; the message is the reason."""


# ----------------------------------------------------------------------------- the rule


def prefer_sdpa(
    device_type: str, dtype: torch.dtype, q_len: int | None, kv_len: int | None
) -> bool:
    """``backend="auto"``: fuse into SDPA (True) or leave the chain to Inductor (False).

    From the CPU measurements in ``docs/passes/fuse_attention.md`` (torch 2.13): at one
    query token (decode) Inductor's bmm + softmax code beat the CPU flash kernel up to
    about 128 keys; with more query tokens the flash kernel won or tied. A first bf16
    micro-benchmark (one thread, loaded machine) favoured Inductor at every key length,
    but the Llama-small decode step on a quiet machine (256+ keys, bf16) ran 1.8x faster
    fused than left to Inductor, so bf16 follows the same key-length threshold.
    On CUDA the fused kernels win. ``None`` means symbolic (a dynamic dim): a growing
    cache, so assume long.
    """
    if device_type != "cpu" or q_len != 1:
        return True
    return kv_len is None or kv_len > _CPU_DECODE_MAX_KV


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


def _fake_mode(vals: Sequence[Any]) -> Any:
    from torch._guards import detect_fake_mode

    return detect_fake_mode(vals)


def _emit(
    graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None, like: Any = None
) -> fx.Node:
    """Insert ``target(*args)`` at the current insertion point with ``meta["val"]``
    (computed under the fake mode of the tensor arguments, or of ``like``)."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    vals = fx.map_arg((args, kwargs), lambda n: n.meta["val"])
    flat = [v for v in torch.utils._pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
    mode = _fake_mode(flat or ([_val(like)] if like is not None else []))
    with mode if mode is not None else contextlib.nullcontext():
        node.meta["val"] = target(*vals[0], **vals[1])
    return node


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


# ---------------------------------------------------------------------------- rewriting


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


def _sdpa_graph(vals: Sequence[torch.Tensor], scale: float, gqa: bool) -> fx.GraphModule:
    from torch._inductor.pattern_matcher import fwd_only

    def sdpa(q, k, v, mask=None):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale,
            enable_gqa=gqa,
        )

    def sdpa_no_mask(q, k, v):
        return sdpa(q, k, v)

    mode = _fake_mode(list(vals))
    with mode if mode is not None else contextlib.nullcontext():
        return fwd_only(sdpa if len(vals) == 4 else sdpa_no_mask, list(vals))


def _fuse(graph: fx.Graph, site: _Site) -> None:
    q, k, v = site.q, site.k, site.v
    with graph.inserting_before(site.out):
        if site.k_transposed:  # permute, not transpose: the graph is already decomposed
            perm = list(range(_val(k).dim()))
            perm[-2], perm[-1] = perm[-1], perm[-2]
            k = _emit(graph, aten.permute.default, (k, perm))
        mask = _build_mask(graph, site)
        # GQA first (no repeats); if no fused kernel takes that here, the repeated k/v.
        candidates = [(site.gqa, k, v)]
        if site.gqa and site.repeated is not None:
            candidates.append((False, *site.repeated))
        replacement, reason = None, "SDPA would run its math fallback (no fused kernel)"
        for gqa, k_arg, v_arg in candidates:
            args = [q, k_arg, v_arg] + ([mask] if mask is not None else [])
            try:
                traced = _sdpa_graph([_val(a) for a in args], site.scale, gqa)
            except Exception as exc:  # noqa: BLE001 - the dispatcher refused these inputs
                reason = f"SDPA rejects these inputs: {type(exc).__name__}: {exc}"[:200]
                continue
            if any(is_target(n, *_FUSED_KERNELS) for n in traced.graph.nodes):
                replacement = traced
                break
        if replacement is None:
            raise _Reject(reason)
        if any(n.op == "get_attr" for n in replacement.graph.nodes):
            raise _Reject("the SDPA decomposition needs a tensor constant")
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in replacement.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, args))
        result = None
        for n in replacement.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = env[n.args[0]]
                break
            env[n] = graph.node_copy(n, lambda a: env[a])
    assert isinstance(result, fx.Node)
    if not _same(_val(result).shape, _val(site.out).shape):
        raise _Reject("SDPA output shape differs from the chain's")
    site.out.replace_all_uses_with(result)


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


# -------------------------------------------------------------------------------- pass


def fuse_attention(graph: fx.Graph, ctx: PassContext) -> int:
    """Rewrite every provably safe attention chain of ``graph`` (see the module docstring).

    Returns the number of sites rewritten (fused, left to Inductor or guarded).
    """
    cfg = ctx.config.attention
    rewrites = 0
    dead: set[fx.Node] = set()
    for bmm2 in [n for n in graph.nodes if is_target(n, aten.bmm.default)]:
        if bmm2 in dead:
            continue
        try:
            site = _match_site(bmm2)
        except _Reject as reject:
            if cfg.fuse:
                ctx.record("attention_skipped", bmm2, str(reject))
            continue
        if site is None:
            continue
        if isinstance(site, _Softmax):
            _guard(graph, site)
            dead.update(site.nodes)
            ctx.record("attention_guarded", bmm2, f"softmax over dim {site.dim} of {site.ndim}")
            rewrites += 1
            continue
        if not cfg.fuse:
            continue
        q = _val(site.q)
        reason = None
        if q.device.type not in _SUPPORTED_DEVICES:
            reason = f"device {q.device.type} is not supported"
        elif not (q.dtype == _val(site.k).dtype == _val(site.v).dtype == _val(site.out).dtype):
            reason = "q, k, v and the output differ in dtype"
        elif q.dtype not in _SUPPORTED_DTYPES:
            reason = f"dtype {q.dtype} is not supported"
        if reason is not None:
            ctx.record("attention_skipped", bmm2, reason)
            continue
        q_len, kv_len = _static(q.shape[-2]), _static(_val(site.v).shape[-2])
        use_sdpa = cfg.backend == "sdpa" or (
            cfg.backend == "auto" and prefer_sdpa(q.device.type, q.dtype, q_len, kv_len)
        )
        detail = f"q_len={q_len} kv_len={kv_len} {str(q.dtype).replace('torch.', '')}"
        if use_sdpa:
            before = set(graph.nodes)
            try:
                _fuse(graph, site)
            except _Reject as reject:
                _erase_dead(graph, set(graph.nodes) - before)  # roll back this site
                ctx.record("attention_skipped", bmm2, str(reject))
                continue
            dead.update(site.dead)
            ctx.record(
                "attention_fused", bmm2, detail + (" gqa" if site.gqa else "")
            )
        else:
            _shield(graph, site.softmax)
            dead.update(site.softmax.nodes)
            ctx.record("attention_left_to_inductor", bmm2, f"{cfg.backend}: {detail}")
        rewrites += 1
    _erase_dead(graph, dead)
    return rewrites


PASS = GraphPass(
    name="fuse_attention",
    stage="joint",
    fn=fuse_attention,
    # The correctness guard runs whatever AttentionConfig says.
    enabled=lambda cfg: True,
    source_file=__file__,
)
