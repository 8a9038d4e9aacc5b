"""Packaging for torch_mmgen_opt.

``passes/`` sits at the top level of the repository (one file per FX pass) and is
installed as ``torch_mmgen_opt.passes`` through ``package_dir``; the package list is
explicit so nothing else in the repository is picked up by accident.
"""

from setuptools import setup

setup(
    name="torch_mmgen_opt",
    version="0.1.0",
    description=(
        "torch.compile graph passes for multimodal generation inference: fused attention, "
        "weight-only quantization, LayerSkip self-speculation and static KV caches"
    ),
    python_requires=">=3.10",
    packages=[
        "torch_mmgen_opt",
        "torch_mmgen_opt.kernels",
        "torch_mmgen_opt.models",
        "torch_mmgen_opt.runtime",
        "torch_mmgen_opt.testing",
        "torch_mmgen_opt.passes",
    ],
    package_dir={"torch_mmgen_opt.passes": "passes"},
    package_data={"torch_mmgen_opt": ["checkpoints/*.pt", "checkpoints/*.md", "kernels/csrc/*.cpp"]},
    # torch's CUDA wheels already bring the matching triton; a CPU build needs none.
    install_requires=["torch>=2.11", "sympy"],
    extras_require={
        "test": ["pytest", "pytest-xdist", "expecttest", "transformers>=4.46"],
        "bench": ["matplotlib", "tqdm"],
        "lint": ["ruff"],
    },
    entry_points={
        "torch_dynamo_backends": ["mmgen = torch_mmgen_opt.api:mmgen_backend"],
    },
)
