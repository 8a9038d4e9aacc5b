"""The public verbs: :func:`optimize`, the ``"mmgen"`` backend and :func:`explain`.

``optimize`` prepares the module (levers that act on the module before capture: static
KV caches, weight_norm folding), then returns ``torch.compile(model, backend=...)`` with
our backend bound to the config. The backend runs the ``"dynamo"`` stage passes on the
captured graph, then hands it to Inductor's ``compile_fx`` with our per-stage
:class:`PassManager` objects in ``config_patches``: nothing global is changed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .config import OptimizeConfig
from .graph_utils import GraphPass, PassReport
from .pass_manager import PassManager, passes_for

log = logging.getLogger("torch_mmgen_opt")

__all__ = ["explain", "mmgen_backend", "optimize", "resolve_config"]


def resolve_config(config: OptimizeConfig | None, overrides: dict[str, Any]) -> OptimizeConfig:
    """``config`` with keyword ``overrides`` applied, validated."""
    if config is not None and not isinstance(config, OptimizeConfig):
        raise TypeError(f"config must be an OptimizeConfig, got {type(config).__name__}")
    return OptimizeConfig.from_options({"config": config, **overrides})


def _check_levers(config: OptimizeConfig) -> None:
    """Levers that exist as fields but are not built yet must say so, never do nothing."""
    # -- quantization (passes/quantize_linear.py): QuantizeConfig validates itself
    # -- LayerSkip (passes/skip_layers.py, runtime/speculative.py)
    # The full model compiles with every layer; the draft graph is derived from the same
    # module when it is needed (runtime.speculative.attach_draft / generate(speculative=)).
    # -- static KV cache (runtime/static_cache.py)
    # Sizes are validated by OptimizeConfig; the model's convention in _prepare_module.


def _device_of_inputs(example_inputs: Sequence[Any]) -> torch.device:
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def inductor_patches(
    config: OptimizeConfig,
    device: torch.device,
    report: PassReport | None = None,
    passes: Sequence[GraphPass] | None = None,
) -> dict[str, Any]:
    """The ``config_patches`` for ``compile_fx``: our pass managers and compile options."""
    from torch._inductor import config as inductor_config
    from torch._inductor import list_mode_options

    patches: dict[str, Any] = {}
    if device.type == "cpu" and config.decode_gemv and config.quantize is not None:
        # decode_gemv's int8 kernel, built once per machine; before the pass managers,
        # whose uuid records whether the op may appear in the graph
        from torch_mmgen_opt.kernels import cpu_gemv

        cpu_gemv.ensure_loaded()
    for stage, key in (("joint", "joint_custom_pre_pass"), ("post_grad", "post_grad_custom_post_pass")):
        stage_passes = (
            [p for p in passes if p.stage == stage] if passes is not None else passes_for(config, stage)
        )
        if stage_passes:
            patches[key] = PassManager(stage, stage_passes, config, report)
    mode = config.compile.mode
    if mode not in (None, "default"):
        patches.update(list_mode_options(mode))
    if config.compile.freezing is not None:
        patches["freezing"] = config.compile.freezing
    if not config.compile.input_asserts:
        # Dynamo's guards already check every input; the generated code's own per-call
        # asserts are ~1.5 us an input (a decode step has one input per weight)
        for key in ("size_asserts", "alignment_asserts"):
            if hasattr(inductor_config, key):
                patches[key] = False
    cuda_graphs = config.cuda_graphs
    if cuda_graphs is None:
        cuda_graphs = config.static_kv or mode == "reduce-overhead"
    patches["triton.cudagraphs"] = bool(cuda_graphs) and device.type == "cuda"
    return patches


def mmgen_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    config: OptimizeConfig | None = None,
    report: PassReport | None = None,
    passes: Sequence[GraphPass] | None = None,
) -> Callable[..., Any]:
    """The ``"mmgen"`` Dynamo backend.

    Reached as ``torch.compile(m, backend="mmgen", mode=..., options={...})`` (``options``
    holds :class:`OptimizeConfig` fields or ``config=``) or bound by :func:`optimize`.
    ``passes`` replaces the registered passes (tests inject passes this way).
    """
    from torch._inductor.compile_fx import compile_fx

    if config is None:
        config = OptimizeConfig.from_options(options)
    elif options:
        config = OptimizeConfig.from_options({"config": config, **options})
    if mode is not None and mode != config.compile.mode:
        config = config.replace(compile=dataclasses.replace(config.compile, mode=mode))
    device = _device_of_inputs(example_inputs)
    if report is not None:
        report.graphs_compiled += 1
    dynamo_passes = (
        [p for p in passes if p.stage == "dynamo"] if passes is not None else passes_for(config, "dynamo")
    )
    if dynamo_passes:
        PassManager("dynamo", dynamo_passes, config, report).run_on_module(gm, example_inputs)
    patches = inductor_patches(config, device, report, passes)
    return compile_fx(gm, example_inputs, config_patches=patches)


def _prepare_module(model: nn.Module, config: OptimizeConfig) -> None:
    """Module-level preparation that must happen before capture (static caches, ...)."""
    # -- weight_norm folding (runtime/prepare.py)
    from .runtime.prepare import fold_weight_norm_

    fold_weight_norm_(model)  # in place, outputs unchanged: weights are constant at inference
    # -- static KV cache (runtime/static_cache.py)
    if config.static_kv:
        from .runtime.static_cache import install_static_cache_

        install_static_cache_(
            model, max_batch_size=config.max_batch_size, max_seq_len=config.max_seq_len
        )
    # -- quantization (passes/quantize_linear.py)
    if config.quantize is not None:
        # Swap the chosen nn.Linear of this instance for QuantizedLinear so the float
        # weights are released; the graph pass then counts them (and handles functions).
        from torch_mmgen_opt.passes.quantize_linear import quantize_linear_

        quantize_linear_(model, config)
    # -- packed float32 CPU linears (kernels/packed_linear.py), opt-in for plain models
    if config.pack_linear:
        from .kernels.packed_linear import pack_linears_

        pack_linears_(model, config.pack_linear, rows=config.max_batch_size)
    # -- few-row CPU linears through our panel kernel (kernels/gemv_linear.py), opt-in
    if config.gemv_kernel:
        from .kernels.gemv_linear import gemv_linears_

        gemv_linears_(model)


def _compile(target: Any, config: OptimizeConfig) -> Any:
    report = PassReport()
    backend = functools.partial(mmgen_backend, config=config, report=report)
    compiled = torch.compile(
        target,
        backend=backend,
        fullgraph=config.compile.fullgraph,
        dynamic=config.compile.dynamic,
    )
    # OptimizedModule.__setattr__ forwards to the wrapped module; keep our attributes on the
    # wrapper so two optimize() calls on one model do not share a report.
    object.__setattr__(compiled, "_mmgen_config", config)
    object.__setattr__(compiled, "_mmgen_report", report)
    return compiled


def optimize(model: Any = None, *, config: OptimizeConfig | None = None, **overrides: Any) -> Any:
    """Optimize a model for generation inference; returns the compiled module.

    Usable as a function (``optimize(model, quantize="int8")``), as a bare decorator
    (``@optimize``) and as a decorator with arguments (``@optimize(config=cfg)``), on an
    ``nn.Module`` instance, an ``nn.Module`` class (the decorated name then builds
    optimized instances) or a plain function. The user's class is never edited.

    Args:
        model: the module, module class or function; ``None`` to get a decorator.
        config: an :class:`OptimizeConfig`; keyword ``overrides`` are applied on top.
    """
    cfg = resolve_config(config, overrides)
    if model is None:
        return functools.partial(optimize, config=cfg)
    if isinstance(model, type):
        if not issubclass(model, nn.Module):
            raise TypeError(
                f"optimize() decorates nn.Module classes, instances or functions; got class "
                f"{model.__name__}"
            )
        return _optimized_class(model, cfg)
    if isinstance(model, nn.Module):
        # A model (or pipeline of models) that knows how to optimize its parts.
        hook = getattr(model, "__mmgen_optimize__", None)
        if hook is not None:
            return hook(cfg)
        _check_levers(cfg)
        _prepare_module(model, cfg)
        compiled = _compile(model, cfg)
        if cfg.layer_skip is not None:
            from .runtime.speculative import attach_draft

            attach_draft(compiled)  # compiled.draft: the early-exit graph, compiled lazily
        return compiled
    if callable(model):
        _check_levers(cfg)
        return _compile(model, cfg)
    raise TypeError(
        f"optimize() takes an nn.Module, an nn.Module class or a function, got {type(model).__name__}"
    )


def _optimized_class(cls: type[nn.Module], config: OptimizeConfig) -> Callable[..., Any]:
    @functools.wraps(cls, updated=())
    def build(*args: Any, **kwargs: Any) -> Any:
        return optimize(cls(*args, **kwargs), config=config)

    build.__mmgen_wrapped_class__ = cls
    return build


def explain(model: Any) -> PassReport:
    """Which passes fired where, for a model returned by :func:`optimize`.

    Events are collected as graphs compile, so call the model once first. A graph served
    from Inductor's FX graph cache runs no pass and adds no event.
    """
    report = getattr(model, "_mmgen_report", None)
    if report is None:
        raise TypeError(
            "explain() needs a model returned by torch_mmgen_opt.optimize(); for "
            "torch.compile(backend='mmgen') read torch._dynamo.utils.counters['mmgen']"
        )
    return report
