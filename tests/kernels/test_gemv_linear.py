"""Tests of kernels/gemv_linear.py: nn.Linear through the float32 panel kernel.

Numerics against the ``nn.Linear`` it replaces (1-8 rows, 2-D and 3-D inputs, with and
without bias; compiled too), the layers it swaps and the ones it must leave (small
weights, other dtypes, subclasses, a kernel that cannot be built) with their reasons and
counters, and the calls it must hand to ``F.linear`` (more rows, autograd).
"""

from __future__ import annotations

import unittest
from unittest import mock

import torch
from torch import nn
from torch._dynamo.utils import counters

from torch_mmgen_opt.kernels import cpu_gemv
from torch_mmgen_opt.kernels.gemv_linear import GemvLinear, gemv_linears_
from torch_mmgen_opt.testing import TestCase, run_tests

AVAILABLE = cpu_gemv.ensure_loaded()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(256, 512)
        self.down = nn.Linear(512, 256, bias=False)
        self.small = nn.Linear(256, 32)  # 8K elements: left alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.relu(self.up(x)))
        return h + self.small(h).sum(-1, keepdim=True)


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def _calls(fn) -> int:
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mmgen_cpu::panel_gemv")


@unittest.skipUnless(AVAILABLE, "the CPU kernels could not be built here")
class TestGemvLinear(TestCase):
    def test_matches_linear(self):
        for bias in (True, False):
            lin = nn.Linear(300, 700, bias=bias)
            g = GemvLinear(lin)
            for shape in ((1, 300), (4, 300), (8, 300), (4, 1, 300), (2, 3, 300)):
                with self.subTest(bias=bias, shape=shape), torch.no_grad():
                    x = torch.randn(shape)
                    torch.testing.assert_close(g(x), lin(x), rtol=1e-5, atol=1e-5)
                    self.assertEqual(_calls(lambda g=g, x=x: g(x)), 1)

    def test_bfloat16(self):
        lin = nn.Linear(300, 700).bfloat16()
        g = GemvLinear(lin)
        x = torch.randn(4, 300).bfloat16()
        with torch.no_grad():
            out, ref = g(x), lin(x)
            self.assertEqual(_calls(lambda: g(x)), 1)
            # a float32 input to a bfloat16 layer goes to F.linear, which refuses it as
            # nn.Linear does (no silent cast)
            with self.assertRaises(RuntimeError):
                lin(torch.randn(4, 300))
            with self.assertRaises(RuntimeError):
                g(torch.randn(4, 300))
        self.assertEqual(out.dtype, torch.bfloat16)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=2e-2)

    def test_more_rows_and_autograd_go_to_linear(self):
        lin = nn.Linear(256, 512)
        g = GemvLinear(lin)
        x = torch.randn(9, 256)
        with torch.no_grad():
            self.assertEqual(_calls(lambda: g(x)), 0)
            self.assertEqual(g(x), lin(x), atol=0, rtol=0)  # the same F.linear call
        y = g(torch.randn(2, 256))  # grad enabled, weight requires grad
        self.assertTrue(y.requires_grad)
        self.assertEqual(_calls(lambda: g(torch.randn(2, 256))), 0)

    def test_swaps_eligible_layers_only(self):
        model = _mlp()
        x = torch.randn(4, 256)
        with torch.no_grad():
            ref = model(x)
        counters.clear()
        found = gemv_linears_(model)
        self.assertEqual(found["up"], "gemv")
        self.assertEqual(found["down"], "gemv")
        self.assertIn("small weights", found["small"])
        self.assertIsInstance(model.up, GemvLinear)
        self.assertIs(type(model.small), nn.Linear)
        self.assertEqual((counters["mmgen"]["linear_gemv"], counters["mmgen"]["linear_not_gemv"]), (2, 1))
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)

    def test_other_dtypes_and_subclasses_are_left(self):
        class MyLinear(nn.Linear):
            pass

        model = nn.Sequential(nn.Linear(512, 512).half(), MyLinear(512, 512))
        found = gemv_linears_(model)
        self.assertIn("float32 and bfloat16", found["0"])
        self.assertIn("not a plain nn.Linear", found["1"])
        self.assertFalse(any(isinstance(m, GemvLinear) for m in model.modules()))

    def test_kernel_unavailable_swaps_nothing(self):
        model = _mlp()
        with mock.patch.object(cpu_gemv, "ensure_loaded", return_value=False):
            found = gemv_linears_(model)
        self.assertTrue(all("could not be built" in v for v in found.values()))
        self.assertIs(type(model.up), nn.Linear)

    def test_compiled(self):
        model = _mlp()
        x = torch.randn(4, 1, 256)
        with torch.no_grad():
            ref = model(x)
            gemv_linears_(model)
            compiled = torch.compile(model, backend="inductor", fullgraph=True)
            torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
            self.assertEqual(_calls(lambda: compiled(x)), 2)
            # prefill-shaped input: the library path, same numbers as the original
            out = compiled(torch.randn(16, 1, 256))
        self.assertEqual(out.shape, (16, 1, 256))


@unittest.skipUnless(AVAILABLE, "the CPU kernels could not be built here")
class TestOptimizeGemvKernel(TestCase):
    """``optimize(model, gemv_kernel=True)`` on a plain model: the static-cache decode
    graph calls the kernel, greedy tokens equal eager's; the default leaves the model."""

    def _model(self):
        from torch_mmgen_opt import models

        return models.build("llama", "tiny", dim=256, ffn_hidden=512, vocab_size=512)

    def test_static_kv_decode_through_the_kernel(self):
        import torch_mmgen_opt as mmgen
        from torch_mmgen_opt.testing import greedy_reference

        model = self._model()
        ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(1))
        ref = greedy_reference(model, ids, 12)
        counters.clear()
        fast = mmgen.optimize(model, static_kv=True, max_seq_len=64, gemv_kernel=True)
        swapped = [m for m in model.modules() if isinstance(m, GemvLinear)]
        layers = model.config.n_layers
        self.assertEqual(len(swapped), counters["mmgen"]["linear_gemv"])
        # q, o and the FFN's three per layer, and the head; k and v (256x128, 32K
        # elements) are under the size floor
        self.assertEqual(len(swapped), 5 * layers + 1)
        out = mmgen.generate(fast, ids, max_new_tokens=12)
        self.assertEqual(out, ref)
        calls = _calls(lambda: mmgen.generate(fast, ids, max_new_tokens=4))
        # the prefill (7 rows, inside the kernel's row range) and 3 decode steps
        self.assertEqual(calls, 4 * len(swapped))
        long_ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(2))
        calls = _calls(lambda: mmgen.generate(fast, long_ids, max_new_tokens=4))
        # a 20-row prefill goes to F.linear: only the 3 decode steps call the kernel
        self.assertEqual(calls, 3 * len(swapped))
        self.assertEqual(mmgen.generate(fast, long_ids, max_new_tokens=6), greedy_reference(model, long_ids, 6))

    def test_default_leaves_plain_models(self):
        import torch_mmgen_opt as mmgen

        model = self._model()
        mmgen.optimize(model, static_kv=True, max_seq_len=64)
        self.assertFalse(any(isinstance(m, GemvLinear) for m in model.modules()))

    def test_bad_option(self):
        from torch_mmgen_opt import OptimizeConfig

        with self.assertRaises(TypeError):
            OptimizeConfig(gemv_kernel="yes")


if __name__ == "__main__":
    run_tests()
