"""The pass manager: per-compile installation, uuid / FX graph cache, guarded passes."""

import logging

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.utils import fresh_cache

from torch_mmgen_opt import OptimizeConfig, mmgen_backend
from torch_mmgen_opt.graph_utils import GraphPass, aten, graph_restore, graph_snapshot
from torch_mmgen_opt.pass_manager import PassManager, passes_for
from torch_mmgen_opt.testing import TestCase, run_tests


def _sin_to_cos(graph: fx.Graph, ctx) -> int:
    """A test pass with a visible effect: aten.sin -> aten.cos."""
    n = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.sin.default:
            node.target = aten.cos.default
            ctx.record("test_sin_rewritten", node)
            n += 1
    return n


def _half_done_then_raise(graph: fx.Graph, ctx) -> int:
    """Mutates the graph, then fails: the manager must undo the mutation."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.sin.default:
            node.target = aten.cos.default
            with graph.inserting_after(node):
                graph.call_function(aten.neg.default, (node,))
    raise RuntimeError("injected failure")


def _insert_transpose(graph: fx.Graph, ctx) -> int:
    """Inserts ``aten.transpose.int`` (decomposed before the joint stage, no lowering):
    a graph Inductor would refuse to lower."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.sin.default:
            with graph.inserting_after(node):
                t = graph.call_function(aten.transpose.int, (node, 0, 0))
            node.replace_all_uses_with(t)
            t.args = (node, 0, 0)
            return 1
    return 0


SIN_TO_COS = GraphPass("sin_to_cos", "joint", _sin_to_cos, lambda cfg: True, __file__)
FAILING = GraphPass("failing", "joint", _half_done_then_raise, lambda cfg: True, __file__)
UNLOWERABLE = GraphPass("unlowerable", "joint", _insert_transpose, lambda cfg: True, __file__)


def f(x):
    return torch.sin(x) * 2 + 1


def compile_with(passes, config=None):
    import functools

    backend = functools.partial(mmgen_backend, config=config or OptimizeConfig(), passes=passes)
    return torch.compile(f, backend=backend)


class TestPassManager(TestCase):
    def test_pass_runs_and_counts(self):
        x = torch.randn(8)
        with fresh_cache():
            out = compile_with([SIN_TO_COS])(x)
        self.assertEqual(out, torch.cos(x) * 2 + 1)
        self.assertEqual(counters["mmgen"]["test_sin_rewritten"], 1)

    def test_global_inductor_config_unchanged(self):
        before = inductor_config.get_config_copy()
        with fresh_cache():
            compile_with([SIN_TO_COS])(torch.randn(4))
        after = inductor_config.get_config_copy()
        self.assertIsNone(after["joint_custom_pre_pass"])
        self.assertIsNone(after["post_grad_custom_post_pass"])
        self.assertEqual(
            {k: v for k, v in before.items() if not callable(v)},
            {k: v for k, v in after.items() if not callable(v)},
        )

    def test_fx_graph_cache_hit_keeps_optimized_graph(self):
        x = torch.randn(8)
        with fresh_cache(), inductor_config.patch(fx_graph_cache=True):
            compile_with([SIN_TO_COS])(x)
            self.assertEqual(counters["inductor"]["fxgraph_cache_miss"], 1)
            torch._dynamo.reset()
            out = compile_with([SIN_TO_COS])(x)
            self.assertEqual(counters["inductor"]["fxgraph_cache_hit"], 1)
            self.assertEqual(out, torch.cos(x) * 2 + 1)  # still the rewritten graph
            # A different config is a different uuid: a miss, never a wrong hit.
            torch._dynamo.reset()
            compile_with([SIN_TO_COS], OptimizeConfig(max_seq_len=77))(x)
            self.assertEqual(counters["inductor"]["fxgraph_cache_miss"], 2)

    def test_uuid_depends_on_passes_and_config(self):
        cfg = OptimizeConfig()
        a = PassManager("joint", [SIN_TO_COS], cfg).uuid()
        self.assertEqual(a, PassManager("joint", [SIN_TO_COS], cfg).uuid())
        self.assertNotEqual(a, PassManager("joint", [SIN_TO_COS, FAILING], cfg).uuid())
        self.assertNotEqual(a, PassManager("joint", [SIN_TO_COS], cfg.replace(max_batch_size=2)).uuid())
        self.assertTrue(a)

    def test_failing_pass_warns_and_leaves_graph(self):
        x = torch.randn(8)
        with fresh_cache(), self.assertLogs("torch_mmgen_opt", level=logging.WARNING) as logs:
            out = compile_with([FAILING])(x)
        self.assertEqual(out, f(x))  # the original graph, untouched
        self.assertEqual(counters["mmgen"]["pass_failed"], 1)
        self.assertIn("injected failure", "\n".join(logs.output))

    def test_unlowerable_output_is_undone(self):
        """A pass that leaves an op Inductor cannot lower counts as failed: without the
        check, lowering raises (compile breaks); with it, the original graph compiles."""
        x = torch.randn(8)
        with fresh_cache(), self.assertLogs("torch_mmgen_opt", level=logging.WARNING) as logs:
            out = compile_with([UNLOWERABLE])(x)
        self.assertEqual(out, f(x))
        self.assertEqual(counters["mmgen"]["pass_failed"], 1)
        self.assertIn("aten.transpose.int", "\n".join(logs.output))

    def test_snapshot_restore_is_node_for_node(self):
        gm = fx.symbolic_trace(lambda x: (x.relu() + 1).sum())
        before = str(gm.graph)
        snap = graph_snapshot(gm.graph)
        node = next(n for n in gm.graph.nodes if n.op == "call_method")
        with gm.graph.inserting_after(node):
            gm.graph.call_function(torch.neg, (node,))
        graph_restore(gm.graph, snap)
        self.assertEqual(str(gm.graph), before)

    def test_passes_for_respects_config(self):
        for cfg in (OptimizeConfig(), OptimizeConfig(attention=False)):
            for stage in ("dynamo", "joint", "post_grad"):
                for p in passes_for(cfg, stage):
                    self.assertTrue(p.enabled(cfg))
                    self.assertEqual(p.stage, stage)


if __name__ == "__main__":
    run_tests()
