"""The shipped LayerSkip checkpoint: a byte-level Llama trained for early exit.

``llama_layerskip()`` loads ``torch_mmgen_opt/checkpoints/layerskip_llama.pt`` (made by
``python -m torch_mmgen_opt.train_layerskip``; its training log and held-out perplexity
per exit layer are in ``layerskip_llama.md`` beside it). Vocabulary: the 256 byte values,
so :func:`encode` / :func:`decode` are all the tokenizer there is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .llama import Llama, LlamaConfig

__all__ = ["CHECKPOINT", "decode", "encode", "llama_layerskip"]

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "layerskip_llama.pt"


def llama_layerskip(
    path: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Llama:
    """The trained checkpoint as a :class:`Llama` in eval mode.

    Args:
        path: another checkpoint written by ``train_layerskip`` (default: the shipped one).
        dtype: parameter dtype (default float32; the file stores bf16).
        device: where to put it.
    """
    path = Path(path) if path is not None else CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(
            f"no LayerSkip checkpoint at {path}; train one with "
            "`python -m torch_mmgen_opt.train_layerskip --out PATH`"
        )
    # TorchVersion: an early checkpoint stored torch.__version__ unconverted in its meta.
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    model = Llama(LlamaConfig(**ckpt["config"]))
    model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    model = model.to(dtype=dtype or torch.float32)
    if device is not None:
        model = model.to(device)
    return model.eval()


def encode(text: str | bytes) -> torch.Tensor:
    """Text (UTF-8) -> (1, n) long byte ids."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    return torch.tensor([list(data)], dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    """(n,) or (1, n) byte ids -> text (undecodable bytes replaced)."""
    return bytes(int(i) for i in ids.flatten().tolist()).decode("utf-8", errors="replace")
