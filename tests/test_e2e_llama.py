"""End-to-end: the tiny reference Llama under ``torch_mmgen_opt.optimize`` (backend mmgen).

Two compiles of the model in all (float32, bfloat16), each compiling a prefill graph and
one decode graph whose cache length is dynamic. Checked: logits against eager, greedy
tokens over 32 steps identical to eager, the attention counters, and the generated code
(``run_and_get_code`` + ``FileCheck``): no bmm left where attention was fused, the CPU
flash kernel present; at bfloat16 decode the ``auto`` rule leaves attention to Inductor.
"""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import torch_mmgen_opt
from torch_mmgen_opt.models import build
from torch_mmgen_opt.passes.fuse_attention import prefer_sdpa
from torch_mmgen_opt.testing import TestCase, greedy_reference, run_tests

FLASH = "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default"
FLASH_CALL = FLASH + "("  # the call itself, not the assert_size_stride lines naming it
STEPS = 32


@torch.no_grad()
def greedy_compiled(model, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding through a compiled model with the model's growing cache; the cache
    length is marked dynamic so every decode step reuses one graph."""
    out = model(input_ids)
    past, new = out.past_key_values, []
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        new.append(tok)
        if len(new) == steps:
            break
        # contiguous: the prefill's cache is a transposed view, later ones come from cat;
        # one layout and a dynamic length give one decode graph for every step
        past = [(k.contiguous(), v.contiguous()) for k, v in past]
        for k, v in past:
            torch._dynamo.mark_dynamic(k, 2)
            torch._dynamo.mark_dynamic(v, 2)
        out = model(tok, past)
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(new, dim=1)


class LlamaEndToEndTest(TestCase):
    def _ids(self, n: int = 8) -> torch.Tensor:
        return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))

    def test_float32_prefill_and_greedy(self):
        model = build("llama", "tiny")
        n_layers = model.config.n_layers
        ids = self._ids()
        with torch.no_grad():
            ref_logits = model(ids).logits
        ref_tokens = greedy_reference(model, ids, STEPS)
        with inductor_config.patch(fx_graph_cache=False):
            compiled = torch_mmgen_opt.optimize(model)
            counters.clear()
            with torch.no_grad():
                logits, (prefill_code,) = run_and_get_code(lambda: compiled(ids).logits)
            self.assertEqual(counters["mmgen"]["attention_fused"], n_layers)
            self.assertEqual(counters["inductor"]["fuse_attention"], 0)
            self.assertEqual(logits, ref_logits, atol=1e-4, rtol=1e-4)
            FileCheck().check_count(FLASH_CALL, n_layers, exactly=True).run(prefill_code)
            FileCheck().check_not("bmm").run(prefill_code)
            FileCheck().check_not("amax").run(prefill_code)

            counters.clear()
            tokens, decode_codes = run_and_get_code(greedy_compiled, compiled, ids, STEPS)
        self.assertEqual(tokens, ref_tokens)
        # decode graphs dynamic in the cache length: "auto" fuses in float32
        self.assertTrue(prefer_sdpa("cpu", torch.float32, 1, None))
        self.assertIn(len(decode_codes), (1, 2))  # at most one recompile over 31 steps
        self.assertEqual(counters["mmgen"]["attention_fused"], n_layers * len(decode_codes))
        for code in decode_codes:
            FileCheck().check_count(FLASH_CALL, n_layers, exactly=True).run(code)
            FileCheck().check_not("bmm").run(code)

    def test_bfloat16_prefill_fused_decode_left_to_inductor(self):
        model = build("llama", "tiny", dtype=torch.bfloat16)
        n_layers = model.config.n_layers
        ids = self._ids()
        with torch.no_grad():
            ref = model(ids)
            ref_step = model(ids[:, -1:], ref.past_key_values).logits
            truth = build("llama", "tiny")(ids).logits  # float32 weights, same seed
        with inductor_config.patch(fx_graph_cache=False), torch.no_grad():
            compiled = torch_mmgen_opt.optimize(model)
            counters.clear()
            out, (prefill_code,) = run_and_get_code(compiled, ids)
            self.assertEqual(counters["mmgen"]["attention_fused"], n_layers)
            counters.clear()
            step, (decode_code,) = run_and_get_code(compiled, ids[:, -1:], out.past_key_values)
        self.assertEqual(out.logits, ref.logits, atol=5e-2, rtol=5e-2)
        self.assertLess((out.logits.float() - truth).abs().max().item(), 0.1)
        self.assertEqual(step.logits, ref_step, atol=5e-2, rtol=5e-2)
        FileCheck().check_count(FLASH_CALL, n_layers, exactly=True).run(prefill_code)
        FileCheck().check_not("bmm").run(prefill_code)
        # decode: one query token in bf16 on CPU -> Inductor's own bmm + softmax code
        self.assertFalse(prefer_sdpa("cpu", torch.bfloat16, 1, 9))
        self.assertEqual(counters["mmgen"]["attention_left_to_inductor"], n_layers)
        self.assertEqual(counters["inductor"]["fuse_attention"], 0)
        FileCheck().check_not(FLASH).run(decode_code)


if __name__ == "__main__":
    run_tests()
