"""Train a small byte-level Llama with the LayerSkip recipe (Elhoushi et al., 2024).

``python -m torch_mmgen_opt.train_layerskip [--steps N] [--out PATH] [--threads T]``

What it trains: :class:`torch_mmgen_opt.models.llama.Llama` (byte vocabulary of 256, so no
tokenizer) on the Python standard library's own sources, which every machine that runs this
package has: the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages``
and the ``test`` packages excluded), taken in sorted relative-path order. The split is by
file: every ``heldout_every``-th file of that order is held out for evaluation.

The recipe, both halves of it:

- **layer dropout rising with depth**: per sample, layer ``l`` is skipped (its residual
  branch dropped, no rescaling) with probability ``p_l = p_max * l / (L - 1)``; the first
  layer is never dropped, the last with ``p_max``. Skipped rows are not computed.
- **early-exit loss through the shared head**: the hidden state after every layer ``l`` goes
  through the model's own final ``norm`` and ``lm_head`` and gets a cross-entropy loss.
  Weights rise with depth as in the paper, ``e_l = e_scale * sum_{i<=l} i`` for ``l < L-1``
  and ``e_{L-1} = L - 1 + e_scale * sum_{i<=L-2} i``, normalised over the layers active at
  the step. Curriculum: *rotational*: at step ``t`` the early exits ``l`` with
  ``(l + t) % rotation == 0`` are active; the last layer always is.

Determinism: a seed fixes the init, the window sampling and the layer-dropout draws; the
number of steps is fixed (not wall time). Bit-identical reruns need the same thread count
and the same CPython standard library (the shipped checkpoint names the one it used).

Output: the checkpoint (``{"config": dict, "state_dict": bf16 tensors, "meta": dict}``) and
a Markdown report with the training log and the held-out perplexity of every exit layer,
measured on the bf16-rounded weights that ship.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from torch_mmgen_opt.models.llama import Llama, LlamaConfig, rope_cos_sin

__all__ = ["TrainConfig", "load_corpus", "exit_weights", "forward_exits", "train", "main"]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # model: ~5.9M parameters, 11.8 MB in bf16
    dim: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_hidden: int = 688
    # data
    seq_len: int = 128
    batch_size: int = 16
    heldout_every: int = 20
    max_files: int | None = None
    # optimisation
    steps: int = 420
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # LayerSkip
    p_max: float = 0.2
    e_scale: float = 1.0
    rotation: int = 2
    # bookkeeping
    seed: int = 0
    log_every: int = 20
    eval_windows: int = 128

    def model_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=256, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, ffn_hidden=self.ffn_hidden, max_seq_len=2048,
        )


def load_corpus(heldout_every: int, max_files: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The stdlib ``*.py`` files as two uint8 byte streams ``(train, heldout)`` and a file count.

    Files are joined with a NUL byte in sorted relative-path order; file ``i`` is held out
    when ``i % heldout_every == 0``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
        and not p.relative_to(root).parts[0].startswith("test")
    )
    if max_files is not None:
        files = files[:max_files]
    if not files:
        raise ValueError(f"no *.py files under the standard library path {root}")
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        (held if i % heldout_every == 0 else train).extend(path.read_bytes() + b"\0")
    return (
        torch.frombuffer(train, dtype=torch.uint8).clone(),
        torch.frombuffer(held, dtype=torch.uint8).clone(),
        len(files),
    )


def exit_weights(n_layers: int, e_scale: float) -> torch.Tensor:
    """(L,) un-normalised early-exit loss weights, rising with depth (paper's formula)."""
    w = [e_scale * sum(range(li + 1)) for li in range(n_layers - 1)]
    w.append(n_layers - 1 + e_scale * sum(range(n_layers - 1)))
    return torch.tensor(w, dtype=torch.float32)


def forward_exits(
    model: Llama,
    input_ids: torch.Tensor,
    *,
    drop_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    exits: list[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Run the decoder on ``input_ids`` (B, T); return ``{l: logits (B, T, V)}`` after layer ``l``.

    Each exit goes through the model's shared final norm and head. ``drop_probs`` (L,) enables
    per-sample layer dropout: a dropped row keeps its input for that layer, uncomputed.
    """
    B, T = input_ids.shape
    L = len(model.layers)
    exits = list(range(L)) if exits is None else exits
    pos = torch.arange(T, device=input_ids.device)
    x = model.embed_tokens(input_ids)
    cos, sin = rope_cos_sin(pos.unsqueeze(0).expand(B, T), model.config.head_dim,
                            model.config.rope_theta, x.dtype)
    mask = Llama._mask(pos, T, None, x.dtype, need=True)
    out: dict[int, torch.Tensor] = {}
    for li, layer in enumerate(model.layers):
        if drop_probs is not None and drop_probs[li] > 0:
            keep = torch.rand(B, generator=generator) >= drop_probs[li]
            idx = keep.nonzero().squeeze(1)
            if idx.numel() == B:
                x, _ = layer(x, cos, sin, mask, None, pos)
            elif idx.numel() > 0:
                y, _ = layer(x[idx], cos[idx], sin[idx], mask, None, pos)
                x = x.index_put((idx,), y)
        else:
            x, _ = layer(x, cos, sin, mask, None, pos)
        if li in exits:
            out[li] = model.lm_head(model.norm(x))
    return out


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    return data[idx].long()  # (B, T+1)


@torch.no_grad()
def evaluate(model: Llama, held: torch.Tensor, cfg: TrainConfig, batch: int = 16) -> list[float]:
    """Held-out perplexity (per byte) after every exit layer, on evenly spaced windows."""
    model.eval()
    n = min(cfg.eval_windows, (held.numel() - 1) // (cfg.seq_len + 1))
    stride = (held.numel() - cfg.seq_len - 1) // max(1, n)
    starts = torch.arange(n) * stride
    L = cfg.n_layers
    total = torch.zeros(L, dtype=torch.float64)
    count = 0
    for i in range(0, n, batch):
        w = _windows(held, starts[i : i + batch], cfg.seq_len)
        logits = forward_exits(model, w[:, :-1])
        for li in range(L):
            total[li] += F.cross_entropy(
                logits[li].flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum"
            ).double()
        count += w[:, 1:].numel()
    return [math.exp(v / count) for v in total.tolist()]


def train(cfg: TrainConfig, *, out: Path | None = None, report: Path | None = None) -> dict[str, Any]:
    """Train, evaluate and (when ``out`` is given) save; returns the checkpoint dict."""
    t_start = time.perf_counter()
    log: list[str] = []

    def say(msg: str) -> None:
        log.append(msg)
        print(msg, flush=True)

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_data, held, n_files = load_corpus(cfg.heldout_every, cfg.max_files)
    say(f"corpus: {n_files} files, {train_data.numel()} train bytes, {held.numel()} held-out "
        f"bytes (CPython {platform.python_version()})")
    model = Llama(cfg.model_config())
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params / 1e6:.2f}M parameters, {cfg.n_layers} layers, dim {cfg.dim}")
    L = cfg.n_layers
    drop = torch.tensor([cfg.p_max * li / max(1, L - 1) for li in range(L)])
    w_all = exit_weights(L, cfg.e_scale)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    model.train()
    hi = train_data.numel() - cfg.seq_len - 1
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        starts = torch.randint(0, hi, (cfg.batch_size,), generator=gen)
        w = _windows(train_data, starts, cfg.seq_len)
        active = [li for li in range(L - 1) if (li + step) % cfg.rotation == 0 and w_all[li] > 0]
        active.append(L - 1)
        logits = forward_exits(model, w[:, :-1], drop_probs=drop, generator=gen, exits=active)
        wa = w_all[active] / w_all[active].sum()
        losses = {
            li: F.cross_entropy(logits[li].flatten(0, 1), w[:, 1:].flatten()) for li in active
        }
        loss = sum(wa[i] * losses[li] for i, li in enumerate(active))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            el = time.perf_counter() - t0
            per = " ".join(f"L{li + 1}={losses[li].item():.3f}" for li in active)
            say(f"step {step:5d} lr {_lr(cfg, step):.2e} loss {loss.item():.4f} [{per}] "
                f"{el:7.1f}s")
    train_s = time.perf_counter() - t0
    sd = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    # evaluate what ships: the bf16-rounded weights
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    ppl = evaluate(model, held, cfg)
    say("held-out perplexity per exit layer: "
        + " ".join(f"E{li + 1}={p:.3f}" for li, p in enumerate(ppl)))
    meta = {
        "train_config": dataclasses.asdict(cfg),
        "heldout_ppl": ppl,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "train_seconds": train_s,
        "n_params": n_params,
    }
    ckpt = {"config": dataclasses.asdict(cfg.model_config()), "state_dict": sd, "meta": meta}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, out)
        say(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if report is not None:
        _write_report(report, cfg, log, ppl, meta, time.perf_counter() - t_start)
    return ckpt


def _write_report(path: Path, cfg: TrainConfig, log: list[str], ppl: list[float],
                  meta: dict[str, Any], total_s: float) -> None:
    rows = "\n".join(f"| {li + 1} | {p:.3f} | {math.log2(p):.3f} |" for li, p in enumerate(ppl))
    args = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
    text = f"""# layerskip_llama.pt

Byte-level Llama ({meta['n_params'] / 1e6:.2f}M parameters, {cfg.n_layers} layers, dim {cfg.dim},
{cfg.n_heads} heads / {cfg.n_kv_heads} KV heads, vocab 256) trained with the LayerSkip recipe
by `python -m torch_mmgen_opt.train_layerskip` (see its docstring for the recipe) on the
CPython {meta['python']} standard library sources, torch {meta['torch']}, {meta['threads']}
thread(s). Training took {meta['train_seconds']:.0f} s ({total_s:.0f} s end to end). Weights
stored in bf16.

Config: `{args}`

## Held-out perplexity per exit layer

Exit after layer E through the shared final norm and LM head; perplexity per byte on
{cfg.eval_windows} windows of {cfg.seq_len} bytes from held-out files (every
{cfg.heldout_every}th file), bf16 weights.

| exit layer E | perplexity | bits/byte |
|---:|---:|---:|
{rows}

## Training log

```
{chr(10).join(log)}
```
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    p.add_argument("--dim", type=int, default=TrainConfig.dim)
    p.add_argument("--n-layers", type=int, default=TrainConfig.n_layers)
    p.add_argument("--ffn-hidden", type=int, default=TrainConfig.ffn_hidden)
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=TrainConfig.eval_windows)
    p.add_argument("--log-every", type=int, default=TrainConfig.log_every)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=CHECKPOINT_DIR / "layerskip_llama.pt")
    p.add_argument("--report", type=Path, default=None,
                   help="Markdown report (default: --out with .md)")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    cfg = TrainConfig(
        steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, dim=a.dim,
        n_layers=a.n_layers, ffn_hidden=a.ffn_hidden, max_files=a.max_files,
        eval_windows=a.eval_windows, log_every=a.log_every, seed=a.seed,
    )
    train(cfg, out=a.out, report=a.report or a.out.with_suffix(".md"))


if __name__ == "__main__":
    main(sys.argv[1:])
