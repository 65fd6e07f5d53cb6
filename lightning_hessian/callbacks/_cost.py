"""Say the price before charging it: the projected cost of one evaluation, from the dry run.

The dry run (before the first training step) times the monitor's unit of work on one analysis
micro-batch: a Hessian-vector product for :class:`~lightning_hessian.callbacks.HessianMonitor`,
a forward pass of the cost for :class:`~lightning_hessian.callbacks.LocalVolumeMonitor`. The
projection of one evaluation is

.. math:: T_\\text{eval} \\approx N_\\text{units} \\cdot t_\\text{unit} \\cdot \\frac{W}{w_1},

with :math:`N_\\text{units}` the units one evaluation spends (``num_runs x num_steps`` HVPs; one
anchor pass plus ``num_directions`` radius searches), :math:`t_\\text{unit}` the measured seconds
on the first micro-batch and :math:`W / w_1` the analysis set's total weight over that batch's.
It is logged (INFO, rank zero, logger ``lightning_hessian``) after the dry run in seconds, and at
the end of the first training epoch as a multiple of that epoch; a projection above
:data:`EXPENSIVE_EPOCHS` training epochs warns once, naming the arguments that lower it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_hessian.callbacks._progress import progress_logger
from lightning_hessian.operators._batches import _default_batch_size

EXPENSIVE_EPOCHS = 5.0


@dataclass
class CostProjection:
    """The projected cost of one evaluation of a monitor.

    Attributes:
        name: The monitor's class name (for messages).
        units: Units of work of one evaluation (HVPs or forward passes).
        unit: Their name, plural (``"HVPs"``, ``"forward passes"``).
        seconds_per_unit: Measured seconds of one unit over the whole analysis set.
        knobs: The arguments that lower the cost, as a sentence fragment.
        note: What the projection leaves out or assumes (appended to the messages).
        epoch_checked: Whether the comparison with the first training epoch was made.
    """

    name: str
    units: float
    unit: str
    seconds_per_unit: float
    knobs: str
    note: str = ""
    epoch_checked: bool = False

    @property
    def seconds(self) -> float:
        """Projected seconds of one evaluation."""
        return self.units * self.seconds_per_unit

    def dry_run_message(self) -> str:
        """``"HessianMonitor: one evaluation will cost about 120 HVPs x 0.031 s = 3.7 s ..."``."""
        return (
            f"{self.name}: one evaluation will cost about {self.units:.0f} {self.unit} x "
            f"{self.seconds_per_unit:.3g} s = {self.seconds:.3g} s (measured on the dry run's micro-batch, "
            f"scaled to the analysis set{'; ' + self.note if self.note else ''})"
        )

    def epoch_message(self, epoch_seconds: float) -> str:
        """The projection as a multiple of a training epoch of ``epoch_seconds``."""
        return (
            f"{self.name}: one evaluation will cost about {self.seconds:.3g} s = "
            f"{self.seconds / epoch_seconds:.3g}x the first training epoch ({epoch_seconds:.3g} s)"
        )


def report_projection(projection: CostProjection | None, is_global_zero: bool) -> None:
    """Log the dry run's projection (INFO, rank zero)."""
    if projection is None or not is_global_zero or not math.isfinite(projection.seconds):
        return
    progress_logger().info(projection.dry_run_message())


def check_against_epoch(projection: CostProjection | None, epoch_seconds: float | None, is_global_zero: bool) -> None:
    """Once, after the first training epoch: log the projection in epochs; warn above :data:`EXPENSIVE_EPOCHS`."""
    if projection is None or projection.epoch_checked or epoch_seconds is None or not epoch_seconds > 0:
        return
    projection.epoch_checked = True
    if not is_global_zero or not math.isfinite(projection.seconds):
        return
    progress_logger().info(projection.epoch_message(epoch_seconds))
    epochs = projection.seconds / epoch_seconds
    if epochs > EXPENSIVE_EPOCHS:
        rank_zero_warn(
            f"{projection.name}: one evaluation is projected to cost {epochs:.1f} training epochs "
            f"({projection.seconds:.3g} s against a {epoch_seconds:.3g} s epoch). To lower it: {projection.knobs}."
        )


def scale_to_analysis_set(first_weight: float, total_weight: float) -> float:
    """``W / w_1``: how many first micro-batches the analysis set weighs (1 when unknown)."""
    if not (first_weight > 0 and math.isfinite(first_weight) and math.isfinite(total_weight)):
        return 1.0
    return max(total_weight / first_weight, 1.0)


def analysis_scale(weight_fn: Callable[[Any], float] | None, first: Any, data: Sequence[Any]) -> float:
    """``W / w_1`` for the analysis micro-batches ``data`` with ``weight_fn`` (default: leading size)."""
    fn = weight_fn or _default_batch_size
    try:
        return scale_to_analysis_set(float(fn(first)), sum(float(fn(batch)) for batch in data))
    except Exception:  # noqa: BLE001 - a projection must never stop the dry run
        return float(max(len(data), 1))


def volume_cost_projection(
    name: str, dry_run_passes: int, dry_run_seconds: float, num_directions: int, scale: float
) -> CostProjection | None:
    """The local volume's projection from its dry run (one direction, a capped radius search).

    Passes of an evaluation: one anchor pass plus ``num_directions`` times the dry run's passes
    per direction (its search is capped at a few evaluations: a direction that needs more makes
    the evaluation dearer than projected, which the message says).
    """
    if dry_run_passes < 1 or not dry_run_seconds >= 0:
        return None
    per_direction = max(dry_run_passes - 1, 1)
    return CostProjection(
        name,
        units=1 + num_directions * per_direction,
        unit="forward passes",
        seconds_per_unit=dry_run_seconds / dry_run_passes * scale,
        knobs="evaluate less often (every_n_epochs / every_n_train_steps), analyse fewer samples (max_samples), "
        "sample fewer directions (num_directions), or cap the share of training time (max_overhead)",
        note=f"{per_direction} passes per direction as on the dry run's capped search; longer searches cost more",
    )
