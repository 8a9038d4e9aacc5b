"""Classifier-free guidance for Chameleon-style image generation, and captioning.

Chameleon generates an image token by token with three streams per prompt, decoded as one
batch (rows ``3j, 3j+1, 3j+2`` belong to prompt ``j``):

- full: ``bos, prompt..., boi``: text and image conditioning;
- image-only: ``bos, <the prompt's image spans only>, boi``: the text dropped;
- unconditioned: ``bos, boi``.

Each step the three rows' logits are combined into one guided row (Chameleon's defaults:
text scale 3.0, image scale 1.2)::

    guided = uncond + image_scale * (image - uncond) + text_scale * (full - image)

restricted to the image codes (every other id gets -inf), and the token chosen from it is
fed to all three rows. :class:`CFGLogitsProcessor` is that ``(3P, V) -> (P, V)`` map in
the contract of :func:`torch_mmgen_opt.generate`'s ``logits_processor``, so
``optimize(model, static_kv=True, max_batch_size=3 * P)`` + ``generate`` run the whole
guided batch as one static decode graph. :func:`generate_image_eager` is the reference:
plain model calls with the model's growing cache.

Shapes: ``P`` prompts, ``B = 3P`` rows, ``V`` vocabulary, ``n`` image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .sampling import greedy, sample

__all__ = [
    "CFGLogitsProcessor",
    "VocabRangeProcessor",
    "caption",
    "cfg_streams",
    "generate_image",
    "generate_image_eager",
    "restrict_to_range",
]

NUM_STREAMS = 3


def restrict_to_range(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``logits`` (B, V) with every id outside ``[start, end)`` set to -inf."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    keep = (ids >= start) & (ids < end)
    return logits.masked_fill(~keep, float("-inf"))


@dataclass(frozen=True, kw_only=True)
class CFGLogitsProcessor:
    """Classifier-free guidance over (full, image-only, unconditioned) row triples.

    Args:
        image_start, image_end: the image-code ids ``[image_start, image_end)``; the guided
            logits keep only those.
        text_scale: weight of (full - image-only).
        image_scale: weight of (image-only - unconditioned).

    ``__call__(input_ids (3P, L), logits (3P, V)) -> (P, V)`` float32.
    """

    image_start: int
    image_end: int
    text_scale: float = 3.0
    image_scale: float = 1.2

    def __post_init__(self) -> None:
        if not 0 <= self.image_start < self.image_end:
            raise ValueError(
                f"image ids must be a non-empty range, got [{self.image_start}, {self.image_end})"
            )

    @classmethod
    def for_model(cls, model: Any, **kwargs: Any) -> CFGLogitsProcessor:
        cfg = _chameleon_config(model)
        return cls(image_start=cfg.image_start, image_end=cfg.image_end, **kwargs)

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        B, V = logits.shape
        if B % NUM_STREAMS:
            raise ValueError(
                f"classifier-free guidance needs 3 rows per prompt (full, image-only, "
                f"unconditioned); got a batch of {B}. Build it with cfg_streams()"
            )
        full, image, uncond = logits.float().view(B // NUM_STREAMS, NUM_STREAMS, V).unbind(1)
        guided = uncond + self.image_scale * (image - uncond) + self.text_scale * (full - image)
        return restrict_to_range(guided, self.image_start, self.image_end)


@dataclass(frozen=True, kw_only=True)
class VocabRangeProcessor:
    """Keeps ids ``[start, end)`` only, every row (e.g. text ids while captioning)."""

    start: int
    end: int

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return restrict_to_range(logits.float(), self.start, self.end)


def _chameleon_config(model: Any) -> Any:
    base = getattr(model, "_orig_mod", model)
    cfg = getattr(base, "config", None)
    if cfg is None or not hasattr(cfg, "image_start"):
        raise TypeError(
            "expected a Chameleon model (torch_mmgen_opt.models.build('chameleon', ...)) or "
            f"its optimized form, got {type(base).__name__}"
        )
    return cfg


def _image_spans(prompt: torch.Tensor, boi: int, eoi: int) -> torch.Tensor:
    """The ``boi ... eoi`` spans of a 1-D prompt, concatenated (text dropped)."""
    keep, inside = [], False
    for tok in prompt.tolist():
        if tok == boi:
            inside = True
        if inside:
            keep.append(tok)
        if tok == eoi:
            inside = False
    return torch.tensor(keep, dtype=torch.long)


def cfg_streams(
    model: Any, prompts: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The three guidance streams of every prompt, left-padded into one batch.

    Args:
        prompts: P 1-D LongTensors of text ids, optionally with ``boi codes... eoi`` image
            spans (e.g. an image to edit); ``bos`` and the final ``boi`` are added here.
    Returns:
        ``input_ids (3P, L)`` and ``attention_mask (3P, L)`` (0 on the left padding),
        rows ``3j, 3j+1, 3j+2`` = full, image-only, unconditioned of prompt ``j``.
    """
    from ..models.chameleon import BOS_ID, PAD_ID

    cfg = _chameleon_config(model)
    rows = []
    for p in prompts:
        p = torch.as_tensor(p, dtype=torch.long).reshape(-1).cpu()
        head, tail = torch.tensor([BOS_ID]), torch.tensor([cfg.boi_id])
        rows += [
            torch.cat([head, p, tail]),
            torch.cat([head, _image_spans(p, cfg.boi_id, cfg.eoi_id), tail]),
            torch.cat([head, tail]),
        ]
    L = max(r.numel() for r in rows)
    input_ids = torch.stack([F.pad(r, (L - r.numel(), 0), value=PAD_ID) for r in rows])
    mask = torch.stack(
        [F.pad(torch.ones(r.numel(), dtype=torch.long), (L - r.numel(), 0)) for r in rows]
    )
    return input_ids, mask


def _choose(
    logits: torch.Tensor,
    strategy: str,
    temperature: float,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if strategy == "greedy":
        return greedy(logits)
    if strategy == "sample":
        return sample(logits, temperature=temperature, top_p=top_p, generator=generator)
    raise ValueError(f"strategy={strategy!r}; pass 'greedy' or 'sample'")


@torch.no_grad()
def generate_image_eager(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_tokens: int,
    processor: CFGLogitsProcessor,
    strategy: str = "sample",
    temperature: float = 0.7,
    top_p: float | None = 0.9,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The reference loop: prefill, then one model call per token with the model's own
    growing cache; RoPE positions start at each row's first real token.

    Args:
        input_ids, attention_mask: (3P, L) from :func:`cfg_streams`.
    Returns:
        (P, num_tokens) vocabulary ids of the image codes.
    """
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = attention_mask.to(device).bool()
    B = ids.shape[0]
    position_ids = (mask.long().cumsum(1) - 1).clamp_min(0)  # (B, L)
    out = model(ids, attention_mask=mask, position_ids=position_ids)
    past = out.past_key_values
    row_pos = mask.sum(1, keepdim=True)  # (B, 1): next position of each row
    logits = out.logits[:, -1].float()
    generated: list[torch.Tensor] = []
    for t in range(num_tokens):
        guided = processor(torch.cat([ids, *generated], dim=1), logits)  # (P, V)
        tok = _choose(guided, strategy, temperature, top_p, generator)  # (P,)
        tok = tok.repeat_interleave(B // guided.shape[0])[:, None]  # (B, 1)
        generated.append(tok)
        if t == num_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(tok, past, attention_mask=mask, position_ids=row_pos)
        past, row_pos = out.past_key_values, row_pos + 1
        logits = out.logits[:, -1].float()
    return torch.cat(generated, dim=1)[::NUM_STREAMS]


def generate_image(
    model: Any,
    prompts: Sequence[torch.Tensor],
    *,
    num_tokens: int | None = None,
    text_scale: float = 3.0,
    image_scale: float = 1.2,
    strategy: str = "sample",
    temperature: float = 0.7,
    top_p: float | None = 0.9,
    generator: torch.Generator | None = None,
    eager: bool = False,
) -> torch.Tensor:
    """Generate one image's worth of tokens per prompt with classifier-free guidance.

    Args:
        model: a Chameleon model, plain or returned by ``optimize(model, static_kv=True,
            max_batch_size=3 * len(prompts), max_seq_len=...)``.
        prompts: P 1-D LongTensors (see :func:`cfg_streams`).
        num_tokens: default ``config.image_seq_len``.
        eager: run :func:`generate_image_eager` instead of :func:`torch_mmgen_opt.generate`.
    Returns:
        (P, num_tokens) vocabulary ids; ``ids - config.image_start`` are the VQ codes.
    """
    cfg = _chameleon_config(model)
    n = cfg.image_seq_len if num_tokens is None else num_tokens
    processor = CFGLogitsProcessor.for_model(model, text_scale=text_scale, image_scale=image_scale)
    input_ids, mask = cfg_streams(model, prompts)
    if eager:
        return generate_image_eager(
            model, input_ids, mask, num_tokens=n, processor=processor, strategy=strategy,
            temperature=temperature, top_p=top_p, generator=generator,
        )
    from .generate import generate

    out = generate(
        model, input_ids, max_new_tokens=n, strategy=strategy, temperature=temperature,
        top_p=top_p, attention_mask=mask, logits_processor=processor, generator=generator,
    )  # (3P, n): each triple shares its tokens
    return out[::NUM_STREAMS]


def caption(
    model: Any,
    image_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    prompt: torch.Tensor | None = None,
    eager: bool = False,
) -> torch.Tensor:
    """Greedy image-to-text: ``bos boi image... eoi prompt...`` -> text ids (text logits
    only).

    Args:
        image_ids: (P, n) vocabulary ids of image codes.
        prompt: optional 1-D text ids after the image (e.g. "describe:").
    Returns:
        (P, max_new_tokens) text ids.
    """
    from ..models.chameleon import BOS_ID

    cfg = _chameleon_config(model)
    P = image_ids.shape[0]
    parts = [
        torch.full((P, 1), BOS_ID), torch.full((P, 1), cfg.boi_id), image_ids.cpu(),
        torch.full((P, 1), cfg.eoi_id),
    ]
    if prompt is not None:
        parts.append(torch.as_tensor(prompt).reshape(1, -1).expand(P, -1))
    input_ids = torch.cat(parts, dim=1).long()
    text_only = VocabRangeProcessor(start=0, end=cfg.text_vocab_size)
    if eager:
        return _greedy_eager(model, input_ids, max_new_tokens, text_only)
    from .generate import generate

    return generate(
        model, input_ids, max_new_tokens=max_new_tokens, strategy="greedy",
        logits_processor=text_only,
    )


@torch.no_grad()
def _greedy_eager(
    model: torch.nn.Module, input_ids: torch.Tensor, steps: int, processor: VocabRangeProcessor
) -> torch.Tensor:
    ids = input_ids.to(next(model.parameters()).device)
    out = model(ids)
    new: list[torch.Tensor] = []
    for t in range(steps):
        tok = greedy(processor(ids, out.logits[:, -1].float()))[:, None]
        new.append(tok)
        if t < steps - 1:
            out = model(tok, out.past_key_values)
    return torch.cat(new, dim=1)
