"""Histograms and figures for the experiment loggers: TensorBoard, Weights & Biases, MLflow.

Scalars reach every Lightning logger through ``pl_module.log``; what ``log_metrics`` cannot carry
(a spectral density, a histogram of log radii, a plot) goes through :class:`ArtifactPublisher`,
which speaks each supported logger's own API:

* ``TensorBoardLogger``: ``add_histogram_raw`` (bucket counts as given) or ``add_histogram``
  (raw samples) and ``add_figure``;
* ``WandbLogger``: ``wandb.Histogram`` (at most 512 bins: adjacent bins are merged) and a
  ``wandb.Image`` of the figure, at ``trainer/global_step``;
* ``MLFlowLogger``: the figure as a PNG artifact (``log_figure``) and the histogram as a JSON
  artifact (``log_dict``: edges, counts and summary), one file per evaluation, named after the
  epoch and global step.

Every histogram and figure goes at the step of the scalars of the same evaluation
(:func:`scalar_step`), so TensorBoard's Scalars, Histograms and Images tabs line up.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_hessian.estimators.density import SpectralDensity

__all__ = [
    "WANDB_MAX_BINS",
    "ArtifactPublisher",
    "Histogram",
    "density_figure",
    "density_histogram",
    "scalar_step",
]

WANDB_MAX_BINS = 512
_SUPPORTED = (TensorBoardLogger, WandbLogger, MLFlowLogger)

FigureFactory = Callable[[], Any]


@dataclass(frozen=True)
class Histogram:
    """A histogram: ``edges`` (``k + 1`` increasing numbers), ``counts`` (``k``) and a summary.

    ``raw`` optionally keeps the samples themselves (TensorBoard then bins them itself).
    """

    edges: list[float]
    counts: list[float]
    minimum: float
    maximum: float
    num: float
    total: float
    sum_squares: float
    raw: list[float] | None = field(default=None)

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.counts) + 1:
            raise ValueError(
                f"A histogram needs len(edges) == len(counts) + 1, got {len(self.edges)} and {len(self.counts)}."
            )

    @classmethod
    def of_samples(cls, values: Tensor, bins: int = 64) -> Histogram:
        """Equal-width bins over finite ``values`` (float64)."""
        values = values.detach().cpu().to(torch.float64).flatten()
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        counts = torch.histc(values, bins=bins, min=lo, max=hi)
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        return cls(
            edges=edges.tolist(),
            counts=counts.tolist(),
            minimum=float(values.min()),
            maximum=float(values.max()),
            num=float(values.numel()),
            total=float(values.sum()),
            sum_squares=float((values * values).sum()),
            raw=values.tolist(),
        )

    def coarsened(self, max_bins: int) -> Histogram:
        """The same histogram with at most ``max_bins`` bins (groups of adjacent bins summed)."""
        bins = len(self.counts)
        if bins <= max_bins:
            return self
        group = math.ceil(bins / max_bins)
        counts = [sum(self.counts[i : i + group]) for i in range(0, bins, group)]
        edges = [self.edges[i] for i in range(0, bins, group)] + [self.edges[-1]]
        return Histogram(edges, counts, self.minimum, self.maximum, self.num, self.total, self.sum_squares, self.raw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``edges``, ``counts``, ``min``, ``max``, ``num``, ``sum``, ``sum_squares`` (and ``values``)."""
        out: dict[str, Any] = {
            "edges": list(self.edges),
            "counts": list(self.counts),
            "min": self.minimum,
            "max": self.maximum,
            "num": self.num,
            "sum": self.total,
            "sum_squares": self.sum_squares,
        }
        if self.raw is not None:
            out["values"] = list(self.raw)
        return out


def density_histogram(sd: SpectralDensity) -> Histogram:
    r"""The density as eigenvalue counts per grid cell: :math:`n\,\hat\phi(t_j)\,\Delta t`.

    Bin ``j`` is ``(t_{j-1}, t_j]`` (``t_{-1} = t_0 - \Delta t``), so the right edges are the grid
    points, exactly the TensorBoard ``bucket_limits`` that :func:`~lightning_hessian.load_density`
    reads back. Summary statistics come from the quadrature measure (nodes and weights).
    """
    n = sd.num_params
    grid = sd.grid.to(torch.float64)
    step = float(grid[1] - grid[0]) if grid.numel() > 1 else 1.0
    counts = (sd.density.to(torch.float64) * step * n).tolist()
    nodes, weights = sd.measure()
    return Histogram(
        edges=[float(grid[0]) - step, *grid.tolist()],
        counts=counts,
        minimum=float(nodes.min()),
        maximum=float(nodes.max()),
        num=float(n),
        total=float((weights * nodes).sum() * n),
        sum_squares=float((weights * nodes * nodes).sum() * n),
    )


def density_figure(sd: SpectralDensity, epoch: int) -> Any:
    """Log-scale density plot (a matplotlib ``Figure``, no pyplot), or ``None`` without matplotlib."""
    try:
        from matplotlib.figure import (
            Figure,  # no pyplot: the user's backend is never touched
        )
    except ImportError:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    floor = 1e-12
    ax.semilogy(sd.grid.numpy(), (sd.density.clamp_min(floor)).numpy())
    ax.set_ylim(bottom=max(floor, float(sd.density.max()) * 1e-8))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(f"Hessian eigenvalue density, epoch {epoch}")
    ax.axvline(0.0, color="grey", lw=0.5)
    fig.tight_layout()
    return fig


def scalar_step(trainer: Any) -> int:
    """The logger step at which the scalars of an evaluation running now are written.

    At the end of a training epoch, Lightning writes the epoch's metrics (``on_epoch=True``) at
    one less than the number of batches that stepped the optimizers (its
    ``fit_loop.epoch_loop._batches_that_stepped``, decremented around
    ``update_train_epoch_metrics``): the step of the epoch's last batch, e.g. 50, 101, ... with 51
    batches per epoch, while ``trainer.global_step`` already reads 51, 102, ... (and counts every
    optimizer's step). Inside ``on_train_batch_end`` (a step schedule) the callbacks write their
    scalars themselves at ``trainer.global_step``. Histograms and figures use the same step.
    """
    loop = trainer.fit_loop.epoch_loop
    batch = loop.batch_progress.current
    if batch.processed > batch.completed:  # inside on_train_batch_end: the step schedule's own step
        return int(trainer.global_step)
    return max(int(loop._batches_that_stepped) - 1, 0)


def _png(figure: Any) -> Any:
    """A PIL image of a matplotlib figure (what ``wandb.Image`` takes without pyplot)."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer)


class ArtifactPublisher:
    """Sends histograms and figures to every TensorBoard, W&B and MLflow logger of a trainer.

    Rank zero only. When the trainer has loggers but none of these, warns once (scalars still
    reach every logger).

    Args:
        owner: Name used in the warning (the callback's class name).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._warned = False

    def loggers(self, trainer: Any) -> list[Any]:
        """The supported loggers of ``trainer`` (empty on ranks other than zero)."""
        supported = [lg for lg in trainer.loggers if isinstance(lg, _SUPPORTED)]
        if not supported and trainer.loggers and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"{self.owner}: no TensorBoardLogger, WandbLogger or MLFlowLogger among the trainer's loggers; "
                "scalars are logged, histograms and figures are skipped."
            )
        return supported if trainer.global_rank == 0 else []

    def publish(
        self,
        trainer: Any,
        *,
        histograms: Mapping[str, Histogram] | None = None,
        figures: Mapping[str, FigureFactory] | None = None,
        step: int | None = None,
    ) -> None:
        """Log ``histograms`` and the figures made by ``figures`` (tag -> factory).

        At ``step``, by default the step of this evaluation's scalars (:func:`scalar_step`).
        """
        loggers = self.loggers(trainer)
        if not loggers:
            return
        histograms = dict(histograms or {})
        made = {tag: make() for tag, make in (figures or {}).items()}
        made = {tag: fig for tag, fig in made.items() if fig is not None}
        step = scalar_step(trainer) if step is None else step
        epoch = trainer.current_epoch
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                _tensorboard(logger, histograms, made, step)
            elif isinstance(logger, WandbLogger):
                _wandb(logger, histograms, made, step)
            else:
                _mlflow(logger, histograms, made, step, epoch)


def _tensorboard(
    logger: TensorBoardLogger, histograms: Mapping[str, Histogram], figures: Mapping[str, Any], step: int
) -> None:
    experiment = logger.experiment
    for tag, hist in histograms.items():
        if hist.raw is not None:
            experiment.add_histogram(tag, torch.tensor(hist.raw, dtype=torch.float64), global_step=step)
            continue
        experiment.add_histogram_raw(
            tag,
            min=hist.minimum,
            max=hist.maximum,
            num=hist.num,
            sum=hist.total,
            sum_squares=hist.sum_squares,
            bucket_limits=hist.edges[1:],
            bucket_counts=hist.counts,
            global_step=step,
        )
    for tag, figure in figures.items():
        experiment.add_figure(tag, figure, global_step=step, close=False)


def _wandb(logger: WandbLogger, histograms: Mapping[str, Histogram], figures: Mapping[str, Any], step: int) -> None:
    import wandb

    payload: dict[str, Any] = {}
    for tag, hist in histograms.items():
        coarse = hist.coarsened(WANDB_MAX_BINS)
        payload[tag] = wandb.Histogram(np_histogram=(np.asarray(coarse.counts), np.asarray(coarse.edges)))
    for tag, figure in figures.items():
        payload[tag] = wandb.Image(_png(figure))
    if payload:
        logger.experiment.log({**payload, "trainer/global_step": step})


def _mlflow(
    logger: MLFlowLogger,
    histograms: Mapping[str, Histogram],
    figures: Mapping[str, Any],
    step: int,
    epoch: int,
) -> None:
    client, run_id = logger.experiment, logger.run_id
    name = f"epoch={epoch:04d}-step={step:08d}"
    for tag, hist in histograms.items():
        client.log_dict(run_id, {"epoch": epoch, "step": step, **hist.to_dict()}, f"{tag}/{name}.json")
    for tag, figure in figures.items():
        client.log_figure(run_id, figure, f"{tag}/{name}.png")
