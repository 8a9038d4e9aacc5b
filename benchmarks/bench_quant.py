"""Quantized linear layers: bf16 vs int8 vs int4 vs int8_dynamic vs auto, at decode shapes.

Two sections, ratios measured in the same run:

- layers: one linear at batch 1 (M=1): CPU 4096x4096 and 4096->11008; CUDA the
  Llama-2-7B projections. us/call, achieved GB/s (weight + activation bytes / time) and
  its fraction of ``measure_read_bandwidth()``, speedup over bf16. On CPU the kernels are
  called eagerly (they are the shipped aten kernels; compiling adds nothing). On CUDA each
  variant is compiled (int8 relies on Inductor fusing the int8->bf16 cast into the
  matmul); compile time is reported apart.
- model: the ``small`` Llama (``7b`` on CUDA) decode step at a fixed past length through
  ``optimize(model, quantize=...)``: tokens/s, bandwidth fraction, weight memory and its
  ratio to bf16, peak memory (CUDA: max allocated; CPU: process peak RSS so far).

    .venv/bin/python -m benchmarks.bench_quant --smoke
    .venv/bin/python -m benchmarks.bench_quant --section layers
    .venv/bin/python -m benchmarks.bench_quant --device cuda
"""

from __future__ import annotations

import argparse
import collections
import resource
import tempfile
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    measure_read_bandwidth,
    sync,
    time_call,
    timed_first_call,
    write_results,
)
from torch_mmgen_opt.config import OptimizeConfig, QuantizeConfig
from torch_mmgen_opt.kernels import quant
from torch_mmgen_opt.passes.quantize_linear import choose_scheme

SCHEMES = ("bf16", "int8", "int4", "int8_dynamic", "auto")
# (in_features K, out_features N)
LAYER_SHAPES = {
    "cpu": [(4096, 4096), (4096, 11008)],
    "cuda": [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 32000)],
    "smoke": [(256, 256), (256, 512)],
}


def _gb(nbytes: float) -> float:
    return nbytes / 1e9


def _layer_fn(scheme: str, w: torch.Tensor, x: torch.Tensor, group_size: int, auto_dir: str):
    """The callable for one variant and the bytes of weight it reads."""
    if scheme == "auto":
        cfg = OptimizeConfig(
            quantize=QuantizeConfig(scheme="auto", group_size=group_size, auto_lengths=(1,),
                                    cache_dir=auto_dir)
        )
        scheme, _, _ = choose_scheme(w, cfg)
        fn, nbytes, _ = _layer_fn("bf16" if scheme == "float" else scheme, w, x, group_size, "")
        return fn, nbytes, f"auto->{scheme}"
    if scheme == "bf16":
        return (lambda: F.linear(x, w)), w.nbytes, scheme
    qw = quant.quantize_weight(w, scheme, group_size)

    def fn():
        return quant.quantized_linear(
            x, qw.scheme, qw.group_size, qw.qweight, qw.scales, None, qw.out_features
        )

    return fn, qw.nbytes, scheme


@torch.no_grad()
def bench_layers(
    device: torch.device, shapes: list[tuple[int, int]], group_size: int, repeats: int,
    bandwidth: float,
) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as auto_dir:
        for k, n in shapes:
            w = torch.randn(n, k, dtype=torch.bfloat16, device=device)
            x = torch.randn(1, k, dtype=torch.bfloat16, device=device)
            base = None
            for scheme in SCHEMES:
                fn, nbytes, label = _layer_fn(scheme, w, x, group_size, auto_dir)
                compile_s = None
                if device.type == "cuda":
                    fn = torch.compile(fn, mode="reduce-overhead")  # CUDA graphs: kernel time, not launch
                    compile_s, _ = timed_first_call(fn, device)
                t = time_call(fn, device=device, warmup=3, repeats=repeats, min_time_s=0.2)
                base = base or t
                bps = (nbytes + x.nbytes) / t
                rows.append({
                    "shape (MxKxN)": f"1x{k}x{n}", "variant": label,
                    "us/call": t * 1e6, "speedup vs bf16": base / t,
                    "weight MB": nbytes / 1e6, "GB/s": _gb(bps),
                    "bandwidth fraction": bps / bandwidth, "compile s": compile_s,
                })
            del w
    return rows


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux: KiB


@torch.no_grad()
def _decode_variant(
    device: torch.device, size: str, scheme: str, past_len: int, repeats: int, group_size: int,
    auto_dir: str | None,
) -> dict[str, Any]:
    """One variant: seconds per decode step, bytes it reads, weight bytes, compile time."""
    import torch_mmgen_opt as mmgen
    from torch_mmgen_opt import models

    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = models.build("llama", size, dtype=torch.bfloat16, device=device)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, past_len), device=device)
    past = model(prompt).past_key_values  # eager prefill: only the decode step is measured
    kv_bytes = sum(k.nbytes + v.nbytes for k, v in past)
    quantize = None if scheme == "bf16" else QuantizeConfig(
        scheme=scheme, group_size=group_size, cache_dir=auto_dir
    )
    fast = mmgen.optimize(model, quantize=quantize)
    tok = torch.randint(0, vocab, (1, 1), device=device)
    compile_s, _ = timed_first_call(lambda: fast(tok, past), device)
    t = time_call(lambda: fast(tok, past), device=device, warmup=2, repeats=repeats)
    weights = _weight_bytes(model)
    embed = model.embed_tokens.weight  # a decode step reads one row of it
    counts = collections.Counter(e.kind for e in mmgen.explain(fast).events)
    choices = ", ".join(
        f"{k.removeprefix('autoquant_choice_')}: {v}" for k, v in sorted(counts.items())
        if k.startswith("autoquant_choice_")
    )
    return dict(
        t=t, step_bytes=weights - embed.nbytes + embed[0].nbytes + kv_bytes, weights=weights,
        compile_s=compile_s, peak_mb=_peak_mb(device), choices=choices,
    )


def bench_model(
    device: torch.device, size: str, past_len: int, repeats: int, group_size: int,
    bandwidth: float, auto_dir: str | None = None,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    base: dict[str, Any] | None = None
    for scheme in SCHEMES:
        r = _decode_variant(device, size, scheme, past_len, repeats, group_size, auto_dir)
        base = base or r
        rows.append({
            "model": f"llama-{size} decode (past {past_len})", "variant": scheme,
            "tokens/s": 1.0 / r["t"], "speedup vs bf16": base["t"] / r["t"],
            "GB/s": _gb(r["step_bytes"] / r["t"]),
            "bandwidth fraction": r["step_bytes"] / r["t"] / bandwidth,
            "weight MB": r["weights"] / 1e6, "weight ratio vs bf16": r["weights"] / base["weights"],
            "peak MB": r["peak_mb"], "compile s": r["compile_s"], "auto choices": r["choices"],
        })
        sync(device)
    return rows


def main(
    device: str = "cpu",
    smoke: bool = False,
    section: str = "all",
    group_size: int = 64,
    threads: int | None = None,
    past_len: int = 128,
    shapes: list[tuple[int, int]] | None = None,
) -> str:
    dev = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    bandwidth = measure_read_bandwidth(dev, nbytes=(1 << 26) if smoke else (1 << 30))
    sections = []
    repeats = 3 if smoke else 10
    if section in ("all", "layers"):
        shapes = shapes or LAYER_SHAPES["smoke" if smoke else dev.type]
        sections.append(("Linear at batch 1", bench_layers(dev, shapes, group_size, repeats, bandwidth)))
    if section in ("all", "model"):
        size = "tiny" if smoke else ("7b" if dev.type == "cuda" else "small")
        with tempfile.TemporaryDirectory() as tmp:  # smoke runs leave the user's cache alone
            rows = bench_model(dev, size, 16 if smoke else past_len, repeats, group_size,
                               bandwidth, auto_dir=tmp if smoke else None)
        sections.append(("Decode step through optimize()", rows))
    notes = (
        f"Read bandwidth roofline (measure_read_bandwidth): {_gb(bandwidth):.1f} GB/s. "
        f"int4 group size {group_size}. auto times float/int8/int4/int8_dynamic at M=1 "
        "(layers) or at M=1 plus prefill lengths (model) and keeps the fastest within 20 dB SQNR."
    )
    path = write_results(
        "bench_quant" + ("-smoke" if smoke else ""), "Quantized linear layers", sections,
        device=dev, notes=notes,
    )
    print(path.read_text())
    return str(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--section", choices=("all", "layers", "model"), default="all")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--past-len", type=int, default=128)
    parser.add_argument("--shape", action="append", default=None, metavar="KxN",
                        help="layer shape in_features x out_features (repeatable)")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shape or ()] or None
    main(device=args.device, smoke=args.smoke, section=args.section,
         group_size=args.group_size, threads=args.threads, past_len=args.past_len,
         shapes=shapes)
