"""LocalVolumeMonitor: per-epoch local volume / prior probability of the behavioural neighbourhood."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_hessian.callbacks._analysis_set import (
    DEFAULT_MAX_ANALYSIS_BYTES,
    _plain_dataloader,
)
from lightning_hessian.callbacks._base import CurvatureCallback
from lightning_hessian.callbacks._cost import analysis_scale, volume_cost_projection
from lightning_hessian.callbacks._logging import Histogram
from lightning_hessian.callbacks._sharding import is_sharded, sharded_options_error
from lightning_hessian.optim_state import param_groups, unwrap_optimizer
from lightning_hessian.volume import (
    MissingOptimizerStateError,
    VolumeComputationError,
    VolumeEstimate,
    init_prior_std,
    local_volume,
)
from lightning_hessian.volume.preconditioner import holds_adam_moment
from lightning_hessian.volume.sharded import sharded_local_volume

__all__ = ["LocalVolumeMonitor"]

_SCALARS = (
    "log_volume",
    "log_volume_lower_bound",
    "log10_probability",
    "description_length_bits",
    "effective_sample_size",
    "top_weight_share",
    "log_radius_mean",
    "log_radius_std",
    "log_contribution_std",
    "num_capped",
    "num_unconverged",
    "num_flat",
    "num_forward_passes",
    "seconds",
)
_PRECONDITIONERS = ("adam", "adam_exp_avg", "hessian_diag", "hessian_diag_hutchinson", "none")
# Adam's buffer read by each optimizer-based preconditioner.
_ADAM_KEYS = {"adam": "exp_avg_sq", "adam_exp_avg": "exp_avg"}
# torch.optim classes known to keep those buffers (state is created lazily at the first step).
_HAS_EXP_AVG_SQ = ("Adam", "AdamW", "NAdam", "RAdam", "SparseAdam")
_HAS_EXP_AVG = (*_HAS_EXP_AVG_SQ, "Adamax")
# Below this effective sample size a rank-zero warning says one direction carries the estimate.
_LOW_ESS = 2.0

CostName = Literal["kl", "gaussian", "loss"]
PreconditionerName = Literal["adam", "adam_exp_avg", "hessian_diag", "hessian_diag_hutchinson", "none"]
PriorStd = float | dict[str, float] | Literal["init"]


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive finite float, got {value!r}.")
    return float(value)


class LocalVolumeMonitor(CurvatureCallback):
    r"""Log the local volume (prior probability) of the network's behavioural neighbourhood.

    At the end of every ``every_n_epochs``-th training epoch the callback runs
    :func:`~lightning_hessian.local_volume` (:doc:`/methods/local-volume`;
    Scherlis & Belrose, arXiv:2501.18812, §3) on a fixed analysis set
    (``analysis_fraction`` of the training dataset, drawn once with ``seed``; the same samples
    every epoch and after resuming; the same code as :class:`HessianMonitor`), with the model in
    eval mode: the neighbourhood is the star domain around the current weights where the cost
    (by default the mean KL divergence between the current and perturbed predictive
    distributions) stays below ``cutoff``; ``num_directions`` radii are found by a secant search
    on :math:`\log C` versus :math:`\log r`, and the volume is estimated in log space.

    **Measure.** ``measure="gaussian"`` (default) gives :math:`\log P(S)`, the probability of the
    neighbourhood under the diagonal prior :math:`N(0, s^2)`, finite even for flat directions;
    ``"lebesgue"`` gives :math:`\log\mathrm{vol}(S)` (``+inf`` when a direction is capped).
    ``prior_std`` is a float, a mapping parameter name -> float (every trainable parameter), or
    ``"init"`` (default): the per-tensor standard deviation of the weights at initialisation
    (:func:`~lightning_hessian.init_prior_std`), snapshotted at ``on_fit_start`` of the first fit
    and kept in the callback's ``state_dict`` (a resumed run uses the original snapshot, not the
    restored weights). A tensor whose initial entries are all equal (zero biases, BatchNorm
    affine parameters, single numbers) has no spread: it takes the std of the largest
    non-constant parameter of the same module (a zero-initialised ``Linear`` bias gets its
    weight's std), else ``init_prior_fallback`` (default 1.0). ``"init"`` makes the estimate the
    paper's quantity: the probability of sampling a network that behaves like the trained one
    when drawing weights from the initialisation distribution, with that distribution replaced
    by a Gaussian of the same per-tensor variance (PyTorch's default initialisation is uniform).

    **Preconditioner.** ``"adam"`` (default) reads the bias-corrected second moments
    :math:`\hat v = ` ``exp_avg_sq / (1 - beta2**t)`` of *every* optimizer in
    ``trainer.optimizers`` (manual optimization with a body and a head optimizer included), each
    parameter with its own optimizer's step count (read only, never modified), giving
    :math:`p_j \propto 1/(\sqrt{\hat v_j} + \varepsilon)` with :math:`\det P = 1` and a scale-free
    ε = ``preconditioner_eps`` × the median :math:`\sqrt{\hat v}` (default 3; Adam's own ``eps``
    as a floor), so the estimate does not depend on the loss's scale or on the number of steps
    taken. Parameters of a non-Adam optimizer (SGD for the head) get the median scale, with a
    warning. ``"adam_exp_avg"`` reads ``exp_avg``; ``"hessian_diag"`` uses the exact Gauss-Newton
    (Fisher) diagonal of the cost (deterministic; ``cost="kl"``/``"gaussian"``);
    ``"hessian_diag_hutchinson"`` a noisy Hutchinson estimate (opt-in); ``None``/``"none"`` is the
    naive estimator. ``preconditioner_eps="auto"`` tries a small grid of ε with the same
    directions and keeps the largest estimate, charging ``log(grid size)`` in the lower bound.
    Misconfiguration fails at fit start, before any training step: an optimizer that cannot hold
    the needed buffer (SGD only with ``preconditioner="adam"``), a trainable parameter that no
    optimizer owns. Adam's state is created at its first step; a parameter that still has none at
    an evaluation (it never receives a gradient: freeze it) gives a warning naming it and NaN.

    **Confidence.** ``volume/effective_sample_size`` (Kish's ESS of the importance weights, in
    ``[1, num_directions]``) and ``volume/top_weight_share`` say how many directions carry the
    estimate (on networks often one: ESS ≈ 1, then a rank-zero warning is issued once);
    ``volume/log_volume_lower_bound`` is ``log_volume + log(1 - confidence)``, a lower bound on the
    true log volume with probability ``>= confidence`` (Markov); ``log_volume`` itself is not one.

    **Held-out data.** ``data="val"`` analyses a fixed ``analysis_fraction`` of the trainer's
    validation set (the paper evaluates the KL on held-out data; the default ``"train"`` uses
    training samples, i.e. the neighbourhood of behaviour on data the network was fitted to, which
    is typically larger); ``dataset=``/``dataloader=`` analyse any other data.

    Scalars go through ``pl_module.log`` under ``prefix`` (``volume/log_volume``,
    ``volume/log10_probability``, ``volume/description_length_bits`` (:math:`-\log_2 P`),
    ``volume/log_radius_mean``, ``volume/log_radius_std``, ``volume/log_contribution_std``,
    ``volume/num_capped``, ``volume/num_unconverged``, ``volume/num_forward_passes``,
    ``volume/seconds``, ``volume/effective_sample_size``, ``volume/top_weight_share``,
    ``volume/log_volume_lower_bound``, ``volume/num_flat``), so every logger and ``trainer.callback_metrics`` see them;
    the per-direction log radii go to TensorBoard, W&B and MLflow loggers as the histogram ``volume/log_radii``.

    Training is never affected: RNG streams (python, numpy, torch, CUDA), BatchNorm buffers,
    train/eval flags, ``.grad`` and optimizer state are restored or untouched, so final weights
    are bit-identical with and without the callback. A NaN/Inf (anchor outputs, cost along a
    direction) produces a warning and NaN metrics for that epoch; training goes on. Under DDP each
    process evaluates its shard of the analysis set and the costs are summed across processes,
    so every process logs the same estimate.

    Args:
        every_n_epochs: Analyse at the end of every this many training epochs (default 1 when
            ``every_n_train_steps`` is not given).
        every_n_train_steps: Analyse instead after every this many optimizer steps (after the
            optimizer step that brings ``trainer.global_step`` to a multiple of it; mutually
            exclusive with ``every_n_epochs``, as in ``ModelCheckpoint``). Scalars are logged at
            that step (``on_step=True``) and history rows carry ``"step"`` and ``"epoch"``.
        max_overhead: Cost budget: skip scheduled evaluations so that the cumulative evaluation
            time stays within ``max_overhead`` times the training time (the first scheduled
            evaluation always runs; skipped ones log nothing). ``None``: no budget. Each
            evaluation logs ``overhead``: its time over the training time since the previous one.
        analysis_fraction: Fraction of the training dataset in the analysis set (paper: 0.1).
        max_samples: Cap on the analysis set's size (required for an ``IterableDataset``).
        analysis_batch_size: Micro-batch size of the analysis set (bounds memory).
        seed: Any integer in ``[0, 2**63)`` (Python or NumPy integers). Seed of the analysis
            subset and of the directions (the same directions every epoch,
            so that epoch-to-epoch changes come from the weights).
        dataset: Analyse this dataset instead of the trainer's training dataset.
        dataloader: Analyse exactly these batches (no subsampling) instead.
        data: ``"train"`` (default) or ``"val"``: which of the trainer's datasets the analysis set
            is drawn from when neither ``dataset`` nor ``dataloader`` is given.
        cost: ``"kl"`` (default), ``"gaussian"`` (squared output distance / 2), ``"loss"``
            (loss increase) or a callable ``cost(outputs, anchor_outputs, batch)``.
        output_fn: ``output_fn(model, batch) -> outputs``; default ``model(batch[0])`` for
            ``(inputs, targets)`` batches.
        mask_fn: ``mask_fn(batch) -> [B, ...]`` mask of the positions counted by the KL/Gaussian
            costs (e.g. padding).
        loss_fn: ``loss_fn(outputs, targets)`` for ``cost="loss"`` (default mean cross-entropy).
        batch_loss: ``batch_loss(pl_module, batch) -> mean loss`` for ``cost="loss"``.
        cutoff: Cost level defining the neighbourhood, in nats (default 1e-2).
        num_directions: Sampled directions per evaluation (paper: 100).
        preconditioner: ``"adam"`` (default), ``"adam_exp_avg"``, ``"hessian_diag"``,
            ``"hessian_diag_hutchinson"`` or ``None``.
        preconditioner_eps: ε as a fraction of the median scale (``None``: 3), or ``"auto"``.
        measure: ``"gaussian"`` (default) or ``"lebesgue"``.
        prior_std: ``"init"`` (default), a float, or ``{parameter name: std}``.
        init_prior_fallback: Std for constant initial tensors without a non-constant sibling.
        rel_tol: Relative tolerance of each radius (the log volume moves by at most ``n * rel_tol``).
        optimizer_index: ``None`` (default): the Adam preconditioners read every optimizer; an
            int restricts them to ``trainer.optimizers[optimizer_index]``.
        confidence: Confidence of the logged ``log_volume_lower_bound`` (default 0.95).
        prefix: Metric name prefix.
        batch_size_fn: Weight of an analysis micro-batch for ``cost="loss"`` (default with the
            default loss: ``(targets != -100).sum()``, the token count; see
            :class:`~lightning_hessian.callbacks.HessianMonitor`). The KL/Gaussian costs weight
            by positions (``mask_fn`` selects them).
        on_error: ``"warn"`` (default) or ``"raise"``, as in
            :class:`~lightning_hessian.callbacks.HessianMonitor`. Configuration errors raise
            before the first training step (the dry run at ``on_train_start``: analysis set,
            anchor outputs and a few cost evaluations along one direction on one micro-batch).
        progress_bar: Show a tqdm bar over the directions of evaluations that last more than 2 s
            (rank zero). Every evaluation also logs one INFO record on the ``lightning_hessian``
            logger, e.g. ``LocalVolumeMonitor epoch 3: 2140 forward passes (100 directions) in 1.3 s (0.4x the epoch)``.
        max_analysis_bytes: Host-memory budget of the analysis set per process (default 1 GiB).
            The set is read once, before the first training step, with the global RNGs (and the
            dataset's own generators) seeded per sample from ``seed`` and restored afterwards, and
            its collated micro-batches are kept for the whole run (on a CUDA device when they take
            at most 10% of its free memory): random augmentation is frozen at that seeded draw, and
            a resumed run reads the same tensors. A larger set raises ``ValueError`` at fit start.
        resume_missed: ``"rerun"`` (default) or ``"warn"``: what a resumed run does with an
            evaluation that a SIGTERM/SIGINT stopped (checked after each group of directions), as
            in :class:`~lightning_hessian.callbacks.HessianMonitor`.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_hessian.callbacks import LocalVolumeMonitor
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[LocalVolumeMonitor(num_directions=50)],
        ...                      logger=False, enable_progress_bar=False, enable_model_summary=False)
    """

    _metric_prefix = "volume/"

    def __init__(
        self,
        every_n_epochs: int | None = None,
        analysis_fraction: float = 0.1,
        max_samples: int | None = None,
        analysis_batch_size: int = 256,
        seed: int = 42,
        dataset: Dataset | None = None,
        dataloader: DataLoader | None = None,
        data: Literal["train", "val"] = "train",
        cost: CostName | Callable[[Tensor, Tensor, Any], Tensor] = "kl",
        output_fn: Callable[[torch.nn.Module, Any], Tensor] | None = None,
        mask_fn: Callable[[Any], Tensor] | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        batch_loss: Callable[[torch.nn.Module, Any], Tensor] | None = None,
        cutoff: float = 1e-2,
        num_directions: int = 100,
        preconditioner: PreconditionerName | None = "adam",
        preconditioner_eps: float | Literal["auto"] | None = None,
        measure: Literal["gaussian", "lebesgue"] = "gaussian",
        prior_std: PriorStd = "init",
        init_prior_fallback: float = 1.0,
        rel_tol: float = 1e-4,
        optimizer_index: int | None = None,
        confidence: float = 0.95,
        every_n_train_steps: int | None = None,
        max_overhead: float | None = None,
        prefix: str = "volume/",
        batch_size_fn: Callable[[Any], float] | None = None,
        on_error: Literal["warn", "raise"] = "warn",
        progress_bar: bool = False,
        max_analysis_bytes: int = DEFAULT_MAX_ANALYSIS_BYTES,
        resume_missed: Literal["rerun", "warn"] = "rerun",
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            analysis_fraction=analysis_fraction,
            max_samples=max_samples,
            analysis_batch_size=analysis_batch_size,
            seed=seed,
            dataset=dataset,
            dataloader=dataloader,
            loss_fn=loss_fn,
            batch_loss=batch_loss,
            prefix=prefix,
            batch_size_fn=batch_size_fn,
            on_error=on_error,
            max_analysis_bytes=max_analysis_bytes,
            progress_bar=progress_bar,
            every_n_train_steps=every_n_train_steps,
            max_overhead=max_overhead,
            resume_missed=resume_missed,
        )
        if not (callable(cost) or (isinstance(cost, str) and cost in ("kl", "gaussian", "loss"))):
            raise ValueError(f"`cost` must be 'kl', 'gaussian', 'loss' or a callable, got {cost!r}.")
        if cost != "loss":
            for name, fn in (("loss_fn", loss_fn), ("batch_loss", batch_loss)):
                if fn is not None:
                    raise ValueError(
                        f"`{name}` is only used with cost='loss' (got cost={cost!r}); to say how to "
                        "get the outputs from a batch, pass `output_fn=lambda model, batch: ...`."
                    )
        for name, hook in (("output_fn", output_fn), ("mask_fn", mask_fn)):
            if hook is not None and not callable(hook):
                raise TypeError(f"`{name}` must be callable, got {type(hook).__name__}.")
        if data not in ("train", "val"):
            raise ValueError(f"`data` must be 'train' or 'val', got {data!r}.")
        if data == "val" and (dataset is not None or dataloader is not None):
            raise ValueError(
                "`data='val'` reads the trainer's validation set; do not also pass `dataset`/`dataloader`."
            )
        self.data = data
        self.cost = cost
        self.output_fn = output_fn
        self.mask_fn = mask_fn
        self.cutoff = _positive_float("cutoff", cutoff)
        if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
            raise ValueError(f"`num_directions` must be a positive integer, got {num_directions!r}.")
        self.num_directions = num_directions
        if preconditioner is not None and not (isinstance(preconditioner, str) and preconditioner in _PRECONDITIONERS):
            raise ValueError(
                "`preconditioner` must be 'adam', 'adam_exp_avg', 'hessian_diag', 'hessian_diag_hutchinson' "
                f"or None, got {preconditioner!r}."
            )
        self.preconditioner: str | None = None if preconditioner == "none" else preconditioner
        if (
            preconditioner_eps is not None
            and preconditioner_eps != "auto"
            and (
                isinstance(preconditioner_eps, bool)
                or not isinstance(preconditioner_eps, (int, float))
                or not math.isfinite(preconditioner_eps)
                or preconditioner_eps < 0
            )
        ):
            raise ValueError(
                f"`preconditioner_eps` must be a finite float >= 0 (a fraction of the median scale), 'auto' "
                f"or None, got {preconditioner_eps!r}."
            )
        self.preconditioner_eps: float | str | None = (
            preconditioner_eps if preconditioner_eps in (None, "auto") else float(preconditioner_eps)
        )
        if measure not in ("gaussian", "lebesgue"):
            raise ValueError(f"`measure` must be 'gaussian' or 'lebesgue', got {measure!r}.")
        self.measure = measure
        self.prior_std = self._check_prior_std(prior_std)
        self.init_prior_fallback = _positive_float("init_prior_fallback", init_prior_fallback)
        self.rel_tol = _positive_float("rel_tol", rel_tol)
        if self.rel_tol >= 0.5:
            raise ValueError(f"`rel_tol` must be < 0.5, got {rel_tol!r}.")
        if optimizer_index is not None and (
            isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0
        ):
            raise ValueError(f"`optimizer_index` must be None or a non-negative integer, got {optimizer_index!r}.")
        self.optimizer_index = optimizer_index
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
            raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}.")
        self.confidence = float(confidence)
        self._warned_low_ess = False
        self._warned_flat = False
        self.init_prior: dict[str, float] | None = None
        self.last_estimate: VolumeEstimate | None = None

    @staticmethod
    def _check_prior_std(prior_std: Any) -> float | dict[str, float] | str:
        if isinstance(prior_std, str):
            if prior_std != "init":
                raise ValueError(
                    f"`prior_std` must be 'init', a positive float or a mapping name -> float, got {prior_std!r}."
                )
            return prior_std
        if isinstance(prior_std, Mapping):
            checked: dict[str, float] = {}
            for key, value in prior_std.items():
                if not isinstance(key, str):
                    raise ValueError(f"`prior_std` keys must be parameter names (str), got {key!r}.")
                checked[key] = _positive_float(f"prior_std[{key!r}]", value)
            if not checked:
                raise ValueError("`prior_std` mapping is empty: give one std per trainable parameter name.")
            return checked
        return _positive_float("prior_std", prior_std)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            **self._schedule_key(),
            analysis_fraction=self.analysis_fraction,
            seed=self.seed,
            num_directions=self.num_directions,
            cutoff=self.cutoff,
            preconditioner=self.preconditioner,
            measure=self.measure,
            prefix=self.prefix,
            **({} if self.data == "train" else {"data": self.data}),
        )

    @property
    def effective_preconditioner_eps(self) -> float | str | None:
        """The ε passed to :func:`~lightning_hessian.local_volume` (``None``: the library default)."""
        return self.preconditioner_eps

    # ------------------------------------------------------------------ fit start: checks and snapshot

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warned_low_ess = False
        self._warned_flat = False
        self._check_configuration(trainer, pl_module)

    def _check_configuration(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Everything that can be checked before the first training step (the dry run).

        Snapshots the ``"init"`` prior; checks the prior mapping's names, that the Adam
        preconditioners have an Adam-type optimizer owning every trainable parameter (a
        parameter in no optimizer would never have state), and that ``data="val"`` has a
        validation set to read.
        """
        names = [name for name, p in pl_module.named_parameters() if p.requires_grad]
        if self.measure == "gaussian":
            if self.prior_std == "init" and self.init_prior is None:
                if trainer.ckpt_path is not None:
                    rank_zero_warn(
                        "LocalVolumeMonitor: resuming from a checkpoint without this callback's initial "
                        "prior; prior_std='init' is snapshotted from the restored (trained) weights."
                    )
                self.init_prior = init_prior_std(pl_module, fallback=self.init_prior_fallback)
            prior = self.init_prior if self.prior_std == "init" else self.prior_std
            if isinstance(prior, dict):
                missing = [name for name in names if name not in prior]
                if missing:
                    raise ValueError(
                        f"`prior_std` has no entry for trainable parameter(s) {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}; give one per name in pl_module.named_parameters()."
                    )
        if self.preconditioner in _ADAM_KEYS:
            self._check_optimizers(trainer, pl_module)
        if self.data == "val" and (trainer.limit_val_batches == 0 or not is_overridden("validation_step", pl_module)):
            raise ValueError(
                f"{type(self).__name__}(data='val') analyses the validation set, but this run has none "
                "(no `validation_step`, or limit_val_batches=0). Add validation, or pass the held-out "
                "data as `dataset=`/`dataloader=`."
            )

    def _optimizers(self, trainer: pl.Trainer) -> list[Any]:
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        if self.optimizer_index is None:
            return optimizers
        if self.optimizer_index >= len(optimizers):
            raise ValueError(
                f"`optimizer_index`={self.optimizer_index} but the trainer has {len(optimizers)} optimizer(s); "
                f"preconditioner={self.preconditioner!r} reads that optimizer's state (optimizer_index=None "
                "reads all of them)."
            )
        return [optimizers[self.optimizer_index]]

    def _check_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fail before training when the optimizers can never provide the buffer the preconditioner reads."""
        assert self.preconditioner is not None
        key = _ADAM_KEYS[self.preconditioner]
        optimizers = self._optimizers(trainer)
        known = _HAS_EXP_AVG_SQ if key == "exp_avg_sq" else _HAS_EXP_AVG
        hint = (
            f"Use an Adam-type optimizer (Adam, AdamW, NAdam, RAdam), or pass "
            f"preconditioner=None (naive) or preconditioner='hessian_diag' to {type(self).__name__}."
        )
        adam_like = [
            o for o in optimizers if not type(o).__module__.startswith("torch.optim") or type(o).__name__ in known
        ]
        if not adam_like:
            classes = ", ".join(type(o).__name__ for o in optimizers) or "none"
            raise ValueError(
                f"{type(self).__name__}(preconditioner={self.preconditioner!r}) reads the optimizers' "
                f"`{key}` state, but the trainer's optimizers ({classes}) have none (e.g. SGD). {hint}"
            )
        named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        owners = param_groups([p for _, p in named], optimizers)
        unowned = [name for (name, _), info in zip(named, owners, strict=True) if info is None]
        if unowned:
            raise ValueError(
                f"{type(self).__name__}(preconditioner={self.preconditioner!r}): trainable parameter(s) "
                f"{unowned[:5]}{' ...' if len(unowned) > 5 else ''} belong to no optimizer"
                f"{'' if self.optimizer_index is None else f' {self.optimizer_index}'}, so they will never have "
                "Adam state. Freeze them (requires_grad=False), add them to an optimizer, or use "
                "preconditioner=None / 'hessian_diag'."
            )
        others = sorted(
            {
                type(info.optimizer).__name__
                for info in owners
                if info is not None and not holds_adam_moment(info, self.preconditioner)
            }
        )
        if others:
            rank_zero_warn(
                f"{type(self).__name__}(preconditioner={self.preconditioner!r}): some parameters are optimized by "
                f"{', '.join(others)} (no `{key}`); they get the median scale of the Adam-preconditioned ones."
            )
        for optimizer in adam_like:
            states = [optimizer.state.get(p) for _, p in named] if hasattr(optimizer, "state") else []
            started = [st for st in states if st]
            if started and not any(key in st for st in started):
                raise ValueError(
                    f"{type(self).__name__}(preconditioner={self.preconditioner!r}) reads the optimizer's "
                    f"`{key}` state, but {type(optimizer).__name__}'s state has no such entry. {hint}"
                )

    def _optimizer_for_compute(self, trainer: pl.Trainer) -> list[Any] | None:
        if self.preconditioner not in _ADAM_KEYS:
            return None
        return self._optimizers(trainer)

    # ------------------------------------------------------------------ data

    def _analysis_source(self, trainer: pl.Trainer) -> tuple[Any, DataLoader | None, DataLoader | None]:
        if self.data != "val":
            return super()._analysis_source(trainer)
        loaders = trainer.val_dataloaders
        if loaders is None:  # validation has not run yet in this fit: set its loader up as Lightning does
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
            loaders = trainer.val_dataloaders
        template = _plain_dataloader(loaders)
        if template is None and isinstance(loaders, (list, tuple)) and loaders and isinstance(loaders[0], DataLoader):
            template = loaders[0]  # several validation loaders: the first one
        if template is None:
            raise VolumeComputationError("data='val': the trainer has no validation DataLoader to analyse.")
        return template.dataset, template, None

    # ------------------------------------------------------------------ computation

    def _prior(self) -> float | dict[str, float]:
        if self.prior_std == "init":
            if self.init_prior is None:
                raise RuntimeError(
                    "LocalVolumeMonitor: the 'init' prior was never snapshotted (on_fit_start did not run)."
                )
            return self.init_prior
        return self.prior_std  # type: ignore[return-value]

    def _volume_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "cost": self.cost,
            "output_fn": self.output_fn,
            "mask_fn": self.mask_fn,
            "cutoff": self.cutoff,
            "num_directions": self.num_directions,
            "preconditioner": self.preconditioner,
            "preconditioner_eps": self.effective_preconditioner_eps,
            "measure": self.measure,
            "rel_tol": self.rel_tol,
            "seed": self.seed,
        }
        if self.cost == "loss":
            kwargs.update(self._loss_kwargs())
            kwargs["batch_size_fn"] = self._batch_weight_fn()
        if self.measure == "gaussian":
            kwargs["prior_std"] = self._prior()
        return kwargs

    def _dry_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The analysis set and a short radius search (anchor + a few cost evaluations) on one micro-batch.

        The optimizer's state does not exist before the first step: the dry run perturbs along
        one unpreconditioned direction; the optimizer itself is checked at ``on_fit_start``.
        """
        data = self._analysis_data(trainer)
        batch = self._first_micro_batch(data)
        sharded = is_sharded(pl_module)
        if sharded:
            self._check_sharded(trainer, batch)
        elif batch is None:  # an empty shard under DDP: nothing to check on this process
            return
        kwargs = self._volume_kwargs()
        kwargs.update(num_directions=1, preconditioner=None, preconditioner_eps=None, max_evaluations=4)
        # The Gaussian measure: the Lebesgue one's flat-coordinate check is a property of the whole
        # analysis set (one micro-batch would flag spurious flat coordinates) and costs passes.
        kwargs.update(measure="gaussian", prior_std=kwargs.get("prior_std", 1.0))
        start = self._timer()
        if sharded:
            est = sharded_local_volume(pl_module, [batch], **kwargs)
        else:
            est = local_volume(pl_module, [batch], **kwargs)
        seconds = self._timer() - start
        self._projection = volume_cost_projection(
            type(self).__name__,
            est.num_forward_passes,
            seconds,
            self.num_directions,
            analysis_scale(self._batch_weight_fn() if self.cost == "loss" else None, batch, data),
        )

    def _check_sharded(self, trainer: pl.Trainer, batch: Any) -> None:
        """FSDP2: the options the sharded estimator implements, and a micro-batch on every process."""
        unsupported = {
            name: value
            for name, value, ok in (
                ("preconditioner", self.preconditioner, self.preconditioner in (None, "adam")),
                ("preconditioner_eps", self.preconditioner_eps, self.preconditioner_eps != "auto"),
                ("cost", self.cost, self.cost != "loss"),
                ("measure", self.measure, self.measure == "gaussian"),
            )
            if not ok
        }
        error = sharded_options_error(type(self).__name__, unsupported)
        if error is not None:
            raise error
        if self._any_process_failed(trainer, batch is None):
            raise ValueError(
                f"{type(self).__name__}: a process has no analysis sample; under FSDP2 every process runs the "
                "sharded forward, so the analysis set needs at least world_size samples (raise "
                "`analysis_fraction` or `max_samples`)."
            )

    def _compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, float], VolumeEstimate]:
        start = self._timer()
        optimizers = self._optimizer_for_compute(trainer)
        data = self._analysis_data(trainer)
        try:
            with warnings.catch_warnings():
                # Said once, on rank zero, by this callback instead (fit start / after the evaluation).
                warnings.filterwarnings("ignore", message=r"preconditioner=.*non-Adam optimizer")
                warnings.filterwarnings("ignore", message=r"local_volume: .* exactly flat")
                with self._progress(trainer, self.num_directions, "direction") as advance:
                    if is_sharded(pl_module):  # FSDP2: local shards, the sharded forward
                        est = sharded_local_volume(
                            pl_module,
                            data,
                            optimizer=optimizers,
                            progress=advance,
                            before_evaluation=self._interrupt_check(),
                            **self._volume_kwargs(),
                        )
                    else:
                        est = local_volume(
                            pl_module,
                            data,
                            optimizer=optimizers,
                            all_reduce=self._all_reduce(trainer),
                            progress=advance,
                            before_evaluation=self._interrupt_check(),
                            **self._volume_kwargs(),
                        )
        except MissingOptimizerStateError as err:
            # Known at an evaluation only (Adam's state is lazy): a warning and NaN, not a crash.
            raise VolumeComputationError(str(err)) from None
        values = est.metrics(self.confidence)
        values["seconds"] = self._timer() - start
        return values, est

    def _nan_values(self, seconds: float) -> dict[str, float]:
        values = dict.fromkeys(_SCALARS, math.nan)
        values["num_forward_passes"] = 0.0
        values["seconds"] = seconds
        return values

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = self._now(trainer)[0]
        values, est = self._guarded_compute(trainer, pl_module, "local-volume computation")
        self.last_estimate = est
        self._record(trainer, pl_module, values)
        if est is not None:
            self._warn_low_ess(est, epoch)
            self._warn_flat(est, epoch)
            self._log_radii(trainer, est)

    def _warn_flat(self, est: VolumeEstimate, epoch: int) -> None:
        if self._warned_flat or not est.flat_parameters:
            return
        self._warned_flat = True
        listed = ", ".join(f"{name} ({count})" for name, count in list(est.flat_parameters.items())[:8])
        rank_zero_warn(
            f"{type(self).__name__}: at epoch {epoch}, {sum(est.flat_parameters.values())} coordinate(s) are exactly "
            f"flat (the cost does not depend on them): {listed}. The Lebesgue volume is infinite (logged as +inf); "
            "freeze them, or use measure='gaussian'. (Warned once per fit.)"
        )

    def _warn_low_ess(self, est: VolumeEstimate, epoch: int) -> None:
        if self._warned_low_ess or not est.effective_sample_size < _LOW_ESS:
            return
        self._warned_low_ess = True
        rank_zero_warn(
            f"{type(self).__name__}: at epoch {epoch} the effective sample size of the {est.num_directions} "
            f"directions is {est.effective_sample_size:.2f} (the top direction carries "
            f"{100 * est.top_weight_share:.0f}% of the estimate): log_volume is dominated by one direction and "
            "may move by many nats with other directions. Quote volume/log_volume_lower_bound, or raise "
            "num_directions / use a better preconditioner. (Warned once per fit.)"
        )

    def _log_radii(self, trainer: pl.Trainer, est: VolumeEstimate) -> None:
        log_radii = est.log_radii.detach().cpu().to(torch.float64)
        if torch.isfinite(log_radii).all():
            self._publisher.publish(trainer, histograms={f"{self.prefix}log_radii": Histogram.of_samples(log_radii)})

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(row) for row in self.history],
            "analysis": self.analysis.state_dict(),
            "seed": self.seed,
            "init_prior": None if self.init_prior is None else dict(self.init_prior),
            "schedule": self._schedule_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]
        self.analysis.load_state_dict(state_dict.get("analysis", {}))
        self._load_schedule_state(state_dict)
        prior = state_dict.get("init_prior")
        self.init_prior = None if prior is None else {str(k): float(v) for k, v in prior.items()}
