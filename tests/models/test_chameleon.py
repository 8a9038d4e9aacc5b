"""The Chameleon workload: vocabulary layout, classifier-free guidance, eager image
generation and captioning, optimized generation equal to eager, and Hugging Face
``ChameleonForConditionalGeneration`` optimized with identical greedy output."""

from __future__ import annotations

import unittest

import torch

import torch_mmgen_opt as mmgen
from torch_mmgen_opt import models
from torch_mmgen_opt.models.chameleon import BOS_ID, PAD_ID, ChameleonConfig
from torch_mmgen_opt.runtime.cfg import (
    CFGLogitsProcessor,
    caption,
    cfg_streams,
    generate_image,
    restrict_to_range,
)
from torch_mmgen_opt.testing import TestCase, run_tests

try:
    import transformers
except ImportError:  # pragma: no cover
    transformers = None


def _prompts(cfg: ChameleonConfig) -> list[torch.Tensor]:
    img = [cfg.boi_id, cfg.image_start + 3, cfg.image_start + 5, cfg.eoi_id]
    return [torch.tensor([10, 11, 12]), torch.tensor([20, *img, 21, 22, 23, 24])]


class ChameleonConfigTest(TestCase):
    def test_vocabulary_layout(self):
        model = models.build("chameleon", "tiny")
        cfg = model.config
        self.assertEqual(cfg.vocab_size, cfg.text_vocab_size + 2 + cfg.image_vocab_size)
        self.assertEqual(model.lm_head.out_features, cfg.vocab_size)
        self.assertEqual((cfg.boi_id, cfg.eoi_id, cfg.image_start), (256, 257, 258))
        self.assertEqual(cfg.image_end, cfg.vocab_size)
        self.assertIsNotNone(model.layers[0].self_attn.q_norm)  # QK-norm
        codes = torch.tensor([0, 63])
        self.assertEqual(model.image_codes(model.image_ids(codes)).tolist(), [0, 63])

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "vocab_size is derived"):
            models.build("chameleon", "tiny", vocab_size=1000)
        with self.assertRaisesRegex(ValueError, "unknown chameleon size"):
            models.build("chameleon", "34b")


class ClassifierFreeGuidanceTest(TestCase):
    def test_guidance_math(self):
        proc = CFGLogitsProcessor(image_start=0, image_end=7, text_scale=3.0, image_scale=1.2)
        logits = torch.randn(6, 7)  # two prompts x (full, image-only, unconditioned)
        out = proc(torch.zeros(6, 1, dtype=torch.long), logits)
        self.assertEqual(out.shape, (2, 7))
        for j in range(2):
            full, image, uncond = logits[3 * j], logits[3 * j + 1], logits[3 * j + 2]
            expected = uncond + 1.2 * (image - uncond) + 3.0 * (full - image)
            torch.testing.assert_close(out[j], expected)

    def test_scales_one_and_zero_select_streams(self):
        logits = torch.randn(3, 5)
        only_full = CFGLogitsProcessor(image_start=0, image_end=5, text_scale=1.0, image_scale=1.0)
        torch.testing.assert_close(only_full(None, logits)[0], logits[0])
        no_guidance = CFGLogitsProcessor(image_start=0, image_end=5, text_scale=0.0, image_scale=0.0)
        torch.testing.assert_close(no_guidance(None, logits)[0], logits[2])

    def test_restricted_to_image_vocabulary(self):
        proc = CFGLogitsProcessor(image_start=4, image_end=9)
        out = proc(None, torch.randn(3, 12, dtype=torch.bfloat16))
        self.assertEqual(out.dtype, torch.float32)
        self.assertTrue(torch.isneginf(out[:, :4]).all() and torch.isneginf(out[:, 9:]).all())
        self.assertTrue(torch.isfinite(out[:, 4:9]).all())
        self.assertTrue(torch.isneginf(restrict_to_range(torch.zeros(1, 3), 1, 2)[0, ::2]).all())

    def test_rejects_batches_without_three_streams(self):
        proc = CFGLogitsProcessor(image_start=0, image_end=4)
        with self.assertRaisesRegex(ValueError, "3 rows per prompt"):
            proc(None, torch.randn(4, 4))
        with self.assertRaisesRegex(ValueError, "non-empty range"):
            CFGLogitsProcessor(image_start=5, image_end=5)


class ChameleonGenerationTest(TestCase):
    def setUp(self):
        super().setUp()
        self.model = models.build("chameleon", "tiny")
        self.cfg = self.model.config

    def test_streams(self):
        cfg = self.cfg
        ids, mask = cfg_streams(self.model, _prompts(cfg))
        self.assertEqual(ids.shape, (6, 11))
        self.assertEqual(mask.shape, ids.shape)
        self.assertTrue((ids[mask == 0] == PAD_ID).all())
        self.assertTrue((ids[:, -1] == cfg.boi_id).all())
        lengths = mask.sum(1).tolist()
        self.assertEqual(lengths, [5, 2, 2, 11, 6, 2])
        # image-only keeps the prompt's image span and drops its text
        self.assertEqual(ids[4, -6:].tolist(), [BOS_ID, cfg.boi_id, 261, 263, cfg.eoi_id, cfg.boi_id])

    def test_eager_image_generation_shapes_and_seed(self):
        def run(seed):
            g = torch.Generator().manual_seed(seed)
            return generate_image(self.model, _prompts(self.cfg), eager=True, generator=g)

        a, b, c = run(0), run(0), run(1)
        self.assertEqual(a.shape, (2, self.cfg.image_seq_len))
        self.assertTrue(((a >= self.cfg.image_start) & (a < self.cfg.image_end)).all())
        self.assertTrue(torch.equal(a, b))
        self.assertFalse(torch.equal(a, c))

    def test_generate_runtime_equals_eager_loop(self):
        # generate() (static cache, not compiled) vs the eager loop with the growing cache.
        for strategy in ("greedy", "sample"):
            with self.subTest(strategy=strategy):
                out = [
                    generate_image(
                        self.model, _prompts(self.cfg), strategy=strategy, eager=eager,
                        generator=torch.Generator().manual_seed(0),
                    )
                    for eager in (True, False)
                ]
                self.assertTrue(torch.equal(*out))

    def test_caption_is_text_only(self):
        image = self.model.image_ids(torch.randint(0, self.cfg.image_vocab_size, (2, 16)))
        eager = caption(self.model, image, max_new_tokens=6, eager=True)
        self.assertEqual(eager.shape, (2, 6))
        self.assertTrue((eager < self.cfg.text_vocab_size).all())
        self.assertTrue(torch.equal(eager, caption(self.model, image, max_new_tokens=6)))

    def test_optimized_cfg_generation_equals_eager(self):
        prompts = _prompts(self.cfg)
        eager = generate_image(self.model, prompts, strategy="greedy", eager=True)
        opt = mmgen.optimize(
            self.model, static_kv=True, max_batch_size=3 * len(prompts), max_seq_len=64,
            prefill_buckets=(16,),
        )
        out = generate_image(opt, prompts, strategy="greedy")
        self.assertTrue(torch.equal(out, eager))
        again = generate_image(opt, prompts, strategy="greedy")  # same graphs, no recompile
        self.assertTrue(torch.equal(again, eager))


def hf_chameleon(vocab_size: int = 128, codes: int = 16):
    """A small random ``ChameleonForConditionalGeneration`` (no hub): ids 0-3 special, the
    last ``codes`` ids image tokens (which HF's forward masks out of the logits)."""
    torch.manual_seed(0)

    def name(i: int) -> str:
        return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(i)) + "Z"

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3}
    vocab.update({name(i): vocab_size - codes + i for i in range(codes)})
    cfg = transformers.ChameleonConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocabulary_map=vocab,
        vq_config=dict(
            embed_dim=32, num_embeddings=codes, latent_channels=32, base_channels=32,
            channel_multiplier=[1, 2], num_res_blocks=1, resolution=16,
        ),
    )
    return transformers.ChameleonForConditionalGeneration(cfg).eval()


@unittest.skipIf(transformers is None, "needs transformers")
class HFChameleonTest(TestCase):
    @torch.no_grad()
    def _hf_greedy(self, model, ids, steps):
        """Greedy with the model's own (dynamic) cache: the reference."""
        out = model(ids, use_cache=True)
        cache, new = out.cache, []
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            new.append(tok)
            out = model(tok, cache=cache, use_cache=True)
            cache, tok = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        return torch.cat(new, dim=1)

    def test_optimized_greedy_identical(self):
        model = hf_chameleon()
        ids = torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(0))
        ref = self._hf_greedy(model, ids, 8)
        self.assertTrue(torch.equal(mmgen.generate(model, ids, max_new_tokens=8), ref))
        opt = mmgen.optimize(model, static_kv=True, max_batch_size=2, max_seq_len=32,
                             prefill_buckets=(8,))
        self.assertTrue(torch.equal(mmgen.generate(opt, ids, max_new_tokens=8), ref))


if __name__ == "__main__":
    run_tests()
