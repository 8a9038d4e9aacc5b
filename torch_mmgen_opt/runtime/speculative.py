"""LayerSkip self-speculative decoding: draft with the first ``E`` layers, verify with the
rest, lossless.

One round, at position ``p`` with the last chosen token ``t0`` (batch 1):

1. **draft**: ``d`` calls of the draft step (layers ``0..E-1``, the final norm and the
   shared head; ``T = 1``) propose ``x1..xd``; each call writes its token's keys/values of
   layers ``0..E-1`` into the cache at ``p + j`` and returns its layer-``E`` hidden state.
   One more draft call on ``xd`` writes its first-``E``-layer entries and hidden state.
2. **verify**: one call of the verify step (layers ``E..L-1``, norm, head; ``T = d + 1``)
   continues from those ``d + 1`` hidden states: the first ``E`` layers' cache entries
   written while drafting are *reused*, not recomputed. It writes layers ``E..L-1`` at
   ``p..p+d`` and returns the full model's logits for the ``d + 1`` positions.
3. **accept**: greedy keeps the longest prefix of drafts equal to the full model's argmax
   plus the full model's next token; sampling uses the accept/reject rule of speculative
   sampling (accept ``x`` with probability ``min(1, p(x) / q(x))``, on rejection draw from
   ``norm(max(0, p - q))``, after ``d`` acceptances draw from ``p``), which keeps the full
   model's distribution (after temperature / top-k / top-p) exactly.
4. **roll back by position**: nothing is copied or freed; the next round starts at the
   first unverified position and rewrites every slot it reads before reading it (the mask
   built from ``cache_position`` hides the slots beyond).

Both steps come from *graphs*: the model is captured once per shape by Dynamo (with the
static cache, ``fullgraph=True``, static shapes) and ``passes/skip_layers.py`` derives the
draft and verify graphs from that capture (no change to the model's code). With
``compile=True`` each derived graph goes through the ``"mmgen"`` backend once and is then
called directly with its flat inputs, so a run makes no Dynamo call and never recompiles;
with ``compile=False`` the same graphs run eagerly (tests). The prompt is prefilled by the
eager module.

Greedy output equals plain greedy decoding of the full model token for token, as long as
the full model's logits for a position do not depend on how many positions are computed
together (``T = d + 1`` versus ``T = 1``): true up to floating-point reduction order, which
can only matter at an exact near-tie of the top two logits.

Models: the reference decoders of :mod:`torch_mmgen_opt.models` (``forward(input_ids,
past_key_values, cache_position)``, masking by ``cache_position``). Batch 1.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..config import LayerSkip, OptimizeConfig
from ..graph_utils import PassReport, graph_snapshot
from ..passes import skip_layers
from .sampling import apply_top_k, apply_top_p
from .static_cache import StaticKVCache, cache_dims

log = logging.getLogger("torch_mmgen_opt")

__all__ = [
    "SpeculativeDecoder",
    "SpeculativeStats",
    "attach_draft",
    "decoder_for",
    "generate_speculative",
]


@dataclass
class SpeculativeStats:
    """What the last :meth:`SpeculativeDecoder.generate` did."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Drafted tokens accepted / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else float("nan")


@dataclass
class _Capture:
    gm: fx.GraphModule
    inputs: list[Any]
    ids_slot: int
    pos_slot: int


@dataclass
class _Step:
    """A derived graph called directly with the captured flat inputs, two of them swapped."""

    fn: Callable[..., Any]
    inputs: list[Any]
    ids_slot: int
    pos_slot: int
    calls: int = 0

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, *extra: torch.Tensor) -> Any:
        args = list(self.inputs)
        args[self.ids_slot] = ids
        args[self.pos_slot] = pos
        self.calls += 1
        return self.fn(*args, *extra)


class SpeculativeDecoder:
    """Self-speculative decoding of one reference decoder with its own static cache.

    Captures and compiled steps are cached per shape and exit layer, so one decoder serves
    any ``(exit_layer, num_speculations)`` and repeated requests compile nothing new.

    Args:
        model: a reference decoder or the module returned by ``optimize`` (its original
            module is captured; its :class:`OptimizeConfig` is used to compile).
        max_seq_len: cache slots: prompt + new tokens + ``num_speculations + 1``.
        compile: compile the derived graphs with the ``"mmgen"`` backend (else run them
            eagerly).
        config: the :class:`OptimizeConfig` to compile with (default: the model's).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_seq_len: int,
        compile: bool = True,
        config: OptimizeConfig | None = None,
    ) -> None:
        self.module = getattr(model, "_orig_mod", model)
        dims = cache_dims(self.module)
        if dims is None:
            raise TypeError(
                f"speculative decoding needs a decoder whose config gives (n_layers, "
                f"n_kv_heads, head_dim); got {type(self.module).__name__}"
            )
        self.num_layers, n_kv, head_dim = dims
        param = next(self.module.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = max_seq_len
        self.cache = StaticKVCache(
            self.num_layers, 1, n_kv, max_seq_len, head_dim, dtype=self.dtype, device=self.device
        )
        self.compile = compile
        self.config = config or getattr(model, "_mmgen_config", None) or OptimizeConfig()
        self.report = PassReport()
        self._captures: dict[int, _Capture] = {}
        self._steps: dict[tuple[str, int, int], _Step] = {}
        self._hidden: dict[int, torch.Tensor] = {}
        self.stats = SpeculativeStats()

    # ------------------------------------------------------------------ graphs

    def _capture(self, T: int) -> _Capture:
        if T in self._captures:
            return self._captures[T]
        if T + 1 > self.max_seq_len:
            raise ValueError(f"max_seq_len={self.max_seq_len} is too short for {T} tokens a step")
        ids = torch.zeros(1, T, dtype=torch.long, device=self.device)
        # The slots at the very end, put back afterwards.
        pos = torch.arange(self.max_seq_len - T, self.max_seq_len, device=self.device)
        got: list[tuple[fx.GraphModule, list[Any]]] = []

        def capture_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
            got.append((gm, list(example_inputs)))
            return gm.forward

        traced = torch.compile(self.module, backend=capture_backend, fullgraph=True, dynamic=False)
        bufs = [*self.cache.key_cache, *self.cache.value_cache]
        saved = [b[:, :, -T:].clone() for b in bufs]
        with torch.no_grad():
            traced(ids, past_key_values=self.cache, cache_position=pos)
            for b, s in zip(bufs, saved):  # capturing leaves the cache as it was
                b[:, :, -T:] = s
        if len(got) != 1:
            raise RuntimeError(
                f"capturing {type(self.module).__name__} gave {len(got)} graphs (Dynamo's "
                "recompile limit for its forward may be reached: torch._dynamo.reset())"
            )
        gm, inputs = got[0]
        slots = [next((i for i, t in enumerate(inputs) if t is x), None) for x in (ids, pos)]
        if None in slots:
            raise ValueError(
                "speculative decoding: the captured graph does not read input_ids and "
                "cache_position as inputs; the model must take forward(input_ids, "
                "past_key_values=..., cache_position=...)"
            )
        cap = _Capture(gm, inputs, slots[0], slots[1])
        self._captures[T] = cap
        return cap

    def step(self, kind: str, exit_layer: int, T: int, *, compile: bool | None = None) -> _Step:
        """The ``"draft"`` step (``(ids, pos) -> (logits, h_exit)``) or ``"verify"`` step
        (``(ids, pos, h_exit) -> (logits,)``) for ``T`` tokens, built (and compiled, with
        ``compile``, default the decoder's) once."""
        compile = self.compile if compile is None else compile
        key = (kind, exit_layer, T, compile)
        if key in self._steps:
            return self._steps[key]
        cap = self._capture(T)
        graph = graph_snapshot(cap.gm.graph)
        inputs = list(cap.inputs)
        if kind == "draft":
            _, cut = skip_layers.draft_graph_(graph, exit_layer, speculative_outputs=True)
            torch._dynamo.utils.counters["mmgen"]["layers_skipped"] += cut
            self.report.events.append(_event(kind, exit_layer, self.num_layers, cut))
        elif kind == "verify":
            skip_layers.verify_graph_(graph, exit_layer)
            inputs.append(self.hidden_buffer(T))
        else:
            raise ValueError(f"step kind must be 'draft' or 'verify', got {kind!r}")
        gm = fx.GraphModule(cap.gm, graph)
        fn: Callable[..., Any] = gm
        if compile:
            from ..api import mmgen_backend

            with torch.no_grad():
                fn = mmgen_backend(gm, inputs, config=self.config, report=self.report)
        step = _Step(fn, inputs[: len(cap.inputs)], cap.ids_slot, cap.pos_slot)
        self._steps[key] = step
        return step

    def hidden_buffer(self, T: int) -> torch.Tensor:
        """The static (1, T, dim) buffer the draft steps fill and the verify step reads."""
        if T not in self._hidden:
            cfg = self.module.config
            dim = getattr(cfg, "dim", None) or cfg.hidden_size
            self._hidden[T] = torch.zeros(1, T, dim, dtype=self.dtype, device=self.device)
        return self._hidden[T]

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (1, P) through the eager module into the cache at ``0..P-1``;
        returns the last position's logits (1, V) float32."""
        P = input_ids.shape[1]
        pos = torch.arange(P, device=self.device)
        out = self.module(input_ids.to(self.device), past_key_values=self.cache, cache_position=pos)
        return out.logits[:, -1].float()

    def _check(self, input_ids: torch.Tensor, max_new_tokens: int, d: int) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (1, length) LongTensor")
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"speculative decoding runs batch 1, got batch {input_ids.shape[0]}; call it "
                "once per row"
            )
        need = input_ids.shape[1] + max_new_tokens + d + 1
        if need > self.max_seq_len:
            raise ValueError(
                f"prompt {input_ids.shape[1]} + max_new_tokens {max_new_tokens} + "
                f"num_speculations {d} + 1 = {need} exceeds this decoder's max_seq_len "
                f"{self.max_seq_len}; build it with a larger max_seq_len"
            )

    @torch.no_grad()
    def speculate(
        self,
        token: int,
        pos: int,
        layer_skip: LayerSkip,
        *,
        strategy: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        compile: bool | None = None,
    ) -> tuple[int, list[int]]:
        """One round: ``token`` is the last chosen token, to be written at ``pos`` (every
        slot before ``pos`` holds verified entries). Drafts ``d`` tokens, verifies them and
        returns ``(accepted drafts, new tokens)``; ``len(new) == accepted + 1``. The next
        round starts with ``new[-1]`` at ``pos + accepted + 1``. Writes only slots
        ``pos..pos+d``."""
        E, d = layer_skip.exit_layer, layer_skip.num_speculations
        draft = self.step("draft", E, 1, compile=compile)
        verify = self.step("verify", E, d + 1, compile=compile)
        hidden = self.hidden_buffer(d + 1)
        greedy = strategy == "greedy"
        tok = _token_tensor(token, self.device)
        drafted, q_rows = [tok], []
        for j in range(d + 1):
            logits, h = draft(tok, torch.tensor([pos + j], device=self.device))
            hidden[:, j].copy_(h[:, 0])
            if j == d:
                break  # this call only wrote xd's first-E-layer entries and hidden state
            logits = logits[:, -1].float()  # (1, V)
            if greedy:
                tok = logits.argmax(-1, keepdim=True)
            else:
                q = _probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
                q_rows.append(q)
                tok = _draw(q, generator).view(1, 1)
            drafted.append(tok)
        ids = torch.cat(drafted, dim=1)  # (1, d+1): token, x1..xd
        (vlogits,) = verify(ids, torch.arange(pos, pos + d + 1, device=self.device), hidden)
        vlogits = vlogits[0].float()  # (d+1, V)
        xs = ids[0, 1:]
        if greedy:
            target = vlogits.argmax(-1)  # (d+1,)
            n_acc = int((xs == target[:d]).int().cumprod(0).sum())
            return n_acc, xs[:n_acc].tolist() + [int(target[n_acc])]
        p = _probs(vlogits, temperature=temperature, top_k=top_k, top_p=top_p)
        n_acc, last = _accept_reject(xs, torch.cat(q_rows), p, generator)
        return n_acc, xs[:n_acc].tolist() + [last]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        layer_skip: LayerSkip,
        *,
        max_new_tokens: int,
        strategy: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        compile: bool | None = None,
    ) -> torch.Tensor:
        """Self-speculative generation after ``input_ids`` (1, P): (1, n_new) long."""
        E, d = layer_skip.exit_layer, layer_skip.num_speculations
        if E > self.num_layers:
            raise ValueError(
                f"LayerSkip.exit_layer={E} exceeds the model's {self.num_layers} layers; pass "
                f"1 <= exit_layer <= {self.num_layers}"
            )
        if strategy not in ("greedy", "sample"):
            raise ValueError(
                f"speculative decoding supports strategy 'greedy' or 'sample', got {strategy!r}"
            )
        self._check(input_ids, max_new_tokens, d)
        eos = _eos_set(eos_token_id)
        stats = SpeculativeStats()
        self.stats = stats
        logits = self.prefill(input_ids)
        if strategy == "greedy":
            first = int(logits.argmax(-1))
        else:
            first = int(_draw(_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p), generator))
        out = [first]
        pos = input_ids.shape[1]  # where out[-1] goes
        while len(out) < max_new_tokens and out[-1] not in eos:
            n_acc, new = self.speculate(
                out[-1], pos, layer_skip, strategy=strategy, temperature=temperature,
                top_k=top_k, top_p=top_p, generator=generator, compile=compile,
            )
            stats.rounds += 1
            stats.drafted += d
            stats.accepted += n_acc
            for t in new:
                out.append(t)
                if len(out) >= max_new_tokens or t in eos:
                    break
            pos += n_acc + 1
        stats.tokens = len(out)
        return torch.tensor([out], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def generate_plain(
        self, input_ids: torch.Tensor, *, max_new_tokens: int, compile: bool | None = None
    ) -> torch.Tensor:
        """Plain greedy decoding with the full model's ``T = 1`` graph (the baseline)."""
        self._check(input_ids, max_new_tokens, 0)
        full = self.step("draft", self.num_layers, 1, compile=compile)
        tok = self.prefill(input_ids).argmax(-1, keepdim=True)
        out = [tok]
        pos = input_ids.shape[1]
        for _ in range(max_new_tokens - 1):
            logits, _ = full(tok, torch.tensor([pos], device=self.device))
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
            pos += 1
        return torch.cat(out, dim=1)


def _token_tensor(token: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([[token]], dtype=torch.long, device=device)


def _event(kind: str, exit_layer: int, num_layers: int, cut: int) -> Any:
    from ..graph_utils import PassEvent

    return PassEvent(
        "skip_layers", "dynamo", "draft_graph", f"{kind} step",
        f"exit after layer {exit_layer} of {num_layers}, {cut} layer(s) cut",
    )


def _eos_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def _probs(
    logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """(N, V) logits -> (N, V) float32 probabilities after temperature / top-k / top-p."""
    logits = logits.float() / temperature
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    return logits.softmax(-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(1, V) -> (1,) one token drawn from ``probs``."""
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def _accept_reject(
    drafted: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative sampling: ``drafted`` (d,) drawn from ``q`` (d, V); ``p`` (d+1, V) the
    full model's. Returns (number accepted, the token that follows them)."""
    d = drafted.shape[0]
    idx = torch.arange(d, device=drafted.device)
    p_x, q_x = p[idx, drafted], q[idx, drafted]
    u = torch.rand(d, generator=generator, device=drafted.device)
    ok = (u * q_x < p_x).int()  # accept with probability min(1, p/q)
    n_acc = int(ok.cumprod(0).sum())
    if n_acc == d:
        return n_acc, int(_draw(p[d : d + 1], generator))
    residual = (p[n_acc] - q[n_acc]).clamp_min(0)
    if float(residual.sum()) <= 0:  # p == q on every token: any rejection came from p
        residual = p[n_acc]
    return n_acc, int(_draw((residual / residual.sum())[None], generator))


def _next_pow2(n: int, floor: int = 64) -> int:
    return max(floor, 1 << math.ceil(math.log2(n)))


_DECODERS_ATTR = "_mmgen_speculative"


def decoder_for(model: nn.Module, *, max_seq_len: int, compile: bool) -> SpeculativeDecoder:
    """The :class:`SpeculativeDecoder` of ``model`` for a cache of ``max_seq_len`` slots,
    made once and kept on the model (not as a submodule)."""
    decoders = model.__dict__.get(_DECODERS_ATTR)
    if decoders is None:
        decoders = {}
        object.__setattr__(model, _DECODERS_ATTR, decoders)
    key = (max_seq_len, compile)
    if key not in decoders:
        decoders[key] = SpeculativeDecoder(model, max_seq_len=max_seq_len, compile=compile)
    return decoders[key]


def generate_speculative(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    config: LayerSkip,
    max_new_tokens: int,
    strategy: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    logits_processor: Any = None,
    num_beams: int | None = None,
    compile: bool | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Self-speculative generation; what ``generate(..., speculative=LayerSkip(...))`` runs.

    Args:
        model: a reference decoder, or one returned by ``optimize`` (then compiled by
            default with its config).
        input_ids: (1, P) prompt.
        config: :class:`LayerSkip` (``exit_layer`` E, ``num_speculations`` d).
        strategy: ``"greedy"`` (output identical to the full model's greedy decoding) or
            ``"sample"`` (``temperature``, ``top_k``, ``top_p``, ``generator``; the full
            model's distribution is kept).
        compile: compile the draft and verify graphs (default: ``model`` is an optimized
            module); ``False`` runs the same graphs eagerly.
        max_seq_len: cache slots (default: the next power of two that holds the request).

    Returns:
        (1, n_new) long, ``n_new <= max_new_tokens`` (cut after an EOS).
    """
    if not isinstance(config, LayerSkip):
        raise TypeError(f"speculative must be a LayerSkip(exit_layer, num_speculations), got {config!r}")
    if strategy == "beam" or (num_beams not in (None, 1) and strategy == "beam"):
        raise ValueError("speculative decoding does not do beam search; use greedy or sample")
    if logits_processor is not None:
        raise ValueError("speculative decoding takes no logits_processor; drop it or speculative=")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("speculative decoding runs one unpadded prompt; drop the padding")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if compile is None:
        compile = hasattr(model, "_mmgen_config")
    need = input_ids.shape[-1] + max_new_tokens + config.num_speculations + 1
    S = max_seq_len or _next_pow2(need)
    decoder = decoder_for(model, max_seq_len=S, compile=compile)
    return decoder.generate(
        input_ids, config, max_new_tokens=max_new_tokens, strategy=strategy,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
        generator=generator,
    )


def attach_draft(optimized: Any) -> Any:
    """Give a module returned by ``optimize(model, layer_skip=LayerSkip(E, d))`` its
    ``draft`` attribute: the same module compiled with ``passes/skip_layers.py`` active,
    same call signature, logits from the exit after layer ``E``. Returns the draft."""
    from ..api import mmgen_backend
    from ..pass_manager import passes_for

    cfg = getattr(optimized, "_mmgen_config", None)
    if cfg is None or cfg.layer_skip is None:
        raise ValueError(
            "attach_draft needs a module returned by optimize(model, layer_skip=LayerSkip(...))"
        )
    if "draft" in optimized.__dict__:
        return optimized.__dict__["draft"]
    passes = [p for stage in ("dynamo", "joint", "post_grad") for p in passes_for(cfg, stage)]
    passes.append(skip_layers.PASS)
    report = PassReport()
    backend = functools.partial(mmgen_backend, config=cfg, report=report, passes=passes)
    draft = torch.compile(
        optimized._orig_mod, backend=backend, fullgraph=cfg.compile.fullgraph, dynamic=cfg.compile.dynamic
    )
    object.__setattr__(draft, "_mmgen_config", cfg)
    object.__setattr__(draft, "_mmgen_report", report)
    object.__setattr__(optimized, "draft", draft)
    return draft

