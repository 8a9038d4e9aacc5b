"""Shared helpers for the test suite (and for users testing their own passes).

- :func:`aten_graph`: trace a function to the functional aten graph Inductor's
  ``joint_custom_pre_pass`` sees (Inductor's decompositions, fake-tensor ``meta["val"]``),
  so graph tests apply one pass in milliseconds, without Inductor codegen.
- :func:`apply_pass`: run one :class:`GraphPass` on such a graph through the same guard as
  the pass manager, and return the rewritten ``GraphModule`` ready to execute.
- :func:`trace_and_apply`: both, returning the counters and report the pass produced.
- :func:`mmgen_counters`: a fresh view of ``counters["mmgen"]``.
- :class:`TestCase`, :func:`run_tests`: PyTorch's Inductor test case (resets Dynamo and the
  counters between tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor.test_case import TestCase, run_tests

from ..config import OptimizeConfig
from ..graph_utils import GraphPass, PassContext, PassReport
from ..pass_manager import run_guarded

__all__ = [
    "TestCase",
    "apply_pass",
    "aten_graph",
    "count_targets",
    "greedy_reference",
    "mmgen_counters",
    "run_tests",
    "sqnr",
    "trace_and_apply",
]


def aten_graph(fn: Callable[..., Any], *args: Any) -> fx.GraphModule:
    """``fn`` traced to aten with Inductor's decompositions and fake-tensor metadata."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)


def apply_pass(
    graph_pass: GraphPass,
    gm: fx.GraphModule,
    config: OptimizeConfig | None = None,
    report: PassReport | None = None,
) -> int:
    """Apply ``graph_pass`` to ``gm`` in place (guarded); returns the rewrites it made."""
    config = config or OptimizeConfig()
    device = next(
        (n.meta["val"].device for n in gm.graph.nodes
         if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)),
        None,
    )
    ctx = PassContext(config=config, stage=graph_pass.stage, device=device, report=report, gm=gm)
    n = run_guarded(graph_pass, gm.graph, ctx)
    gm.recompile()
    return n


def trace_and_apply(
    graph_pass: GraphPass, fn: Callable[..., Any], *args: Any, config: OptimizeConfig | None = None
) -> tuple[fx.GraphModule, int, dict[str, int], PassReport]:
    """``fn`` traced with :func:`aten_graph`, then ``graph_pass`` applied: ``(graph module,
    rewrites, the ``mmgen`` counters it bumped, its report)``."""
    gm = aten_graph(fn, *args)
    report = PassReport()
    with mmgen_counters() as live:
        n = apply_pass(graph_pass, gm, config, report)
        counts = dict(live)
    return gm, n, counts, report


def count_targets(gm: fx.GraphModule, *targets: Any) -> int:
    """How many ``call_function`` nodes of ``gm`` call one of ``targets`` (packets match
    every overload)."""
    from ..graph_utils import is_target

    return sum(1 for n in gm.graph.nodes if is_target(n, *targets))


@contextlib.contextmanager
def mmgen_counters() -> Iterator[dict[str, int]]:
    """Clear ``counters["mmgen"]`` and yield it (live) for the block."""
    counters["mmgen"].clear()
    yield counters["mmgen"]


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(|ref| / |ref - out|)."""
    ref, out = ref.double(), out.double()
    noise = (ref - out).norm()
    if noise == 0:
        return float("inf")
    return (20 * torch.log10(ref.norm() / noise)).item()


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Plain eager greedy decoding with the model's own growing cache: (B, steps) new ids."""
    out = model(input_ids)
    past, new = out.past_key_values, []
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        new.append(tok)
        if len(new) == steps:
            break
        out = model(tok, past)
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(new, dim=1)
