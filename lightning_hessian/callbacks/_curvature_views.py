"""HessianMonitor's optional views: per-block curvature and edge-of-stability sharpness.

Configuration, validation and metric naming only; the numbers come from the core
(:mod:`lightning_hessian.estimators.block_trace`, :meth:`~lightning_hessian.HessianOperator.block`,
:func:`~lightning_hessian.preconditioned_operator`, :mod:`lightning_hessian.signals.stability`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_hessian.errors import HessianComputationError
from lightning_hessian.estimators.block_trace import FirstProductRecorder, block_traces
from lightning_hessian.estimators.eigen import top_eigenvalues
from lightning_hessian.operators import parameter_blocks, preconditioned_operator
from lightning_hessian.operators.block import parameter_slices
from lightning_hessian.operators.space import space_of
from lightning_hessian.optim_state import param_groups
from lightning_hessian.signals.stability import StabilityThreshold, stability_threshold

#: Adam-family optimizers that keep no ``exp_avg_sq`` (Adamax: an infinity norm ``exp_inf``).
_WITHOUT_EXP_AVG_SQ = ("Adamax",)

__all__ = ["CurvatureViews"]


def _trainable(module: torch.nn.Module) -> tuple[list[torch.Tensor], list[str]]:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [p for _, p in named], [n for n, _ in named]


class CurvatureViews:
    """Block traces / block top eigenvalues / preconditioned sharpness / SGD threshold of one monitor."""

    def __init__(
        self,
        *,
        blocks: Any,
        block_top_eigenvalues: bool,
        preconditioned: bool,
        sharpness_threshold: bool,
        prefix: str,
        seed: int,
    ) -> None:
        if blocks is not None and not isinstance(blocks, (str, Mapping)):
            raise TypeError(
                f"`blocks` must be None, 'modules' or a mapping name -> names/regex, got {type(blocks).__name__}."
            )
        if isinstance(blocks, str) and blocks != "modules":
            raise ValueError(f"`blocks` must be None, 'modules' or a mapping name -> names/regex, got {blocks!r}.")
        if block_top_eigenvalues and blocks is None:
            raise ValueError("`block_top_eigenvalues=True` needs `blocks` ('modules' or a mapping).")
        if preconditioned and sharpness_threshold:
            raise ValueError(
                "Pass one of `preconditioned=True` (Adam: preconditioned sharpness vs (2+2*beta1)/((1-beta1)*lr)) "
                "and `sharpness_threshold=True` (SGD: sharpness vs (2+2*momentum)/lr), not both."
            )
        self.blocks = blocks
        self.block_top_eigenvalues = bool(block_top_eigenvalues)
        self.preconditioned = bool(preconditioned)
        self.sharpness_threshold = bool(sharpness_threshold)
        self.prefix = prefix
        self.seed = seed
        self.block_names: dict[str, list[str]] | None = None
        self.extra_hvps = 0
        self._recorder: FirstProductRecorder | None = None

    # ------------------------------------------------------------------ fail fast

    def setup(self, pl_module: torch.nn.Module) -> None:
        """Resolve ``blocks`` against the model (unknown names / empty regexes raise here)."""
        if self.blocks is not None:
            try:
                self.block_names = parameter_blocks(pl_module, self.blocks)
            except (ValueError, TypeError) as err:
                raise type(err)(f"HessianMonitor(blocks=...): {err}") from None
            if not self.block_names:
                raise ValueError("HessianMonitor(blocks='modules'): the model has no trainable parameters.")

    def _threshold(self, pl_module: torch.nn.Module, optimizers: Any) -> StabilityThreshold:
        params, names = _trainable(pl_module)
        return stability_threshold(params, optimizers, names)

    def check_optimizers(self, pl_module: torch.nn.Module, optimizers: Any) -> None:
        """Before the first step: the optimizers fit ``preconditioned`` / ``sharpness_threshold``."""
        if not (self.preconditioned or self.sharpness_threshold):
            return
        option = "preconditioned=True" if self.preconditioned else "sharpness_threshold=True"
        try:
            threshold = self._threshold(pl_module, optimizers)
        except ValueError as err:
            raise ValueError(f"HessianMonitor({option}): {err}") from None
        if self.preconditioned:
            owners = param_groups(_trainable(pl_module)[0], optimizers)
            classes = {type(o.optimizer).__name__ for o in owners if o is not None}
            without = sorted(classes & set(_WITHOUT_EXP_AVG_SQ))
            if without:
                raise ValueError(
                    f"HessianMonitor(preconditioned=True): {', '.join(without)} keeps an infinity norm (exp_inf), not "
                    "Adam's exp_avg_sq, so P = diag(sqrt(v_hat) + eps) is undefined; use Adam/AdamW/NAdam/RAdam."
                )
        if self.preconditioned and threshold.kind != "adam":
            raise ValueError(
                "HessianMonitor(preconditioned=True) needs Adam-family optimizers (P = diag(sqrt(v_hat) + eps) is "
                "Adam's preconditioner); with SGD pass sharpness_threshold=True instead."
            )
        if self.sharpness_threshold and threshold.kind != "sgd":
            raise ValueError(
                "HessianMonitor(sharpness_threshold=True) is SGD's (2 + 2*momentum)/lr; with an Adam-family "
                "optimizer pass preconditioned=True instead."
            )

    # ------------------------------------------------------------------ evaluation

    def wrap(self, op: Any) -> Any:
        """The operator the spectral density runs on (recording its probes when blocks are on)."""
        self._recorder = FirstProductRecorder(op) if self.block_names else None
        return self._recorder if self._recorder is not None else op

    def compute(self, op: Any, optimizers: Any, top_eigenvalue: float) -> dict[str, float]:
        """The views' metric values (names without prefix) after the spectral density ran on :meth:`wrap`."""
        self.extra_hvps = 0
        values: dict[str, float] = {}
        if self.block_names:
            recorder = self._recorder
            if recorder is None or recorder.inputs is None or recorder.products is None:
                raise HessianComputationError("Block traces: the spectral density made no product to read.")
            slices = parameter_slices(op)
            layout = {name: [slices[p] for p in params] for name, params in self.block_names.items()}
            try:
                estimates = block_traces(recorder.inputs, recorder.products, layout, space=space_of(op))
            except ValueError as err:  # the density's first product was not of Rademacher probes
                raise HessianComputationError(f"Block traces: {err}") from err
            for name, estimate in estimates.items():
                values[f"trace/{name}"] = estimate.value
                values[f"trace_stderr/{name}"] = estimate.stderr
            if self.block_top_eigenvalues:
                for name, params in self.block_names.items():
                    result = top_eigenvalues(op.block(params), k=1, seed=self.seed, return_vectors=False)
                    values[f"top_eigenvalue/{name}"] = float(result.values[0])
                    self.extra_hvps += result.num_hvps
        if self.preconditioned or self.sharpness_threshold:
            tensors, names = list(op.parameters()), list(op.parameter_names())
            try:
                threshold = stability_threshold(tensors, optimizers, names)
                pre = preconditioned_operator(op, optimizers) if self.preconditioned else None
            except ValueError as err:  # e.g. a parameter that never received a gradient: no Adam state
                rank_zero_warn(f"HessianMonitor: edge-of-stability metrics are NaN at this evaluation: {err}")
                for key, value in self.nan_values().items():
                    if not key.startswith(("trace/", "trace_stderr/", "top_eigenvalue/")):
                        values[key] = value
                return values
            if pre is not None:
                sharpness = float(top_eigenvalues(pre, k=1, seed=self.seed, return_vectors=False).values[0])
                values["preconditioned_sharpness"] = sharpness
                values["preconditioned_sharpness_threshold"] = threshold.value
            else:
                sharpness = top_eigenvalue
                values["sharpness_threshold"] = threshold.value
            values["sharpness_ratio"] = sharpness / threshold.value
        return values

    def nan_values(self) -> dict[str, float]:
        """The same keys as :meth:`compute`, all NaN (a failed evaluation)."""
        values: dict[str, float] = {}
        for name in self.block_names or {}:
            values[f"trace/{name}"] = math.nan
            values[f"trace_stderr/{name}"] = math.nan
            if self.block_top_eigenvalues:
                values[f"top_eigenvalue/{name}"] = math.nan
        if self.preconditioned:
            values["preconditioned_sharpness"] = math.nan
            values["preconditioned_sharpness_threshold"] = math.nan
        if self.sharpness_threshold:
            values["sharpness_threshold"] = math.nan
        if self.preconditioned or self.sharpness_threshold:
            values["sharpness_ratio"] = math.nan
        return values

    # ------------------------------------------------------------------ TensorBoard

    def layout(self) -> dict[str, dict[str, list[Any]]]:
        """TensorBoard custom-scalars layout: block traces (and top eigenvalues) and sharpness vs threshold."""
        charts: dict[str, list[Any]] = {}
        p = self.prefix
        if self.block_names:
            charts["trace per block"] = ["Multiline", [f"{p}trace/{name}" for name in self.block_names]]
            if self.block_top_eigenvalues:
                charts["top eigenvalue per block"] = [
                    "Multiline",
                    [f"{p}top_eigenvalue/{name}" for name in self.block_names],
                ]
        if self.preconditioned:
            charts["preconditioned sharpness vs threshold"] = [
                "Multiline",
                [f"{p}preconditioned_sharpness", f"{p}preconditioned_sharpness_threshold"],
            ]
        if self.sharpness_threshold:
            charts["sharpness vs threshold"] = ["Multiline", [f"{p}top_eigenvalue", f"{p}sharpness_threshold"]]
        return {f"{p.rstrip('/') or 'curvature'}": charts} if charts else {}

    def add_tensorboard_layout(self, trainer: Any) -> None:
        """Write :meth:`layout` to every TensorBoard logger (rank zero; nothing without a layout)."""
        layout = self.layout()
        if not layout or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(layout)
