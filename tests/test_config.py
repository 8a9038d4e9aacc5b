"""OptimizeConfig and the per-lever configs: validation, shorthands, options."""

import dataclasses

import torch

from torch_mmgen_opt import (
    AttentionConfig,
    CompileConfig,
    LayerSkip,
    OptimizeConfig,
    QuantizeConfig,
)
from torch_mmgen_opt.testing import TestCase, run_tests


class TestOptimizeConfig(TestCase):
    def test_defaults_are_frozen_and_keyword_only(self):
        cfg = OptimizeConfig()
        self.assertTrue(cfg.attention.fuse)
        self.assertIsNone(cfg.quantize)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            cfg.static_kv = True
        with self.assertRaises(TypeError):
            OptimizeConfig(AttentionConfig())  # keyword-only

    def test_shorthands_normalise(self):
        self.assertEqual(OptimizeConfig(quantize="int8"), OptimizeConfig(quantize=QuantizeConfig(scheme="int8")))
        self.assertEqual(OptimizeConfig(attention=False).attention, AttentionConfig(fuse=False))
        self.assertEqual(QuantizeConfig(include="layers.*").include, ("layers.*",))
        self.assertEqual(OptimizeConfig(prefill_buckets=(64, 16, 64)).prefill_buckets, (16, 64))

    def test_bad_values_say_what_to_pass(self):
        cases = [
            (dict(quantize="int3"), ValueError, "int8"),
            (dict(max_seq_len=0), ValueError, "positive"),
            (dict(max_batch_size=-1), ValueError, "positive"),
            (dict(prefill_buckets=(4096,), max_seq_len=2048), ValueError, "max_seq_len"),
            (dict(attention="yes"), TypeError, "AttentionConfig"),
            (dict(layer_skip=3), TypeError, "LayerSkip"),
            (dict(static_kv="on"), TypeError, "True or False"),
            (dict(cuda_graphs=True, compile=CompileConfig(mode="max-autotune-no-cudagraphs")), ValueError, "conflicts"),
        ]
        for kwargs, exc, needle in cases:
            with self.subTest(kwargs=repr(kwargs)):
                with self.assertRaisesRegex(exc, needle):
                    OptimizeConfig(**kwargs)
        with self.assertRaisesRegex(ValueError, "32, 64 or 128"):
            QuantizeConfig(scheme="int4", group_size=48)
        with self.assertRaisesRegex(ValueError, "exit_layer"):
            LayerSkip(exit_layer=0)
        with self.assertRaisesRegex(ValueError, "backend"):
            AttentionConfig(backend="flash")
        with self.assertRaisesRegex(ValueError, "mode"):
            CompileConfig(mode="fast")

    def test_from_options(self):
        cfg = OptimizeConfig.from_options({"quantize": "int4", "max_seq_len": 512})
        self.assertEqual(cfg.quantize.scheme, "int4")
        self.assertEqual(cfg.max_seq_len, 512)
        base = OptimizeConfig(static_kv=False, max_batch_size=4)
        self.assertEqual(OptimizeConfig.from_options({"config": base}).max_batch_size, 4)
        with self.assertRaisesRegex(ValueError, "unknown mmgen option"):
            OptimizeConfig.from_options({"quantise": "int8"})

    def test_key_distinguishes_configs(self):
        self.assertNotEqual(OptimizeConfig().key(), OptimizeConfig(attention=False).key())
        self.assertEqual(OptimizeConfig().key(), OptimizeConfig().key())
        self.assertIsInstance(torch.__version__, str)


if __name__ == "__main__":
    run_tests()
