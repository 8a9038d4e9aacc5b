"""Weight quantization for linear layers: quantize/pack functions and the ``mmgen`` ops.

Schemes (``w`` is a linear weight ``(N, K)``: N output features, K input features):

- ``"int8"``: weight-only, symmetric per output channel. ``qweight`` int8 ``(N, K)``,
  ``scales`` ``(N,)`` in the activation dtype; ``w ~= qweight * scales[:, None]``.
- ``"int4"``: weight-only, asymmetric, group-wise along K (group 32/64/128). ``q`` in
  ``0..15``; ``scales_and_zeros`` ``(K / group, N, 2)``; ``w ~= (q - 8) * scale + zero``
  (the layout of torch's tinygemm kernels). ``qweight`` is the kernel-specific packing of
  ``q`` (CPU: ``_convert_weight_to_int4pack_for_cpu``; CUDA: ``_convert_weight_to_int4pack``),
  so an int4 layer must be prepared on the device it runs on.
- ``"int8_dynamic"``: the int8 weight of ``"int8"`` times activations quantized to int8
  per token (symmetric) at run time.

Kernels: only what torch ships.

- CPU: ``aten._weight_int8pack_mm`` (int8) and ``aten._weight_int4pack_mm_for_cpu`` (int4)
  read the packed weight directly; measured (torch 2.13, 1 thread, 1x4096x11008 bf16) 5.6 ms
  and 6.8 ms against 26 ms for ``F.linear``. ``torch._int_mm`` on CPU has no fast path
  (50 ms there, 13x slower than bf16 at M=128), so ``int8_dynamic`` on CPU multiplies the
  per-token-quantized activations, held exactly as float (|v| <= 127), with the int8 weight
  through ``_weight_int8pack_mm``: the numerics of int8 x int8 at the speed of int8
  weight-only.
- CUDA: int8 is written as ``linear(x, qweight.to(x.dtype)) * scales``, which Inductor fuses
  into one GEMV/GEMM reading int8 (gpt-fast's path); int4 uses tinygemm
  (``aten._weight_int4pack_mm``, bf16 activations); int8_dynamic uses ``torch._int_mm``
  (int8 tensor cores) when M > 16, else the same dequantized form as int8.

No Triton kernel is written: for every scheme a shipped kernel or Inductor's fusion is used;
``docs/passes/quantize_linear.md`` records what was measured.

The graph-facing op is ``torch.ops.mmgen.quantized_linear`` (CompositeImplicitAutograd):
Dynamo keeps it as one node (so a pass can see and count it), AOT autograd decomposes it into
the aten kernels above (so Inductor sees the real kernels and their meta functions).
``torch.ops.mmgen.int8_dynamic_mm`` is opaque (a ``torch.library.custom_op`` with a fake
impl): its CUDA branch depends on M at run time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FLOAT_DTYPES",
    "QuantizedLinear",
    "QuantizedWeight",
    "SCHEMES",
    "check_weight",
    "dequantize",
    "quantize_int4_grouped",
    "quantize_int8_per_channel",
    "quantize_per_token_int8",
    "quantize_weight",
    "quantized_linear",
]

aten = torch.ops.aten
SCHEMES = ("int8", "int4", "int8_dynamic")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT4_INNER_K_TILES = 8  # tinygemm tiling: K must divide by 16 * inner_k_tiles on CUDA


class QuantizedWeight(NamedTuple):
    """A quantized ``(N, K)`` weight: what :func:`quantized_linear` takes."""

    scheme: str
    qweight: torch.Tensor  # int8 (N, K) or int4-packed (kernel layout)
    scales: torch.Tensor  # int8*: (N,); int4: scales_and_zeros (K / group, N, 2)
    group_size: int  # int4 only (0 otherwise)
    out_features: int  # N
    in_features: int  # K

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes


# ----------------------------------------------------------------------------- quantize


def quantize_int8_per_channel(
    w: torch.Tensor, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``w (N, K) -> (qweight int8 (N, K), scales (N,))``."""
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1).clamp(min=1e-12)  # (N,)
    scales = amax / 127.0
    q = torch.clamp(torch.round(wf / scales[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scales.to(scale_dtype or w.dtype)


def quantize_int4_grouped(
    w: torch.Tensor, group_size: int, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: ``w (N, K) -> (q int32 (N, K) in 0..15,
    scales_and_zeros (K / group_size, N, 2))`` with ``w ~= (q - 8) * scale + zero``."""
    n, k = w.shape
    if group_size not in (32, 64, 128) or k % group_size:
        fits = [g for g in (32, 64, 128) if k % g == 0]
        fix = f"pass QuantizeConfig(group_size=...) with one of {fits}" if fits else (
            "no group size fits: use scheme='int8' for this layer"
        )
        raise ValueError(
            f"int4 group_size={group_size} must be 32, 64 or 128 and divide in_features={k}; "
            + fix
        )
    wg = w.detach().float().reshape(n, k // group_size, group_size)  # (N, G, g)
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, G)
    scale = ((wmax - wmin) / 15.0).clamp(min=1e-12)
    q = torch.clamp(torch.round((wg - wmin[..., None]) / scale[..., None]), 0, 15)
    zero = wmin + 8.0 * scale  # so that (q - 8) * scale + zero == q * scale + wmin
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # (G, N, 2)
    return q.reshape(n, k).to(torch.int32), sz.contiguous().to(scale_dtype or w.dtype)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``x (M, K)``: ``(x_q int8 (M, K), scales float32 (M, 1))``."""
    xf = x.float()
    scales = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    x_q = torch.clamp(torch.round(xf / scales), -127, 127).to(torch.int8)
    return x_q, scales


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    if q.device.type == "cuda":
        q_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (N, K/2)
        return aten._convert_weight_to_int4pack(q_u8, _INT4_INNER_K_TILES)
    return aten._convert_weight_to_int4pack_for_cpu(q, _INT4_INNER_K_TILES)


def check_weight(w: torch.Tensor, scheme: str, group_size: int = 64) -> str | None:
    """Why the ``scheme`` kernels cannot take weight ``w`` (a shape or device reason), or
    ``None`` when they can. Dtype mistakes raise instead (see :func:`quantize_weight`)."""
    if w.dim() != 2:
        return f"weight is {w.dim()}-D, not 2-D"
    n, k = w.shape
    if w.device.type not in ("cpu", "cuda"):
        return f"no {scheme} kernel for device {w.device.type}"
    if scheme == "int4":
        if k % group_size:
            return f"in_features={k} does not divide by group_size={group_size}"
        if w.device.type == "cpu" and n % 16:
            return f"the CPU int4 kernel needs out_features % 16 == 0, got {n}"
        if w.device.type == "cuda" and (k % (16 * _INT4_INNER_K_TILES) or n % 8):
            return f"tinygemm needs in_features % 128 == 0 and out_features % 8 == 0, got {n}x{k}"
    if scheme in ("int8", "int8_dynamic") and w.device.type == "cpu" and k % 8 and (
        w.dtype == torch.bfloat16
    ):
        # torch 2.13's bf16 _weight_int8pack_mm crashes (SIGSEGV) for M > 1 when K % 8 != 0
        return f"the CPU int8 kernel needs in_features % 8 == 0 in bfloat16, got {k}"
    if scheme == "int8_dynamic" and w.device.type == "cuda" and (k % 8 or n % 8):
        return f"torch._int_mm needs in/out features divisible by 8, got {n}x{k}"
    return None


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 64) -> QuantizedWeight:
    """Quantize a linear weight ``(N, K)`` for ``scheme`` on ``w``'s device.

    Raises ``ValueError`` for an unknown scheme, a dtype the kernels cannot take, or a shape
    :func:`check_weight` rejects.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; pass one of {SCHEMES}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{scheme} kernels take float32, bfloat16 or float16 weights, got {w.dtype}; "
            "convert the model first, e.g. model.to(torch.bfloat16)"
        )
    if scheme == "int4" and w.device.type == "cuda" and w.dtype != torch.bfloat16:
        raise ValueError(
            f"int4 on CUDA (tinygemm) takes bfloat16, got {w.dtype}; call model.to(torch.bfloat16)"
        )
    reason = check_weight(w, scheme, group_size)
    if reason is not None:
        raise ValueError(f"cannot quantize a {tuple(w.shape)} weight to {scheme}: {reason}")
    n, k = w.shape
    if scheme == "int4":
        q, sz = quantize_int4_grouped(w, group_size)
        return QuantizedWeight(scheme, _pack_int4(q), sz, group_size, n, k)
    q, scales = quantize_int8_per_channel(w)
    return QuantizedWeight(scheme, q, scales, 0, n, k)


@torch.no_grad()
def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float ``(N, K)`` weight a :class:`QuantizedWeight` stands for (for tests)."""
    if qw.scheme != "int4":
        return (qw.qweight.float() * qw.scales.float()[:, None]).to(dtype)
    # Recover the int4 values by multiplying the identity through the packed kernel.
    eye = torch.eye(qw.in_features, dtype=qw.scales.dtype, device=qw.qweight.device)
    return quantized_linear(eye, qw.scheme, qw.group_size, qw.qweight, qw.scales, None,
                            qw.out_features).t().to(dtype)


# ----------------------------------------------------------------------------- the ops

_lib = torch.library.Library("mmgen", "FRAGMENT")  # noqa: TOR901 - ops of this package
_lib.define(
    "quantized_linear(Tensor x, str scheme, int group_size, Tensor qweight, Tensor scales, "
    "Tensor? bias, int out_features) -> Tensor"
)


@torch.library.custom_op("mmgen::int8_dynamic_mm", mutates_args=())
def int8_dynamic_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x (M, K)`` quantized per token to int8, times int8 ``qweight (N, K)``, rescaled by
    both scales: ``(M, N)`` in ``x.dtype``."""
    x_q, x_scales = quantize_per_token_int8(x)  # (M, K) int8, (M, 1)
    if x.device.type == "cuda":
        if x.shape[0] > 16:
            acc = torch._int_mm(x_q, qweight.t()).float()  # (M, N) int32 -> float
        else:  # _int_mm needs M > 16; a decode step is memory-bound anyway
            acc = F.linear(x_q.to(x.dtype), qweight.to(x.dtype)).float()
        return (acc * x_scales * scales.float()).to(x.dtype)
    # CPU: int8 values are exact in any float dtype; accumulate through the int8 kernel.
    ones = torch.ones_like(scales, dtype=x.dtype)
    acc = aten._weight_int8pack_mm(x_q.to(x.dtype), qweight, ones).float()
    return (acc * x_scales * scales.float()).to(x.dtype)


@int8_dynamic_mm.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _quantized_linear_impl(
    x: torch.Tensor,
    scheme: str,
    group_size: int,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # (M, K)
    if scheme == "int8":
        if x.device.type == "cuda":  # Inductor fuses the int8 -> float cast into the matmul
            y = F.linear(x2, qweight.to(x.dtype)) * scales.to(x.dtype)
        else:
            y = aten._weight_int8pack_mm(x2, qweight, scales.to(x.dtype))
    elif scheme == "int4":
        if x.device.type == "cuda":
            y = aten._weight_int4pack_mm(x2, qweight, group_size, scales)
        else:
            y = aten._weight_int4pack_mm_for_cpu(x2, qweight, group_size, scales.to(x.dtype))
    elif scheme == "int8_dynamic":
        y = torch.ops.mmgen.int8_dynamic_mm(x2, qweight, scales)
    else:
        raise ValueError(f"unknown quantization scheme {scheme!r}; pass one of {SCHEMES}")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, out_features)


_lib.impl("quantized_linear", _quantized_linear_impl, "CompositeImplicitAutograd")


def quantized_linear(
    x: torch.Tensor,
    scheme: str,
    group_size: int,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """``F.linear`` with a quantized weight: ``x (..., K) -> (..., N)`` in ``x.dtype``."""
    return torch.ops.mmgen.quantized_linear(
        x, scheme, group_size, qweight, scales, bias, out_features
    )


# ---------------------------------------------------------------------------- module


class QuantizedLinear(nn.Module):
    """Drop-in for an ``nn.Linear`` whose weight was quantized: the float weight is gone,
    only ``qweight`` / ``scales`` buffers (and the float ``bias``) remain."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.scheme = qw.scheme
        self.group_size = qw.group_size
        self.in_features = qw.in_features
        self.out_features = qw.out_features
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, qw: QuantizedWeight) -> QuantizedLinear:
        return cls(qw, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(
            x, self.scheme, self.group_size, self.qweight, self.scales, self.bias,
            self.out_features,
        )

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.scheme}{group}, bias={self.bias is not None}"
        )
