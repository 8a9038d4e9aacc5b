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

Where the code lives: this file holds the decision rule (:func:`prefer_sdpa`), the SDPA
trace and splice (``_sdpa_graph``, ``_fuse``) and the pass itself; the walk that finds
a site is in ``_attention_match.py``; the other graph edits (mask, guard, shield, node
emission, dead-node cleanup) are in ``_attention_rewrite.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from torch_mmgen_opt.graph_utils import GraphPass, PassContext, aten, is_target
from torch_mmgen_opt.passes._attention_match import (
    _match_site,
    _Reject,
    _same,
    _Site,
    _Softmax,
    _static,
    _val,
)
from torch_mmgen_opt.passes._attention_rewrite import (
    _build_mask,
    _emit,
    _erase_dead,
    _fake_mode,
    _guard,
    _shield,
)

__all__ = ["PASS", "fuse_attention", "prefer_sdpa"]

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


# --------------------------------------------------------------------------------- SDPA


# ``_fuse`` finds ``_sdpa_graph`` in this module's namespace when it runs, so replacing
# ``fuse_attention._sdpa_graph`` (tests do, to emulate a kernel without enable_gqa) takes
# effect: keep the two in the same module.
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
