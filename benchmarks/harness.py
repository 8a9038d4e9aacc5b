"""The main benchmark: every optimization lever, stacked, per workload, with characterization.

    python -m benchmarks.harness                      # llama small, bf16, CPU (< 10 min)
    python -m benchmarks.harness --smoke              # tiny model, few tokens (< 1 min)
    python -m benchmarks.harness --device cuda --size 7b
    python -m benchmarks.harness --workload all --rows eager,mmgen,static_kv

Rows, each adding one lever to the ones above it that worked (see docs/benchmarking.md):

    eager      the model as written: eager greedy decoding with its growing cache
    compile    torch.compile(model) with Inductor's defaults, same decode loop
    mmgen      torch_mmgen_opt.optimize(model): our graph passes (attention fusion ...)
    static_kv  + optimize(static_kv=True): static KV cache, one decode graph, generate()
               (+ CUDA graphs on GPU; on CPU + gemv_kernel=True: the decode step's linears
               through our panel kernel, kernels/gemv_linear.py)
    quantize   + optimize(quantize="auto")
    layerskip  + generate(speculative=LayerSkip(...)): self-speculative decoding

A lever whose implementation is missing (``NotImplementedError``/``ImportError``) is
shown as "not available: <reason>" and dropped from the stack below it; one that raises
anything else as "failed: <reason>". Every row is measured in this process, after a
warm-up (its first call, compile included, is reported apart), as medians over repeats;
ratios are against the eager row of the same run. The eager baseline and the last
working configuration are characterized (``torch_mmgen_opt.characterize``). Results go
to ``benchmarks/results/harness-<device>-<date>.md`` with PNG figures beside it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import logging
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._dynamo.utils import counters

import torch_mmgen_opt as mmgen
from torch_mmgen_opt import profiling

from . import common

log = logging.getLogger("torch_mmgen_opt")

ROWS = ("eager", "compile", "mmgen", "static_kv", "quantize", "layerskip")
ROW_LABELS = {
    "eager": "eager (baseline)",
    "compile": "torch.compile (Inductor)",
    "mmgen": "+ mmgen passes (attention fusion)",
    "static_kv": "+ static KV cache (+ CUDA graphs on GPU, panel kernel on CPU)",
    "quantize": "+ quantization (auto)",
    "layerskip": "+ LayerSkip self-speculation",
}
# One compiled row: the smoke run stays under a minute (two graphs of the tiny model).
SMOKE_ROWS = ("eager", "static_kv")
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
           "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


# --------------------------------------------------------------------------- progress


class _Progress:
    """tqdm to stderr when installed, plain lines otherwise."""

    def __init__(self, total: int, desc: str) -> None:
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True)
        except ImportError:
            self._bar = None
            self._n, self._total, self._desc = 0, total, desc

    def step(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(what)
            self._bar.update(1)
        else:
            self._n += 1
            print(f"[{self._desc} {self._n}/{self._total}] {what}", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------- LM workloads


def greedy_loop(model: Any, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Eager-style greedy decoding with the model's growing cache, phases marked for
    :func:`torch_mmgen_opt.characterize`. Returns (B, max_new_tokens) new ids."""
    B, T = input_ids.shape
    with profiling.phase("prefill", tokens=B * T):
        out = model(input_ids)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    past, new = out.past_key_values, [tok]
    for _ in range(max_new_tokens - 1):
        with profiling.phase("decode", tokens=B):
            out = model(tok, past)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        past = out.past_key_values
        new.append(tok)
    return torch.cat(new, dim=1)


def _is_causal_lm(model: nn.Module) -> bool:
    params = inspect.signature(model.forward).parameters
    return "past_key_values" in params


def weight_bytes(module: nn.Module) -> int:
    """Bytes of weights read per decode step: parameters and buffers (quantized ones
    included), each storage once, not KV caches, not embedding tables (one row each); a
    ``GemvLinear``'s step reads its panels, not the float weight it keeps for more rows."""
    from torch_mmgen_opt.kernels.gemv_linear import GemvLinear

    lookups = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    matmuls = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    lookups |= {id(m.weight) for m in module.modules() if isinstance(m, GemvLinear)}
    seen, total = set(), 0
    tensors = list(module.named_parameters(remove_duplicate=False))
    tensors += list(module.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if "cache" in name.lower() or not isinstance(t, torch.Tensor):
            continue
        if id(t) in lookups and id(t) not in matmuls:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def kv_bytes_per_step(model: nn.Module, batch: int, prompt_len: int, new_tokens: int) -> int:
    """KV-cache bytes a decode step must read, averaged over the generation (ideal: only
    the valid positions), from a Llama-style ``model.config``; 0 if unknown."""
    cfg = getattr(model, "config", None)
    try:
        layers, kv_heads, head_dim = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    except AttributeError:
        return 0
    elem = next(model.parameters()).element_size()
    return int(2 * layers * batch * kv_heads * head_dim * elem * (prompt_len + new_tokens / 2))


# --------------------------------------------------------------------------- rows


@dataclass
class RowResult:
    key: str
    label: str
    stack: str = ""
    status: str = "ok"
    metrics: dict[str, Any] = field(default_factory=dict)
    tokens: torch.Tensor | None = None
    runner: Callable[[int], torch.Tensor] | None = None

    def table_row(self) -> dict[str, Any]:
        return {"row": self.label, "levers": self.stack, "status": self.status, **self.metrics}


def _unique_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg if len(msg) < 160 else msg[:157] + "..."


def _build_runner(key: str, base: nn.Module, stack: dict[str, Any], spec: Any) -> tuple[Callable[[torch.Tensor, int], torch.Tensor], nn.Module]:
    """(runner(ids, n) -> (B, n) ids, the module that holds the row's weights)."""
    if key == "eager":
        return (lambda ids, n: greedy_loop(base, ids, n)), base
    model = copy.deepcopy(base)
    # The growing cache changes shape every step: the decode loop rows compile with
    # dynamic shapes from the start (what Dynamo would switch to after one recompile).
    if key == "compile":
        compiled = torch.compile(model, dynamic=True)
        return (lambda ids, n: greedy_loop(compiled, ids, n)), model
    if stack.get("static_kv") or spec is not None:
        opt = mmgen.optimize(model, **stack)
        run = lambda ids, n: mmgen.generate(opt, ids, max_new_tokens=n, speculative=spec)
        run.optimized = opt
        return run, getattr(opt, "_orig_mod", model)
    opt = mmgen.optimize(model, **stack, compile=mmgen.CompileConfig(dynamic=True))
    return (lambda ids, n: greedy_loop(opt, ids, n)), getattr(opt, "_orig_mod", model)


def _measure(
    runner: Callable[[torch.Tensor, int], torch.Tensor],
    holder: nn.Module,
    ids: torch.Tensor,
    n: int,
    *,
    device: str,
    repeats: int,
    extra_bytes: int,
    read_bw: float,
) -> tuple[dict[str, Any], torch.Tensor]:
    B = ids.shape[0]
    g0 = _unique_graphs()
    with profiling.kernel_profiling():
        first_s, tokens = common.timed_first_call(lambda: runner(ids, n), device)
        runner(ids, 1)  # the one-token path (prefill only) compiles here too
    g1 = _unique_graphs()
    t_full = common.time_call(lambda: runner(ids, n), device=device, warmup=1, repeats=repeats)
    t_one = common.time_call(lambda: runner(ids, 1), device=device, warmup=0, repeats=repeats)
    recompiles = _unique_graphs() - g1
    # Below 2% of the run the difference is noise: say so rather than print a wild ratio.
    decode_s = (t_full - t_one) / max(n - 1, 1) if t_full - t_one > 0.02 * t_full else math.nan
    achieved = (weight_bytes(holder) + extra_bytes) / decode_s
    metrics = {
        "prefill ms": 1e3 * t_one,
        "decode ms/tok": 1e3 * decode_s,
        "decode tok/s": B / decode_s,
        "e2e ms": 1e3 * t_full,
        "compile s": max(first_s - t_full, 0.0),
        "graphs": g1 - g0,
        "recompiles": recompiles,
        "GB/s": achieved / 1e9,
        "% roofline": 100.0 * achieved / read_bw,
    }
    stats = _speculative_stats(runner)
    if stats is not None:
        metrics["accepted %"] = 100.0 * stats.acceptance_rate
    return metrics, tokens


def _mark_runtime_phases(runner: Any) -> None:
    """Mark prefill and decode inside ``torch_mmgen_opt.generate`` for the characterization
    until the runtime marks them itself (``profiling.phase``; then these outer marks win
    and the inner ones are ignored). Wraps methods of the optimized model's decode session
    and speculative decoders as instance attributes; their classes are not touched."""
    opt = getattr(runner, "optimized", None)
    if opt is None:
        return
    targets = [getattr(opt, "_mmgen_session", None)]
    targets += list((opt.__dict__.get("_mmgen_speculative") or {}).values())
    for obj in targets:
        for meth, name in (("prefill", "prefill"), ("decode", "decode"), ("speculate", "decode")):
            fn = getattr(obj, meth, None) if obj is not None else None
            if fn is None or getattr(fn, "_mmgen_phase", False):
                continue

            def wrapped(*args: Any, _fn: Any = fn, _name: str = name, **kwargs: Any) -> Any:
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                tokens = 0 if first is None else (first.numel() if _name == "prefill" else first.shape[0])
                with profiling.phase(_name, tokens=tokens):
                    return _fn(*args, **kwargs)

            wrapped._mmgen_phase = True
            setattr(obj, meth, wrapped)


def _speculative_stats(runner: Any) -> Any:
    """The acceptance statistics of the last speculative generation, if the runtime
    keeps them (``runtime/speculative.py``: decoders cached on the model)."""
    opt = getattr(runner, "optimized", None)
    for obj in (opt, getattr(opt, "_orig_mod", None)):
        decoders = getattr(obj, "__dict__", {}).get("_mmgen_speculative") if obj is not None else None
        for dec in (decoders or {}).values():
            if getattr(dec, "stats", None) is not None and dec.stats.drafted:
                return dec.stats
    return None


def run_workload(
    name: str,
    *,
    size: str,
    device: str,
    dtype: torch.dtype,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    rows: Sequence[str],
    read_bw: float,
    characterize: bool,
    layerskip_exit: int | None,
    num_speculations: int,
    progress: _Progress,
) -> dict[str, Any]:
    """All rows of one workload; returns rows, reports and notes."""
    with torch.device(device):  # weights drawn where they live: a 7B model on the CPU
        base = mmgen.models.build(name, size, dtype=dtype)  # first took ~75 s on the H100 box
    if not _is_causal_lm(base):
        raise NotImplementedError(
            f"{name}: no harness adapter (its forward takes no past_key_values); add one "
            "in benchmarks/harness.py"
        )
    cfg = base.config
    vocab = getattr(cfg, "vocab_size", 256)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    extra = kv_bytes_per_step(base, batch, prompt_len, new_tokens)
    max_seq_len = 1 << math.ceil(math.log2(prompt_len + new_tokens))
    n_layers = getattr(cfg, "n_layers", 4)
    exit_layer = layerskip_exit or max(1, n_layers // 4)
    results: list[RowResult] = []
    reports: list[profiling.CharacterizationReport] = []
    stack: dict[str, Any] = {}
    spec = None
    baseline: RowResult | None = None
    last_ok: RowResult | None = None
    for key in rows:
        trial, trial_spec = dict(stack), spec
        if key == "static_kv":
            trial.update(static_kv=True, max_seq_len=max_seq_len)
            if device == "cpu" and batch <= 8:  # the decode step's few rows: our panel kernel
                trial["gemv_kernel"] = True
        elif key == "quantize":
            trial["quantize"] = "auto"
        elif key == "layerskip":
            trial_spec = mmgen.LayerSkip(exit_layer=exit_layer, num_speculations=num_speculations)
            trial["layer_skip"] = trial_spec  # optimize(layer_skip=...) + generate(speculative=...)
        levers = ", ".join([*(f"{k}={v}" for k, v in trial.items()
                              if k not in ("max_seq_len", "layer_skip")),
                            *([f"speculative(E={exit_layer}, d={num_speculations})"] if trial_spec else [])])
        if key in ("eager", "compile"):
            levers = "-" if key == "eager" else "torch.compile(model)"
        row = RowResult(key, ROW_LABELS[key], stack=levers or "optimize(model)")
        progress.step(f"{name}: {key}")
        # Each row compiles the same forward code again: without a reset, Dynamo's
        # per-code-object recompile limit is reached after a few rows and later rows
        # would silently run eagerly.
        torch._dynamo.reset()
        try:
            runner, holder = _build_runner(key, base, trial, trial_spec)
            with torch.no_grad():
                row.metrics, row.tokens = _measure(
                    runner, holder, ids, new_tokens, device=device, repeats=repeats,
                    extra_bytes=extra, read_bw=read_bw,
                )
            row.runner = runner
        except (NotImplementedError, ImportError) as exc:
            row.status = f"not available: {_short(exc)}"
        except Exception as exc:  # a lever that breaks must not take the table down
            row.status = f"failed: {_short(exc)}"
            progress.write(f"{name}/{key} failed:\n{traceback.format_exc()}")
        if row.status == "ok":
            if key not in ("eager", "compile"):
                stack, spec = trial, trial_spec
            if baseline is None:
                baseline = row
            if last_ok is not None and last_ok is not baseline:
                last_ok.runner = None  # keep only the weights still needed (GPU memory)
            last_ok = row
            _compare(row, baseline, new_tokens)
        results.append(row)
        progress.write(f"{name}/{key}: {row.status} {_brief(row.metrics)}")
        runner = holder = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    notes = [f"{name} {size} in {str(dtype).removeprefix('torch.')}, batch {batch}, prompt "
             f"{prompt_len} tokens, {new_tokens} new tokens (greedy), {repeats} repeats; "
             f"LayerSkip exit layer {exit_layer} of {n_layers}, {num_speculations} drafts; "
             f"static cache {max_seq_len} slots; weights per step {weight_bytes(base) / 1e6:.1f} MB "
             f"+ KV {extra / 1e6:.2f} MB."]
    if characterize and baseline is not None:
        targets = [(baseline, "eager")]
        if last_ok is not baseline:
            targets.append((last_ok, f"final: {last_ok.key}"))
        for row, label in targets:
            progress.write(f"{name}: characterizing {label}")
            _mark_runtime_phases(row.runner)
            rep = profiling.characterize(
                None, (lambda r, run=row.runner: run(ids, new_tokens)), label=label,
                # one profiled run on CPU (each costs seconds at the small size); GPU runs are fast
                device=device, warmup=1, repeats=1 if device == "cpu" else 3,
            )
            rep.note(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                     final_seq_len=prompt_len + new_tokens)
            reports.append(rep)
    for row in results:
        row.runner = None
    return {"name": name, "rows": results, "reports": reports, "notes": notes}


def _compare(row: RowResult, baseline: RowResult, n: int) -> None:
    m, b = row.metrics, baseline.metrics
    m["speedup e2e"] = b["e2e ms"] / m["e2e ms"]
    m["speedup decode"] = b["decode ms/tok"] / m["decode ms/tok"]
    k = min(row.tokens.shape[1], baseline.tokens.shape[1])
    same = (row.tokens[:, :k].cpu() == baseline.tokens[:, :k].cpu()).all(0).int()
    agree = int(same.cumprod(0).sum()) if k else 0
    m["same tokens"] = f"{agree}/{n}"


def _brief(m: dict[str, Any]) -> str:
    if not m:
        return ""
    return (f"decode {m['decode ms/tok']:.2f} ms/tok, x{m.get('speedup decode', 1.0):.2f}, "
            f"compile {m['compile s']:.1f} s")


# --------------------------------------------------------------------------- main


def main(
    *,
    workload: Sequence[str] | str = ("llama",),
    size: str | None = None,
    device: str = "cpu",
    dtype: str = "bfloat16",
    batch: int = 1,
    prompt_len: int | None = None,
    new_tokens: int | None = None,
    repeats: int | None = None,
    rows: Sequence[str] | str | None = None,
    smoke: bool = False,
    characterize: bool = True,
    layerskip_exit: int | None = None,
    num_speculations: int = 4,
    threads: int | None = None,
    results_dir: str | Path | None = None,
) -> Path:
    """Run the harness; returns the path of the Markdown results file."""
    if isinstance(workload, str):
        workload = workload.split(",")
    if isinstance(rows, str):
        rows = rows.split(",")
    rows = tuple(rows or (SMOKE_ROWS if smoke else ROWS))
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; pass a subset of {ROWS}")
    rows = tuple(r for r in ROWS if r in rows)
    if rows[0] != "eager":
        raise ValueError("rows must include 'eager': every ratio is against it")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; pass one of {sorted(_DTYPES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    size = size or ("tiny" if smoke else ("7b" if device == "cuda" else "small"))
    prompt_len = prompt_len or (8 if smoke else (128 if device == "cuda" else 64))
    new_tokens = new_tokens or (6 if smoke else (128 if device == "cuda" else 64))
    repeats = repeats or (1 if smoke else 3)
    names = list(mmgen.models.WORKLOADS) if list(workload) == ["all"] else list(workload)

    read_bw = common.measure_read_bandwidth(device, nbytes=(1 << 26) if smoke else (1 << 30))
    progress = _Progress(total=len(names) * len(rows), desc="harness")
    done, notes = [], [
        f"Read bandwidth (roofline): {read_bw / 1e9:.1f} GB/s measured on the day "
        f"({'device copy' if device == 'cuda' else 'plain read'}). Ratios are against the "
        "eager row of the same run; decode ms/tok = (e2e - prefill) / (new tokens - 1); "
        "compile s = first call - steady call; graphs = graphs compiled during warm-up, "
        "recompiles = during the timed runs; GB/s = (weights + ideal KV bytes per step) / "
        "decode step time (an effective figure for LayerSkip); same tokens = leading "
        "tokens equal to eager's."
    ]
    for name in names:
        if name not in mmgen.models.WORKLOADS:
            notes.append(f"{name}: skipped, not in torch_mmgen_opt.models.WORKLOADS yet.")
            progress.step(f"{name}: absent")
            continue
        try:
            done.append(run_workload(
                name, size=size, device=device, dtype=_DTYPES[dtype], batch=batch,
                prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, rows=rows,
                read_bw=read_bw, characterize=characterize, layerskip_exit=layerskip_exit,
                num_speculations=num_speculations, progress=progress,
            ))
        except (NotImplementedError, ValueError) as exc:
            notes.append(f"{name}: skipped, {_short(exc)}")
    progress.close()
    return _write(done, notes, device=device, smoke=smoke, results_dir=results_dir)


def _write(done: list[dict[str, Any]], notes: list[str], *, device: str, smoke: bool,
           results_dir: str | Path | None) -> Path:
    name = "harness-smoke" if smoke else "harness"
    results_dir = Path(results_dir) if results_dir else None
    sections: list[tuple[str, Sequence[dict[str, Any]]]] = []
    for w in done:
        notes += w["notes"]
        sections.append((f"{w['name']}: stacked levers", [r.table_row() for r in w["rows"]]))
        for rep in w["reports"]:
            sections.append((f"{w['name']}: where the time goes, {rep.label}", rep.rows()))
    md = common.write_results(name, "Stacked optimization levers per workload", sections,
                              device=device, notes="\n\n".join(notes), results_dir=results_dir)
    items: list[tuple[str | None, Any]] = []
    try:
        from . import plots

        if done:
            items.append(("Decode speedup over eager and fraction of the roofline",
                          plots.plot_levers(done, common.figure_path(md, "levers"))))
        for w in done:
            if w["reports"]:
                items.append((f"{w['name']}: where the time goes (eager vs final)",
                              plots.plot_characterization(
                                  w["reports"], common.figure_path(md, f"{w['name']}-characterization"),
                                  title=f"{w['name']}: where the time goes")))
    except ImportError as exc:  # matplotlib missing: the tables still count
        items.append((None, f"(figures skipped: {_short(exc)}; pip install matplotlib)"))
    for w in done:
        items += [(None, rep.to_markdown()) for rep in w["reports"]]
    common.append_figures(md, items)
    print(md)
    return md


def _parse(argv: Sequence[str] | None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="llama",
                   help="comma-separated workloads, or 'all' (default llama)")
    p.add_argument("--size", default=None, help="model size (default small; tiny with --smoke; 7b on cuda)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--smoke", action="store_true", help="tiny model, few tokens, under a minute")
    p.add_argument("--no-characterize", dest="characterize", action="store_false")
    p.add_argument("--layerskip-exit", type=int, default=None)
    p.add_argument("--num-speculations", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results-dir", default=None)
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(**_parse(None))
