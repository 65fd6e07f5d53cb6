r"""Local volume of a network's behavioural neighbourhood (:doc:`/methods/local-volume`).

Implements the estimator of *Estimating the Probability of Sampling a Trained Neural Network at
Random* (Scherlis & Belrose, arXiv:2501.18812, §3): the volume, or the probability
under the initialisation prior, of the star domain

.. math::
    S = \{\theta + t\hat u : 0 \le t < r(\hat u)\},\qquad
    C(\theta + r(\hat u)\hat u) = \text{cutoff},

around the trained parameters :math:`\theta`, where :math:`C` is a behavioural cost that is zero
at :math:`\theta` (by default the expected KL divergence between the anchor's and the perturbed
model's predictive distributions over the analysis set).

The entry point is :func:`local_volume`; :func:`init_prior_std` snapshots the per-tensor standard
deviations of freshly initialised weights for the Gaussian measure. One concept per module, in
pipeline order: :mod:`.config` (validated arguments), :mod:`.cost` (the cost over the analysis
set), :mod:`.preconditioner` and :mod:`.ggn_diagonal` (the diagonal :math:`P`), :mod:`.prior` and
:mod:`.measure` (Gaussian prior, Lebesgue/Gaussian contributions), :mod:`.flat` (exactly flat
coordinates), :mod:`.directions` and :mod:`.radii` (the sampling loop), :mod:`.result` (the
estimate, its confidence), :mod:`.estimator` (the pipeline).
"""

from lightning_hessian.volume.estimator import local_volume
from lightning_hessian.volume.ggn_diagonal import ggn_diagonal
from lightning_hessian.volume.measure import log_radial_gaussian_integral
from lightning_hessian.volume.preconditioner import EPS_GRID, MissingOptimizerStateError
from lightning_hessian.volume.prior import init_prior_std
from lightning_hessian.volume.result import VolumeComputationError, VolumeEstimate

__all__ = [
    "EPS_GRID",
    "MissingOptimizerStateError",
    "VolumeComputationError",
    "VolumeEstimate",
    "ggn_diagonal",
    "init_prior_std",
    "local_volume",
    "log_radial_gaussian_integral",
]
