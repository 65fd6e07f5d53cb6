"""HessianMonitor: per-epoch trace, extreme eigenvalues and spectral density of the loss Hessian."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_hessian.callbacks._analysis_set import DEFAULT_MAX_ANALYSIS_BYTES
from lightning_hessian.callbacks._base import CurvatureCallback, default_classification_loss
from lightning_hessian.callbacks._cost import CostProjection, analysis_scale
from lightning_hessian.callbacks._curvature_views import CurvatureViews
from lightning_hessian.callbacks._honesty import (
    TOP_EIGENVALUE_RTOL,
    cap_num_steps,
    check_lanczos_budget,
    top_eigenvalue_converged,
)
from lightning_hessian.callbacks._logging import density_figure, density_histogram
from lightning_hessian.callbacks._sharding import (
    is_sharded,
    sharded_hessian_operator,
    sharded_options_error,
    with_parameter_space,
)
from lightning_hessian.estimators.density import SpectralDensity, spectral_density
from lightning_hessian.operators import GGNOperator, HessianOperator
from lightning_hessian.operators._backend import BACKENDS
from lightning_hessian.operators.finite_difference import check_fd_step
from lightning_hessian.operators.reduction import check_operator_loss_reduction
from lightning_hessian.operators.sharded import ShardedHessianOperator
from lightning_hessian.signals.sharp_drop import TraceSharpDropDetector

__all__ = ["HessianMonitor"]

_SCALARS = (
    "trace",
    "trace_stderr",
    "trace_ci_low",
    "trace_ci_high",
    "top_eigenvalue",
    "top_eigenvalue_converged",
    "min_eigenvalue",
    "negative_mass",
    "negative_mass_threshold",
    "num_hvps",
    "seconds",
)


class HessianMonitor(CurvatureCallback):
    r"""Log the Hessian's trace, top eigenvalues, smallest eigenvalue and spectral density.

    At the end of every ``every_n_epochs``-th training epoch the callback analyses the Hessian of
    the mean loss over a fixed analysis set (``analysis_fraction`` of the training dataset,
    drawn once with ``seed``; the same samples every epoch and after resuming), with the model
    in eval mode. One batch of ``num_runs`` Lanczos runs of ``num_steps`` steps
    (:func:`~lightning_hessian.spectral_density`, :doc:`/methods/spectral-density`) yields everything at once:

    * ``trace``/``trace_stderr``: Hutchinson on the runs' Rademacher start vectors,
      :math:`n\sum_i w_i\ell_i = v^\top H v` (Alabdulkareem, NeurIPS 2022, §2.1), minus
      a zero-mean control variate built from the *other* runs' converged outlier pairs
      (:attr:`~lightning_hessian.SpectralDensity.deflated_trace_samples`: unbiased, and ~20x
      tighter on the digits MLP at no extra HVP); ``trace_stderr`` is the standard error across
      the ``num_runs`` probes and ``trace_ci_low``/``trace_ci_high`` the 95 % Student-t interval
      with ``num_runs - 1`` degrees of freedom (coverage 0.92-0.985 on constructed spectra);
    * ``top_eigenvalue`` (and ``top_eigenvalue_{i}`` for ``top_k > 1``), ``min_eigenvalue``:
      extreme Ritz values (lower/upper bounds that converge fast), with Ritz residuals;
    * ``negative_mass``: estimated fraction of eigenvalues below ``-negative_mass_threshold``
      (default 0.03 times the bulk's scale, which does not move with the outliers; see
      :meth:`~lightning_hessian.SpectralDensity.negative_fraction` for what SLQ resolves);
    * the density :math:`\hat\phi(t)`: a histogram whose counts are eigenvalue counts ``n * mass``
      per bin, and, with matplotlib, a log-scale figure, sent to TensorBoard
      (``add_histogram_raw``, ``add_figure``), W&B (``wandb.Histogram`` of at most 512 bins,
      ``wandb.Image``) and MLflow (JSON and PNG artifacts) loggers.

    Scalars go through ``pl_module.log`` under ``prefix`` (``hessian/trace``,
    ``hessian/trace_stderr``, ``hessian/trace_ci_low``, ``hessian/trace_ci_high``,
    ``hessian/top_eigenvalue``, ``hessian/min_eigenvalue``, ``hessian/negative_mass``,
    ``hessian/negative_mass_threshold``, ``hessian/num_hvps``, ``hessian/seconds``), so every logger and
    ``trainer.callback_metrics`` see them (EarlyStopping / ModelCheckpoint can monitor them).

    **Sharp drop** (Alabdulkareem, NeurIPS 2022, §7.7; :doc:`/methods/sharp-drop-and-ood`): the trace is fed to
    a :class:`~lightning_hessian.TraceSharpDropDetector` with its standard error and 95 % interval
    (whose width gives the standard error's degrees of freedom to the detector's calibrated
    threshold: ``sharp_drop_kwargs={"false_alarm_rate": ...}`` is its knob); ``hessian/trace_sharp_drop`` is logged
    (0/1 each evaluation; 1 from the confirming evaluation on) with
    ``hessian/trace_sharp_drop_epoch`` (the drop's middle, NaN before). With
    ``stop_on_sharp_drop=True`` training stops ``sharp_drop_patience`` epochs after the drop's
    middle; the decision is reduced across processes like ``EarlyStopping``'s. A stock
    ``EarlyStopping(monitor="hessian/trace_sharp_drop", mode="max", stopping_threshold=0.5,
    patience=max_epochs, check_on_train_epoch_end=True)`` also works: it stops at the confirming
    evaluation (no patience after the middle). Its usual "no improvement" rule (``patience`` alone)
    would stop while the flag stays 0, so it must be used with ``stopping_threshold``.
    Under ``every_n_train_steps`` the detector works in evaluation units: its windows count
    evaluations (as always), ``hessian/trace_sharp_drop_step`` (the global step of the drop's
    middle) replaces ``hessian/trace_sharp_drop_epoch``, and ``sharp_drop_patience`` counts
    *evaluations* after the middle, i.e. ``sharp_drop_patience * every_n_train_steps`` steps.

    Training is never affected: RNG streams (python, numpy, torch, CUDA), BatchNorm buffers,
    train/eval flags, ``.grad`` and optimizer state are restored or untouched, so final weights
    are bit-identical with and without the callback. A NaN/Inf or a failing solver produces a
    warning and NaN metrics for that epoch; training goes on.

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
            subset and of the probe vectors.
        dataset: Analyse this dataset instead of the trainer's training dataset.
        dataloader: Analyse exactly these batches (no subsampling) instead.
        loss_fn: ``loss_fn(pl_module(inputs), targets)`` for ``(inputs, targets)`` batches; default
            mean cross-entropy (``[B, T, V]`` logits are flattened over positions).
        batch_loss: ``batch_loss(pl_module, batch) -> mean loss`` for any other batch structure.
        num_runs: Lanczos runs (probes) per evaluation.
        num_steps: Lanczos steps per run (HVPs per evaluation = ``num_runs * num_steps``; the
            default 3 x 40 = 120 HVPs gives, on the digits MLP, a density 3x closer (1-Wasserstein)
            to the exact spectrum than 10 plain SLQ runs of 80 steps, thanks to outlier deflation).
        top_k: Number of top eigenvalues logged.
        resample_probes: Draw new probes every epoch (default: the same probes every epoch, so
            that epoch-to-epoch changes come from the weights, not the probes).
        train_mode_batchnorm: Analyse with BatchNorm on batch statistics (running stats untouched).
        lanczos_basis_dtype: Storage precision of the Lanczos bases
            (``num_runs * num_steps * num_params`` numbers, needed for full reorthogonalisation);
            ``"float32"`` halves their memory, the recurrence scalars stay float64.
        lanczos_basis_on_cpu: Keep the Lanczos bases in host memory (spares GPU memory); the
            reorthogonalisation streams them to the device in slabs of ~1 M numbers.
        lanczos_basis: ``"full"`` stores the bases (full reorthogonalisation, outlier deflation,
            unbiased deflated trace); ``"none"`` is the basis-free mode for models whose bases do
            not fit: local orthogonality only, ``trace`` is plain Hutchinson, extreme Ritz values
            and the density are still reported, but converged outliers reappear as spurious
            copies ("ghost eigenvalues") that share their weight (see
            :func:`~lightning_hessian.estimators.lanczos.lanczos`).
        negative_threshold: Absolute threshold of ``negative_mass`` (default: relative to the
            bulk, logged as ``negative_mass_threshold``).
        hvp_precision: ``"model"`` computes HVPs in the parameters' dtype; ``"float64"`` on float64
            copies (:class:`~lightning_hessian.HessianOperator`'s ``compute_dtype``), which removes
            the float32 rounding floor (~1e-6 relative on eigenvalues) at a higher cost.
        hvp_backend: HVP path of :class:`~lightning_hessian.HessianOperator`: ``"auto"`` times
            forward-over-reverse and double backward at the first evaluation for the product
            width it needs (``num_runs``) and keeps the faster for the whole run
            (:attr:`backend_choices`); ``"func"`` / ``"autograd"`` force one (e.g. for
            bit-for-bit reproducibility across machines, where the measured choice may differ);
            ``"finite_difference"``: central differences of first-order gradients through the
            module's own forward and backward (2 gradients per product; fused attention kernels,
            activation checkpointing and compiled modules work; ~1e-4 relative error in float32,
            ~1e-8 in float64), logging the measured relative error as ``fd_rel_error`` and the
            step as ``fd_step``. Not with ``curvature="ggn"``.
        fd_step: With ``hvp_backend="finite_difference"``, the perturbation length (default: the
            rule of :func:`~lightning_hessian.operators.finite_difference.fd_step`).
        log_density: Send the density histogram / figure to TensorBoard, W&B and MLflow loggers.
        detect_sharp_drop: Feed the trace to the sharp-drop detector and log its flag.
        stop_on_sharp_drop: Stop training after a confirmed sharp drop. Measured
            (``benchmarks/sharp_drop_study.py``, 29 digits/GPT runs): the flag fired in 9 runs and
            came before the validation plateau in 7 of them; stopping with patience 0 / 5 lost 1.9 /
            1.2 accuracy points on average (max 4.4 / 2.2), against 0.4 for a stock
            ``EarlyStopping(val_loss, patience=5)``. Use ``sharp_drop_patience >= 5`` if at all.
        sharp_drop_patience: Epochs after the drop's middle before stopping (evaluations under
            ``every_n_train_steps``).
        sharp_drop_kwargs: Keyword arguments of :class:`~lightning_hessian.TraceSharpDropDetector`.
        curvature: ``"hessian"`` or ``"ggn"`` (the generalised Gauss-Newton matrix
            :math:`J^\top H_\ell J`, :class:`~lightning_hessian.GGNOperator`: positive semi-definite,
            no second derivative of the network; needs ``loss_fn``, not ``batch_loss``). Every metric
            then describes that matrix.
        blocks: Per-block curvature: ``None``, ``"modules"`` (one block per child module with
            trainable parameters, wrappers looked through) or a mapping ``block name -> list of
            parameter names | regex`` (see :func:`~lightning_hessian.parameter_blocks`). Logs
            ``trace/<block>`` and ``trace_stderr/<block>`` from the same probes as the full trace
            (plain Hutchinson per block, no extra HVP; :mod:`lightning_hessian.estimators.block_trace`) and a
            TensorBoard custom-scalars multi-line chart of them.
        block_top_eigenvalues: Also log ``top_eigenvalue/<block>`` (Lanczos on each diagonal
            block :math:`H_{bb}`; costs HVPs of the block, counted in ``num_hvps``).
        preconditioned: Log Adam's preconditioned sharpness :math:`\lambda_\max(P^{-1}H)`,
            :math:`P = \operatorname{diag}(\sqrt{\hat v}+\epsilon)` from the optimizers' bias-corrected
            state (``preconditioned_sharpness``), its edge-of-stability threshold
            ``preconditioned_sharpness_threshold`` :math:`= (2+2\beta_1)/((1-\beta_1)\eta)` and
            ``sharpness_ratio`` (Cohen et al. 2022). Needs Adam-family optimizers for every
            trainable parameter. With several param groups the smallest group threshold is used
            (:mod:`lightning_hessian.signals.stability`).
        sharpness_threshold: For SGD: log ``sharpness_threshold`` :math:`= (2+2\beta)/\eta`
            (momentum :math:`\beta`, 0 without; Nesterov and dampening handled) and
            ``sharpness_ratio`` = ``top_eigenvalue`` / threshold.
        prefix: Metric name prefix.
        batch_size_fn: ``batch_size_fn(batch) -> weight`` of an analysis micro-batch: the number of
            terms its mean loss averages (:class:`~lightning_hessian.HessianOperator`). Default
            with the default loss: the targets that count, ``(targets != -100).sum()`` (tokens of
            padded sequences), so the Hessian is that of the token mean over the analysis set;
            with ``loss_fn``/``batch_loss``: the leading dimension of the batch.
        on_error: ``"warn"`` (default): an exception in a scheduled evaluation gives a warning
            naming its type and message, NaN metrics for that evaluation, and training continues;
            ``"raise"``: it propagates. Configuration errors always raise before the first
            training step (the dry run at ``on_train_start``: analysis set, loss and two products
            of ``num_runs`` vectors on one analysis micro-batch, the second timed: the projected
            cost of one evaluation is logged at INFO after the dry run and, in training epochs,
            after the first epoch; above 5 epochs a warning names the arguments that lower it).
        progress_bar: Show a tqdm bar over the Lanczos HVPs of evaluations that last more than 2 s
            (rank zero). Every evaluation also logs one INFO record on the ``lightning_hessian``
            logger, e.g. ``HessianMonitor epoch 3: 120 HVPs in 4.2 s (0.8x the epoch)``.
        max_analysis_bytes: Host-memory budget of the analysis set per process (default 1 GiB).
            The set is read once, before the first training step, with the global RNGs (and the
            dataset's own generators) seeded per sample from ``seed`` and restored afterwards, and
            its collated micro-batches are kept for the whole run (on a CUDA device when they take
            at most 10% of its free memory): random augmentation is frozen at that seeded draw, and
            a resumed run reads the same tensors. A larger set raises ``ValueError`` at fit start.
        resume_missed: What a resumed run does with an evaluation that a SIGTERM/SIGINT stopped
            (the signal stops it before the next HVP on every process, restores the training state,
            logs no row and hands the signal back to Lightning): ``"rerun"`` (default) re-runs it
            before the first training step when the restored weights are those it was meant to
            analyse (a checkpoint written at the interruption, e.g. by ``OnExceptionCheckpoint``),
            with its epoch/step; ``"warn"`` only warns, naming it. Evaluations skipped by
            ``max_overhead`` or failed are named in a warning after a resume.
        compile: ``torch.compile`` the per-micro-batch products
            (:class:`~lightning_hessian.HessianOperator`'s ``compile``): the dry run and the first
            evaluation pay the compilation; where it fails the products run eagerly, with one
            warning.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_hessian.callbacks import HessianMonitor
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[HessianMonitor(top_k=3)], logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        analysis_fraction: float = 0.1,
        max_samples: int | None = None,
        analysis_batch_size: int = 256,
        seed: int = 42,
        dataset: Dataset | None = None,
        dataloader: DataLoader | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        batch_loss: Callable[[torch.nn.Module, Any], Tensor] | None = None,
        num_runs: int = 3,
        num_steps: int = 40,
        top_k: int = 1,
        resample_probes: bool = False,
        train_mode_batchnorm: bool = False,
        lanczos_basis_dtype: Literal["float64", "float32"] = "float64",
        lanczos_basis_on_cpu: bool = False,
        lanczos_basis: Literal["full", "none"] = "full",
        negative_threshold: float | None = None,
        hvp_precision: Literal["model", "float64"] = "model",
        hvp_backend: Literal["auto", "func", "autograd", "finite_difference"] = "auto",
        fd_step: float | None = None,
        log_density: bool = True,
        detect_sharp_drop: bool = True,
        stop_on_sharp_drop: bool = False,
        sharp_drop_patience: int = 0,
        sharp_drop_kwargs: dict[str, Any] | None = None,
        every_n_train_steps: int | None = None,
        max_overhead: float | None = None,
        curvature: Literal["hessian", "ggn"] = "hessian",
        blocks: str | dict[str, list[str] | str] | None = None,
        block_top_eigenvalues: bool = False,
        preconditioned: bool = False,
        sharpness_threshold: bool = False,
        prefix: str = "hessian/",
        batch_size_fn: Callable[[Any], float] | None = None,
        on_error: Literal["warn", "raise"] = "warn",
        progress_bar: bool = False,
        max_analysis_bytes: int = DEFAULT_MAX_ANALYSIS_BYTES,
        resume_missed: Literal["rerun", "warn"] = "rerun",
        compile: bool = False,
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
        for name, value in (("num_runs", num_runs), ("num_steps", num_steps), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if top_k > num_steps:
            raise ValueError(f"`top_k`={top_k} cannot exceed `num_steps`={num_steps} (Ritz values per run).")
        if isinstance(sharp_drop_patience, bool) or not isinstance(sharp_drop_patience, int) or sharp_drop_patience < 0:
            raise ValueError(f"`sharp_drop_patience` must be a non-negative integer, got {sharp_drop_patience!r}.")
        if stop_on_sharp_drop and not detect_sharp_drop:
            raise ValueError("`stop_on_sharp_drop=True` needs `detect_sharp_drop=True`.")
        check_lanczos_budget(type(self).__name__, num_runs, num_steps, top_k)
        self.num_runs = num_runs
        self.num_steps = num_steps
        self._steps = num_steps  # capped at the number of parameters by the dry run
        self._warned_unconverged = False
        self.top_k = top_k
        self.resample_probes = bool(resample_probes)
        self.train_mode_batchnorm = bool(train_mode_batchnorm)
        if lanczos_basis_dtype not in ("float64", "float32"):
            raise ValueError(f"`lanczos_basis_dtype` must be 'float64' or 'float32', got {lanczos_basis_dtype!r}.")
        self.lanczos_basis_dtype = lanczos_basis_dtype
        self.lanczos_basis_on_cpu = bool(lanczos_basis_on_cpu)
        if lanczos_basis not in ("full", "none"):
            raise ValueError(
                f"`lanczos_basis` must be 'full' or 'none', got {lanczos_basis!r}; use 'none' only when the "
                "num_runs x num_steps x num_params basis does not fit in memory."
            )
        self.lanczos_basis = lanczos_basis
        if negative_threshold is not None and (
            isinstance(negative_threshold, bool)
            or not isinstance(negative_threshold, (int, float))
            or not negative_threshold >= 0
        ):
            raise ValueError(f"`negative_threshold` must be a number >= 0 or None, got {negative_threshold!r}.")
        self.negative_threshold = None if negative_threshold is None else float(negative_threshold)
        if hvp_precision not in ("model", "float64"):
            raise ValueError(f"`hvp_precision` must be 'model' or 'float64', got {hvp_precision!r}.")
        self.hvp_precision = hvp_precision
        if hvp_backend not in BACKENDS:
            raise ValueError(f"`hvp_backend` must be one of {', '.join(map(repr, BACKENDS))}, got {hvp_backend!r}.")
        self.hvp_backend = hvp_backend
        if not isinstance(compile, bool):
            raise TypeError(f"`compile` must be True or False, got {compile!r}.")
        self.compile = compile
        self.fd_step = check_fd_step(fd_step)
        if fd_step is not None and hvp_backend != "finite_difference":
            raise ValueError("`fd_step` needs hvp_backend='finite_difference'.")
        if hvp_backend == "finite_difference" and curvature == "ggn":
            raise ValueError(
                "`hvp_backend='finite_difference'` differences loss gradients: it computes the Hessian, not the "
                "GGN. Use curvature='hessian' with it, or another hvp_backend for curvature='ggn'."
            )
        # {width: path} measured at the first evaluation (hvp_backend="auto"), reused afterwards
        self.backend_choices: dict[int, str] = {}
        self.log_density = bool(log_density)
        self.detect_sharp_drop = bool(detect_sharp_drop)
        self.stop_on_sharp_drop = bool(stop_on_sharp_drop)
        self.sharp_drop_patience = sharp_drop_patience
        self.sharp_drop_kwargs = dict(sharp_drop_kwargs or {})
        try:
            self.detector = TraceSharpDropDetector(**self.sharp_drop_kwargs)
        except TypeError as err:
            raise ValueError(f"`sharp_drop_kwargs` has an unknown argument: {err}") from None
        self.last_density: SpectralDensity | None = None
        self._reduction_checked = False
        self._sharded = False  # FSDP2 parameters seen: finite-difference products
        self.stopped_epoch: int | None = None
        self.stopped_step: int | None = None
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"`curvature` must be 'hessian' or 'ggn', got {curvature!r}.")
        if curvature == "ggn" and batch_loss is not None:
            raise ValueError(
                "`curvature='ggn'` needs `loss_fn(outputs, targets)` (the GGN separates the model's outputs "
                "from the loss); `batch_loss` hides them. Pass loss_fn instead, or curvature='hessian'."
            )
        self.curvature = curvature
        self.views = CurvatureViews(
            blocks=blocks,
            block_top_eigenvalues=block_top_eigenvalues,
            preconditioned=preconditioned,
            sharpness_threshold=sharpness_threshold,
            prefix=prefix,
            seed=seed,
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            **self._schedule_key(),
            analysis_fraction=self.analysis_fraction,
            seed=self.seed,
            num_runs=self.num_runs,
            num_steps=self.num_steps,
            prefix=self.prefix,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.views.setup(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.views.add_tensorboard_layout(trainer)

    def _operator(self, pl_module: pl.LightningModule, data: Any, all_reduce: Any) -> Any:
        if is_sharded(pl_module):  # FSDP2: finite differences through the sharded module
            return self._sharded_operator(pl_module, data)
        kwargs: dict[str, Any] = dict(
            data=data,
            batch_size_fn=self._batch_weight_fn(),
            train_mode_batchnorm=self.train_mode_batchnorm,
            all_reduce=all_reduce,
            compute_dtype=torch.float64 if self.hvp_precision == "float64" else None,
            backend=self.hvp_backend,
            backend_choices=self.backend_choices,
            compile=self.compile,
            **self._loss_kwargs(),
        )
        if self.hvp_backend == "finite_difference":
            kwargs["fd_step"] = self.fd_step
        # per-parameter probes: the same as an FSDP2 run of the same model with the same seed
        if self.curvature == "ggn":
            if kwargs["loss_fn"] is default_classification_loss:  # [B, T, V] logits are flattened over positions
                return with_parameter_space(
                    GGNOperator(pl_module, loss_hessian="cross_entropy", class_dim=-1, **kwargs)
                )
            return with_parameter_space(GGNOperator(pl_module, **kwargs))
        return with_parameter_space(HessianOperator(pl_module, **kwargs))

    def _sharded_operator(self, pl_module: pl.LightningModule, data: Any) -> ShardedHessianOperator:
        unsupported = {
            name: value
            for name, value, default in (
                ("curvature", self.curvature, "hessian"),
                ("hvp_precision", self.hvp_precision, "model"),
                ("blocks", self.views.blocks, None),
                ("preconditioned", self.views.preconditioned, False),
            )
            if value != default
        }
        if self.hvp_backend in ("func", "autograd"):
            unsupported["hvp_backend"] = self.hvp_backend
        error = sharded_options_error(type(self).__name__, unsupported)
        if error is not None:
            raise error
        self._sharded = True
        return sharded_hessian_operator(
            pl_module,
            data,
            batch_size_fn=self._batch_weight_fn(),
            train_mode_batchnorm=self.train_mode_batchnorm,
            fd_step=self.fd_step,
            **self._loss_kwargs(),
        )

    def _sharded_dry_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Every process needs a micro-batch (FSDP2's forward is collective): agreed first, then one product."""
        if self._any_process_failed(trainer, batch is None):
            raise ValueError(
                f"{type(self).__name__}: a process has no analysis sample; under FSDP2 every process runs the "
                "sharded forward, so the analysis set needs at least world_size samples (raise "
                "`analysis_fraction` or `max_samples`)."
            )
        op = self._operator(pl_module, [batch], None)
        op.loss()
        probe = op.vector_space.probes(op.num_params, 1, "rademacher", torch.Generator().manual_seed(self.seed))
        op.matvec(probe[:, 0].to(op.device))

    def _dry_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The optimizers (edge-of-stability options), the analysis set, the loss and one product on one micro-batch."""
        self.views.check_optimizers(pl_module, trainer.optimizers)
        num_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self._steps = cap_num_steps(type(self).__name__, self.num_steps, num_params)
        self._warned_unconverged = False  # once per fit
        data = self._analysis_data(trainer)
        batch = self._first_micro_batch(data)
        if is_sharded(pl_module):
            self._sharded_dry_run(trainer, pl_module, batch)
            return
        if batch is None:  # an empty shard under DDP: nothing to check on this process
            return
        op = self._operator(pl_module, [batch], None)
        op.loss()
        generator = torch.Generator().manual_seed(self.seed)
        # products as wide as the evaluation's (one Lanczos vector per run): the first pays the
        # backend measurement (and compilation), the second is timed for the cost projection
        probes = (torch.randint(0, 2, (op.num_params, self.num_runs), generator=generator) * 2 - 1).to(torch.float64)
        with op.session():
            op.matmat(probes.to(op.device))
            start = self._timer()
            op.matmat(probes.to(op.device))
            seconds_per_hvp = (self._timer() - start) / self.num_runs
        self.backend_choices.update(op.backend_choices)  # measured once per run: the evaluations reuse it
        self._projection = CostProjection(
            type(self).__name__,
            units=self.num_runs * self.num_steps,
            unit="HVPs",
            seconds_per_unit=seconds_per_hvp * analysis_scale(op.batch_size_fn, batch, data),
            knobs="evaluate less often (every_n_epochs / every_n_train_steps), analyse fewer samples "
            "(max_samples), take fewer Lanczos steps (num_steps), or cap the share of training time (max_overhead)",
            note="plus the products of blocks/preconditioned views, if any",
        )

    # ------------------------------------------------------------------ computation

    def _compute(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[dict[str, float], SpectralDensity | None]:
        start = self._timer()
        data = self._analysis_data(trainer)
        op = self._operator(pl_module, data, self._all_reduce(trainer))
        if not self._reduction_checked and not is_sharded(
            pl_module
        ):  # once: a summed loss scales the Hessian by the batch size
            self._reduction_checked = True
            check_operator_loss_reduction(op)
        # one session: the state snapshot, contexts and casts once for all of the evaluation's products
        with op.session():
            values, sd = self._estimate(trainer, op)
        values["num_hvps"] = float(op.num_hvps) + self.views.extra_hvps
        values["seconds"] = self._timer() - start
        return values, sd

    def _estimate(self, trainer: pl.Trainer, op: HessianOperator) -> tuple[dict[str, float], SpectralDensity]:
        """The density and the views' values, inside the evaluation's session."""
        probe_seed = self.seed + (self._now(trainer)[0] if self.resample_probes else 0)
        with self._progress(trainer, self.num_runs * self._steps, "HVP") as advance:
            sd = spectral_density(
                self._counting(self.views.wrap(self._interruptible(op)), advance),
                num_runs=self.num_runs,
                num_steps=self._steps,
                seed=probe_seed,
                basis_dtype=getattr(torch, self.lanczos_basis_dtype),
                basis_device="cpu" if self.lanczos_basis_on_cpu else None,
                store_basis=self.lanczos_basis == "full",
                negative_threshold=self.negative_threshold,
            )
        self.backend_choices.update(op.backend_choices)  # measured once, reused by later evaluations
        top_values, top_residuals = sd.top_ritz_values(self.top_k)
        bottom_values, _ = sd.bottom_ritz_values(1)
        ci_low, ci_high = sd.trace_confidence_interval(0.95)
        values: dict[str, float] = {
            "trace": sd.deflated_trace,
            "trace_stderr": sd.deflated_trace_stderr,
            "trace_ci_low": ci_low if math.isfinite(ci_low) else math.nan,
            "trace_ci_high": ci_high if math.isfinite(ci_high) else math.nan,
            "top_eigenvalue": float(top_values[0]),
            "top_eigenvalue_residual": float(top_residuals[0]),
            "top_eigenvalue_converged": top_eigenvalue_converged(float(top_values[0]), float(top_residuals[0])),
            "min_eigenvalue": float(bottom_values[0]),
            "negative_mass": sd.negative_mass,
            "negative_mass_threshold": sd.negative_mass_threshold,
        }
        for i in range(1, self.top_k):
            values[f"top_eigenvalue_{i + 1}"] = float(top_values[i]) if i < top_values.numel() else math.nan
        values.update(self.views.compute(op, trainer.optimizers, values["top_eigenvalue"]))
        if op.backend == "finite_difference":  # forced, or the fallback of "auto"
            values["fd_rel_error"] = op.fd_error_estimate
            values["fd_step"] = op.fd_step if op.fd_step is not None else math.nan
        return values, sd

    def _nan_values(self, seconds: float) -> dict[str, float]:
        values = dict.fromkeys(_SCALARS, math.nan)
        values["top_eigenvalue_residual"] = math.nan
        for i in range(1, self.top_k):
            values[f"top_eigenvalue_{i + 1}"] = math.nan
        values.update(self.views.nan_values())
        if self.hvp_backend == "finite_difference" or self._sharded:
            values["fd_rel_error"] = values["fd_step"] = math.nan
        values["num_hvps"] = 0.0
        values["seconds"] = seconds
        return values

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = self._now(trainer)[0]
        values, sd = self._guarded_compute(trainer, pl_module, "curvature computation")
        self.last_density = sd
        # the detector's clock: epochs, or evaluation indices under a step schedule
        when = len(self.history) if self.schedule.by_steps else epoch
        if self.detect_sharp_drop:
            self._update_sharp_drop(trainer, when, values)
        self._record(trainer, pl_module, values)
        self._warn_unconverged(epoch, values)
        if sd is not None and self.log_density:
            self._log_density(trainer, sd, epoch)
        if self.stop_on_sharp_drop:
            self._maybe_stop(trainer, when)

    def _warn_unconverged(self, epoch: int, values: dict[str, float]) -> None:
        """Once per fit: the top eigenvalue's residual is above the stated tolerance."""
        if self._warned_unconverged or values.get("top_eigenvalue_converged") != 0.0:
            return
        self._warned_unconverged = True
        rank_zero_warn(
            f"HessianMonitor: at epoch {epoch} the top eigenvalue has not converged: Ritz residual "
            f"{values['top_eigenvalue_residual']:.3g} > {TOP_EIGENVALUE_RTOL:g} x |{values['top_eigenvalue']:.4g}| "
            "(hessian/top_eigenvalue_converged = 0): top_eigenvalue is a lower bound that may be far from the "
            f"largest eigenvalue. Raise `num_steps` (now {self._steps}). (Warned once per fit.)"
        )

    def _label(self, when: int | None) -> str:
        """An evaluation's position for messages: its epoch, or its global step under a step schedule."""
        if when is None:
            return "none"
        if self.schedule.by_steps:
            return f"step {self._step_of(when):.0f}"
        return f"epoch {when}"

    def _step_of(self, index: int | None) -> float:
        """Global step of the ``index``-th evaluation (step schedules; NaN if unknown)."""
        if index is None or not 0 <= index < len(self.history):
            return math.nan
        return float(self.history[index].get("step", math.nan))

    # ------------------------------------------------------------------ sharp drop

    def _update_sharp_drop(self, trainer: pl.Trainer, when: int, values: dict[str, float]) -> None:
        # the estimate, its standard error and its 95 % Student-t interval (whose width gives the
        # standard error's degrees of freedom to the detector's calibrated threshold)
        confirmed = self.detector.update_from_log(
            when,
            values["trace"],
            values["trace_stderr"],
            values.get("trace_ci_low", math.nan),
            values.get("trace_ci_high", math.nan),
        )
        values["trace_sharp_drop"] = 1.0 if self.detector.flagged else 0.0
        middle = self.detector.drop_middle_epoch
        if self.schedule.by_steps:
            # the running evaluation is not in the history yet: its step is the current one
            now_step = float(self._now(trainer)[1])
            step = now_step if middle == len(self.history) else self._step_of(middle)
            values["trace_sharp_drop_step"] = step
        else:
            values["trace_sharp_drop_epoch"] = float(middle) if middle is not None else math.nan
        if confirmed:
            now = f"step {trainer.global_step}" if self.schedule.by_steps else f"epoch {when}"
            by_steps = self.schedule.by_steps
            middle_text = f"step {values['trace_sharp_drop_step']:.0f}" if by_steps else f"epoch {middle}"
            rank_zero_info(
                f"HessianMonitor: sharp drop of the Hessian trace confirmed at {now}: it began at "
                f"{self._label(self.detector.drop_start_epoch)}, middle at {middle_text}, "
                f"size {self.detector.drop_size:.1%} of its pre-drop level."
            )

    def _maybe_stop(self, trainer: pl.Trainer, when: int) -> None:
        # `when` and the middle are epochs, or evaluation indices under a step schedule, so the
        # patience counts epochs, or evaluations.
        middle = self.detector.drop_middle_epoch
        local = bool(self.detector.flagged and middle is not None and when >= middle + self.sharp_drop_patience)
        should_stop = trainer.strategy.reduce_boolean_decision(local, all=False)
        if should_stop and not trainer.should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopped_step = trainer.global_step
            unit = "evaluations" if self.schedule.by_steps else "epochs"
            rank_zero_info(
                f"HessianMonitor: stopping training at epoch {trainer.current_epoch} (step {trainer.global_step}): "
                f"sharp drop of the Hessian trace (patience {self.sharp_drop_patience} {unit} after its middle)."
            )
        trainer.should_stop = trainer.should_stop or should_stop

    # ------------------------------------------------------------------ density logging

    def _log_density(self, trainer: pl.Trainer, sd: SpectralDensity, epoch: int) -> None:
        self._publisher.publish(
            trainer,
            histograms={f"{self.prefix}eigenvalue_density": density_histogram(sd)},
            figures={f"{self.prefix}eigenvalue_density_plot": lambda: density_figure(sd, epoch)},
        )

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(row) for row in self.history],
            "analysis": self.analysis.state_dict(),
            "seed": self.seed,
            "detector": self.detector.state_dict(),
            "stopped_epoch": self.stopped_epoch,
            "stopped_step": self.stopped_step,
            "schedule": self._schedule_state(),
            "backend_choices": dict(self.backend_choices),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]
        self.analysis.load_state_dict(state_dict.get("analysis", {}))
        if "detector" in state_dict:
            self.detector.load_state_dict(state_dict["detector"])
        self.stopped_epoch = state_dict.get("stopped_epoch")
        self.stopped_step = state_dict.get("stopped_step")
        self._load_schedule_state(state_dict)
        if self.hvp_backend == "auto":  # a resumed run keeps the paths it measured
            self.backend_choices = {int(k): str(v) for k, v in state_dict.get("backend_choices", {}).items()}
