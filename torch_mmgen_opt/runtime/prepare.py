"""Module preparation before capture: weight_norm folding and padding to length buckets.

- :func:`fold_weight_norm_` removes ``weight_norm`` from every submodule, in place, for
  inference. Both flavours are handled: the old forward-pre-hook one
  (``torch.nn.utils.weight_norm``, a ``WeightNorm`` hook recomputing ``weight`` from
  ``weight_g`` / ``weight_v`` before every call: the hook breaks Dynamo graphs and costs
  one norm per call) and the parametrization one
  (``torch.nn.utils.parametrizations.weight_norm``). The folded ``weight`` is the value
  the module used, so outputs are unchanged. A tensor that carries another
  parametrization besides weight_norm is left alone (one warning).
- :func:`pad_to_bucket` zero-pads a batch of sequences to the smallest bucket that fits
  and returns the padding mask, so that one compiled graph serves every length of a
  bucket.
- :func:`conv1d_channels_last_` runs 1-D convolutions as channels-last 2-D ones
  (:class:`Conv1dAs2d`), oneDNN's fast layout on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

log = logging.getLogger("torch_mmgen_opt")

__all__ = ["Conv1dAs2d", "conv1d_channels_last_", "fold_weight_norm_", "pad_to_bucket", "pick_bucket"]


def _is_weight_norm_parametrization(p: nn.Module) -> bool:
    # torch.nn.utils.parametrizations._WeightNorm is private; match it by name so that
    # a rename in a later torch degrades to "not folded", never to a wrong fold.
    return type(p).__name__ == "_WeightNorm"


@torch.no_grad()
def fold_weight_norm_(module: nn.Module) -> int:
    """Remove every ``weight_norm`` (hook or parametrization) under ``module``, in place.

    Returns:
        how many weight tensors were folded (0 when there was no weight_norm).
    """
    folded = 0
    for name, m in module.named_modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                nn.utils.remove_weight_norm(m, hook.name)
                folded += 1
        if parametrize.is_parametrized(m):
            for tensor_name in list(m.parametrizations.keys()):
                plist = m.parametrizations[tensor_name]
                if len(plist) and all(_is_weight_norm_parametrization(p) for p in plist):
                    parametrize.remove_parametrizations(m, tensor_name, leave_parametrized=True)
                    folded += 1
                elif any(_is_weight_norm_parametrization(p) for p in plist):
                    log.warning(
                        "fold_weight_norm_: %s.%s has weight_norm mixed with other "
                        "parametrizations; left as is",
                        name or type(m).__name__,
                        tensor_name,
                    )
    return folded


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length`` (buckets in any order)."""
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(
            f"length {length} exceeds the largest bucket {max(buckets)}; add a bucket >= "
            f"{length} to the buckets or shorten the input"
        )
    return min(fitting)


def pad_to_bucket(
    x: torch.Tensor,
    lengths: torch.Tensor | Sequence[int] | None,
    buckets: Sequence[int],
    *,
    dim: int = 1,
    value: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``x`` along ``dim`` to the smallest bucket that holds it.

    Args:
        x: (B, T, ...) for ``dim=1`` (any layout with batch first).
        lengths: (B,) valid lengths, ``None`` = every row is ``T`` long.
        buckets: allowed padded lengths.
        dim: the time dimension.
        value: the padding value.

    Returns:
        ``(padded, mask)``: ``padded`` has ``bucket`` along ``dim``; ``mask`` is (B, bucket)
        bool, True at valid positions.
    """
    if x.dim() < 2:
        raise ValueError(f"pad_to_bucket expects (B, T, ...) with batch first, got {tuple(x.shape)}")
    dim = dim % x.dim()
    T = x.shape[dim]
    bucket = pick_bucket(T, buckets)
    if lengths is None:
        lengths = torch.full((x.shape[0],), T, dtype=torch.long, device=x.device)
    elif not isinstance(lengths, torch.Tensor):
        lengths = torch.tensor(list(lengths), dtype=torch.long, device=x.device)
    if bucket > T:
        pad_shape = list(x.shape)
        pad_shape[dim] = bucket - T
        x = torch.cat([x, x.new_full(pad_shape, value)], dim=dim)
    mask = torch.arange(bucket, device=x.device)[None, :] < lengths.to(x.device)[:, None]
    return x, mask


class Conv1dAs2d(nn.Module):
    """A ``Conv1d`` / ``ConvTranspose1d`` run as the equivalent 2-D convolution over
    ``(B, C, 1, T)`` with a channels-last weight, so oneDNN takes its channels-last path.

    Why: on the development CPU (AVX2, torch 2.13) the HiFi-GAN convolutions at 16-64
    channels ran 1.3-4x faster this way than as ``conv1d`` on ``(B, C, T)`` (which
    oneDNN reorders into a blocked layout on every call); the whole small vocoder went
    from ~130 to ~75 ms. Same arithmetic: outputs equal to float rounding (tested).
    """

    def __init__(self, conv: nn.Conv1d | nn.ConvTranspose1d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("Conv1dAs2d handles numeric zero padding only")
        self.transposed = isinstance(conv, nn.ConvTranspose1d)
        weight = conv.weight.detach().unsqueeze(2).contiguous(memory_format=torch.channels_last)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = conv.bias
        self.stride = (1, conv.stride[0])
        self.padding = (0, conv.padding[0])
        self.dilation = (1, conv.dilation[0])
        self.output_padding = (0, conv.output_padding[0]) if self.transposed else None
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x4 = x.unsqueeze(2)  # (B, C, 1, T)
        if self.transposed:
            y = torch.nn.functional.conv_transpose2d(
                x4, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                self.groups, self.dilation,
            )
        else:
            y = torch.nn.functional.conv2d(
                x4, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
        return y.squeeze(2)


def conv1d_channels_last_(root: nn.Module) -> int:
    """Swap, in place, every plain ``Conv1d`` / ``ConvTranspose1d`` of ``root`` (weight_norm
    already folded) for :class:`Conv1dAs2d`. Returns how many were swapped; a parametrized
    or non-zero-padded convolution is left as it is."""
    n = 0
    for name, mod in list(root.named_modules()):
        if type(mod) not in (nn.Conv1d, nn.ConvTranspose1d) or parametrize.is_parametrized(mod):
            continue
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, Conv1dAs2d(mod))
        n += 1
    return n
