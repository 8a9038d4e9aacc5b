"""The decode runtime: :func:`generate` and the lower-level :class:`DecodeSession`.

A session owns a :class:`~torch_mmgen_opt.runtime.static_cache.StaticKVCache` and the
per-row bookkeeping of one request, all in device tensors:

- prefill pads the prompts on the left up to a *bucket* length (the smallest of
  ``prefill_buckets`` that holds them), so prompts of many lengths share a few graphs;
  padding slots are masked out and RoPE positions restart at 0 on each row's first real
  token, so a padded row computes what it would compute alone;
- every decode step then feeds ``(B, 1)`` tokens with the same input shapes and the
  write slot in a device tensor that is bumped in place: one graph for every step, which
  CUDA graphs replay on GPU (the slot tensor and the cache are static addresses).

Two model conventions are driven:

- the reference models (``torch_mmgen_opt.models``): ``forward(input_ids,
  past_key_values, cache_position, attention_mask (B, S) bool, position_ids)``;
- Hugging Face causal LMs (``transformers.LlamaForCausalLM`` ...): the cache is passed as
  ``cache`` (transformers >= 5, else ``past_key_values``) with its write slots in
  ``cache.write_position``, and the session builds the 4-D additive mask
  ``(B, 1, T, S)`` itself, which transformers uses as is.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .sampling import greedy as _greedy
from .sampling import sample as _sample
from .static_cache import StaticKVCache

log = logging.getLogger("torch_mmgen_opt")

__all__ = ["DecodeSession", "default_buckets", "generate"]

_STRATEGIES = ("greedy", "sample", "beam")
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_buckets(max_seq_len: int) -> tuple[int, ...]:
    """Powers of two up to ``max_seq_len`` (and ``max_seq_len`` itself)."""
    buckets, b = [], 1
    while b < max_seq_len:
        buckets.append(b)
        b *= 2
    buckets.append(max_seq_len)
    return tuple(buckets)


def _model_kind(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "n_layers"):
        return "mmgen"
    if hasattr(model, "generation_config") or hasattr(cfg, "num_hidden_layers"):
        return "hf"
    raise TypeError(
        f"generate() drives the reference models and Hugging Face causal LMs; "
        f"{type(model).__name__} is neither (see docs/generation.md, 'Other models')"
    )


class DecodeSession:
    """Prefill + one-token decode steps over a static KV cache, for one request at a
    time.

    Args:
        model: the module to call: an optimized (compiled) model or a plain one. Its
            underlying module (``_orig_mod`` if compiled) must be a reference model or a
            Hugging Face causal LM.
        max_batch_size, max_seq_len: size of the cache to allocate when ``cache`` is
            ``None``.
        prefill_buckets: prompt lengths are left-padded up to the next bucket; ``None``
            picks :func:`default_buckets`.
        cache: a :class:`StaticKVCache` to use (e.g. the one ``optimize(static_kv=True)``
            installed).
        limit_hint: how to raise the limits, quoted in ``ValueError`` messages.

    Use::

        s = DecodeSession(model, max_batch_size=2, max_seq_len=512)
        logits = s.prefill(input_ids, attention_mask)   # (B, V) float32, last position
        for _ in range(n):
            tok = logits.argmax(-1, keepdim=True)        # (B, 1)
            logits = s.decode(tok)                        # (B, V)

    ``s.reorder_(beam_idx)`` moves rows (cache, positions, mask) for beam search;
    ``s.cache`` is the cache; ``s.length`` the slots used (host int).
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch_size: int = 1,
        max_seq_len: int = 2048,
        prefill_buckets: Sequence[int] | None = None,
        cache: StaticKVCache | None = None,
        limit_hint: str = "",
    ) -> None:
        self.model = model
        self.base = getattr(model, "_orig_mod", model)
        self.kind = _model_kind(self.base)
        if cache is None:
            cache = StaticKVCache.for_model(
                self.base, max_batch_size=max_batch_size, max_seq_len=max_seq_len
            )
        self.cache = cache
        self.max_batch_size = cache.max_batch_size
        self.max_seq_len = cache.max_seq_len
        buckets = tuple(sorted({int(b) for b in (prefill_buckets or ())}))
        self.buckets = tuple(b for b in buckets if b <= self.max_seq_len) or default_buckets(
            self.max_seq_len
        )
        self.limit_hint = limit_hint
        self.device = cache.device
        self.cuda_graph_steps = self.device.type == "cuda" and model is not self.base
        if self.kind == "hf":
            params = inspect.signature(self.base.forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
            self._logits_to_keep = "logits_to_keep" in params
            # transformers < 5.2x take cache_position (else they derive it from a host int).
            self._pass_cache_position = "cache_position" in params
        # Decode write slot (1,): bumped in place, a static address for CUDA graphs.
        self._slot = torch.zeros(1, dtype=torch.long, device=self.device)
        torch._dynamo.mark_static_address(self._slot)
        self._key_pos = torch.arange(self.max_seq_len, device=self.device)
        self.batch_size = 0
        self.length = 0
        self._valid: torch.Tensor | None = None  # (B, S) bool: slots a query may attend
        self._row_pos: torch.Tensor | None = None  # (B, 1) long: next RoPE position per row

    # ----------------------------------------------------------------- checks

    def check(self, batch_size: int, prompt_len: int, max_new_tokens: int) -> None:
        """``ValueError`` (before any work) if a request does not fit the cache."""
        hint = self.limit_hint
        if batch_size < 1 or prompt_len < 1:
            raise ValueError(
                f"empty prompt: input_ids has shape ({batch_size}, {prompt_len}); pass at "
                "least one token per row (e.g. the BOS token)"
            )
        if batch_size > self.max_batch_size:
            raise ValueError(
                f"batch of {batch_size} rows (beam search: batch x num_beams) exceeds "
                f"max_batch_size={self.max_batch_size}; raise it"
                f"{hint.replace('{what}', f'max_batch_size={batch_size}')}"
            )
        need = prompt_len + max_new_tokens
        if need > self.max_seq_len:
            raise ValueError(
                f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {need} "
                f"exceeds max_seq_len={self.max_seq_len}; raise it"
                f"{hint.replace('{what}', f'max_seq_len={need}')} or generate fewer tokens"
            )

    def bucket_for(self, prompt_len: int, max_new_tokens: int = 1) -> int:
        """The padded prompt length: the smallest bucket >= ``prompt_len``, shrunk if
        needed so that ``max_new_tokens - 1`` decode slots still fit."""
        room = self.max_seq_len - max_new_tokens + 1
        bucket = next((b for b in self.buckets if b >= prompt_len), self.max_seq_len)
        return max(prompt_len, min(bucket, room))

    # ----------------------------------------------------------------- steps

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 1,
    ) -> torch.Tensor:
        """Run the prompts; returns the logits of each row's last token, (B, V) float32.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens and 0 for padding (left, right or
                anywhere: real tokens keep their order); ``None`` means none.
            max_new_tokens: tokens to be generated after it, for the bucket choice.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        self.check(B, T, max_new_tokens)
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=self.device)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids "
                    f"shape {tuple(input_ids.shape)}"
                )
            mask = attention_mask.to(self.device).bool()
            # Real tokens to the right, in order (a stable sort puts padding first).
            order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
            input_ids, mask = input_ids.gather(1, order), mask.gather(1, order)
        Tb = self.bucket_for(T, max_new_tokens)
        input_ids = F.pad(input_ids, (Tb - T, 0), value=0)  # (B, Tb)
        mask = F.pad(mask, (Tb - T, 0), value=False)
        lengths = mask.sum(dim=1, keepdim=True)  # (B, 1)
        steps = torch.arange(Tb, device=self.device)
        position_ids = (steps[None, :] - (Tb - lengths)).clamp_min(0)  # (B, Tb)
        self._valid = F.pad(mask, (0, self.max_seq_len - Tb), value=False)  # (B, S)
        self._row_pos = lengths.clone()
        self.batch_size = B
        self.cache.write_position = None
        self._mark_prefill_dynamic(input_ids, position_ids, steps)
        logits = self._forward(input_ids, steps, position_ids)
        self.length = Tb
        self.cache.set_seq_length(Tb)
        self._slot.fill_(Tb)
        return logits

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step: ``tokens`` (B, 1) -> logits (B, V) float32 of the next token."""
        if self._valid is None:
            raise RuntimeError("DecodeSession.decode() before prefill()")
        if tokens.shape != (self.batch_size, 1):
            raise ValueError(f"tokens must be ({self.batch_size}, 1), got {tuple(tokens.shape)}")
        if self.length >= self.max_seq_len:
            raise ValueError(
                f"the cache is full ({self.max_seq_len} slots); raise max_seq_len"
                f"{self.limit_hint.replace('{what}', f'max_seq_len={2 * self.max_seq_len}')}"
            )
        self._valid.index_fill_(1, self._slot, True)
        logits = self._forward(tokens.to(self.device), self._slot, self._row_pos)
        self._slot.add_(1)
        self._row_pos.add_(1)
        self.length += 1
        self.cache.set_seq_length(self.length)
        return logits

    @torch.no_grad()
    def reorder_(self, beam_idx: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``beam_idx[i]`` (cache, mask, positions), in place
        for the cache; ``len(beam_idx)`` may exceed the current batch (expansion to
        beams after a prefill)."""
        beam_idx = beam_idx.to(self.device)
        self.cache.reorder_(beam_idx, compiled=self.cuda_graph_steps)
        self._valid = self._valid.index_select(0, beam_idx)
        self._row_pos = self._row_pos.index_select(0, beam_idx)
        self.batch_size = beam_idx.shape[0]

    # ----------------------------------------------------------------- internals

    def _mark_prefill_dynamic(self, *tensors: torch.Tensor) -> None:
        # One prefill graph for every bucket > 1 instead of one per bucket (a hint:
        # ignored under dynamic=False, where the graphs stay one per bucket).
        if tensors[0].shape[1] > 1:
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, t.dim() - 1)

    def _forward(
        self, input_ids: torch.Tensor, cache_position: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.cuda_graph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        if self.kind == "mmgen":
            out = self.model(
                input_ids,
                past_key_values=self.cache,
                cache_position=cache_position,
                attention_mask=self._valid,
                position_ids=position_ids,
            )
        else:
            allowed = self._valid[:, None, None, :] & (
                self._key_pos[None, :] <= cache_position[:, None]
            )  # (B, 1, T, S)
            dtype = self.cache.dtype
            mask = torch.zeros((), dtype=dtype, device=self.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
            self.cache.write_position = cache_position
            kwargs: dict[str, Any] = {self._cache_kw: self.cache, "use_cache": True}
            if self._logits_to_keep:
                kwargs["logits_to_keep"] = 1
            if self._pass_cache_position:
                kwargs["cache_position"] = cache_position
            out = self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs
            )
        logits = out.logits if hasattr(out, "logits") else out[0]
        logits = logits[:, -1].float()  # (B, V)
        # CUDA-graph outputs are overwritten by the next replay: own a copy.
        return logits.clone() if self.cuda_graph_steps else logits


# --------------------------------------------------------------------------- generate


def _session_for(model: Any, rows: int, prompt_len: int, max_new_tokens: int) -> DecodeSession:
    config = getattr(model, "_mmgen_config", None)
    base = getattr(model, "_orig_mod", model)
    cache = getattr(base, "_mmgen_static_cache", None)
    if config is not None and config.static_kv and cache is not None:
        session = getattr(model, "_mmgen_session", None)
        if session is None:
            session = DecodeSession(
                model,
                cache=cache,
                prefill_buckets=config.prefill_buckets,
                limit_hint=" with optimize(model, static_kv=True, {what})",
            )
            model._mmgen_session = session
        return session
    # Not optimized with static_kv: a cache sized for this request, run as given.
    if rows < 1 or prompt_len < 1:
        raise ValueError(
            f"empty prompt: input_ids has shape ({rows}, {prompt_len}); pass at least one "
            "token per row (e.g. the BOS token)"
        )
    return DecodeSession(
        model,
        max_batch_size=rows,
        max_seq_len=prompt_len + max_new_tokens,
        prefill_buckets=(prompt_len,),
    )


def _check_args(
    strategy: str, max_new_tokens: int, temperature: float, top_k: Any, top_p: Any, num_beams: int
) -> None:
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; pass one of {_STRATEGIES}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if strategy == "sample" and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}; use greedy")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if strategy == "beam" and (not isinstance(num_beams, int) or num_beams < 1):
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")


def _eos_tensor(eos_token_id: Any, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        return None
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    strategy: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 4,
    eos_token_id: int | Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    logits_processor: LogitsProcessor | None = None,
    generator: torch.Generator | None = None,
    speculative: Any = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (B, T).

    Works on a model returned by ``optimize(model, static_kv=True, ...)`` (its installed
    cache, bucketed prefill graphs and one decode graph) and on a plain reference model or
    Hugging Face causal LM (a cache sized for the request, run eagerly).

    Args:
        strategy: ``"greedy"``, ``"sample"`` (``temperature``, ``top_k``, ``top_p``,
            ``generator``) or ``"beam"`` (``num_beams``; the best beam by summed
            log-probability is returned).
        eos_token_id: an id or ids; a row stops there and is filled with the first id
            afterwards; the result is cut after the step where every row has stopped.
        attention_mask: (B, T), 0 marks padding (any side) in a batch of different lengths.
        logits_processor: ``f(ids_so_far (B, T + t), logits (B, V) float32) -> (B', V)``;
            ``B'`` divides ``B`` and the token chosen for row ``j`` is shared by rows
            ``j*g .. (j+1)*g - 1`` (``g = B // B'``; classifier-free guidance).
        speculative: a :class:`~torch_mmgen_opt.LayerSkip` config: self-speculative
            decoding (``torch_mmgen_opt.runtime.speculative``).

    Returns:
        (B, n_new) long, ``n_new <= max_new_tokens``.
    """
    if speculative is not None:
        try:
            from .speculative import generate_speculative
        except ImportError as exc:
            raise NotImplementedError(
                "speculative decoding (torch_mmgen_opt.runtime.speculative) is not available"
            ) from exc
        return generate_speculative(
            model, input_ids, config=speculative, max_new_tokens=max_new_tokens,
            strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p,
            num_beams=num_beams, eos_token_id=eos_token_id, attention_mask=attention_mask,
            logits_processor=logits_processor, generator=generator,
        )
    _check_args(strategy, max_new_tokens, temperature, top_k, top_p, num_beams)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, length) LongTensor")
    B, T = input_ids.shape
    rows = B * num_beams if strategy == "beam" else B
    session = _session_for(model, rows, T, max_new_tokens)
    session.check(rows, T, max_new_tokens)
    eos = _eos_tensor(eos_token_id, session.device)
    if strategy == "beam":
        return _beam_search(
            session, input_ids, attention_mask, max_new_tokens, num_beams, eos, logits_processor
        )

    def choose(logits: torch.Tensor) -> torch.Tensor:
        if strategy == "greedy":
            return _greedy(logits)
        return _sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    prompt = input_ids.to(session.device)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=session.device)
    finished = torch.zeros(B, dtype=torch.bool, device=session.device)
    logits = session.prefill(input_ids, attention_mask, max_new_tokens=max_new_tokens)
    n = max_new_tokens
    for t in range(max_new_tokens):
        tok = _choose_grouped(logits, prompt, out[:, :t], logits_processor, choose, B)
        if eos is not None:
            tok = torch.where(finished, eos[0], tok)
            finished |= torch.isin(tok, eos)
        out[:, t] = tok
        if t == max_new_tokens - 1:
            break
        # Stop early when every row is done: one host sync every 8 steps.
        if eos is not None and (t + 1) % 8 == 0 and bool(finished.all()):
            n = t + 1
            break
        logits = session.decode(tok[:, None])
    out = out[:, :n]
    if eos is not None:
        # Cut after the first step at which every row had stopped.
        done = torch.isin(out, eos).cummax(dim=1).values.all(dim=0)  # (n,)
        if bool(done.any()):
            out = out[:, : int(done.int().argmax()) + 1]
    return out


def _choose_grouped(
    logits: torch.Tensor,
    prompt: torch.Tensor,
    generated: torch.Tensor,
    processor: LogitsProcessor | None,
    choose: Callable[[torch.Tensor], torch.Tensor],
    B: int,
) -> torch.Tensor:
    if processor is None:
        return choose(logits)
    logits = processor(torch.cat([prompt, generated], dim=1), logits)
    groups = logits.shape[0]
    if groups < 1 or B % groups:
        raise ValueError(
            f"logits_processor returned {groups} rows for a batch of {B}; return B rows or "
            "B // g rows (one per group of g streams)"
        )
    tok = choose(logits.float())
    return tok.repeat_interleave(B // groups) if groups != B else tok


def _beam_search(
    session: DecodeSession,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    K: int,
    eos: torch.Tensor | None,
    processor: LogitsProcessor | None,
) -> torch.Tensor:
    """Beam search: (B, n) tokens of the best of ``K`` beams by summed log-probability.

    Each step takes the top ``K`` of the ``K * V`` continuations of every prompt, then
    moves the cache rows to the chosen parents with one in-place gather
    (:meth:`DecodeSession.reorder_`). A beam that emitted ``eos`` only extends with
    ``eos`` at no cost, so its score is frozen.
    """
    B, T = input_ids.shape
    dev = session.device
    logits = session.prefill(input_ids, attention_mask, max_new_tokens=max_new_tokens)  # (B, V)
    expand = torch.arange(B, device=dev).repeat_interleave(K)  # prompt b -> beams b*K..
    session.reorder_(expand)
    logits = logits.index_select(0, expand)  # (B*K, V)
    prompt = input_ids.to(dev).index_select(0, expand)
    V = logits.shape[-1]
    if V < K:
        raise ValueError(f"num_beams={K} exceeds the vocabulary size {V}")
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start equal: expand only the first
    scores = scores.view(-1)
    history = torch.empty(B * K, max_new_tokens, dtype=torch.long, device=dev)
    finished = torch.zeros(B * K, dtype=torch.bool, device=dev)
    base = (torch.arange(B, device=dev) * K)[:, None]  # (B, 1)
    for t in range(max_new_tokens):
        if processor is not None:
            logits = processor(torch.cat([prompt, history[:, :t]], dim=1), logits)
            if logits.shape[0] != B * K:
                raise ValueError("with strategy='beam' the logits_processor must keep every row")
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        if eos is not None:
            frozen = torch.full_like(logprobs, float("-inf")).index_fill_(1, eos[:1], 0.0)
            logprobs = torch.where(finished[:, None], frozen, logprobs)
        cand = (scores[:, None] + logprobs).view(B, K * V)
        top_scores, top_idx = cand.topk(K, dim=1)  # (B, K)
        parent = (base + top_idx // V).view(-1)  # (B*K,) row of the parent beam
        tok = (top_idx % V).view(-1)
        history = history.index_select(0, parent)
        history[:, t] = tok
        scores = top_scores.view(-1)
        if eos is not None:
            finished = finished.index_select(0, parent) | torch.isin(tok, eos)
        if t == max_new_tokens - 1:
            break
        session.reorder_(parent)
        prompt = prompt.index_select(0, parent)
        logits = session.decode(tok[:, None])
    best = scores.view(B, K).argmax(dim=1)  # (B,)
    return history.view(B, K, -1)[torch.arange(B, device=dev), best]
