"""Tests of the eager Seamless-style pipeline (models/seamless.py): shapes, padding
invariance of every stage, and beam search against a plain reference beam search."""

from __future__ import annotations

import torch

from torch_mmgen_opt.models import build
from torch_mmgen_opt.testing import TestCase, run_tests


@torch.no_grad()
def reference_beam_search(model, enc_out: torch.Tensor) -> list[int]:
    """Plain beam search: no cache (the decoder re-reads each whole hypothesis), candidates
    ranked in Python. Finished hypotheses only extend with EOS at no cost; the best
    hypothesis maximises score / length ** length_penalty."""
    cfg = model.config
    mask = torch.ones(1, enc_out.shape[1], dtype=torch.bool)
    beams = [([cfg.bos_id], 0.0, False)]
    for _ in range(cfg.max_new_tokens):
        cands = []
        for tokens, score, done in beams:
            if done:
                cands.append((score, tokens + [cfg.eos_id], True))
                continue
            logits, _, _ = model.decoder(torch.tensor([tokens]), enc_out, mask)
            logprobs = torch.log_softmax(logits[0, -1].float(), -1).tolist()
            for t, lp in enumerate(logprobs):
                cands.append((score + lp, tokens + [t], t == cfg.eos_id))
        cands.sort(key=lambda c: -c[0])
        beams = [(toks, s, done) for s, toks, done in cands[: cfg.beam_size]]
        if all(done for _, _, done in beams):
            break

    def finished_len(tokens):
        gen = tokens[1:]
        return gen.index(cfg.eos_id) + 1 if cfg.eos_id in gen else len(gen)

    best = max(beams, key=lambda b: b[1] / finished_len(b[0]) ** cfg.length_penalty)
    return best[0][1 : 1 + finished_len(best[0])]


class TestSeamlessModel(TestCase):
    def test_shapes(self):
        model = build("seamless", "tiny")
        tokens, wav = model(torch.randn(1, 50, 80))
        self.assertEqual(tokens.shape[0], 1)
        self.assertLessEqual(tokens.shape[1], model.config.max_new_tokens)
        self.assertEqual(wav.dim(), 2)
        self.assertEqual(wav.shape[1] % model.vocoder.hop, 0)
        self.assertTrue(bool(torch.isfinite(wav).all()))
        with self.assertRaisesRegex(ValueError, "batch 1"):
            model(torch.randn(2, 50, 80))
        with self.assertRaisesRegex(ValueError, "pass one of"):
            build("seamless", "huge")

    @torch.no_grad()
    def test_padding_does_not_change_valid_outputs(self):
        model = build("seamless", "tiny")
        fbank, lengths = torch.randn(1, 37, 80), torch.tensor([37])
        enc, mask = model.encoder(fbank, lengths)
        padded = torch.cat([fbank, torch.zeros(1, 27, 80)], dim=1)
        enc_p, mask_p = model.encoder(padded, lengths)
        S = enc.shape[1]
        self.assertEqual(int(mask_p.sum()), S)
        torch.testing.assert_close(enc_p[:, :S], enc, rtol=1e-5, atol=1e-5)

        units = torch.randint(0, model.config.unit_vocab, (1, 11))
        wav = model.vocoder(units)
        wav_p = model.vocoder(torch.cat([units, torch.zeros(1, 5, dtype=torch.long)], 1),
                              torch.tensor([11]))
        torch.testing.assert_close(wav_p[:, : wav.shape[1]], wav, rtol=1e-5, atol=1e-5)
        # without lengths the padding leaks into the tail: the mask is what makes it exact
        wav_leak = model.vocoder(torch.cat([units, torch.zeros(1, 5, dtype=torch.long)], 1))
        self.assertFalse(torch.allclose(wav_leak[:, : wav.shape[1]], wav, atol=1e-5))

    def test_beam_search_matches_reference(self):
        lengths = []
        for eos_id in (2, 184):  # 184: hypotheses finish early on these inputs
            model = build("seamless", "tiny", eos_id=eos_id, max_new_tokens=8)
            for T in (40, 120):
                fbank = torch.randn(1, T, 80, generator=torch.Generator().manual_seed(T))
                enc, mask = model.encoder(fbank, torch.tensor([T]))
                with self.subTest(eos_id=eos_id, T=T):
                    got = model.beam_search(enc, mask)[0].tolist()
                    self.assertEqual(got, reference_beam_search(model, enc))
                lengths.append(len(got))
        self.assertLess(min(lengths), 8)  # the early-finish path was exercised


if __name__ == "__main__":
    run_tests()
