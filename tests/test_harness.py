"""The benchmark harness (benchmarks/harness.py): the smoke run end to end, rows for
levers that are missing or broken, the bytes behind the roofline, the CLI."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from unittest import mock

import torch
from torch import nn

import torch_mmgen_opt as mmgen
from benchmarks import harness, plots
from torch_mmgen_opt.testing import TestCase, run_tests


def _run_rows(rows, **kw):
    return harness.run_workload(
        "llama", size="tiny", device="cpu", dtype=torch.float32, batch=1, prompt_len=4,
        new_tokens=3, repeats=1, rows=rows, read_bw=1e10, characterize=kw.pop("characterize", False),
        layerskip_exit=None, num_speculations=2, progress=harness._Progress(len(rows), "test"),
    )


class TestHarness(TestCase):
    def test_smoke_writes_markdown_and_figures(self):
        with tempfile.TemporaryDirectory() as tmp:
            md = harness.main(smoke=True, results_dir=tmp, threads=1)
            self.assertTrue(md.exists())
            text = md.read_text()
            for word in ("eager (baseline)", "static KV cache", "torch:", "machine:",
                         "device: cpu", "speedup decode", "% roofline", "where the time goes"):
                self.assertIn(word, text)
            if "| static_kv=True | ok |" in text:
                # generate()'s prefill and decode are marked: both reports split them
                self.assertIn("final: static_kv", text)
                self.assertGreaterEqual(text.count("| decode |"), 4)
            pngs = sorted(Path(tmp).glob("*.png"))
            self.assertGreaterEqual(len(pngs), 2)
            for png in pngs:
                self.assertEqual(png.read_bytes()[:4], b"\x89PNG")
                self.assertIn(png.name, text)

    def test_missing_and_broken_levers_are_rows(self):
        def fake_optimize(model, **kw):
            if "quantize" in kw:
                raise RuntimeError("kernel exploded")
            raise NotImplementedError("static_kv: the static KV cache is not implemented yet")

        with mock.patch.object(mmgen, "optimize", side_effect=fake_optimize):
            out = _run_rows(("eager", "static_kv", "quantize"), characterize=True)
        eager, static, quant = out["rows"]
        self.assertEqual(eager.status, "ok")
        self.assertEqual(eager.metrics["same tokens"], "3/3")
        self.assertAlmostEqual(eager.metrics["speedup e2e"], 1.0)
        self.assertTrue(static.status.startswith("not available: NotImplementedError: static_kv"))
        self.assertTrue(quant.status.startswith("failed: RuntimeError: kernel exploded"))
        # the failed lever is not in the stack of the row below it
        self.assertNotIn("static_kv", quant.stack)
        self.assertEqual([r.label for r in out["reports"]], ["eager"])
        with tempfile.TemporaryDirectory() as tmp:
            png = plots.plot_levers([out], Path(tmp) / "levers.png")
            self.assertEqual(png.read_bytes()[:4], b"\x89PNG")

    def test_weight_bytes(self):
        class Tied(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(10, 4)
                self.head = nn.Linear(4, 10, bias=False)
                self.head.weight = self.embed.weight
                self.register_buffer("k_cache", torch.zeros(100))

        self.assertEqual(harness.weight_bytes(Tied()), 10 * 4 * 4)  # once, cache excluded
        emb = nn.Embedding(1000, 8)
        self.assertEqual(harness.weight_bytes(emb), 0)  # a lookup reads one row
        # optimize(gemv_kernel=True) holds each big weight twice; a step reads the panels
        from torch_mmgen_opt.kernels import cpu_gemv
        from torch_mmgen_opt.kernels.gemv_linear import GemvLinear

        if cpu_gemv.ensure_loaded():
            lin = nn.Linear(256, 300, bias=False)  # 300 outputs: 19 panels of 16 (304)
            self.assertEqual(harness.weight_bytes(nn.Sequential(GemvLinear(lin))), 304 * 256 * 4)
        model = mmgen.models.build("llama", "tiny")
        cfg = model.config
        kv = harness.kv_bytes_per_step(model, batch=1, prompt_len=8, new_tokens=4)
        self.assertEqual(kv, 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * 10)

    def test_cli_mirrors_main(self):
        args = harness._parse(["--smoke", "--rows", "eager,static_kv", "--device", "cpu"])
        self.assertEqual(set(args), set(inspect.signature(harness.main).parameters))
        self.assertTrue(args["smoke"])
        with self.assertRaisesRegex(ValueError, "unknown row"):
            harness.main(rows="eager,turbo")
        with self.assertRaisesRegex(ValueError, "include 'eager'"):
            harness.main(rows="static_kv")


if __name__ == "__main__":
    run_tests()
