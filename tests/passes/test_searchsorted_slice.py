"""Tests of passes/searchsorted_slice.py: searches over a slice become a search over its
base, shifted and clamped (the workaround for pytorch/pytorch#182343).

Graph level: the rewritten graph equals eager on sorted boundaries with repeats, for every
slice form (start, end, negative, empty, past the end), both sides, int32 output, the
scalar and bucketize overloads; counters and event detail; where it must not fire. End to
end through the ``mmgen`` backend, static and dynamic shapes.
"""

from __future__ import annotations

import itertools

import torch

from torch_mmgen_opt.graph_utils import aten
from torch_mmgen_opt.passes.searchsorted_slice import PASS
from torch_mmgen_opt.testing import (
    TestCase,
    count_targets,
    mmgen_counters,
    run_tests,
    trace_and_apply,
)

SEARCHES = (aten.searchsorted.Tensor, aten.searchsorted.Scalar, aten.bucketize.Tensor,
            aten.bucketize.Scalar)
SLICES = [(1, None), (0, None), (2, 7), (3, -2), (-4, None), (5, 5), (6, 100), (0, 1),
          (9, None)]


def _boundaries(n: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n,), generator=g).cumsum(0)  # sorted, with repeats


def _search(a, b, right, int32):
    return lambda x, v: torch.searchsorted(x[a:b], v, right=right, out_int32=int32)


def _rewrite(fn, *args):
    return trace_and_apply(PASS, fn, *args)


class TestSearchsortedSliceGraph(TestCase):
    def test_every_slice_and_side_matches_eager(self):
        x = _boundaries()
        values = torch.arange(-2, int(x.max()) + 3).repeat_interleave(2)[None].float()[0]
        for (a, b), right, int32 in itertools.product(SLICES, (False, True), (False, True)):
            fn = _search(a, b, right, int32)
            with self.subTest(slice=(a, b), right=right, out_int32=int32):
                gm, n, counts, _ = _rewrite(fn, x, values)
                self.assertEqual(n, 1)
                self.assertEqual(counts["searchsorted_unsliced"], 1)
                out, ref = gm(x, values), fn(x, values)
                self.assertEqual(out.dtype, ref.dtype)
                self.assertEqual(out, ref, atol=0, rtol=0)

    def test_side_bucketize_scalar_and_through_clone(self):
        x, v = _boundaries(seed=1), torch.tensor([-1, 0, 2, 3, 7, 50])
        cases = {
            "side": lambda x, v: torch.searchsorted(x[2:], v, side="right"),
            "bucketize": lambda x, v: torch.bucketize(v, x[1:-1], right=True),
            "scalar": lambda x, v: torch.searchsorted(x[3:8], 4),
            "bucketize scalar": lambda x, v: torch.bucketize(4, x[3:]),
            "clone": lambda x, v: torch.searchsorted(x[1:].clone(), v),
            "slice of a slice": lambda x, v: torch.searchsorted(x[1:][2:6], v),
        }
        for name, fn in cases.items():
            with self.subTest(name):
                gm, n, _, _ = _rewrite(fn, x, v)
                self.assertGreaterEqual(n, 1)
                self.assertEqual(gm(x, v), fn(x, v), atol=0, rtol=0)
                # every search left in the graph reads the input itself
                for node in gm.graph.nodes:
                    if node.target in SEARCHES:
                        pos = 0 if node.target in SEARCHES[:2] else 1
                        self.assertEqual(node.args[pos].op, "placeholder")

    def test_event_detail(self):
        _, _, _, report = _rewrite(lambda x, v: torch.searchsorted(x[1:], v), _boundaries(),
                                   torch.arange(5))
        (event,) = report.events
        self.assertEqual((event.kind, event.detail), ("searchsorted_unsliced", "slice [1:]"))

    def test_must_not_fire(self):
        x, v = _boundaries(seed=2), torch.arange(6)
        m = torch.sort(torch.randint(0, 9, (3, 8), generator=torch.Generator().manual_seed(0)))[0]
        cases = {  # fn, args, recorded reason (None: nothing to record)
            "no slice": (lambda x, v: torch.searchsorted(x, v), (x, v), None),
            "sorter": (lambda x, v: torch.searchsorted(x[1:], v, sorter=torch.argsort(x[1:])),
                       (x, v), "sorter given"),
            "step": (lambda x, v: torch.searchsorted(x[::2], v), (x, v), "slice with step 2"),
            "2-D": (lambda m, v: torch.searchsorted(m[:, 1:], v.expand(3, 6).contiguous()),
                    (m, v), "more than one dimension"),
        }
        for name, (fn, args, reason) in cases.items():
            with self.subTest(name):
                gm, n, counts, report = _rewrite(fn, *args)
                self.assertEqual(n, 0)
                self.assertEqual(counts.get("searchsorted_unsliced", 0), 0)
                self.assertEqual(gm(*args), fn(*args), atol=0, rtol=0)
                if reason is None:
                    self.assertEqual(report.events, [])
                else:
                    self.assertEqual(counts["searchsorted_skipped"], 1)
                    self.assertIn(reason, report.events[0].detail)
                self.assertEqual(count_targets(gm, *SEARCHES), 1)


class TestSearchsortedSliceCompiled(TestCase):
    def _rows_to_sequence(self, offsets, rows):
        # jagged row -> sequence id, the way padded_to_jagged used to write it
        return torch.searchsorted(offsets[1:].contiguous(), rows, right=True)

    def test_backend_static_and_dynamic(self):
        for dynamic in (False, True):
            torch._dynamo.reset()
            fn = torch.compile(self._rows_to_sequence, backend="mmgen", dynamic=dynamic,
                               fullgraph=True)
            with self.subTest(dynamic=dynamic), mmgen_counters() as counts:
                for lengths in ([5, 64, 17, 1], [3, 0, 9, 2, 2]):
                    offsets = torch.tensor([0, *lengths]).cumsum(0)
                    rows = torch.arange(int(offsets[-1]))
                    self.assertEqual(fn(offsets, rows), self._rows_to_sequence(offsets, rows),
                                     atol=0, rtol=0)
                self.assertGreaterEqual(counts["searchsorted_unsliced"], 1)


if __name__ == "__main__":
    run_tests()
