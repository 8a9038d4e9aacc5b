"""Token choice from logits without host syncs: greedy, temperature / top-k / top-p
sampling.

Every function here is a chain of device ops: no ``.item()``, no ``torch.multinomial``
with data-dependent checks, no Python branch on a tensor value, so a generation loop
never waits for the device between steps. Sampling draws ``q ~ Exp(1)`` and takes
``argmax(p / q)``, which picks index ``i`` with probability ``p_i`` (the exponential race).

Shapes: ``logits`` is ``(B, V)`` float32, the result ``(B,)`` long.
"""

from __future__ import annotations

import torch

__all__ = ["apply_top_k", "apply_top_p", "greedy", "sample"]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) the argmax token of each row."""
    return logits.argmax(dim=-1)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties at the k-th value kept), -inf
    elsewhere."""
    k = min(int(k), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass
    reaches ``p`` (the most likely token is always kept), -inf elsewhere."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row of ``logits`` (B, V) float32 -> (B,) long.

    ``temperature`` divides the logits; ``top_k`` / ``top_p`` filter them first (both may
    be given: top-k, then top-p). ``generator`` makes it reproducible; it must live on
    ``logits.device``.
    """
    logits = logits.float() / temperature
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)
