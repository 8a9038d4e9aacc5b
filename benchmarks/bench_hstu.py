"""HSTU ranking latency: eager against ``torch_mmgen_opt.optimize``, same run.

One forward pass over a batch of jagged user histories (ranking is prefill-like: no token
loop). Rows: eager, plain ``torch.compile`` (Inductor), ``optimize()`` with the default
attention decision (CPU: the SiLU attention left to Inductor; CUDA: fused Triton kernel)
and, on CPU, ``optimize()`` forcing the fused op (``AttentionConfig(backend="sdpa")``).
On CUDA a second table times the attention alone at the model's history length (8192 for
``large``): eager dense (scores materialised) against the jagged Triton kernel.

    .venv/bin/python -m benchmarks.bench_hstu --smoke
    .venv/bin/python -m benchmarks.bench_hstu --size small                   # CPU benchmark
    .venv/bin/python -m benchmarks.bench_hstu --device cuda --size large --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

from benchmarks.common import markdown_table, time_call, timed_first_call, write_results


def _lengths(batch: int, max_len: int, seed: int = 0) -> list[int]:
    """Ragged history lengths between max_len/4 and max_len, the longest one full."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, max_len // 4), max_len + 1, (batch,), generator=g).tolist()
    lengths[0] = max_len
    return lengths


def _attention_rows(model: Any, lengths: list[int], device: str, dtype: torch.dtype,
                    repeats: int) -> list[dict[str, Any]]:
    """Attention only (one layer's shapes): eager dense vs the jagged Triton kernel."""
    from torch_mmgen_opt.kernels.hstu import HAS_TRITON, hstu_attention_jagged_reference

    cfg = model.config
    H, d, N = cfg.n_heads, cfg.attn_dim, cfg.max_seq_len
    T = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, H, d, generator=g).to(device, dtype) for _ in range(3))
    offsets = torch.tensor([0, *lengths]).cumsum(0).to(device)
    eager = time_call(lambda: hstu_attention_jagged_reference(q, k, v, offsets, N),
                      device=device, repeats=repeats)
    rows = [{"attention": "eager (padded, scores materialised)", "ms": 1e3 * eager,
             "speedup": 1.0}]
    if HAS_TRITON and torch.device(device).type == "cuda":
        fused = time_call(lambda: torch.ops.mmgen.hstu_attention_jagged(q, k, v, offsets, N),
                          device=device, repeats=repeats)
        flops = sum(2 * 2 * H * d * n * (n + 1) / 2 for n in lengths)  # causal QK^T and AV
        rows.append({"attention": "Triton jagged kernel", "ms": 1e3 * fused,
                     "speedup": eager / fused, "TFLOP/s": flops / fused / 1e12})
    return rows


def main(
    size: str = "small",
    device: str = "cpu",
    dtype: str = "float32",
    batch: int = 8,
    repeats: int = 10,
    threads: int | None = None,
    smoke: bool = False,
    write: bool = True,
) -> dict[str, Any]:
    import torch_mmgen_opt as mmgen
    from torch_mmgen_opt.config import AttentionConfig
    from torch_mmgen_opt.models import build
    from torch_mmgen_opt.models.hstu import example_batch

    if smoke:
        size, batch, repeats = "tiny", 4, 3
    if threads:
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    model = build("hstu", size, dtype=torch_dtype, device=device)
    cfg = model.config
    lengths = _lengths(batch, cfg.max_seq_len)
    inputs = example_batch(cfg, lengths, dtype=torch_dtype, device=device)

    # Each compiled variant gets its own copy of the model: compiled wrappers of one
    # module share its attributes (the pass report) and Dynamo's cache of its forward.
    variants: dict[str, Any] = {
        "eager": model,
        "torch.compile": torch.compile(copy.deepcopy(model)),
        "optimize()": mmgen.optimize(copy.deepcopy(model)),
    }
    if torch.device(device).type != "cuda":  # on CUDA the default already fuses
        variants["optimize(), fused op forced"] = mmgen.optimize(
            copy.deepcopy(model), attention=AttentionConfig(backend="sdpa")
        )
    rows, facts = [], []
    with torch.no_grad():
        ref = model(*inputs)
        eager_s = None
        for name, fn in variants.items():
            compile_s, out = timed_first_call(lambda fn=fn: fn(*inputs), device)
            seconds = time_call(lambda fn=fn: fn(*inputs), device=device, repeats=repeats)
            eager_s = eager_s or seconds
            report = getattr(fn, "_mmgen_report", None) if fn is not model else None
            rows.append({
                "variant": name,
                "ms / batch": 1e3 * seconds,
                "histories / s": batch / seconds,
                "speedup vs eager": eager_s / seconds,
                "first call s": compile_s if name != "eager" else None,
                "max |diff|": (out.float() - ref.float()).abs().max().item(),
                "fused attentions": report.count("hstu_attention_fused") if report else None,
            })
        attn_rows = _attention_rows(model, lengths, device, torch_dtype, repeats)
    facts.append({"size": size, "dtype": dtype, "batch": batch, "max_seq_len": cfg.max_seq_len,
                  "tokens": sum(lengths), "layers": cfg.n_layers, "heads": cfg.n_heads})
    result = {"rows": rows, "attention": attn_rows, "facts": facts}
    if write:
        path = write_results(
            f"hstu-{size}", f"HSTU ranking latency ({size}), eager vs optimize()",
            [("One forward over a ragged batch (median, same run)", rows),
             ("Attention alone", attn_rows), ("Run", facts)],
            device=device,
            notes="Speedups are ratios in this run; 'first call s' includes compilation.",
        )
        result["path"] = str(path)
    return result


def _parse() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-write", dest="write", action="store_false")
    return vars(p.parse_args())


if __name__ == "__main__":
    out = main(**_parse())
    print(markdown_table(out["rows"]))
    print(markdown_table(out["attention"]))
    print(markdown_table(out["facts"]))
    if "path" in out:
        print(f"written to {out['path']}")
