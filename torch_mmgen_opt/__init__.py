"""torch_mmgen_opt: torch.compile graph passes for multimodal generation inference.

    import torch_mmgen_opt as mmgen
    model = mmgen.optimize(model)                       # or @mmgen.optimize(...)
    model = torch.compile(model, backend="mmgen")       # the same passes

See ``docs/architecture.md``.
"""

from __future__ import annotations

from typing import Any

from .api import explain, mmgen_backend, optimize
from .config import AttentionConfig, CompileConfig, LayerSkip, OptimizeConfig, QuantizeConfig

__all__ = [
    "AttentionConfig",
    "CompileConfig",
    "LayerSkip",
    "OptimizeConfig",
    "QuantizeConfig",
    "characterize",
    "explain",
    "generate",
    "mmgen_backend",
    "models",
    "optimize",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Heavier parts load on first use so that `import torch_mmgen_opt` stays cheap.
    if name == "generate":
        from .runtime.generate import generate

        return generate
    if name == "characterize":
        from .profiling import characterize

        return characterize
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
