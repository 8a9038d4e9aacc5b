"""Chameleon-style image generation with classifier-free guidance: tokens/s of the eager
reference loop against ``optimize(static_kv=True)`` + ``generate()``, same run.

Every step decodes the three guidance streams of each prompt as one batch (3P rows) and
picks one image token per prompt (temperature 0.7, top-p 0.9, text scale 3.0, image scale
1.2). Rows: eager (growing ``torch.cat`` cache), ``generate()`` uncompiled (static cache,
eager kernels), and ``optimize(static_kv=True)`` (one static decode graph, CUDA graphs on
GPU). Image tokens/s counts tokens per prompt (what a user waits for); weight GB/s is
weight bytes read per step over the step time, against the measured read bandwidth.
A greedy run checks that optimized and eager produce identical tokens.

    .venv/bin/python -m benchmarks.bench_chameleon --smoke
    .venv/bin/python -m benchmarks.bench_chameleon --size small                # CPU benchmark
    .venv/bin/python -m benchmarks.bench_chameleon --device cuda --size 7b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

from benchmarks.common import (
    markdown_table,
    measure_read_bandwidth,
    time_call,
    timed_first_call,
    write_results,
)


def main(
    size: str = "small",
    device: str = "cpu",
    dtype: str = "float32",
    prompts: int = 1,
    image_tokens: int | None = None,
    repeats: int = 3,
    threads: int | None = None,
    smoke: bool = False,
    write: bool = True,
) -> dict[str, Any]:
    import torch_mmgen_opt as mmgen
    from torch_mmgen_opt.models import build
    from torch_mmgen_opt.runtime.cfg import cfg_streams, generate_image

    if smoke:
        size, prompts, image_tokens, repeats = "tiny", 1, 16, 2
    if threads:
        torch.set_num_threads(threads)
    model = build("chameleon", size, dtype=getattr(torch, dtype), device=device)
    cfg = model.config
    n = image_tokens or cfg.image_seq_len
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(3, cfg.text_vocab_size, (12 + 3 * i,), generator=g) for i in range(prompts)]
    prompt_len = cfg_streams(model, texts)[0].shape[1]
    bucket = 1 << (prompt_len - 1).bit_length()  # next power of two

    def run(m: Any, *, eager: bool = False, strategy: str = "sample") -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(0)
        return generate_image(m, texts, num_tokens=n, eager=eager, strategy=strategy,
                              generator=gen)

    opt = mmgen.optimize(
        copy.deepcopy(model), static_kv=True, max_batch_size=3 * prompts,
        max_seq_len=bucket + n, prefill_buckets=(bucket,),
    )
    compile_s, _ = timed_first_call(lambda: run(opt), device)
    variants = {
        "eager (growing cache)": lambda: run(model, eager=True),
        "generate(), uncompiled": lambda: run(model),
        "optimize(static_kv=True) + generate()": lambda: run(opt),
    }
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = measure_read_bandwidth(device)
    rows, base = [], None
    for name, fn in variants.items():
        seconds = time_call(fn, device=device, warmup=1, repeats=repeats)
        base = base or seconds
        step = seconds / n
        rows.append({
            "variant": name,
            "image tokens / s": prompts * n / seconds,
            "ms / step": 1e3 * step,
            "speedup vs eager": base / seconds,
            "weight GB/s": weight_bytes / step / 1e9,
            "of read roofline": weight_bytes / step / bandwidth,
        })
    same = torch.equal(run(model, eager=True, strategy="greedy"), run(opt, strategy="greedy"))
    facts = [{
        "size": size, "dtype": dtype, "prompts": prompts, "rows per step": 3 * prompts,
        "image tokens": n, "prompt bucket": bucket, "weights MB": weight_bytes / 1e6,
        "read GB/s (measured)": bandwidth / 1e9, "compile s (first call)": compile_s,
        "greedy tokens identical": same,
    }]
    result = {"rows": rows, "facts": facts}
    if write:
        path = write_results(
            f"chameleon-{size}", f"Chameleon image generation with CFG ({size}), eager vs "
            "optimize()",
            [("Image generation (median of repeats, same run)", rows), ("Run", facts)],
            device=device,
            notes="One image per prompt, three guidance streams decoded as one batch. Ratios "
            "are measured in this run; compile time is the optimized first call.",
        )
        result["path"] = str(path)
    return result


def _parse() -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--image-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-write", dest="write", action="store_false")
    return vars(p.parse_args())


if __name__ == "__main__":
    out = main(**_parse())
    print(markdown_table(out["rows"]))
    print(markdown_table(out["facts"]))
    if "path" in out:
        print(f"written to {out['path']}")
