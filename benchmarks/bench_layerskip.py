"""LayerSkip self-speculative decoding on the shipped early-exit checkpoint.

``python -m benchmarks.bench_layerskip [--smoke] [--device cpu] [--no-compile]``

For every exit layer ``E`` and speculation count ``d`` of the grid: decode tokens/s, the
acceptance rate ``a`` (accepted drafts / drafted tokens), tokens per round, and next to
them the speedup expected from ``a``: ``(1 - a^(d+1)) / ((1 - a) (d c + 1))`` with ``c``
the cost of a draft step relative to a full step, both as ``E / L`` and as measured. Every
row checks that its tokens equal plain greedy decoding.

The grid runs the draft and verify graphs eagerly (the same graphs, no Inductor: a graph
pair per setting would take minutes to compile); the plain baseline and the best grid
setting are then compiled through the ``"mmgen"`` backend and compared in the same run.
Prefill (one eager forward) is timed apart from decoding.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.common import env_info, sync, write_results
from torch_mmgen_opt import LayerSkip
from torch_mmgen_opt.models.layerskip import llama_layerskip
from torch_mmgen_opt.runtime.speculative import SpeculativeDecoder
from torch_mmgen_opt.train_layerskip import load_corpus


def expected_speedup(a: float, d: int, c: float) -> float:
    """Tokens per unit of full-model time: ``(1 - a^(d+1)) / ((1 - a)(d c + 1))``."""
    tokens = d + 1 if a >= 1.0 else (1 - a ** (d + 1)) / (1 - a)
    return tokens / (d * c + 1)


def held_out_prompts(n: int, length: int) -> list[torch.Tensor]:
    """``n`` prompts of ``length`` bytes, evenly spaced over the held-out stdlib files."""
    _, held, _ = load_corpus(heldout_every=20)
    stride = (held.numel() - length) // n
    return [held[i * stride : i * stride + length].long()[None] for i in range(n)]


def _timed(fn: Any, device: str) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def _step_seconds(dec: SpeculativeDecoder, exit_layer: int, compile: bool, device: str) -> float:
    """Median seconds of one T=1 step through the first ``exit_layer`` layers."""
    step = dec.step("draft", exit_layer, 1, compile=compile)
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.tensor([dec.max_seq_len - 8], device=device)
    with torch.no_grad():
        for _ in range(3):
            step(tok, pos)
        times = []
        for _ in range(20):
            t, _ = _timed(lambda: step(tok, pos), device)
            times.append(t)
    return statistics.median(times)


def run_config(
    dec: SpeculativeDecoder,
    prompts: list[torch.Tensor],
    layer_skip: LayerSkip | None,
    max_new_tokens: int,
    compile: bool,
    device: str,
) -> dict[str, Any]:
    """Decode every prompt; tokens/s over decoding (prefill excluded) and acceptance."""
    outs, decode_s, drafted, accepted, rounds = [], 0.0, 0, 0, 0
    for prompt in prompts:
        prompt = prompt.to(device)
        t_prefill, _ = _timed(lambda p=prompt: dec.prefill(p), device)
        if layer_skip is None:
            t, out = _timed(
                lambda p=prompt: dec.generate_plain(p, max_new_tokens=max_new_tokens, compile=compile),
                device,
            )
        else:
            t, out = _timed(
                lambda p=prompt: dec.generate(
                    p, layer_skip, max_new_tokens=max_new_tokens, compile=compile
                ),
                device,
            )
            drafted += dec.stats.drafted
            accepted += dec.stats.accepted
            rounds += dec.stats.rounds
        # generate() prefills too: remove one prefill (timed just before) from decode time
        decode_s += max(t - t_prefill, 1e-9)
        outs.append(out.cpu())
    n_tok = sum(o.shape[1] - 1 for o in outs)  # the first token comes from the prefill
    row: dict[str, Any] = {"tok/s": n_tok / decode_s}
    if layer_skip is not None:
        row["acceptance"] = accepted / drafted if drafted else float("nan")
        row["tokens/round"] = n_tok / rounds if rounds else float("nan")
    return {"row": row, "outs": outs}


def main(
    *,
    exit_layers: tuple[int, ...] = (2, 4, 6),
    speculations: tuple[int, ...] = (1, 2, 4),
    max_new_tokens: int = 64,
    num_prompts: int = 3,
    prompt_len: int = 64,
    device: str = "cpu",
    compile: bool = True,
    threads: int | None = 1,
    smoke: bool = False,
    write: bool = True,
) -> dict[str, Any]:
    if threads is not None:
        torch.set_num_threads(threads)
    if smoke:
        exit_layers, speculations = (2, 4), (2,)
        max_new_tokens, num_prompts, compile = 16, 1, False
    model = llama_layerskip(device=device)
    L = model.config.n_layers
    prompts = held_out_prompts(num_prompts, prompt_len)
    max_d = max(speculations)
    dec = SpeculativeDecoder(
        model, max_seq_len=prompt_len + max_new_tokens + max_d + 8, compile=False
    )

    # warm-up: captures of every shape (Dynamo only)
    warm = prompts[0][:, :8]
    dec.generate_plain(warm, max_new_tokens=4)
    for d in speculations:
        dec.generate(warm, LayerSkip(exit_layer=exit_layers[0], num_speculations=d), max_new_tokens=4)

    plain = run_config(dec, prompts, None, max_new_tokens, False, device)
    full_step = _step_seconds(dec, L, False, device)
    grid = []
    for E in exit_layers:
        c_measured = _step_seconds(dec, E, False, device) / full_step
        for d in speculations:
            ls = LayerSkip(exit_layer=E, num_speculations=d)
            res = run_config(dec, prompts, ls, max_new_tokens, False, device)
            row = res["row"]
            a = row["acceptance"]
            grid.append({
                "E": E, "d": d, **row,
                "speedup": row["tok/s"] / plain["row"]["tok/s"],
                "expected (c=E/L)": expected_speedup(a, d, E / L),
                "expected (c measured)": expected_speedup(a, d, c_measured),
                "c measured": c_measured,
                "same tokens": all(torch.equal(o, p) for o, p in zip(res["outs"], plain["outs"])),
            })
    best = max(grid, key=lambda r: r["tok/s"])
    sections = [
        ("Plain greedy decoding (eager graphs)", [{"variant": "plain", **plain["row"],
                                                   "full step ms": full_step * 1e3}]),
        ("Grid: self-speculative decoding (eager graphs)", grid),
    ]
    compiled_rows = []
    if compile:
        ls = LayerSkip(exit_layer=best["E"], num_speculations=best["d"])
        t_c_plain, _ = _timed(lambda: dec.step("draft", L, 1, compile=True), device)
        t_c_draft, _ = _timed(lambda: dec.step("draft", best["E"], 1, compile=True), device)
        t_c_verify, _ = _timed(lambda: dec.step("verify", best["E"], best["d"] + 1, compile=True), device)
        dec.generate_plain(warm, max_new_tokens=4, compile=True)
        dec.generate(warm, ls, max_new_tokens=4, compile=True)
        c_plain = run_config(dec, prompts, None, max_new_tokens, True, device)
        c_spec = run_config(dec, prompts, ls, max_new_tokens, True, device)
        compiled_rows = [
            {"variant": "plain (compiled)", **c_plain["row"], "speedup": 1.0,
             "compile s": t_c_plain},
            {"variant": f"LayerSkip E={best['E']} d={best['d']} (compiled)", **c_spec["row"],
             "speedup": c_spec["row"]["tok/s"] / c_plain["row"]["tok/s"],
             "compile s": t_c_draft + t_c_verify,
             "same tokens": all(torch.equal(o, p) for o, p in zip(c_spec["outs"], c_plain["outs"]))},
        ]
        sections.append(("Best grid setting against plain decoding, both compiled", compiled_rows))
    notes = (
        f"Checkpoint: torch_mmgen_opt/checkpoints/layerskip_llama.pt ({L} layers). "
        f"{num_prompts} held-out prompts of {prompt_len} bytes, {max_new_tokens} new tokens "
        "each, greedy. tok/s counts decoding only (prefill excluded). acceptance = accepted "
        "drafts / drafted tokens; expected = (1 - a^(d+1)) / ((1 - a)(d c + 1)). "
        "A round costs d+1 draft steps (the last writes the cache of the d-th draft) and "
        "one verify step over d+1 positions."
    )
    path = None
    if write:
        path = write_results(
            "layerskip" + ("-smoke" if smoke else ""), "LayerSkip self-speculative decoding",
            sections, device=device, notes=notes,
        )
    return {"plain": plain["row"], "grid": grid, "best": best, "compiled": compiled_rows,
            "path": path, "env": env_info(device)}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exit-layers", type=_ints, default=(2, 4, 6))
    p.add_argument("--speculations", type=_ints, default=(1, 2, 4))
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    result = main(
        exit_layers=a.exit_layers, speculations=a.speculations, max_new_tokens=a.max_new_tokens,
        num_prompts=a.num_prompts, prompt_len=a.prompt_len, device=a.device, compile=a.compile,
        threads=a.threads, smoke=a.smoke,
    )
    print(open(result["path"]).read() if result["path"] else result)
