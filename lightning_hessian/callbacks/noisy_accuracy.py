"""NoisyInputAccuracy: accuracy under additive Gaussian input noise, the paper's distribution shift."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["NoisyInputAccuracy"]

_STAGES = ("validate", "test")
_CLEAN_PREFIX = {"validate": "val", "test": "test"}
_MASK64 = (1 << 64) - 1


def _splitmix64(state: int) -> int:
    """One SplitMix64 step: a bijective 64-bit mixer (Steele et al., 2014)."""
    z = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _index(batch: Any, key: int | str, what: str) -> Any:
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(
            f"NoisyInputAccuracy: cannot take {what} [{key!r}] of a batch of type {type(batch).__name__} "
            f"({type(err).__name__}: {err}); pass `{what}_index` or `{what}_fn`."
        ) from None


@contextlib.contextmanager
def _global_rng_untouched(device: torch.device) -> Iterator[None]:
    """Restore the global torch RNG (CPU, and the CUDA device in use) on exit."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            yield


class NoisyInputAccuracy(Callback):
    r"""Validation/test accuracy on inputs shifted by additive Gaussian noise (out-of-distribution).

    The paper (Alabdulkareem, NeurIPS 2022, §4.2 and §7.5) simulates a distribution shift
    by adding zero-mean Gaussian noise with standard deviation 0.25 to the inputs *after* the usual
    normalisation, and reports the test accuracy on these noisy inputs ("OOD test accuracy"),
    whose per-epoch change it regresses on the change of :math:`\lambda_{max}`
    (Table 1, see :func:`lightning_hessian.analysis.curvature_regressions`). For every
    validation (and test) batch this callback evaluates

    .. math::  \hat y = \arg\max_c\, f_\theta(x + \sigma\varepsilon)_c, \qquad
               \varepsilon \sim \mathcal N(0, I),

    with the module in the mode the loop put it in (eval), under ``torch.no_grad``, and
    accumulates :math:`\tfrac1N\sum_i [\hat y_i = y_i]` in a torchmetrics
    ``MulticlassAccuracy(average="micro")`` (synchronised across processes by torchmetrics at
    ``compute()``), logged once per epoch through ``pl_module.log(name, ...)``: every logger and
    ``trainer.callback_metrics`` see it. The inputs the loop itself sees are not modified.

    **Noise and reproducibility.** The noise never touches the global RNG (it would change the
    training run): it is drawn on the CPU from a dedicated ``torch.Generator`` seeded with a
    SplitMix64 hash of ``(seed, epoch, dataloader_idx, batch_idx, global_rank)`` (see
    :meth:`noise`), then moved to the batch's device; the same epoch and batch always get the
    same noise, on any device. The extra forward pass runs inside ``torch.random.fork_rng``, so
    even a module that samples in eval mode leaves the global streams as found: final weights are
    bit-identical with and without the callback.

    Logits are ``[B, C]`` with targets ``[B]``, or ``[B, ..., C]`` with targets ``[B, ...]`` (class
    dimension last, as in :func:`~lightning_hessian.callbacks.default_classification_loss`).
    With several validation dataloaders and ``dataloader_idx=None``, each gets its own metric,
    logged as ``f"{name}/dataloader_idx_{k}"`` (Lightning's convention); pass
    ``dataloader_idx=k`` to evaluate only dataloader ``k`` under ``name`` (e.g. the test set
    passed as a second validation dataloader to get a per-epoch OOD *test* accuracy, as in the
    paper). Nothing is computed during the sanity check.

    Args:
        noise_std: Standard deviation :math:`\sigma` of the additive noise (paper: 0.25); 0 gives
            the clean accuracy.
        input_index: Index (or key, for dict batches) of the inputs in a batch.
        input_fn: ``input_fn(batch) -> inputs`` (takes precedence over ``input_index``).
        target_index: Index (or key) of the integer class targets in a batch.
        target_fn: ``target_fn(batch) -> targets`` (takes precedence over ``target_index``).
        forward_fn: ``forward_fn(pl_module, noisy_inputs) -> logits``; default ``pl_module(inputs)``.
        num_classes: Number of classes; ``None`` infers it from the logits' last dimension at the
            first batch.
        name: Metric name of the noisy accuracy.
        stages: Loops to evaluate in: ``"validate"`` (validation during ``fit`` and
            ``trainer.validate``) and/or ``"test"``. Both log under ``name``.
        seed: Seed of the noise (mixed with epoch, dataloader, batch and rank).
        also_clean: Also log the accuracy on the clean inputs (one more forward pass), as
            ``clean_name`` (default ``"val/clean_acc"`` in validation, ``"test/clean_acc"`` in test).
        clean_name: Metric name of the clean accuracy (used with ``also_clean``).
        dataloader_idx: Evaluate only this dataloader (``None``: all of them).
        ignore_index: Target value to ignore (e.g. padding), passed to torchmetrics.
        prog_bar: Show the metric in the progress bar.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_hessian.callbacks import HessianMonitor, NoisyInputAccuracy
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[HessianMonitor(), NoisyInputAccuracy(0.25)],
        ...                      logger=False, enable_progress_bar=False, enable_model_summary=False)
    """

    def __init__(
        self,
        noise_std: float = 0.25,
        input_index: int | str = 0,
        input_fn: Callable[[Any], Tensor] | None = None,
        target_index: int | str = 1,
        target_fn: Callable[[Any], Tensor] | None = None,
        forward_fn: Callable[[pl.LightningModule, Tensor], Tensor] | None = None,
        num_classes: int | None = None,
        name: str = "ood/acc",
        stages: str | Sequence[str] = _STAGES,
        seed: int = 0,
        also_clean: bool = False,
        clean_name: str | None = None,
        dataloader_idx: int | None = None,
        ignore_index: int | None = None,
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        if (
            isinstance(noise_std, bool)
            or not isinstance(noise_std, (int, float))
            or not math.isfinite(noise_std)
            or noise_std < 0
        ):
            raise ValueError(f"`noise_std` must be a non-negative finite float, got {noise_std!r}.")
        for arg, value in (("input_index", input_index), ("target_index", target_index)):
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(f"`{arg}` must be an integer index or a string key, got {value!r}.")
        for arg, fn in (("input_fn", input_fn), ("target_fn", target_fn), ("forward_fn", forward_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{arg}` must be callable, got {type(fn).__name__}.")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(f"`num_classes` must be an integer >= 2 or None, got {num_classes!r}.")
        if not isinstance(name, str) or not name:
            raise ValueError(f"`name` must be a non-empty string, got {name!r}.")
        stage_tuple = (stages,) if isinstance(stages, str) else tuple(stages)
        if not stage_tuple or any(stage not in _STAGES for stage in stage_tuple):
            raise ValueError(f"`stages` must be a non-empty subset of {_STAGES}, got {stages!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        if clean_name is not None and (not isinstance(clean_name, str) or not clean_name):
            raise ValueError(f"`clean_name` must be a non-empty string or None, got {clean_name!r}.")
        if clean_name is not None and clean_name == name:
            raise ValueError(f"`clean_name` must differ from `name` ({name!r}).")
        if dataloader_idx is not None and (
            isinstance(dataloader_idx, bool) or not isinstance(dataloader_idx, int) or dataloader_idx < 0
        ):
            raise ValueError(f"`dataloader_idx` must be a non-negative integer or None, got {dataloader_idx!r}.")
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise ValueError(f"`ignore_index` must be an integer or None, got {ignore_index!r}.")
        self.noise_std = float(noise_std)
        self.input_index = input_index
        self.input_fn = input_fn
        self.target_index = target_index
        self.target_fn = target_fn
        self.forward_fn = forward_fn
        self.num_classes = num_classes
        self.name = name
        self.stages = stage_tuple
        self.seed = seed
        self.also_clean = bool(also_clean)
        self.clean_name = clean_name
        self.dataloader_idx = dataloader_idx
        self.ignore_index = ignore_index
        self.prog_bar = bool(prog_bar)
        # (stage, dataloader_idx) -> {"noisy": metric, "clean": metric}
        self._metrics: dict[tuple[str, int], dict[str, MulticlassAccuracy]] = {}
        self.last_values: dict[str, float] = {}
        self._warned_empty = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, noise_std=self.noise_std, seed=self.seed)

    # ------------------------------------------------------------------ noise

    def noise_seed(self, epoch: int, batch_idx: int, dataloader_idx: int = 0, rank: int = 0) -> int:
        """Seed of the noise generator for one batch: SplitMix64 over the tuple, 63 bits."""
        state = self.seed & _MASK64
        for part in (epoch, dataloader_idx, batch_idx, rank):
            state = _splitmix64(state ^ (int(part) & _MASK64))
        return state >> 1

    def noise(self, inputs: Tensor, epoch: int, batch_idx: int, dataloader_idx: int = 0, rank: int = 0) -> Tensor:
        r"""The noise :math:`\sigma\varepsilon` added to ``inputs`` for this epoch and batch.

        Drawn on the CPU (float64 for float64 inputs, float32 otherwise) from
        ``torch.Generator().manual_seed(self.noise_seed(...))``, then cast to the inputs' dtype and
        device. The global RNG is not used.
        """
        generator = torch.Generator().manual_seed(self.noise_seed(epoch, batch_idx, dataloader_idx, rank))
        draw_dtype = torch.float64 if inputs.dtype == torch.float64 else torch.float32
        eps = torch.randn(inputs.shape, generator=generator, dtype=draw_dtype)
        return (self.noise_std * eps).to(device=inputs.device, dtype=inputs.dtype)

    # ------------------------------------------------------------------ helpers

    def _inputs_targets(self, batch: Any) -> tuple[Tensor, Tensor]:
        inputs = self.input_fn(batch) if self.input_fn is not None else _index(batch, self.input_index, "input")
        targets = self.target_fn(batch) if self.target_fn is not None else _index(batch, self.target_index, "target")
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            got = inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__
            raise TypeError(
                f"NoisyInputAccuracy: the inputs must be a floating-point tensor to add Gaussian noise, got {got}; "
                "pass `input_fn` to select them (e.g. embeddings rather than token ids)."
            )
        if not isinstance(targets, Tensor):
            raise TypeError(f"NoisyInputAccuracy: the targets must be a tensor, got {type(targets).__name__}.")
        return inputs, targets

    def _forward(self, pl_module: pl.LightningModule, inputs: Tensor) -> Tensor:
        out = self.forward_fn(pl_module, inputs) if self.forward_fn is not None else pl_module(inputs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"NoisyInputAccuracy: the forward pass returned {type(out).__name__}, not a logits tensor; "
                "pass `forward_fn=lambda module, x: ...` returning logits."
            )
        return out

    def _new_metric(self, num_classes: int, device: torch.device) -> MulticlassAccuracy:
        with torch.inference_mode(False):  # normal state tensors, whichever loop creates them
            return MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=self.ignore_index).to(
                device
            )

    @staticmethod
    def _flatten(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if logits.ndim == 1 or logits.shape[:-1] != targets.shape:
            raise ValueError(
                f"NoisyInputAccuracy: logits of shape {tuple(logits.shape)} do not match targets of shape "
                f"{tuple(targets.shape)} (expected logits [..., C] and targets [...])."
            )
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)

    def _metric_names(self, trainer: pl.Trainer, stage: str, dl_idx: int) -> tuple[str, str]:
        noisy = self.name
        clean = self.clean_name or f"{_CLEAN_PREFIX[stage]}/clean_acc"
        if self.dataloader_idx is None and self._num_dataloaders(trainer, stage) > 1:
            noisy, clean = f"{noisy}/dataloader_idx_{dl_idx}", f"{clean}/dataloader_idx_{dl_idx}"
        return noisy, clean

    @staticmethod
    def _num_dataloaders(trainer: pl.Trainer, stage: str) -> int:
        counts = trainer.num_val_batches if stage == "validate" else trainer.num_test_batches
        return len(counts) if isinstance(counts, (list, tuple)) else 1

    # ------------------------------------------------------------------ per batch / per epoch

    def _on_batch_end(
        self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dl_idx: int
    ) -> None:
        if stage not in self.stages or trainer.sanity_checking:
            return
        if self.dataloader_idx is not None and dl_idx != self.dataloader_idx:
            return
        inputs, targets = self._inputs_targets(batch)
        noisy = inputs
        if self.noise_std > 0:
            noisy = inputs + self.noise(inputs, trainer.current_epoch, batch_idx, dl_idx, trainer.global_rank)
        with torch.no_grad(), _global_rng_untouched(inputs.device):
            logits = self._forward(pl_module, noisy)
            clean_logits = self._forward(pl_module, inputs) if self.also_clean else None
        logits, flat_targets = self._flatten(logits, targets)
        key = (stage, dl_idx)
        if key not in self._metrics:
            num_classes = self.num_classes if self.num_classes is not None else int(logits.shape[-1])
            if num_classes < 2:
                raise ValueError(
                    f"NoisyInputAccuracy: cannot infer `num_classes` from logits of shape {tuple(logits.shape)}."
                )
            self._metrics[key] = {"noisy": self._new_metric(num_classes, logits.device)}
            if self.also_clean:
                self._metrics[key]["clean"] = self._new_metric(num_classes, logits.device)
        metrics = self._metrics[key]
        for kind, metric in metrics.items():
            if metric.device != logits.device:  # the module moved (callback reused across trainers)
                with torch.inference_mode(False):
                    metrics[kind] = metric.to(logits.device)
        metrics["noisy"].update(logits.detach(), flat_targets)
        if clean_logits is not None:
            flat_clean, _ = self._flatten(clean_logits, targets)
            metrics["clean"].update(flat_clean.detach(), flat_targets)

    def _on_epoch_start(self, stage: str) -> None:
        for (metric_stage, _), metrics in self._metrics.items():
            if metric_stage == stage:
                for metric in metrics.values():
                    metric.reset()

    def _on_epoch_end(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if stage not in self.stages or trainer.sanity_checking:
            return
        for (metric_stage, dl_idx), metrics in sorted(self._metrics.items()):
            if metric_stage != stage:
                continue
            if all(metric.update_count == 0 for metric in metrics.values()):
                continue
            names = dict(zip(("noisy", "clean"), self._metric_names(trainer, stage, dl_idx), strict=False))
            for kind, metric in metrics.items():
                value = metric.compute()  # synchronised across processes by torchmetrics
                metric.reset()
                self.last_values[names[kind]] = float(value)
                # identical on every rank after compute(): no further sync needed
                pl_module.log(
                    names[kind],
                    value.detach().float(),
                    on_step=False,
                    on_epoch=True,
                    prog_bar=self.prog_bar and kind == "noisy",
                    sync_dist=False,
                    add_dataloader_idx=False,  # the suffix, if any, is already in the name
                )
        if not any(stage == metric_stage for metric_stage, _ in self._metrics) and not self._warned_empty:
            self._warned_empty = True
            rank_zero_warn(f"NoisyInputAccuracy: no {stage} batch was evaluated this epoch; nothing logged.")

    # ------------------------------------------------------------------ lightning hooks

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_epoch_start("validate")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_epoch_start("test")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._on_batch_end("validate", trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._on_batch_end("test", trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_epoch_end("validate", trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_epoch_end("test", trainer, pl_module)
