"""FX graph passes of torch_mmgen_opt, one file per transform.

Installed as ``torch_mmgen_opt.passes`` (see ``setup.py``). Each module defines ``PASS``, a
:class:`torch_mmgen_opt.graph_utils.GraphPass`; :func:`all_passes` imports them lazily in
the order they run within a stage. Modules here import only leaf modules of the package
(``config``, ``graph_utils``, ``kernels``), never the package root.
"""

from __future__ import annotations

import importlib

# Order matters within a stage: attention fusion before quantization, so that the
# projections feeding SDPA are still plain mm/addmm when quantize_linear looks for them.
PASS_MODULES: tuple[str, ...] = (
    "fuse_attention",
    "quantize_linear",
    "hstu_attention",
    "static_kv_shapes",
    "skip_layers",
    "decode_gemv",
    "searchsorted_slice",
)


def all_passes() -> list:
    """Every registered :class:`GraphPass`, in run order."""
    return [
        importlib.import_module(f"{__name__}.{name}").PASS for name in PASS_MODULES
    ]
