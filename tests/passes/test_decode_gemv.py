"""Tests of passes/decode_gemv.py: few-row float32 CPU matmuls as fused multiply-reduce,
and few-row int8 weight-only products through our int8 kernel.

Graph level (one pass on an aten graph, no codegen): what is rewritten, the counters and
the reasons it declines; numerics of the rewritten graph against eager. End to end
through the ``mmgen`` backend: Inductor's code for a decode-shaped MLP has no library
matmul left and matches eager; prefill-shaped and dynamic-row inputs keep theirs.
"""

from __future__ import annotations

import unittest
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code

import torch_mmgen_opt as mmgen
from torch_mmgen_opt import OptimizeConfig
from torch_mmgen_opt.graph_utils import aten
from torch_mmgen_opt.kernels import cpu_gemv
from torch_mmgen_opt.passes.decode_gemv import MAX_ROWS, PASS
from torch_mmgen_opt.testing import (
    TestCase,
    count_targets,
    mmgen_counters,
    run_tests,
    trace_and_apply,
)

TOL = dict(atol=1e-5, rtol=1e-5)
MMS = (aten.mm.default, aten.addmm.default)


def _weights(n: int, k: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(dtype) / k**0.5, torch.randn(n, generator=g).to(dtype)


class MLP(nn.Module):
    def __init__(self, dim: int = 256, hidden: int = 512) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class TestDecodeGemvGraph(TestCase):
    def _rewrite(self, fn, *args, config=None):
        return trace_and_apply(PASS, fn, *args, config=config)

    def test_linear_rows_match_eager(self):
        w, b = _weights(512, 256)
        for rows in (1, 2, 4, MAX_ROWS):
            for bias in (b, None):
                with self.subTest(rows=rows, bias=bias is not None):
                    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
                    if bias is None:
                        args, fn = (x, w), lambda x, w: F.linear(x, w)
                    else:
                        args, fn = (x, w, bias), lambda x, w, b: F.linear(x, w, b)
                    gm, n, counts, _ = self._rewrite(fn, *args)
                    self.assertEqual(n, 1)
                    self.assertEqual(counts["gemv_rewritten"], 1)
                    self.assertEqual(count_targets(gm, *MMS), 0)
                    self.assertEqual(count_targets(gm, aten.sum.dim_IntList), rows)
                    self.assertEqual(gm(*args), fn(*args), **TOL)

    def test_decode_shaped_input(self):
        """A (beams, 1, dim) activation reaches mm as (beams, dim)."""
        w, b = _weights(1024, 256)
        x = torch.randn(4, 1, 256)
        gm, n, _, report = self._rewrite(lambda x, w, b: F.linear(x, w, b), x, w, b)
        self.assertEqual(n, 1)
        self.assertEqual(gm(x, w, b), F.linear(x, w, b), **TOL)
        self.assertIn("4 rows x 1024 outputs", report.to_markdown())

    def test_must_not_fire(self):
        w, b = _weights(512, 256)
        cases = {
            "prefill rows": (lambda x, w: F.linear(x, w), (torch.randn(MAX_ROWS + 1, 256), w),
                             f"{MAX_ROWS + 1} rows > {MAX_ROWS}"),
            "small weight": (lambda x, w: F.linear(x, w), (torch.randn(4, 64), w[:64, :64].clone()),
                             "under 65536 elements"),
            "bfloat16": (lambda x, w: F.linear(x, w),
                         (torch.randn(4, 256, dtype=torch.bfloat16), w.bfloat16()),
                         "float32 only"),
            # x @ W with W a contiguous (K, N): not a transposed nn.Linear weight
            "plain matrix": (lambda x, w: x @ w, (torch.randn(4, 512), w), "not the transpose"),
            "no rows": (lambda x, w: F.linear(x, w), (torch.randn(0, 256), w), "no rows"),
            "addmm beta": (lambda x, w, b: torch.addmm(b, x, w.t(), beta=0.5),
                           (torch.randn(4, 256), w, b), "beta/alpha"),
        }
        for name, (fn, args, reason) in cases.items():
            with self.subTest(name):
                gm, n, counts, report = self._rewrite(fn, *args)
                self.assertEqual(n, 0)
                self.assertEqual(counts.get("gemv_rewritten", 0), 0)
                self.assertEqual(counts["gemv_skipped"], 1)
                self.assertIn(reason, report.to_markdown())
                self.assertEqual(count_targets(gm, *MMS), 1)

    def test_off_switch(self):
        """``decode_gemv=False`` keeps the pass out of the pipeline altogether."""
        self.assertTrue(PASS.enabled(OptimizeConfig()))
        self.assertFalse(PASS.enabled(OptimizeConfig(decode_gemv=False)))
        with self.assertRaisesRegex(TypeError, "decode_gemv"):
            OptimizeConfig(decode_gemv="yes")


class TestDecodeGemvCompiled(TestCase):
    def test_decode_mlp_has_no_library_matmul(self):
        torch.manual_seed(0)
        mlp = MLP().eval()
        x = torch.randn(4, 1, 256)
        with torch.no_grad():
            ref = mlp(x)
            with mmgen_counters() as c:
                compiled = mmgen.optimize(mlp)
                out, (code,) = run_and_get_code(compiled, x)
                self.assertEqual(c["gemv_rewritten"], 2)
        self.assertEqual(out, ref, **TOL)
        self.assertNotIn("extern_kernels.mm", code)
        self.assertNotIn("extern_kernels.addmm", code)

    def test_prefill_and_off_keep_the_library_call(self):
        torch.manual_seed(0)
        mlp = MLP().eval()
        for name, x, config in (
            ("prefill", torch.randn(1, 32, 256), OptimizeConfig()),
            ("off", torch.randn(4, 1, 256), OptimizeConfig(decode_gemv=False)),
        ):
            with self.subTest(name), torch.no_grad():
                torch._dynamo.reset()
                with mmgen_counters() as c:
                    out, (code,) = run_and_get_code(mmgen.optimize(mlp, config=config), x)
                    self.assertEqual(c.get("gemv_rewritten", 0), 0)
                self.assertEqual(out, mlp(x), **TOL)
                self.assertIn("extern_kernels.", code)

    def test_dynamic_rows_are_left_alone(self):
        torch.manual_seed(0)
        mlp = MLP().eval()
        compiled = torch.compile(mlp, backend="mmgen", dynamic=True)
        with torch.no_grad(), mmgen_counters() as c:
            for rows in (3, 5):
                x = torch.randn(rows, 256)
                self.assertEqual(compiled(x), mlp(x), **TOL)
            self.assertEqual(c.get("gemv_rewritten", 0), 0)
            self.assertGreater(c["gemv_skipped"], 0)


def _int8(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
            torch.rand(n, generator=g) / 127)


def _int8_mm(x, q, s):
    return torch.ops.aten._weight_int8pack_mm(x, q, s)


@unittest.skipUnless(cpu_gemv.ensure_loaded(), "the int8 CPU kernel could not be built here")
class TestDecodeGemvInt8(TestCase):
    """``aten._weight_int8pack_mm`` (float32 x, int8 weight) -> ``mmgen_cpu.int8_gemv``."""

    def test_rows_match_torch_kernel(self):
        q, s = _int8(320, 256)
        for rows in (1, 3, MAX_ROWS):
            with self.subTest(rows=rows):
                x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
                gm, n, counts, report = trace_and_apply(PASS, _int8_mm, x, q, s)
                self.assertEqual(n, 1)
                self.assertEqual(counts["gemv_rewritten"], 1)
                self.assertEqual(count_targets(gm, aten._weight_int8pack_mm), 0)
                self.assertEqual(count_targets(gm, torch.ops.mmgen_cpu.int8_gemv), 1)
                self.assertIn(f"{rows} rows x 320 outputs, int8", report.to_markdown())
                ref = _int8_mm(x, q, s)
                torch.testing.assert_close(gm(x, q, s), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())

    def test_must_not_fire(self):
        q, s = _int8(64, 128)
        cases = {
            "prefill rows": ((torch.randn(MAX_ROWS + 1, 128), q, s), f"{MAX_ROWS + 1} rows"),
            "bfloat16": ((torch.randn(4, 128, dtype=torch.bfloat16), q, s.bfloat16()),
                         "activations torch.bfloat16"),
        }
        for name, (args, reason) in cases.items():
            with self.subTest(name):
                gm, n, counts, report = trace_and_apply(PASS, _int8_mm, *args)
                self.assertEqual(n, 0)
                self.assertEqual(counts["gemv_skipped"], 1)
                self.assertIn(f"int8: {reason}", report.to_markdown())
                self.assertEqual(count_targets(gm, aten._weight_int8pack_mm), 1)
        with self.subTest("kernel not loaded"), mock.patch.object(cpu_gemv, "is_loaded", return_value=False):
            gm, n, _, report = trace_and_apply(PASS, _int8_mm, torch.randn(4, 128), q, s)
            self.assertEqual(n, 0)
            self.assertIn("not loaded", report.to_markdown())
            self.assertEqual(count_targets(gm, aten._weight_int8pack_mm), 1)

    def test_quantized_mlp_compiled(self):
        """optimize(quantize='int8') on a float32 decode-shaped MLP: both linears run
        through the kernel (no _weight_int8pack_mm left in Inductor's code), SQNR against
        the float model well above the quantization bound, and equal (float32 rounding)
        to the same quantized module run eagerly; prefill rows keep torch's kernel."""
        import copy

        from torch_mmgen_opt.testing import sqnr

        torch.manual_seed(0)
        mlp = MLP().eval()
        x = torch.randn(4, 1, 256)
        with torch.no_grad():
            ref = mlp(x)
            compiled = mmgen.optimize(copy.deepcopy(mlp), quantize="int8")
            with mmgen_counters() as c:
                out, (code,) = run_and_get_code(compiled, x)
                self.assertEqual(c["gemv_rewritten"], 2)
            self.assertIn("mmgen_cpu.int8_gemv", code)
            self.assertNotIn("_weight_int8pack_mm", code)
            self.assertGreater(sqnr(ref, out), 35)
            eager_q = compiled._orig_mod if hasattr(compiled, "_orig_mod") else None
            if eager_q is not None:
                torch.testing.assert_close(out, eager_q(x), rtol=1e-4, atol=1e-4)
            with mmgen_counters() as c:
                prefill = torch.randn(1, 32, 256)
                _, (code,) = run_and_get_code(compiled, prefill)
                self.assertEqual(c.get("gemv_rewritten", 0), 0)
            self.assertIn("_weight_int8pack_mm", code)


if __name__ == "__main__":
    run_tests()
