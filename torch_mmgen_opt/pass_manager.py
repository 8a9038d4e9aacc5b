"""The pass manager: runs our graph passes at each stage, guarded, and tells Inductor's
caches who we are.

One :class:`PassManager` per stage is installed *per compile* through ``compile_fx``'s
``config_patches`` (``joint_custom_pre_pass`` / ``post_grad_custom_post_pass``), never by
mutating Inductor's global config. It is a ``CustomGraphPass`` whose ``uuid`` hashes the
stage, the names of the passes it runs, the source of this package and the
:class:`OptimizeConfig`, so the FX graph cache stays correct: same passes and config, a
cache hit; anything changed, a miss.

Every pass runs under :func:`run_guarded`: if it raises, one warning is logged, the graph
is restored node for node from a snapshot and compilation goes on without that pass.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

from .config import OptimizeConfig
from .graph_utils import GraphPass, PassContext, PassReport, graph_restore, graph_snapshot

log = logging.getLogger("torch_mmgen_opt")

__all__ = ["PassManager", "passes_for", "run_guarded", "source_hash"]


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 over every Python and C++ file of the package and of ``passes/``."""
    import torch_mmgen_opt.passes as passes_pkg

    roots = {Path(__file__).resolve().parent, Path(passes_pkg.__file__).resolve().parent}
    digest = hashlib.sha256()
    for root in sorted(roots):
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.cpp")]):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def passes_for(config: OptimizeConfig, stage: str) -> list[GraphPass]:
    """The registered passes that ``config`` enables at ``stage``, in run order."""
    from torch_mmgen_opt.passes import all_passes

    return [p for p in all_passes() if p.stage == stage and p.enabled(config)]


def _device_of(graph: fx.Graph) -> torch.device | None:
    for node in graph.nodes:
        if node.op != "placeholder":
            break
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.device
    return None


def _unlowerable(graph: fx.Graph, before: set[fx.Node]) -> list[str]:
    """Ops a pass inserted into an already decomposed graph (joint / post-grad stage)
    that Inductor cannot lower: they have a decomposition and no lowering, and lowering
    would fail on them (e.g. ``aten.transpose.int``; ``aten.permute`` is lowerable)."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import lowerings

    decomps = select_decomp_table()
    bad = []
    for node in graph.nodes:
        if node.op == "call_function" and node not in before:
            target = node.target
            if target in decomps and target not in lowerings:
                bad.append(str(target))
    return bad


def run_guarded(graph_pass: GraphPass, graph: fx.Graph, ctx: PassContext) -> int:
    """Run one pass; on any exception restore the graph and warn. Returns rewrites made.

    At the joint and post-grad stages the pass's output is also checked for ops that
    Inductor could not lower (a failure of the pass, handled the same way)."""
    snapshot = graph_snapshot(graph)
    before = set(graph.nodes)
    ctx.pass_name = graph_pass.name
    try:
        n = int(graph_pass.fn(graph, ctx) or 0)
        graph.lint()
        if graph_pass.stage != "dynamo":
            bad = _unlowerable(graph, before)
            if bad:
                raise RuntimeError(f"inserted ops Inductor cannot lower: {sorted(set(bad))}")
        return n
    except Exception as exc:  # noqa: BLE001 - compile must never break because of us
        graph_restore(graph, snapshot)
        counters["mmgen"]["pass_failed"] += 1
        message = f"{graph_pass.name} ({graph_pass.stage}): {type(exc).__name__}: {exc}"
        if ctx.report is not None:
            ctx.report.failures.append(message)
        log.warning("mmgen pass %s failed; the graph is left unchanged", message)
        return 0


class PassManager(CustomGraphPass):
    """Runs ``passes`` (all of one stage) on the graph Inductor hands it."""

    def __init__(
        self,
        stage: str,
        passes: Sequence[GraphPass],
        config: OptimizeConfig,
        report: PassReport | None = None,
    ) -> None:
        assert all(p.stage == stage for p in passes), "one stage per manager"
        self.stage = stage
        self.passes = list(passes)
        self.config = config
        self.report = report

    def __call__(self, graph: fx.Graph) -> None:
        ctx = PassContext(
            config=self.config, stage=self.stage, device=_device_of(graph), report=self.report
        )
        for graph_pass in self.passes:
            run_guarded(graph_pass, graph, ctx)

    def run_on_module(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
        """The ``"dynamo"`` stage: run on a Dynamo GraphModule with its real inputs."""
        device = next(
            (t.device for t in example_inputs if isinstance(t, torch.Tensor)), None
        )
        ctx = PassContext(
            config=self.config,
            stage=self.stage,
            device=device,
            report=self.report,
            gm=gm,
            example_inputs=example_inputs,
        )
        for graph_pass in self.passes:
            run_guarded(graph_pass, gm.graph, ctx)
        gm.recompile()

    def uuid(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.stage.encode())
        for graph_pass in self.passes:
            digest.update(graph_pass.name.encode())
            digest.update(graph_pass.fn.__module__.encode())
            digest.update(graph_pass.fn.__qualname__.encode())
        digest.update(source_hash().encode())
        digest.update(self.config.key().encode())
        from torch_mmgen_opt.kernels import cpu_gemv

        digest.update(cpu_gemv.cache_token().encode())  # the pass emits its op only if loaded
        return digest.hexdigest()

    def __repr__(self) -> str:
        names = ", ".join(p.name for p in self.passes)
        return f"PassManager(stage={self.stage!r}, passes=[{names}])"
