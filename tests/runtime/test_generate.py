"""generate() and DecodeSession: equal to eager generation with the model's own cache,
one decode graph for every step, bucketed prefill, beam search, sampling, bad input."""

from __future__ import annotations

import sys
import types
import unittest.mock

import torch
from torch._dynamo.utils import counters

import torch_mmgen_opt as mmgen
from torch_mmgen_opt import CompileConfig, LayerSkip, models
from torch_mmgen_opt.runtime import sampling
from torch_mmgen_opt.runtime.generate import DecodeSession, default_buckets
from torch_mmgen_opt.testing import TestCase, greedy_reference, run_tests


def _tiny_hf_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def _hf_greedy_reference(model: torch.nn.Module, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Eager greedy decoding of a transformers model with its own DynamicCache."""
    out = model(input_ids, use_cache=True)
    new = []
    for _ in range(steps):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(tok)
        out = model(tok, cache=out.cache, use_cache=True)
    return torch.cat(new, dim=1)


@torch.no_grad()
def _reference_beam_search(model: torch.nn.Module, input_ids: torch.Tensor, steps: int, K: int) -> torch.Tensor:
    """Plain beam search, one prompt at a time, every beam recomputed from scratch."""
    results = []
    for prompt in input_ids:
        beams = [(torch.tensor(0.0), [])]
        for _ in range(steps):
            cands = []
            for score, toks in beams:
                seq = torch.cat([prompt, torch.tensor(toks, dtype=torch.long)])[None]
                logprobs = torch.log_softmax(model(seq).logits[0, -1].float(), dim=-1)
                cands.append(score + logprobs)
            flat = torch.cat(cands)  # beam-major, as (beam, token)
            top = flat.topk(K).indices
            V = cands[0].shape[0]
            beams = [(flat[i], beams[int(i) // V][1] + [int(i) % V]) for i in top]
        results.append(max(beams, key=lambda b: float(b[0]))[1])
    return torch.tensor(results)


def _pad_left(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask


class TestGenerateEager(TestCase):
    """The runtime without compilation (a cache sized for the request)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = models.build("llama", "tiny")

    def test_greedy_equals_dynamic_cache(self):
        ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
        out = mmgen.generate(self.model, ids, max_new_tokens=20)
        self.assertEqual(out, greedy_reference(self.model, ids, 20))

    def test_batch_of_different_lengths_equals_each_prompt_alone(self):
        g = torch.Generator().manual_seed(2)
        rows = [torch.randint(0, 256, (n,), generator=g) for n in (9, 4, 6)]
        ids, mask = _pad_left(rows)
        out = mmgen.generate(self.model, ids, max_new_tokens=12, attention_mask=mask)
        for i, r in enumerate(rows):
            self.assertEqual(out[i], greedy_reference(self.model, r[None], 12)[0])
        # Right padding gives the same result.
        ids_r = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids_r[i, : len(r)] = r
        out_r = mmgen.generate(self.model, ids_r, max_new_tokens=12, attention_mask=mask.flip(1))
        self.assertEqual(out_r, out)

    def test_hf_llama_greedy_and_batch(self):
        model = _tiny_hf_llama()
        g = torch.Generator().manual_seed(3)
        rows = [torch.randint(0, 128, (n,), generator=g) for n in (8, 5)]
        ids, mask = _pad_left(rows)
        out = mmgen.generate(model, ids, max_new_tokens=10, attention_mask=mask)
        for i, r in enumerate(rows):
            self.assertEqual(out[i], _hf_greedy_reference(model, r[None], 10)[0])

    def test_beam_search_equals_reference(self):
        ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
        out = mmgen.generate(self.model, ids, max_new_tokens=6, strategy="beam", num_beams=3)
        self.assertEqual(out, _reference_beam_search(self.model, ids, 6, 3))
        # One beam is greedy.
        one = mmgen.generate(self.model, ids, max_new_tokens=6, strategy="beam", num_beams=1)
        self.assertEqual(one, mmgen.generate(self.model, ids, max_new_tokens=6))

    def test_sampling(self):
        ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(5))
        greedy = mmgen.generate(self.model, ids, max_new_tokens=8)

        def run(seed, **kw):
            gen = torch.Generator().manual_seed(seed)
            return mmgen.generate(self.model, ids, max_new_tokens=8, strategy="sample", generator=gen, **kw)

        self.assertEqual(run(0, top_k=1), greedy)
        self.assertEqual(run(0, top_p=1e-6), greedy)
        self.assertEqual(run(7, temperature=0.8, top_k=20, top_p=0.9), run(7, temperature=0.8, top_k=20, top_p=0.9))
        self.assertNotEqual(run(7, temperature=5.0), greedy)

    def test_logits_processor_groups_rows(self):
        ids = torch.randint(0, 256, (4, 5), generator=torch.Generator().manual_seed(6))
        seen = []

        def cfg_like(ids_so_far, logits):  # one token per pair of streams
            seen.append(ids_so_far.shape)
            return logits.view(2, 2, -1).mean(1)

        out = mmgen.generate(self.model, ids, max_new_tokens=5, logits_processor=cfg_like)
        self.assertEqual(out[0], out[1])
        self.assertEqual(out[2], out[3])
        self.assertEqual(seen, [torch.Size([4, 5 + t]) for t in range(5)])
        with self.assertRaisesRegex(ValueError, "divides|B // g"):
            mmgen.generate(self.model, ids, max_new_tokens=2, logits_processor=lambda i, lg: lg[:3])

    def test_stop_tokens(self):
        ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(8))
        full = mmgen.generate(self.model, ids, max_new_tokens=20)
        eos = int(full[0, 3])
        out = mmgen.generate(self.model, ids, max_new_tokens=20, eos_token_id=eos)
        for i in range(2):
            hits = (full[i] == eos).nonzero()
            stop = int(hits[0]) if len(hits) else 20
            self.assertEqual(out[i, : stop + 1], full[i, : stop + 1][: out.shape[1]])
            self.assertTrue((out[i, stop:] == eos).all())
        self.assertLessEqual(out.shape[1], 20)

    def test_sampling_has_no_host_sync(self):
        # A fake-tensor trace fails on any data-dependent host read (.item(), nonzero...).
        from torch.fx.experimental.proxy_tensor import make_fx

        def fn(logits):
            return sampling.sample(logits, temperature=0.7, top_k=5, top_p=0.9)

        gm = make_fx(fn, tracing_mode="fake")(torch.randn(2, 50))
        self.assertGreater(len(gm.graph.nodes), 5)

    def test_top_k_top_p_filters(self):
        logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
        self.assertEqual(
            sampling.apply_top_k(logits, 2).isinf(), torch.tensor([[False, True, False, True]])
        )
        probs = logits.softmax(-1)  # [0.64, 0.09, 0.24, 0.03]
        self.assertGreater(float(probs[0, 0]), 0.6)
        self.assertEqual(
            sampling.apply_top_p(logits, 0.8).isinf(), torch.tensor([[False, True, False, True]])
        )
        counts = torch.bincount(
            torch.stack([sampling.sample(logits, generator=torch.Generator().manual_seed(s)) for s in range(2000)]).flatten(),
            minlength=4,
        )
        self.assertEqual(counts.float() / 2000, probs[0], atol=0.04, rtol=0)

    def test_bad_input(self):
        ids = torch.randint(0, 256, (1, 5))
        with self.assertRaisesRegex(ValueError, "empty prompt"):
            mmgen.generate(self.model, ids[:, :0], max_new_tokens=2)
        with self.assertRaisesRegex(ValueError, "strategy"):
            mmgen.generate(self.model, ids, max_new_tokens=2, strategy="nucleus")
        with self.assertRaisesRegex(ValueError, "max_new_tokens"):
            mmgen.generate(self.model, ids, max_new_tokens=0)
        with self.assertRaisesRegex(ValueError, "top_p"):
            mmgen.generate(self.model, ids, max_new_tokens=2, strategy="sample", top_p=1.5)

    def test_speculative_dispatch(self):
        fake = types.ModuleType("torch_mmgen_opt.runtime.speculative")
        fake.generate_speculative = unittest.mock.Mock(return_value="drafted")
        cfg = LayerSkip(exit_layer=1, num_speculations=2)
        ids = torch.randint(0, 256, (1, 5))
        with unittest.mock.patch.dict(sys.modules, {"torch_mmgen_opt.runtime.speculative": fake}):
            self.assertEqual(mmgen.generate(self.model, ids, max_new_tokens=3, speculative=cfg), "drafted")
        _, kwargs = fake.generate_speculative.call_args
        self.assertIs(kwargs["config"], cfg)
        self.assertEqual(kwargs["max_new_tokens"], 3)

    def test_default_buckets(self):
        self.assertEqual(default_buckets(20), (1, 2, 4, 8, 16, 20))
        self.assertEqual(default_buckets(16), (1, 2, 4, 8, 16))


class TestGenerateOptimized(TestCase):
    """optimize(static_kv=True): one compile of the tiny Llama shared by these tests
    (setUpClass; Dynamo's per-test reset does not reach what it measured)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        torch._dynamo.reset()
        counters.clear()
        cls.model = models.build("llama", "tiny")
        cls.opt = mmgen.optimize(
            cls.model, static_kv=True, max_seq_len=400, max_batch_size=2,
            compile=CompileConfig(fullgraph=True),
        )
        g = torch.Generator().manual_seed(10)
        cls.rows = [torch.randint(0, 256, (n,), generator=g) for n in (9, 5)]
        ids, mask = _pad_left(cls.rows)
        cls.out_batch = mmgen.generate(cls.opt, ids, max_new_tokens=24, attention_mask=mask)
        cls.graphs_warm = counters["stats"]["unique_graphs"]
        cls.long_ids = torch.randint(0, 256, (2, 30), generator=g)
        cls.out_long = mmgen.generate(cls.opt, cls.long_ids, max_new_tokens=301)  # 300 decode steps
        cls.graphs_after_long = counters["stats"]["unique_graphs"]
        session = cls.opt._mmgen_session
        cls.lengths = [2, 3, 5, 7, 9, 12, 17, 30, 33, 60]
        for n in cls.lengths:
            session.prefill(torch.randint(0, 256, (2, n), generator=g))
        cls.buckets_hit = {session.bucket_for(n) for n in cls.lengths} | {16, 32}
        cls.graphs_final = counters["stats"]["unique_graphs"]
        cls.mmgen_counters = dict(counters["mmgen"])
        with torch.no_grad():
            cls.bad = {}
            for name, (shape, n) in {"seq": ((1, 100), 301), "batch": ((3, 4), 2)}.items():
                try:
                    mmgen.generate(cls.opt, torch.zeros(shape, dtype=torch.long), max_new_tokens=n)
                except ValueError as exc:
                    cls.bad[name] = str(exc)
        cls.graphs_after_bad = counters["stats"]["unique_graphs"]

    def test_batch_greedy_equals_eager_per_prompt(self):
        for i, r in enumerate(self.rows):
            self.assertEqual(self.out_batch[i], greedy_reference(self.model, r[None], 24)[0])
        self.assertEqual(self.out_long[0], greedy_reference(self.model, self.long_ids[:1], 301)[0])

    def test_zero_recompiles_over_300_decode_steps(self):
        self.assertGreaterEqual(self.graphs_warm, 2)  # a prefill graph and the decode graph
        self.assertEqual(self.graphs_after_long, self.graphs_warm)
        self.assertGreaterEqual(self.opt._mmgen_report.graphs_compiled, 2)

    def test_prefill_graphs_bounded_by_buckets(self):
        prefill_graphs = self.graphs_final - 1  # one decode graph
        self.assertLessEqual(prefill_graphs, len(self.buckets_hit))

    def test_static_kv_shapes_pass_proved_decode_static(self):
        self.assertGreaterEqual(self.mmgen_counters.get("kv_cache_static", 0), 1)
        self.assertEqual(self.mmgen_counters.get("dynamic_dim", 0), 0)
        self.assertEqual(self.mmgen_counters.get("cudagraph_blocker", 0), 0)
        kinds = {e.kind for e in mmgen.explain(self.opt).events}
        self.assertIn("kv_cache_static", kinds)

    def test_bad_input_raises_before_any_work(self):
        self.assertRegex(self.bad["seq"], r"exceeds max_seq_len=400.*optimize\(model, static_kv=True, max_seq_len=401\)")
        self.assertRegex(self.bad["batch"], r"exceeds max_batch_size=2.*max_batch_size=3")
        self.assertEqual(self.graphs_after_bad, self.graphs_final)


class TestGenerateOptimizedHF(TestCase):
    """optimize(static_kv=True) on a random-weight transformers LlamaForCausalLM."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        torch._dynamo.reset()
        counters.clear()
        cls.model = _tiny_hf_llama()
        cls.opt = mmgen.optimize(cls.model, static_kv=True, max_seq_len=64, max_batch_size=2)
        g = torch.Generator().manual_seed(11)
        cls.rows = [torch.randint(0, 128, (n,), generator=g) for n in (7, 4)]
        ids, mask = _pad_left(cls.rows)
        cls.out = mmgen.generate(cls.opt, ids, max_new_tokens=12, attention_mask=mask)
        cls.mmgen_counters = dict(counters["mmgen"])

    def test_greedy_equals_dynamic_cache(self):
        for i, r in enumerate(self.rows):
            self.assertEqual(self.out[i], _hf_greedy_reference(self.model, r[None], 12)[0])
        self.assertGreaterEqual(self.mmgen_counters.get("kv_cache_static", 0), 1)


class TestDecodeSession(TestCase):
    def test_session_steps_match_model(self):
        model = models.build("llama", "tiny")
        s = DecodeSession(model, max_batch_size=1, max_seq_len=32, prefill_buckets=(8, 16))
        ids = torch.randint(0, 256, (1, 5))
        logits = s.prefill(ids)
        self.assertEqual(s.length, 8)  # padded to the bucket
        ref = model(ids)
        self.assertEqual(logits, ref.logits[:, -1].float(), atol=1e-5, rtol=1e-5)
        tok = logits.argmax(-1, keepdim=True)
        logits2 = s.decode(tok)
        ref2 = model(tok, ref.past_key_values)
        self.assertEqual(logits2, ref2.logits[:, -1].float(), atol=1e-5, rtol=1e-5)
        self.assertEqual(s.cache.get_seq_length(), 9)
        with self.assertRaisesRegex(ValueError, r"tokens must be \(1, 1\)"):
            s.decode(torch.zeros(2, 1, dtype=torch.long))


if __name__ == "__main__":
    run_tests()
