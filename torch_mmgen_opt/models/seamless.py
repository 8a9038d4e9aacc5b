"""A Seamless-style speech-to-speech translation pipeline, written as eager code in the wild.

Four stages, one call (``model(fbank, fbank_lengths) -> (text_tokens, waveform)``):

1. speech encoder: two stride-2 ``Conv1d`` over 80-dim filterbank frames (4x fewer
   frames), sinusoidal positions, Conformer blocks (half FFN, self-attention, depthwise
   convolution module, half FFN);
2. text decoder (NLLB-like): self-attention over a growing ``torch.cat`` cache,
   cross-attention over the encoder output (its K/V computed on the first step and
   kept), untied LM head; driven by :func:`beam_search`;
3. text-to-unit (non-autoregressive): the decoder is run once more over the chosen
   hypothesis; its hidden states go through a Transformer encoder, a duration predictor,
   ``repeat_interleave`` by the predicted durations, a Transformer decoder and a unit
   classifier (argmax units);
4. HiFi-GAN unit vocoder under ``weight_norm`` (``models/seamless_vocoder.py``).

Attention is explicit ``matmul -> scale -> masked_fill -> softmax -> matmul``. Every stage
accepts padding (``lengths`` / boolean masks) the way a batched implementation does:
padded frames are zeroed before each convolution and masked as attention keys, so a
padded input gives the unpadded input's result on its valid part. ``translate`` runs one
utterance (batch 1), as the published inference does.

Shapes: ``B`` batch, ``T`` frames, ``S`` encoder length, ``L`` text length, ``U`` units,
``nh`` heads, ``hd`` head dim, ``K`` beams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .seamless_vocoder import UnitVocoder

__all__ = ["SIZES", "Seamless", "SeamlessConfig", "beam_select", "build_model"]


@dataclass
class SeamlessConfig:
    n_mels: int = 80
    enc_dim: int = 64
    enc_layers: int = 2
    enc_heads: int = 4
    enc_ffn: int = 128
    conv_kernel: int = 7
    dec_dim: int = 64
    dec_layers: int = 2
    dec_heads: int = 4
    dec_ffn: int = 128
    vocab_size: int = 256
    t2u_layers: int = 1  # encoder layers and decoder layers each
    t2u_ffn: int = 128
    unit_vocab: int = 100
    max_duration: int = 4
    voc_embed: int = 32
    voc_channels: int = 64
    upsample_rates: tuple[int, ...] = (4, 4)
    resblock_kernels: tuple[int, ...] = (3, 7)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3), (1, 3))
    beam_size: int = 3
    max_new_tokens: int = 12
    length_penalty: float = 1.0
    bos_id: int = 0
    eos_id: int = 2
    max_positions: int = 4096

    def __post_init__(self) -> None:
        if self.enc_dim % self.enc_heads or self.dec_dim % self.dec_heads:
            raise ValueError("enc_dim / dec_dim must divide by enc_heads / dec_heads")
        if self.beam_size < 1 or self.beam_size > self.vocab_size:
            raise ValueError(f"beam_size must be in [1, vocab_size], got {self.beam_size}")


SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},
    # CPU benchmark: ~60M parameters.
    "small": dict(
        enc_dim=512, enc_layers=4, enc_heads=8, enc_ffn=2048, conv_kernel=15,
        dec_dim=512, dec_layers=6, dec_heads=8, dec_ffn=2048, vocab_size=8192,
        t2u_layers=2, t2u_ffn=2048, unit_vocab=1000, voc_embed=128, voc_channels=256,
        upsample_rates=(5, 4, 4, 2), resblock_kernels=(3, 7, 11),
        resblock_dilations=((1, 3, 5),) * 3, beam_size=4, max_new_tokens=24,
    ),
    # Published SeamlessM4T v2 large shapes (random weights; GPU).
    "large": dict(
        enc_dim=1024, enc_layers=24, enc_heads=16, enc_ffn=4096, conv_kernel=31,
        dec_dim=1024, dec_layers=24, dec_heads=16, dec_ffn=8192, vocab_size=256_102,
        t2u_layers=6, t2u_ffn=8192, unit_vocab=10_000, voc_embed=1280, voc_channels=512,
        upsample_rates=(5, 4, 4, 2, 2), resblock_kernels=(3, 7, 11),
        resblock_dilations=((1, 3, 5),) * 3, beam_size=5, max_new_tokens=128,
    ),
}


def sinusoidal_table(n: int, dim: int) -> torch.Tensor:
    """(n, dim) fairseq-style sinusoidal positions (sin half, cos half)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    ang = torch.arange(n, dtype=torch.float32)[:, None] * freq[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           allowed: torch.Tensor | None) -> torch.Tensor:
    """(B, nh, Tq, hd) x (B|1, nh, S, hd) -> (B, nh, Tq, hd); ``allowed`` broadcasts to
    (B, nh, Tq, S), True where a query may attend."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores.float(), dim=-1).type_as(q)
    return torch.matmul(probs, v)


class MultiheadAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> (B, nh, T, hd)"""
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """(B, nh, T, hd) -> o_proj over (B, T, dim)"""
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        k, v = self.project_kv(x)
        return self.merge(attend(self.heads(self.q_proj(x)), k, v, allowed))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "relu") -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = F.silu if act == "silu" else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------- speech encoder


class ConformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn: int, kernel: int) -> None:
        super().__init__()
        self.ffn1_ln, self.ffn1 = nn.LayerNorm(dim), FeedForward(dim, ffn, "silu")
        self.attn_ln, self.attn = nn.LayerNorm(dim), MultiheadAttention(dim, n_heads)
        self.conv_ln = nn.LayerNorm(dim)
        self.pw1 = nn.Conv1d(dim, 2 * dim, 1)
        self.dw = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.dw_ln = nn.LayerNorm(dim)
        self.pw2 = nn.Conv1d(dim, dim, 1)
        self.ffn2_ln, self.ffn2 = nn.LayerNorm(dim), FeedForward(dim, ffn, "silu")
        self.final_ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, S, dim), mask (B, S) bool valid frames."""
        x = x + 0.5 * self.ffn1(self.ffn1_ln(x))
        x = x + self.attn(self.attn_ln(x), mask[:, None, None, :])
        h = F.glu(self.pw1(self.conv_ln(x).transpose(1, 2)), dim=1)  # (B, dim, S)
        h = h * mask[:, None, :].to(h.dtype)  # padded frames must not leak through the conv
        h = self.dw_ln(self.dw(h).transpose(1, 2)).transpose(1, 2)
        x = x + self.pw2(F.silu(h)).transpose(1, 2)
        x = x + 0.5 * self.ffn2(self.ffn2_ln(x))
        return self.final_ln(x)


class SpeechEncoder(nn.Module):
    def __init__(self, cfg: SeamlessConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.enc_dim, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(cfg.enc_dim, cfg.enc_dim, 3, stride=2, padding=1)
        self.register_buffer("pos", sinusoidal_table(cfg.max_positions, cfg.enc_dim), persistent=False)
        self.layers = nn.ModuleList(
            ConformerBlock(cfg.enc_dim, cfg.enc_heads, cfg.enc_ffn, cfg.conv_kernel)
            for _ in range(cfg.enc_layers)
        )
        self.scale = math.sqrt(cfg.enc_dim)

    @staticmethod
    def out_lengths(lengths: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
        return lengths

    def forward(self, fbank: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fbank (B, T, n_mels), lengths (B,) -> (enc_out (B, S, dim), mask (B, S) bool)."""
        x = fbank.transpose(1, 2)  # (B, n_mels, T)
        for conv in (self.conv1, self.conv2):
            valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]
            x = F.gelu(conv(x * valid[:, None, :].to(x.dtype)))
            lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
        S = x.shape[-1]
        mask = torch.arange(S, device=x.device)[None, :] < lengths[:, None]  # (B, S)
        x = x.transpose(1, 2) * self.scale + self.pos[:S].to(x.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        return x, mask


# ---------------------------------------------------------------------- text decoder


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn: int) -> None:
        super().__init__()
        self.self_ln, self.self_attn = nn.LayerNorm(dim), MultiheadAttention(dim, n_heads)
        self.cross_ln, self.cross_attn = nn.LayerNorm(dim), MultiheadAttention(dim, n_heads)
        self.ffn_ln, self.ffn = nn.LayerNorm(dim), FeedForward(dim, ffn)

    def forward(self, x, past, enc_out, enc_mask, causal):
        """x (B, T, dim); past None or (k, v, ck, cv) grown by torch.cat; returns (x, past)."""
        a = self.self_attn
        h = self.self_ln(x)
        q, k, v = a.heads(a.q_proj(h)), *a.project_kv(h)
        if past is None:
            ck, cv = self.cross_attn.project_kv(enc_out)  # once per utterance
        else:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            ck, cv = past[2], past[3]
        x = x + a.merge(attend(q, k, v, causal))
        c = self.cross_attn
        q = c.heads(c.q_proj(self.cross_ln(x)))
        x = x + c.merge(attend(q, ck, cv, enc_mask[:, None, None, :]))
        x = x + self.ffn(self.ffn_ln(x))
        return x, (k, v, ck, cv)


class TextDecoder(nn.Module):
    def __init__(self, cfg: SeamlessConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dec_dim)
        nn.init.normal_(self.embed.weight, std=cfg.dec_dim ** -0.5)
        self.register_buffer("pos", sinusoidal_table(cfg.max_positions, cfg.dec_dim), persistent=False)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.dec_dim, cfg.dec_heads, cfg.dec_ffn) for _ in range(cfg.dec_layers)
        )
        self.final_ln = nn.LayerNorm(cfg.dec_dim)
        self.lm_head = nn.Linear(cfg.dec_dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=1.0)  # random weights: spread-out logits
        self.scale = math.sqrt(cfg.dec_dim)

    def forward(self, tokens, enc_out, enc_mask, past=None):
        """tokens (B, T), enc_out (B, S, dim), enc_mask (B, S) bool, past: list of per-layer
        caches or None. Returns (logits (B, T, vocab), hidden (B, T, dim), past)."""
        T = tokens.shape[1]
        start = 0 if past is None else past[0][0].shape[2]
        x = self.embed(tokens) * self.scale + self.pos[start : start + T].to(self.embed.weight.dtype)
        key_pos = torch.arange(start + T, device=tokens.device)
        causal = key_pos[None, :] <= (key_pos[start:, None])  # (T, start + T)
        new_past = []
        for i, layer in enumerate(self.layers):
            x, p = layer(x, None if past is None else past[i], enc_out, enc_mask, causal)
            new_past.append(p)
        h = self.final_ln(x)
        return self.lm_head(h), h, new_past


def beam_select(
    logits: torch.Tensor, scores: torch.Tensor, finished: torch.Tensor, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam-search step, sync-free.

    A finished beam may only extend with EOS at no cost (its score is frozen). The K best
    of the K * vocab candidates survive.

    Args:
        logits: (K, V); scores: (K,) float32 sums of log-probs; finished: (K,) bool.
    Returns:
        ``(tokens (K,), beam_idx (K,), scores (K,), finished (K,))``.
    """
    K, V = logits.shape
    logprobs = F.log_softmax(logits.float(), dim=-1)
    vocab = torch.arange(V, device=logits.device)
    eos_row = torch.where(vocab == eos_id, 0.0, float("-inf"))  # (V,)
    logprobs = torch.where(finished[:, None], eos_row[None, :], logprobs)
    top_scores, top_idx = (scores[:, None] + logprobs).view(-1).topk(K)
    beam_idx = torch.div(top_idx, V, rounding_mode="floor")
    tokens = top_idx - beam_idx * V
    return tokens, beam_idx, top_scores, finished[beam_idx] | (tokens == eos_id)


def best_hypothesis(hist: torch.Tensor, scores: torch.Tensor, eos_id: int,
                    length_penalty: float, return_row: bool = False):
    """hist (K, 1 + n) with BOS first -> the best tokens (1, L) (through its first EOS),
    scores normalised by length ** length_penalty; with ``return_row``, ``(tokens, the
    beam row they came from)``."""
    gen = hist[:, 1:]
    is_eos = gen == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, gen.shape[1])  # (K,)
    norm = scores / first.to(scores.dtype) ** length_penalty
    best = int(norm.argmax())
    tokens = gen[best : best + 1, : int(first[best])]
    return (tokens, best) if return_row else tokens


# ---------------------------------------------------------------------- text-to-unit


class T2ULayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn: int) -> None:
        super().__init__()
        self.attn_ln, self.attn = nn.LayerNorm(dim), MultiheadAttention(dim, n_heads)
        self.ffn_ln, self.ffn = nn.LayerNorm(dim), FeedForward(dim, ffn)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), None if mask is None else mask[:, None, None, :])
        return x + self.ffn(self.ffn_ln(x))


class TextToUnit(nn.Module):
    """Non-autoregressive: decoder states -> durations -> upsampled states -> units."""

    def __init__(self, cfg: SeamlessConfig) -> None:
        super().__init__()
        d = cfg.dec_dim
        self.max_duration = cfg.max_duration
        self.enc = nn.ModuleList(T2ULayer(d, cfg.dec_heads, cfg.t2u_ffn) for _ in range(cfg.t2u_layers))
        self.enc_ln = nn.LayerNorm(d)
        self.dur1, self.dur2 = nn.Linear(d, d), nn.Linear(d, 1)
        # random weights: durations spread over [1, max_duration] rather than all 1
        nn.init.normal_(self.dur2.weight, std=d ** -0.5)
        nn.init.constant_(self.dur2.bias, math.log(max(cfg.max_duration, 2) / 2) + 0.5)
        self.register_buffer("pos", sinusoidal_table(cfg.max_positions, d), persistent=False)
        self.dec = nn.ModuleList(T2ULayer(d, cfg.dec_heads, cfg.t2u_ffn) for _ in range(cfg.t2u_layers))
        self.dec_ln = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, cfg.unit_vocab)

    def encode(self, h: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, L, d) -> (states (B, L, d), durations (B, L) long in [1, max_duration]; 0
        at padded positions)."""
        for layer in self.enc:
            h = layer(h, mask)
        h = self.enc_ln(h)
        log_dur = self.dur2(F.relu(self.dur1(h))).squeeze(-1).float()
        dur = torch.clamp(torch.round(torch.exp(log_dur)), 1, self.max_duration).long()
        if mask is not None:
            dur = dur * mask.long()
        return h, dur

    def decode(self, up: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """up (B, U, d) upsampled states -> units (B, U) long."""
        x = up + self.pos[: up.shape[1]].to(up.dtype)
        for layer in self.dec:
            x = layer(x, mask)
        return self.classifier(self.dec_ln(x)).argmax(-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Batch 1, no padding: h (1, L, d) -> units (1, U)."""
        states, dur = self.encode(h, None)
        up = torch.repeat_interleave(states[0], dur[0], dim=0)[None]  # (1, U, d)
        return self.decode(up, None)


# ---------------------------------------------------------------------- the pipeline


class Seamless(nn.Module):
    """Speech in, translated text tokens and waveform out."""

    def __init__(self, cfg: SeamlessConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = SpeechEncoder(cfg)
        self.decoder = TextDecoder(cfg)
        self.t2u = TextToUnit(cfg)
        self.vocoder = UnitVocoder(
            cfg.unit_vocab, cfg.voc_embed, cfg.voc_channels, cfg.upsample_rates,
            cfg.resblock_kernels, cfg.resblock_dilations,
        )

    @torch.no_grad()
    def beam_search(self, enc_out: torch.Tensor, enc_mask: torch.Tensor) -> torch.Tensor:
        """enc_out (1, S, d) -> best tokens (1, L); growing cache, index_select reorder."""
        cfg = self.config
        K = cfg.beam_size
        enc_out, enc_mask = enc_out.expand(K, -1, -1), enc_mask.expand(K, -1)
        hist = torch.full((K, 1), cfg.bos_id, dtype=torch.long, device=enc_out.device)
        scores = torch.full((K,), float("-inf"), device=enc_out.device)
        scores[0] = 0.0
        finished = torch.zeros(K, dtype=torch.bool, device=enc_out.device)
        past = None
        for _ in range(cfg.max_new_tokens):
            logits, _, past = self.decoder(hist[:, -1:], enc_out, enc_mask, past)
            tok, beam_idx, scores, finished = beam_select(logits[:, -1], scores, finished, cfg.eos_id)
            past = [tuple(t.index_select(0, beam_idx) for t in p) for p in past]
            hist = torch.cat([hist.index_select(0, beam_idx), tok[:, None]], dim=1)
            if bool(finished.all()):
                break
        return best_hypothesis(hist, scores, cfg.eos_id, cfg.length_penalty)

    @torch.no_grad()
    def forward(self, fbank: torch.Tensor, fbank_lengths: torch.Tensor | None = None):
        """fbank (1, T, n_mels) -> (text tokens (1, L), waveform (1, U * hop))."""
        if fbank.shape[0] != 1:
            raise ValueError(f"translate one utterance at a time (batch 1), got batch {fbank.shape[0]}")
        if fbank_lengths is None:
            fbank_lengths = torch.tensor([fbank.shape[1]], device=fbank.device)
        enc_out, enc_mask = self.encoder(fbank, fbank_lengths)
        tokens = self.beam_search(enc_out, enc_mask)
        seq = torch.cat([torch.full_like(tokens[:, :1], self.config.bos_id), tokens], dim=1)
        _, hidden, _ = self.decoder(seq, enc_out, enc_mask)  # (1, L + 1, d)
        units = self.t2u(hidden)
        return tokens, self.vocoder(units)

    translate = forward

    def __mmgen_optimize__(self, config: Any) -> Any:
        """``torch_mmgen_opt.optimize(model)``: an optimized pipeline over this model's
        weights (the model itself is left as is)."""
        from ..runtime.seamless_pipeline import OptimizedSeamless

        return OptimizedSeamless(self, config)


def build_model(size: str = "tiny", **overrides: Any) -> Seamless:
    if size not in SIZES:
        raise ValueError(f"unknown seamless size {size!r}; pass one of {sorted(SIZES)}")
    known = {f.name for f in fields(SeamlessConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown SeamlessConfig field(s) {unknown}; known: {sorted(known)}")
    return Seamless(SeamlessConfig(**{**SIZES[size], **overrides}))
