"""The CUDA paths, on tiny models: skipped without a GPU (CI has none).

What only runs on CUDA: the tinygemm int4, the dequantize-in-matmul int8 and the
``torch._int_mm`` int8_dynamic kernels (eager and under Inductor); ``optimize(static_kv=
True)`` with CUDA graphs over the static cache (greedy and beam search against eager, no
recompiles, no CUDA-graph blocker); int8 weight-only decoding end to end; LayerSkip
self-speculative decoding with compiled draft and verify graphs; a torch 2.11 Inductor
bug worked around in ``padded_to_jagged``. The HSTU Triton kernel,
fuse_attention and the Seamless pipeline have their CUDA tests beside their CPU ones.
"""

from __future__ import annotations

import unittest

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.testing._internal.common_utils import instantiate_parametrized_tests, parametrize

import torch_mmgen_opt as mmgen
from torch_mmgen_opt import CompileConfig, LayerSkip, models
from torch_mmgen_opt.kernels import quant
from torch_mmgen_opt.testing import TestCase, greedy_reference, run_tests, sqnr

CUDA = torch.cuda.is_available()
MIN_SQNR_DB = {"int8": 35.0, "int4": 18.0, "int8_dynamic": 30.0}


def _confident(model: torch.nn.Module) -> torch.nn.Module:
    """An output head mapping each token's embedding to the next token: the float model's
    top-2 logit margins become wide, as a trained model's are, so rounding differences
    between eager and compiled kernels cannot flip a greedy choice."""
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.roll(model.embed_tokens.weight, 1, 0) * 8)
    return model


@unittest.skipIf(not CUDA, "needs CUDA")
class TestCudaQuantKernels(TestCase):
    @parametrize("scheme", quant.SCHEMES)
    def test_eager_and_compiled_within_sqnr_bound(self, scheme):
        gen = torch.Generator().manual_seed(0)
        lin = torch.nn.Linear(256, 384, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(384, 256, generator=gen))
        lin = lin.cuda()
        qw = quant.quantize_weight(lin.weight, scheme, group_size=64)
        ql = quant.QuantizedLinear.from_linear(lin, qw)
        compiled = torch.compile(ql, fullgraph=True)
        for m in (1, 5, 40):  # decode rows, a few rows, and past _int_mm's M > 16
            x = torch.randn(m, 256, generator=gen).to("cuda", torch.bfloat16)
            with self.subTest(rows=m), torch.no_grad():
                ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
                out = ql(x)
                self.assertEqual(out.dtype, torch.bfloat16)
                self.assertGreaterEqual(sqnr(ref, out), MIN_SQNR_DB[scheme])
                # Inductor's lowering computes the same function (bf16 rounding apart)
                self.assertGreaterEqual(sqnr(out.float(), compiled(x).float()), 40.0)

    def test_int4_dequantize_matches_zero_point_formula(self):
        # q computed on the GPU, as quantize_weight does: a value on a rounding tie can
        # land on the other int4 step on the CPU (seen: 10 of 16384, one step apart)
        w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)).bfloat16().cuda()
        q, sz = quant.quantize_int4_grouped(w, 64)
        scale = sz[..., 0].t().float().repeat_interleave(64, dim=1)
        zero = sz[..., 1].t().float().repeat_interleave(64, dim=1)
        manual = (q.float() - 8) * scale + zero
        got = quant.dequantize(quant.quantize_weight(w, "int4", 64))
        self.assertEqual(got, manual, atol=2e-2, rtol=2e-2)  # bf16 scales and products

    def test_float32_int4_refused(self):
        with self.assertRaisesRegex(ValueError, "bfloat16"):
            quant.quantize_weight(torch.randn(64, 128, device="cuda"), "int4")


@unittest.skipIf(not CUDA, "needs CUDA")
class TestCudaInductorWorkarounds(TestCase):
    def test_compiled_padded_to_jagged_on_ragged_batch(self):
        # Was wrong under torch 2.11 Inductor for every history shorter than N (sliced
        # searchsorted boundaries, pytorch/pytorch#182343); the HSTU model goes through it.
        from torch_mmgen_opt.kernels.hstu import padded_to_jagged

        lengths, N = [5, 64, 17, 1], 64
        offsets = torch.tensor([0, *lengths]).cumsum(0).cuda()
        padded = torch.randn(len(lengths), N, 7, device="cuda")
        fn = torch.compile(lambda p, o: padded_to_jagged(p, o, sum(lengths)), fullgraph=True)
        self.assertEqual(fn(padded, offsets), padded_to_jagged(padded, offsets, sum(lengths)),
                         atol=0, rtol=0)


    def test_search_over_a_slice_under_the_mmgen_backend(self):
        # torch 2.11's Inductor searched offsets[1:] from offsets[0] on CUDA; the
        # searchsorted_slice pass searches the whole tensor and shifts the count
        def seq_of_row(offsets, rows):
            return torch.searchsorted(offsets[1:], rows, right=True)

        offsets = torch.tensor([0, 3, 7, 7, 12], device="cuda")
        rows = torch.arange(12, device="cuda")
        counters.clear()
        out = torch.compile(seq_of_row, backend="mmgen", fullgraph=True)(offsets, rows)
        self.assertEqual(out, seq_of_row(offsets, rows), atol=0, rtol=0)
        self.assertEqual(counters["mmgen"]["searchsorted_unsliced"], 1)


@unittest.skipIf(not CUDA, "needs CUDA")
class TestCudaStaticKV(TestCase):
    """optimize(static_kv=True) on CUDA: decode steps replay a CUDA graph."""

    def setUp(self):
        super().setUp()
        self.model = _confident(models.build("llama", "tiny", device="cuda"))
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 256, (1, 9), generator=gen).cuda()

    def test_greedy_equals_eager_without_recompiles(self):
        ref = greedy_reference(self.model, self.ids, 40)
        opt = mmgen.optimize(self.model, static_kv=True, max_seq_len=128, max_batch_size=2,
                             compile=CompileConfig(fullgraph=True))
        counters.clear()
        out = mmgen.generate(opt, self.ids, max_new_tokens=40)
        graphs = counters["stats"]["unique_graphs"]
        self.assertEqual(out, ref, atol=0, rtol=0)
        self.assertEqual(counters["mmgen"].get("cudagraph_blocker", 0), 0)
        self.assertGreaterEqual(counters["mmgen"].get("kv_cache_static", 0), 1)
        self.assertEqual(counters["inductor"].get("cudagraph_skips", 0), 0)
        self.assertTrue(opt._mmgen_session.cuda_graph_steps)
        # a second request of another length compiles nothing new for decode
        ids2 = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(1)).cuda()
        out2 = mmgen.generate(opt, ids2, max_new_tokens=60)
        self.assertEqual(out2, greedy_reference(self.model, ids2, 60), atol=0, rtol=0)
        self.assertLessEqual(counters["stats"]["unique_graphs"] - graphs, 1)  # a prefill bucket

    def test_beam_search_equals_eager(self):
        ref = mmgen.generate(self.model, self.ids, max_new_tokens=12, strategy="beam",
                             num_beams=3)
        opt = mmgen.optimize(self.model, static_kv=True, max_seq_len=64, max_batch_size=3)
        out = mmgen.generate(opt, self.ids, max_new_tokens=12, strategy="beam", num_beams=3)
        self.assertEqual(out, ref, atol=0, rtol=0)

    def test_int8_weight_only_greedy_matches_float(self):
        model = _confident(models.build("llama", "tiny", device="cuda", dtype=torch.bfloat16))
        ref = greedy_reference(model, self.ids, 24)
        opt = mmgen.optimize(model, static_kv=True, max_seq_len=64, max_batch_size=1,
                             quantize="int8")
        counters.clear()
        out = mmgen.generate(opt, self.ids, max_new_tokens=24)
        self.assertGreater(counters["mmgen"]["linear_quantized"], 0)
        self.assertEqual(out, ref, atol=0, rtol=0)


@unittest.skipIf(not CUDA, "needs CUDA")
class TestCudaSpeculative(TestCase):
    def test_compiled_layerskip_equals_greedy(self):
        from torch_mmgen_opt.models.layerskip import encode, llama_layerskip
        from torch_mmgen_opt.runtime.speculative import SpeculativeDecoder

        model = llama_layerskip(device="cuda")
        decoder = SpeculativeDecoder(model, max_seq_len=96, compile=True)
        for text in ("import os\n", "def __init__(self, "):
            prompt = encode(text).cuda()
            with self.subTest(prompt=text):
                out = decoder.generate(prompt, LayerSkip(exit_layer=4, num_speculations=4),
                                       max_new_tokens=32)
                self.assertEqual(out, greedy_reference(model, prompt, 32), atol=0, rtol=0)
                self.assertLessEqual(decoder.stats.accepted, decoder.stats.drafted)


instantiate_parametrized_tests(TestCudaQuantKernels)

if __name__ == "__main__":
    run_tests()
