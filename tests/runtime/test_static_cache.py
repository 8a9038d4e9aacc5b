"""StaticKVCache: in-place writes at device positions, static addresses, beam reorder,
the Hugging Face protocol, installation by optimize()."""

from __future__ import annotations

import torch

import torch_mmgen_opt as mmgen
from torch_mmgen_opt import models
from torch_mmgen_opt.runtime.static_cache import StaticKVCache, cache_dims
from torch_mmgen_opt.testing import TestCase, run_tests


def _cache(layers: int = 2, batch: int = 3, heads: int = 2, seq: int = 8, hd: int = 4) -> StaticKVCache:
    return StaticKVCache(layers, batch, heads, seq, hd, dtype=torch.float32, device="cpu")


def _tiny_hf_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


class TestStaticKVCache(TestCase):
    def test_update_writes_in_place_at_positions(self):
        cache = _cache()
        ptr = cache.key_cache[1].data_ptr()
        k, v = torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4)
        pos = torch.tensor([5, 6])
        k_all, v_all = cache.update(k, v, 1, {"cache_position": pos})
        self.assertEqual(k_all.shape, (3, 2, 8, 4))
        self.assertEqual(k_all.data_ptr(), ptr)
        self.assertEqual(k_all[:, :, 5:7], k)
        self.assertEqual(v_all[:, :, 5:7], v)
        self.assertEqual(k_all[:, :, :5].abs().sum(), 0)
        self.assertEqual(cache.key_cache[0].abs().sum(), 0)  # other layers untouched

    def test_update_smaller_batch_uses_first_rows(self):
        cache = _cache()
        k = torch.randn(2, 2, 1, 4)
        k_all, _ = cache.update(k, k, 0, {"cache_position": torch.tensor([3])})
        self.assertEqual(k_all.shape, (2, 2, 8, 4))
        self.assertEqual(cache.key_cache[0][:2, :, 3:4], k)
        self.assertEqual(cache.key_cache[0][2].abs().sum(), 0)

    def test_write_position_for_callers_without_cache_kwargs(self):
        cache = _cache()
        k = torch.randn(3, 2, 1, 4)
        with self.assertRaisesRegex(ValueError, "cache_position"):
            cache.update(k, k, 0)
        cache.write_position = torch.tensor([2])
        cache.update(k, k, 0, kwargs={})  # how transformers 5 calls it
        self.assertEqual(cache.key_cache[0][:, :, 2:3], k)

    def test_buffers_static_and_separate_per_layer(self):
        cache = _cache(layers=3)
        bufs = [*cache.key_cache, *cache.value_cache]
        storages = {b.untyped_storage().data_ptr() for b in bufs}
        self.assertEqual(len(storages), 6)  # one allocation per buffer, not slices of a stack
        for b in bufs:
            self.assertEqual(torch._dynamo.utils.get_static_address_type(b), "unguarded")
        cache = cache.to(torch.float64)  # buffers replaced: lists and marks follow
        self.assertEqual(cache.key_cache[0].dtype, torch.float64)
        self.assertIs(cache.key_cache[0], cache.k_0)
        self.assertEqual(torch._dynamo.utils.get_static_address_type(cache.k_0), "unguarded")

    def test_reorder_is_a_row_gather_for_every_layer(self):
        cache = _cache()
        for buf in (*cache.key_cache, *cache.value_cache):
            buf.copy_(torch.randn_like(buf))
        before = [b.clone() for b in (*cache.key_cache, *cache.value_cache)]
        ptrs = [b.data_ptr() for b in (*cache.key_cache, *cache.value_cache)]
        idx = torch.tensor([2, 0, 0])
        cache.reorder_(idx)
        for old, new, ptr in zip(before, (*cache.key_cache, *cache.value_cache), ptrs):
            self.assertEqual(new, old.index_select(0, idx))
            self.assertEqual(new.data_ptr(), ptr)
        # Expansion of a prefilled row to beams: fewer rows in use than len(idx).
        before = [b.clone() for b in cache.key_cache]
        cache.reorder_(torch.tensor([1, 1]))
        self.assertEqual(cache.key_cache[0][:2], before[0][[1, 1]])
        self.assertEqual(cache.key_cache[0][2], before[0][2])
        with self.assertRaisesRegex(ValueError, "max_batch_size=3"):
            cache.reorder_(torch.tensor([0, 1, 2, 0]))

    def test_reorder_compiled_equals_eager(self):
        a, b = _cache(), _cache()
        for x, y in zip((*a.key_cache, *a.value_cache), (*b.key_cache, *b.value_cache)):
            x.copy_(torch.randn_like(x))
            y.copy_(x)
        idx = torch.tensor([1, 2, 0])
        a.reorder_(idx, compiled=False)
        b.reorder_(idx, compiled=True)
        for x, y in zip((*a.key_cache, *a.value_cache), (*b.key_cache, *b.value_cache)):
            self.assertEqual(x, y)

    def test_reset_and_sizes(self):
        cache = _cache()
        cache.key_cache[0].fill_(1.0)
        ptr = cache.key_cache[0].data_ptr()
        cache.set_seq_length(4)
        cache.reset()
        self.assertEqual(cache.key_cache[0].abs().sum(), 0)
        self.assertEqual(cache.key_cache[0].data_ptr(), ptr)
        self.assertEqual(cache.get_seq_length(), 0)
        self.assertEqual(cache.get_max_cache_shape(), 8)
        self.assertEqual(len(cache), 2)

    def test_bad_sizes(self):
        with self.assertRaisesRegex(ValueError, "max_seq_len must be a positive int"):
            StaticKVCache(2, 1, 2, 0, 4, dtype=torch.float32, device="cpu")

    def test_dims_from_model_configs(self):
        self.assertEqual(cache_dims(models.build("llama", "tiny")), (2, 2, 16))
        self.assertEqual(cache_dims(_tiny_hf_llama()), (2, 2, 16))
        self.assertIsNone(cache_dims(torch.nn.Linear(2, 2)))
        with self.assertRaisesRegex(TypeError, "StaticKVCache"):
            StaticKVCache.for_model(torch.nn.Linear(2, 2), max_batch_size=1, max_seq_len=8)

    @torch.no_grad()
    def test_hf_llama_runs_on_the_cache(self):
        model = _tiny_hf_llama()
        ids = torch.randint(0, 128, (1, 7))
        ref = model(ids, use_cache=True).logits
        cache = StaticKVCache.for_model(model, max_batch_size=1, max_seq_len=16)
        cache.write_position = torch.arange(7)
        allowed = (torch.arange(16)[None] <= torch.arange(7)[:, None])[None, None]
        mask = torch.zeros(()).masked_fill(~allowed, torch.finfo(torch.float32).min)
        out = model(ids, attention_mask=mask, position_ids=torch.arange(7)[None], cache=cache)
        self.assertEqual(out.logits, ref, atol=1e-5, rtol=1e-5)
        self.assertGreater(cache.key_cache[1][:, :, :7].abs().sum(), 0)

    def test_optimize_installs_cache_without_touching_the_model(self):
        model = models.build("llama", "tiny")
        keys = set(model.state_dict())
        n_modules = len(list(model.modules()))
        mmgen.optimize(model, static_kv=True, max_seq_len=32, max_batch_size=2)
        cache = model._mmgen_static_cache
        self.assertIsInstance(cache, StaticKVCache)
        self.assertEqual(cache.key_cache[0].shape, (2, 2, 32, 16))
        self.assertEqual(set(model.state_dict()), keys)
        self.assertEqual(len(list(model.modules())), n_modules)

    def test_optimize_unknown_model_warns_once(self):
        with self.assertLogs("torch_mmgen_opt", level="WARNING") as logs:
            mmgen.optimize(torch.nn.Linear(4, 4), static_kv=True)
        self.assertEqual(len(logs.records), 1)
        self.assertIn("no cache installed", logs.output[0])


if __name__ == "__main__":
    run_tests()
