"""The optimized runtime of the Seamless-style pipeline (``models/seamless.py``).

Returned by ``torch_mmgen_opt.optimize(model)`` through the model's ``__mmgen_optimize__``;
it reuses the model's weights and never edits its class. The recipe is the companion
study's ("Accelerating Generative AI with PyTorch IV: Seamless M4T, fast"):

- **weight_norm folded**: the vocoder is deep-copied and folded
  (:func:`~torch_mmgen_opt.runtime.prepare.fold_weight_norm_`); the user's model keeps
  its parametrizations.
- **encoder**: filterbank frames zero-padded to a frame bucket (one static graph per
  bucket); the model masks padded frames, so valid outputs are unchanged. The same graph
  projects every decoder layer's cross-attention K/V; they are copied once per utterance
  into static buffers ``(1, nh, S_max, hd)`` with a padding mask ``(1, S_max)``. With one
  utterance all beams share them, so they are broadcast, never reordered.
- **decoder**: one static step graph: self-attention K/V written in place
  (``index_copy_``) at a position held in a device tensor, attention over the whole
  ``max_len`` with a mask of valid positions, beam selection (log-softmax, top-k) inside
  the graph, no host sync except the stop check every ``sync_every`` steps. The beam
  reorder is one fused gather over every layer's K/V and the token history, written
  back with ``copy_`` (buffer addresses never change). It mutates its inputs, so on CUDA
  it is its own graph, run without CUDA graphs; without CUDA graphs (CPU) it is part of
  the step's graph (``fused_reorder``: one compiled call a step), and then the step
  leaves its cache writes to the reorder, which gathers every buffer first and writes
  the new position after (``_DecoderStep.defer_writes``: written in the step, Inductor
  compiled the pair into an in-place gather that read overwritten rows).
- **text-to-unit**: one static graph per text bucket: the decoder states of the chosen
  hypothesis, the T2U encoder, durations, a static length regulator (output length
  ``text_bucket * max_duration``, positions past the predicted total masked) and the
  unit decoder. With the reorder in the step's graph, the search keeps every beam's
  decoder states (reordered with the beams) and this stage computes only the last
  position, one row over the chosen beam's cache (``reuse_decoder_states``); otherwise
  (CUDA graphs, or tokens that are not the last search's) it re-runs the decoder over
  the text with cross-attention on the static buffers.
- **vocoder**: units zero-padded to a unit bucket with their length (the vocoder masks
  activations past it), one static graph per bucket; the waveform is trimmed after.

Every stage is compiled with ``torch.compile(fullgraph=True)`` and the ``"mmgen"``
backend bound to the config; CUDA graphs are on (on CUDA) for every stage but the
reorder. The bucket padding above is the CUDA default (``pad_to_buckets``). On CPU,
where nothing is captured: the encoder sees the exact frames (one graph, frame dim
dynamic), the decoder step and the T2U stage attend over the utterance's ``S`` cross
keys (``S`` dynamic; up to ``CROSS_IN_GRAPH_MAX_KEYS`` keys the step runs a second graph
whose cross-attention Inductor fuses into its kernels), the vocoder runs uncompiled
with channels-last convolutions on the exact units, the float32 linears of the
encoder and T2U copies go through packed oneDNN (``pack_linear``), and those of the
decoder step's own copy through our panel kernel (``kernels/gemv_linear.py``; where it
cannot be built, ``decode_gemv`` rewrites the step's matmuls); see
:class:`OptimizedSeamless`.
:meth:`OptimizedSeamless.stage_times` and :func:`eager_stage_times` give the per-stage
breakdown (encoder, decoder, t2u, vocoder).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..config import OptimizeConfig
from ..models.seamless import Seamless, attend, beam_select, best_hypothesis
from .prepare import conv1d_channels_last_, fold_weight_norm_, pad_to_bucket, pick_bucket

log = logging.getLogger("torch_mmgen_opt")

__all__ = ["OptimizedHFSeamless", "OptimizedSeamless", "eager_stage_times", "optimize_hf_seamless"]

STAGES = ("encoder", "decoder", "t2u", "vocoder")
# cross keys (encoder frames after subsampling) up to which the CPU decode step computes
# cross-attention in its own kernels rather than through the flash kernel: 100 keys
# 3% faster, 500 keys 11% slower (decoder stage, small model); the same bound as
# fuse_attention's one-query rule (passes/fuse_attention.py, prefer_sdpa)
CROSS_IN_GRAPH_MAX_KEYS = 128


class _LayerCache(nn.Module):
    """Static buffers of one decoder layer: self K/V (K, nh, max_len, hd), cross K/V
    (1, nh, S_max, hd)."""

    def __init__(self, K: int, nh: int, max_len: int, s_max: int, hd: int, dtype, device) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(K, nh, max_len, hd, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(K, nh, max_len, hd, dtype=dtype, device=device))
        self.register_buffer("ck", torch.zeros(1, nh, s_max, hd, dtype=dtype, device=device))
        self.register_buffer("cv", torch.zeros(1, nh, s_max, hd, dtype=dtype, device=device))


class _State(nn.Module):
    """Buffers shared by the decoder stages (static addresses for CUDA graphs)."""

    def __init__(self, model: Seamless, s_max: int, dtype, device) -> None:
        super().__init__()
        cfg = model.config
        self.max_len = cfg.max_new_tokens + 1  # BOS + generated tokens
        nh, hd = cfg.dec_heads, cfg.dec_dim // cfg.dec_heads
        K = cfg.beam_size
        self.layers = nn.ModuleList(
            _LayerCache(K, nh, self.max_len, s_max, hd, dtype, device) for _ in range(cfg.dec_layers)
        )
        self.register_buffer("cross_mask", torch.zeros(1, s_max, dtype=torch.bool, device=device))
        self.register_buffer("hist", torch.zeros(K, self.max_len, dtype=torch.long, device=device))
        # each beam's final-layer-norm decoder states, reordered with the beams: what the
        # text-to-unit stage would otherwise recompute (OptimizedSeamless.reuse_decoder_states)
        self.register_buffer("hid", torch.zeros(K, self.max_len, cfg.dec_dim, dtype=dtype, device=device))
        for buf in self.buffers():
            torch._dynamo.mark_static_address(buf)


class _EncoderStage(nn.Module):
    def __init__(self, model: Seamless) -> None:
        super().__init__()
        self.encoder = model.encoder
        # the decoder copy whose cross K/V projections run here, over all S frames
        self.dec_layers = getattr(model, "cross_kv_decoder", model.decoder).layers

    def forward(self, fbank: torch.Tensor, lengths: torch.Tensor):
        """fbank (1, Fb, n_mels) -> (mask (1, S), [ck, cv] * layers each (1, nh, S, hd))."""
        enc_out, mask = self.encoder(fbank, lengths)
        kv = []
        for layer in self.dec_layers:
            kv.extend(layer.cross_attn.project_kv(enc_out))
        return mask, kv


class _DecoderStep(nn.Module):
    def __init__(self, model: Seamless, state: _State, fold_beams: bool = True,
                 defer_writes: bool = False) -> None:
        super().__init__()
        self.decoder, self.state, self.eos_id = model.decoder, state, model.config.eos_id
        self.fold_beams, self.defer_writes = fold_beams, defer_writes

    def forward(self, tok, pos, scores, finished, cross_mask=None):
        """tok (K,) current tokens at position ``pos`` (1,) -> beam_select outputs.

        ``cross_mask``: ``None`` attends over the whole static ``(1, S_max)`` cross
        buffers (what CUDA graphs need); a ``(1, S)`` view of the state's mask attends
        over its first ``S`` keys only (CPU: its length is a dynamic dim of one graph).

        ``defer_writes`` (the step and the reorder in one graph): the cache is not
        written here; the outputs also carry the decoder states ``(K, 1, d)`` and the
        new K/V of every layer, which :class:`_BeamReorder` writes after reordering.
        Written here, "index_copy_ into the cache, then copy_ of its index_select" in
        one graph compiled (torch 2.13, CPU) into an in-place gather that read rows it
        had already overwritten when the beams were permuted
        (``docs/workloads/seamless.md``)."""
        dec, st = self.decoder, self.state
        x = dec.embed(tok)[:, None] * dec.scale + dec.pos.index_select(0, pos).to(dec.embed.weight.dtype)
        valid = torch.arange(st.max_len, device=tok.device) <= pos  # (max_len,)
        if cross_mask is None:
            cross_mask = st.cross_mask
        S = cross_mask.shape[1]
        cross_allowed = cross_mask[:, None, None, :]
        new_kv: list[torch.Tensor] = []
        for layer, c in zip(dec.layers, st.layers):
            a = layer.self_attn
            h = layer.self_ln(x)
            q, (k, v) = a.heads(a.q_proj(h)), a.project_kv(h)  # (K, nh, 1, hd)
            if self.defer_writes:
                keys, values = c.k.index_copy(2, pos, k), c.v.index_copy(2, pos, v)
                new_kv.extend((k, v))
            else:
                keys, values = c.k.index_copy_(2, pos, k), c.v.index_copy_(2, pos, v)
            x = x + a.merge(attend(q, keys, values, valid))
            ca = layer.cross_attn
            q = ca.heads(ca.q_proj(layer.cross_ln(x)))  # (K, nh, 1, hd)
            if self.fold_beams:
                # every beam reads the same (1, nh, S, hd) K/V: fold the beams into query
                # rows (1, nh, K, hd) so a fused kernel reads K/V once, not K copies
                out = attend(q.transpose(0, 2), c.ck[:, :, :S], c.cv[:, :, :S], cross_allowed)
                out = out.transpose(0, 2)
            else:
                # one query row per beam against the broadcast K/V: Inductor's CPU code
                # turns one-row matmuls into fused multiply-reduce loops (the broadcast
                # is index arithmetic, no copies) inside the step's kernels
                out = attend(q, c.ck[:, :, :S], c.cv[:, :, :S], cross_allowed)
            x = x + ca.merge(out)
            x = x + layer.ffn(layer.ffn_ln(x))
        h = dec.final_ln(x)  # (K, 1, d)
        logits = dec.lm_head(h)[:, 0]  # (K, vocab)
        selected = beam_select(logits, scores, finished, self.eos_id)
        return (*selected, h, tuple(new_kv)) if self.defer_writes else selected


class _BeamReorder(nn.Module):
    """In-place beam reorder of every layer's self K/V and the token history."""

    def __init__(self, state: _State, keep_states: bool = False) -> None:
        super().__init__()
        self.state, self.keep_states = state, keep_states

    def forward(self, beam_idx, tok, pos, states=None, new_kv=None):
        """``states`` (K, 1, d) and ``new_kv`` (every layer's K and V at ``pos``): the
        step's deferred writes (``_DecoderStep.defer_writes``), made here in the new
        beam order after the reorder: every buffer is gathered first, then written,
        never the other way round in one graph (see ``_DecoderStep``)."""
        st = self.state
        for i, c in enumerate(st.layers):
            c.k.copy_(c.k.index_select(0, beam_idx))
            c.v.copy_(c.v.index_select(0, beam_idx))
            if new_kv is not None:
                c.k.index_copy_(2, pos, new_kv[2 * i].index_select(0, beam_idx))
                c.v.index_copy_(2, pos, new_kv[2 * i + 1].index_select(0, beam_idx))
        if self.keep_states:
            st.hid.copy_(st.hid.index_select(0, beam_idx))
            st.hid.index_copy_(1, pos, states.index_select(0, beam_idx))
        st.hist.copy_(st.hist.index_select(0, beam_idx))
        st.hist.index_copy_(1, pos + 1, tok[:, None])


class _StepAndReorder(nn.Module):
    """The decoder step and the beam reorder in one graph: one compiled call a step.

    For runtimes without CUDA graphs (CPU): the reorder mutates the cache, which a
    CUDA-graphed step must not, so there the two stay apart."""

    def __init__(self, step: _DecoderStep, reorder: _BeamReorder) -> None:
        super().__init__()
        self.step, self.reorder = step, reorder

    def forward(self, tok, pos, scores, finished, cross_mask=None):
        tok, beam_idx, scores, finished, states, new_kv = self.step(
            tok, pos, scores, finished, cross_mask)
        self.reorder(beam_idx, tok, pos, states, new_kv)
        return tok, beam_idx, scores, finished


class _StepAndReorderShortCross(_StepAndReorder):
    """:class:`_StepAndReorder` over a step whose cross-attention is left to Inductor
    (``fold_beams=False``); its own ``forward`` gives it its own Dynamo cache."""

    def forward(self, tok, pos, scores, finished, cross_mask=None):
        return super().forward(tok, pos, scores, finished, cross_mask)


class _T2UStage(nn.Module):
    def __init__(self, model: Seamless, state: _State) -> None:
        super().__init__()
        self.decoder, self.t2u, self.state = model.t2u_decoder, model.t2u, state
        self.max_duration = model.config.max_duration

    def forward(self, seq: torch.Tensor, n_text: torch.Tensor, cross_mask: torch.Tensor | None = None):
        """seq (1, Lb) BOS + tokens zero-padded, n_text (1,) valid length ->
        (units (1, Lb * max_duration), n_units (1,)).

        ``cross_mask``: as for :class:`_DecoderStep` (``None``: the whole static
        ``S_max`` cross buffers; a ``(1, S)`` view: their first ``S`` keys)."""
        dec, st = self.decoder, self.state
        Lb = seq.shape[1]
        x = dec.embed(seq) * dec.scale + dec.pos[:Lb].to(dec.embed.weight.dtype)
        key_pos = torch.arange(Lb, device=seq.device)
        causal = key_pos[None, :] <= key_pos[:, None]  # (Lb, Lb)
        if cross_mask is None:
            cross_mask = st.cross_mask
        S = cross_mask.shape[1]
        cross_allowed = cross_mask[:, None, None, :]
        for layer, c in zip(dec.layers, st.layers):
            a = layer.self_attn
            h = layer.self_ln(x)
            x = x + a.merge(attend(a.heads(a.q_proj(h)), *a.project_kv(h), causal))
            ca = layer.cross_attn
            q = ca.heads(ca.q_proj(layer.cross_ln(x)))
            x = x + ca.merge(attend(q, c.ck[:, :, :S], c.cv[:, :, :S], cross_allowed))
            x = x + layer.ffn(layer.ffn_ln(x))
        return self.units(dec.final_ln(x), n_text)

    def units(self, hidden: torch.Tensor, n_text: torch.Tensor):
        """hidden (1, Lb, d) decoder states, valid up to n_text -> (units, n_units)."""
        Lb = hidden.shape[1]
        key_pos = torch.arange(Lb, device=hidden.device)
        text_mask = key_pos[None, :] < n_text[:, None]  # (1, Lb)
        states, dur = self.t2u.encode(hidden, text_mask)
        # static length regulator: output position t takes state #(cum <= t)
        cum = dur.cumsum(-1)  # (1, Lb)
        U = Lb * self.max_duration
        t = torch.arange(U, device=hidden.device)
        src = (cum[:, None, :] <= t[None, :, None]).sum(-1).clamp(max=Lb - 1)  # (1, U)
        up = states.gather(1, src[..., None].expand(-1, -1, states.shape[-1]))  # (1, U, d)
        n_units = cum[:, -1]
        unit_mask = t[None, :] < n_units[:, None]
        return self.t2u.decode(up, unit_mask), n_units


class _T2UFromStates(_T2UStage):
    """The text-to-unit stage fed with the decoder states kept during beam search.

    The search already ran the decoder over every position of the chosen hypothesis but
    its last: :class:`_DecoderStep` keeps each beam's final-layer-norm states in
    ``state.hid``, reordered with the beams. Only the last position (the last token
    as input) is computed here, one row through the step's decoder over the chosen
    beam's cached self K/V, instead of re-running the decoder over the whole text
    (``text_bucket`` rows). Same function, another summation order."""

    def __init__(self, model: Seamless, state: _State) -> None:
        super().__init__(model, state)
        self.decoder = model.decoder  # the step's copy (one row here)

    def forward(self, seq: torch.Tensor, n_text: torch.Tensor, row: torch.Tensor,
                cross_mask: torch.Tensor | None = None):
        """seq (1, Lb) BOS + tokens zero-padded, n_text (1,) valid length, row (1,) the
        beam of ``state`` the tokens came from -> (units, n_units) as :class:`_T2UStage`."""
        dec, st = self.decoder, self.state
        Lb = seq.shape[1]
        last = n_text - 1  # (1,) position of the last token
        x = dec.embed(seq.gather(1, last[:, None])) * dec.scale  # (1, 1, d)
        x = x + dec.pos.index_select(0, last).to(dec.embed.weight.dtype)
        key_pos = torch.arange(Lb, device=seq.device)
        valid = key_pos <= last  # (Lb,)
        if cross_mask is None:
            cross_mask = st.cross_mask
        S = cross_mask.shape[1]
        cross_allowed = cross_mask[:, None, None, :]
        for layer, c in zip(dec.layers, st.layers):
            a = layer.self_attn
            h = layer.self_ln(x)
            q, (k, v) = a.heads(a.q_proj(h)), a.project_kv(h)  # (1, nh, 1, hd)
            # the chosen beam's cache (a copy: the state is not written) + this position
            keys = c.k.index_select(0, row).index_copy(2, last, k)
            values = c.v.index_select(0, row).index_copy(2, last, v)
            x = x + a.merge(attend(q, keys, values, valid))
            ca = layer.cross_attn
            q = ca.heads(ca.q_proj(layer.cross_ln(x)))
            x = x + ca.merge(attend(q, c.ck[:, :, :S], c.cv[:, :, :S], cross_allowed))
            x = x + layer.ffn(layer.ffn_ln(x))
        hidden = st.hid.index_select(0, row).index_copy(1, last, dec.final_ln(x))  # (1, Lb, d)
        # positions past the text hold other beams' or utterances' states: zero them
        # (the T2U stage masks them; zeros keep them finite)
        hidden = torch.where((key_pos <= last)[None, :, None], hidden, 0.0)
        return self.units(hidden, n_text)


class _VocoderStage(nn.Module):
    def __init__(self, vocoder: nn.Module) -> None:
        super().__init__()
        self.vocoder = vocoder

    def forward(self, units: torch.Tensor, n_units: torch.Tensor) -> torch.Tensor:
        return self.vocoder(units, n_units)


def _copy_vocoder(model: Seamless) -> nn.Module:
    """A copy of ``model.vocoder`` (``copy.deepcopy`` breaks parametrized modules: rebuild
    it and load the state dict)."""
    from ..models.seamless_vocoder import UnitVocoder

    cfg, src = model.config, model.vocoder
    with torch.device("meta"):
        voc = UnitVocoder(cfg.unit_vocab, cfg.voc_embed, cfg.voc_channels, cfg.upsample_rates,
                          cfg.resblock_kernels, cfg.resblock_dilations)
    voc.load_state_dict(src.state_dict(), assign=True)
    return voc.eval()


def _share_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree of modules whose parameters and buffers are the
    original tensors (so submodules can be swapped without touching the original)."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def _default_unit_buckets(max_units: int) -> tuple[int, ...]:
    buckets, b = [], 64
    while b < max_units:
        buckets.append(b)
        b *= 2
    return (*buckets, b)


class OptimizedSeamless:
    # benchmarks/diagnostics flip these for an A/B
    _cross_in_graph_default = True
    _reuse_states_default = True
    _gemv_kernel_default = True

    """Optimized pipeline over a :class:`~torch_mmgen_opt.models.seamless.Seamless`.

    Args:
        model: the eager pipeline (its weights are shared, its vocoder copied).
        config: an :class:`OptimizeConfig`; ``prefill_buckets`` are the filterbank frame
            buckets when ``frame_buckets`` is not given.
        frame_buckets: padded input lengths in frames (default (128, 256, ..., 2048)).
        unit_buckets: padded vocoder lengths in units (default powers of two from 64 up to
            ``(max_new_tokens + 1) * max_duration``).
        sync_every: decoder steps between stop checks (host syncs); the result does not
            depend on it.
        pad_to_buckets: pad encoder frames and vocoder units to their buckets (static
            shapes, one graph per bucket: what CUDA graphs need). ``None``: on CUDA only.
            Without it the encoder is compiled once with a dynamic length and sees the
            exact frames (on CPU padding is only extra arithmetic); the longest input
            is still ``frame_buckets[-1]``.
        compile: ``False`` runs the same static runtime eagerly (debugging, tests).

    On CPU the vocoder runs uncompiled with its 1-D convolutions as channels-last 2-D
    ones (:func:`~torch_mmgen_opt.runtime.prepare.conv1d_channels_last_`): measured on
    the small vocoder, that took it from ~130 ms (eager) to ~75 ms, while Inductor's CPU
    code for the same prepared module took ~105 ms (its pointwise kernels between the
    convolutions cost more than eager's). On CUDA it is compiled with CUDA graphs.
    """

    def __init__(
        self,
        model: Seamless,
        config: OptimizeConfig | None = None,
        *,
        frame_buckets: Sequence[int] | None = None,
        unit_buckets: Sequence[int] | None = None,
        sync_every: int | None = None,
        pad_to_buckets: bool | None = None,
        compile: bool = True,
    ) -> None:
        from ..graph_utils import PassReport

        if not isinstance(model, Seamless):
            raise TypeError(f"OptimizedSeamless needs a models.seamless.Seamless, got {type(model).__name__}")
        self.model, self.config = model, config or OptimizeConfig()
        if self.config.layer_skip is not None:
            log.warning("layer_skip does not apply to the Seamless pipeline (beam search); ignored")
        cfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.frame_buckets = tuple(sorted(frame_buckets or self.config.prefill_buckets
                                          or (128, 256, 512, 1024, 2048)))
        s_max = model.encoder.out_lengths(torch.tensor(self.frame_buckets[-1])).item()
        if s_max > cfg.max_positions:
            raise ValueError(f"frame bucket {self.frame_buckets[-1]} exceeds max_positions; lower it")
        self.text_bucket = cfg.max_new_tokens + 1
        self.unit_buckets = tuple(sorted(
            unit_buckets or _default_unit_buckets(self.text_bucket * cfg.max_duration)))
        self.sync_every = sync_every or (4 if self.device.type == "cuda" else 1)
        on_cuda = self.device.type == "cuda"
        self.pad_to_buckets = on_cuda if pad_to_buckets is None else bool(pad_to_buckets)
        self.report = PassReport()

        self.vocoder = _copy_vocoder(model)
        self.weight_norm_folded = fold_weight_norm_(self.vocoder)
        self.compiled_vocoder = compile and on_cuda
        if not on_cuda:
            conv1d_channels_last_(self.vocoder)
        self.state = _State(model, s_max, self.dtype, self.device)
        parts = self._pack_linears(model)
        self.encoder_convs_channels_last = 0
        if not on_cuda:
            # the conformer's convolutions too (its depthwise conv: ~1 ms -> ~0.13 ms)
            if parts.encoder is model.encoder:
                parts.encoder = _share_copy(model.encoder)
            self.encoder_convs_channels_last = conv1d_channels_last_(parts.encoder)
        K = cfg.beam_size
        self._positions = [torch.tensor([t], device=self.device) for t in range(self.text_bucket)]
        self._bos = torch.full((K,), cfg.bos_id, dtype=torch.long, device=self.device)
        self._scores0 = torch.full((K,), float("-inf"), device=self.device)
        self._scores0[0] = 0.0
        self._finished0 = torch.zeros(K, dtype=torch.bool, device=self.device)
        self._cross_view: tuple[torch.Tensor, ...] = ()  # set per utterance by run_encoder
        self._cross_len = 0
        self.steps_run = 0

        self.compiled = compile
        wrap = self._compile if compile else (lambda m, cuda_graphs, **_: m)
        quantize_all = not self.decode_only_quantized  # else encoder and T2U stay float
        # exact lengths: the frame dim is marked dynamic per call (run_encoder), not every
        # dim (dynamic=True also made the packed weights' sizes symbolic and compiled twice)
        self.encode = wrap(_EncoderStage(parts), cuda_graphs=True,
                           dynamic=None if not self.pad_to_buckets else False, quantize=quantize_all)
        # without CUDA graphs the reorder joins the step's graph (one call a step, and no
        # copies of the outputs, which a CUDA-graph replay would overwrite)
        self.fused_reorder = not (compile and on_cuda and self.config.cuda_graphs is not False)
        # the decode steps keep their decoder states for the text-to-unit stage, which
        # then computes only the last position instead of re-running the decoder over
        # the text (not with the int8 step of a float model: T2U reads float states)
        self.reuse_decoder_states = (self.fused_reorder and not self.decode_only_quantized
                                     and self._reuse_states_default)
        keep = self.reuse_decoder_states
        fused = self.fused_reorder
        step = _DecoderStep(parts, self.state, defer_writes=fused)
        reorder = _BeamReorder(self.state, keep_states=keep)
        # CPU, exact lengths, up to CROSS_IN_GRAPH_MAX_KEYS cross keys: a second step
        # graph (compiled on first use) whose cross-attention is one-row matmuls that
        # Inductor fuses into the step's kernels, instead of six flash-kernel calls a
        # step (~0.1 ms each, mostly call overhead at 4 beams x S keys). Longer
        # utterances keep the flash kernel, which wins there (docs/workloads/seamless.md)
        self.cross_attention_in_graph = (
            self.fused_reorder and not on_cuda and not self.pad_to_buckets
            and self.config.attention.fuse and self.config.attention.backend == "auto"
            and self._cross_in_graph_default
        )
        self.step_short_cross = None
        if self.fused_reorder:
            self.step, self.reorder = wrap(_StepAndReorder(step, reorder), cuda_graphs=False), None
            if self.cross_attention_in_graph:
                short = _StepAndReorderShortCross(
                    _DecoderStep(parts, self.state, fold_beams=False, defer_writes=True), reorder)
                self.step_short_cross = wrap(
                    short, cuda_graphs=False,
                    attention=dataclasses.replace(self.config.attention, backend="inductor"))
        else:
            self.step = wrap(step, cuda_graphs=True)
            self.reorder = wrap(reorder, cuda_graphs=False)
        # the re-run form also serves tokens that are not the last search's result
        # (compiled on first use)
        self.text_to_unit = wrap(_T2UStage(parts, self.state), cuda_graphs=True, quantize=quantize_all)
        self.text_to_unit_from_states = None
        if keep:
            self.text_to_unit_from_states = wrap(_T2UFromStates(parts, self.state),
                                                 cuda_graphs=True, quantize=quantize_all)
        self._searched: tuple[torch.Tensor, torch.Tensor] | None = None  # (tokens, row)
        vocode = _VocoderStage(self.vocoder)
        self.vocode = wrap(vocode, cuda_graphs=True) if self.compiled_vocoder else vocode

    def _pack_linears(self, model: Seamless) -> SimpleNamespace:
        """The encoder, decoder and T2U the stages run: the model's own, or copies that
        share every weight tensor with it (the model is not edited) in which

        - with ``quantize``, the chosen ``nn.Linear`` are swapped for ``QuantizedLinear``
          (``passes/quantize_linear.py``: the same per-layer choice as for any model); for
          a float32 model on CPU only in the decoder step's copy (its few-row int8
          products go through ``decode_gemv``'s int8 kernel; the encoder and T2U stay
          float);
        - with ``pack_linear`` (by default ``"auto"`` for float32 on CPU), the remaining
          chosen float ``nn.Linear`` go through the packed oneDNN kernel.

        The decoder step multiplies ``beam_size`` rows: where ``decode_gemv`` rewrites
        those matmuls (float32 CPU, at most ``MAX_ROWS`` beams) its copy is not packed,
        since the rewritten code is faster and an opaque packed call would hide the
        matmul from the pass. The T2U stage runs the decoder over the whole text
        (``text_bucket`` rows), so it gets its own copy, packed for that shape.
        """
        from torch_mmgen_opt.passes.decode_gemv import MAX_ROWS

        from ..kernels.packed_linear import pack_linears_

        cfg = model.config
        mode = self.config.pack_linear
        cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        if mode is None:
            mode = "auto" if cpu_fp32 else False
        gemv_step = self.config.decode_gemv and cpu_fp32 and cfg.beam_size <= MAX_ROWS
        parts = SimpleNamespace(config=cfg, encoder=model.encoder, decoder=model.decoder,
                                t2u=model.t2u, t2u_decoder=model.decoder)
        self.packed_linears: dict[str, str] = {}
        self.decode_only_quantized = False
        self.quantized_linears: dict[str, str] = {}
        self.gemv_linears = {}
        if not mode and self.config.quantize is None:
            if gemv_step:
                self._gemv_step_linears(parts, model)
            return parts
        # rows per call at each stage's hot shape: encoder frames, one per beam, text bucket
        s_min = int(model.encoder.out_lengths(torch.tensor(self.frame_buckets[0])))
        # (part, what it copies, rows at its hot shape, pack it); T2U's decoder copies the
        # step's copy once that is done, so quantized layers are shared, not redone
        plan = (("encoder", model.encoder, s_min, True),
                ("decoder", model.decoder, cfg.beam_size, not gemv_step),
                ("t2u_decoder", None, self.text_bucket, True),
                ("t2u", model.t2u, self.text_bucket, True))
        # float32 on CPU: quantize the decoder step only. Its few-row int8 products run
        # through decode_gemv's int8 kernel; at 25-100 rows (encoder, T2U) torch's int8
        # kernel is the only one and has no fast float32 path, so those stay float
        decode_only = self.decode_only_quantized = cpu_fp32 and self.config.quantize is not None
        for name, source, rows, pack in plan:
            if name == "t2u_decoder":
                if decode_only:  # a float copy (packed when packing is on)
                    part = _share_copy(model.decoder)
                elif not (mode and gemv_step):  # packed alike (or not at all): share it
                    parts.t2u_decoder = parts.decoder
                    continue
                else:
                    part = _share_copy(parts.decoder)
            else:
                part = _share_copy(source)
                if self.config.quantize is not None and (name == "decoder" or not decode_only):
                    from torch_mmgen_opt.passes.quantize_linear import quantize_linear_

                    found = quantize_linear_(part, self.config)
                    self.quantized_linears.update({f"{name}.{k}": v for k, v in found.items()})
            if mode and pack:
                found = pack_linears_(part, mode, rows=rows, report=self.report, prefix=name)
                self.packed_linears.update({f"{name}.{k}": v for k, v in found.items()})
            setattr(parts, name, part)
        if decode_only:  # the cross K/V projections run over S rows: a float copy's
            parts.cross_kv_decoder = parts.t2u_decoder
        if gemv_step:
            self._gemv_step_linears(parts, model)
        return parts

    def _gemv_step_linears(self, parts: SimpleNamespace, model: Seamless) -> None:
        """The decoder step's few-row float32 products through our panel kernel
        (``kernels/gemv_linear.py``), in a copy of its own: the stages that run more
        rows (T2U, the cross K/V projections) keep theirs. Where the kernel cannot be
        built, the layers stay and ``decode_gemv`` rewrites their matmuls."""
        if not self._gemv_kernel_default or self.config.gemv_kernel is False:
            return
        from ..kernels.gemv_linear import gemv_linears_

        if parts.decoder is model.decoder or parts.decoder is parts.t2u_decoder:
            parts.decoder = _share_copy(parts.decoder)
        found = gemv_linears_(parts.decoder, report=self.report, prefix="decoder")
        self.gemv_linears = {f"decoder.{k}": v for k, v in found.items()}

    def _compile(self, module: nn.Module, cuda_graphs: bool,
                 dynamic: bool | None = False, quantize: bool = True,
                 attention: Any = None) -> Callable[..., Any]:
        from ..api import mmgen_backend

        # CUDA graphs where the stage allows them, unless the user turned them off
        use = cuda_graphs and self.device.type == "cuda" and self.config.cuda_graphs is not False
        cfg = self.config.replace(cuda_graphs=use)
        if not quantize:  # a stage kept float: quantize_linear's graph pass must not run
            cfg = cfg.replace(quantize=None)
        if attention is not None:  # this stage's own attention choice
            cfg = cfg.replace(attention=attention)
        backend = functools.partial(mmgen_backend, config=cfg, report=self.report)
        return torch.compile(module, backend=backend, fullgraph=True, dynamic=dynamic)

    # ------------------------------------------------------------------ stages

    @torch.no_grad()
    def run_encoder(self, fbank: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Encode one utterance (1, T, n_mels) into the static cross-attention buffers."""
        if fbank.shape[0] != 1:
            raise ValueError(f"translate one utterance at a time (batch 1), got batch {fbank.shape[0]}")
        if lengths is None:
            lengths = torch.tensor([fbank.shape[1]], device=fbank.device)
        if self.pad_to_buckets:
            fbank, _ = pad_to_bucket(fbank, lengths, self.frame_buckets)
        else:
            if fbank.shape[1] > self.frame_buckets[-1]:
                raise ValueError(
                    f"{fbank.shape[1]} frames exceed the largest frame bucket "
                    f"{self.frame_buckets[-1]}; add a bucket (frame_buckets=...)"
                )
            fbank = fbank.view(fbank.shape)  # mark a view, not the caller's tensor
            torch._dynamo.maybe_mark_dynamic(fbank, 1)  # one graph for every length
        self._searched = None  # the kept decoder states belong to the last utterance
        mask, kv = self.encode(fbank, lengths)
        S = self._cross_len = mask.shape[1]
        st = self.state
        st.cross_mask.zero_()
        st.cross_mask[:, :S].copy_(mask)
        self._cross_view = ()  # padded: the decoder step and T2U attend over all of S_max
        if not self.pad_to_buckets:  # exact: over the first S keys, S a dynamic dim
            view = st.cross_mask[:, :S]
            torch._dynamo.maybe_mark_dynamic(view, 1)
            self._cross_view = (view,)
        for i, c in enumerate(st.layers):
            c.ck[:, :, :S].copy_(kv[2 * i])
            c.cv[:, :, :S].copy_(kv[2 * i + 1])

    def _steady_state(self) -> contextlib.AbstractContextManager:
        """Dynamo's guard checks skipped for the decode steps after the first.

        Each step (and, on CUDA, reorder) call otherwise re-checks ~170 tensors and the
        dynamic cross length (~0.3 ms a call: ~6% of the small decoder on CPU, measured
        with two calls a step).
        Within one utterance every input is a tensor this runtime made, of the same
        dtype, shape and storage as at the first step, which ran with every guard; the
        stance only holds inside this loop (``torch.compiler.set_stance`` restores it).
        """
        if not self.compiled:
            return contextlib.nullcontext()
        try:
            return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
        except (AttributeError, TypeError):  # a torch without this stance: keep the guards
            return contextlib.nullcontext()

    @torch.no_grad()
    def run_decoder(self) -> torch.Tensor:
        """Beam search over the static cache -> best tokens (1, L)."""
        cfg = self.model.config
        st = self.state
        st.hist.fill_(cfg.bos_id)
        tok, scores, finished = self._bos, self._scores0, self._finished0
        step = self.step
        if self.step_short_cross is not None and self._cross_len <= CROSS_IN_GRAPH_MAX_KEYS:
            step = self.step_short_cross
        steps = 0
        for t in range(cfg.max_new_tokens):
            pos = self._positions[t]
            # the first step runs with every guard; set_stance takes effect when called,
            # so the context is made here, inside the with, and ends with it
            with self._steady_state() if t > 0 else contextlib.nullcontext():
                out = step(tok, pos, scores, finished, *self._cross_view)
                if self.fused_reorder:
                    tok, _, scores, finished = out
                else:
                    tok, beam_idx, scores, finished = (o.clone() for o in out)
                    self.reorder(beam_idx, tok, pos)
            steps = t + 1
            if steps % self.sync_every == 0 and bool(finished.all()):
                break
        self.steps_run = steps  # positions 0..steps-1 of the cache hold this search
        tokens, row = best_hypothesis(st.hist[:, : steps + 1], scores, cfg.eos_id,
                                      cfg.length_penalty, return_row=True)
        self._searched = (tokens, torch.tensor([row], device=self.device))
        return tokens

    @torch.no_grad()
    def run_t2u(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """tokens (1, L) -> (units (1, U_static), number of valid units)."""
        L = tokens.shape[1] + 1
        seq = torch.zeros(1, self.text_bucket, dtype=torch.long, device=self.device)
        seq[0, 0] = self.model.config.bos_id
        seq[:, 1:L] = tokens
        n_text = torch.tensor([L], device=self.device)
        searched = self._searched
        if (self.text_to_unit_from_states is not None and searched is not None
                and searched[0].shape == tokens.shape and torch.equal(searched[0], tokens)):
            # the last search's own result: its decoder states are in the state
            units, n_units = self.text_to_unit_from_states(seq, n_text, searched[1], *self._cross_view)
        else:
            units, n_units = self.text_to_unit(seq, n_text, *self._cross_view)
        return units, int(n_units)

    @torch.no_grad()
    def run_vocoder(self, units: torch.Tensor, n_units: int) -> torch.Tensor:
        """units (1, >= n_units) -> waveform (1, n_units * hop)."""
        if not self.pad_to_buckets:  # exact length: nothing to mask
            return self.vocode(units[:, :n_units].contiguous(), None)
        bucket = pick_bucket(n_units, self.unit_buckets)
        padded = torch.zeros(1, bucket, dtype=torch.long, device=self.device)
        padded[:, :n_units] = units[:, :n_units]
        wav = self.vocode(padded, torch.tensor([n_units], device=self.device))
        return wav[:, : n_units * self.vocoder.hop]

    @torch.no_grad()
    def __call__(self, fbank: torch.Tensor, fbank_lengths: torch.Tensor | None = None):
        """fbank (1, T, n_mels) -> (text tokens (1, L), waveform (1, U * hop))."""
        self.run_encoder(fbank, fbank_lengths)
        tokens = self.run_decoder()
        units, n_units = self.run_t2u(tokens)
        return tokens, self.run_vocoder(units, n_units)

    translate = __call__

    def stage_times(self, fbank: torch.Tensor, fbank_lengths: torch.Tensor | None = None,
                    repeats: int = 3) -> dict[str, float]:
        """Median seconds per stage (encoder, decoder, t2u, vocoder) and ``total``."""
        def run(timer):
            timer("encoder", lambda: self.run_encoder(fbank, fbank_lengths))
            tokens = timer("decoder", self.run_decoder)
            units, n = timer("t2u", lambda: self.run_t2u(tokens))
            timer("vocoder", lambda: self.run_vocoder(units, n))
        return _median_stage_times(run, self.device, repeats)


def _median_stage_times(run: Callable, device: torch.device, repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {s: [] for s in STAGES}

    def timer(name, fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples[name].append(time.perf_counter() - t0)
        return out

    for _ in range(repeats):
        run(timer)
    times = {s: sorted(v)[len(v) // 2] for s, v in samples.items()}
    times["total"] = sum(times[s] for s in STAGES)
    return times


@torch.no_grad()
def eager_stage_times(model: Seamless, fbank: torch.Tensor, fbank_lengths: torch.Tensor | None = None,
                      repeats: int = 3) -> dict[str, float]:
    """The eager model's per-stage median seconds (same keys as
    :meth:`OptimizedSeamless.stage_times`)."""
    if fbank_lengths is None:
        fbank_lengths = torch.tensor([fbank.shape[1]], device=fbank.device)

    def run(timer):
        enc_out, enc_mask = timer("encoder", lambda: model.encoder(fbank, fbank_lengths))
        tokens = timer("decoder", lambda: model.beam_search(enc_out, enc_mask))

        def t2u():
            seq = torch.cat([torch.full_like(tokens[:, :1], model.config.bos_id), tokens], dim=1)
            return model.t2u(model.decoder(seq, enc_out, enc_mask)[1])
        units = timer("t2u", t2u)
        timer("vocoder", lambda: model.vocoder(units))

    return _median_stage_times(run, fbank.device, repeats)


# ---------------------------------------------------------------------- Hugging Face


class OptimizedHFSeamless:
    """The same levers on a Hugging Face ``SeamlessM4Tv2Model`` (or one of its task
    models), as far as its code allows; the model is left as is.

    - the vocoder is copied and its ``weight_norm`` folded (``apply_weight_norm`` models;
      a no-op for checkpoints loaded without it), its HiFi-GAN conv stack compiled (dynamic
      length: the HF vocoder does not mask padding, so bucket padding would change the
      tail of the waveform);
    - the speech encoder is compiled, one static graph per input length (the HF speech
      encoder is not proven padding-invariant, so no buckets);
    - text generation (greedy or beam) runs HF's own ``generate`` on top of those, so its
      tokens are HF's. Not done, and why: HF's text decoder builds its own
      ``EncoderDecoderCache(DynamicCache, DynamicCache)`` and derives positions from
      ``cache.get_seq_length()`` (no ``cache_position`` input), so a static cache and a
      CUDA-graphed decode step need changes to the HF decoder; its beam reorder is HF's
      (``index_select`` per layer, not in place).

    Args:
        model: a ``SeamlessM4Tv2Model`` (any module with ``speech_encoder`` and/or
            ``vocoder`` children).
        config: an :class:`OptimizeConfig`.
        compile: ``False`` applies only the module preparation.
    """

    def __init__(self, model: nn.Module, config: OptimizeConfig | None = None, *,
                 compile: bool = True) -> None:
        from ..api import mmgen_backend
        from ..graph_utils import PassReport

        self.config = config or OptimizeConfig()
        self.report = PassReport()
        self.weight_norm_folded = 0
        # a shallow clone whose children we may swap: the user's model keeps its own
        clone = copy.copy(model)
        clone._modules = dict(model._modules)
        backend = functools.partial(mmgen_backend, config=self.config, report=self.report)
        vocoder = model._modules.get("vocoder")
        if vocoder is not None:
            vocoder = _copy_hf_vocoder(vocoder)
            self.weight_norm_folded = fold_weight_norm_(vocoder)
            if compile:
                vocoder.hifi_gan = torch.compile(vocoder.hifi_gan, backend=backend, dynamic=True)
            clone._modules["vocoder"] = vocoder
        encoder = model._modules.get("speech_encoder")
        if encoder is not None and compile:
            clone._modules["speech_encoder"] = torch.compile(encoder, backend=backend, dynamic=False)
        self.model = clone

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``SeamlessM4Tv2Model.generate`` with the optimized parts."""
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["model"], name)


def _copy_hf_vocoder(vocoder: nn.Module) -> nn.Module:
    from torch.nn.utils import parametrize

    if not any(parametrize.is_parametrized(m) for m in vocoder.modules()):
        return copy.deepcopy(vocoder)
    new = type(vocoder)(vocoder.config)  # deepcopy breaks parametrized modules
    new.apply_weight_norm()
    new.load_state_dict(vocoder.state_dict())
    return new.to(next(vocoder.parameters()).device).eval()


def optimize_hf_seamless(model: nn.Module, config: OptimizeConfig | None = None,
                         **kwargs: Any) -> OptimizedHFSeamless:
    """See :class:`OptimizedHFSeamless`."""
    return OptimizedHFSeamless(model, config, **kwargs)
