"""FSDP2: HessianMonitor and LocalVolumeMonitor on a ``fully_shard`` model, 2 CPU processes (gloo).

``configure_model`` shards every layer and the root with ``torch.distributed.fsdp.fully_shard``
over the data-parallel mesh of ``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)``; each process holds half of every parameter. The monitors detect the
DTensor parameters and analyse the sharded model: Hessian-vector products by finite differences
of the sharded module's own gradients, Lanczos vectors and volume directions sharded like the
parameters, every inner product one all-reduce of scalars. Both processes log the same numbers,
equal to a single-process run on the same analysis set (``tests/test_sharded.py``).

Fully offline (scikit-learn's bundled digits). Lightning re-launches this script for rank 1.

    python examples/fsdp2_monitor.py                 # 3 epochs, ~1 minute on 2 CPU cores
    python examples/fsdp2_monitor.py --epochs 5 --hidden 128
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor


def digits() -> TensorDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long))


class ShardedMLP(pl.LightningModule):
    """A 64-h-h-10 tanh MLP sharded with FSDP2 in ``configure_model``.

    A smooth activation: finite differences of a ReLU network's gradients also see the kinks the
    exact (almost everywhere) Hessian ignores.
    """

    def __init__(self, hidden: int = 64, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10)
        )

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    hessian = HessianMonitor(num_runs=2, num_steps=20, top_k=2, analysis_fraction=0.1, log_density=False)
    volume = LocalVolumeMonitor(num_directions=16, analysis_fraction=0.1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=args.epochs,
        callbacks=[hessian, volume],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ShardedMLP(args.hidden), DataLoader(digits(), batch_size=64, shuffle=True))
    print(f"[rank {trainer.global_rank}] epoch  trace       top_eigenvalue  log_volume  (HVPs: finite differences)")
    for row, vol in zip(hessian.history, volume.history, strict=True):
        rank, epoch, top = trainer.global_rank, int(row["epoch"]), row["top_eigenvalue"]
        print(f"[rank {rank}] {epoch:5d}  {row['trace']:10.4f}  {top:14.6f}  {vol['log_volume']:10.2f}")


if __name__ == "__main__":
    main()
