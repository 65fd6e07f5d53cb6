"""The analysis set: a fixed, seeded subset of the training data, read once and kept for the run."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from lightning_hessian.callbacks._isolation import (
    HeldGenerator,
    derived_seed,
    find_held_generators,
    forked_global_rngs,
    preserved_generators,
)
from lightning_hessian.operators._batches import _move, _nbytes

__all__ = ["DEFAULT_MAX_ANALYSIS_BYTES", "AnalysisSet"]

DEFAULT_MAX_ANALYSIS_BYTES = 1 << 30
# The memory guard projects the set's size from its first samples (and refuses before reading on).
_ESTIMATE_SAMPLES = 8
# The kept batches move to the accelerator when they take at most this fraction of its free memory.
_DEVICE_MEMORY_FRACTION = 0.1


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


def _describe(obj: Any) -> str:
    return type(obj).__name__


class AnalysisSet:
    """A fixed, seeded subset of a dataset, read once into collated micro-batches and kept.

    **Which samples.** Indices are drawn once (``torch.randperm`` with ``seed``), kept sorted and
    restored from checkpoints. Under DDP each process takes the strided shard
    ``indices[rank::world_size]``: disjoint shards whose union is the single-process set. An
    ``IterableDataset`` cannot be indexed: its first ``max_samples`` samples form the set (each
    process then keeps its strided shard of them).

    **Read once, augmentation frozen.** :meth:`materialize` reads the samples a single time (the
    first call; later calls return the kept batches) and keeps the collated micro-batches for the
    whole run, so every evaluation analyses the same tensors, whatever random transforms the
    dataset applies. During the read Python's, NumPy's and torch's global RNGs (CPU and CUDA) are
    forked: sample ``i`` is read with all of them seeded from ``(seed, i)`` alone, and so is every
    random generator the dataset holds (``torch.Generator``, ``numpy.random.Generator`` /
    ``RandomState``, ``random.Random``, found through wrappers, ``Subset``/``ConcatDataset`` and
    transform closures). Augmentations are thereby frozen at one seeded draw that depends neither on
    when the set is read, nor on the number of processes, nor on the training run; a resumed run
    reads exactly the same tensors. An ``IterableDataset`` is read with the global RNGs seeded once
    from ``seed`` (its own generators are not reseeded: the set is the stream's first samples).

    **Isolation.** All those RNG states, the dataset's generators included, are restored after the
    read, so training draws exactly what it would have drawn without it. A dataset that holds state
    no snapshot can restore (a Python generator or iterator, e.g. a one-shot stream) is read from a
    ``copy.deepcopy``; when that copy fails a warning names the dataset and the workaround
    (``dataset=``: a separate instance to analyse).

    **Memory.** The batches are kept in host memory, at most ``max_bytes`` per process (reading
    more raises ``ValueError`` naming the fix); on a CUDA model they are moved to the device when
    they take at most 10% of its free memory (no host-to-device copy per evaluation).

    Args:
        fraction: Fraction of a map-style dataset in the set.
        seed: Seed of the indices and of the read's random state.
        batch_size: Samples per collated micro-batch.
        max_samples: Cap on the set's size (required for an ``IterableDataset``).
        max_bytes: Host-memory budget of the kept batches, per process.
    """

    def __init__(
        self,
        fraction: float,
        seed: int,
        batch_size: int,
        max_samples: int | None,
        max_bytes: int = DEFAULT_MAX_ANALYSIS_BYTES,
    ) -> None:
        self.fraction = fraction
        self.seed = seed
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.indices: list[int] | None = None
        self.dataset_length: int | None = None
        self.nbytes = 0
        self.num_samples = 0
        self.read_seconds = 0.0
        self._batches: list[Any] | None = None
        self._source: tuple[Any, int, int] | None = None
        self._warned_isolation = False
        # [rank, world size, float64 sum of the set's floats]: a changed dataset is noticed on resume
        self.fingerprint: list[float] | None = None
        self._saved_fingerprint: list[float] | None = None

    # ------------------------------------------------------------------ indices

    def draw(self, length: int) -> list[int]:
        """The sorted global indices for a dataset of ``length`` samples (seeded, no RNG state touched)."""
        count = max(1, int(round(self.fraction * length)))  # noqa: RUF046 - `fraction` may be a NumPy scalar
        if self.max_samples is not None:
            count = min(count, self.max_samples)
        generator = torch.Generator().manual_seed(self.seed)
        return sorted(torch.randperm(length, generator=generator)[:count].tolist())

    def shard_indices(self, length: int, rank: int, world_size: int) -> list[int]:
        """This process's indices ``indices[rank::world_size]``, drawing the global set if needed."""
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
        return self.indices[rank::world_size]

    # ------------------------------------------------------------------ the read

    @property
    def materialized(self) -> bool:
        """Whether the batches have been read and are kept."""
        return self._batches is not None

    @property
    def first_batch(self) -> Any | None:
        """This process's first kept micro-batch (``None`` before the read or for an empty shard)."""
        return self._batches[0] if self._batches else None

    def clear(self) -> None:
        """Drop the kept batches (the next :meth:`materialize` reads again, identically)."""
        self._batches = None
        self._source = None

    def materialize(
        self,
        dataset: Dataset | None,
        template: DataLoader | None,
        rank: int,
        world_size: int,
        explicit_loader: DataLoader | None = None,
        device: torch.device | None = None,
    ) -> list[Any]:
        """This process's collated micro-batches, read on the first call and kept (idempotent).

        Args:
            dataset: The dataset to subsample (ignored with ``explicit_loader``).
            template: The training DataLoader whose ``collate_fn`` collates the samples.
            rank: This process's rank.
            world_size: Number of processes.
            explicit_loader: Analyse exactly these batches (``i % world_size == rank`` on each
                process) instead of a subset of ``dataset``.
            device: The model's device; CUDA batches that fit are kept there.

        Raises:
            ValueError: No dataset, an empty one, an ``IterableDataset`` without ``max_samples``,
                or a set larger than ``max_bytes``.
        """
        source = explicit_loader if explicit_loader is not None else dataset
        if self._batches is not None and self._source is not None:
            kept, kept_rank, kept_world = self._source
            if kept is source and (kept_rank, kept_world) == (rank, world_size):
                return self._batches
        start = time.perf_counter()
        if explicit_loader is not None:
            batches = self._read_loader(explicit_loader, rank, world_size)
        elif dataset is None:
            raise ValueError(
                "No dataset to analyse: the trainer has no single train DataLoader. Pass "
                "`dataset=` or `dataloader=` to the callback."
            )
        elif isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            batches = self._read_stream(dataset, template, rank, world_size)
        else:
            batches = self._read_indexed(dataset, template, rank, world_size)
        self.fingerprint = [rank, world_size, _content_sum(batches)]
        self._batches = self._place(batches, device)
        self._source = (source, rank, world_size)
        self.read_seconds = time.perf_counter() - start
        return self._batches

    def _isolated_source(self, dataset: Any) -> tuple[Any, list[HeldGenerator]]:
        """The object to read from (the dataset or a deep copy) and the generators it holds."""
        generators, opaque = find_held_generators(dataset)
        if not opaque:
            return dataset, generators
        try:
            clone = copy.deepcopy(dataset)
        except Exception as err:  # noqa: BLE001 - any failure to copy means: cannot isolate
            if not self._warned_isolation:
                self._warned_isolation = True
                rank_zero_warn(
                    f"The analysis set is read from {_describe(dataset)}, which holds state that reading "
                    f"advances and that can be neither restored nor copied ({', '.join(opaque[:3])}; "
                    f"copy.deepcopy failed: {type(err).__name__}: {err}). Reading the analysis set may "
                    "change the data training sees. Workaround: pass `dataset=` (a separate instance of "
                    "the dataset, or a fixed in-memory one) to the callback."
                )
            return dataset, generators
        return clone, find_held_generators(clone)[0]

    def _projected_budget(self, sampled_bytes: int, sampled: int, total: int, unit: str = "samples") -> None:
        """Refuse early: the first ``sampled`` items took ``sampled_bytes``; ``total`` would take ~that pro rata."""
        if sampled_bytes <= 0 or sampled <= 0:
            return  # no tensors to measure (e.g. PIL images before collation): the exact check decides
        projected = sampled_bytes / sampled * total
        if projected > self.max_bytes:
            raise ValueError(
                f"The analysis set would exceed its memory budget: its first {sampled} {unit} take "
                f"{sampled_bytes:,} bytes, so its {total} {unit} would take ~{projected:,.0f} bytes > "
                f"`max_analysis_bytes`={self.max_bytes:,} (per process); refused before reading the rest. "
                "Lower `analysis_fraction` or `max_samples`, or raise `max_analysis_bytes`."
            )

    def _budget(self, nbytes: int, count: int) -> None:
        if nbytes > self.max_bytes:
            raise ValueError(
                f"The analysis set exceeds its memory budget: {count} samples already take {nbytes:,} bytes "
                f"> `max_analysis_bytes`={self.max_bytes:,} (per process). Lower `analysis_fraction` or "
                "`max_samples`, or raise `max_analysis_bytes`."
            )

    def _read_indexed(self, dataset: Any, template: DataLoader | None, rank: int, world_size: int) -> list[Any]:
        shard = self.shard_indices(len(dataset), rank, world_size)
        collate, auto = _collation(template)
        source, generators = self._isolated_source(dataset)
        batches: list[Any] = []
        pending: list[Any] = []
        total = sampled_bytes = 0
        with forked_global_rngs() as reseed, preserved_generators(generators):
            for position, index in enumerate(shard):
                seed = derived_seed(self.seed, index)
                reseed(seed)
                for generator in generators:
                    generator.reseed(seed)
                pending.append(source[index])
                if position < _ESTIMATE_SAMPLES:
                    sampled_bytes += _nbytes(pending[-1])
                    if position + 1 == min(_ESTIMATE_SAMPLES, len(shard)):
                        self._projected_budget(sampled_bytes, position + 1, len(shard))
                if not auto or len(pending) == self.batch_size or position == len(shard) - 1:
                    batch = collate(pending) if auto else collate(pending[0])
                    pending = []
                    total += _nbytes(batch)
                    self._budget(total, position + 1)
                    batches.append(batch)
        self.nbytes, self.num_samples = total, len(shard)
        return batches

    def _read_stream(self, dataset: Any, template: DataLoader | None, rank: int, world_size: int) -> list[Any]:
        if self.max_samples is None:
            raise ValueError(
                "The training dataset has no length (IterableDataset); pass `max_samples=` "
                "so that its first `max_samples` samples form the analysis set."
            )
        collate, auto = _collation(template)
        source, generators = self._isolated_source(dataset)
        samples: list[Any] = []
        total = 0
        with forked_global_rngs() as reseed, preserved_generators(generators):
            reseed(self.seed)
            iterator = iter(source)
            try:
                for sample in iterator:
                    samples.append(sample)
                    total += _nbytes(sample)
                    if len(samples) == min(_ESTIMATE_SAMPLES, self.max_samples):
                        self._projected_budget(total, len(samples), self.max_samples)
                    self._budget(total, len(samples))
                    if len(samples) >= self.max_samples:
                        break
            finally:
                close = getattr(iterator, "close", None)
                if callable(close):
                    close()
        if not samples:
            raise ValueError("The training dataset yielded no samples for the analysis set.")
        shard = samples[rank::world_size]
        self.nbytes, self.num_samples = sum(_nbytes(s) for s in shard), len(shard)
        if not auto:
            return [collate(s) for s in shard]
        return [collate(shard[i : i + self.batch_size]) for i in range(0, len(shard), self.batch_size)]

    def _read_loader(self, loader: DataLoader, rank: int, world_size: int) -> list[Any]:
        parts = [loader.dataset, loader.sampler, loader.batch_sampler, loader.generator, loader.collate_fn]
        generators, _ = find_held_generators(parts)
        batches: list[Any] = []
        total = 0
        with forked_global_rngs() as reseed, preserved_generators(generators):
            reseed(self.seed)
            expected = _loader_length(loader)
            for i, batch in enumerate(loader):
                if i % world_size == rank:
                    batches.append(batch)
                    total += _nbytes(batch)
                    if len(batches) == 1 and expected is not None:
                        share = len(range(rank, expected, world_size))
                        self._projected_budget(total, 1, share, unit="batches")
                    self._budget(total, len(batches))
        self.nbytes, self.num_samples = total, len(batches)
        return batches

    def _place(self, batches: list[Any], device: torch.device | None) -> list[Any]:
        """Move the batches to a CUDA device when they take a small fraction of its free memory."""
        if device is None or device.type != "cuda" or not batches:
            return batches
        free, _ = torch.cuda.mem_get_info(device)
        if self.nbytes > _DEVICE_MEMORY_FRACTION * free:
            return batches
        return [_move(batch, device) for batch in batches]

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {
            "indices": self.indices,
            "dataset_length": self.dataset_length,
            "seed": self.seed,
            "fraction": self.fraction,
            "max_samples": self.max_samples,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the indices; changed analysis arguments redraw the set, with a warning.

        A checkpoint written with another ``analysis_fraction``, ``max_samples`` or ``seed``
        keeps its history, but its indices do not describe the set these arguments ask for: the
        set is redrawn with the new arguments and a warning says that values before and after
        the resume come from different sets. The content fingerprint (:meth:`check_content`)
        catches a changed ``dataset`` of the same length.
        """
        changed = [
            f"`{name}` {old!r} -> {new!r}"
            for name, key, new in (
                ("analysis_fraction", "fraction", self.fraction),
                ("max_samples", "max_samples", self.max_samples),
                ("seed", "seed", self.seed),
            )
            if (old := state.get(key, new)) != new
        ]
        indices = state.get("indices")
        if changed and indices is not None:
            rank_zero_warn(
                f"The analysis arguments changed since the checkpoint ({', '.join(changed)}): the analysis set of "
                f"{len(indices)} samples is redrawn with the new arguments; curvature values before and after this "
                "resume describe different sets."
            )
            self.clear()
            self.indices, self.dataset_length, self._saved_fingerprint = None, None, None
            return
        if indices != self.indices:
            self.clear()
        self.indices = indices
        self.dataset_length = state.get("dataset_length")
        self._saved_fingerprint = state.get("fingerprint")

    def check_content(self) -> None:
        """After a resumed read: warn when the content differs from the checkpoint's (another ``dataset``)."""
        saved, self._saved_fingerprint = self._saved_fingerprint, None
        if saved is None or self.fingerprint is None or list(saved[:2]) != list(self.fingerprint[:2]):
            return  # nothing saved, or saved by another process / world size: not comparable
        if list(saved) == list(self.fingerprint):
            return
        rank_zero_warn(
            "The analysis set read after this resume holds other data than the checkpoint's (same indices, "
            "different content fingerprint: was `dataset` or the training data changed?). The new data is "
            "analysed; curvature values before and after this resume describe different sets."
        )


def _loader_length(loader: DataLoader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable-style dataset without a length
        return None


def _content_sum(batches: list[Any]) -> float:
    """Float64 sum of every number in the batches (tensors found in tuples, lists and dicts)."""
    total = 0.0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if not obj.is_complex():
                total += float(obj.detach().to(torch.float64).sum())
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    for batch in batches:
        visit(batch)
    return total


def _collation(template: DataLoader | None) -> tuple[Callable[[Any], Any], bool]:
    """The training loader's collate function and whether it batches samples (auto-collation)."""
    if template is None:
        return default_collate, True
    auto = bool(getattr(template, "_auto_collation", True))
    return template.collate_fn, auto
