"""Small, dependency-free helpers shared by every pass in ``passes/``.

A leaf module: it imports ``torch`` and ``config`` only, so passes can use it without
pulling in the pass manager or the API.

The pass protocol
-----------------
A pass is a :class:`GraphPass`: a name, the stage it runs at and a function
``fn(graph: torch.fx.Graph, ctx: PassContext) -> int`` that rewrites ``graph`` in place
and returns how many rewrites it made. Stages:

- ``"dynamo"``: the Dynamo graph (torch IR, ``nn_module_stack`` metadata present), run by
  our backend before ``compile_fx``; ``ctx.example_inputs`` are the real inputs
  (parameters included, since Dynamo lifts them) and ``ctx.gm`` is the GraphModule.
- ``"joint"``: Inductor's ``joint_custom_pre_pass`` on the functional aten graph, before
  Inductor's own pattern passes (its ``fuse_attention`` among them). Softmax is already
  decomposed into ``amax/sub/exp/sum/div`` here.
- ``"post_grad"``: Inductor's ``post_grad_custom_post_pass``, after Inductor's post-grad
  passes, just before lowering.

A pass bumps ``counters["mmgen"][...]`` through :meth:`PassContext.bump` and records what
it did where through :meth:`PassContext.record`, which ``explain()`` shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from .config import OptimizeConfig

log = logging.getLogger("torch_mmgen_opt")

__all__ = [
    "GraphPass",
    "PassContext",
    "PassEvent",
    "PassReport",
    "STAGES",
    "aten",
    "emit_node",
    "fake_mode_of",
    "graph_snapshot",
    "graph_restore",
    "node_location",
    "tensor_meta",
]

aten = torch.ops.aten
prims = torch.ops.prims
STAGES = ("dynamo", "joint", "post_grad")


@dataclasses.dataclass(frozen=True)
class PassEvent:
    """One thing a pass did (or declined to do) at one place in one graph."""

    pass_name: str
    stage: str
    kind: str  # a counter key, e.g. "attention_fused" or "attention_skipped"
    where: str  # module path / source line of the node
    detail: str = ""


@dataclasses.dataclass
class PassReport:
    """Collects the events of every compile of one optimized model; what ``explain`` shows."""

    events: list[PassEvent] = dataclasses.field(default_factory=list)
    graphs_compiled: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e.kind == kind)

    def to_markdown(self) -> str:
        lines = [
            f"# mmgen passes: {self.graphs_compiled} graph(s) compiled",
            "",
            "| pass | stage | event | where | detail |",
            "|---|---|---|---|---|",
        ]
        for e in self.events:
            lines.append(f"| {e.pass_name} | {e.stage} | {e.kind} | {e.where} | {e.detail} |")
        if not self.events:
            lines.append("| - | - | nothing fired | - | - |")
        for failure in self.failures:
            lines.append(f"\nFailed pass (graph left unchanged): {failure}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


@dataclasses.dataclass
class PassContext:
    """What a pass may know about the compile it runs in."""

    config: OptimizeConfig
    stage: str
    device: torch.device | None = None
    report: PassReport | None = None
    pass_name: str = ""
    gm: fx.GraphModule | None = None
    example_inputs: Sequence[Any] | None = None
    is_inference: bool = True

    def bump(self, key: str, n: int = 1) -> None:
        counters["mmgen"][key] += n

    def record(self, kind: str, node: fx.Node | None = None, detail: str = "") -> None:
        """Bump counter ``kind`` and log the event for ``explain``."""
        self.bump(kind)
        if self.report is not None:
            where = node_location(node) if node is not None else ""
            self.report.events.append(PassEvent(self.pass_name, self.stage, kind, where, detail))


PassFn = Callable[[fx.Graph, PassContext], int]


@dataclasses.dataclass(frozen=True)
class GraphPass:
    """A named graph transform run at one stage when ``enabled(config)`` holds."""

    name: str
    stage: str
    fn: PassFn
    enabled: Callable[[OptimizeConfig], bool]
    source_file: str  # hashed into the pass manager's uuid

    def __post_init__(self) -> None:
        assert self.stage in STAGES, self.stage


# --------------------------------------------------------------------------- node helpers


def tensor_meta(node: Any) -> torch.Tensor | None:
    """The (fake) tensor a node produces, or ``None`` if it is not a single tensor."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    return val if isinstance(val, torch.Tensor) else None


def is_target(node: Any, *targets: Any) -> bool:
    """``node`` is a ``call_function`` to one of ``targets`` (OpOverloadPackets match any
    overload)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    for t in targets:
        if node.target is t:
            return True
        if isinstance(t, torch._ops.OpOverloadPacket) and getattr(
            node.target, "overloadpacket", None
        ) is t:
            return True
    return False


def fake_mode_of(vals: Sequence[Any]) -> Any:
    """The fake mode the (fake) tensors ``vals`` belong to, or ``None``."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode(vals)


def emit_node(
    graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None, like: Any = None
) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point with its
    ``meta["val"]`` computed under the fake mode of the tensor arguments (or of the node
    ``like`` when there are none), as later passes and lowering expect."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    vals = fx.map_arg((args, kwargs), lambda n: n.meta["val"])
    flat = [v for v in torch.utils._pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
    mode = fake_mode_of(flat or ([tensor_meta(like)] if like is not None else []))
    with mode if mode is not None else contextlib.nullcontext():
        node.meta["val"] = target(*vals[0], **vals[1])
    return node


def node_location(node: fx.Node) -> str:
    """Where a node came from, for humans: the innermost module path and source line."""
    parts = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        parts.append(str(path).replace("L['self'].", "").replace("L__self___", ""))
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
        file_lines = [ln for ln in lines if ln.startswith("File ")]
        if file_lines:
            parts.append(file_lines[-1].replace("File ", "", 1))
    return " @ ".join(parts) or node.name


# ----------------------------------------------------------------------- snapshot/restore


def graph_snapshot(graph: fx.Graph) -> fx.Graph:
    """A node-for-node copy of ``graph`` (names and ``meta`` kept) to restore from."""
    copy = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    copy.graph_copy(graph, value_map)  # copies every node but the output, meta included
    _ensure_output(graph, copy, value_map)
    return copy


def _ensure_output(src: fx.Graph, dst: fx.Graph, value_map: dict[fx.Node, fx.Node]) -> None:
    if any(n.op == "output" for n in dst.nodes):
        return
    src_out = next(n for n in reversed(src.nodes) if n.op == "output")
    new_out = dst.output(fx.map_arg(src_out.args[0], lambda n: value_map[n]))
    new_out.meta = dict(src_out.meta)


def graph_restore(graph: fx.Graph, snapshot: fx.Graph) -> None:
    """Make ``graph`` (in place, same object) node-for-node equal to ``snapshot``."""
    for node in reversed(list(graph.nodes)):
        node.args = ()
        node.kwargs = {}
    for node in reversed(list(graph.nodes)):
        graph.erase_node(node)
    # Fresh name space so the restored nodes keep their original names.
    graph._graph_namespace = type(graph._graph_namespace)()
    value_map: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(snapshot, value_map)
    _ensure_output(snapshot, graph, value_map)
    graph.lint()


def users_outside(nodes: Iterable[fx.Node], allowed: set[fx.Node]) -> bool:
    """Does any node in ``nodes`` have a user outside ``allowed``?"""
    return any(u not in allowed for n in nodes for u in n.users)
