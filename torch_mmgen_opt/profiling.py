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
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

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

CLASSES = ("linear", "attention", "norm", "elementwise", "kv_cache", "conv", "other", "idle")

_PHASE_PREFIX = "## mmgen phase: "
_RUN_SPAN = "## mmgen run ##"
_CURRENT: contextvars.ContextVar[CharacterizationReport | None] = contextvars.ContextVar(
    "mmgen_characterization", default=None
)

# --------------------------------------------------------------------------- classification

_LINEAR_OPS = {
    "linear", "mm", "addmm", "addmv", "mv", "dot", "einsum", "_int_mm", "_weight_int8pack_mm",
    "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu", "_weight_int4pack_mm_with_scales_and_zeros",
    "_convert_weight_to_int4pack", "_convert_weight_to_int4pack_for_cpu", "_addmm_activation",
    "mkldnn_linear", "_linear_pointwise", "qlinear_pointwise", "_scaled_mm", "_mixed_dtypes_linear",
}
_ATTENTION_OPS = {
    "bmm", "baddbmm", "softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax",
    "scaled_dot_product_attention",
}
_NORM_OPS = {
    "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm",
    "native_group_norm", "batch_norm", "native_batch_norm", "_batch_norm_impl_index",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "instance_norm",
    "_weight_norm", "_weight_norm_interface", "norm", "linalg_vector_norm", "rsqrt",
}
_KV_OPS = {
    "index_copy", "index_copy_", "index_select", "index_put", "index_put_", "_index_put_impl_",
    "_unsafe_index_put", "scatter", "scatter_", "slice_scatter", "select_scatter", "copy_",
}
_CONV_OPS = {
    "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "mkldnn_convolution", "cudnn_convolution",
    "_convolution_pointwise", "slow_conv2d_forward", "_slow_conv2d_forward",
    "slow_conv_transpose2d", "slow_conv3d_forward", "_conv_depthwise2d",
    "convolution_overrideable", "cudnn_convolution_transpose",
}
_ELEMENTWISE_OPS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "pow", "exp", "log",
    "sqrt", "reciprocal", "silu", "silu_", "gelu", "relu", "relu_", "tanh", "sigmoid", "erf",
    "sin", "cos", "abs", "clamp", "clamp_", "maximum", "minimum", "where", "masked_fill",
    "masked_fill_", "mean", "sum", "amax", "max", "min", "var", "std", "to", "_to_copy",
    "type_as", "clone", "contiguous", "fill_", "zero_", "leaky_relu", "elu", "hardtanh",
    "glu", "square", "rsub", "lerp", "addcmul", "cumsum", "tril", "triu", "eq", "ne", "lt",
    "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "bitwise_not", "cat",
    "stack", "_foreach_add", "dropout", "native_dropout", "softplus", "mish", "hardswish",
}
_GEMM_KERNEL = re.compile(r"gemm|gemv|cutlass|cublas|xmma|splitk|int8pack|int4pack")
_CONV_KERNEL = re.compile(r"conv|fprop|dgrad|wgrad")
_ATTN_KERNEL = re.compile(r"softmax|flash|fmha|attention|attn|sdpa|flex")
_KV_KERNEL = re.compile(r"index_copy|index_put|scatter|indexselect|index_select|catarray")
_NORM_KERNEL = re.compile(r"rsqrt|norm(?!al)")
_ELEMENTWISE_KERNEL = re.compile(r"fused|elementwise|vectorized|reduce|copy|poi_|red_|per_")


def _is_op(name: str) -> bool:
    """Operator events (aten/custom ops, Inductor kernels) as opposed to framework spans."""
    if name.startswith("#") or name.startswith("Torch-Compiled") or name.startswith("TorchDynamo"):
        return False
    if "::" in name:
        return True
    return "cpp_fused" in name or name.startswith(("triton_", "cpp_", "kernel_cpp"))


def classify_op(name: str, *, cat_dim: int | None = None, child_names: Sequence[str] = ()) -> str:
    """The operator class (one of :data:`CLASSES` but ``idle``) of a profiler event name.

    Args:
        name: an operator name (``aten::mm``, ``mylib::decode_attention``) or a kernel
            name (``graph_0_cpp_fused__softmax_add_0``, ``triton_red_fused_mean_rsqrt_1``,
            ``ampere_bf16_s16816gemm_...``).
        cat_dim: for ``aten::cat``, the ``dim`` argument when known: a concatenation along
            the last dim (``rotate_half``, feature concat) is ``elementwise``; any other
            dim is a cache append (``kv_cache``).
        child_names: names of the events the op called; ``aten::matmul`` calling ``bmm``
            is attention (batched, e.g. ``q @ k^T``), calling ``mm`` it is linear.
    """
    low = name.lower()
    ns, sep, base = low.rpartition("::")
    if sep:
        base = base.split(".")[0]
        if base == "cat":
            return "elementwise" if cat_dim == -1 else "kv_cache"
        if base in ("matmul", "einsum"):
            batched = any(c.rsplit("::", 1)[-1] in ("bmm", "baddbmm") for c in child_names)
            return "attention" if batched else "linear"
        for cls, ops in (
            ("linear", _LINEAR_OPS),
            ("attention", _ATTENTION_OPS),
            ("conv", _CONV_OPS),
            ("norm", _NORM_OPS),
            ("kv_cache", _KV_OPS),
            ("elementwise", _ELEMENTWISE_OPS),
        ):
            if base in ops:
                return cls
        if base.startswith("_scaled_dot_product") or base.startswith(("_flash", "_efficient_att")):
            return "attention"
        if ns in ("aten", "prims"):
            return "other"
        # custom ops: by the words in their name
        return _classify_kernel(base, default="other")
    return _classify_kernel(re.sub(r"^graph_\d+_", "", low), default="elementwise")


def _classify_kernel(name: str, default: str) -> str:
    tokens = set(re.split(r"[^a-z0-9]+", name))
    if _ATTN_KERNEL.search(name) or tokens & {"bmm", "baddbmm"}:
        return "attention"
    if _CONV_KERNEL.search(name):
        return "conv"
    if _GEMM_KERNEL.search(name) or tokens & {"mm", "addmm", "linear", "matmul"}:
        return "linear"
    if _KV_KERNEL.search(name):
        return "kv_cache"
    if _NORM_KERNEL.search(name):
        return "norm"
    if _ELEMENTWISE_KERNEL.search(name):
        return "elementwise"
    return default


@contextlib.contextmanager
def kernel_profiling() -> Iterator[None]:
    """Compile inside this block to make Inductor's C++ kernels visible to the profiler
    (``torch._inductor.config.cpp.enable_kernel_profile``). Triton kernels on GPU are
    always visible. Costs a few ns per kernel call when no profiler runs."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        yield


# --------------------------------------------------------------------------- the report


@dataclass
class PhaseStats:
    """One phase: ``calls`` entries (decode steps for ``decode``), ``tokens`` produced or
    consumed, ``wall_s`` measured around the phase (host clock, device synchronised),
    ``classes``: seconds per operator class, ``idle`` included."""

    name: str
    calls: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    classes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0.0))

    @property
    def accounted_s(self) -> float:
        return sum(self.classes.values())


class CharacterizationReport:
    """Where the time went, per phase and per operator class. Built by :func:`characterize`.

    ``info`` holds what the workload recorded with :meth:`note` (batch, prompt length,
    generated tokens, final sequence length...); ``notes`` what the analysis could not do.
    """

    def __init__(self, label: str = "", device: str = "cpu") -> None:
        self.label = label
        self.device = device
        self.phases: dict[str, PhaseStats] = {}
        self.info: dict[str, Any] = {}
        self.notes: list[str] = []
        self._recording = False
        self._open: str | None = None
        self.run_wall_s = 0.0

    # -- used by the workload while it runs
    @contextlib.contextmanager
    def phase(self, name: str, *, tokens: int = 0) -> Iterator[None]:
        """Mark a phase of the workload: ``with report.phase("decode", tokens=B): step()``.

        Repeated entries accumulate (one call per decode step). Nested marks are ignored.
        """
        if not self._recording or self._open is not None:
            yield
            return
        from torch.profiler import record_function

        _sync(self.device)
        self._open = name
        t0 = time.perf_counter()
        try:
            with record_function(f"{_PHASE_PREFIX}{name} ##"):
                yield
                _sync(self.device)
        finally:
            self._open = None
            stats = self.phases.setdefault(name, PhaseStats(name))
            stats.calls += 1
            stats.tokens += int(tokens)
            stats.wall_s += time.perf_counter() - t0

    def note(self, **info: Any) -> None:
        """Record facts about the run (sequence lengths, batch, ...)."""
        self.info.update(info)

    # -- results
    @property
    def total_s(self) -> float:
        return sum(p.wall_s for p in self.phases.values())

    def class_totals(self) -> dict[str, float]:
        out = dict.fromkeys(CLASSES, 0.0)
        for p in self.phases.values():
            for c, s in p.classes.items():
                out[c] += s
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "device": self.device,
            "info": dict(self.info),
            "notes": list(self.notes),
            "total_s": self.total_s,
            "classes_s": self.class_totals(),
            "phases": {
                n: {"calls": p.calls, "tokens": p.tokens, "wall_s": p.wall_s,
                    "classes_s": dict(p.classes)}
                for n, p in self.phases.items()
            },
        }

    def rows(self) -> list[dict[str, Any]]:
        """One table row per phase plus a total: ms, ms per call, % per class."""
        rows = []
        items = list(self.phases.values())
        total = PhaseStats("total", calls=sum(p.calls for p in items),
                           tokens=sum(p.tokens for p in items), wall_s=self.total_s,
                           classes=self.class_totals())
        for p in [*items, total]:
            acc = p.accounted_s or 1.0
            row: dict[str, Any] = {
                "phase": p.name, "calls": p.calls, "tokens": p.tokens,
                "wall ms": 1e3 * p.wall_s, "ms/call": 1e3 * p.wall_s / max(p.calls, 1),
            }
            for c in CLASSES:
                row[f"{c} %"] = 100.0 * p.classes[c] / acc
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        from_info = ", ".join(f"{k}={v}" for k, v in self.info.items())
        head = f"**{self.label or 'characterization'}** ({self.device}" + (
            f"; {from_info})" if from_info else ")"
        )
        lines = [head, "", _markdown_table(self.rows())]
        idle = "wall time not covered by any kernel" if self.device.startswith("cuda") else (
            "wall time outside top-level operators (Python/framework overhead)"
        )
        lines.append(f"Class shares are of the profiled time; idle = {idle}.")
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path, **kwargs: Any) -> Path:
        return plot_characterization([self], path, **kwargs)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={1e3 * p.wall_s:.1f}ms/{p.calls}" for n, p in self.phases.items())
        return f"CharacterizationReport({self.label!r}, {self.device}, {parts})"


@contextlib.contextmanager
def phase(name: str, *, tokens: int = 0) -> Iterator[None]:
    """Mark a phase for the characterization in progress; a no-op otherwise.

    Runtimes call this around their prefill and each decode step, so that
    ``characterize`` of a ``generate`` call splits prefill from decode.
    """
    report = _CURRENT.get()
    if report is None:
        yield
        return
    with report.phase(name, tokens=tokens):
        yield


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


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


def _classify_event(ev: Any) -> str:
    name = ev.name
    cat_dim = None
    if name == "aten::cat":
        concrete = getattr(ev, "concrete_inputs", None) or []
        if len(concrete) > 1 and isinstance(concrete[1], int):
            cat_dim = concrete[1]
    children = [c.name for c in ev.cpu_children] if name in ("aten::matmul", "aten::einsum") else ()
    return classify_op(name, cat_dim=cat_dim, child_names=children)


def _kernel_class(top: Any, kernel_name: str) -> str:
    """A kernel's class: that of the top-level op that launched it, else its own name's
    (kernels launched by Inductor's wrapper or a CUDA graph replay)."""
    if top is None:
        return classify_op(kernel_name)
    cls = _classify_event(top)
    if cls == "other" and not top.name.startswith("aten::"):
        cls = classify_op(kernel_name)
    return cls


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


# --------------------------------------------------------------------------- figure

_COLORS = {
    "linear": "#1f77b4", "attention": "#d62728", "norm": "#9467bd", "elementwise": "#2ca02c",
    "kv_cache": "#ff7f0e", "conv": "#8c564b", "other": "#7f7f7f", "idle": "#dddddd",
}


_WHOLE = "\0whole"


def _whole(report: CharacterizationReport) -> PhaseStats:
    return PhaseStats(_WHOLE, calls=1, wall_s=report.total_s, classes=report.class_totals())


def plot_characterization(
    reports: Sequence[CharacterizationReport],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Stacked bars, one bar per report (before/after), split by operator class: a
    "whole run" panel (milliseconds per run, comparable even when the reports mark
    different phases) then one panel per phase (milliseconds per call, i.e. per decode
    step for ``decode``; phases under 5% of a run only count in the whole). Writes a PNG."""
    if not reports:
        raise ValueError("plot_characterization needs at least one report")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    for r in reports:
        names += [n for n in r.phases if n not in names
                  and r.phases[n].wall_s >= 0.05 * r.total_s]  # slivers only in "whole run"
    if len(names) > 1 or any(set(r.phases) != set(names) for r in reports):
        names.insert(0, _WHOLE)
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 + 2.2 * len(names) * max(1, len(reports) / 2), 4.2),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, r in enumerate(reports):
            p = _whole(r) if name == _WHOLE else r.phases.get(name)
            if p is None:
                continue
            acc = p.accounted_s or 1.0
            bottom = 0.0
            for c in CLASSES:
                h = 1e3 * p.wall_s / max(p.calls, 1) * p.classes[c] / acc
                ax.bar(i, h, bottom=bottom, color=_COLORS[c], edgecolor="white", linewidth=0.5,
                       hatch="//" if c == "idle" else None, label=c)
                bottom += h
        ax.set_xticks(range(len(reports)), [r.label or f"#{i}" for i, r in enumerate(reports)],
                      rotation=20, ha="right", fontsize=8)
        per = "step" if name == "decode" else ("run" if name == _WHOLE else "call")
        if name == _WHOLE:
            ax.set_title("whole run", fontsize=9)
        else:
            calls = "/".join(str(r.phases[name].calls) for r in reports if name in r.phases)
            ax.set_title(f"{name} ({calls} calls)", fontsize=9)
        ax.set_ylabel(f"ms per {per}", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    fig.legend([seen[c] for c in CLASSES if c in seen], [c for c in CLASSES if c in seen],
               loc="center right", fontsize=8, frameon=False)
    dev = reports[0].device
    fig.suptitle(title or f"Where the time goes ({dev}; idle = "
                 + ("GPU waiting for the host)" if dev.startswith("cuda") else "framework overhead)"),
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.85, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
