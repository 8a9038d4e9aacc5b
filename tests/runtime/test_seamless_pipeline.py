"""Tests of runtime/seamless_pipeline.py: the optimized Seamless-style pipeline.

The static runtime is first checked without compiling (cheap), then once end to end
through ``torch_mmgen_opt.optimize`` on CPU: six graphs in all (two encoder buckets, the
decoder step, the beam reorder, text-to-unit, one vocoder bucket), all in one test method
because the test case resets Dynamo between methods.
"""

from __future__ import annotations

import unittest
import unittest.mock

import torch
from torch._dynamo.utils import counters

import torch_mmgen_opt as mmgen
from torch_mmgen_opt import OptimizeConfig
from torch_mmgen_opt.models import build
from torch_mmgen_opt.runtime.seamless_pipeline import (
    OptimizedSeamless,
    eager_stage_times,
    optimize_hf_seamless,
)
from torch_mmgen_opt.testing import TestCase, run_tests

# (frames, bucket): 40 and 56 share the 64-frame bucket, 100 and 120 the 128-frame one.
LENGTHS = ((40, 64), (56, 64), (100, 128), (120, 128))


def _fbank(T: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(1, T, 80, generator=torch.Generator().manual_seed(T)).to(device)


class TestStaticRuntime(TestCase):
    """The optimized runtime with compile=False: static cache, in-place reorder, padding."""

    def _check(self, model, opt, T):
        tokens, wav = model(_fbank(T))
        tokens_o, wav_o = opt(_fbank(T))
        self.assertEqual(tokens_o, tokens, atol=0, rtol=0)
        self.assertEqual(wav_o.shape, wav.shape)
        torch.testing.assert_close(wav_o, wav, rtol=1e-4, atol=1e-4)
        return tokens

    def test_matches_eager(self):
        for eos_id in (2, 184):  # 184 finishes hypotheses early on these inputs
            model = build("seamless", "tiny", eos_id=eos_id)
            for pad in (True, False):  # padded to buckets (CUDA's default) or exact (CPU's)
                opt = OptimizedSeamless(model, frame_buckets=(64, 128), compile=False,
                                        pad_to_buckets=pad)
                self.assertGreater(opt.weight_norm_folded, 0)
                for T, _ in LENGTHS:
                    with self.subTest(eos_id=eos_id, T=T, pad=pad):
                        self._check(model, opt, T)

    def test_cross_attention_both_step_forms_match_eager(self):
        """Exact lengths on CPU: up to CROSS_IN_GRAPH_MAX_KEYS cross keys the step runs
        its cross-attention unfolded (one query row per beam), above it folded (the
        beams as query rows of one call); both give eager's tokens and waveform."""
        from unittest import mock

        from torch_mmgen_opt.runtime import seamless_pipeline

        model = build("seamless", "tiny", eos_id=184)
        opt = OptimizedSeamless(model, frame_buckets=(64, 128), compile=False)
        self.assertTrue(opt.cross_attention_in_graph)
        self.assertFalse(opt.step_short_cross.step.fold_beams)
        self.assertTrue(opt.step.step.fold_beams)
        used = []
        for limit in (seamless_pipeline.CROSS_IN_GRAPH_MAX_KEYS, 0):  # 0: always folded
            for T in (40, 120):
                with self.subTest(limit=limit, T=T), \
                        mock.patch.object(seamless_pipeline, "CROSS_IN_GRAPH_MAX_KEYS", limit), \
                        mock.patch.object(opt.step_short_cross, "forward",
                                          side_effect=opt.step_short_cross.forward) as short:
                    self._check(model, opt, T)
                    used.append(short.called)
        self.assertEqual(used, [True, True, False, False])
        # padded (CUDA's default) never takes the unfolded form
        padded = OptimizedSeamless(model, frame_buckets=(64, 128), compile=False,
                                   pad_to_buckets=True)
        self.assertFalse(padded.cross_attention_in_graph)
        self.assertIsNone(padded.step_short_cross)

    def test_text_to_unit_from_kept_decoder_states(self):
        """The T2U stage reads the decoder states the search kept (computing only the
        last position) for the search's own tokens: the same units as the re-run over
        the text, whether the chosen beam stopped early (eos 184) or ran to the length
        limit (eos 2, where its last position was never run by the search). Other
        tokens, or tokens after another utterance was encoded, take the re-run."""
        from unittest import mock

        for eos_id in (2, 184):
            model = build("seamless", "tiny", eos_id=eos_id)
            for pad in (False, True):
                opt = OptimizedSeamless(model, frame_buckets=(64, 128), compile=False,
                                        pad_to_buckets=pad)
                self.assertTrue(opt.reuse_decoder_states)
                for T in (40, 120):
                    with self.subTest(eos_id=eos_id, pad=pad, T=T), \
                            mock.patch.object(opt.text_to_unit_from_states, "forward",
                                              side_effect=opt.text_to_unit_from_states.forward) as kept, \
                            mock.patch.object(opt.text_to_unit, "forward",
                                              side_effect=opt.text_to_unit.forward) as rerun:
                        opt.run_encoder(_fbank(T))
                        tokens = opt.run_decoder()
                        units, n = opt.run_t2u(tokens)
                        self.assertEqual((kept.call_count, rerun.call_count), (1, 0))
                        opt._searched = None  # forget the search: the re-run
                        units_r, n_r = opt.run_t2u(tokens)
                        self.assertEqual((kept.call_count, rerun.call_count), (1, 1))
                        self.assertEqual(n, n_r)
                        self.assertEqual(units[:, :n], units_r[:, :n], atol=0, rtol=0)
                        opt.run_decoder()
                        opt.run_t2u(tokens[:, :-1])  # not the search's tokens
                        opt.run_encoder(_fbank(T + 1))  # another utterance
                        opt.run_t2u(tokens)
                        self.assertEqual((kept.call_count, rerun.call_count), (1, 3))
                        if eos_id == 2:  # never finishes: the last position is new here
                            self.assertEqual(tokens.shape[1], model.config.max_new_tokens)

    def test_exact_lengths_attend_over_the_utterance_keys_only(self):
        """Unpadded (CPU's default), the decoder step and T2U read the first S cross keys
        of the static buffers, never all S_max of them; padded, they read S_max."""
        from unittest import mock

        from torch_mmgen_opt.runtime import seamless_pipeline

        model = build("seamless", "tiny")
        for pad in (False, True):
            opt = OptimizedSeamless(model, frame_buckets=(64, 128), compile=False,
                                    pad_to_buckets=pad)
            s_max = opt.state.layers[0].ck.shape[2]
            key_lengths = []

            def spy(q, k, v, allowed, _real=seamless_pipeline.attend, _seen=key_lengths):
                _seen.append(k.shape[2])
                return _real(q, k, v, allowed)

            with mock.patch.object(seamless_pipeline, "attend", spy):
                opt.run_encoder(_fbank(40))  # the encoder's attention is the model's own
                tokens = opt.run_decoder()
                steps = len(key_lengths)
                opt.run_t2u(tokens)
            with self.subTest(pad=pad):
                S = int(model.encoder.out_lengths(torch.tensor(40)))
                self.assertLess(S, s_max)
                self.assertGreater(len(key_lengths), steps)  # T2U ran through attend too
                for stage, lengths in (("step", key_lengths[:steps]), ("t2u", key_lengths[steps:])):
                    self.assertEqual(s_max in lengths, pad, stage)
                    self.assertEqual(S in lengths, not pad, stage)

    def test_packed_linears_match_eager(self):
        model = build("seamless", "tiny", eos_id=184)
        opt = OptimizedSeamless(model, OptimizeConfig(pack_linear=True),
                                frame_buckets=(64, 128), compile=False)
        packed = [k for k, v in opt.packed_linears.items() if v == "packed"]
        # every linear of the encoder, decoder and T2U copies (none is left out)
        n_linear = sum(isinstance(m, torch.nn.Linear)
                       for part in (model.encoder, model.decoder, model.t2u) for m in part.modules())
        self.assertEqual(len(packed), n_linear)
        self.assertEqual(counters["mmgen"]["linear_packed"], n_linear)
        # the step's decoder copy is left to decode_gemv; T2U's copy is packed
        self.assertFalse(any(k.startswith("decoder.") for k in packed))
        self.assertTrue(any(k.startswith("t2u_decoder.") for k in packed))
        gemv_off = OptimizedSeamless(model, OptimizeConfig(pack_linear=True, decode_gemv=False),
                                     frame_buckets=(64, 128), compile=False)
        self.assertTrue(any(k.startswith("decoder.") for k in gemv_off.packed_linears))
        self.assertIs(type(model.decoder.lm_head), torch.nn.Linear)  # the model is not edited
        for T, _ in LENGTHS:
            with self.subTest(T=T):
                self._check(model, opt, T)
        off = OptimizedSeamless(model, OptimizeConfig(pack_linear=False), compile=False)
        self.assertEqual(off.packed_linears, {})

    def test_quantized_copies(self):
        """quantize= swaps the copies' linears (lossy: checked by SQNR of the decoder's
        logits), packs what stays float, and leaves the model's own modules alone. A
        float32 CPU model has only its decoder step quantized (the int8 decode kernel);
        the encoder and T2U, at 25-100 rows, stay float."""
        from torch_mmgen_opt.kernels.packed_linear import PackedLinear
        from torch_mmgen_opt.kernels.quant import QuantizedLinear
        from torch_mmgen_opt.testing import sqnr

        model = build("seamless", "tiny")
        opt = OptimizedSeamless(model, OptimizeConfig(quantize="int8", pack_linear=True),
                                compile=False)
        self.assertIn("int8", opt.quantized_linears.values())
        self.assertTrue(all(k.startswith("decoder.") for k in opt.quantized_linears))
        # every linear of the encoder, T2U and T2U's decoder copy is float and packed; the
        # step's float head is left to decode_gemv
        n_float = sum(isinstance(m, torch.nn.Linear)
                      for part in (model.encoder, model.decoder, model.t2u) for m in part.modules())
        self.assertEqual(len(opt.packed_linears), n_float)
        self.assertFalse(any(k.startswith("decoder.") for k in opt.packed_linears))
        self.assertTrue(opt.fused_reorder)  # no CUDA graphs: step and reorder in one module
        decoder = opt.step.step.decoder
        self.assertIsInstance(decoder.layers[0].ffn.fc1, QuantizedLinear)
        t2u_decoder = opt.text_to_unit.decoder
        self.assertIsNot(t2u_decoder, decoder)
        self.assertIsInstance(t2u_decoder.layers[0].ffn.fc1, PackedLinear)
        # the encoder stage projects the cross K/V (over every frame) with a float copy
        self.assertIsInstance(opt.encode.dec_layers[0].cross_attn.k_proj, PackedLinear)
        self.assertIs(type(model.decoder.layers[0].ffn.fc1), torch.nn.Linear)
        with torch.no_grad():
            enc, mask = model.encoder(_fbank(40), torch.tensor([40]))
            seq = torch.randint(0, model.config.vocab_size, (1, 9),
                                generator=torch.Generator().manual_seed(1))
            self.assertGreater(sqnr(model.decoder(seq, enc, mask)[0], decoder(seq, enc, mask)[0]), 30)
        tokens, wav = opt(_fbank(40))
        self.assertEqual(wav.shape[1] % opt.vocoder.hop, 0)

        # bfloat16: torch's int8 kernel is fast at any row count, so every copy is
        # quantized and T2U's decoder shares the step's quantized weights
        bf16 = build("seamless", "tiny", dtype=torch.bfloat16)
        opt = OptimizedSeamless(bf16, OptimizeConfig(quantize="int8"), compile=False)
        self.assertTrue(any(k.startswith("encoder.") for k in opt.quantized_linears))
        self.assertTrue(any(k.startswith("t2u.") for k in opt.quantized_linears))
        fc1 = opt.step.step.decoder.layers[0].ffn.fc1
        self.assertIs(opt.text_to_unit.decoder.layers[0].ffn.fc1.qweight, fc1.qweight)
        tokens, wav = opt(_fbank(40).to(torch.bfloat16))
        self.assertEqual(wav.shape[1] % opt.vocoder.hop, 0)

    def test_channels_last_vocoder_matches(self):
        from torch_mmgen_opt.runtime.prepare import Conv1dAs2d

        model = build("seamless", "tiny")
        opt = OptimizedSeamless(model, compile=False)
        convs = [m for m in opt.vocoder.modules() if isinstance(m, Conv1dAs2d)]
        self.assertEqual(len(convs), opt.weight_norm_folded)  # every conv, all folded first
        units = torch.randint(0, model.config.unit_vocab, (1, 37),
                              generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(opt.vocoder(units), model.vocoder(units),
                                       rtol=1e-5, atol=1e-5)

    def test_channels_last_encoder_copy_matches(self):
        from torch_mmgen_opt.runtime.prepare import Conv1dAs2d

        model = build("seamless", "tiny")
        opt = OptimizedSeamless(model, OptimizeConfig(pack_linear=False), compile=False)
        encoder = opt.encode.encoder
        self.assertIsNot(encoder, model.encoder)  # a copy: the model keeps its Conv1d
        n_conv = 2 + 3 * model.config.enc_layers  # subsampling; pw1, depthwise, pw2 a layer
        self.assertEqual(opt.encoder_convs_channels_last, n_conv)
        self.assertEqual(sum(isinstance(m, Conv1dAs2d) for m in encoder.modules()), n_conv)
        self.assertFalse(any(isinstance(m, Conv1dAs2d) for m in model.modules()))
        x, lengths = _fbank(57), torch.tensor([57])
        with torch.no_grad():
            ref, ref_mask = model.encoder(x, lengths)
            out, mask = encoder(x, lengths)
        self.assertEqual(mask, ref_mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    def test_stop_check_interval_does_not_change_result(self):
        model = build("seamless", "tiny", eos_id=184)
        every_step = OptimizedSeamless(model, frame_buckets=(64, 128), compile=False, sync_every=1)
        rarely = OptimizedSeamless(model, frame_buckets=(64, 128), compile=False, sync_every=5)
        for T, _ in LENGTHS:
            self.assertEqual(rarely(_fbank(T))[0], every_step(_fbank(T))[0])

    def test_user_model_untouched(self):
        model = build("seamless", "tiny")
        keys = set(model.state_dict())
        OptimizedSeamless(model, compile=False)
        self.assertEqual(set(model.state_dict()), keys)
        self.assertTrue(any("parametrizations" in k for k in keys))

    def test_too_long_input_raises(self):
        opt = OptimizedSeamless(build("seamless", "tiny"), frame_buckets=(64,), compile=False)
        with self.assertRaisesRegex(ValueError, "add a bucket"):
            opt(_fbank(65))

    def test_stage_times_keys(self):
        model = build("seamless", "tiny")
        opt = OptimizedSeamless(model, frame_buckets=(64,), compile=False)
        for times in (opt.stage_times(_fbank(40), repeats=1),
                      eager_stage_times(model, _fbank(40), repeats=1)):
            self.assertEqual(set(times), {"encoder", "decoder", "t2u", "vocoder", "total"})
            self.assertTrue(all(v > 0 for v in times.values()))


class TestCompiledPipeline(TestCase):
    def _run_compiled(self, device: str, pad_to_buckets=None, **options) -> None:
        model = build("seamless", "tiny", eos_id=184, device=device)
        if pad_to_buckets is None:
            opt = mmgen.optimize(model, prefill_buckets=(64, 128), **options)
        else:
            config = OptimizeConfig(prefill_buckets=(64, 128), **options)
            opt = OptimizedSeamless(model, config, pad_to_buckets=pad_to_buckets)
        self.assertIsInstance(opt, OptimizedSeamless)
        # every length here gives at most 52 units: one vocoder bucket
        self.assertEqual(opt.unit_buckets, (64,))
        # the same runtime uncompiled: after each search the compiled one must hold the
        # same cache, token history and kept states (the beam reorder permutes rows in
        # place; a permuting step is checked to occur below)
        ref = OptimizedSeamless(model, OptimizeConfig(prefill_buckets=(64, 128), **options),
                                compile=False, pad_to_buckets=opt.pad_to_buckets)
        beam_orders = []
        real_reorder = ref.step.reorder.forward

        def spy(beam_idx, *args):
            beam_orders.append(beam_idx.tolist())
            return real_reorder(beam_idx, *args)

        ref.step.reorder.forward = spy
        graphs_after_bucket = {}
        for T, bucket in LENGTHS:
            with self.subTest(T=T):
                tokens, wav = model(_fbank(T, device))
                tokens_o, wav_o = opt(_fbank(T, device))
                self.assertEqual(tokens_o, tokens, atol=0, rtol=0)
                self.assertEqual(wav_o.shape, wav.shape)
                torch.testing.assert_close(wav_o, wav, rtol=1e-4, atol=1e-4)
                ref(_fbank(T, device))
                n = ref.steps_run
                self.assertEqual(opt.steps_run, n)
                self.assertEqual(opt.state.hist[:, : n + 1], ref.state.hist[:, : n + 1])
                for c, c_ref in zip(opt.state.layers, ref.state.layers):
                    torch.testing.assert_close(c.k[:, :, :n], c_ref.k[:, :, :n], rtol=1e-4, atol=1e-4)
                    torch.testing.assert_close(c.v[:, :, :n], c_ref.v[:, :, :n], rtol=1e-4, atol=1e-4)
                if opt.reuse_decoder_states:
                    torch.testing.assert_close(opt.state.hid[:, :n], ref.state.hid[:, :n],
                                               rtol=1e-4, atol=1e-4)
            graphs = counters["stats"]["unique_graphs"]
            if bucket in graphs_after_bucket:  # same bucket: no recompile
                self.assertEqual(graphs, graphs_after_bucket[bucket])
            graphs_after_bucket[bucket] = graphs
            # decode steps after the first skip Dynamo's guards; the stance ends with them
            self.assertFalse(torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe)
        # CUDA graphs keep the reorder (it mutates the cache) out of the step's graph
        self.assertEqual(opt.fused_reorder, device != "cuda")
        self.assertEqual(opt.reorder is None, opt.fused_reorder)
        step_graphs = 1 if opt.fused_reorder else 2
        if opt.pad_to_buckets:
            # encoder x 2 buckets, step (+ reorder), text-to-unit, vocoder x 1 bucket
            expected = 3 + step_graphs + opt.compiled_vocoder
        else:  # one dynamic-length encoder graph, step (+ reorder), text-to-unit
            expected = 2 + step_graphs
        self.assertEqual(counters["stats"]["unique_graphs"], expected)
        self.assertEqual(opt.report.graphs_compiled, expected)
        # a step that moves a row onto one another row then reads (the case an in-place
        # gather gets wrong) happened in these searches
        self.assertTrue(any(any(i < k and order[i] != i for k, i in enumerate(order))
                            for order in beam_orders), beam_orders)
        return opt

    def test_compiled_matches_eager_across_buckets_without_recompiles(self):
        """Exact lengths (CPU's default) across buckets: eager's tokens, no recompile; and
        the two forms of the step's cross-attention: these utterances (at most
        CROSS_IN_GRAPH_MAX_KEYS keys) ran the step graph whose cross-attention
        fuse_attention leaves to Inductor (one query row per beam); with the bound at 0
        an utterance runs the other step graph, whose folded cross-attention (the beams
        as query rows) is fused into SDPA. Tokens equal eager's either way."""
        from unittest import mock

        from torch_mmgen_opt.runtime import seamless_pipeline

        opt = self._run_compiled("cpu", pack_linear=True)
        self.assertFalse(opt.pad_to_buckets)  # CPU default: exact lengths, no recompile
        self.assertIn("packed", opt.packed_linears.values())
        self.assertTrue(opt.cross_attention_in_graph)
        model, cfg = opt.model, opt.model.config

        def cross_events():  # fuse_attention's decisions on cross keys (a dynamic length)
            return [(e.kind, e.detail) for e in opt.report.events
                    if "attention" in e.kind and "kv_len=None" in e.detail
                    and e.detail.startswith(("inductor: q_len=1 ", f"q_len={cfg.beam_size} "))]

        unfolded = ("attention_left_to_inductor", "inductor: q_len=1 kv_len=None float32")
        self.assertEqual(cross_events(), [unfolded] * cfg.dec_layers)
        with mock.patch.object(seamless_pipeline, "CROSS_IN_GRAPH_MAX_KEYS", 0):
            tokens, wav = model(_fbank(40))
            tokens_o, wav_o = opt(_fbank(40))
        self.assertEqual(tokens_o, tokens, atol=0, rtol=0)
        torch.testing.assert_close(wav_o, wav, rtol=1e-4, atol=1e-4)
        folded = ("attention_fused", f"q_len={cfg.beam_size} kv_len=None float32")
        self.assertEqual(cross_events()[cfg.dec_layers:], [folded] * cfg.dec_layers)
        self.assertEqual(opt.report.graphs_compiled, 4)  # + the folded step graph

    def test_compiled_padded_to_buckets_cpu(self):
        opt = self._run_compiled("cpu", pad_to_buckets=True, pack_linear=False)
        self.assertTrue(opt.pad_to_buckets)

    def test_gemv_kernel_runs_the_step(self):
        """With FFN and vocabulary large enough (>= 64K weight elements), the step's FFN
        and head linears go through our panel kernel (GemvLinear): every compiled step
        calls mmgen_cpu::panel_gemv for them, decode_gemv has no matmul left to rewrite
        there, the smaller projections are left with their reason, and tokens stay
        identical to eager."""
        from torch_mmgen_opt.kernels import cpu_gemv
        from torch_mmgen_opt.kernels.gemv_linear import GemvLinear

        if not cpu_gemv.ensure_loaded():
            self.skipTest("the CPU kernels could not be built here")
        model = build("seamless", "tiny", vocab_size=1024, dec_ffn=1024, eos_id=184)
        opt = mmgen.optimize(model, prefill_buckets=(64, 128))
        layers = model.config.dec_layers
        swapped = sorted(k for k, v in opt.gemv_linears.items() if v == "gemv")
        self.assertEqual(len(swapped), 2 * layers + 1)
        self.assertIn("decoder.lm_head", swapped)
        self.assertTrue(all(".ffn." in k for k in swapped if k != "decoder.lm_head"))
        left = {k: v for k, v in opt.gemv_linears.items() if v != "gemv"}
        self.assertTrue(left and all("small weights" in v for v in left.values()))
        self.assertFalse(any(isinstance(m, GemvLinear) for m in model.modules()))  # not edited
        for T in (40, 100):
            with self.subTest(T=T):
                tokens, wav = model(_fbank(T))
                tokens_o, wav_o = opt(_fbank(T))
                self.assertEqual(tokens_o, tokens, atol=0, rtol=0)
                torch.testing.assert_close(wav_o, wav, rtol=1e-4, atol=1e-4)
        self.assertEqual(counters["mmgen"]["linear_gemv"], 2 * layers + 1)
        # no few-row matmul left in the step for decode_gemv (T2U's one row: fc1, fc2
        # of its own float copy are not the step's)
        rewritten = [e.detail for e in opt.report.events if e.kind == "gemv_rewritten"]
        self.assertNotIn("3 rows x 1024 outputs", rewritten)
        opt.run_encoder(_fbank(40))
        with torch.profiler.profile() as prof:
            opt.run_decoder()
        calls = sum(e.count for e in prof.key_averages() if e.key == "mmgen_cpu::panel_gemv")
        self.assertEqual(calls, opt.steps_run * (2 * layers + 1))

    def test_decode_gemv_rewrites_the_step(self):
        """Where our kernel cannot be built, the step's layers stay nn.Linear and
        decode_gemv rewrites the FFN and head matmuls (3 beams); tokens stay identical."""
        from torch_mmgen_opt.kernels import cpu_gemv

        model = build("seamless", "tiny", vocab_size=1024, dec_ffn=1024, eos_id=184)
        with unittest.mock.patch.object(cpu_gemv, "ensure_loaded", return_value=False):
            opt = mmgen.optimize(model, prefill_buckets=(64, 128))
        self.assertTrue(opt.gemv_linears)
        self.assertTrue(all("could not be built" in v for v in opt.gemv_linears.values()))
        for T in (40, 100):
            with self.subTest(T=T):
                tokens, wav = model(_fbank(T))
                tokens_o, wav_o = opt(_fbank(T))
                self.assertEqual(tokens_o, tokens, atol=0, rtol=0)
                torch.testing.assert_close(wav_o, wav, rtol=1e-4, atol=1e-4)
        layers = model.config.dec_layers
        # the step: fc1, fc2 of every layer and the head (3 beams); the text-to-unit
        # stage's last position (one row through the step's decoder): fc1, fc2
        self.assertTrue(opt.reuse_decoder_states)
        self.assertEqual(counters["mmgen"]["gemv_rewritten"], (2 * layers + 1) + 2 * layers)
        rewritten = [e.detail for e in opt.report.events if e.kind == "gemv_rewritten"]
        self.assertEqual(rewritten.count("3 rows x 1024 outputs"), layers + 1)  # fc1s, head
        self.assertEqual(rewritten.count("1 rows x 1024 outputs"), layers)  # fc1s
        self.assertFalse(any(k.startswith("decoder.") for k in opt.packed_linears))

    def test_int8_decode_step_compiled(self):
        """quantize='int8' on a float32 CPU model: the compiled step runs every quantized
        linear through the int8 kernel (decode_gemv), the encoder and T2U graphs stay
        float (no int8 op, nothing quantized by the graph pass), and the tokens and
        waveform equal the same quantized runtime run uncompiled (same int8 math)."""
        from torch_mmgen_opt.kernels import cpu_gemv

        if not cpu_gemv.ensure_loaded():
            self.skipTest("the int8 CPU kernel could not be built here")
        model = build("seamless", "tiny", eos_id=184)
        config = OptimizeConfig(quantize="int8", prefill_buckets=(64, 128))
        eager_q = OptimizedSeamless(model, config, compile=False)
        opt = mmgen.optimize(model, config=config)
        self.assertTrue(opt.decode_only_quantized)
        for T in (40, 100):
            with self.subTest(T=T):
                tokens, wav = eager_q(_fbank(T))
                tokens_o, wav_o = opt(_fbank(T))
                self.assertEqual(tokens_o, tokens, atol=0, rtol=0)
                torch.testing.assert_close(wav_o, wav, rtol=1e-4, atol=1e-4)
        int8 = [e.detail for e in opt.report.events
                if e.kind == "gemv_rewritten" and "int8" in e.detail]
        used = [k for k in opt.quantized_linears
                if opt.quantized_linears[k] == "int8" and "cross_attn.k_proj" not in k
                and "cross_attn.v_proj" not in k]  # the cross K/V run in the float encoder
        self.assertEqual(len(int8), len(used))
        self.assertGreater(len(int8), 0)
        self.assertFalse([e for e in opt.report.events
                          if e.kind == "gemv_skipped" and "int8" in e.detail])
        # the graph pass only counted the prepared step's layers; it quantized no float
        # linear of the encoder or T2U graphs
        quantized = [e.detail for e in opt.report.events if e.kind == "linear_quantized"]
        self.assertTrue(quantized)
        self.assertTrue(all(d.endswith("(prepared module)") for d in quantized), quantized)

    @unittest.skipIf(not torch.cuda.is_available(), "needs CUDA")
    def test_compiled_cuda_graphs(self):
        self._run_compiled("cuda")


def _hf_tiny(device: str = "cpu"):
    """A small random ``SeamlessM4Tv2Model`` built offline, its vocoder under weight_norm."""
    from transformers import SeamlessM4Tv2Config, SeamlessM4Tv2Model

    two = dict(encoder_attention_heads=2, decoder_attention_heads=2,
               speech_encoder_attention_heads=2, t2u_encoder_attention_heads=2,
               t2u_decoder_attention_heads=2)
    cfg = SeamlessM4Tv2Config(
        vocab_size=128, t2u_vocab_size=64, char_vocab_size=64, hidden_size=32,
        encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        speech_encoder_layers=2, speech_encoder_intermediate_size=64,
        conv_depthwise_kernel_size=3, adaptor_kernel_size=2, adaptor_stride=2,
        left_max_position_embeddings=8, right_max_position_embeddings=4,
        t2u_encoder_layers=1, t2u_decoder_layers=1, t2u_encoder_ffn_dim=64,
        t2u_decoder_ffn_dim=64, t2u_variance_predictor_embed_dim=32,
        t2u_variance_predictor_hidden_dim=16, upsample_initial_channel=16,
        upsample_rates=(2, 2), upsample_kernel_sizes=(4, 4), resblock_kernel_sizes=(3,),
        resblock_dilation_sizes=((1, 3),), unit_hifi_gan_vocab_size=32, unit_embed_dim=16,
        lang_embed_dim=8, spkr_embed_dim=8, vocoder_num_langs=2, vocoder_num_spkrs=2,
        max_position_embeddings=64, t2u_max_position_embeddings=64, **two,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SeamlessM4Tv2Model(cfg).eval()
    model.vocoder.apply_weight_norm()
    return model.to(device)


class TestHFSeamless(TestCase):
    def _check_text(self, model, opt, device):
        for T, beams in ((40, 1), (64, 3)):
            x = torch.randn(1, T, 160, generator=torch.Generator().manual_seed(T)).to(device)
            kwargs = dict(input_features=x, generate_speech=False, num_beams=beams,
                          max_new_tokens=8)
            with self.subTest(T=T, beams=beams):
                self.assertEqual(opt.generate(**kwargs).sequences,
                                 model.generate(**kwargs).sequences, atol=0, rtol=0)

    def test_prepared_model_matches_eager(self):
        model = _hf_tiny()
        opt = optimize_hf_seamless(model, compile=False)
        self.assertGreater(opt.weight_norm_folded, 0)
        self.assertIsNot(opt.model.vocoder, model.vocoder)  # the user's vocoder keeps weight_norm
        self.assertTrue(any("parametrizations" in k for k in model.vocoder.state_dict()))
        self._check_text(model, opt, "cpu")
        units = torch.randint(4, 32, (1, 7))
        spk, lang = torch.tensor([[0]]), torch.tensor([[1]])
        with torch.no_grad():
            ref, ref_len = model.vocoder(units, spk, lang)
            out, out_len = opt.model.vocoder(units, spk, lang)
        self.assertEqual(out_len, ref_len)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    @unittest.skipIf(not torch.cuda.is_available(), "needs CUDA")
    def test_compiled_speech_encoder_matches_eager(self):
        model = _hf_tiny("cuda")
        self._check_text(model, optimize_hf_seamless(model), "cuda")


if __name__ == "__main__":
    run_tests()
