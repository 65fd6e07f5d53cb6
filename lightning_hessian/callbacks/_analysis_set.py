"""The analysis set: a fixed, seeded subset of the training data with a deterministic loader."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

__all__ = ["AnalysisSet"]

def _plain_dataloader(loader: Any) -> DataLoader | None:
    """The single DataLoader behind ``trainer.train_dataloader`` (or ``None``)."""
    if isinstance(loader, DataLoader):
        return loader
    flattened = getattr(loader, "flattened", None)  # CombinedLoader
    if isinstance(flattened, list) and len(flattened) == 1 and isinstance(flattened[0], DataLoader):
        return flattened[0]
    if isinstance(loader, (list, tuple)) and len(loader) == 1 and isinstance(loader[0], DataLoader):
        return loader[0]
    return None


class AnalysisSet:
    """A fixed, seeded subset of a dataset, served by a deterministic micro-batched loader.

    Indices are drawn once (``torch.randperm`` with ``seed``), kept sorted, and restored from
    checkpoints, so every epoch (and every resumed run) analyses exactly the same samples. Under
    DDP each process takes the strided shard ``indices[rank::world_size]``: disjoint shards
    whose union is the single-process set. An ``IterableDataset`` cannot be indexed: its first
    samples up to the requested size are taken (``max_samples`` required there).
    """

    def __init__(
        self,
        fraction: float,
        seed: int,
        batch_size: int,
        max_samples: int | None,
    ) -> None:
        self.fraction = fraction
        self.seed = seed
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.indices: list[int] | None = None
        self.dataset_length: int | None = None

    def draw(self, length: int) -> list[int]:
        count = max(1, int(round(self.fraction * length)))
        if self.max_samples is not None:
            count = min(count, self.max_samples)
        generator = torch.Generator().manual_seed(self.seed)
        return sorted(torch.randperm(length, generator=generator)[:count].tolist())

    def loader(
        self,
        dataset: Dataset | None,
        template: DataLoader | None,
        rank: int,
        world_size: int,
        explicit_loader: DataLoader | None = None,
    ) -> DataLoader | list[Any]:
        """The deterministic loader over this process's shard."""
        if explicit_loader is not None:
            if world_size > 1:
                return [b for i, b in enumerate(explicit_loader) if i % world_size == rank]
            return explicit_loader
        if dataset is None:
            raise ValueError(
                "No dataset to analyse: the trainer has no single train DataLoader. Pass "
                "`dataset=` or `dataloader=` to the callback."
            )
        collate = template.collate_fn if template is not None else None
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            if self.max_samples is None:
                raise ValueError(
                    "The training dataset has no length (IterableDataset); pass `max_samples=` "
                    "so that its first `max_samples` samples form the analysis set."
                )
            samples = []
            for sample in dataset:
                samples.append(sample)
                if len(samples) >= self.max_samples:
                    break
            if not samples:
                raise ValueError("The training dataset yielded no samples for the analysis set.")
            shard = samples[rank::world_size]
            return DataLoader(shard, batch_size=self.batch_size, shuffle=False, collate_fn=collate)  # type: ignore[arg-type]
        length = len(dataset)
        if length == 0:
            raise ValueError("The training dataset is empty: there is nothing to analyse.")
        if self.indices is None or self.dataset_length != length:
            if self.indices is not None and self.dataset_length != length:
                rank_zero_warn(
                    f"The training dataset changed size ({self.dataset_length} -> {length}); "
                    "redrawing the analysis set."
                )
            self.indices = self.draw(length)
            self.dataset_length = length
        shard = self.indices[rank::world_size]
        return DataLoader(
            Subset(dataset, shard),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=0,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"indices": self.indices, "dataset_length": self.dataset_length, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.indices = state.get("indices")
        self.dataset_length = state.get("dataset_length")
