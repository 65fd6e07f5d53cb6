"""What :func:`~lightning_hessian.volume.local_volume` returns, and its numerical-failure error."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_hessian.errors import HessianComputationError

__all__ = ["VolumeComputationError", "VolumeEstimate"]


class VolumeComputationError(HessianComputationError):
    """A numerical failure of :func:`local_volume` (NaN cost, non-finite anchor outputs, ...).

    Subclasses :class:`~lightning_hessian.errors.HessianComputationError`, so callbacks turn it
    into a warning and a NaN metric instead of a crash.
    """


def effective_sample_size(log_weights: Tensor) -> tuple[float, float]:
    r"""Kish's effective sample size :math:`(\sum w)^2/\sum w^2` and the top weight's share.

    Computed in log space from ``log_weights`` (any finite shift cancels). ``-inf`` weights count
    as zero; with no positive weight both are NaN.
    """
    lw = log_weights.to(torch.float64)
    finite = lw[torch.isfinite(lw)]
    if finite.numel() == 0 or bool(torch.isposinf(lw).any()):
        return math.nan, math.nan
    log_sum = torch.logsumexp(finite, dim=0)
    log_sum_sq = torch.logsumexp(2.0 * finite, dim=0)
    ess = float(torch.exp(2.0 * log_sum - log_sum_sq))
    top = float(torch.exp(finite.max() - log_sum))
    return ess, top


@dataclass
class VolumeEstimate:
    r"""Result of :func:`local_volume`. Log quantities are natural logs, float64, on the CPU.

    Attributes:
        log_volume: The estimate in nats: :math:`\log P(S)` under the Gaussian measure (a log
            probability, ``<= 0``), :math:`\log \mathrm{vol}(S)` under the Lebesgue measure
            (``+inf`` when some direction hit ``max_radius`` or exactly flat coordinates were
            found, see ``num_capped`` and ``flat_parameters``).
        log10_probability: ``log_volume / ln 10`` (for the Lebesgue measure: log10 of the volume).
        description_length_bits: ``-log_volume / ln 2``. Gaussian measure: :math:`-\log_2 P(S)`,
            the bits needed to single out the neighbourhood under the prior. Lebesgue measure:
            bits relative to a quantisation cell of unit volume in parameter space (only
            differences between networks of the same size are meaningful); ``-inf`` if infinite.
        measure: ``"gaussian"`` or ``"lebesgue"``.
        cutoff: The cost level defining the neighbourhood.
        num_params: Number of trainable parameters ``n``.
        num_directions: Number of sampled directions ``k``.
        log_radii: ``[k]`` log distance ``log r(v_hat_i)`` from the anchor to the crossing found
            along each unit direction (parameter-space units).
        log_direction_norms: ``[k]`` ``log ||v_i||`` for ``v_i = P u_i`` (importance correction).
        log_contributions: ``[k]`` one-direction estimates of ``log_volume`` for the chosen
            measure; ``log_volume = logsumexp(log_contributions) - log k``. They are the log
            importance weights: ``effective_sample_size`` is computed from them.
        lebesgue_log_contributions: ``[k]`` the same for the Lebesgue measure,
            ``log|S^{n-1}| - log n + n (log r_i - log ||v_i||)`` (finite even when capped).
        lebesgue_log_volume: Lebesgue estimate (``+inf`` if any direction is capped or a
            coordinate is exactly flat), reported whatever the measure.
        log_radius_mean: Mean of ``log_radii``.
        log_radius_std: Standard deviation of ``log_radii`` across directions.
        log_contribution_std: Standard deviation of ``log_contributions``. Not an error bar: the
            weights are heavy-tailed (see ``effective_sample_size``).
        effective_sample_size: Kish's :math:`(\sum_i w_i)^2/\sum_i w_i^2` of the importance weights
            :math:`w_i = \exp(\text{log\_contributions}_i)`, in ``[1, k]``. Close to 1 means one
            direction carries almost all the estimate (typical for networks: the estimate is then
            dominated by the luckiest direction, and a rerun with other directions can differ by
            many nats).
        top_weight_share: :math:`\max_i w_i / \sum_i w_i` (1 when a single direction dominates).
        num_capped: Directions whose cost stayed below the cutoff up to ``max_radius``.
        capped: ``[k]`` mask of the capped directions.
        num_unconverged: Directions whose root finding ran out of evaluations (their radius is
            the last point known to be inside, a conservative value).
        converged: ``[k]`` mask of the directions bracketed to ``rel_tol``.
        evaluations: ``[k]`` cost evaluations (forward passes over the analysis set) per direction.
        num_forward_passes: Total forward passes over the analysis set: one per
            (direction, step) pair, one for the anchor's cost, plus the flat-coordinate checks.
        forward_passes_per_direction: Mean of ``evaluations``.
        preconditioner: ``"none"``, ``"adam"``, ``"adam_exp_avg"``, ``"hessian_diag"``,
            ``"hessian_diag_hutchinson"`` or ``"tensor"``.
        preconditioner_eps: The absolute ε actually used (``nan`` for ``"none"``/``"tensor"``).
        preconditioner_eps_relative: ε as a fraction of the median :math:`d_j^e` (``nan`` where
            not applicable); with ``preconditioner_eps="auto"``, the grid value chosen.
        selection_log_penalty: ``log G`` when the estimate is the best of ``G`` candidates
            (``preconditioner_eps="auto"``), else 0; :meth:`log_volume_lower_bound` subtracts it.
        preconditioner_hvps: Hessian-vector products spent on ``"hessian_diag_hutchinson"``.
        preconditioner_passes: Per-example backward passes spent on the exact ``"hessian_diag"``.
        flat_parameters: ``{name: count}`` of exactly flat coordinates found (Lebesgue measure
            only; they make the Lebesgue volume infinite).
        root_finder: ``"secant"`` or ``"bisection"``.
        seconds: Wall-clock time of the call.
    """

    log_volume: float
    log10_probability: float
    description_length_bits: float
    measure: str
    cutoff: float
    num_params: int
    num_directions: int
    log_radii: Tensor
    log_direction_norms: Tensor
    log_contributions: Tensor
    lebesgue_log_contributions: Tensor
    lebesgue_log_volume: float
    log_radius_mean: float
    log_radius_std: float
    log_contribution_std: float
    num_capped: int
    capped: Tensor
    num_unconverged: int
    converged: Tensor
    evaluations: Tensor
    num_forward_passes: int
    forward_passes_per_direction: float
    preconditioner: str
    effective_sample_size: float = math.nan
    top_weight_share: float = math.nan
    preconditioner_eps: float = math.nan
    preconditioner_eps_relative: float = math.nan
    selection_log_penalty: float = 0.0
    preconditioner_hvps: int = 0
    preconditioner_passes: int = 0
    flat_parameters: dict[str, int] = field(default_factory=dict)
    root_finder: str = "secant"
    seconds: float = field(default=0.0, compare=False)

    def log_volume_lower_bound(self, confidence: float = 0.95) -> float:
        r"""A lower bound on the true log volume that holds with probability ``>= confidence``.

        The estimator :math:`\hat V` is unbiased, :math:`E[\hat V] = V` (exact radii; the radius
        found is a crossing of the cutoff, the first one when the cost is monotone along the
        ray), and :math:`\hat V \ge 0`, so Markov's inequality gives
        :math:`P(\hat V \ge V/(1-c)) \le 1 - c`: with probability at least ``c`` over the random
        directions, :math:`\log V > \log\hat V + \log(1 - c)`. When the estimate is the best of
        ``G`` candidates (``preconditioner_eps="auto"``), a union bound charges another
        :math:`\log G`. ``log_volume`` itself is *not* a bound (it is biased low by Jensen but
        can overshoot); this is the number to quote as "at least". It says nothing about how far
        below the truth the estimate may be.

        Args:
            confidence: ``c`` in ``(0, 1)``.

        Returns:
            ``log_volume + log(1 - confidence) - selection_log_penalty``.

        Raises:
            ValueError: ``confidence`` outside ``(0, 1)``.
        """
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
            raise ValueError(f"`confidence` must be in (0, 1), got {confidence!r}.")
        return self.log_volume + math.log1p(-float(confidence)) - self.selection_log_penalty

    def metrics(self, confidence: float = 0.95) -> dict[str, float]:
        """Scalar summary for logging (names without a prefix); the bound at ``confidence``."""
        return {
            "log_volume": self.log_volume,
            "log_volume_lower_bound": self.log_volume_lower_bound(confidence),
            "log10_probability": self.log10_probability,
            "description_length_bits": self.description_length_bits,
            "effective_sample_size": self.effective_sample_size,
            "top_weight_share": self.top_weight_share,
            "log_radius_mean": self.log_radius_mean,
            "log_radius_std": self.log_radius_std,
            "log_contribution_std": self.log_contribution_std,
            "num_capped": float(self.num_capped),
            "num_unconverged": float(self.num_unconverged),
            "num_flat": float(sum(self.flat_parameters.values())),
            "num_forward_passes": float(self.num_forward_passes),
        }
