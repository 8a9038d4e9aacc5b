"""Reference workloads, written the way eager baseline code is written in the wild.

``build(name, size="tiny", **overrides)`` returns a model with random weights (or a
trained checkpoint where one ships) in eval mode. Sizes: ``tiny`` (tests, seconds),
``small`` (the CPU benchmark: weights far larger than the L3 cache) and the real shapes
(``7b`` ...) for GPU runs.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

__all__ = ["build", "WORKLOADS"]

# workload name -> module in this package that defines `build_model(size, **overrides)`
WORKLOADS: dict[str, str] = {
    "llama": "llama",
    "seamless": "seamless",
    "chameleon": "chameleon",
    "hstu": "hstu",
}


def build(
    name: str,
    size: str = "tiny",
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int | None = 0,
    **overrides: Any,
) -> torch.nn.Module:
    """Build reference workload ``name`` at ``size`` (random weights, eval mode).

    Args:
        name: one of :data:`WORKLOADS`.
        size: a named size of that workload (``"tiny"``, ``"small"``, ...).
        dtype: parameter dtype (default float32).
        device: where to put it.
        seed: seeds the random weights (``None`` leaves the global RNG alone).
        overrides: fields of the workload's config dataclass.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; pass one of {sorted(WORKLOADS)}")
    module = importlib.import_module(f".{WORKLOADS[name]}", __name__)
    if seed is not None:
        # manual_seed also seeds every CUDA generator, and a model built under
        # ``with torch.device("cuda")`` draws from them: fork those too
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            model = module.build_model(size, **overrides)
    else:
        model = module.build_model(size, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()
