"""Quantize/pack functions and the ``mmgen`` quantized-linear ops (eager, CPU)."""

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.common_utils import instantiate_parametrized_tests, parametrize

from torch_mmgen_opt.kernels import quant
from torch_mmgen_opt.testing import TestCase, run_tests, sqnr

# Accuracy bounds on random Gaussian weights and inputs (see docs/passes/quantize_linear.md).
MIN_SQNR_DB = {"int8": 35.0, "int4": 18.0, "int8_dynamic": 30.0}
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _gaussian(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


def _run(qw, x, bias=None):
    return quant.quantized_linear(
        x, qw.scheme, qw.group_size, qw.qweight, qw.scales, bias, qw.out_features
    )


class TestQuantizedLinearOp(TestCase):
    @parametrize("scheme", quant.SCHEMES)
    @parametrize("dtype", list(FLOAT_DTYPES))
    def test_output_within_sqnr_bound(self, scheme, dtype):
        dt = FLOAT_DTYPES[dtype]
        w, b = _gaussian(192, 256, seed=1), _gaussian(192, seed=2)
        x = _gaussian(3, 5, 256, seed=3)  # leading dims are kept
        qw = quant.quantize_weight(w.to(dt), scheme, group_size=64)
        out = _run(qw, x.to(dt), b.to(dt))
        self.assertEqual(out.shape, (3, 5, 192))
        self.assertEqual(out.dtype, dt)
        self.assertGreaterEqual(sqnr(F.linear(x, w, b), out), MIN_SQNR_DB[scheme])

    def test_int4_smaller_groups_are_more_accurate(self):
        w, x = _gaussian(64, 512, seed=4), _gaussian(8, 512, seed=5)
        ref = F.linear(x, w)
        db = [sqnr(ref, _run(quant.quantize_weight(w, "int4", g), x)) for g in (32, 64, 128)]
        self.assertGreater(db[0], db[1])
        self.assertGreater(db[1], db[2])

    def test_int4_kernel_matches_zero_point_formula(self):
        # The packed kernel must compute with w = (q - 8) * scale + zero, group-wise.
        w = _gaussian(16, 128, seed=6)  # the CPU int4 kernel needs N % 16 == 0
        q, sz = quant.quantize_int4_grouped(w, 32)  # (16, 128), (4, 16, 2)
        scale = sz[..., 0].t().repeat_interleave(32, dim=1)  # (16, 128)
        zero = sz[..., 1].t().repeat_interleave(32, dim=1)
        manual = (q.float() - 8) * scale + zero
        self.assertEqual(quant.dequantize(quant.quantize_weight(w, "int4", 32)), manual,
                         atol=1e-4, rtol=1e-4)
        self.assertTrue(((q >= 0) & (q <= 15)).all())

    def test_int8_is_symmetric_per_channel(self):
        w = _gaussian(8, 32, seed=7)
        w[3] *= 100.0  # one loud channel must not hurt the others
        q, scales = quant.quantize_int8_per_channel(w)
        self.assertEqual(q.dtype, torch.int8)
        self.assertEqual(q.abs().amax(dim=1), torch.full((8,), 127, dtype=torch.int8))
        self.assertEqual(scales * 127, w.abs().amax(dim=1))

    def test_int8_dynamic_fake_impl(self):
        qw = quant.quantize_weight(_gaussian(24, 32), "int8_dynamic")
        with FakeTensorMode() as mode:
            x = mode.from_tensor(torch.randn(5, 32))
            q = mode.from_tensor(qw.qweight)
            s = mode.from_tensor(qw.scales)
            out = torch.ops.mmgen.int8_dynamic_mm(x, q, s)
        self.assertEqual(tuple(out.shape), (5, 24))
        torch.library.opcheck(
            torch.ops.mmgen.int8_dynamic_mm.default, (torch.randn(5, 32), qw.qweight, qw.scales),
            test_utils=("test_schema", "test_faketensor"),
        )

    def test_quantized_linear_module_memory_and_output(self):
        lin = nn.Linear(256, 128, dtype=torch.bfloat16)
        ql = quant.QuantizedLinear.from_linear(lin, quant.quantize_weight(lin.weight, "int8"))
        weight_bytes = ql.qweight.nbytes + ql.scales.nbytes
        self.assertLessEqual(weight_bytes / lin.weight.nbytes, 0.55)
        self.assertNotIn("weight", dict(ql.named_parameters()))
        x = torch.randn(2, 256, dtype=torch.bfloat16)
        self.assertGreaterEqual(sqnr(lin(x), ql(x)), 30.0)
        self.assertIn("scheme=int8", repr(ql))


class TestBadInput(TestCase):
    def test_unknown_scheme(self):
        with self.assertRaisesRegex(ValueError, "pass one of"):
            quant.quantize_weight(torch.randn(4, 4), "int3")

    def test_group_size_does_not_divide(self):
        with self.assertRaisesRegex(ValueError, r"divide in_features=96.*group_size=\.\.\.\) with one of \[32\]"):
            quant.quantize_int4_grouped(torch.randn(8, 96), 64)

    def test_dtype_the_kernel_cannot_take(self):
        with self.assertRaisesRegex(ValueError, r"model.to\(torch.bfloat16\)"):
            quant.quantize_weight(torch.randn(8, 64, dtype=torch.float64), "int8")

    def test_shape_reasons(self):
        self.assertIsNone(quant.check_weight(torch.randn(16, 64), "int4", 32))
        self.assertIn("2-D", quant.check_weight(torch.randn(8, 4, 64), "int8"))
        self.assertIn("group_size=64", quant.check_weight(torch.randn(16, 96), "int4", 64))
        self.assertIn("% 16", quant.check_weight(torch.randn(172, 64), "int4", 64))
        bf16_odd_k = torch.randn(64, 172, dtype=torch.bfloat16)  # would crash the kernel
        self.assertIn("% 8", quant.check_weight(bf16_odd_k, "int8"))
        self.assertIsNone(quant.check_weight(bf16_odd_k.float(), "int8"))
        with self.assertRaisesRegex(ValueError, "cannot quantize"):
            quant.quantize_weight(torch.randn(16, 96), "int4", 64)


instantiate_parametrized_tests(TestQuantizedLinearOp)

if __name__ == "__main__":
    run_tests()
