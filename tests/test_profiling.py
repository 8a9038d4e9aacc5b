"""Characterization (torch_mmgen_opt/profiling.py): operator classes, phases, idle time,
report rendering. Eager models except two small compiled functions (Inductor kernel names)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

import torch_mmgen_opt as mmgen
from torch_mmgen_opt import profiling
from torch_mmgen_opt.models import build
from torch_mmgen_opt.profiling import CLASSES, characterize, classify_op
from torch_mmgen_opt.testing import TestCase, run_tests


def _op_time(phase: profiling.PhaseStats) -> float:
    return sum(s for c, s in phase.classes.items() if c != "idle")


class TestClassify(TestCase):
    def test_aten_ops(self):
        cases = {
            "aten::linear": "linear", "aten::addmm": "linear", "aten::mm": "linear",
            "aten::_weight_int8pack_mm": "linear", "aten::bmm": "attention",
            "aten::_softmax": "attention",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
            "aten::native_layer_norm": "norm", "aten::rsqrt": "norm",
            "aten::index_copy_": "kv_cache", "aten::index_select": "kv_cache",
            "aten::copy_": "kv_cache", "aten::conv1d": "conv",
            "aten::convolution": "conv", "aten::mul": "elementwise", "aten::to": "elementwise",
            "aten::embedding": "other", "aten::view": "other", "aten::argmax": "other",
        }
        for name, cls in cases.items():
            self.assertEqual(classify_op(name), cls, name)

    def test_context_dependent_ops(self):
        # cat along the last dim (rotate_half) is not a cache append; along dim 2 it is
        self.assertEqual(classify_op("aten::cat", cat_dim=-1), "elementwise")
        self.assertEqual(classify_op("aten::cat", cat_dim=2), "kv_cache")
        self.assertEqual(classify_op("aten::cat"), "kv_cache")
        self.assertEqual(classify_op("aten::matmul", child_names=["aten::expand", "aten::bmm"]),
                         "attention")
        self.assertEqual(classify_op("aten::matmul", child_names=["aten::mm"]), "linear")

    def test_generated_and_library_kernels(self):
        cases = {
            "graph_0_cpp_fused__softmax_add_div_0": "attention",
            "triton_red_fused_add_mean_mul_pow_rsqrt_3": "norm",
            "triton_tem_fused_mm_2": "linear",
            "cpp_fused_index_copy_1": "kv_cache",
            "triton_poi_fused_cat_mul_neg_4": "elementwise",
            "cpp_fused_silu_mul_5": "elementwise",
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "linear",
            "flash_fwd_splitkv_kernel": "attention",
            "void at::native::elementwise_kernel<128, 4>": "elementwise",
            "mylib::paged_attention": "attention",
            "mylib::int4_linear": "linear",
        }
        for name, cls in cases.items():
            self.assertEqual(classify_op(name), cls, name)

    def test_framework_spans_are_not_ops(self):
        for name in ("## Call CompiledFxGraph abc ##", "Torch-Compiled Region: 0/0",
                     "TorchDynamo Cache Lookup", "CompiledFunction", "cudaLaunchKernel"):
            self.assertFalse(profiling._is_op(name), name)
        for name in ("aten::mm", "graph_0_cpp_fused_add_0", "triton_poi_fused_add_0"):
            self.assertTrue(profiling._is_op(name), name)


class TestCharacterize(TestCase):
    def test_llama_phases_add_up(self):
        model = build("llama", "tiny")
        ids = torch.randint(0, 256, (1, 8))
        report = mmgen.characterize(model, ids, max_new_tokens=5, label="eager")
        self.assertEqual(list(report.phases), ["prefill", "decode"])
        self.assertEqual(report.phases["prefill"].calls, 1)
        self.assertEqual(report.phases["decode"].calls, 4)
        self.assertEqual(report.phases["decode"].tokens, 4)
        self.assertEqual(report.info["prompt_len"], 8)
        self.assertEqual(report.info["final_seq_len"], 13)
        for name, phase in report.phases.items():
            self.assertEqual(set(phase.classes), set(CLASSES))
            self.assertGreater(phase.wall_s, 0)
            # classes come from the profiler's clock, the wall from the host clock
            self.assertLess(abs(phase.accounted_s - phase.wall_s), 0.05 * phase.wall_s, name)
            self.assertGreater(_op_time(phase), 0)
        total = sum(report.class_totals().values())
        self.assertLess(abs(total - report.total_s), 0.05 * report.total_s)
        # the eager decode step runs matmuls, attention and cache appends
        decode = report.phases["decode"].classes
        for cls in ("linear", "attention", "kv_cache", "elementwise", "idle"):
            self.assertGreater(decode[cls], 0, cls)
        self.assertEqual(decode["conv"], 0)

    def test_linear_stack(self):
        model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
        x = torch.randn(64, 512)
        report = characterize(model, {"forward": lambda: model(x)}, repeats=3)
        phase = report.phases["forward"]
        self.assertEqual(phase.calls, 1)
        self.assertGreater(phase.classes["linear"], 0.9 * _op_time(phase))
        # no share of the wall clock is asserted: on a loaded machine host stalls land in
        # "idle" and can outweigh four small GEMMs; the classes still add up to the wall
        self.assertEqual(phase.classes["conv"], 0)
        self.assertLess(abs(phase.accounted_s - phase.wall_s), 0.05 * phase.wall_s)

    def test_conv_stack(self):
        model = nn.Sequential(*[nn.Conv1d(32, 32, 5, padding=2) for _ in range(3)])
        x = torch.randn(1, 32, 2048)
        report = characterize(model, {"vocoder": lambda: model(x)}, repeats=3)
        phase = report.phases["vocoder"]
        self.assertGreater(phase.classes["conv"], 0.9 * _op_time(phase))
        self.assertEqual(phase.classes["linear"], 0)

    def test_stages_unmarked_and_nested(self):
        a, b = torch.randn(128, 128), torch.randn(128, 128)

        def run(report):
            with report.phase("encoder"):
                a @ b
                with report.phase("inner"):  # nested marks are ignored
                    a + b
            for _ in range(3):
                with profiling.phase("decoder", tokens=1):
                    a @ b
            for _ in range(50):
                torch.softmax(a, -1)  # outside any phase

        report = characterize(None, run, device="cpu")
        self.assertEqual(list(report.phases), ["encoder", "decoder", "unmarked"])
        self.assertEqual(report.phases["decoder"].calls, 3)
        self.assertEqual(report.phases["decoder"].tokens, 3)
        self.assertGreater(report.phases["unmarked"].classes["attention"], 0)
        self.assertEqual(report.phases["encoder"].classes["attention"], 0)

    def test_nothing_marked_is_one_phase(self):
        x = torch.randn(64, 64)
        report = characterize(None, lambda r: x @ x, device="cpu")
        self.assertEqual(list(report.phases), ["run"])
        self.assertGreater(report.phases["run"].classes["linear"], 0)

    def test_phase_is_noop_outside(self):
        with profiling.phase("decode"):
            pass  # no characterization running: nothing to record, no error

    def test_bad_workload(self):
        model = build("llama", "tiny")
        with self.assertRaisesRegex(ValueError, "input_ids"):
            characterize(model, torch.randn(1, 8))
        with self.assertRaisesRegex(TypeError, "callable"):
            characterize(model, 3)

    def test_rendering(self):
        x = torch.randn(64, 64)
        before = characterize(None, {"prefill": lambda: x @ x, "decode": lambda: x + x},
                              label="eager", device="cpu")
        after = characterize(None, {"decode": lambda: x * 2}, label="optimized", device="cpu")
        md = before.to_markdown()
        for word in ("prefill", "decode", "linear %", "idle %", "eager", "framework overhead"):
            self.assertIn(word, md)
        d = json.loads(json.dumps(before.to_dict()))
        self.assertEqual(set(d["phases"]), {"prefill", "decode"})
        self.assertAlmostEqual(d["total_s"], before.total_s)
        with tempfile.TemporaryDirectory() as tmp:
            path = profiling.plot_characterization([before, after], Path(tmp) / "c.png")
            self.assertEqual(path.read_bytes()[:4], b"\x89PNG")
            self.assertEqual(before.plot(Path(tmp) / "one.png").read_bytes()[:4], b"\x89PNG")
        with self.assertRaises(ValueError):
            profiling.plot_characterization([], "x.png")


class TestCompiled(TestCase):
    @staticmethod
    def _fn(x, w):
        return torch.softmax(x @ w, dim=-1) * 2.0

    def test_inductor_kernels_classified(self):
        x, w = torch.randn(64, 256), torch.randn(256, 256)
        compiled = torch.compile(self._fn)
        with profiling.kernel_profiling(), torch.no_grad():  # characterize runs under no_grad
            compiled(x, w)
        report = characterize(None, {"step": lambda: compiled(x, w)}, device="cpu")
        step = report.phases["step"].classes
        self.assertGreater(step["linear"], 0)  # the extern mm
        self.assertGreater(step["attention"], 0)  # cpp_fused__softmax_mul
        self.assertEqual(report.notes, [])

    def test_unprofiled_kernels_noted(self):
        x, w = torch.randn(64, 128), torch.randn(128, 128)
        compiled = torch.compile(lambda x, w: self._fn(x, w) + 1.0)
        with torch.no_grad():
            compiled(x, w)
        report = characterize(None, {"step": lambda: compiled(x, w)}, device="cpu")
        self.assertEqual(report.phases["step"].classes["attention"], 0)
        self.assertTrue(any("kernel_profiling" in n for n in report.notes), report.notes)


if __name__ == "__main__":
    run_tests()
