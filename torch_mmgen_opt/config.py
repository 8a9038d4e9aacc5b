"""Configuration: one small frozen, keyword-only dataclass per lever, composed in
:class:`OptimizeConfig`.

Every value is validated in ``__post_init__``; a wrong value raises ``ValueError`` (or
``TypeError`` for a wrong type) whose message says what to pass instead. Shorthands are
normalised there too, so ``OptimizeConfig(quantize="int8")`` and
``OptimizeConfig(quantize=QuantizeConfig(scheme="int8"))`` are the same config.

This is a leaf module: it imports nothing from the rest of the package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AttentionConfig",
    "CompileConfig",
    "LayerSkip",
    "OptimizeConfig",
    "QuantizeConfig",
    "QUANT_SCHEMES",
]

QUANT_SCHEMES = ("int8", "int4", "int8_dynamic", "auto")
_ATTENTION_BACKENDS = ("auto", "sdpa", "inductor")
_COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_type(name: str, value: Any, types: type | tuple[type, ...], hint: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise TypeError(f"{name} must be {hint}, got {value!r} ({type(value).__name__})")


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Attention fusion (``passes/fuse_attention.py``).

    Args:
        fuse: rewrite eager matmul/softmax/matmul attention into
            ``scaled_dot_product_attention`` (and HSTU SiLU attention into its fused op).
        backend: ``"auto"`` decides per device and shape from the measurements recorded
            in ``docs/passes/fuse_attention.md``; ``"sdpa"`` always fuses; ``"inductor"``
            leaves the chain to Inductor's own bmm/softmax code generation (the
            correctness guard for softmax over a non-last dim still runs).
    """

    fuse: bool = True
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_type("AttentionConfig.fuse", self.fuse, bool, "True or False")
        if self.backend not in _ATTENTION_BACKENDS:
            raise ValueError(
                f"AttentionConfig.backend={self.backend!r} is not supported; pass one of "
                f"{_ATTENTION_BACKENDS}"
            )


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """Weight quantization of linear layers (``passes/quantize_linear.py``).

    Args:
        scheme: ``"int8"`` (weight-only, per output channel), ``"int4"`` (weight-only,
            group-wise with scales and zero points), ``"int8_dynamic"`` (int8 activations
            per token times int8 weights) or ``"auto"`` (measured per layer).
        group_size: int4 group size along the input dimension: 32, 64 or 128.
        include_output: also quantize the output head (the LM head).
        include: fnmatch patterns over module names (``"layers.*.mlp.*"``); ``None``
            means every linear layer.
        exclude: fnmatch patterns over module names that are never quantized.
        min_sqnr_db: for ``"auto"``: the accuracy bound a candidate must meet.
        auto_lengths: for ``"auto"``: the tokens per call (M) the candidates are timed at;
            ``None`` = 1 (decode) plus the smallest and largest prefill bucket up to 512.
        cache_dir: where ``"auto"`` caches its timings (``autoquant.json``); ``None`` =
            ``~/.cache/torch_mmgen_opt``.
    """

    scheme: str = "int8"
    group_size: int = 64
    include_output: bool = False
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    min_sqnr_db: float = 20.0
    auto_lengths: tuple[int, ...] | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in QUANT_SCHEMES:
            raise ValueError(
                f"quantize={self.scheme!r} is not a known scheme; pass one of {QUANT_SCHEMES} "
                "or None to keep float weights"
            )
        if self.group_size not in (32, 64, 128):
            raise ValueError(
                f"QuantizeConfig.group_size={self.group_size!r} is not supported; pass 32, 64 or 128"
            )
        _check_type("QuantizeConfig.include_output", self.include_output, bool, "True or False")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is None and name == "include":
                continue
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                object.__setattr__(self, name, tuple(value))
            else:
                raise TypeError(
                    f"QuantizeConfig.{name} must be a tuple of fnmatch patterns over module "
                    f"names, e.g. ('layers.*.mlp.*',), got {value!r}"
                )
        if not self.min_sqnr_db > 0:
            raise ValueError(f"QuantizeConfig.min_sqnr_db must be positive, got {self.min_sqnr_db}")
        if self.auto_lengths is not None:
            lengths = tuple(self.auto_lengths)
            if not lengths or any(
                not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in lengths
            ):
                raise ValueError(
                    f"QuantizeConfig.auto_lengths must be positive ints, e.g. (1, 128), got {lengths!r}"
                )
            object.__setattr__(self, "auto_lengths", tuple(sorted(set(lengths))))
        if self.cache_dir is not None:
            _check_type("QuantizeConfig.cache_dir", self.cache_dir, str, "a directory path or None")


@dataclass(frozen=True, kw_only=True)
class LayerSkip:
    """LayerSkip self-speculative decoding: draft with the first ``exit_layer`` layers,
    verify ``num_speculations`` drafted tokens with the full model in one pass."""

    exit_layer: int
    num_speculations: int = 6

    def __post_init__(self) -> None:
        _check_type("LayerSkip.exit_layer", self.exit_layer, int, "a positive int")
        _check_type("LayerSkip.num_speculations", self.num_speculations, int, "a positive int")
        if self.exit_layer < 1:
            raise ValueError(f"LayerSkip.exit_layer must be >= 1, got {self.exit_layer}")
        if self.num_speculations < 1:
            raise ValueError(
                f"LayerSkip.num_speculations must be >= 1, got {self.num_speculations}"
            )


@dataclass(frozen=True, kw_only=True)
class CompileConfig:
    """What is handed to Inductor besides our passes.

    Args:
        mode: a ``torch.compile`` mode (``None`` = default).
        freezing: fold parameters into constants (needed by Inductor's CPU GEMM templates;
            bypasses the FX graph cache). ``None`` picks per device.
        fullgraph: raise on graph breaks instead of splitting the graph.
        dynamic: as in ``torch.compile``.
        input_asserts: keep Inductor's size/stride and alignment asserts on every graph
            input at every call. They repeat what Dynamo's guards check and cost ~1.5 us
            per input: ~0.3 ms of a 170-input decode step on CPU. Off by default.
    """

    mode: str | None = None
    freezing: bool | None = None
    fullgraph: bool = False
    dynamic: bool | None = None
    input_asserts: bool = False

    def __post_init__(self) -> None:
        if self.mode not in _COMPILE_MODES:
            raise ValueError(f"CompileConfig.mode={self.mode!r}; pass one of {_COMPILE_MODES}")
        if self.freezing is not None:
            _check_type("CompileConfig.freezing", self.freezing, bool, "True, False or None")
        _check_type("CompileConfig.fullgraph", self.fullgraph, bool, "True or False")
        _check_type("CompileConfig.input_asserts", self.input_asserts, bool, "True or False")


@dataclass(frozen=True, kw_only=True)
class OptimizeConfig:
    """Everything :func:`torch_mmgen_opt.optimize` does, one field per lever.

    Shorthands accepted and normalised: ``attention=True/False``,
    ``quantize="int8"`` (a scheme name), ``layer_skip=LayerSkip(...)``.

    Args:
        attention: :class:`AttentionConfig` or a bool.
        quantize: ``None``, a scheme name or a :class:`QuantizeConfig`.
        layer_skip: ``None`` or :class:`LayerSkip`.
        static_kv: install a preallocated KV cache of ``(max_batch_size, kv_heads,
            max_seq_len, head_dim)`` per layer and compile one decode graph.
        cuda_graphs: run the decode step under CUDA graphs; ``None`` = on for CUDA.
        max_seq_len: cache length (prompt + generated tokens) for ``static_kv``.
        max_batch_size: cache batch for ``static_kv``.
        prefill_buckets: prompt lengths are padded up to the next bucket; ``None`` picks
            powers of two up to ``max_seq_len``.
        pack_linear: float32 CPU ``nn.Linear`` through oneDNN with the weight packed
            once (``kernels/packed_linear.py``): ``True`` every eligible layer, ``"auto"``
            where measured faster for the decode shape, ``False`` never; ``None`` = the
            workload's default (``"auto"`` in the Seamless pipeline, off for other models).
        decode_gemv: rewrite float32 CPU matmuls with at most 8 static rows (decode
            steps) into per-row multiply-reduce that Inductor fuses into one loop over
            each weight (``passes/decode_gemv.py``); ``False`` leaves them to MKL.
        gemv_kernel: swap CPU float32 / bfloat16 ``nn.Linear`` (>= 64K weight elements)
            for ``GemvLinear`` (``kernels/gemv_linear.py``): calls of at most 8 rows (a
            decode step) go through our panel kernel on a copy of the weight packed once
            (the weight is held twice), more rows through ``F.linear``. ``None`` = the
            workload's default (on for the Seamless decoder step's own copy, off for
            other models, whose memory it would double); ``False`` never.
        compile: :class:`CompileConfig`.
    """

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    quantize: QuantizeConfig | None = None
    layer_skip: LayerSkip | None = None
    static_kv: bool = False
    cuda_graphs: bool | None = None
    max_seq_len: int = 2048
    max_batch_size: int = 1
    prefill_buckets: tuple[int, ...] | None = None
    pack_linear: bool | str | None = None
    decode_gemv: bool = True
    gemv_kernel: bool | None = None
    compile: CompileConfig = field(default_factory=CompileConfig)

    def __post_init__(self) -> None:
        if isinstance(self.attention, bool):
            object.__setattr__(self, "attention", AttentionConfig(fuse=self.attention))
        elif not isinstance(self.attention, AttentionConfig):
            raise TypeError(
                f"attention must be True, False or an AttentionConfig, got {self.attention!r}"
            )
        if isinstance(self.quantize, str):
            object.__setattr__(self, "quantize", QuantizeConfig(scheme=self.quantize))
        elif self.quantize is not None and not isinstance(self.quantize, QuantizeConfig):
            raise TypeError(
                f"quantize must be None, one of {QUANT_SCHEMES} or a QuantizeConfig, "
                f"got {self.quantize!r}"
            )
        if self.layer_skip is not None and not isinstance(self.layer_skip, LayerSkip):
            raise TypeError(
                "layer_skip must be None or LayerSkip(exit_layer=..., num_speculations=...), "
                f"got {self.layer_skip!r}"
            )
        _check_type("static_kv", self.static_kv, bool, "True or False")
        if self.cuda_graphs is not None:
            _check_type("cuda_graphs", self.cuda_graphs, bool, "True, False or None")
        for name in ("max_seq_len", "max_batch_size"):
            value = getattr(self, name)
            _check_type(name, value, int, "a positive int")
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value}")
        if self.prefill_buckets is not None:
            buckets = tuple(self.prefill_buckets)
            if not buckets or any(
                not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in buckets
            ):
                raise ValueError(
                    f"prefill_buckets must be positive ints, e.g. (16, 64, 256), got {buckets!r}"
                )
            buckets = tuple(sorted(set(buckets)))
            if buckets[-1] > self.max_seq_len:
                raise ValueError(
                    f"prefill bucket {buckets[-1]} exceeds max_seq_len={self.max_seq_len}; "
                    "raise max_seq_len or drop that bucket"
                )
            object.__setattr__(self, "prefill_buckets", buckets)
        if not (
            self.pack_linear is None
            or isinstance(self.pack_linear, bool)
            or self.pack_linear == "auto"
        ):
            raise ValueError(
                f"pack_linear must be None, True, False or 'auto', got {self.pack_linear!r}"
            )
        _check_type("decode_gemv", self.decode_gemv, bool, "True or False")
        if self.gemv_kernel is not None:
            _check_type("gemv_kernel", self.gemv_kernel, bool, "True, False or None")
        if isinstance(self.compile, dict):
            object.__setattr__(self, "compile", CompileConfig(**self.compile))
        elif not isinstance(self.compile, CompileConfig):
            raise TypeError(f"compile must be a CompileConfig, got {self.compile!r}")
        if self.cuda_graphs and self.compile.mode in ("max-autotune-no-cudagraphs",):
            raise ValueError(
                "cuda_graphs=True conflicts with compile mode 'max-autotune-no-cudagraphs'; "
                "drop one of them"
            )

    def replace(self, **overrides: Any) -> OptimizeConfig:
        """A copy with ``overrides`` applied (validated again)."""
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> OptimizeConfig:
        """Build from ``torch.compile(..., backend="mmgen", options={...})``.

        ``options`` may hold ``config`` (an :class:`OptimizeConfig`) and/or any field of it.
        """
        options = dict(options or {})
        base = options.pop("config", None) or cls()
        if not isinstance(base, cls):
            raise TypeError(f"options['config'] must be an OptimizeConfig, got {base!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown mmgen option(s) {unknown}; known options are {sorted(known)}"
            )
        return dataclasses.replace(base, **options) if options else base

    def key(self) -> str:
        """A stable text form used in the pass manager's uuid."""
        return repr(self)
