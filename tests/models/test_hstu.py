"""The HSTU workload: jagged semantics of the eager model, and the optimized forward within
tolerance of eager on ragged batches."""

from __future__ import annotations

import torch

import torch_mmgen_opt as mmgen
from torch_mmgen_opt import models
from torch_mmgen_opt.models.hstu import example_batch
from torch_mmgen_opt.testing import TestCase, mmgen_counters, run_tests


class HSTUModelTest(TestCase):
    def setUp(self):
        super().setUp()
        self.model = models.build("hstu", "tiny")
        self.cfg = self.model.config

    def test_output_is_jagged_like_input(self):
        values, offsets, ts = example_batch(self.cfg, [5, 64, 17, 1])
        with torch.no_grad():
            out = self.model(values, offsets, ts)
        self.assertEqual(out.shape, values.shape)
        self.assertTrue(torch.isfinite(out).all())

    def test_history_independent_of_its_batch(self):
        # Padding and the other histories must not leak into a history's output.
        values, offsets, ts = example_batch(self.cfg, [5, 64, 17, 1])
        with torch.no_grad():
            out = self.model(values, offsets, ts)
            for b in range(4):
                s, e = int(offsets[b]), int(offsets[b + 1])
                alone = self.model(values[s:e], torch.tensor([0, e - s]), ts[s:e])
                torch.testing.assert_close(out[s:e], alone, rtol=1e-5, atol=1e-5)

    def test_causal(self):
        # The first k items' outputs do not depend on later items.
        values, offsets, ts = example_batch(self.cfg, [20])
        with torch.no_grad():
            full = self.model(values, offsets, ts)
            prefix = self.model(values[:12], torch.tensor([0, 12]), ts[:12])
        torch.testing.assert_close(full[:12], prefix, rtol=1e-5, atol=1e-5)

    def test_time_bias_matters(self):
        values, offsets, ts = example_batch(self.cfg, [16])
        with torch.no_grad():
            a = self.model(values, offsets, ts)
            b = self.model(values, offsets, ts * 1000)
        self.assertFalse(torch.allclose(a, b))

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "unknown hstu size"):
            models.build("hstu", "huge")
        with self.assertRaisesRegex(ValueError, "unknown HSTUConfig field"):
            models.build("hstu", "tiny", heads=3)
        with self.assertRaisesRegex(ValueError, "history lengths"):
            example_batch(self.cfg, [0, 3])

    def test_optimized_forward_matches_eager(self):
        # Default config on CPU: the SiLU attention is left to Inductor (skipped event).
        opt = mmgen.optimize(self.model)
        with mmgen_counters() as counts, torch.no_grad():
            for lengths in ([5, 64, 17, 1], [33, 2, 40]):
                batch = example_batch(self.cfg, lengths, seed=len(lengths))
                torch.testing.assert_close(opt(*batch), self.model(*batch), rtol=1e-4, atol=1e-4)
            self.assertEqual(counts["hstu_attention_fused"], 0)
            self.assertGreaterEqual(counts["hstu_attention_skipped"], self.cfg.n_layers)


if __name__ == "__main__":
    run_tests()
