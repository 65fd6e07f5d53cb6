"""``lightning_hessian.cli``: the command line's stable import path, kept for existing imports.

The command line lives in :mod:`lightning_hessian.analysis.cli` (the console script
``lightning-hessian`` and ``python -m lightning_hessian`` run it); plotting in
:mod:`lightning_hessian.analysis.plots`.
"""

from lightning_hessian.analysis.cli import build_parser, main
from lightning_hessian.analysis.plots import plot_run

__all__ = ["build_parser", "main", "plot_run"]
