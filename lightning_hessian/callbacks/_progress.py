"""Progress you can see: one INFO record per evaluation, and an optional bar during long ones."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from lightning_hessian.operators.base import CurvatureOperator, WrappedOperator

__all__ = ["PROGRESS_LOGGER", "CountingOperator", "evaluation_bar", "progress_logger", "summarize_evaluation"]

PROGRESS_LOGGER = "lightning_hessian"
# A bar appears only for evaluations that run longer than this (seconds).
BAR_DELAY_SECONDS = 2.0


def progress_logger() -> logging.Logger:
    """The ``lightning_hessian`` logger, set up like Lightning's own on first use.

    It logs at INFO; when the root logger has no handler it gets a stream handler of its own
    (and does not propagate), so the records are printed without any logging configuration,
    exactly as ``lightning.pytorch``'s messages are.
    """
    logger = logging.getLogger(PROGRESS_LOGGER)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
        if not logging.getLogger().hasHandlers():
            logger.addHandler(logging.StreamHandler())
            logger.propagate = False
    return logger


def summarize_evaluation(
    name: str, when: str, work: str, seconds: float, reference_seconds: float | None, failed: bool
) -> str:
    """``"HessianMonitor epoch 3: 120 HVPs in 4.2 s (0.8x the epoch)"``."""
    text = f"{name} {when}: {'failed after' if failed else work + ' in'} {seconds:.1f} s"
    if reference_seconds is not None and reference_seconds > 0:
        text += f" ({seconds / reference_seconds:.1f}x the epoch)"
    return text


@contextlib.contextmanager
def evaluation_bar(enabled: bool, total: int, description: str, unit: str) -> Iterator[Callable[[int], None]]:
    """A tqdm bar over ``total`` units that shows after 2 s; yields ``advance(n)`` (no-op when disabled)."""
    if not enabled:
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit=unit, leave=False, delay=BAR_DELAY_SECONDS, dynamic_ncols=True)
    try:
        yield lambda n: bar.update(n)
    finally:
        bar.close()


class CountingOperator(WrappedOperator):
    """A :class:`~lightning_hessian.CurvatureOperator` that reports every product's width.

    Wraps an operator unchanged (same products, same ``num_hvps``) and calls ``on_products(k)``
    after each ``matmat`` of ``k`` vectors: how a progress bar follows the Lanczos steps
    without a hook in the estimators.
    """

    def __init__(self, op: CurvatureOperator, on_products: Callable[[int], None]) -> None:
        self.op = op
        self._on_products = on_products

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.op, "dtype", torch.float64)

    def matmat(self, matrix: Tensor) -> Tensor:
        out = self.op.matmat(matrix)
        self._on_products(int(matrix.shape[1]) if matrix.ndim == 2 else 1)
        return out

    def matvec(self, vector: Tensor) -> Tensor:
        return self.matmat(vector.unsqueeze(1)).squeeze(1)
