"""HSTU (Hierarchical Sequential Transduction Units) over jagged user histories, written the
way eager reference code is written in the wild.

Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers
for Generative Recommendations" (ICML 2024). Each block, on jagged rows ``x (T, D)``::

    U, V, Q, K = split(silu(W_uvqk · LayerNorm(x)))          # per head: dv, dv, dqk, dqk
    A = silu(Q K^T + rab) / N * mask                          # (B, H, N, N), no softmax
    x = x + W_o · (LayerNorm(A V) * U)

``rab`` is a relative bias shared by the heads: a learned weight per (bucketed) position
distance plus a learned weight per log-bucketed timestamp difference. ``mask`` is causal
and hides keys past each history's length. The normaliser ``N`` is ``max_seq_len``, the
padded history length (as in the paper and its reference code), not each sequence's own
length: the op stays a scalar multiply and a history's output does not depend on padding
of others (every batch is padded to the same ``N``).

Inputs are jagged: ``values (T, D)`` holds the histories back to back and
``offsets (B+1,)`` where history ``b`` is ``values[offsets[b]:offsets[b+1]]``;
``timestamps (T,)`` (seconds, optional). Attention pads Q, K, V to ``(B, H, N, d)`` with a
gather, computes explicit matmul / SiLU / mask / matmul, and gathers the valid rows back:
exactly what ``passes/hstu_attention.py`` fuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.hstu import jagged_to_padded, padded_to_jagged

__all__ = ["HSTU", "HSTUConfig", "SIZES", "build_model", "example_batch"]


@dataclass
class HSTUConfig:
    dim: int = 64  # D: item/action embedding width
    n_layers: int = 2
    n_heads: int = 2
    attn_dim: int = 32  # per-head width of Q and K
    hidden_dim: int = 32  # per-head width of V and U
    max_seq_len: int = 64  # N: histories are padded to this length
    num_time_buckets: int = 64
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "attn_dim", "hidden_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"HSTUConfig.{name} must be >= 1, got {getattr(self, name)}")


SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=2, attn_dim=32, hidden_dim=32, max_seq_len=64),
    # CPU benchmark: 512-long histories, (B, 4, 512, 512) scores per layer.
    "small": dict(dim=256, n_layers=4, n_heads=4, attn_dim=64, hidden_dim=64, max_seq_len=512),
    # GPU: 8192-long histories (the long-sequence regime HSTU targets).
    "large": dict(
        dim=512, n_layers=4, n_heads=4, attn_dim=128, hidden_dim=128, max_seq_len=8192,
        num_time_buckets=128,
    ),
}


class RelativeBucketedTimeAndPositionBias(nn.Module):
    """rab (B, 1, N, N): position-distance weight + log-bucketed time-difference weight."""

    def __init__(self, max_seq_len: int, num_time_buckets: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.num_time_buckets = num_time_buckets
        self.pos_weights = nn.Parameter(torch.empty(2 * max_seq_len - 1).normal_(std=0.02))
        self.time_weights = nn.Parameter(torch.empty(num_time_buckets + 1).normal_(std=0.02))

    def forward(self, timestamps: torch.Tensor) -> torch.Tensor:
        """timestamps: (B, N) float, padded. Returns (B, 1, N, N)."""
        N = self.max_seq_len
        pos = torch.arange(N, device=timestamps.device)
        rel = pos[None, :] - pos[:, None] + (N - 1)  # (N, N): key - query, shifted >= 0
        pos_bias = self.pos_weights[rel]  # (N, N)
        dt = timestamps[:, None, :] - timestamps[:, :, None]  # (B, N, N)
        bucket = (torch.log(dt.abs().clamp(min=1.0)) / math.log(2.0)).long()
        bucket = bucket.clamp(0, self.num_time_buckets)
        time_bias = self.time_weights[bucket]  # (B, N, N)
        return (pos_bias[None] + time_bias).unsqueeze(1)


class HSTUBlock(nn.Module):
    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, dqk, dv = cfg.n_heads, cfg.attn_dim, cfg.hidden_dim
        self.input_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.uvqk = nn.Linear(cfg.dim, H * (2 * dv + 2 * dqk))
        self.rel_bias = RelativeBucketedTimeAndPositionBias(cfg.max_seq_len, cfg.num_time_buckets)
        self.attn_norm = nn.LayerNorm(H * dv, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(H * dv, cfg.dim)

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x: (T, D) jagged; timestamps: (B, N) padded; mask: (B, 1, N, N). -> (T, D)."""
        cfg = self.cfg
        T = x.shape[0]
        B, N, H = offsets.shape[0] - 1, cfg.max_seq_len, cfg.n_heads
        dqk, dv = cfg.attn_dim, cfg.hidden_dim
        h = F.silu(self.uvqk(self.input_norm(x)))  # (T, H * (2dv + 2dqk))
        u, v, q, k = torch.split(h, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        q = jagged_to_padded(q, offsets, N).view(B, N, H, dqk).transpose(1, 2)  # (B, H, N, dqk)
        k = jagged_to_padded(k, offsets, N).view(B, N, H, dqk).transpose(1, 2)
        v = jagged_to_padded(v, offsets, N).view(B, N, H, dv).transpose(1, 2)  # (B, H, N, dv)
        rab = self.rel_bias(timestamps).to(q.dtype)  # (B, 1, N, N)

        qk = torch.matmul(q, k.transpose(-1, -2))  # (B, H, N, N)
        qk = qk + rab
        attn = F.silu(qk) / N
        attn = attn * mask
        out = torch.matmul(attn, v)  # (B, H, N, dv)

        out = padded_to_jagged(out.transpose(1, 2).reshape(B, N, H * dv), offsets, T)  # (T, H*dv)
        return x + self.out_proj(self.attn_norm(out) * u)


class HSTU(nn.Module):
    """A stack of HSTU blocks. ``forward(values, offsets, timestamps)`` -> (T, D)."""

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.config = cfg
        self.layers = nn.ModuleList(HSTUBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            values: (T, D) embeddings of every history's items, back to back.
            offsets: (B+1,) int64, ``offsets[0] == 0``, ``offsets[-1] == T``; each history at
                most ``max_seq_len`` long.
            timestamps: (T,) event times in seconds; ``None`` means all equal.
        Returns:
            (T, D) contextual embeddings, jagged like ``values``.
        """
        N = self.config.max_seq_len
        B = offsets.shape[0] - 1
        if timestamps is None:
            timestamps = torch.zeros(values.shape[0], device=values.device)
        ts = jagged_to_padded(timestamps.float(), offsets, N)  # (B, N)
        lengths = offsets[1:] - offsets[:-1]
        pos = torch.arange(N, device=values.device)
        valid = pos[None, :] < lengths[:, None]  # (B, N)
        causal = pos[None, :] <= pos[:, None]  # (N, N): key <= query
        mask = (causal[None] & valid[:, None, :]).to(values.dtype).view(B, 1, N, N)
        x = values
        for layer in self.layers:
            x = layer(x, offsets, ts, mask)
        return self.final_norm(x)


def example_batch(
    cfg: HSTUConfig,
    lengths: list[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ragged batch: ``(values (T, D), offsets (B+1,), timestamps (T,))``."""
    if any(n < 1 or n > cfg.max_seq_len for n in lengths):
        raise ValueError(f"history lengths must be in [1, {cfg.max_seq_len}], got {lengths}")
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    values = torch.randn(T, cfg.dim, generator=g).to(dtype)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    # increasing event times, gaps from seconds to days
    gaps = torch.exp(torch.rand(T, generator=g) * 12.0)
    ts = torch.cat([gaps[o:e].cumsum(0) for o, e in zip(offsets[:-1], offsets[1:])])
    return values.to(device), offsets.to(device), ts.to(device)


def build_model(size: str = "tiny", **overrides: Any) -> HSTU:
    if size not in SIZES:
        raise ValueError(f"unknown hstu size {size!r}; pass one of {sorted(SIZES)}")
    known = {f.name for f in fields(HSTUConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown HSTUConfig field(s) {unknown}; known: {sorted(known)}")
    return HSTU(HSTUConfig(**{**SIZES[size], **overrides}))
