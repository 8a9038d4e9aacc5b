"""A Llama-style decoder written the way eager baseline code is written in the wild.

RMSNorm, rotary embeddings, grouped-query attention through ``repeat_kv``, SwiGLU. The
attention is explicit ``matmul -> / sqrt(d) -> + mask -> softmax(float32) -> matmul`` and
the default KV cache grows by ``torch.cat``: that is what the passes must handle.

Cache conventions accepted by :meth:`Llama.forward` (``past_key_values``):

- ``None`` or a list of ``(k, v)`` pairs, one per layer, each ``(B, n_kv_heads, S, hd)``:
  the eager growing cache; the new list is returned.
- an object with the Hugging Face ``Cache`` protocol, ``update(k, v, layer_idx,
  cache_kwargs) -> (k_all, v_all)`` and ``get_max_cache_shape()``: a static cache. The
  keys it returns span its whole length; the mask built from ``cache_position`` hides the
  slots not written yet. The same object is returned.

Shapes: ``B`` batch, ``T`` new tokens, ``S`` key length, ``nh`` heads, ``hd`` head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Llama", "LlamaConfig", "LMOutput", "SIZES", "build_model"]


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 172
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    qk_norm: bool = False  # Chameleon normalises q and k per head before RoPE
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"dim ({self.dim}) must divide by n_heads ({self.n_heads}) and n_heads by "
                f"n_kv_heads ({self.n_kv_heads})"
            )


SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=172),
    # ~110M parameters, ~220 MB in bf16: far beyond a 32 MB L3, so decode is memory-bound.
    "small": dict(
        vocab_size=8192, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_hidden=2816
    ),
    "7b": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008,
        max_seq_len=4096,
    ),
    "8b": dict(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
        rope_theta=500000.0, max_seq_len=8192,
    ),
}


class LMOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab)
    past_key_values: Any


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``position_ids`` (B, T): each (B, T, hd), computed in float32."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, S, hd) -> (B, n_kv * n_rep, S, hd), the usual expand + reshape."""
    if n_rep == 1:
        return x
    b, n_kv, s, hd = x.shape
    return x[:, :, None, :, :].expand(b, n_kv, n_rep, s, hd).reshape(b, n_kv * n_rep, s, hd)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past: Any,
        cache_position: torch.Tensor,
    ) -> tuple[torch.Tensor, Any]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        if past is None:
            new_past = (k, v)
        elif isinstance(past, tuple):  # growing cache
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
            new_past = (k, v)
        else:  # HF-protocol cache object
            k, v = past.update(k, v, self.layer_idx, {"cache_position": cache_position})
            new_past = None

        k = repeat_kv(k, self.n_heads // self.n_kv_heads)  # (B, nh, S, hd)
        v = repeat_kv(v, self.n_heads // self.n_kv_heads)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)  # (B, nh, T, S)
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
        out = torch.matmul(probs, v)  # (B, nh, T, hd)
        out = out.transpose(1, 2).contiguous().view(B, T, -1)
        return self.o_proj(out), new_past


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past, cache_position):
        h, new_past = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, cache_position)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_past


class Llama(nn.Module):
    """Decoder-only LM. ``forward`` returns :class:`LMOutput` ``(logits, past_key_values)``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: Any = None,
        cache_position: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """
        Args:
            input_ids: (B, T) token ids.
            past_key_values: see the module docstring.
            cache_position: (T,) absolute positions of the new tokens; default continues
                after the cached tokens.
            attention_mask: (B, S) 1 for real tokens, 0 for padding, over every key
                position (cached and new); ``None`` means no padding.
            position_ids: (B, T) RoPE positions; default ``cache_position``.
        """
        B, T = input_ids.shape
        static = past_key_values is not None and not isinstance(past_key_values, (list, tuple))
        if static:
            S = past_key_values.get_max_cache_shape()
            past_len = None
        else:
            past_len = 0 if not past_key_values else past_key_values[0][0].shape[2]
            S = past_len + T
        if cache_position is None:
            if static:
                raise ValueError("a static cache needs cache_position (T,) of the new tokens")
            cache_position = torch.arange(past_len, past_len + T, device=input_ids.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0).expand(B, T)

        x = self.embed_tokens(input_ids)  # (B, T, dim)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = self._mask(cache_position, S, attention_mask, x.dtype, need=static or T > 1)

        new_cache = [] if not static else past_key_values
        for i, layer in enumerate(self.layers):
            past = past_key_values if static else (past_key_values[i] if past_key_values else None)
            x, layer_past = layer(x, cos, sin, mask, past, cache_position)
            if not static:
                new_cache.append(layer_past)
        logits = self.lm_head(self.norm(x))
        return LMOutput(logits, new_cache)

    @staticmethod
    def _mask(
        cache_position: torch.Tensor,
        S: int,
        attention_mask: torch.Tensor | None,
        dtype: torch.dtype,
        need: bool,
    ) -> torch.Tensor | None:
        """Additive mask (B or 1, 1, T, S): 0 where a query may attend, dtype-min elsewhere."""
        if attention_mask is None and not need:
            return None  # one new token, no padding: it may see every cached key
        key_pos = torch.arange(S, device=cache_position.device)
        allowed = key_pos[None, :] <= cache_position[:, None]  # (T, S)
        allowed = allowed[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :S].bool()
        zero = torch.zeros((), dtype=dtype, device=cache_position.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)


def build_model(size: str = "tiny", **overrides: Any) -> Llama:
    if size not in SIZES:
        raise ValueError(f"unknown llama size {size!r}; pass one of {sorted(SIZES)}")
    known = {f.name for f in fields(LlamaConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown LlamaConfig field(s) {unknown}; known: {sorted(known)}")
    return Llama(LlamaConfig(**{**SIZES[size], **overrides}))
