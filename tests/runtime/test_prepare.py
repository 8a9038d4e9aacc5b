"""Tests of runtime/prepare.py: weight_norm folding (both flavours) and bucket padding."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as param_weight_norm

from torch_mmgen_opt.runtime.prepare import fold_weight_norm_, pad_to_bucket, pick_bucket
from torch_mmgen_opt.testing import TestCase, run_tests


def _old_weight_norm(m: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook flavour is deprecated, still used in the wild
        return nn.utils.weight_norm(m)


class _Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


class TestFoldWeightNorm(TestCase):
    def _check_unchanged(self, model: nn.Module, x: torch.Tensor, expected_folds: int) -> None:
        with torch.no_grad():
            ref = model(x)
            n = fold_weight_norm_(model)
            out = model(x)
        self.assertEqual(n, expected_folds)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)

    def test_hook_flavour(self):
        torch.manual_seed(0)
        model = nn.Sequential(_old_weight_norm(nn.Conv1d(4, 8, 3, padding=1)), nn.ReLU(),
                              _old_weight_norm(nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1)))
        self._check_unchanged(model, torch.randn(2, 4, 10), expected_folds=2)
        for m in model.modules():
            self.assertFalse(hasattr(m, "weight_g"))
            self.assertEqual(len(m._forward_pre_hooks), 0)
        self.assertIsInstance(model[0].weight, nn.Parameter)

    def test_parametrization_flavour(self):
        torch.manual_seed(0)
        model = nn.Sequential(param_weight_norm(nn.Conv1d(4, 8, 3, padding=1)), nn.Tanh(),
                              param_weight_norm(nn.Linear(10, 10), dim=None))
        self._check_unchanged(model, torch.randn(2, 4, 10), expected_folds=2)
        self.assertFalse(any(parametrize.is_parametrized(m) for m in model.modules()))
        self.assertNotIn("parametrizations.weight.original0", dict(model.state_dict()))

    def test_seamless_vocoder_unchanged(self):
        from torch_mmgen_opt.models import build

        vocoder = build("seamless", "tiny").vocoder
        n_convs = sum(isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)) for m in vocoder.modules())
        self._check_unchanged(vocoder, torch.randint(0, 100, (1, 9)), expected_folds=n_convs)

    def test_no_weight_norm_is_a_no_op(self):
        model = nn.Conv1d(2, 2, 3)
        self._check_unchanged(model, torch.randn(1, 2, 5), expected_folds=0)

    def test_mixed_parametrization_left_alone(self):
        conv = param_weight_norm(nn.Conv1d(2, 2, 3))
        parametrize.register_parametrization(conv, "weight", _Scale())
        with self.assertLogs("torch_mmgen_opt", level="WARNING"):
            self._check_unchanged(conv, torch.randn(1, 2, 5), expected_folds=0)
        self.assertTrue(parametrize.is_parametrized(conv, "weight"))


class TestPadToBucket(TestCase):
    def test_pads_to_smallest_bucket_with_mask(self):
        x = torch.randn(2, 5, 3)
        padded, mask = pad_to_bucket(x, torch.tensor([5, 3]), (4, 8, 16))
        self.assertEqual(padded.shape, (2, 8, 3))
        self.assertEqual(padded[:, :5], x)
        self.assertEqual(padded[:, 5:], torch.zeros(2, 3, 3))
        self.assertEqual(mask, torch.arange(8)[None, :] < torch.tensor([[5], [3]]))

    def test_exact_bucket_and_default_lengths(self):
        x = torch.randn(1, 8)
        padded, mask = pad_to_bucket(x, None, (8, 4))
        self.assertIs(padded, x)
        self.assertTrue(bool(mask.all()))

    def test_too_long_raises_with_fix(self):
        with self.assertRaisesRegex(ValueError, "add a bucket >= 9"):
            pad_to_bucket(torch.randn(1, 9), None, (4, 8))
        self.assertEqual(pick_bucket(3, (8, 4)), 4)


if __name__ == "__main__":
    run_tests()
