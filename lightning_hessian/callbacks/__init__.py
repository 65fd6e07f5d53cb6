"""Lightning callbacks: thin schedulers/loggers over the functional core."""

from lightning_hessian.callbacks._base import AnalysisSet, default_classification_loss, isolated_training_state
from lightning_hessian.callbacks.hessian_monitor import HessianMonitor

__all__ = ["AnalysisSet", "HessianMonitor", "default_classification_loss", "isolated_training_state"]
