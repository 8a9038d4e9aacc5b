"""Tests of kernels/cpu_gemv.py: the few-row kernels built at run time.

int8: numerics against torch's ``aten._weight_int8pack_mm`` (the same int8 math, another
summation order: float32 rounding only), every row count it takes, widths that leave a
tail after the 16-wide loop, input checks. float32 and bfloat16 panels: numerics against
``F.linear`` for row counts across the kernel's row groups (8 on AVX-512, 4 on AVX2),
output counts that leave a partial last panel, with and without bias; the packing
layout itself; input checks. The build's failure path (a compiler that fails must give
``False`` and a warning, never an exception).
"""

from __future__ import annotations

import os
import unittest
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from torch_mmgen_opt.kernels import cpu_gemv
from torch_mmgen_opt.testing import TestCase, run_tests

# On the lent GPU image (torch 2.11+cu130) a C++ exception from an extension library,
# torch's own load_inline included, segfaulted the process (seen 2026-12-04): the checks
# that raise through the library run where that image is not (it is the one with CUDA).
CXX_EXCEPTIONS_CRASH = torch.cuda.is_available()
CXX_EXCEPTIONS_CRASH_WHY = "C++ exceptions from extension libraries crash the GPU image's process"
AVAILABLE = cpu_gemv.ensure_loaded()


def _case(m: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, generator=g) / 127
    return x, q, scales


@unittest.skipUnless(AVAILABLE, "the CPU kernels could not be built here")
class TestInt8Gemv(TestCase):
    def test_matches_torch_int8_kernel(self):
        for m in range(1, cpu_gemv.MAX_ROWS + 1):
            for n, k in ((1, 16), (37, 100), (64, 512), (129, 515)):
                with self.subTest(m=m, n=n, k=k):
                    x, q, s = _case(m, n, k, seed=m * 1000 + n)
                    ref = torch.ops.aten._weight_int8pack_mm(x, q, s)
                    out = cpu_gemv.int8_gemv(x, q, s)
                    self.assertEqual(out.shape, (m, n))
                    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())

    def test_non_contiguous_inputs(self):
        x, q, s = _case(4, 64, 256)
        ref = torch.ops.aten._weight_int8pack_mm(x, q, s)
        out = cpu_gemv.int8_gemv(x.t().contiguous().t(), q.t().contiguous().t(), s)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)

    def test_bad_inputs_raise(self):
        x, q, s = _case(9, 8, 16)
        with self.assertRaisesRegex(ValueError, "1 to 8 rows"):
            cpu_gemv.int8_gemv(x, q, s)
        x, q, s = _case(2, 8, 16)
        with self.assertRaisesRegex(TypeError, "float32"):
            cpu_gemv.int8_gemv(x.bfloat16(), q, s)
        with self.assertRaisesRegex(TypeError, "int8 q"):
            cpu_gemv.int8_gemv(x, q.float(), s)
        with self.assertRaisesRegex(ValueError, "do not match"):
            cpu_gemv.int8_gemv(x, q[:, :8], s)
        with self.assertRaisesRegex(ValueError, "do not match"):
            cpu_gemv.int8_gemv(x, q, s[:4])

    @unittest.skipIf(CXX_EXCEPTIONS_CRASH, CXX_EXCEPTIONS_CRASH_WHY)
    def test_op_checks_raise(self):
        # the library's own checks, for callers of torch.ops.mmgen_cpu.int8_gemv
        x, q, s = _case(9, 8, 16)
        with self.assertRaisesRegex(RuntimeError, "1 to 8 rows"):
            torch.ops.mmgen_cpu.int8_gemv(x, q, s)
        x, q, s = _case(2, 8, 16)
        with self.assertRaisesRegex(RuntimeError, "float32"):
            torch.ops.mmgen_cpu.int8_gemv(x.bfloat16(), q, s)
        with self.assertRaisesRegex(RuntimeError, "do not match"):
            torch.ops.mmgen_cpu.int8_gemv(x, q[:, :8], s)

    def test_fake_tensor_shape(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            x, q, s = torch.empty(3, 64), torch.empty(10, 64, dtype=torch.int8), torch.empty(10)
            self.assertEqual(torch.ops.mmgen_cpu.int8_gemv(x, q, s).shape, (3, 10))


@unittest.skipUnless(AVAILABLE, "the CPU kernels could not be built here")
class TestPanelGemv(TestCase):
    def test_matches_linear(self):
        g = torch.Generator().manual_seed(0)
        for m in (1, 2, 3, 4, 5, 8, 9, 13):
            for n, k in ((1, 1), (16, 64), (37, 100), (512, 512), (2050, 33)):
                for bias in (False, True):
                    with self.subTest(m=m, n=n, k=k, bias=bias):
                        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
                        b = torch.randn(n, generator=g) if bias else None
                        out = cpu_gemv.panel_gemv(x, cpu_gemv.pack_panels(w), b, n)
                        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
                        self.assertEqual(out.shape, (m, n))
                        # float32 rounding of a K-term sum, not a wrong element
                        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * k ** 0.5 * 4)

    def test_bfloat16_matches_linear(self):
        g = torch.Generator().manual_seed(1)
        for m in (1, 4, 8, 9):
            for n, k in ((37, 100), (512, 512), (2050, 33)):
                for bias in (False, True):
                    with self.subTest(m=m, n=n, k=k, bias=bias):
                        x = torch.randn(m, k, generator=g).bfloat16()
                        w = torch.randn(n, k, generator=g).bfloat16()
                        b = torch.randn(n, generator=g).bfloat16() if bias else None
                        out = cpu_gemv.panel_gemv(x, cpu_gemv.pack_panels(w), b, n)
                        self.assertEqual(out.dtype, torch.bfloat16)
                        ref = F.linear(x.double(), w.double(), None if b is None else b.double())
                        # float32 accumulation, one rounding to bfloat16 (8 bits of mantissa)
                        err = (out.double() - ref).abs()
                        self.assertTrue(bool((err <= ref.abs() * 2 ** -8 + 1e-3).all()),
                                        f"max error {err.max().item()}")

    def test_pack_layout(self):
        w = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
        p = cpu_gemv.pack_panels(w)
        self.assertEqual(p.shape, (2, 3, 16))
        self.assertEqual(p[0, 2, 5].item(), w[5, 2].item())
        self.assertEqual(p[1, 1, 3].item(), w[19, 1].item())
        self.assertTrue(bool((p[1, :, 4:] == 0).all()))  # padding past N
        with self.assertRaises(TypeError):
            cpu_gemv.pack_panels(w.double())
        self.assertEqual(cpu_gemv.pack_panels(w.bfloat16()).dtype, torch.bfloat16)
        with self.assertRaises(ValueError):
            cpu_gemv.pack_panels(w[0])

    def test_non_contiguous_input(self):
        x, w = torch.randn(8, 4), torch.randn(32, 8)
        out = cpu_gemv.panel_gemv(x.t(), cpu_gemv.pack_panels(w), None, 32)
        torch.testing.assert_close(out, x.t() @ w.t(), rtol=1e-5, atol=1e-5)

    def test_bad_inputs_raise(self):
        x, w = torch.randn(2, 16), torch.randn(20, 16)
        p = cpu_gemv.pack_panels(w)
        with self.assertRaisesRegex(TypeError, "float32 or bfloat16"):
            cpu_gemv.panel_gemv(x.double(), p, None, 20)
        with self.assertRaisesRegex(TypeError, "same dtype"):
            cpu_gemv.panel_gemv(x.bfloat16(), p, None, 20)
        with self.assertRaisesRegex(ValueError, r"\(M, K\)"):
            cpu_gemv.panel_gemv(torch.randn(2, 1, 16), p, None, 20)
        with self.assertRaisesRegex(ValueError, "features"):
            cpu_gemv.panel_gemv(x[:, :8], p, None, 20)
        with self.assertRaisesRegex(ValueError, "do not fit"):
            cpu_gemv.panel_gemv(x, p, None, 33)
        with self.assertRaisesRegex(ValueError, "do not fit"):
            cpu_gemv.panel_gemv(x, p, None, 16)
        with self.assertRaisesRegex(ValueError, "bias"):
            cpu_gemv.panel_gemv(x, p, torch.randn(19), 20)
        with self.assertRaisesRegex(ValueError, "bias"):
            cpu_gemv.panel_gemv(x, p, torch.randn(20).bfloat16(), 20)

    @unittest.skipIf(CXX_EXCEPTIONS_CRASH, CXX_EXCEPTIONS_CRASH_WHY)
    def test_op_checks_raise(self):
        x, w = torch.randn(2, 16), torch.randn(20, 16)
        p = cpu_gemv.pack_panels(w)
        with self.assertRaisesRegex(RuntimeError, "float32 or bfloat16"):
            torch.ops.mmgen_cpu.panel_gemv(x.double(), p, None, 20)
        with self.assertRaisesRegex(RuntimeError, "same dtype"):
            torch.ops.mmgen_cpu.panel_gemv(x.bfloat16(), p, None, 20)
        with self.assertRaisesRegex(RuntimeError, "features"):
            torch.ops.mmgen_cpu.panel_gemv(x[:, :8], p, None, 20)
        with self.assertRaisesRegex(RuntimeError, "do not fit"):
            torch.ops.mmgen_cpu.panel_gemv(x, p, None, 33)
        with self.assertRaisesRegex(RuntimeError, "bias"):
            torch.ops.mmgen_cpu.panel_gemv(x, p, torch.randn(19), 20)

    def test_fake_tensor_shape(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            x, p = torch.empty(3, 64), torch.empty(2, 64, 16)
            self.assertEqual(torch.ops.mmgen_cpu.panel_gemv(x, p, None, 30).shape, (3, 30))


class TestBuild(TestCase):
    def test_library_path_is_keyed(self):
        path = cpu_gemv.library_path()
        self.assertTrue(path.name.startswith("mmgen_cpu_gemv_"))
        with mock.patch.dict(os.environ, {"TORCH_MMGEN_OPT_CACHE": "/tmp/elsewhere"}):
            self.assertEqual(cpu_gemv.library_path().parent, Path("/tmp/elsewhere"))
            self.assertEqual(cpu_gemv.library_path().name, path.name)

    def test_failed_build_is_a_warning_not_an_error(self):
        state = {"loaded": False, "failed": None}
        with mock.patch.dict(os.environ), mock.patch.object(cpu_gemv, "_state", state), \
                mock.patch.object(cpu_gemv, "library_path", return_value=Path("/nonexistent/x.so")), \
                mock.patch.object(cpu_gemv, "_build", side_effect=RuntimeError("no compiler")), \
                self.assertLogs("torch_mmgen_opt", level="WARNING") as logs:
            os.environ.pop("TORCH_MMGEN_OPT_NO_CPP_KERNELS", None)  # the build is attempted
            self.assertFalse(cpu_gemv.ensure_loaded())
            self.assertFalse(cpu_gemv.ensure_loaded())  # remembered: one warning
            self.assertEqual(cpu_gemv.cache_token(), "cpu_gemv:0")
        self.assertEqual(len(logs.records), 1)
        self.assertIn("no compiler", logs.output[0])

    def test_compiler_error_is_reported(self):
        with mock.patch.object(cpu_gemv, "_compiler", return_value="false"), \
                self.assertRaisesRegex(RuntimeError, "failed"):
            cpu_gemv._build(Path(self.enterContext(_tmpdir())) / "x.so")

    def test_disabled_by_environment(self):
        state = {"loaded": False, "failed": None}
        with mock.patch.object(cpu_gemv, "_state", state), \
                mock.patch.dict(os.environ, {"TORCH_MMGEN_OPT_NO_CPP_KERNELS": "1"}), \
                mock.patch.object(cpu_gemv, "_build") as build:
            self.assertFalse(cpu_gemv.ensure_loaded())
        build.assert_not_called()


def _tmpdir():
    import tempfile

    return tempfile.TemporaryDirectory()


if __name__ == "__main__":
    run_tests()
