"""Characterization: where the time of a generation workload goes.

``characterize(model, workload)`` runs the workload once or more to warm up (compiles,
caches), then once under :mod:`torch.profiler` and splits the wall time of every
*phase* (prefill, decode, or the stages of a pipeline: encoder, decoder, vocoder...)
into operator classes plus idle time:

- ``linear`` (GEMMs: ``linear``, ``mm``, ``addmm``, quantized matmuls, cuBLAS/CUTLASS kernels),
  ``attention`` (SDPA and flash kernels, ``softmax``, batched matmuls ``bmm``/``baddbmm``),
  ``norm`` (layer/RMS/batch/group norm, ``rsqrt``), ``elementwise`` (pointwise ops,
  reductions, dtype casts, copies), ``kv_cache`` (``cat`` along a sequence dim,
  ``index_copy``, ``index_select``, ``index_put``, ``scatter``, an explicit top-level
  ``copy_``: cache appends, writes and beam reorders), ``conv``, ``other`` (embedding,
  views, allocation, argmax/sampling...).
- ``idle``: on CPU, *framework overhead*: the phase's wall time minus the time spent
  inside top-level operators (an operator counts with everything it calls; Python,
  ``nn.Module`` dispatch, Dynamo guards and Inductor's Python wrapper are idle). On GPU:
  the phase's wall time not covered by any kernel (the device waits for the host).

Operators are classified by name (:func:`classify_op`): aten ops, custom ops, and
Inductor's generated kernels (``cpp_fused_*``, ``triton_*``, by the ops fused into them).
Graph-level spans (``Torch-Compiled Region``, ``CompiledFunction``, ``## Call
CompiledFxGraph ... ##``) are framework, not operators. On CPU Inductor's C++ kernels only
appear in the profile when compiled under :func:`kernel_profiling`; otherwise their time
lands in ``other`` (a note in the report says so).

Phases are marked by the workload with :func:`phase` (a no-op outside a characterization,
so runtimes may mark their own prefill/decode steps) or by the report's
:meth:`CharacterizationReport.phase`; time outside any phase is reported as ``unmarked``
(``run`` when nothing was marked). Phases do not nest: an inner mark inside an open phase
is ignored.

Where the code lives: this module runs the workload under the profiler and accounts the
events (:func:`characterize`, :func:`kernel_profiling`); the report, the phase marks and
the table/figure renderings are in ``_profiling_report.py``; the operator classes and the
name rules are in ``_profiling_classify.py``. Import the public names (``__all__``) from
here.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.autograd import DeviceType

from ._profiling_classify import CLASSES, _classify_event, _is_op, _kernel_class, classify_op
from ._profiling_report import (
    _CURRENT,
    _PHASE_PREFIX,
    _RUN_SPAN,
    CharacterizationReport,
    PhaseStats,
    _sync,
    phase,
    plot_characterization,
)

log = logging.getLogger("torch_mmgen_opt")

__all__ = [
    "CLASSES",
    "CharacterizationReport",
    "PhaseStats",
    "characterize",
    "classify_op",
    "kernel_profiling",
    "phase",
    "plot_characterization",
]


@contextlib.contextmanager
def kernel_profiling() -> Iterator[None]:
    """Compile inside this block to make Inductor's C++ kernels visible to the profiler
    (``torch._inductor.config.cpp.enable_kernel_profile``). Triton kernels on GPU are
    always visible. Costs a few ns per kernel call when no profiler runs."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        yield



# --------------------------------------------------------------------------- characterize


def _lm_workload(model: Any, input_ids: torch.Tensor, max_new_tokens: int) -> Callable:
    """Eager greedy decoding with the model's own (growing) cache, phases marked."""
    B, T = input_ids.shape

    def run(report: CharacterizationReport) -> None:
        with phase("prefill", tokens=B * T):
            out = model(input_ids)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        past = out.past_key_values
        for _ in range(max_new_tokens - 1):
            with phase("decode", tokens=B):
                out = model(tok, past)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            past = out.past_key_values
        report.note(batch=B, prompt_len=T, new_tokens=max_new_tokens,
                    final_seq_len=T + max_new_tokens)

    return run


def characterize(
    model: Any,
    workload: torch.Tensor | Callable[[CharacterizationReport], Any] | Mapping[str, Callable[[], Any]],
    *,
    max_new_tokens: int = 16,
    label: str = "",
    device: str | torch.device | None = None,
    warmup: int = 1,
    repeats: int = 1,
    record_shapes: bool = True,
) -> CharacterizationReport:
    """Profile ``workload`` and report time per phase and per operator class.

    Args:
        model: the model (eager or compiled); used by the tensor form of ``workload`` and
            to infer the device.
        workload: one of
            - ``input_ids`` (B, T): greedy generation of ``max_new_tokens`` with the
              model's own cache, ``model(ids, past_key_values) -> (logits, past)``;
              phases ``prefill`` (1 call) and ``decode`` (one call per step);
            - a callable ``fn(report)`` that runs the workload and marks its phases with
              ``report.phase(name)`` or :func:`phase` (and may ``report.note(...)``);
            - a mapping ``{stage name: zero-argument callable}`` run in order, one phase
              per stage (``{"encoder": ..., "decoder": ..., "vocoder": ...}``).
        max_new_tokens: tokens to generate (tensor workload only).
        label: a name for the report (``"eager"``, ``"optimized"``).
        device: ``"cpu"`` or ``"cuda"``; default the model's parameters' device.
        warmup: unprofiled runs first (compilation, allocator and cache warm-up).
        repeats: profiled runs; the report of the run with the median wall time is
            returned (one preempted run on a busy machine does not skew it).
        record_shapes: record op arguments (lets ``cat`` along the last dim be told
            apart from cache appends); costs a little profiler overhead.
    """
    if device is None:
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
    device = str(torch.device(device))
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if isinstance(workload, torch.Tensor):
        if workload.dim() != 2 or workload.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"a tensor workload must be input_ids of shape (B, T) and an integer dtype, "
                f"got {tuple(workload.shape)} {workload.dtype}; pass a callable for other inputs"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        run = _lm_workload(model, workload, max_new_tokens)
    elif isinstance(workload, Mapping):
        stages = dict(workload)

        def run(report: CharacterizationReport) -> None:
            for name, fn in stages.items():
                with report.phase(name):
                    fn()
    elif callable(workload):
        run = workload
    else:
        raise TypeError(
            "workload must be input_ids (B, T), a callable fn(report) or a mapping "
            f"{{stage: fn}}, got {type(workload).__name__}"
        )

    with torch.no_grad():
        for _ in range(warmup):
            run(CharacterizationReport(label, device))
        reports = [_profile_once(run, label, device, record_shapes) for _ in range(repeats)]
    # the run with the median wall time: robust to a preempted run on a busy machine
    reports.sort(key=lambda r: r.run_wall_s)
    return reports[(len(reports) - 1) // 2]


def _profile_once(
    run: Callable[[CharacterizationReport], Any], label: str, device: str, record_shapes: bool
) -> CharacterizationReport:
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    report = CharacterizationReport(label, device)
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    # One profiler warm-up iteration absorbs the profiler's own start-up cost.
    with profile(activities=activities, record_shapes=record_shapes,
                 schedule=schedule(wait=0, warmup=1, active=1)) as prof:
        run(CharacterizationReport(label, device))
        prof.step()
        token = _CURRENT.set(report)
        report._recording = True
        try:
            _sync(device)
            t0 = time.perf_counter()
            with record_function(_RUN_SPAN):
                run(report)
                _sync(device)
            report.run_wall_s = time.perf_counter() - t0
        finally:
            report._recording = False
            _CURRENT.reset(token)
    _account(report, prof.events())
    return report


def _account(report: CharacterizationReport, events: Sequence[Any]) -> None:
    """Fill ``report.phases[*].classes`` from the profiler's event tree."""
    gpu = report.device.startswith("cuda")
    kernel_profiled = any(("cpp_fused" in e.name or e.name.startswith("cpp_")) for e in events)
    compiled_seen = False
    run_spans = [e for e in events if e.name == _RUN_SPAN]
    if not run_spans:
        report.notes.append("the profiler recorded no run span; nothing accounted")
        return
    run_span = max(run_spans, key=lambda e: e.time_range.elapsed_us())
    # owner[event id] = (phase name, top-level op or None): for mapping GPU kernels.
    owner: dict[int, tuple[str, Any]] = {}
    cpu_classes: dict[str, dict[str, float]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}

    def visit(ev: Any, phase_name: str, top: Any, acc: dict[str, float]) -> None:
        nonlocal compiled_seen
        owner[ev.id] = (phase_name, top)
        if top is None and _is_op(ev.name):
            top = ev
            owner[ev.id] = (phase_name, top)
            acc[_classify_event(ev)] += ev.time_range.elapsed_us() * 1e-6
        elif top is None and ev.name.startswith("## Call CompiledFxGraph"):
            compiled_seen = True
            if not kernel_profiled and not gpu:
                inner = sum(c.time_range.elapsed_us() for c in ev.cpu_children)
                acc["other"] += (ev.time_range.elapsed_us() - inner) * 1e-6
        for child in ev.cpu_children:
            visit(child, phase_name, top, acc)

    unmarked = "unmarked" if any(
        c.name.startswith(_PHASE_PREFIX) for c in run_span.cpu_children) else "run"
    for child in run_span.cpu_children:
        if child.name.startswith(_PHASE_PREFIX):
            name = child.name[len(_PHASE_PREFIX):-3]
            spans.setdefault(name, []).append((child.time_range.start, child.time_range.end))
        else:
            name = unmarked
        visit(child, name, None, cpu_classes.setdefault(name, dict.fromkeys(CLASSES, 0.0)))

    # wall of the unmarked remainder (host clock)
    rest = report.run_wall_s - report.total_s
    if unmarked in cpu_classes and (unmarked == "run" or rest > 0.005 * report.run_wall_s):
        report.phases[unmarked] = PhaseStats(unmarked, calls=1, wall_s=max(rest, 0.0))
    span_wall = {n: sum(e - s for s, e in iv) * 1e-6 for n, iv in spans.items()}
    span_wall[unmarked] = run_span.time_range.elapsed_us() * 1e-6 - sum(span_wall.values())

    if gpu:
        gpu_classes = _account_kernels(events, owner, spans, run_span, unmarked, report.notes)
    for name, stats in report.phases.items():
        wall = span_wall.get(name, 0.0)
        if gpu:
            classes, busy = gpu_classes.get(name, (dict.fromkeys(CLASSES, 0.0), 0.0))
            classes = dict(classes)
            classes["idle"] = max(wall - busy, 0.0)
        else:
            classes = dict(cpu_classes.get(name, dict.fromkeys(CLASSES, 0.0)))
            classes["idle"] = max(wall - sum(classes.values()), 0.0)
        stats.classes = classes
    if compiled_seen and not kernel_profiled and not gpu:
        report.notes.append(
            "Inductor's C++ kernels were not profiled, their time is in 'other': compile "
            "under torch_mmgen_opt.profiling.kernel_profiling() to split it by class"
        )


def _is_annotation(ev: Any) -> bool:
    """Spans the profiler mirrors on the device timeline (``record_function`` ranges,
    compiled-region markers): not kernels."""
    if getattr(ev, "is_user_annotation", False):
        return True
    name = ev.name
    return name.startswith(("#", "Torch-Compiled", "TorchDynamo", "CompiledFunction", "ProfilerStep"))


def _account_kernels(
    events: Sequence[Any],
    owner: dict[int, tuple[str, Any]],
    spans: dict[str, list[tuple[float, float]]],
    run_span: Any,
    unmarked: str,
    notes: list[str],
) -> dict[str, tuple[dict[str, float], float]]:
    """GPU: kernel time per phase and class, and the busy time (union of kernel intervals)
    per phase. A kernel is joined to its launching op by correlation id, else through the
    op's ``kernels`` list (same name and duration), else classified by its own name; its
    phase is the phase span it ran in (phases synchronise the device at both ends)."""
    by_kernel: dict[tuple[str, float], list[str]] = {}
    seen: set[int] = set()
    for ev in events:
        if ev.device_type != DeviceType.CPU or ev.id not in owner or id(ev) in seen:
            continue
        seen.add(id(ev))
        _, top = owner[ev.id]
        for k in getattr(ev, "kernels", ()) or ():
            by_kernel.setdefault((k.name, float(k.duration)), []).append(_kernel_class(top, k.name))
    windows = sorted((s, e, n) for n, iv in spans.items() for s, e in iv)
    run_lo, run_hi = run_span.time_range.start, run_span.time_range.end

    def phase_at(t: float) -> tuple[str, float, float] | None:
        for s, e, n in windows:
            if s <= t < e:
                return n, s, e
        return (unmarked, run_lo, run_hi) if run_lo <= t < run_hi else None

    per_phase: dict[str, list[tuple[float, float, str]]] = {}
    joined = total = 0
    for ev in events:
        if ev.device_type == DeviceType.CPU or _is_annotation(ev):
            continue
        where = phase_at(ev.time_range.start)
        if where is None:
            continue
        total += 1
        name, lo, hi = where
        launcher = owner.get(getattr(ev, "linked_correlation_id", 0) or -1)
        queue = by_kernel.get((ev.name, float(ev.time_range.end - ev.time_range.start)))
        if launcher is not None:
            cls, joined = _kernel_class(launcher[1], ev.name), joined + 1
        elif queue:
            cls, joined = queue.pop(), joined + 1
        else:
            cls = classify_op(ev.name)
        s, e = max(ev.time_range.start, lo), min(ev.time_range.end, hi)
        if e > s:
            per_phase.setdefault(name, []).append((s, e, cls))
    if total and joined < total:
        notes.append(f"{total - joined} of {total} kernels were classified by their own name "
                     "(launching operator unknown)")
    out = {}
    for name, kernels in per_phase.items():
        classes = dict.fromkeys(CLASSES, 0.0)
        for s, e, cls in kernels:
            classes[cls] += (e - s) * 1e-6
        busy, cur_s, cur_e = 0.0, None, None
        for s, e, _ in sorted(kernels):
            if cur_e is None or s > cur_e:
                busy += 0.0 if cur_e is None else cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        busy = (busy + (cur_e - cur_s)) * 1e-6 if cur_e is not None else 0.0
        total_s = sum(classes.values())
        if total_s > busy > 0:  # kernels overlapped (several streams): scale to the busy time
            classes = {c: v * busy / total_s for c, v in classes.items()}
        out[name] = (classes, busy)
    return out
