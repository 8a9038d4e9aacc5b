"""HSTU pointwise SiLU attention as one op: exact CPU reference, Triton kernel on CUDA.

HSTU (Zhai et al., "Actions Speak Louder than Words", 2024) replaces softmax attention by
a pointwise one::

    A   = silu(alpha * Q K^T + bias) * scale * mask      # (B, H, N, N), no softmax
    out = A V                                           # (B, H, N, dv)

with ``scale = 1 / N`` (N the padded history length) in the reference workload.

Two custom ops (``torch.library.custom_op``, namespace ``mmgen``), both with a fake
implementation so they trace and compile:

- ``mmgen::hstu_attention(q, k, v, bias, mask, alpha, scale)``: dense padded tensors,
  ``q, k (B, H, N, d)``, ``v (B, H, N, dv)``, ``bias`` and ``mask`` broadcastable to
  ``(B, H, N, N)`` (``mask`` bool: keep where True; float: multiplied). This is what
  ``passes/hstu_attention.py`` emits; it has exactly the graph's semantics.
- ``mmgen::hstu_attention_jagged(q, k, v, offsets, max_seq_len, bias, alpha, scale,
  causal)``: jagged tensors ``q, k (T, H, d)``, ``v (T, H, dv)`` where sequence ``b`` owns
  rows ``offsets[b]:offsets[b+1]`` (``offsets (B+1,)``); keys beyond a sequence's length
  do not exist, so nothing is padded; ``causal`` masks keys after the query. ``bias`` is
  dense, indexed by in-sequence positions: ``(B or 1, H or 1, max_seq_len, max_seq_len)``.

Implementations:

- default (CPU and any device): the reference, the same aten ops in the same order as the
  eager model (matmul, silu, scale, mask, matmul), so it agrees with eager to rounding.
- CUDA with Triton: one kernel for both layouts. A program owns ``BLOCK_M`` query rows of
  one (sequence, head) and loops over key blocks: scores live in registers only, the
  ``(N, N)`` score matrix is never written to memory; key blocks past the sequence's
  length (jagged) or above the diagonal (causal) are not visited. Head dims up to 256.

Importing this module needs neither Triton nor CUDA.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

log = logging.getLogger("torch_mmgen_opt")

try:  # Triton ships with CUDA builds of torch; CPU builds have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = [
    "HAS_TRITON",
    "hstu_attention",
    "hstu_attention_jagged",
    "hstu_attention_reference",
    "hstu_attention_jagged_reference",
    "jagged_to_padded",
    "padded_to_jagged",
]

HAS_TRITON = triton is not None
_MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------ reference


def hstu_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    alpha: float = 1.0,
    scale: float = 1.0,
) -> Tensor:
    """Dense HSTU attention, op for op as eager code writes it.

    Args:
        q, k: (B, H, N, d). v: (B, H, N, dv).
        bias: additive, broadcastable to (B, H, N, N), added after ``alpha``.
        mask: broadcastable to (B, H, N, N); bool keeps where True, float multiplies.
    Returns:
        (B, H, N, dv) in ``q``'s dtype.
    """
    s = torch.matmul(q, k.transpose(-1, -2))  # (B, H, N, N)
    if alpha != 1.0:
        s = s * alpha
    if bias is not None:
        s = s + bias
    a = torch.nn.functional.silu(s) * scale
    if mask is not None:
        a = torch.where(mask, a, 0.0) if mask.dtype == torch.bool else a * mask
    return torch.matmul(a, v)


def jagged_to_padded(values: Tensor, offsets: Tensor, max_seq_len: int) -> Tensor:
    """(T, *rest) jagged rows -> (B, max_seq_len, *rest), zeros past each length."""
    B = offsets.numel() - 1
    pos = torch.arange(max_seq_len, device=values.device)
    idx = offsets[:-1, None] + pos[None, :]  # (B, N) row of each padded slot
    valid = pos[None, :] < (offsets[1:] - offsets[:-1])[:, None]
    idx = torch.where(valid, idx, 0).clamp(max=max(values.shape[0] - 1, 0))
    out = values[idx.reshape(-1)].reshape(B, max_seq_len, *values.shape[1:])
    return out * valid.reshape(B, max_seq_len, *([1] * (values.dim() - 1))).to(out.dtype)


def padded_to_jagged(padded: Tensor, offsets: Tensor, total: int) -> Tensor:
    """(B, N, *rest) -> (T, *rest): the inverse of :func:`jagged_to_padded` on valid rows."""
    B, N = padded.shape[:2]
    rows = torch.arange(total, device=padded.device)
    # (T,) sequence id: offsets <= row, less one. The whole offsets tensor is searched, not
    # offsets[1:]: Inductor in torch < 2.13 drops a sliced view's storage offset in its
    # CUDA bucketize (pytorch/pytorch#182343), which shifted every row of a sequence
    # shorter than N (measured on an H100, torch 2.11: up to 3.5 off).
    seq = torch.searchsorted(offsets, rows, right=True) - 1
    pos = rows - offsets[seq]
    return padded.reshape(B * N, *padded.shape[2:])[seq * N + pos]


def hstu_attention_jagged_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    max_seq_len: int,
    bias: Tensor | None = None,
    alpha: float = 1.0,
    scale: float | None = None,
    causal: bool = True,
) -> Tensor:
    """Jagged HSTU attention by padding, :func:`hstu_attention_reference`, unpadding.

    Args:
        q, k: (T, H, d); v: (T, H, dv); offsets: (B+1,) int64, ``offsets[-1] == T``.
        max_seq_len: N, at least the longest sequence.
        bias: (B or 1, H or 1, N, N) over in-sequence positions.
        scale: default ``1 / max_seq_len``.
    Returns:
        (T, H, dv).
    """
    N = max_seq_len
    scale = 1.0 / N if scale is None else scale
    qp, kp, vp = (jagged_to_padded(t, offsets, N).transpose(1, 2) for t in (q, k, v))
    lengths = offsets[1:] - offsets[:-1]
    pos = torch.arange(N, device=q.device)
    mask = (pos[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, N) valid keys
    if causal:
        mask = mask & (pos[None, :] <= pos[:, None])  # (B, 1, N, N)
    out = hstu_attention_reference(qp, kp, vp, bias, mask, alpha, scale)  # (B, H, N, dv)
    return padded_to_jagged(out.transpose(1, 2), offsets, q.shape[0])


# ------------------------------------------------------------------------ Triton


if HAS_TRITON:

    @triton.jit
    def _hstu_attn_fwd(
        Q, K, V, Bias, Mask, Out, Offsets,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
        sbb, sbh, sbm, sbn, smb, smh, smm, smn,
        H, N, alpha, scale,
        D: tl.constexpr, DV: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        JAGGED: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        if JAGGED:
            start = tl.load(Offsets + b).to(tl.int64)
            L = (tl.load(Offsets + b + 1) - start).to(tl.int32)
        else:
            start = 0
            L = N
        if pid_m * BLOCK_M >= L:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < L
        q_ptrs = (Q + b.to(tl.int64) * sqb + h * sqh + (start + offs_m[:, None]) * sqt
                  + offs_d[None, :])
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
        hi = L
        if CAUSAL:
            hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < L
            k_ptrs = (K + b.to(tl.int64) * skb + h * skh + (start + offs_n[None, :]) * skt
                      + offs_d[:, None])
            kt = tl.load(k_ptrs, mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * alpha
            valid = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            if HAS_BIAS:
                b_ptrs = (Bias + b.to(tl.int64) * sbb + h * sbh + offs_m[:, None].to(tl.int64) * sbm
                          + offs_n[None, :] * sbn)
                s = s + tl.load(b_ptrs, mask=valid, other=0.0).to(tl.float32)
            p = s * tl.sigmoid(s) * scale
            if HAS_MASK:
                m_ptrs = (Mask + b.to(tl.int64) * smb + h * smh + offs_m[:, None].to(tl.int64) * smm
                          + offs_n[None, :] * smn)
                p = p * tl.load(m_ptrs, mask=valid, other=0).to(tl.float32)
            p = tl.where(valid, p, 0.0)
            v_ptrs = (V + b.to(tl.int64) * svb + h * svh + (start + offs_n[:, None]) * svt
                      + offs_dv[None, :])
            v = tl.load(v_ptrs, mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            if IEEE:
                acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc += tl.dot(p.to(v.dtype), v)
        o_ptrs = (Out + b.to(tl.int64) * sob + h * soh + (start + offs_m[:, None]) * sot
                  + offs_dv[None, :])
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


def _triton_ok(*tensors: Tensor) -> bool:
    q, v = tensors[0], tensors[2]
    return (
        HAS_TRITON
        and all(t.is_cuda for t in tensors)
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and all(t.dtype == q.dtype for t in tensors[:3])
        and q.shape[-1] <= _MAX_HEAD_DIM
        and v.shape[-1] <= _MAX_HEAD_DIM
        and all(t.stride(-1) == 1 for t in tensors[:3])
    )


@functools.lru_cache(maxsize=8)
def _warn_fallback(reason: str) -> None:
    """One warning per distinct failure: the Triton kernel could not run, the exact
    reference runs instead (slower, same result)."""
    log.warning("HSTU Triton kernel unavailable (%s); running the reference", reason[:300])


def _bias_mask_strides(t: Tensor | None, shape: tuple[int, ...]) -> tuple[Tensor | None, tuple]:
    if t is None:
        return None, (0, 0, 0, 0)
    t = t.expand(shape)  # size-1 dims get stride 0: broadcast without a copy
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t, tuple(t.stride())


def _launch(q, k, v, out, offsets, bias, mask, B, H, N, alpha, scale, causal):
    """q/k/v/out as (B, H, rows, d) strided views; with ``offsets`` (jagged) they are
    (1, H, T, d) views whose batch stride is ignored: sequence b starts at row offsets[b]."""
    D, DV = q.shape[-1], v.shape[-1]
    jagged = offsets is not None
    bias, bstr = _bias_mask_strides(bias, (B, H, N, N))
    mask, mstr = _bias_mask_strides(mask, (B, H, N, N))

    def strides(t: Tensor) -> tuple[int, int, int]:
        return (0 if jagged else t.stride(0), t.stride(1), t.stride(2))

    BLOCK_M, BLOCK_N = (64, 64) if max(D, DV) <= 128 else (32, 32)
    grid = (triton.cdiv(N, BLOCK_M), B * H)
    ieee = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    _hstu_attn_fwd[grid](
        q, k, v, bias if bias is not None else q, mask if mask is not None else q, out,
        offsets if jagged else q,
        *strides(q), *strides(k), *strides(v), *strides(out),
        *bstr, *mstr,
        H, N, float(alpha), float(scale),
        D=D, DV=DV,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        JAGGED=jagged, CAUSAL=causal, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
        IEEE=ieee, num_warps=4, num_stages=2,
    )
    return out


def _triton_dense(q, k, v, bias, mask, alpha, scale):
    B, H, N, _ = q.shape
    out = q.new_empty(B, H, N, v.shape[-1])
    return _launch(q, k, v, out, None, bias, mask, B, H, N, alpha, scale, False)


def _triton_jagged(q, k, v, offsets, max_seq_len, bias, alpha, scale, causal):
    T, H, _ = q.shape
    B = offsets.numel() - 1
    out = q.new_empty(T, H, v.shape[-1])
    # (T, H, d) -> (1, H, T, d) views; rows of sequence b start at offsets[b].
    q4, k4, v4, o4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v, out))
    _launch(q4, k4, v4, o4, offsets.contiguous(), bias, None, B, H, max_seq_len, alpha, scale,
            causal)
    return out


# ------------------------------------------------------------------------ custom ops


@torch.library.custom_op("mmgen::hstu_attention", mutates_args=())
def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    alpha: float,
    scale: float,
) -> Tensor:
    """Dense HSTU attention (see the module docstring); (B, H, N, dv)."""
    return hstu_attention_reference(q, k, v, bias, mask, alpha, scale).contiguous()


@hstu_attention.register_fake
def _hstu_attention_fake(q, k, v, bias, mask, alpha, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@hstu_attention.register_kernel("cuda")
def _hstu_attention_cuda(q, k, v, bias, mask, alpha, scale):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    tensors = [q, k, v] + [t for t in (bias,) if t is not None]
    same_bh = q.shape[:2] == k.shape[:2] == v.shape[:2] and q.shape[2] == k.shape[2]
    if _triton_ok(*tensors) and same_bh and q.shape[2] == v.shape[2]:
        try:
            return _triton_dense(q, k, v, bias, mask, alpha, scale)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot build must not break
            _warn_fallback(f"{type(exc).__name__}: {exc}")
    return hstu_attention_reference(q, k, v, bias, mask, alpha, scale).contiguous()


@torch.library.custom_op("mmgen::hstu_attention_jagged", mutates_args=())
def hstu_attention_jagged(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    max_seq_len: int,
    bias: Tensor | None = None,
    alpha: float = 1.0,
    scale: float | None = None,
    causal: bool = True,
) -> Tensor:
    """Jagged HSTU attention (see the module docstring); (T, H, dv)."""
    return hstu_attention_jagged_reference(
        q, k, v, offsets, max_seq_len, bias, alpha, scale, causal
    ).contiguous()


@hstu_attention_jagged.register_fake
def _hstu_attention_jagged_fake(
    q, k, v, offsets, max_seq_len, bias=None, alpha=1.0, scale=None, causal=True
):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@hstu_attention_jagged.register_kernel("cuda")
def _hstu_attention_jagged_cuda(
    q, k, v, offsets, max_seq_len, bias=None, alpha=1.0, scale=None, causal=True
):
    scale = 1.0 / max_seq_len if scale is None else scale
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    tensors = [q, k, v] + [t for t in (bias,) if t is not None]
    if _triton_ok(*tensors):
        try:
            return _triton_jagged(q, k, v, offsets, max_seq_len, bias, alpha, scale, causal)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot build must not break
            _warn_fallback(f"{type(exc).__name__}: {exc}")
    return hstu_attention_jagged_reference(
        q, k, v, offsets, max_seq_len, bias, alpha, scale, causal
    ).contiguous()
