"""A tiny GPT trained on CPython's own documentation text, with both monitors (sequence models).

The language-model setting of Scherlis & Belrose (arXiv:2501.18812) in miniature, together with
the Hessian dynamics of Alabdulkareem (NeurIPS 2022): a
character-level GPT (pre-LayerNorm blocks, causal self-attention through
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, tied input/output
embeddings; about 1 M parameters by default) trained with AdamW on the text of
``pydoc_data.topics`` (the help topics shipped with every CPython: ~465 k characters, 103
distinct), entirely offline, on CPU.

Monitors (no user code for the attention: the analysis passes run SDPA on its math kernel,
training keeps the fused one):

* :class:`~lightning_hessian.callbacks.HessianMonitor`: trace, top eigenvalue and density of the
  Hessian of the token-mean next-character cross-entropy on a fixed analysis set of
  ``--analysis-sequences`` windows (default loss: ``[B, T, V]`` logits flattened over positions;
  micro-batches weighted by their token counts);
* :class:`~lightning_hessian.callbacks.LocalVolumeMonitor`: log prior probability of the
  behavioural neighbourhood (KL over the next-character distributions at every position,
  averaged over positions; cutoff 1e-2 nats; Gaussian measure under the initialisation prior;
  Adam-preconditioned directions).

Evaluations run every ``--steps-per-eval`` optimizer steps (``every_n_train_steps``), for
``--evaluations`` evaluations (``max_steps``).

    OMP_NUM_THREADS=2 python examples/tiny_gpt_text.py            # ~1 M params, a few minutes
    python examples/tiny_gpt_text.py --quick                      # smoke run (seconds)

Prints a table (step, training loss, trace, lambda_max, log-volume, seconds) and writes
``examples/outputs/tiny_gpt_text.png`` (trace / lambda_max / log-volume against steps).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor

OUTPUTS = Path(__file__).resolve().parent / "outputs"


# --------------------------------------------------------------------------------------------
# Data: character-level windows of pydoc_data.topics
# --------------------------------------------------------------------------------------------


def topics_text() -> str:
    """The help-topic texts shipped with CPython, in a fixed (sorted-key) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


class CharWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` characters: ``(x, y)`` = (chars, next chars)."""

    def __init__(self, text: str, seq_len: int, vocab: list[str] | None = None) -> None:
        self.vocab = vocab if vocab is not None else sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        self.ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        self.seq_len = seq_len
        self.count = (len(self.ids) - 1) // seq_len

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = i * self.seq_len
        chunk = self.ids[start : start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """GPT: token + learned position embeddings, pre-LN blocks, final LN, tied output embedding."""

    def __init__(self, vocab_size: int, seq_len: int, dim: int = 144, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(seq_len, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        x = self.ln(self.blocks(x))
        return x @ self.tok.weight.t()  # tied embeddings: [B, T, vocab] logits


class TinyGPTModule(pl.LightningModule):
    def __init__(
        self, vocab_size: int, seq_len: int, dim: int = 144, layers: int = 4, heads: int = 4, lr: float = 3e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.gpt = TinyGPT(vocab_size, seq_len, dim, layers, heads)
        self.lr = lr
        self.step_losses: list[float] = []

    def forward(self, ids: Tensor) -> Tensor:
        return self.gpt(ids)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, targets = batch
        logits = self(ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        self.step_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0, betas=(0.9, 0.99))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    pl.seed_everything(args.seed, verbose=False)
    data = CharWindows(topics_text(), args.seq_len)
    module = TinyGPTModule(len(data.vocab), args.seq_len, args.dim, args.layers, args.heads, args.lr)
    print(
        f"TinyGPT: {count_parameters(module):,} parameters, vocab {len(data.vocab)}, context {args.seq_len}, "
        f"{len(data):,} windows; analysis set {args.analysis_sequences} windows "
        f"({args.analysis_sequences * args.seq_len:,} tokens)"
    )
    common = dict(
        max_samples=args.analysis_sequences,
        analysis_batch_size=args.analysis_batch_size,
        seed=args.seed,
        every_n_train_steps=args.steps_per_eval,
    )
    hessian = HessianMonitor(num_runs=args.num_runs, num_steps=args.num_steps, log_density=False, **common)
    volume = LocalVolumeMonitor(num_directions=args.num_directions, **common)
    trainer = pl.Trainer(
        max_steps=args.evaluations * args.steps_per_eval,
        callbacks=[hessian, volume],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True))
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    rows = []
    for h, v in zip(hessian.history, volume.history, strict=False):
        step = int(h["step"])
        recent = module.step_losses[max(0, step - args.steps_per_eval) : step]
        rows.append(
            {
                "step": float(step),
                "train_loss": sum(recent) / max(1, len(recent)),
                "trace": h["trace"],
                "trace_stderr": h["trace_stderr"],
                "top_eigenvalue": h["top_eigenvalue"],
                "log_volume": v["log_volume"],
                "hessian_seconds": h["seconds"],
                "volume_seconds": v["seconds"],
            }
        )
    return rows


def print_table(rows: list[dict[str, float]]) -> None:
    header = (
        f"{'step':>6} {'loss':>6} {'trace':>12} {'±stderr':>10} {'lambda_max':>11} "
        f"{'log P(S)':>12} {'hess s':>7} {'vol s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{int(r['step']):>6} {r['train_loss']:>6.3f} {r['trace']:>12.4g} {r['trace_stderr']:>10.2g} "
            f"{r['top_eigenvalue']:>11.4g} "
            f"{r['log_volume']:>12.6g} {r['hessian_seconds']:>7.1f} {r['volume_seconds']:>7.1f}"
        )


def plot(rows: list[dict[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8), dpi=80)
    for ax, key, title in zip(
        axes,
        ("trace", "top_eigenvalue", "log_volume"),
        ("Hessian trace", "top eigenvalue", "log-volume (log P)"),
        strict=False,
    ):
        ax.plot(steps, [r[key] for r in rows], marker="o")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot written to {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and budgets (smoke run)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=144)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps-per-eval", type=int, default=40)
    parser.add_argument("--evaluations", type=int, default=6)
    parser.add_argument("--analysis-sequences", type=int, default=16)
    parser.add_argument("--analysis-batch-size", type=int, default=8, help="bounds the math-kernel attention memory")
    parser.add_argument("--num-runs", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=16)
    parser.add_argument("--num-directions", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=OUTPUTS / "tiny_gpt_text.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_len, args.dim, args.layers, args.heads = 16, 32, 1, 2
        args.steps_per_eval, args.evaluations, args.analysis_sequences = 5, 2, 4
        args.num_steps, args.num_directions, args.batch_size = 6, 4, 8
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print_table(rows)
    if rows and all(math.isfinite(r["trace"]) for r in rows):
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
