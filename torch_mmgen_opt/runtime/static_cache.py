"""A preallocated KV cache written in place: the decode step keeps fixed shapes.

:class:`StaticKVCache` holds one key buffer and one value buffer per layer, each
``(B_max, H_kv, S_max, hd)``, allocated once and marked as static addresses
(``torch._dynamo.mark_static_address``), so a compiled decode step reads and writes the
same memory every step and CUDA graphs can replay it. New keys are written with
``index_copy_`` along the sequence dim at positions held in a device tensor, never a
Python int that changes per step (that would be a new graph per step).

Why one buffer pair per layer and not one stacked ``(L, 2, B, H, S, hd)`` buffer sliced
per layer: after functionalization, an in-place write into a slice of a stacked input
becomes a copy of the whole stack every step.

Conventions spoken:

- the Hugging Face ``Cache`` protocol: ``update(key, value, layer_idx, cache_kwargs)``
  returns the full-length keys and values; the write positions come from
  ``cache_kwargs["cache_position"]`` when given, else from :attr:`write_position`, which
  :class:`~torch_mmgen_opt.runtime.generate.DecodeSession` sets before each forward
  (transformers 5 no longer passes ``cache_position`` to ``update``). Masking of the
  slots not written yet is the caller's job: the reference models build it from
  ``cache_position``; for Hugging Face models the session passes a 4-D additive mask.
- the reference models' own: they call the same ``update`` and ``get_max_cache_shape``.

Shapes: ``B`` batch (``<= max_batch_size``), ``H`` kv heads, ``S`` = ``max_seq_len``,
``T`` new tokens, ``hd`` head dim.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("torch_mmgen_opt")

__all__ = ["StaticKVCache", "cache_dims", "install_static_cache_"]


def _gather_rows_(buffers: list[torch.Tensor], index: torch.Tensor) -> None:
    """``buf[:n] = buf[index]`` for every buffer (``n = len(index)``), in place."""
    n = index.shape[0]
    gathered = [buf.index_select(0, index) for buf in buffers]
    # Not torch._foreach_copy_: Inductor (torch 2.13) lowers a foreach copy of a gather
    # of the same buffer in place and reads rows it has already overwritten.
    for buf, rows in zip(buffers, gathered):
        buf[:n].copy_(rows)


class StaticKVCache(nn.Module):
    """Per-layer key/value buffers of ``(max_batch_size, num_kv_heads, max_seq_len,
    head_dim)``, updated in place.

    Args:
        num_layers: number of attention layers (one buffer pair each).
        max_batch_size: rows allocated; any batch ``B <= max_batch_size`` uses the first
            ``B`` rows.
        num_kv_heads: key/value heads per layer.
        max_seq_len: slots per row (prompt, padding included, plus generated tokens).
        head_dim: per-head size.
        dtype, device: of the buffers (the model's activation dtype and device).
    """

    is_compileable = True  # read by transformers' generation utilities

    def __init__(
        self,
        num_layers: int,
        max_batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_layers", num_layers),
            ("max_batch_size", max_batch_size),
            ("num_kv_heads", num_kv_heads),
            ("max_seq_len", max_seq_len),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"StaticKVCache {name} must be a positive int, got {value!r}")
        self.num_layers = num_layers
        self.max_batch_size = max_batch_size
        self.num_kv_heads = num_kv_heads
        self.max_seq_len = max_seq_len
        self.head_dim = head_dim
        shape = (max_batch_size, num_kv_heads, max_seq_len, head_dim)
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []
        for i in range(num_layers):
            self.register_buffer(f"k_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self._refresh_lists()
        # Write positions for callers that do not pass cache_kwargs (transformers >= 5).
        self.write_position: torch.Tensor | None = None
        self._seq_length = 0
        self._reorder_fn: Any = None

    def _refresh_lists(self) -> None:
        self.key_cache = [getattr(self, f"k_{i}") for i in range(self.num_layers)]
        self.value_cache = [getattr(self, f"v_{i}") for i in range(self.num_layers)]
        for buf in (*self.key_cache, *self.value_cache):
            torch._dynamo.mark_static_address(buf)

    def _apply(self, fn: Any, recurse: bool = True) -> StaticKVCache:
        # .to()/.cuda() replace the buffers: re-point the lists and re-mark them static.
        super()._apply(fn, recurse)
        self._refresh_lists()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.key_cache[0].dtype

    @property
    def device(self) -> torch.device:
        return self.key_cache[0].device

    def extra_repr(self) -> str:
        return (
            f"layers={self.num_layers}, shape=({self.max_batch_size}, {self.num_kv_heads}, "
            f"{self.max_seq_len}, {self.head_dim}), dtype={self.dtype}"
        )

    # ------------------------------------------------------------------ HF protocol

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states``/``value_states`` (B, H, T, hd) at ``cache_position``
        (T,) of layer ``layer_idx`` in place; return the layer's keys and values over
        the whole length, (B, H, S, hd)."""
        position = (cache_kwargs or {}).get("cache_position")
        if position is None:
            position = self.write_position
        if position is None:
            raise ValueError(
                "StaticKVCache.update needs the write positions: pass "
                "cache_kwargs={'cache_position': (T,) long tensor} or set cache.write_position"
            )
        k_buf, v_buf = self.key_cache[layer_idx], self.value_cache[layer_idx]
        b = key_states.shape[0]
        if b != self.max_batch_size:
            k_buf, v_buf = k_buf[:b], v_buf[:b]
        k_buf.index_copy_(2, position, key_states.to(k_buf.dtype))
        v_buf.index_copy_(2, position, value_states.to(v_buf.dtype))
        return k_buf, v_buf

    def get_max_cache_shape(self) -> int:
        """Slots per row, ``max_seq_len``."""
        return self.max_seq_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_seq_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Slots in use, as last told by :meth:`set_seq_length` (the runtime tracks it on
        the host, so reading it never syncs with the device)."""
        return self._seq_length

    def set_seq_length(self, n: int) -> None:
        self._seq_length = int(n)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.max_seq_len, 0

    def __len__(self) -> int:
        return self.num_layers

    def reset(self) -> None:
        """Zero every buffer in place (addresses kept)."""
        torch._foreach_zero_([*self.key_cache, *self.value_cache])
        self._seq_length = 0

    # ------------------------------------------------------------------ beam search

    def reorder_(self, beam_idx: torch.Tensor, *, compiled: bool | None = None) -> None:
        """Rows ``i < len(beam_idx)`` of every buffer become old row ``beam_idx[i]``, in
        place, for all layers at once.

        Also expands a prefilled batch to its beams (``beam_idx`` longer than the rows
        in use). ``compiled`` (default: on CUDA) runs the gather of all ``2 * layers``
        buffers as one Inductor graph (combo kernels on GPU) rather than one
        ``index_select`` per tensor; it is compiled without CUDA graphs because it
        mutates its inputs.
        """
        if beam_idx.dim() != 1 or beam_idx.shape[0] > self.max_batch_size:
            raise ValueError(
                f"beam_idx must be 1-D with at most max_batch_size={self.max_batch_size} "
                f"entries, got shape {tuple(beam_idx.shape)}"
            )
        beam_idx = beam_idx.to(device=self.device, dtype=torch.long)
        if compiled is None:
            compiled = self.device.type == "cuda"
        if not compiled:
            _gather_rows_([*self.key_cache, *self.value_cache], beam_idx)
            return
        if self._reorder_fn is None:
            self._reorder_fn = torch.compile(
                _gather_rows_,
                fullgraph=True,
                options={"triton.cudagraphs": False, "combo_kernels": self.device.type == "cuda"},
            )
        self._reorder_fn([*self.key_cache, *self.value_cache], beam_idx)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Hugging Face name of :meth:`reorder_`."""
        self.reorder_(beam_idx)

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> StaticKVCache:
        """A cache sized from ``model``'s config: a reference model
        (``config.n_layers``...) or a Hugging Face causal LM (``num_hidden_layers``...).

        Raises ``TypeError`` for a model in neither convention.
        """
        dims = cache_dims(model)
        if dims is None:
            raise TypeError(
                f"cannot size a static KV cache for {type(model).__name__}: its config has "
                "neither (n_layers, n_kv_heads, head_dim) nor (num_hidden_layers, "
                "num_key_value_heads, hidden_size / num_attention_heads); build "
                "StaticKVCache(...) yourself (see docs/generation.md)"
            )
        num_layers, num_kv_heads, head_dim = dims
        param = next(model.parameters(), None)
        if dtype is None:
            dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        if device is None:
            device = param.device if param is not None else "cpu"
        return cls(
            num_layers, max_batch_size, num_kv_heads, max_seq_len, head_dim, dtype=dtype, device=device
        )


def cache_dims(model: nn.Module) -> tuple[int, int, int] | None:
    """``(num_layers, num_kv_heads, head_dim)`` from a model's config, or ``None``."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if all(hasattr(cfg, a) for a in ("n_layers", "n_kv_heads", "head_dim")):
        return int(cfg.n_layers), int(cfg.n_kv_heads), int(cfg.head_dim)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    if all(hasattr(cfg, a) for a in ("num_hidden_layers", "num_attention_heads", "hidden_size")):
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
        return int(cfg.num_hidden_layers), kv_heads, int(head_dim)
    return None


def install_static_cache_(
    model: nn.Module, *, max_batch_size: int, max_seq_len: int
) -> StaticKVCache | None:
    """Attach a :class:`StaticKVCache` sized from ``model``'s config as
    ``model._mmgen_static_cache`` (not a registered submodule: ``state_dict`` and
    ``named_modules`` are unchanged), where :func:`~torch_mmgen_opt.generate` finds it.

    A model in neither known convention gets one warning and no cache (its graph passes
    still apply).
    """
    if cache_dims(model) is None:
        log.warning(
            "static_kv: cannot size a KV cache for %s (no n_layers/n_kv_heads/head_dim or "
            "num_hidden_layers/num_key_value_heads in its config); no cache installed, see "
            "docs/generation.md for the adapter",
            type(model).__name__,
        )
        return None
    existing = getattr(model, "_mmgen_static_cache", None)
    if (
        isinstance(existing, StaticKVCache)
        and existing.max_batch_size == max_batch_size
        and existing.max_seq_len == max_seq_len
    ):
        return existing
    cache = StaticKVCache.for_model(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    object.__setattr__(model, "_mmgen_static_cache", cache)
    return cache
