"""Operator classification for :mod:`torch_mmgen_opt.profiling`.

Which class (:data:`CLASSES`) a profiler event belongs to, by its name: aten and custom
ops by the op (:func:`classify_op`, with the ``cat`` dim and a ``matmul``'s children when
known), Inductor's generated kernels (``cpp_fused_*``, ``triton_*``) and library kernels
(cuBLAS, flash...) by the words in their names. :func:`_is_op` tells operator events
from framework spans; :func:`_classify_event` and :func:`_kernel_class` apply the rules
to a profiler event and to a GPU kernel with its launching op. No profiling happens here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

CLASSES = ("linear", "attention", "norm", "elementwise", "kv_cache", "conv", "other", "idle")


_LINEAR_OPS = {
    "linear", "mm", "addmm", "addmv", "mv", "dot", "einsum", "_int_mm", "_weight_int8pack_mm",
    "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu", "_weight_int4pack_mm_with_scales_and_zeros",
    "_convert_weight_to_int4pack", "_convert_weight_to_int4pack_for_cpu", "_addmm_activation",
    "mkldnn_linear", "_linear_pointwise", "qlinear_pointwise", "_scaled_mm", "_mixed_dtypes_linear",
}
_ATTENTION_OPS = {
    "bmm", "baddbmm", "softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax",
    "scaled_dot_product_attention",
}
_NORM_OPS = {
    "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm",
    "native_group_norm", "batch_norm", "native_batch_norm", "_batch_norm_impl_index",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "instance_norm",
    "_weight_norm", "_weight_norm_interface", "norm", "linalg_vector_norm", "rsqrt",
}
_KV_OPS = {
    "index_copy", "index_copy_", "index_select", "index_put", "index_put_", "_index_put_impl_",
    "_unsafe_index_put", "scatter", "scatter_", "slice_scatter", "select_scatter", "copy_",
}
_CONV_OPS = {
    "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "mkldnn_convolution", "cudnn_convolution",
    "_convolution_pointwise", "slow_conv2d_forward", "_slow_conv2d_forward",
    "slow_conv_transpose2d", "slow_conv3d_forward", "_conv_depthwise2d",
    "convolution_overrideable", "cudnn_convolution_transpose",
}
_ELEMENTWISE_OPS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "pow", "exp", "log",
    "sqrt", "reciprocal", "silu", "silu_", "gelu", "relu", "relu_", "tanh", "sigmoid", "erf",
    "sin", "cos", "abs", "clamp", "clamp_", "maximum", "minimum", "where", "masked_fill",
    "masked_fill_", "mean", "sum", "amax", "max", "min", "var", "std", "to", "_to_copy",
    "type_as", "clone", "contiguous", "fill_", "zero_", "leaky_relu", "elu", "hardtanh",
    "glu", "square", "rsub", "lerp", "addcmul", "cumsum", "tril", "triu", "eq", "ne", "lt",
    "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "bitwise_not", "cat",
    "stack", "_foreach_add", "dropout", "native_dropout", "softplus", "mish", "hardswish",
}
_GEMM_KERNEL = re.compile(r"gemm|gemv|cutlass|cublas|xmma|splitk|int8pack|int4pack")
_CONV_KERNEL = re.compile(r"conv|fprop|dgrad|wgrad")
_ATTN_KERNEL = re.compile(r"softmax|flash|fmha|attention|attn|sdpa|flex")
_KV_KERNEL = re.compile(r"index_copy|index_put|scatter|indexselect|index_select|catarray")
_NORM_KERNEL = re.compile(r"rsqrt|norm(?!al)")
_ELEMENTWISE_KERNEL = re.compile(r"fused|elementwise|vectorized|reduce|copy|poi_|red_|per_")


def _is_op(name: str) -> bool:
    """Operator events (aten/custom ops, Inductor kernels) as opposed to framework spans."""
    if name.startswith("#") or name.startswith("Torch-Compiled") or name.startswith("TorchDynamo"):
        return False
    if "::" in name:
        return True
    return "cpp_fused" in name or name.startswith(("triton_", "cpp_", "kernel_cpp"))


def classify_op(name: str, *, cat_dim: int | None = None, child_names: Sequence[str] = ()) -> str:
    """The operator class (one of :data:`CLASSES` but ``idle``) of a profiler event name.

    Args:
        name: an operator name (``aten::mm``, ``mylib::decode_attention``) or a kernel
            name (``graph_0_cpp_fused__softmax_add_0``, ``triton_red_fused_mean_rsqrt_1``,
            ``ampere_bf16_s16816gemm_...``).
        cat_dim: for ``aten::cat``, the ``dim`` argument when known: a concatenation along
            the last dim (``rotate_half``, feature concat) is ``elementwise``; any other
            dim is a cache append (``kv_cache``).
        child_names: names of the events the op called; ``aten::matmul`` calling ``bmm``
            is attention (batched, e.g. ``q @ k^T``), calling ``mm`` it is linear.
    """
    low = name.lower()
    ns, sep, base = low.rpartition("::")
    if sep:
        base = base.split(".")[0]
        if base == "cat":
            return "elementwise" if cat_dim == -1 else "kv_cache"
        if base in ("matmul", "einsum"):
            batched = any(c.rsplit("::", 1)[-1] in ("bmm", "baddbmm") for c in child_names)
            return "attention" if batched else "linear"
        for cls, ops in (
            ("linear", _LINEAR_OPS),
            ("attention", _ATTENTION_OPS),
            ("conv", _CONV_OPS),
            ("norm", _NORM_OPS),
            ("kv_cache", _KV_OPS),
            ("elementwise", _ELEMENTWISE_OPS),
        ):
            if base in ops:
                return cls
        if base.startswith("_scaled_dot_product") or base.startswith(("_flash", "_efficient_att")):
            return "attention"
        if ns in ("aten", "prims"):
            return "other"
        # custom ops: by the words in their name
        return _classify_kernel(base, default="other")
    return _classify_kernel(re.sub(r"^graph_\d+_", "", low), default="elementwise")


def _classify_kernel(name: str, default: str) -> str:
    tokens = set(re.split(r"[^a-z0-9]+", name))
    if _ATTN_KERNEL.search(name) or tokens & {"bmm", "baddbmm"}:
        return "attention"
    if _CONV_KERNEL.search(name):
        return "conv"
    if _GEMM_KERNEL.search(name) or tokens & {"mm", "addmm", "linear", "matmul"}:
        return "linear"
    if _KV_KERNEL.search(name):
        return "kv_cache"
    if _NORM_KERNEL.search(name):
        return "norm"
    if _ELEMENTWISE_KERNEL.search(name):
        return "elementwise"
    return default


def _classify_event(ev: Any) -> str:
    name = ev.name
    cat_dim = None
    if name == "aten::cat":
        concrete = getattr(ev, "concrete_inputs", None) or []
        if len(concrete) > 1 and isinstance(concrete[1], int):
            cat_dim = concrete[1]
    children = [c.name for c in ev.cpu_children] if name in ("aten::matmul", "aten::einsum") else ()
    return classify_op(name, cat_dim=cat_dim, child_names=children)


def _kernel_class(top: Any, kernel_name: str) -> str:
    """A kernel's class: that of the top-level op that launched it, else its own name's
    (kernels launched by Inductor's wrapper or a CUDA graph replay)."""
    if top is None:
        return classify_op(kernel_name)
    cls = _classify_event(top)
    if cls == "other" and not top.name.startswith("aten::"):
        cls = classify_op(kernel_name)
    return cls
