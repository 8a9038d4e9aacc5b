"""Attention fusion benchmark: eager vs ``torch.compile`` (Inductor) vs ``mmgen``.

For a few eager attention patterns (one that Inductor's own ``fuse_attention`` already
fuses, ones only ours fuses) and for the reference Llama's prefill and decode step:
eager, stock ``torch.compile``, ``mmgen`` with ``AttentionConfig(backend="auto")`` and
``mmgen`` forced to SDPA, measured in one process run and reported as speedups over
eager; compile time (first call) apart. Which way each attention went (fused / left to
Inductor) is read from the counters.

    python -m benchmarks.bench_attention --smoke          # tiny, < 60 s
    python -m benchmarks.bench_attention                  # small Llama, prefill 256
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from benchmarks.common import time_call, timed_first_call, write_results
from torch_mmgen_opt import optimize
from torch_mmgen_opt.config import AttentionConfig
from torch_mmgen_opt.models import build
from torch_mmgen_opt.models.llama import repeat_kv

VARIANTS = ("eager", "inductor", "mmgen_auto", "mmgen_sdpa")


# ----------------------------------------------------------------------------- patterns


def scale_div_scores(q, k, v, keep):  # stock Inductor fuses this one itself
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def bool_masked_fill(q, k, v, keep):  # only ours
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def hf_float32_softmax(q, k, v, keep):  # Hugging Face eager attention; only ours
    mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def llama_gqa(q, k, v, keep):  # the reference model's attention, repeat_kv included
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
    s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1]) + mask
    return torch.matmul(F.softmax(s.float(), dim=-1).type_as(q), v)


PATTERNS: dict[str, Callable[..., torch.Tensor]] = {
    "scale_div_scores": scale_div_scores,
    "bool_masked_fill": bool_masked_fill,
    "hf_float32_softmax": hf_float32_softmax,
    "llama_gqa": llama_gqa,
}


# one that stock Inductor fuses, one that only ours does
SMOKE_PATTERNS = ("scale_div_scores", "bool_masked_fill")


def _compiled(fn: Any, variant: str) -> Any:
    torch._dynamo.reset()
    if variant == "eager":
        return fn
    if variant == "inductor":
        return torch.compile(fn)
    backend = "auto" if variant == "mmgen_auto" else "sdpa"
    return optimize(fn, attention=AttentionConfig(backend=backend))


def _decision() -> str:
    c = counters["mmgen"]
    parts = [
        f"{key.replace('attention_', '')}={c[key]}"
        for key in ("attention_fused", "attention_left_to_inductor")
        if c[key]
    ]
    if counters["inductor"]["fuse_attention"]:
        parts.append(f"inductor_sfdp={counters['inductor']['fuse_attention']}")
    return " ".join(parts) or "-"


def _measure(
    name: str, make: Callable[[str], Callable[[], Any]], device: str, repeats: int
) -> dict[str, Any]:
    """``make(variant)`` returns a zero-arg callable running that variant."""
    row: dict[str, Any] = {"workload": name}
    times: dict[str, float] = {}
    for variant in VARIANTS:
        counters.clear()
        run = make(variant)
        compile_s, _ = timed_first_call(run, device)
        times[variant] = time_call(run, device=device, warmup=2, repeats=repeats)
        if variant != "eager":
            row[f"{variant} compile s"] = compile_s
            row[f"{variant} attention"] = _decision()
    row["eager ms"] = times["eager"] * 1e3
    for variant in VARIANTS[1:]:
        row[f"{variant} x"] = times["eager"] / times[variant]
    row["auto / inductor"] = times["inductor"] / times["mmgen_auto"]
    return row


def _pattern_rows(sizes: dict[str, int], dtype: torch.dtype, device: str, repeats: int):
    b, h, hkv, t, d = sizes["batch"], sizes["heads"], sizes["kv_heads"], sizes["seq"], sizes["head_dim"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, t, d, generator=g).to(device, dtype)
    keep = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]
    rows = []
    names = SMOKE_PATTERNS if sizes["seq"] <= 64 else tuple(PATTERNS)
    for name in names:
        fn = PATTERNS[name]
        kv_heads = hkv if name == "llama_gqa" else h
        k = torch.randn(b, kv_heads, t, d, generator=g).to(device, dtype)
        v = torch.randn(b, kv_heads, t, d, generator=g).to(device, dtype)

        def make(variant, fn=fn, k=k, v=v):
            compiled = _compiled(fn, variant)
            return lambda: compiled(q, k, v, keep)

        row = _measure(f"{name} ({b}x{h}x{t}x{d})", make, device, repeats)
        rows.append(row)
        print(row, flush=True)
    return rows


@torch.no_grad()
def _llama_rows(size: str, prompt: int, dtype: torch.dtype, device: str, repeats: int):
    model = build("llama", size, dtype=dtype, device=device)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    past = model(ids).past_key_values
    tok = ids[:, -1:]
    compiled: dict[str, Any] = {}

    def make_prefill(variant):
        compiled[variant] = _compiled(model, variant)
        return lambda: compiled[variant](ids)

    def make_decode(variant):
        torch._dynamo.reset()  # the compiled model again, now compiling its decode graph
        m = compiled[variant]
        return lambda: m(tok, past)

    rows = []
    for phase, make in (("prefill", make_prefill), ("decode", make_decode)):
        row = _measure(f"llama-{size} {phase} (prompt {prompt})", make, device, repeats)
        rows.append(row)
        print(row, flush=True)
    return rows


def main(
    *,
    smoke: bool = False,
    device: str = "cpu",
    dtype: str = "bfloat16",
    model_size: str | None = None,
    prompt: int | None = None,
    repeats: int | None = None,
    threads: int | None = None,
) -> str:
    if threads:
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    if smoke:
        sizes = dict(batch=1, heads=4, kv_heads=2, seq=32, head_dim=16)
        model_size, prompt, repeats = model_size or "tiny", prompt or 16, repeats or 5
    else:
        sizes = dict(batch=1, heads=16, kv_heads=4, seq=512, head_dim=64)
        model_size, prompt, repeats = model_size or "small", prompt or 256, repeats or 20
    with torch._inductor.config.patch(fx_graph_cache=False):
        pattern_rows = _pattern_rows(sizes, torch_dtype, device, repeats)
        model_rows = _llama_rows(model_size, prompt, torch_dtype, device, repeats)
    notes = (
        f"dtype {dtype}. Speedups (`x`) are eager time / variant time, measured in one run; "
        "`auto / inductor` > 1 means mmgen (auto) beats stock torch.compile. Compile time is "
        "the first call. `attention` says what happened to each attention: fused (SDPA), "
        "left_to_inductor (our auto rule), inductor_sfdp (stock Inductor's own fusion)."
    )
    path = write_results(
        "bench_attention" + ("-smoke" if smoke else ""),
        "Attention fusion: eager vs torch.compile vs mmgen",
        [("Attention patterns", pattern_rows), (f"Llama {model_size}", model_rows)],
        device=device,
        notes=notes,
    )
    print(f"results: {path}")
    return str(path)


def _parse() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, < 60 s")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--model-size", dest="model_size", default=None)
    p.add_argument("--prompt", type=int, default=None, help="prefill length")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    return vars(p.parse_args())


if __name__ == "__main__":
    main(**_parse())
