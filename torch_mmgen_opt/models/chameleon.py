"""Chameleon-style early fusion: one decoder over text tokens and VQ image tokens.

Chameleon (Meta, 2024) turns an image into a sequence of discrete VQ-VAE codes (1024 per
512x512 image, a codebook of 8192) and puts them in the same vocabulary as text, so one
decoder-only transformer reads and writes both. Architecturally it is Llama plus QK-norm
(queries and keys normalised per head before RoPE, which kept its training stable), so this
module is the reference :class:`~torch_mmgen_opt.models.llama.Llama` with ``qk_norm=True``
and a shared vocabulary laid out as::

    [0, text_vocab_size)                    text (0 = pad, 1 = bos, 2 = eos)
    boi = text_vocab_size                   begin of image
    eoi = text_vocab_size + 1               end of image
    [image_start, image_start + image_vocab_size)   VQ image codes, image_start = boi + 2

An image is ``image_seq_len`` codes between ``boi`` and ``eoi``. Generation with
classifier-free guidance and captioning live in :mod:`torch_mmgen_opt.runtime.cfg`. The VQ
tokenizer itself (pixels <-> codes) is not part of this workload: only the decoder runs
per token, which is what the paper characterises.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .llama import Llama, LlamaConfig

__all__ = ["Chameleon", "ChameleonConfig", "SIZES", "build_model"]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass
class ChameleonConfig(LlamaConfig):
    text_vocab_size: int = 256
    image_vocab_size: int = 64  # VQ codebook size (8192 at full size)
    image_seq_len: int = 16  # codes per image (1024 at full size)
    qk_norm: bool = True

    def __post_init__(self) -> None:
        if self.text_vocab_size <= EOS_ID or self.image_vocab_size < 1 or self.image_seq_len < 1:
            raise ValueError(
                "ChameleonConfig needs text_vocab_size > 2 (pad, bos, eos are text ids), "
                "image_vocab_size >= 1 and image_seq_len >= 1; got "
                f"{self.text_vocab_size}, {self.image_vocab_size}, {self.image_seq_len}"
            )
        # The vocabulary is derived from its parts, never given separately.
        self.vocab_size = self.text_vocab_size + 2 + self.image_vocab_size
        super().__post_init__()

    @property
    def boi_id(self) -> int:
        return self.text_vocab_size

    @property
    def eoi_id(self) -> int:
        return self.text_vocab_size + 1

    @property
    def image_start(self) -> int:
        return self.text_vocab_size + 2

    @property
    def image_end(self) -> int:
        """One past the last image-code id."""
        return self.image_start + self.image_vocab_size


SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        text_vocab_size=256, image_vocab_size=64, image_seq_len=16,
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=172,
    ),
    # CPU benchmark: the Llama `small` decoder (weights far beyond the L3) with the full
    # 8192-code image vocabulary; 256-token images keep a CPU run in minutes.
    "small": dict(
        text_vocab_size=8192, image_vocab_size=8192, image_seq_len=256,
        dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_hidden=2816,
    ),
    # Chameleon-7B shapes: 65536 tokens in all, 8192 of them image codes, 1024 per image.
    "7b": dict(
        text_vocab_size=65536 - 8192 - 2, image_vocab_size=8192, image_seq_len=1024,
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008, max_seq_len=4096,
    ),
}


class Chameleon(Llama):
    """The reference Llama over the shared text + image vocabulary, QK-norm on."""

    config: ChameleonConfig

    def __init__(self, cfg: ChameleonConfig) -> None:
        if not isinstance(cfg, ChameleonConfig):
            raise TypeError(f"Chameleon needs a ChameleonConfig, got {type(cfg).__name__}")
        super().__init__(cfg)

    def image_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes in ``[0, image_vocab_size)`` -> vocabulary ids."""
        return codes + self.config.image_start

    def image_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of image tokens -> VQ codes."""
        return ids - self.config.image_start


def build_model(size: str = "tiny", **overrides: Any) -> Chameleon:
    if size not in SIZES:
        raise ValueError(f"unknown chameleon size {size!r}; pass one of {sorted(SIZES)}")
    known = {f.name for f in fields(ChameleonConfig)} - {"vocab_size"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown ChameleonConfig field(s) {unknown} (vocab_size is derived from "
            f"text_vocab_size + 2 + image_vocab_size); known: {sorted(known)}"
        )
    return Chameleon(ChameleonConfig(**{**SIZES[size], **overrides}))
