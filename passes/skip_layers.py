"""LayerSkip draft graphs: cut a captured decoder after its first ``E`` layers.

Stage: ``"dynamo"`` (the Dynamo FX graph, torch IR, where every node carries the
``nn_module_stack`` of the module call it came from).

What it matches: the decoder's *layer stack*, found from the module-stack metadata alone
(no change to the model's code): the module paths of the form ``<prefix>.<i>`` (an
``nn.ModuleList``) whose last name is one of :data:`LAYER_STACK_NAMES`, indices
``0..L-1`` all present. That is ``layers`` for the reference models and
``model.layers`` for Hugging Face decoders (``LlamaForCausalLM``...). A node belongs to
layer ``i`` when ``<prefix>.<i>`` is on its module stack (the cache writes a layer makes
through ``past_key_values.update`` included).

What it derives:

- the **draft graph** (:func:`draft_graph_`): layers ``0..E-1``, then the final norm and
  the output head, fed by the hidden state that left layer ``E-1``; layers ``E..L-1`` are
  erased (their cache writes too). Inputs are unchanged (the skipped layers' parameters
  stay placeholders, unused), so the graph keeps its calling convention.
- the **verify graph** (:func:`verify_graph_`, for the speculative runtime): layers
  ``E..L-1``, the final norm and the head, reading the layer-``E`` hidden state from a new
  last placeholder; layers ``0..E-1`` (and their cache writes: drafting made them) and
  what only they used (the embedding) are erased.

Invariants relied on:

- exactly one value crosses the cut: the hidden state that leaves layer ``E-1`` is the
  only value computed from layers ``< E`` that layers ``>= E`` read; and exactly one value
  leaves the stack towards the rest of the graph (the input of the final norm);
- no graph output reads a skipped layer directly: a cache returned by value (the reference
  models' growing ``torch.cat`` list) cannot be cut, use a static cache (one updated in
  place through the Hugging Face ``Cache`` protocol).

When one of these fails the functions raise ``ValueError`` saying why; under the pass
manager that becomes one warning and the graph is left whole.

The registered :data:`PASS` is never enabled by a config alone (the full model compiled by
``optimize(..., layer_skip=...)`` must keep all its layers): the draft is compiled from
the same module with the pass injected (``torch_mmgen_opt.runtime.speculative``). It reads
``ctx.config.layer_skip.exit_layer``.

Counters: ``layers_skipped`` (+ the number of layers cut, per draft graph) and
``draft_graph`` (one event per draft graph, with the exit layer in its detail).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch
import torch.fx as fx

from torch_mmgen_opt.graph_utils import GraphPass, PassContext

log = logging.getLogger("torch_mmgen_opt")

__all__ = [
    "LAYER_STACK_NAMES",
    "LayerStack",
    "PASS",
    "draft_graph_",
    "find_layer_stack",
    "verify_graph_",
]

# Last name of the ModuleList holding the decoder layers, most usual first.
LAYER_STACK_NAMES = ("layers", "h", "blocks", "layer", "decoder_layers")

# The root of a Dynamo module path: L['self'], L['args'][0] (a decorated forward), self.
_PREFIX_RE = re.compile(r"^(?:L\[['\"][^'\"]*['\"]\](?:\[[^\]]*\])*|self)\.?")


@dataclasses.dataclass
class LayerStack:
    """The decoder layer stack found in a graph.

    Attributes:
        prefix: module path of the ``ModuleList`` (``"layers"``, ``"model.layers"``).
        num_layers: ``L``.
        layer_of: every non-placeholder node inside a layer -> its layer index.
    """

    prefix: str
    num_layers: int
    layer_of: dict[fx.Node, int]


def _normalize(path: str) -> list[str]:
    """``"L['self'].model.layers[3]._modules['mlp']"`` -> ``["model", "layers", "3", "mlp"]``."""
    path = _PREFIX_RE.sub("", str(path))
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    return [p for p in path.split(".") if p and p != "_modules"]


def _stack_paths(node: fx.Node) -> list[list[str]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else value
        out.append(_normalize(path))
    return out


def find_layer_stack(graph: fx.Graph) -> LayerStack:
    """Find the decoder layer stack of ``graph`` from its ``nn_module_stack`` metadata.

    Raises:
        ValueError: no module-stack metadata, no numbered ``ModuleList`` named like a layer
            stack, or layer indices with gaps.
    """
    found: dict[str, set[int]] = {}
    any_meta = False
    for node in graph.nodes:
        for parts in _stack_paths(node):
            any_meta = True
            for j, part in enumerate(parts):
                if part.isdigit() and j > 0:
                    found.setdefault(".".join(parts[:j]), set()).add(int(part))
                    break
    if not any_meta:
        raise ValueError(
            "skip_layers: the graph has no nn_module_stack metadata; it needs the Dynamo "
            "graph of an nn.Module (stage 'dynamo'), not an aten or hand-built graph"
        )
    named = {p: ix for p, ix in found.items() if p.split(".")[-1] in LAYER_STACK_NAMES}
    if not named:
        raise ValueError(
            "skip_layers: no decoder layer stack found (a ModuleList named one of "
            f"{LAYER_STACK_NAMES}, e.g. model.layers); numbered modules seen: "
            f"{sorted(found) or 'none'}"
        )
    # The outermost such list with the most layers (a stack nested in a layer loses).
    prefix = min(named, key=lambda p: (p.count("."), -len(named[p])))
    indices = named[prefix]
    L = max(indices) + 1
    if indices != set(range(L)):
        raise ValueError(
            f"skip_layers: layer stack {prefix!r} has calls to layers {sorted(indices)}; "
            f"expected every layer 0..{L - 1} to run once"
        )
    want = prefix.split(".")
    layer_of: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        for parts in _stack_paths(node):
            if len(parts) > len(want) and parts[: len(want)] == want and parts[len(want)].isdigit():
                layer_of[node] = int(parts[len(want)])
                break
    return LayerStack(prefix=prefix, num_layers=L, layer_of=layer_of)


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _is_impure(node: fx.Node) -> bool:
    """Keep in-place writes (``index_copy_`` into a cache) through dead-code elimination."""
    if node.is_impure():
        return True
    if node.op == "call_method" and str(node.target).endswith("_"):
        return True
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    return False


def _erase(graph: fx.Graph, doomed: set[fx.Node]) -> None:
    for node in reversed(list(graph.nodes)):
        if node in doomed:
            outside = [u for u in node.users if u not in doomed]
            if outside:
                raise ValueError(
                    f"skip_layers: {node.name} is read by {outside[0].name} outside the "
                    "layers being cut"
                )
            graph.erase_node(node)


def _ancestors_from(graph: fx.Graph, seeds: set[fx.Node]) -> set[fx.Node]:
    """``seeds`` and every node computed from them."""
    out = set(seeds)
    for node in graph.nodes:
        if node not in out and any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def _cut(graph: fx.Graph, stack: LayerStack, exit_layer: int) -> tuple[fx.Node, fx.Node]:
    """``(h_exit, h_last)``: the hidden state leaving layer ``exit_layer - 1`` and the one
    leaving the whole stack."""
    L, E = stack.num_layers, exit_layer
    head_part = {n for n, i in stack.layer_of.items() if i < E}
    tail_part = {n for n, i in stack.layer_of.items() if i >= E}
    from_head = _ancestors_from(graph, head_part)
    crossing = {
        n for n in from_head - tail_part if any(u in tail_part for u in n.users)
    }
    if len(crossing) != 1:
        raise ValueError(
            f"skip_layers: {len(crossing)} values cross from layers 0..{E - 1} into layers "
            f"{E}..{L - 1} of {stack.prefix!r} ({sorted(n.name for n in crossing)}); a draft "
            "graph needs exactly one (the hidden state)"
        )
    leaving = {
        n for n in tail_part if any(u not in tail_part for u in n.users)
    }
    if len(leaving) != 1:
        raise ValueError(
            f"skip_layers: {len(leaving)} values leave layers {E}..{L - 1} of "
            f"{stack.prefix!r} ({sorted(n.name for n in leaving)}); expected only the hidden "
            "state fed to the final norm. A cache returned by value (a growing torch.cat "
            "list) cannot be cut: use a static cache updated in place"
        )
    (h_last,) = leaving
    if _output_node(graph) in h_last.users:
        raise ValueError(
            "skip_layers: the last layer's hidden state is a graph output itself; cannot "
            "tell the final norm and head apart"
        )
    return next(iter(crossing)), h_last


def _logits_outputs(graph: fx.Graph, h_last: fx.Node) -> list[int]:
    """Indices of the flat graph outputs computed from ``h_last`` (the head's logits)."""
    reached = _ancestors_from(graph, {h_last})
    flat = _flat_outputs(graph)
    return [i for i, v in enumerate(flat) if isinstance(v, fx.Node) and v in reached]


def _flat_outputs(graph: fx.Graph) -> list:
    out = _output_node(graph).args[0]
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return flat


def _check_exit(stack: LayerStack, exit_layer: int) -> None:
    if not isinstance(exit_layer, int) or not 1 <= exit_layer <= stack.num_layers:
        raise ValueError(
            f"exit_layer={exit_layer!r} is outside 1..{stack.num_layers} for the "
            f"{stack.num_layers}-layer stack {stack.prefix!r}; pass LayerSkip(exit_layer=E) "
            f"with 1 <= E <= {stack.num_layers}"
        )


def _set_outputs(graph: fx.Graph, values: tuple[fx.Node, ...]) -> None:
    out = _output_node(graph)
    out.args = (values,)


def draft_graph_(
    graph: fx.Graph, exit_layer: int, *, speculative_outputs: bool = False
) -> tuple[LayerStack, int]:
    """Cut ``graph`` in place after layer ``exit_layer - 1``; returns (stack, layers cut).

    The final norm and head now read the hidden state leaving layer ``exit_layer - 1``
    (``exit_layer == L`` leaves the graph as it is). With ``speculative_outputs`` the graph
    returns ``(logits, h_exit)`` instead of its own outputs: logits (B, T, V) of the exit
    and the hidden state (B, T, dim) the verify graph continues from.
    """
    stack = find_layer_stack(graph)
    _check_exit(stack, exit_layer)
    L, E = stack.num_layers, exit_layer
    if E == L:
        if speculative_outputs:
            h_last = _cut_last(graph, stack)
            (logits,) = _single_logits(graph, h_last)
            _set_outputs(graph, (logits, h_last))
            graph.eliminate_dead_code(is_impure_node=_is_impure)
        return stack, 0
    h_exit, h_last = _cut(graph, stack, E)
    logits_ix = _logits_outputs(graph, h_last)
    h_last.replace_all_uses_with(h_exit, delete_user_cb=lambda u: stack.layer_of.get(u, -1) < E)
    _erase(graph, {n for n, i in stack.layer_of.items() if i >= E})
    if speculative_outputs:
        if len(logits_ix) != 1:
            raise ValueError(
                f"skip_layers: {len(logits_ix)} graph outputs come from the head; expected one "
                "(the logits)"
            )
        _set_outputs(graph, (_flat_outputs(graph)[logits_ix[0]], h_exit))
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    return stack, L - E


def _cut_last(graph: fx.Graph, stack: LayerStack) -> fx.Node:
    last = {n for n, i in stack.layer_of.items() if i == stack.num_layers - 1}
    leaving = {n for n in last if any(u not in last for u in n.users)}
    if len(leaving) != 1:
        raise ValueError(
            f"skip_layers: {len(leaving)} values leave the last layer of {stack.prefix!r}; "
            "expected only the hidden state (use a static cache updated in place)"
        )
    return next(iter(leaving))


def _single_logits(graph: fx.Graph, h_last: fx.Node) -> tuple[fx.Node]:
    ix = _logits_outputs(graph, h_last)
    if len(ix) != 1:
        raise ValueError(
            f"skip_layers: {len(ix)} graph outputs come from the head; expected one (the logits)"
        )
    return (_flat_outputs(graph)[ix[0]],)


def verify_graph_(graph: fx.Graph, exit_layer: int) -> fx.Node:
    """Keep layers ``exit_layer..L-1``, the final norm and the head, in place; they read
    the layer-``exit_layer`` hidden state (B, T, dim) from a new last placeholder, which
    is returned. The graph returns ``(logits,)``.

    ``exit_layer == L`` is allowed: the graph is then the final norm and head alone.
    """
    stack = find_layer_stack(graph)
    _check_exit(stack, exit_layer)
    E, L = exit_layer, stack.num_layers
    if E < L:
        h_exit, h_last = _cut(graph, stack, E)
    else:
        h_last = _cut_last(graph, stack)
        h_exit = h_last
    (logits,) = _single_logits(graph, h_last)
    last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_ph):
        h_in = graph.placeholder("exit_hidden")
    for key in ("example_value", "val"):
        if key in h_exit.meta:
            h_in.meta[key] = h_exit.meta[key]
    if E < L:
        h_exit.replace_all_uses_with(h_in, delete_user_cb=lambda u: stack.layer_of.get(u, -1) >= E)
    else:
        h_exit.replace_all_uses_with(h_in, delete_user_cb=lambda u: u not in stack.layer_of)
    _set_outputs(graph, (logits,))
    _erase(graph, {n for n, i in stack.layer_of.items() if i < E})
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    return h_in


def _skip_layers_pass(graph: fx.Graph, ctx: PassContext) -> int:
    layer_skip = ctx.config.layer_skip
    if layer_skip is None:
        return 0
    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    stack, cut = draft_graph_(graph, layer_skip.exit_layer)
    if cut:
        ctx.bump("layers_skipped", cut)
    ctx.record(
        "draft_graph",
        first,
        f"{stack.prefix}: exit after layer {layer_skip.exit_layer} of {stack.num_layers}, "
        f"{cut} layer(s) cut",
    )
    return 1


# Never enabled by a config alone: the full model keeps every layer. The speculative
# runtime injects this pass when it compiles the draft from the same module.
PASS = GraphPass(
    name="skip_layers",
    stage="dynamo",
    fn=_skip_layers_pass,
    enabled=lambda cfg: False,
    source_file=__file__,
)
