"""Lightning callbacks: thin schedulers/loggers over the functional core."""

from lightning_hessian.callbacks._analysis_set import AnalysisSet
from lightning_hessian.callbacks._base import default_classification_loss
from lightning_hessian.callbacks._isolation import isolated_training_state
from lightning_hessian.callbacks.hessian_monitor import HessianMonitor
from lightning_hessian.callbacks.local_volume_monitor import LocalVolumeMonitor
from lightning_hessian.callbacks.noisy_accuracy import NoisyInputAccuracy

__all__ = [
    "AnalysisSet",
    "HessianMonitor",
    "LocalVolumeMonitor",
    "NoisyInputAccuracy",
    "default_classification_loss",
    "isolated_training_state",
]
