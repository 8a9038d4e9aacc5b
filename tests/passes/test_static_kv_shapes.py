"""passes/static_kv_shapes.py on Dynamo graphs of small decode steps (captured by a
backend that runs the pass and then the graph as is: no Inductor, milliseconds)."""

from __future__ import annotations

import importlib

import torch
from torch._dynamo.utils import counters

from torch_mmgen_opt import OptimizeConfig
from torch_mmgen_opt.graph_utils import PassReport
from torch_mmgen_opt.pass_manager import PassManager, passes_for
from torch_mmgen_opt.runtime.static_cache import StaticKVCache
from torch_mmgen_opt.testing import TestCase, run_tests

PASS = importlib.import_module("torch_mmgen_opt.passes.static_kv_shapes").PASS


class TestStaticKVShapes(TestCase):
    def setUp(self):
        super().setUp()
        self.report = PassReport()
        self.cache = StaticKVCache(1, 4, 2, 16, 8, dtype=torch.float32, device="cpu")

    def _compile(self, fn):
        def backend(gm, example_inputs):
            PassManager("dynamo", [PASS], OptimizeConfig(static_kv=True), self.report).run_on_module(
                gm, example_inputs
            )
            return gm.forward

        return torch.compile(fn, backend=backend, fullgraph=True)

    def _events(self, kind):
        return [e for e in self.report.events if e.kind == kind]

    def test_registered_and_enabled_by_static_kv(self):
        self.assertIn(PASS, passes_for(OptimizeConfig(static_kv=True), "dynamo"))
        self.assertNotIn(PASS, passes_for(OptimizeConfig(), "dynamo"))

    def test_decode_batch_symbol_specialised(self):
        cache = self.cache

        def step(k, v, pos):
            k_all, v_all = cache.update(k, v, 0, {"cache_position": pos})
            return (k_all * 2).sum(-1) + v_all.sum(-1)

        f = self._compile(step)
        pos = torch.tensor([3])
        for batch in (2, 3, 3):
            k, v = torch.randn(batch, 2, 1, 8), torch.randn(batch, 2, 1, 8)
            for t in (k, v):
                torch._dynamo.maybe_mark_dynamic(t, 0)
            cache.reset()
            out = f(k, v, pos)
            cache.reset()
            self.assertEqual(out, step(k, v, pos))
        self.assertEqual(counters["mmgen"]["dim_specialized"], 2)  # batch 2, then batch 3
        self.assertEqual(counters["mmgen"]["kv_cache_static"], 2)
        self.assertEqual(counters["stats"]["unique_graphs"], 2)  # the guard holds for 3, 3
        self.assertIn("bounded by the cache", self._events("dim_specialized")[0].detail)
        self.assertEqual(counters["mmgen"]["cudagraph_blocker"], 0)

    def test_step_dependent_dim_reported_with_op_and_line(self):
        cache = self.cache

        def step(k, v, pos, seen):
            k_all, _ = cache.update(k, v, 0, {"cache_position": pos})
            return k_all[:, :, : seen.shape[1]].sum(-1)  # slicing to the current length

        seen = torch.ones(2, 5)
        torch._dynamo.maybe_mark_dynamic(seen, 1)
        with self.assertLogs("torch_mmgen_opt", level="WARNING"):
            self._compile(step)(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), torch.tensor([4]), seen)
        self.assertEqual(counters["mmgen"]["kv_cache_static"], 0)
        (event,) = self._events("dynamic_dim")
        self.assertIn("getitem", event.detail)
        self.assertIn("L['seen'].size()[1]", event.detail)
        self.assertIn("test_static_kv_shapes.py", event.where)

    def test_prefill_graph_not_specialised(self):
        cache = self.cache

        def prefill(k, v, pos):
            return cache.update(k, v, 0, {"cache_position": pos})[0].sum()

        k = torch.randn(2, 2, 5, 8)
        torch._dynamo.maybe_mark_dynamic(k, 2)
        self._compile(prefill)(k, k.clone(), torch.arange(5))
        self.assertEqual(counters["mmgen"]["kv_cache_static"], 0)
        self.assertEqual(counters["mmgen"]["dim_specialized"], 0)

    def test_graph_without_cache_write_left_alone(self):
        def fn(x, buf):
            buf.index_copy_(2, torch.tensor([0]), x)  # not a static address: no cache
            return buf.sum()

        self._compile(fn)(torch.randn(1, 2, 1, 4), torch.zeros(1, 2, 4, 4))
        self.assertEqual(sum(counters["mmgen"].values()), 0)
        self.assertEqual(self.report.events, [])

    def test_cudagraph_blockers_reported(self):
        cache = self.cache

        def step(k, pos, scratch):
            k_all, _ = cache.update(k, k, 0, {"cache_position": pos})
            scratch.add_(1)  # in-place into an ordinary input
            n = k_all.sum().item()  # host sync
            return k_all * n

        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            self._compile(step)(torch.randn(1, 2, 1, 8), torch.tensor([0]), torch.zeros(3))
        details = " | ".join(e.detail for e in self._events("cudagraph_blocker"))
        self.assertIn("host sync: .item()", details)
        self.assertIn("in-place add_ into input", details)


if __name__ == "__main__":
    run_tests()
