"""passes/hstu_attention.py: graph tests on the aten graph (numerics, counters, where it
must not fire) and one end-to-end compile of the HSTU model through Inductor."""

from __future__ import annotations

import importlib
import unittest

import torch
import torch.nn.functional as F

import torch_mmgen_opt as mmgen
from torch_mmgen_opt import models
from torch_mmgen_opt.config import AttentionConfig, OptimizeConfig
from torch_mmgen_opt.kernels.hstu import HAS_TRITON
from torch_mmgen_opt.models.hstu import example_batch
from torch_mmgen_opt.testing import (
    TestCase,
    apply_pass,
    aten_graph,
    count_targets,
    mmgen_counters,
    run_tests,
    trace_and_apply,
)

PASS = importlib.import_module("torch_mmgen_opt.passes.hstu_attention").PASS
FUSED = torch.ops.mmgen.hstu_attention
FORCE = OptimizeConfig(attention=AttentionConfig(backend="sdpa"))  # fuse on every device
B, H, N, D = 2, 3, 16, 8


# Generative-recommenders' reference: einsum-free matmul, + rab, silu / n, * float mask.
def hstu_reference_attention(q, k, v, rab, mask):
    qk = torch.matmul(q, k.transpose(-1, -2))
    qk = qk + rab
    a = F.silu(qk) / q.shape[2]
    a = a * mask
    return torch.matmul(a, v)


# (B, N, H, d) inputs, alpha on the scores, x * sigmoid(x), a bool mask through where.
def hstu_where_variant(q, k, v, mask):
    qk = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * 0.25
    a = qk * torch.sigmoid(qk) * (1.0 / N)
    a = torch.where(mask, a, 0.0)
    return torch.matmul(a, v.transpose(1, 2))


def scores_reused(q, k, v, rab, mask):
    qk = torch.matmul(q, k.transpose(-1, -2)) + rab
    a = F.silu(qk) / N * mask
    return torch.matmul(a, v), qk.sum()


def relu_attention(q, k, v, rab, mask):
    a = F.relu(torch.matmul(q, k.transpose(-1, -2)) + rab) / N * mask
    return torch.matmul(a, v)


def softmax_attention(q, k, v, rab, mask):
    a = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 8 + rab, dim=-1)
    return torch.matmul(a, v)


def _dense_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    rab = torch.randn(B, 1, N, N, generator=g) * 0.1
    mask = torch.ones(N, N).tril().expand(B, 1, N, N).contiguous()
    return q, k, v, rab, mask


def _rewrite(fn, *args, config=FORCE):
    gm, n, counts, _ = trace_and_apply(PASS, fn, *args, config=config)
    return gm, n, counts


class HSTUAttentionGraphTest(TestCase):
    def test_reference_form_fused(self):
        args = _dense_inputs()
        gm, n, counts = _rewrite(hstu_reference_attention, *args)
        self.assertEqual((n, counts.get("hstu_attention_fused")), (1, 1))
        self.assertEqual(count_targets(gm, FUSED), 1)
        self.assertEqual(count_targets(gm, torch.ops.aten.bmm), 0)
        torch.testing.assert_close(gm(*args), hstu_reference_attention(*args), rtol=1e-5, atol=1e-6)

    def test_where_variant_fused(self):
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(B, N, H, D, generator=g) for _ in range(3))
        mask = torch.rand(B, 1, N, N, generator=g) > 0.4
        gm, n, counts = _rewrite(hstu_where_variant, q, k, v, mask)
        self.assertEqual(counts.get("hstu_attention_fused"), 1)
        node = next(nd for nd in gm.graph.nodes if nd.target is FUSED.default)
        self.assertEqual(node.args[5:], (0.25, 1.0 / N))  # alpha, scale
        torch.testing.assert_close(gm(q, k, v, mask), hstu_where_variant(q, k, v, mask),
                                   rtol=1e-5, atol=1e-6)

    def test_not_fired_when_scores_reused(self):
        gm, n, counts = _rewrite(scores_reused, *_dense_inputs())
        self.assertEqual(n, 0)
        self.assertEqual(count_targets(gm, FUSED), 0)
        self.assertNotIn("hstu_attention_fused", counts)

    def test_not_fired_for_other_activations(self):
        for fn in (relu_attention, softmax_attention):
            with self.subTest(fn=fn.__name__):
                gm, n, counts = _rewrite(fn, *_dense_inputs())
                self.assertEqual((n, count_targets(gm, FUSED)), (0, 0))
                self.assertEqual(counts, {})

    def test_auto_leaves_cpu_graphs_to_inductor(self):
        for backend in ("auto", "inductor"):
            with self.subTest(backend=backend):
                cfg = OptimizeConfig(attention=AttentionConfig(backend=backend))
                gm, n, counts = _rewrite(hstu_reference_attention, *_dense_inputs(), config=cfg)
                self.assertEqual((n, count_targets(gm, FUSED)), (0, 0))
                self.assertEqual(counts, {"hstu_attention_skipped": 1})

    def test_disabled_with_attention_fusion(self):
        self.assertFalse(PASS.enabled(OptimizeConfig(attention=False)))
        self.assertTrue(PASS.enabled(OptimizeConfig()))

    def test_whole_model_graph(self):
        model = models.build("hstu", "tiny")
        batch = example_batch(model.config, [5, 64, 17, 1])
        params = {k: p.detach() for k, p in model.named_parameters()}
        gm = aten_graph(lambda p, *a: torch.func.functional_call(model, p, a), params, *batch)
        with mmgen_counters() as counts:
            apply_pass(PASS, gm, FORCE)
            self.assertEqual(counts["hstu_attention_fused"], model.config.n_layers)
        with torch.no_grad():
            torch.testing.assert_close(gm(params, *batch), model(*batch), rtol=1e-5, atol=1e-5)


class HSTUAttentionCompileTest(TestCase):
    def test_optimize_fuses_and_matches_eager(self):
        model = models.build("hstu", "tiny")
        opt = mmgen.optimize(model, config=FORCE)
        with mmgen_counters() as counts, torch.no_grad():
            for lengths in ([5, 64, 17, 1], [64, 2, 30, 33]):  # same B, other ragged T
                batch = example_batch(model.config, lengths, seed=len(lengths))
                torch.testing.assert_close(opt(*batch), model(*batch), rtol=1e-4, atol=1e-4)
            self.assertGreaterEqual(counts["hstu_attention_fused"], model.config.n_layers)
        self.assertGreaterEqual(mmgen.explain(opt).count("hstu_attention_fused"), 2)

    @unittest.skipIf(not torch.cuda.is_available() or not HAS_TRITON, "needs CUDA and Triton")
    def test_auto_fuses_on_cuda(self):
        model = models.build("hstu", "tiny", device="cuda")
        opt = mmgen.optimize(model)  # backend "auto": the Triton kernel on CUDA
        batch = example_batch(model.config, [5, 64, 17, 1], device="cuda")
        with mmgen_counters() as counts, torch.no_grad():
            torch.testing.assert_close(opt(*batch), model(*batch), rtol=2e-3, atol=2e-3)
            self.assertEqual(counts["hstu_attention_fused"], model.config.n_layers)


if __name__ == "__main__":
    run_tests()
