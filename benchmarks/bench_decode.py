"""Decode throughput: eager, torch.compile, Hugging Face's StaticCache + compile, mmgen.

    python -m benchmarks.bench_decode                       # llama small, bf16, CPU, batch 1
    python -m benchmarks.bench_decode --smoke               # tiny model, a few tokens
    python -m benchmarks.bench_decode --device cuda --size 7b   # Llama-2-7B shapes, CUDA graphs

Columns (same shapes, same random weights, greedy decoding, batch ``--batch``):

    eager        the reference Llama as written: growing ``torch.cat`` cache
    compile      ``torch.compile(model)`` (Inductor defaults) on the same growing cache
    hf_static    a ``transformers.LlamaForCausalLM`` of the same shapes with HF's own
                 ``StaticCache`` and ``torch.compile`` of its forward (prefill eager, as
                 transformers recommends)
    mmgen        ``optimize(model, static_kv=True)`` driven by ``DecodeSession``: one
                 decode graph, CUDA graphs on GPU

Each column: prefill, ``--warmup`` decode steps (the first one's time, compile included,
is reported apart as ``compile_s``), then ``--tokens`` timed decode steps (device
synchronised), tokens/s = batch * steps / time. Roofline: bytes read per step = weight
bytes (the embedding table excluded: one row is read) + the KV bytes of the tokens in
the cache, over ``benchmarks.common.measure_read_bandwidth`` (CPU: a streaming read; CUDA:
a device copy, bytes read + written). Ratios are against ``eager`` of the same run.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import measure_read_bandwidth, sync, write_results

_VARIANTS = ("eager", "compile", "hf_static", "mmgen")


def _llama(size: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from torch_mmgen_opt import models

    with torch.device(device):
        return models.build("llama", size, dtype=dtype)


def _hf_llama(ref: torch.nn.Module, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    c = ref.config
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    return model.eval()


def _time_steps(step: Callable[[], Any], warmup: int, steps: int, device: str) -> tuple[float, float]:
    """(first call seconds, seconds per step over ``steps`` after ``warmup``)."""
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return first, (time.perf_counter() - t0) / steps


def _run_growing(model: Any, prompt: torch.Tensor, warmup: int, steps: int, device: str):
    with torch.no_grad():
        out = model(prompt)
        state = {"past": out.past_key_values, "tok": out.logits[:, -1].argmax(-1, keepdim=True)}

        def step():
            o = model(state["tok"], state["past"])
            state["past"] = o.past_key_values
            state["tok"] = o.logits[:, -1].argmax(-1, keepdim=True)

        return _time_steps(step, warmup, steps, device)


def _run_hf_static(model: Any, prompt: torch.Tensor, max_len: int, warmup: int, steps: int, device: str):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead" if device == "cuda" else None)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x: cache
    with torch.no_grad():
        T = prompt.shape[1]
        extra = {"cache_position": torch.arange(T, device=device)} if "cache_position" in params else {}
        out = model(prompt, **{cache_kw: cache}, use_cache=True, **extra)
        state = {"pos": T, "tok": out.logits[:, -1].argmax(-1, keepdim=True)}

        def step():
            pos = torch.tensor([[state["pos"]]], device=device).expand(prompt.shape[0], 1)
            kw = {cache_kw: cache, "position_ids": pos, "use_cache": True}
            if "cache_position" in params:
                kw["cache_position"] = pos[0]
            if device == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            o = compiled(state["tok"], **kw)
            state["tok"] = o.logits[:, -1].argmax(-1, keepdim=True).clone()
            state["pos"] += 1

        return _time_steps(step, warmup, steps, device)


def _run_mmgen(model: Any, prompt: torch.Tensor, max_len: int, warmup: int, steps: int, device: str):
    import torch_mmgen_opt as mmgen
    from torch_mmgen_opt.runtime.generate import DecodeSession

    opt = mmgen.optimize(model, static_kv=True, max_seq_len=max_len, max_batch_size=prompt.shape[0])
    session = DecodeSession(opt, cache=model._mmgen_static_cache, prefill_buckets=(prompt.shape[1],))
    with torch.no_grad():
        logits = session.prefill(prompt, max_new_tokens=warmup + steps + 1)
        state = {"tok": logits.argmax(-1, keepdim=True)}

        def step():
            state["tok"] = session.decode(state["tok"]).argmax(-1, keepdim=True)

        result = _time_steps(step, warmup, steps, device)
    return result, opt


def _bytes_per_step(model: torch.nn.Module, batch: int, kv_tokens: float, dtype: torch.dtype) -> float:
    c = model.config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv = 2 * c.n_layers * batch * c.n_kv_heads * c.head_dim * kv_tokens * torch.finfo(dtype).bits / 8
    return weights + kv


def main(
    *,
    size: str = "small",
    device: str = "cpu",
    dtype: str = "bf16",
    batch: int = 1,
    prompt_len: int = 32,
    tokens: int = 64,
    warmup: int = 4,
    variants: str = ",".join(_VARIANTS),
    smoke: bool = False,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    if threads:
        torch.set_num_threads(threads)
    if smoke:
        size, prompt_len, tokens, warmup = "tiny", 8, 8, 2
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    names = [v for v in variants.split(",") if v]
    unknown = sorted(set(names) - set(_VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; pick from {_VARIANTS}")
    torch.manual_seed(0)
    model = _llama(size, tdtype, device)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=device)
    max_len = prompt_len + warmup + tokens + 8
    bandwidth = measure_read_bandwidth(device, nbytes=(1 << 28) if smoke else (1 << 30))
    bytes_step = _bytes_per_step(model, batch, prompt_len + warmup + tokens / 2, tdtype)

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for name in names:
        torch._dynamo.reset()
        try:
            if name == "eager":
                first, per = _run_growing(model, prompt, warmup, tokens, device)
            elif name == "compile":
                first, per = _run_growing(torch.compile(model), prompt, warmup, tokens, device)
            elif name == "hf_static":
                hf = _hf_llama(model, tdtype, device)
                first, per = _run_hf_static(hf, prompt, max_len, warmup, tokens, device)
                del hf
            else:
                (first, per), opt = _run_mmgen(model, prompt, max_len, warmup, tokens, device)
                graphs = getattr(opt, "_mmgen_report", None)
                notes.append(
                    f"mmgen compiled {graphs.graphs_compiled if graphs else '?'} graph(s); "
                    f"unique Dynamo graphs {torch._dynamo.utils.counters['stats']['unique_graphs']}"
                )
        except Exception as exc:  # noqa: BLE001 - a failed column is reported, not fatal
            rows.append({"variant": name, "status": f"failed: {type(exc).__name__}: {exc}"[:200]})
            print(rows[-1], flush=True)
            continue
        finally:
            gc.collect()
        achieved = bytes_step / per
        rows.append(
            {
                "variant": name,
                "tokens/s": batch / per,
                "ms/step": per * 1e3,
                "compile_s": first,
                "GB/s": achieved / 1e9,
                "roofline": achieved / bandwidth,
            }
        )
        print(rows[-1], flush=True)
    base = next((r for r in rows if r["variant"] == "eager" and "tokens/s" in r), None)
    for r in rows:
        if base and "tokens/s" in r:
            r["vs eager"] = r["tokens/s"] / base["tokens/s"]
    header = (
        f"llama {size}, {dtype}, batch {batch}, prompt {prompt_len}, {tokens} timed decode steps; "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {bytes_step / 1e6:.1f} MB read per step"
    )
    path = write_results(
        "bench_decode" + ("-smoke" if smoke else f"-{size}"),
        "Decode throughput: eager vs compile vs HF StaticCache vs mmgen",
        [(header, rows)],
        device=device,
        notes="\n".join(f"- {n}" for n in notes),
    )
    print(header)
    for r in rows:
        print(r)
    print(f"results: {path}")
    return rows


def _parse() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--variants", default=",".join(_VARIANTS))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    return vars(p.parse_args())


if __name__ == "__main__":
    main(**_parse())
