"""runtime/speculative.py: lossless LayerSkip self-speculative decoding.

On the shipped checkpoint trained for early exit (8 layers). The equality tests run the
draft and verify graphs eagerly (``compile=False``, the same runtime and graphs); one test
compiles them (two Inductor graphs) and checks that a run compiles nothing more.
"""

from __future__ import annotations

import itertools

import torch
from torch._dynamo.utils import counters

import torch_mmgen_opt
from torch_mmgen_opt import LayerSkip
from torch_mmgen_opt.models.layerskip import encode, llama_layerskip
from torch_mmgen_opt.runtime.speculative import SpeculativeDecoder, generate_speculative
from torch_mmgen_opt.testing import TestCase, greedy_reference, run_tests
from torch_mmgen_opt.train_layerskip import forward_exits

PROMPTS = [
    "import os\n",
    "def __init__(self, ",
    "class Foo:\n    def __",
    "    for i in range(len(",
    "        raise ValueError(\"",
    "# Copyright",
]
NEW = 40


class TestSpeculative(TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        torch.manual_seed(0)
        cls.model = llama_layerskip()
        cls.L = cls.model.config.n_layers
        cls.decoder = SpeculativeDecoder(cls.model, max_seq_len=96, compile=False)
        gen = torch.Generator().manual_seed(0)
        cls.prompts = [encode(p) for p in PROMPTS] + [
            torch.randint(0, 256, (1, n), generator=gen) for n in (3, 9)
        ]
        cls.refs = [greedy_reference(cls.model, p, NEW) for p in cls.prompts]

    def test_greedy_equals_plain_greedy(self):
        accepted = {}
        for (E, d), (prompt, ref) in itertools.product(
            [(1, 1), (2, 4), (4, 4), (6, 1), (self.L, 4)],
            zip(self.prompts[::2] + self.prompts[-1:], self.refs[::2] + self.refs[-1:]),
        ):
            with self.subTest(exit_layer=E, d=d, prompt=prompt[0, :8].tolist()):
                out = self.decoder.generate(
                    prompt, LayerSkip(exit_layer=E, num_speculations=d), max_new_tokens=NEW
                )
                self.assertEqual(out, ref, atol=0, rtol=0)
                stats = self.decoder.stats
                self.assertEqual(stats.tokens, NEW)
                self.assertLessEqual(stats.accepted, stats.drafted)
                accepted[E, d] = accepted.get((E, d), 0) + stats.accepted
        # the case the runtime is for: some drafts accepted, some rejected and rolled back
        self.assertGreater(accepted[4, 4], 0)

    def test_full_depth_exit_accepts_every_draft(self):
        # E = L: the draft is the full model, so verification agrees with every draft
        out = self.decoder.generate(
            self.prompts[0], LayerSkip(exit_layer=self.L, num_speculations=4), max_new_tokens=NEW
        )
        self.assertEqual(out, self.refs[0], atol=0, rtol=0)
        self.assertEqual(self.decoder.stats.accepted, self.decoder.stats.drafted)

    def test_eos_stops_after_the_eos_token(self):
        ref = self.refs[1][0].tolist()
        eos = ref[10]
        cut = ref.index(eos) + 1
        out = self.decoder.generate(
            self.prompts[1], LayerSkip(exit_layer=2, num_speculations=4), max_new_tokens=NEW,
            eos_token_id=eos,
        )
        self.assertEqual(out[0].tolist(), ref[:cut])

    def test_rollback_leaves_verified_slots_byte_identical(self):
        dec, ls = self.decoder, LayerSkip(exit_layer=1, num_speculations=4)
        prompt = self.prompts[6]
        logits = dec.prefill(prompt)
        out, pos, rejections = [int(logits.argmax())], prompt.shape[1], 0
        bufs = [*dec.cache.key_cache, *dec.cache.value_cache]
        sentinel = 123.0
        while len(out) < NEW:
            for b in bufs:
                b[:, :, pos + ls.num_speculations + 1 :] = sentinel
            verified = [b[:, :, :pos].clone() for b in bufs]
            n_acc, new = dec.speculate(out[-1], pos, ls)
            rejections += n_acc < ls.num_speculations
            for b, v in zip(bufs, verified):
                # bit for bit: the verified region is untouched by drafts and rejections
                self.assertTrue(torch.equal(b[:, :, :pos].view(torch.int32), v.view(torch.int32)))
                # nothing written past the round's d + 1 slots
                self.assertTrue(bool((b[:, :, pos + ls.num_speculations + 1 :] == sentinel).all()))
            out += new
            pos += n_acc + 1
        self.assertGreater(rejections, 0)
        self.assertEqual(out[:NEW], self.refs[6][0].tolist())

    def test_sampling_keeps_the_full_model_distribution(self):
        # top_k=3 leaves a 3-token vocabulary at each step: 27 outcomes for 3 tokens.
        prompt, k, runs = self.prompts[0], 3, 1000
        ls = LayerSkip(exit_layer=1, num_speculations=1)  # a poor draft: many rejections
        dec = self.decoder

        def probs(ids: torch.Tensor, exit_layer: int | None = None) -> torch.Tensor:
            exit_ix = (exit_layer or self.L) - 1
            with torch.no_grad():
                logits = forward_exits(self.model, ids, exits=[exit_ix])[exit_ix][0, -1].float()
            kth = logits.topk(k).values[-1]
            return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)

        exact, wrong = {}, {}
        p1 = probs(prompt)
        for t1 in p1.nonzero().flatten().tolist():
            s1 = torch.cat([prompt, torch.tensor([[t1]])], 1)
            p2, q2 = probs(s1), probs(s1, ls.exit_layer)
            for t2 in range(p2.numel()):
                if p2[t2] == 0 and q2[t2] == 0:
                    continue
                p3 = probs(torch.cat([s1, torch.tensor([[t2]])], 1))
                for t3 in p3.nonzero().flatten().tolist():
                    exact[t1, t2, t3] = float(p1[t1] * p2[t2] * p3[t3])
                    # what accepting every draft would sample: t2 from the early exit
                    wrong[t1, t2, t3] = float(p1[t1] * q2[t2] * p3[t3])
        # The prompt's cache entries stay valid (rounds write after it): prefill once, draw
        # the first token as generate() does, then run rounds.
        gen = torch.Generator().manual_seed(1234)
        dec.prefill(prompt)
        P = prompt.shape[1]
        seen: dict[tuple[int, ...], int] = {}
        for _ in range(runs):
            out = [int(torch.multinomial(p1[None], 1, generator=gen))]
            pos = P
            while len(out) < 3:
                n_acc, new = dec.speculate(
                    out[-1], pos, ls, strategy="sample", top_k=k, generator=gen
                )
                out += new
                pos += n_acc + 1
            key = tuple(out[:3])
            seen[key] = seen.get(key, 0) + 1
        self.assertTrue(set(seen) <= {c for c, p in exact.items() if p > 0})
        p_exact, p_wrong = chi2_pvalue(seen, exact, runs), chi2_pvalue(seen, wrong, runs)
        self.assertGreater(p_exact, 1e-3, f"p={p_exact:.2e} against the full model")
        # the test has power: the draft's own distribution is rejected
        self.assertLess(p_wrong, 1e-3, f"p={p_wrong:.2e} against the early exit")

    def test_compiled_steps_never_recompile(self):
        ls = LayerSkip(exit_layer=4, num_speculations=4)
        dec = self.decoder
        out = dec.generate(self.prompts[3], ls, max_new_tokens=NEW, compile=True)
        self.assertEqual(out, self.refs[3], atol=0, rtol=0)
        compiled = dec.report.graphs_compiled
        graphs = counters["stats"]["unique_graphs"]
        calls = {k: s.calls for k, s in dec._steps.items()}
        for prompt, ref in zip(self.prompts[4:6], self.refs[4:6]):
            out = dec.generate(prompt, ls, max_new_tokens=NEW - 7, compile=True)
            self.assertEqual(out, ref[:, : NEW - 7], atol=0, rtol=0)
        self.assertEqual(dec.report.graphs_compiled, compiled)
        self.assertEqual(counters["stats"]["unique_graphs"], graphs)
        self.assertGreater(dec._steps["draft", 4, 1, True].calls, calls["draft", 4, 1, True])

    def test_generate_dispatch(self):
        out = torch_mmgen_opt.generate(
            self.model, self.prompts[5], max_new_tokens=12,
            speculative=LayerSkip(exit_layer=4, num_speculations=2),
        )
        self.assertEqual(out, self.refs[5][:, :12], atol=0, rtol=0)

    def test_bad_requests(self):
        ls = LayerSkip(exit_layer=2, num_speculations=2)
        with self.assertRaisesRegex(ValueError, "batch 1"):
            self.decoder.generate(torch.zeros(2, 3, dtype=torch.long), ls, max_new_tokens=4)
        with self.assertRaisesRegex(ValueError, "exceeds the model's 8 layers"):
            self.decoder.generate(self.prompts[0], LayerSkip(exit_layer=9), max_new_tokens=4)
        with self.assertRaisesRegex(ValueError, "max_seq_len"):
            self.decoder.generate(self.prompts[0], ls, max_new_tokens=200)
        with self.assertRaisesRegex(ValueError, "beam"):
            generate_speculative(
                self.model, self.prompts[0], config=ls, max_new_tokens=4, strategy="beam"
            )
        with self.assertRaisesRegex(TypeError, "LayerSkip"):
            generate_speculative(self.model, self.prompts[0], config=2, max_new_tokens=4)


def chi2_pvalue(seen: dict, expected: dict, n: int) -> float:
    """Pearson chi-square test of counts ``seen`` against probabilities ``expected``;
    cells expected below 5 are pooled."""
    stat, small_obs, small_exp, cells = 0.0, 0, 0.0, 0
    for cell, p in expected.items():
        e, o = p * n, seen.get(cell, 0)
        if e < 5:
            small_obs, small_exp = small_obs + o, small_exp + e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    if small_exp > 0:
        stat += (small_obs - small_exp) ** 2 / small_exp
        cells += 1
    df = max(cells - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


if __name__ == "__main__":
    run_tests()
