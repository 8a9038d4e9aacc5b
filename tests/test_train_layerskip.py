"""train_layerskip.py: the LayerSkip recipe and a seconds-long smoke training run."""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import torch

from torch_mmgen_opt.models import build
from torch_mmgen_opt.models.layerskip import CHECKPOINT, llama_layerskip
from torch_mmgen_opt.testing import TestCase, run_tests
from torch_mmgen_opt.train_layerskip import (
    TrainConfig,
    evaluate,
    exit_weights,
    forward_exits,
    load_corpus,
    train,
)

SMOKE = dict(
    dim=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_hidden=64, seq_len=32, batch_size=4,
    steps=3, warmup=1, max_files=40, eval_windows=4, log_every=1,
)


class TestRecipe(TestCase):
    def test_exit_weights_rise_with_depth(self):
        w = exit_weights(8, 1.0)
        self.assertTrue(bool((w[1:] >= w[:-1]).all()))
        self.assertEqual(int(w.argmax()), 7)

    def test_exits_share_the_final_norm_and_head(self):
        model = build("llama", "tiny", n_layers=3)
        ids = torch.randint(0, 256, (2, 7))
        with torch.no_grad():
            exits = forward_exits(model, ids)
            self.assertEqual(exits[2], model(ids).logits, atol=1e-5, rtol=1e-5)
            # dropping layers 1 and 2 for every row leaves the exit-0 hidden state
            dropped = forward_exits(model, ids, drop_probs=torch.tensor([0.0, 1.0, 1.0]))
        self.assertEqual(dropped[1], exits[0])
        self.assertEqual(dropped[2], exits[0])

    def test_heldout_split_is_by_file(self):
        train_a, held_a, n = load_corpus(heldout_every=5, max_files=20)
        train_b, held_b, _ = load_corpus(heldout_every=5, max_files=20)
        self.assertTrue(torch.equal(train_a, train_b) and torch.equal(held_a, held_b))
        self.assertEqual(n, 20)
        self.assertGreater(held_a.numel(), 0)
        self.assertEqual(int((held_a == 0).sum()), 4)  # files 0, 5, 10, 15, NUL-separated


class TestSmokeTraining(TestCase):
    def test_smoke_run_is_deterministic_and_loads(self):
        cfg = TrainConfig(**SMOKE)
        with tempfile.TemporaryDirectory() as tmp:
            out, report = Path(tmp) / "a.pt", Path(tmp) / "a.md"
            first = train(cfg, out=out, report=report)
            second = train(cfg)
            for k, v in first["state_dict"].items():
                self.assertTrue(torch.equal(v, second["state_dict"][k]), k)
            self.assertEqual(first["meta"]["heldout_ppl"], second["meta"]["heldout_ppl"])
            text = report.read_text()
            self.assertIn("| 3 |", text)
            self.assertIn("step     2", text)
            model = llama_layerskip(out)
            self.assertEqual(model.config.n_layers, 3)
            self.assertEqual(next(model.parameters()).dtype, torch.float32)


class TestShippedCheckpoint(TestCase):
    def test_shipped_checkpoint(self):
        self.assertTrue(CHECKPOINT.exists())
        self.assertLess(CHECKPOINT.stat().st_size, 20e6)
        self.assertTrue(CHECKPOINT.with_suffix(".md").exists())
        ckpt = torch.load(CHECKPOINT, map_location="cpu", weights_only=False)
        ppl = ckpt["meta"]["heldout_ppl"]
        self.assertLess(ppl[-1], ppl[0])  # trained: the full depth beats the first exit
        if ckpt["meta"]["python"] != platform.python_version():
            self.skipTest("the held-out split depends on the standard library's files")
        cfg = TrainConfig(**ckpt["meta"]["train_config"])
        _, held, _ = load_corpus(cfg.heldout_every, cfg.max_files)
        got = evaluate(llama_layerskip(), held, cfg)
        for g, want in zip(got, ppl):
            self.assertLess(abs(g - want) / want, 1e-3)


if __name__ == "__main__":
    run_tests()
