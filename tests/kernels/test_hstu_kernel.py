"""HSTU attention ops: the CPU reference (dense and jagged), the fake implementations, and
the Triton kernel against the reference on CUDA."""

from __future__ import annotations

import unittest

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from torch_mmgen_opt.kernels import hstu
from torch_mmgen_opt.testing import TestCase, run_tests

# (history lengths, heads, qk dim, v dim, max_seq_len): ragged batches of several shapes,
# with histories of length 1, exactly max_seq_len and across the kernel's 64-row blocks.
RAGGED = [
    ([5, 1, 8, 3], 2, 4, 4, 8),
    ([64, 17, 1], 2, 32, 16, 64),
    ([130, 7, 200, 64, 65], 4, 64, 64, 200),
]


def _jagged(lengths, H, d, dv, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k = (torch.randn(T, H, d, generator=g) for _ in range(2))
    v = torch.randn(T, H, dv, generator=g)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [offsets.to(device)]


def _loop_reference(q, k, v, offsets, N, bias=None, alpha=1.0):
    """One sequence at a time, no padding at all: the definition of jagged attention."""
    outs = []
    for b in range(offsets.numel() - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        L = e - s
        qq, kk, vv = (t[s:e].transpose(0, 1).double() for t in (q, k, v))  # (H, L, d)
        scores = alpha * qq @ kk.transpose(-1, -2)
        if bias is not None:
            scores = scores + bias[min(b, bias.shape[0] - 1), :, :L, :L].double()
        a = F.silu(scores) / N * torch.ones(L, L, dtype=torch.float64).tril()
        outs.append((a @ vv).transpose(0, 1))
    return torch.cat(outs)


class HSTUReferenceTest(TestCase):
    def test_dense_reference_matches_eager_formula(self):
        g = torch.Generator().manual_seed(0)
        B, H, N, d = 2, 3, 9, 5
        q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
        bias = torch.randn(B, 1, N, N, generator=g)
        for mask in (torch.rand(B, 1, N, N, generator=g) > 0.3, torch.rand(1, 1, N, N, generator=g)):
            out = torch.ops.mmgen.hstu_attention(q, k, v, bias, mask, 0.5, 1.0 / N)
            a = F.silu(0.5 * q @ k.transpose(-1, -2) + bias) / N
            a = a * mask.to(a.dtype)
            torch.testing.assert_close(out, a @ v, rtol=1e-5, atol=1e-6)

    def test_jagged_reference_matches_per_sequence_loop(self):
        for lengths, H, d, dv, N in RAGGED:
            with self.subTest(lengths=lengths):
                q, k, v, offsets = _jagged(lengths, H, d, dv)
                bias = torch.randn(len(lengths), H, N, N) * 0.1
                out = torch.ops.mmgen.hstu_attention_jagged(q, k, v, offsets, N, bias, 0.7)
                ref = _loop_reference(q, k, v, offsets, N, bias, alpha=0.7)
                self.assertEqual(out.shape, (sum(lengths), H, dv))
                torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)

    def test_padding_round_trip_with_empty_and_full_sequences(self):
        lengths, N = [3, 0, 8, 0, 1, 5], 8  # empty histories, one of exactly N
        values = torch.randn(sum(lengths), 2, 3, generator=torch.Generator().manual_seed(3))
        offsets = torch.tensor([0, *lengths]).cumsum(0)
        padded = hstu.jagged_to_padded(values, offsets, N)
        for b, (s, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
            self.assertEqual(padded[b, : e - s], values[s:e], atol=0, rtol=0)
            self.assertEqual(padded[b, e - s:], torch.zeros_like(padded[b, e - s:]))
        self.assertEqual(hstu.padded_to_jagged(padded, offsets, values.shape[0]), values,
                         atol=0, rtol=0)
        compiled = torch.compile(hstu.padded_to_jagged, fullgraph=True)
        self.assertEqual(compiled(padded, offsets, values.shape[0]), values, atol=0, rtol=0)

    def test_padded_to_jagged_searches_unsliced_offsets(self):
        # Inductor in torch < 2.13 ignores a sliced view's storage offset in its CUDA
        # searchsorted (pytorch/pytorch#182343): the boundaries must be the input itself.
        from torch.fx.experimental.proxy_tensor import make_fx

        offsets = torch.tensor([0, 3, 3, 9])
        gm = make_fx(lambda p, o: hstu.padded_to_jagged(p, o, 9))(torch.randn(3, 6, 2), offsets)
        (node,) = [n for n in gm.graph.nodes if n.target == torch.ops.aten.searchsorted.Tensor]
        self.assertEqual(node.args[0].op, "placeholder")

    def test_fake_impls_give_output_shapes(self):
        with FakeTensorMode():
            q, k = torch.empty(2, 4, 16, 8), torch.empty(2, 4, 16, 8)
            v = torch.empty(2, 4, 16, 6)
            out = torch.ops.mmgen.hstu_attention(q, k, v, None, None, 1.0, 1.0)
            self.assertEqual(out.shape, (2, 4, 16, 6))
            qj, vj = torch.empty(30, 4, 8), torch.empty(30, 4, 6)
            offsets = torch.empty(3, dtype=torch.long)
            out = torch.ops.mmgen.hstu_attention_jagged(qj, qj, vj, offsets, 16)
            self.assertEqual(out.shape, (30, 4, 6))

    def test_opcheck(self):
        q, k, v, offsets = _jagged([3, 5], 2, 4, 4)
        torch.library.opcheck(
            torch.ops.mmgen.hstu_attention_jagged.default, (q, k, v, offsets, 8, None, 1.0, None, True)
        )
        qd = q[:8].reshape(1, 8, 2, 4).transpose(1, 2)
        torch.library.opcheck(
            torch.ops.mmgen.hstu_attention.default, (qd, qd, qd, None, torch.ones(8, 8) > 0, 1.0, 0.1)
        )


@unittest.skipIf(not torch.cuda.is_available() or not hstu.HAS_TRITON, "needs CUDA and Triton")
class HSTUTritonTest(TestCase):
    def test_jagged_kernel_matches_reference(self):
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            for lengths, H, d, dv, N in RAGGED:
                with self.subTest(dtype=str(dtype), lengths=lengths):
                    q, k, v, offsets = _jagged(lengths, H, d, dv, dtype, "cuda")
                    bias = (torch.randn(1, H, N, N, device="cuda") * 0.1).to(dtype)
                    # the kernel itself (the op would fall back to the reference on error)
                    out = hstu._triton_jagged(q, k, v, offsets, N, bias, 1.0, 1.0 / N, True)
                    op = torch.ops.mmgen.hstu_attention_jagged(q, k, v, offsets, N, bias)
                    torch.testing.assert_close(op, out, rtol=0, atol=0)
                    ref = hstu.hstu_attention_jagged_reference(
                        q.float(), k.float(), v.float(), offsets, N, bias.float()
                    )
                    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)

    def test_dense_kernel_matches_reference(self):
        g = torch.Generator().manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            for B, H, N, d in ((2, 2, 8, 4), (3, 4, 100, 64), (1, 2, 257, 128)):
                with self.subTest(dtype=str(dtype), shape=(B, H, N, d)):
                    q, k, v = (torch.randn(B, N, H, d, generator=g).transpose(1, 2) for _ in range(3))
                    bias = torch.randn(B, 1, N, N, generator=g) * 0.1
                    mask = torch.rand(B, 1, N, N, generator=g) > 0.2
                    args = [t.to("cuda", dtype) for t in (q, k, v, bias)]
                    out = hstu._triton_dense(*args, mask.cuda(), 0.5, 1.0 / N)
                    ref = hstu.hstu_attention_reference(
                        *(t.float() for t in args), mask.cuda(), 0.5, 1.0 / N
                    )
                    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


if __name__ == "__main__":
    run_tests()
