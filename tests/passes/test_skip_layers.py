"""passes/skip_layers.py: draft and verify graphs cut from a captured decoder.

Graph tests capture the tiny reference Llama once (Dynamo only, no Inductor) with a
static cache and cut copies of that graph; the reference for a draft at exit ``E`` is the
same eager model with its layer list truncated to ``E`` layers. One test compiles the
draft end to end through ``optimize(..., layer_skip=...)``.
"""

from __future__ import annotations

import contextlib
import logging
import unittest
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from torch_mmgen_opt import LayerSkip, OptimizeConfig, explain, optimize
from torch_mmgen_opt.graph_utils import graph_snapshot
from torch_mmgen_opt.models import build
from torch_mmgen_opt.pass_manager import passes_for
from torch_mmgen_opt.passes import skip_layers
from torch_mmgen_opt.runtime.speculative import attach_draft
from torch_mmgen_opt.runtime.static_cache import StaticKVCache
from torch_mmgen_opt.testing import TestCase, apply_pass, mmgen_counters, run_tests

try:
    import transformers
except ImportError:  # pragma: no cover
    transformers = None

L, S, T, PAST = 4, 16, 3, 5


def capture(model: nn.Module, *args: Any, **kwargs: Any) -> tuple[fx.GraphModule, list[Any]]:
    """The Dynamo graph of ``model(*args, **kwargs)`` and its flat inputs (no Inductor)."""
    got: list[tuple[fx.GraphModule, list[Any]]] = []

    def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        got.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(*args, **kwargs)
    assert len(got) == 1
    return got[0]


@contextlib.contextmanager
def first_layers(layers_owner: nn.Module, exit_layer: int):
    """The eager reference of a draft: the layer list cut to ``exit_layer`` layers."""
    full = layers_owner.layers
    layers_owner.layers = nn.ModuleList(list(full)[:exit_layer])
    try:
        yield
    finally:
        layers_owner.layers = full


def cache_state(cache: StaticKVCache) -> list[torch.Tensor]:
    return [t.clone() for t in (*cache.key_cache, *cache.value_cache)]


class TestSkipLayers(TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        torch.manual_seed(0)
        cls.model = build("llama", "tiny", n_layers=L)
        cls.cache = StaticKVCache(L, 1, 2, S, 16, dtype=torch.float32, device="cpu")
        history = [torch.randn_like(t) for t in (*cls.cache.key_cache, *cls.cache.value_cache)]
        cls.history = history
        cls.ids = torch.randint(0, 256, (1, T))
        cls.pos = torch.arange(PAST, PAST + T)
        cls.restore(cls.cache)
        cls.gm, cls.inputs = capture(
            cls.model, cls.ids, past_key_values=cls.cache, cache_position=cls.pos
        )

    @classmethod
    def restore(cls, cache: StaticKVCache) -> None:
        for buf, h in zip((*cache.key_cache, *cache.value_cache), cls.history):
            buf.copy_(h)

    def run_graph(self, graph: fx.Graph, *extra: torch.Tensor, restore: bool = True) -> Any:
        if restore:
            self.restore(self.cache)
        with torch.no_grad():
            return fx.GraphModule(self.gm, graph)(*self.inputs, *extra)

    def reference(self, exit_layer: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cache = StaticKVCache(L, 1, 2, S, 16, dtype=torch.float32, device="cpu")
        self.restore(cache)
        with torch.no_grad(), first_layers(self.model, exit_layer):
            out = self.model(self.ids, past_key_values=cache, cache_position=self.pos)
        return out.logits, cache_state(cache)

    def test_finds_reference_layer_stack(self):
        stack = skip_layers.find_layer_stack(graph_snapshot(self.gm.graph))
        self.assertEqual(stack.prefix, "layers")
        self.assertEqual(stack.num_layers, L)
        self.assertEqual(set(stack.layer_of.values()), set(range(L)))
        # the cache writes made through past_key_values.update belong to their layer
        writes = [n for n, i in stack.layer_of.items() if str(n.target) == "index_copy_"]
        self.assertEqual(len(writes), 2 * L)

    def test_draft_matches_truncated_model(self):
        for exit_layer in range(1, L + 1):
            with self.subTest(exit_layer=exit_layer):
                graph = graph_snapshot(self.gm.graph)
                _, cut = skip_layers.draft_graph_(graph, exit_layer)
                self.assertEqual(cut, L - exit_layer)
                out = self.run_graph(graph)
                ref_logits, ref_cache = self.reference(exit_layer)
                self.assertEqual(out[0], ref_logits, atol=1e-6, rtol=1e-6)
                state = cache_state(self.cache)
                for layer in range(L):
                    for kv in (layer, L + layer):
                        if layer < exit_layer:
                            self.assertEqual(state[kv], ref_cache[kv], atol=1e-6, rtol=1e-6)
                        else:  # a skipped layer writes nothing
                            self.assertTrue(torch.equal(state[kv], self.history[kv]))

    def test_draft_then_verify_is_the_full_model(self):
        full_logits, full_cache = self.reference(L)
        for exit_layer in (1, 2, L):
            with self.subTest(exit_layer=exit_layer):
                draft = graph_snapshot(self.gm.graph)
                skip_layers.draft_graph_(draft, exit_layer, speculative_outputs=True)
                draft_logits, hidden = self.run_graph(draft)
                ref_logits, _ = self.reference(exit_layer)
                self.assertEqual(draft_logits, ref_logits, atol=1e-6, rtol=1e-6)
                verify = graph_snapshot(self.gm.graph)
                skip_layers.verify_graph_(verify, exit_layer)
                # the embedding (only layer 0 read it) is gone from the verify graph
                self.assertFalse(any("embedding" in str(n.target) for n in verify.nodes))
                (logits,) = self.run_graph(verify, hidden, restore=False)
                self.assertEqual(logits, full_logits, atol=1e-5, rtol=1e-5)
                for got, want in zip(cache_state(self.cache), full_cache):
                    self.assertEqual(got, want, atol=1e-5, rtol=1e-5)

    def test_pass_cuts_and_counts(self):
        gm = fx.GraphModule(self.gm, graph_snapshot(self.gm.graph))
        cfg = OptimizeConfig(layer_skip=LayerSkip(exit_layer=1, num_speculations=2))
        from torch_mmgen_opt.graph_utils import PassReport

        report = PassReport()
        with mmgen_counters() as c:
            self.assertEqual(apply_pass(skip_layers.PASS, gm, cfg, report), 1)
            self.assertEqual(c["layers_skipped"], L - 1)
            self.assertEqual(c["draft_graph"], 1)
        self.assertIn("exit after layer 1 of 4", report.events[0].detail)
        self.restore(self.cache)
        with torch.no_grad():
            out = gm(*self.inputs)
        self.assertEqual(out[0], self.reference(1)[0], atol=1e-6, rtol=1e-6)

    def test_not_enabled_by_config_alone(self):
        cfg = OptimizeConfig(layer_skip=LayerSkip(exit_layer=1))
        self.assertFalse(skip_layers.PASS.enabled(cfg))
        for stage in ("dynamo", "joint", "post_grad"):
            self.assertNotIn("skip_layers", [p.name for p in passes_for(cfg, stage)])
        # injected without a layer_skip config: nothing happens
        gm = fx.GraphModule(self.gm, graph_snapshot(self.gm.graph))
        before = len(gm.graph.nodes)
        with mmgen_counters() as c:
            self.assertEqual(apply_pass(skip_layers.PASS, gm, OptimizeConfig()), 0)
            self.assertEqual(c["layers_skipped"], 0)
        self.assertEqual(len(gm.graph.nodes), before)

    def test_graph_without_module_stack_is_left_alone(self):
        # a hand-built or aten-level graph carries no module stack
        gm = fx.GraphModule(self.gm, graph_snapshot(self.gm.graph))
        for node in gm.graph.nodes:
            node.meta.pop("nn_module_stack", None)
        before = [n.target for n in gm.graph.nodes]
        cfg = OptimizeConfig(layer_skip=LayerSkip(exit_layer=1))
        with mmgen_counters() as c, self.assertLogs("torch_mmgen_opt", logging.WARNING) as logs:
            self.assertEqual(apply_pass(skip_layers.PASS, gm, cfg), 0)
            self.assertEqual(c["layers_skipped"], 0)
            self.assertEqual(c["pass_failed"], 1)
        self.assertIn("nn_module_stack", "\n".join(logs.output))
        self.assertEqual([n.target for n in gm.graph.nodes], before)

    def test_output_reading_a_skipped_layer_is_refused(self):
        # what a cache returned by value looks like: a graph output inside layer L-1
        graph = graph_snapshot(self.gm.graph)
        stack = skip_layers.find_layer_stack(graph)
        k_last = next(
            n for n, i in stack.layer_of.items() if i == L - 1 and n.op == "call_function"
        )
        out = next(n for n in graph.nodes if n.op == "output")
        flat = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
        out.args = ((*flat, k_last),)
        with self.assertRaisesRegex(ValueError, "static cache"):
            skip_layers.draft_graph_(graph, 2)

    def test_exit_layer_out_of_range(self):
        for bad in (0, L + 1):
            with self.assertRaisesRegex(ValueError, "exit_layer"):
                skip_layers.draft_graph_(graph_snapshot(self.gm.graph), bad)

    @unittest.skipIf(transformers is None, "needs transformers")
    def test_hugging_face_decoder(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
        torch.manual_seed(0)
        hf = LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, 64, (1, 5))
        gm, inputs = capture(hf, input_ids=ids, use_cache=False)
        graph = graph_snapshot(gm.graph)
        stack, cut = skip_layers.draft_graph_(graph, 1)
        self.assertEqual((stack.prefix, stack.num_layers, cut), ("model.layers", 3, 2))
        with torch.no_grad():
            out = fx.GraphModule(gm, graph)(*inputs)
            with first_layers(hf.model, 1):
                ref = hf(input_ids=ids, use_cache=False).logits
        self.assertEqual(out[0], ref, atol=1e-6, rtol=1e-6)

    def test_optimize_draft_end_to_end(self):
        opt = optimize(self.model, layer_skip=LayerSkip(exit_layer=2, num_speculations=2))
        draft = attach_draft(opt)
        self.assertIs(attach_draft(opt), draft)
        self.assertIs(opt.draft, draft)
        self.restore(self.cache)
        with mmgen_counters() as c, torch.no_grad():
            out = draft(self.ids, past_key_values=self.cache, cache_position=self.pos)
            self.assertEqual(c["layers_skipped"], L - 2)
            self.assertEqual(c["draft_graph"], 1)
        self.assertEqual(out.logits, self.reference(2)[0], atol=1e-4, rtol=1e-4)
        self.assertEqual(explain(draft).count("draft_graph"), 1)


if __name__ == "__main__":
    run_tests()
