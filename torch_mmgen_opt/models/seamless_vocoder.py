"""HiFi-GAN-style unit vocoder of the Seamless-style pipeline (``models/seamless.py``).

Discrete units -> embedding -> ``Conv1d`` -> upsampling stages (``ConvTranspose1d`` with
kernel ``2 * rate``) each followed by multi-receptive-field residual blocks (dilated
``Conv1d``) -> ``Conv1d`` -> ``tanh``. Every convolution is under ``weight_norm`` (the
parametrization flavour), as in the published vocoders: the weight is recomputed from
``weight_g`` / ``weight_v`` on every call.

``forward(units, lengths=None)``: with ``lengths`` the activations past each row's valid
length are zeroed after every convolution, so a zero-padded batch gives, on its valid
part, the waveform of the unpadded input (each convolution of the unpadded run sees zeros
past the end). Without ``lengths`` nothing is masked (the eager batch-1 path).

Shapes: ``B`` batch, ``U`` units, ``C`` channels, ``hop`` = product of the rates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["UnitVocoder"]


def _mask(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Zero ``x`` (B, C, T) past ``lengths`` (B,)."""
    if lengths is None:
        return x
    valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]  # (B, T)
    return x * valid[:, None, :].to(x.dtype)


class ResBlock(nn.Module):
    """Two dilated convs per dilation, residual, leaky ReLU in between."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(
                nn.Conv1d(channels, channels, kernel_size, dilation=d,
                          padding=(kernel_size * d - d) // 2)
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2))
            for _ in dilations
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            h = _mask(c1(F.leaky_relu(x, 0.1)), lengths)
            h = _mask(c2(F.leaky_relu(h, 0.1)), lengths)
            x = x + h
        return x


class UnitVocoder(nn.Module):
    def __init__(
        self,
        unit_vocab: int,
        embed_dim: int,
        channels: int,
        upsample_rates: tuple[int, ...],
        resblock_kernels: tuple[int, ...],
        resblock_dilations: tuple[tuple[int, ...], ...],
    ) -> None:
        super().__init__()
        self.hop = math.prod(upsample_rates)
        self.upsample_rates = tuple(upsample_rates)
        self.unit_embed = nn.Embedding(unit_vocab, embed_dim)
        self.conv_pre = weight_norm(nn.Conv1d(embed_dim, channels, 7, padding=3))
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = channels
        for r in upsample_rates:
            self.ups.append(
                weight_norm(nn.ConvTranspose1d(ch, ch // 2, 2 * r, stride=r, padding=r // 2 + r % 2,
                                               output_padding=r % 2))
            )
            ch //= 2
            for k, d in zip(resblock_kernels, resblock_dilations):
                self.resblocks.append(ResBlock(ch, k, d))
        self.conv_post = weight_norm(nn.Conv1d(ch, 1, 7, padding=3))
        self.num_kernels = len(resblock_kernels)

    def forward(self, units: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """units (B, U) long -> waveform (B, U * hop); ``lengths`` (B,) valid units."""
        x = _mask(self.unit_embed(units).transpose(1, 2), lengths)  # (B, E, U)
        x = _mask(self.conv_pre(x), lengths)
        for i, up in enumerate(self.ups):
            x = F.leaky_relu(x, 0.1)
            if lengths is not None:
                lengths = lengths * self.upsample_rates[i]
            x = _mask(up(x), lengths)  # (B, C / 2^(i+1), U * prod(rates[: i + 1]))
            acc = None
            for j in range(self.num_kernels):
                h = self.resblocks[i * self.num_kernels + j](x, lengths)
                acc = h if acc is None else acc + h
            x = acc / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))
        return torch.tanh(x).squeeze(1)  # (B, U * hop)
