"""The few-row matmuls of a decode step: library calls against ``decode_gemv``.

A stack of transformer-shaped blocks (per block: four ``dim x dim`` projections, an FFN
``dim -> ffn -> dim``; then a ``vocab x dim`` head) runs one decode step of ``rows`` rows
(one per beam or sequence), float32 on CPU, weights together far larger than the
last-level cache (as in a real model, they are read from memory every step). Variants,
measured in the same run, interleaved repeat by repeat:

- ``eager``: ``F.linear`` (MKL);
- ``compiled, MKL``: ``optimize(model, decode_gemv=False)``: Inductor keeps the library
  matmuls;
- ``compiled, packed``: ``pack_linear=True, decode_gemv=False``: oneDNN on weights
  packed once (``kernels/packed_linear.py``);
- ``compiled, decode_gemv``: the default: the pass rewrites each matmul into per-row
  multiply-reduce that Inductor fuses into one loop per weight;
- ``compiled, gemv kernel``: every eligible linear swapped for ``GemvLinear``
  (``kernels/gemv_linear.py``: our float32 kernel on weights packed once into panels
  of 16 output features), then ``optimize``;
- ``compiled, int8 kernel``: ``quantize=int8`` on every linear (head included): the pass
  puts our int8 CPU kernel in place of ``_weight_int8pack_mm`` (lossy: its
  ``max |diff|`` is the quantization error, not rounding).

Reported: ms per step, achieved GB/s over the weight bytes each variant reads (int8: a
quarter of float32's, plus scales) and its fraction of the read
bandwidth measured on this machine (``measure_read_bandwidth``), speedup over eager and
over ``compiled, MKL``; compile time (first call) apart.

    .venv/bin/python -m benchmarks.bench_decode_gemv --smoke
    .venv/bin/python -m benchmarks.bench_decode_gemv
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import measure_read_bandwidth, timed_first_call, write_results


class Block(nn.Module):
    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.o(self.q(h) * torch.sigmoid(self.k(h)) + self.v(h))
        return x + self.fc2(F.relu(self.fc1(self.ln2(x))))


class Stack(nn.Module):
    """``layers`` blocks and a head: the linear layers of a decoder's step."""

    def __init__(self, dim: int, ffn: int, layers: int, vocab: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, ffn) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a step reads: float ``nn.Linear`` weights, or a quantized
    layer's int8 weight and scales."""
    from torch_mmgen_opt.kernels.gemv_linear import GemvLinear
    from torch_mmgen_opt.kernels.packed_linear import PackedLinear

    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, PackedLinear, GemvLinear)):  # packed: the same float32 bytes
            total += m.weight.nbytes
        elif hasattr(m, "qweight"):
            total += m.qweight.nbytes + m.scales.nbytes
    return total


@torch.no_grad()
def main(
    dim: int = 512,
    ffn: int = 2048,
    layers: int = 6,
    vocab: int = 8192,
    rows: tuple[int, ...] = (1, 4, 8),
    repeats: int = 30,
    smoke: bool = False,
    write: bool = True,
) -> list[dict[str, Any]]:
    import torch_mmgen_opt as mmgen
    from torch_mmgen_opt.config import QuantizeConfig

    if smoke:
        dim, ffn, layers, vocab, rows, repeats = 256, 512, 2, 1024, (4,), 3
    torch.manual_seed(0)
    bandwidth = measure_read_bandwidth("cpu", nbytes=1 << 28 if smoke else 1 << 30)
    variants = {
        "eager": None,
        "compiled, MKL": dict(decode_gemv=False),
        "compiled, packed": dict(decode_gemv=False, pack_linear=True),
        "compiled, decode_gemv": dict(),
        "compiled, gemv kernel": dict(_gemv_kernel=True),
        "compiled, int8 kernel": dict(quantize=QuantizeConfig(scheme="int8", include_output=True)),
    }
    state = Stack(dim, ffn, layers, vocab).state_dict()
    nbytes = _weight_bytes(Stack(dim, ffn, layers, vocab))
    table = []
    for M in rows:
        # fresh Dynamo state: a second row count would otherwise be compiled with the
        # rows as a dynamic dim (automatic dynamic shapes), which the pass leaves alone
        torch._dynamo.reset()
        x = torch.randn(M, 1, dim)
        fns, compile_s, outs, read = {}, {}, {}, {}
        for name, options in variants.items():
            model = Stack(dim, ffn, layers, vocab).eval()
            model.load_state_dict(state)  # the same values, in this variant's own tensors
            if options is not None and options.get("_gemv_kernel"):
                from torch_mmgen_opt.kernels.gemv_linear import gemv_linears_

                gemv_linears_(model)
                options = {}
            fn = model if options is None else mmgen.optimize(model, **options)
            compile_s[name], outs[name] = timed_first_call(lambda f=fn, x=x: f(x))
            fns[name] = fn
            read[name] = _weight_bytes(model)  # prepared in place: int8 layers read less
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(3):  # warm up every variant
            for fn in fns.values():
                fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name in fns:
            gbs = read[name] / med[name] / 1e9
            table.append({
                "rows": M,
                "variant": name,
                "weights MB": read[name] / 1e6,
                "ms/step": med[name] * 1e3,
                "GB/s": gbs,
                "of bandwidth": gbs * 1e9 / bandwidth,
                "vs eager": med["eager"] / med[name],
                "vs compiled MKL": med["compiled, MKL"] / med[name],
                "compile s": compile_s[name] if name != "eager" else None,
                "max |diff| vs eager": (outs[name] - outs["eager"]).abs().max().item(),
            })
        print(f"rows={M}: " + ", ".join(f"{n} {med[n] * 1e3:.2f} ms" for n in fns), flush=True)
    if write:
        notes = (
            f"Stack: {layers} blocks of 4 x ({dim}x{dim}) + ({ffn}x{dim}) + ({dim}x{ffn}), "
            f"head {vocab}x{dim}; float32 weights {nbytes / 1e6:.1f} MB per step (int8: "
            "'weights MB'); read "
            f"bandwidth measured here {bandwidth / 1e9:.1f} GB/s. Every variant has its own "
            "copy of the same weights (the model is prepared in place). Median of "
            f"{repeats} steps, variants interleaved."
        )
        path = write_results("bench_decode_gemv" + ("-smoke" if smoke else ""),
                             "Decode-step matmuls: library calls vs decode_gemv vs our kernels",
                             [("Per step", table)], notes=notes)
        print(f"wrote {path}")
    return table


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few repeats")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--repeats", type=int, default=30)
    return p.parse_args()


if __name__ == "__main__":
    args = _parse()
    main(rows=tuple(args.rows), repeats=args.repeats, smoke=args.smoke)
