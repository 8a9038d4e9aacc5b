"""Quantize linear layers: int8 / int4 weight-only, int8 dynamic, or per layer by measuring.

What it matches
    ``torch._C._nn.linear`` / ``F.linear`` calls in the Dynamo graph whose weight is a 2-D
    float ``nn.Parameter`` (a placeholder whose real input is that Parameter, or a
    ``get_attr`` of one) used by nothing but linear calls. Each becomes one
    ``torch.ops.mmgen.quantized_linear`` node reading int8/int4 buffers registered on the
    GraphModule. Left alone, with a ``linear_skipped`` event: computed weights (not a
    placeholder), buffers and user inputs (not a Parameter), tied/reused weights (another
    user, e.g. the embedding), layers filtered out by ``QuantizeConfig.include`` /
    ``exclude`` / ``include_output``, and shapes a kernel cannot take (one warning per graph
    naming them).

Where it runs, and why
    Stage ``"dynamo"``. There Dynamo has lifted parameters to placeholders and
    ``ctx.example_inputs`` holds the real Parameter objects, so the pass quantizes real
    weights and knows which module owns them (``nn_module_stack``, placeholder names), and
    the packed weights enter AOT autograd as buffers of the GraphModule, i.e. graph inputs:
    the FX graph cache hashes their metadata, not their bytes, and needs no freezing (a
    post-grad pass would need ``freezing=True`` to see constant weights, which bypasses the
    FX graph cache). The pass manager's uuid already covers the config. CPU kernels are
    shipped aten ops that read the packed weight themselves, so Inductor's C++ GEMM
    templates (which need freezing) are not needed either.

Memory
    A graph pass cannot drop the float weights: the user's module owns them. So
    :func:`torch_mmgen_opt.optimize` first calls :func:`quantize_linear_` on the instance
    (never its class): each chosen ``nn.Linear`` is replaced in its parent by a
    :class:`~torch_mmgen_opt.kernels.quant.QuantizedLinear` holding only the int8/int4
    buffers. Dynamo then captures ``mmgen.quantized_linear`` nodes directly, which this pass
    counts, and layers ``quantize_linear_`` skipped stay skipped (the decision is stored on
    the Parameter). Through ``torch.compile(backend="mmgen")`` alone the pass quantizes in
    the graph and the float weights stay alive in the user's module (documented).

Auto
    ``scheme="auto"`` times float, int8, int4 and int8_dynamic on the layer's shape at the
    decode length (M=1) and the prefill lengths, on the current device, and keeps the
    candidate with the smallest geometric-mean time relative to float whose SQNR against
    float (random Gaussian calibration input) is at least ``min_sqnr_db``. Timings depend on
    the shape only and are cached in ``<cache_dir>/autoquant.json`` keyed by device, torch
    version, dtype, scheme and shape: a second run measures nothing.

Invariants relied on: Dynamo graph (``example_inputs`` aligned with placeholders, the
``nn_module_stack`` meta); ``torch.ops.mmgen.quantized_linear`` is CompositeImplicitAutograd
so AOT autograd decomposes it into the shipped kernels.

Counters: ``linear_quantized`` (per layer in each compiled graph, detail = scheme),
``linear_skipped`` (detail = reason), ``autoquant_choice_<scheme>`` (``float`` included).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from torch_mmgen_opt.config import OptimizeConfig, QuantizeConfig
from torch_mmgen_opt.graph_utils import GraphPass, PassContext, is_target
from torch_mmgen_opt.kernels import quant

log = logging.getLogger("torch_mmgen_opt")

__all__ = ["PASS", "choose_scheme", "quantize_linear_"]

_LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
_OUTPUT_HEAD_NAMES = ("lm_head", "output", "head", "embed_out", "output_projection")
_DEFAULT_PREFILL_LENGTHS = (32, 128)
_CANDIDATES = ("float", "int8", "int4", "int8_dynamic")

# A decision per Parameter: a QuantizedWeight, or the reason it stays float.
Decision = quant.QuantizedWeight | str


# ------------------------------------------------------------------------- selection


def _is_output_head(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _OUTPUT_HEAD_NAMES


def _filter_reason(name: str, qcfg: QuantizeConfig, is_output: bool) -> str | None:
    """Why the user's filters exclude layer ``name`` (``None``: selected)."""
    if is_output and not qcfg.include_output:
        return "output head (QuantizeConfig.include_output=False)"
    if qcfg.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in qcfg.include):
        return "not matched by QuantizeConfig.include"
    if any(fnmatch.fnmatchcase(name, p) for p in qcfg.exclude):
        return "matched by QuantizeConfig.exclude"
    return None


def _prefill_lengths(config: OptimizeConfig) -> tuple[int, ...]:
    qcfg = config.quantize
    if qcfg.auto_lengths is not None:
        return qcfg.auto_lengths
    buckets = [b for b in (config.prefill_buckets or _DEFAULT_PREFILL_LENGTHS) if b > 1]
    # At most two prefill lengths (the smallest and the largest up to 512) keep auto cheap.
    buckets = [b for b in buckets if b <= 512] or buckets[:1]
    return (1, *sorted({buckets[0], buckets[-1]})) if buckets else (1,)


# ------------------------------------------------------------------------------ auto


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} x{torch.get_num_threads()} threads"


def _cache_path(qcfg: QuantizeConfig) -> Path:
    root = qcfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "torch_mmgen_opt")
    return Path(root) / "autoquant.json"


def _load_cache(path: Path) -> dict[str, float]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, table: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: concurrent processes never read half a file


def _time_seconds(fn: Any, device: torch.device, repeats: int = 5) -> float:
    """Median seconds per call after two warm-up calls (device synchronised)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def _measure(
    scheme: str, n: int, k: int, m: int, dtype: torch.dtype, device: torch.device, group: int
) -> float:
    """Seconds per call of ``scheme`` at ``(m, k) x (k, n)`` on random data (shape-only)."""
    w = torch.randn(n, k, dtype=dtype, device=device)
    x = torch.randn(m, k, dtype=dtype, device=device)
    if scheme == "float":
        return _time_seconds(lambda: F.linear(x, w), device)
    qw = quant.quantize_weight(w, scheme, group)
    return _time_seconds(
        lambda: quant.quantized_linear(
            x, qw.scheme, qw.group_size, qw.qweight, qw.scales, None, qw.out_features
        ),
        device,
    )


def choose_scheme(
    weight: torch.Tensor, config: OptimizeConfig
) -> tuple[str, dict[str, Any], dict[str, quant.QuantizedWeight]]:
    """``"auto"`` for one weight ``(N, K)``: the fastest accurate candidate.

    Returns ``(scheme, detail, quantized)``: the winner (``"float"`` possible), a dict with
    each candidate's SQNR (dB) and relative time, and the quantized weights built.
    """
    qcfg = config.quantize
    n, k = weight.shape
    device, dtype = weight.device, weight.dtype
    lengths = _prefill_lengths(config)
    path = _cache_path(qcfg)
    table = _load_cache(path)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x_cal = torch.randn(32, k, generator=gen).to(device=device, dtype=dtype)  # (32, K)
    ref = F.linear(x_cal, weight)
    detail: dict[str, Any] = {}
    built: dict[str, quant.QuantizedWeight] = {}
    scores: dict[str, float] = {}
    dirty = False
    for scheme in _CANDIDATES:
        if scheme != "float":
            if quant.check_weight(weight, scheme, qcfg.group_size) is not None:
                continue
            qw = quant.quantize_weight(weight, scheme, qcfg.group_size)
            out = quant.quantized_linear(
                x_cal, qw.scheme, qw.group_size, qw.qweight, qw.scales, None, n
            )
            err = (ref.double() - out.double()).norm()
            db = float("inf") if err == 0 else 20 * math.log10(ref.double().norm() / err)
            detail[f"{scheme}_sqnr_db"] = round(db, 1)
            if db < qcfg.min_sqnr_db:
                continue
            built[scheme] = qw
        times = []
        for m in lengths:
            group = qcfg.group_size if scheme == "int4" else 0
            key = f"{_device_key(device)}|torch {torch.__version__}|{dtype}|{scheme}{group or ''}|M={m}|N={n}|K={k}"
            if key not in table:
                table[key] = _measure(scheme, n, k, m, dtype, device, qcfg.group_size)
                dirty = True
            times.append(table[key])
        scores[scheme] = times  # type: ignore[assignment]
    if dirty:
        _save_cache(path, table)
    base = scores["float"]
    rel = {
        s: math.exp(statistics.fmean(math.log(t / b) for t, b in zip(ts, base)))
        for s, ts in scores.items()
    }
    detail.update({f"{s}_rel_time": round(r, 3) for s, r in rel.items()})
    return min(rel, key=rel.__getitem__), detail, built


# --------------------------------------------------------------------------- decide


def _decide(
    weight: torch.Tensor, name: str, is_output: bool, config: OptimizeConfig, shape_skips: list
) -> Decision:
    """Quantize ``weight`` for layer ``name`` or say why not; cached on the Parameter so
    module preparation, every graph and every recompile agree and quantize once."""
    qcfg = config.quantize
    stored = getattr(weight, "_mmgen_quant", None)
    if stored is not None and stored[0] == qcfg:
        return stored[1]
    reason = _filter_reason(name, qcfg, is_output)
    decision: Decision
    if reason is not None:
        decision = reason
    elif qcfg.scheme == "auto":
        if weight.dtype not in quant.FLOAT_DTYPES:
            quant.quantize_weight(weight, "int8")  # raises the dtype ValueError
        scheme, detail, built = choose_scheme(weight.detach(), config)
        log.info("mmgen autoquant %s %s: %s %s", name, tuple(weight.shape), scheme, detail)
        decision = built[scheme] if scheme != "float" else "auto: float is fastest"
    else:
        shape_reason = quant.check_weight(weight, qcfg.scheme, qcfg.group_size)
        if shape_reason is not None:
            shape_skips.append(f"{name} {tuple(weight.shape)}: {shape_reason}")
            decision = f"kernel constraint: {shape_reason}"
        else:
            decision = quant.quantize_weight(weight.detach(), qcfg.scheme, qcfg.group_size)
    weight._mmgen_quant = (qcfg, decision)  # type: ignore[attr-defined]
    return decision


def _warn_shape_skips(shape_skips: Sequence[str], scheme: str) -> None:
    if shape_skips:
        log.warning(
            "quantize=%r: %d linear layer(s) left in float, their shapes do not fit the "
            "kernel: %s", scheme, len(shape_skips), "; ".join(shape_skips),
        )


def _check_not_all_group_skipped(shape_skips: Sequence[str], n_selected: int, qcfg) -> None:
    if qcfg.scheme == "int4" and n_selected and len(shape_skips) == n_selected and all(
        "group_size" in s for s in shape_skips
    ):
        raise ValueError(
            f"int4 group_size={qcfg.group_size} divides the in_features of none of the "
            f"{n_selected} selected layers; pass QuantizeConfig(group_size=32) (or 64)"
        )


# ------------------------------------------------------------------ module preparation


@torch.no_grad()
def quantize_linear_(model: nn.Module, config: OptimizeConfig | QuantizeConfig | str) -> dict:
    """Replace, in place, each selected ``nn.Linear`` of ``model`` by a ``QuantizedLinear``
    whose buffers hold the int8/int4 weight; the float weight is released.

    Only the instance is changed (submodules swapped in their parents), never a class. A
    weight shared with another module (tied embeddings) or another layer is left alone.

    Returns ``{layer name: scheme or reason it stayed float}``.
    """
    if isinstance(config, str):
        config = QuantizeConfig(scheme=config)
    if isinstance(config, QuantizeConfig):
        config = OptimizeConfig(quantize=config)
    qcfg = config.quantize
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}".lstrip("."))
    out_head = getattr(model, "get_output_embeddings", lambda: None)()
    result: dict[str, str] = {}
    shape_skips: list[str] = []
    selected = 0
    float32_cpu = False
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        w = mod.weight
        if len(owners.get(id(w), ())) > 1:
            others = [o for o in owners[id(w)] if o != f"{name}.weight"]
            result[name] = f"weight shared with {', '.join(others)}"
            w._mmgen_quant = (qcfg, result[name])
            continue
        is_output = mod is out_head or _is_output_head(name)
        selected += _filter_reason(name, qcfg, is_output) is None
        decision = _decide(w, name, is_output, config, shape_skips)
        if isinstance(decision, str):
            result[name] = decision
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quant.QuantizedLinear.from_linear(mod, decision))
        float32_cpu = float32_cpu or (w.dtype == torch.float32 and w.device.type == "cpu")
        del w._mmgen_quant  # the Parameter is being dropped; keep nothing alive through it
        result[name] = decision.scheme
    _check_not_all_group_skipped(shape_skips, selected, qcfg)
    _warn_shape_skips(shape_skips, qcfg.scheme)
    if qcfg.scheme in ("int8", "int4") and float32_cpu:
        decode = (" Compiled decode steps (at most 8 rows a matmul) use this package's int8 "
                  "kernel instead (passes/decode_gemv.py); prefill and eager calls do not."
                  if qcfg.scheme == "int8" else "")
        log.warning(
            "quantize=%r on a float32 CPU model: torch's CPU weight-only kernels have no fast "
            "float32 path (measured ~20x slower than with bfloat16 activations at 4x512 -> "
            "2048); use a bfloat16 model, or quantize='auto' which times each layer.%s",
            qcfg.scheme, decode,
        )
    return result


# ------------------------------------------------------------------------- the pass


def _module_path(node: fx.Node) -> tuple[str, type | None]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", None
    path, cls = list(stack.values())[-1]
    path = re.sub(r"^L\['self'\]\.?|^L__self___?", "", str(path))
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).strip(".")
    return path, cls if isinstance(cls, type) else None


def _param_name(placeholder: fx.Node) -> str:
    """``l_self_modules_layers_modules_0_modules_mlp_parameters_w_`` -> ``layers.0.mlp.w``."""
    name = re.sub(r"^[lL]_self_", "", placeholder.name)
    match = re.match(r"^(modules_.*?)?_?parameters_(.+)_$", name)
    if not match:
        return placeholder.name
    mods = (match.group(1) or "").removeprefix("modules_")
    parts = [p for p in mods.split("_modules_") if p] + [match.group(2)]
    return ".".join(parts)


def _weight_param(
    weight: Any, ctx: PassContext, inputs: dict[fx.Node, Any]
) -> tuple[nn.Parameter | None, str]:
    """The Parameter behind a linear's weight argument and its name, or (None, reason)."""
    if not isinstance(weight, fx.Node):
        return None, "weight is not a graph value"
    if weight.op == "placeholder":
        real = inputs.get(weight)
        if isinstance(real, nn.Parameter):
            return real, _param_name(weight)
        return None, "weight is not a parameter (buffer or input)"
    if weight.op == "get_attr" and ctx.gm is not None:
        real = _get_attr(ctx.gm, str(weight.target))
        if isinstance(real, nn.Parameter):
            return real, str(weight.target)
        return None, "weight is not a parameter (buffer or constant)"
    return None, "weight is computed in the graph"


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _add_buffer(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` on a Dynamo GraphModule as AOT autograd expects of a lifted
    buffer: with a (unique) source, which also marks it static for CUDA graphs."""
    from torch._dynamo.source import ConstantSource

    gm.register_buffer(name, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        sources[name] = ConstantSource(f"mmgen_quantized.{name}")


def _quantize_graph(graph: fx.Graph, ctx: PassContext) -> int:
    config = ctx.config
    qcfg = config.quantize
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, ctx.example_inputs or ()))
    shape_skips: list[str] = []
    rewrites = 0
    for node in list(graph.nodes):
        if is_target(node, torch.ops.mmgen.quantized_linear):
            scheme = node.args[1]
            ctx.record("linear_quantized", node, f"{scheme} (prepared module)")
            if qcfg.scheme == "auto":
                ctx.record(f"autoquant_choice_{scheme}", node)
            continue
        if not is_target(node, *_LINEAR_TARGETS):
            continue
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        param, name = _weight_param(weight, ctx, inputs)
        if param is None:
            ctx.record("linear_skipped", node, name)
            continue
        if any(not is_target(u, *_LINEAR_TARGETS) or u.args[1] is not weight for u in weight.users):
            ctx.record("linear_skipped", node, f"{name}: weight also used elsewhere (tied)")
            continue
        mod_path, mod_cls = _module_path(node)
        layer = mod_path if mod_cls is nn.Linear and mod_path else name.removesuffix(".weight")
        decision = _decide(param, layer, _is_output_head(layer), config, shape_skips)
        if isinstance(decision, str):
            if qcfg.scheme == "auto" and decision.startswith("auto"):
                ctx.record("autoquant_choice_float", node, layer)
            ctx.record("linear_skipped", node, f"{layer}: {decision}")
            continue
        assert ctx.gm is not None, "the dynamo stage always provides the GraphModule"
        prefix = f"_mmgen_q_{re.sub(r'[^0-9a-zA-Z_]', '_', layer)}"
        for suffix in ("qweight", "scales"):
            _add_buffer(ctx.gm, f"{prefix}_{suffix}", getattr(decision, suffix))
        with graph.inserting_before(node):
            qweight = graph.get_attr(f"{prefix}_qweight")
            scales = graph.get_attr(f"{prefix}_scales")
            new = graph.call_function(
                torch.ops.mmgen.quantized_linear.default,
                (x, decision.scheme, decision.group_size, qweight, scales, bias,
                 decision.out_features),
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        ctx.record("linear_quantized", new, f"{layer}: {decision.scheme}")
        if qcfg.scheme == "auto":
            ctx.record(f"autoquant_choice_{decision.scheme}", new, layer)
        rewrites += 1
    _warn_shape_skips(shape_skips, qcfg.scheme)
    return rewrites


PASS = GraphPass(
    name="quantize_linear",
    stage="dynamo",
    fn=_quantize_graph,
    enabled=lambda cfg: cfg.quantize is not None,
    source_file=__file__,
)
