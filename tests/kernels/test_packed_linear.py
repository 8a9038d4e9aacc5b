"""Tests of kernels/packed_linear.py: float32 CPU linears through oneDNN, weight packed once.

Numerics against ``F.linear`` (float32 rounding only), what is packed and what is not
(counters and reasons), compiled end to end through the ``mmgen`` backend, and the
``pack_linear`` option of ``optimize()``.
"""

from __future__ import annotations

import functools
import unittest

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import torch_mmgen_opt as mmgen
from torch_mmgen_opt import OptimizeConfig
from torch_mmgen_opt.kernels.packed_linear import (
    PackedLinear,
    measure_gain,
    pack_linears_,
    packing_available,
)
from torch_mmgen_opt.testing import TestCase, run_tests

TOL = dict(atol=1e-5, rtol=1e-5)


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(64, 256, bias=bias)
        self.down = nn.Linear(256, 48, bias=bias)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class NotPlain(nn.Linear):
    pass


@unittest.skipIf(not packing_available(), "needs oneDNN")
class TestPackedLinear(TestCase):
    def test_matches_linear(self):
        g = torch.Generator().manual_seed(0)
        for bias in (True, False):
            lin = nn.Linear(96, 160, bias=bias)
            packed = PackedLinear(lin)
            for shape in ((1, 96), (4, 96), (4, 1, 96), (3, 5, 96)):
                with self.subTest(bias=bias, shape=shape):
                    x = torch.randn(*shape, generator=g)
                    self.assertEqual(packed(x), lin(x), **TOL)
                    # a non-contiguous input (a transposed view) too
                    xt = torch.randn(96, shape[0], generator=g).t()
                    self.assertEqual(packed(xt), lin(xt), **TOL)

    def test_keeps_parameters(self):
        lin = nn.Linear(32, 16)
        packed = PackedLinear(lin)
        self.assertIs(packed.weight, lin.weight)  # tied weights and state dicts keep working
        self.assertEqual(set(packed.state_dict()), {"weight", "bias"})

    def test_other_dtype_input_falls_back(self):
        lin = nn.Linear(32, 16).to(torch.float64)
        packed = PackedLinear(nn.Linear(32, 16))
        packed.weight, packed.bias = lin.weight, lin.bias
        x = torch.randn(2, 32, dtype=torch.float64)
        self.assertEqual(packed(x), lin(x))  # F.linear on the Parameter, not the packed copy

    def test_pack_counts_and_reasons(self):
        root = nn.Sequential(MLP(), nn.Linear(48, 8).to(torch.bfloat16), NotPlain(8, 8))
        result = pack_linears_(root, True)
        self.assertEqual(result["0.up"], "packed")
        self.assertEqual(result["0.down"], "packed")
        self.assertIn("bfloat16", result["1"])
        self.assertIn("not a plain nn.Linear", result["2"])
        self.assertEqual(counters["mmgen"]["linear_packed"], 2)
        self.assertEqual(counters["mmgen"]["linear_not_packed"], 2)
        self.assertIsInstance(root[0].up, PackedLinear)
        self.assertIs(type(root[1]), nn.Linear)

    def test_does_not_fire(self):
        mlp = MLP()
        self.assertEqual(pack_linears_(mlp, False), {})
        # "auto": small weights are not even timed
        result = pack_linears_(mlp, "auto", rows=4)
        self.assertTrue(all("under 256 KiB" in v for v in result.values()), result)
        # "auto" with a bar no kernel clears: measured, recorded, nothing swapped
        big = nn.Sequential(nn.Linear(512, 256))
        result = pack_linears_(big, "auto", rows=4, threshold=1e9)
        self.assertTrue(result["0"].startswith("measured"), result)
        self.assertEqual(counters["mmgen"]["linear_packed"], 0)
        self.assertIs(type(mlp.up), nn.Linear)
        self.assertIs(type(big[0]), nn.Linear)
        self.assertGreater(measure_gain(4, 256, 64), 0)
        with self.assertRaisesRegex(ValueError, "pack_linear must be"):
            pack_linears_(mlp, "always")

    def test_compiled(self):
        mlp = MLP()
        x = torch.randn(4, 1, 64)
        ref = mlp(x)
        pack_linears_(mlp, True)
        backend = functools.partial(mmgen.mmgen_backend, config=OptimizeConfig())
        with torch.no_grad():
            compiled = torch.compile(mlp, backend=backend, fullgraph=True)
            out, (code,) = run_and_get_code(compiled, x)
            self.assertEqual(out, ref, **TOL)
            self.assertEqual(code.count("torch.ops.mmgen.packed_linear.default("), 2, msg=code)
            self.assertEqual(compiled(x + 1), mlp(x + 1), **TOL)
        self.assertEqual(counters["stats"]["unique_graphs"], 1)

    def test_config_validation(self):
        for bad in ("yes", 1, 0.5):
            with self.subTest(value=bad), self.assertRaisesRegex(ValueError, "pack_linear"):
                OptimizeConfig(pack_linear=bad)

    def test_optimize_option(self):
        torch.manual_seed(0)
        model = MLP().eval()
        x = torch.randn(2, 64)
        ref = model(x)
        with torch.no_grad():
            out = mmgen.optimize(model, pack_linear=True)(x)
        self.assertEqual(out, ref, **TOL)
        self.assertIsInstance(model.up, PackedLinear)  # optimize() prepares in place
        plain = MLP()
        mmgen.optimize(plain)  # the default leaves plain models alone
        self.assertIs(type(plain.up), nn.Linear)


if __name__ == "__main__":
    run_tests()
