r"""The local-volume estimator as a pipeline of named steps (:doc:`/methods/local-volume`, paper §3).

validated config (:mod:`.config`) → cost and anchor check (:mod:`.cost`) → preconditioner
(:mod:`.preconditioner`, :mod:`.ggn_diagonal`) → prior/measure (:mod:`.prior`, :mod:`.measure`)
→ flat coordinates (:mod:`.flat`, Lebesgue only) → directions and radii (:mod:`.directions`,
:mod:`.radii`) → estimate (:class:`~.result.VolumeEstimate`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_hessian.operators import (
    derivative_friendly_attention,
    preserved_model_state,
)
from lightning_hessian.operators._batches import _default_batch_size, _move
from lightning_hessian.operators.sharded import dtensor_parameters, fsdp2_error
from lightning_hessian.volume.config import (
    CostFn,
    CostName,
    Measure,
    PreconditionerName,
    PriorStd,
    VolumeConfig,
    validate,
)
from lightning_hessian.volume.cost import CostEvaluator
from lightning_hessian.volume.directions import direction_seeds
from lightning_hessian.volume.flat import flat_coordinates
from lightning_hessian.volume.measure import (
    gaussian_log_contributions,
    lebesgue_log_contributions,
)
from lightning_hessian.volume.preconditioner import (
    log_preconditioner,
    preconditioner_scale,
    relative_eps_grid,
    tensor_log_preconditioner,
)
from lightning_hessian.volume.prior import log_prior_std
from lightning_hessian.volume.radii import RadiiSearch, search_radii
from lightning_hessian.volume.radius import RootFinder
from lightning_hessian.volume.result import (
    VolumeComputationError,
    VolumeEstimate,
    effective_sample_size,
)

__all__ = ["local_volume"]

# Elements of the perturbed-parameter stack kept at once when choosing directions_per_batch.
_DIRECTION_ELEMENT_BUDGET = 2**25


@dataclass
class _Candidate:
    """One preconditioner to try: ``log p`` (``None``: naive) and its ε."""

    log_p: Tensor | None
    kind: str
    eps: float = math.nan
    eps_relative: float = math.nan


@dataclass
class _Setup:
    """What every candidate's search shares."""

    config: VolumeConfig
    evaluator: CostEvaluator
    theta: Tensor
    names: list[str]
    log_s: Tensor | None
    base_seed: int
    log_max: float
    log_init: float
    per_batch: int


def local_volume(
    model: nn.Module,
    data: Iterable[Any],
    *,
    cost: CostName | CostFn = "kl",
    loss_fn: Callable[[Tensor, Any], Tensor] | None = None,
    batch_loss: Callable[[nn.Module, Any], Tensor] | None = None,
    output_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    mask_fn: Callable[[Any], Tensor] | None = None,
    batch_size_fn: Callable[[Any], float] | None = None,
    cutoff: float = 1e-2,
    num_directions: int = 100,
    preconditioner: PreconditionerName | Tensor | Mapping[str, Tensor] | None = None,
    optimizer: Any = None,
    preconditioner_eps: float | Literal["auto"] | None = None,
    preconditioner_exponent: float = 0.5,
    preconditioner_probes: int = 32,
    measure: Measure = "gaussian",
    prior_std: PriorStd = 1.0,
    rel_tol: float = 1e-4,
    max_radius: float | None = None,
    initial_radius: float | None = None,
    directions_per_batch: int | None = None,
    root_finder: RootFinder = "secant",
    max_evaluations: int = 100,
    seed: int | torch.Generator | None = 0,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    progress: Callable[[float], None] | None = None,
    before_evaluation: Callable[[], None] | None = None,
) -> VolumeEstimate:
    r"""Estimate the local volume (or prior probability) of the behavioural neighbourhood of ``model``.

    Scherlis & Belrose, *Estimating the Probability of Sampling a Trained Neural Network at Random*
    (arXiv:2501.18812), §3; :doc:`/methods/local-volume`.

    **Cost.** :math:`C(\theta') \ge 0` with :math:`C(\theta) = 0`, a float64 size-weighted mean
    over all batches of ``data`` (the analysis set), with the model in eval mode:

    - ``"kl"``: :math:`\mathbb E_x\,\mathrm{KL}(\mathrm{softmax} f(x;\theta)\,\|\,\mathrm{softmax} f(x;\theta'))`
      over the last dimension; outputs ``[B, ..., classes]`` are averaged over all positions
      (``mask_fn(batch)`` of shape ``[B, ...]`` selects the positions that count);
    - ``"gaussian"``: :math:`\tfrac12\,\mathbb E_x \|f(x;\theta) - f(x;\theta')\|^2` (the KL between
      unit-variance Gaussians centred at the outputs; last dimension = output vector);
    - ``"loss"``: :math:`L(\theta') - L(\theta)` with ``loss_fn(outputs, batch[1])`` or
      ``batch_loss(model, batch)`` (may be negative near a non-minimum; treated as below the cutoff);
    - a callable ``cost(outputs, anchor_outputs, batch) -> per-example costs`` (any shape; the
      data-set cost is the mean of all entries; it must be ``torch.func.vmap``-compatible).

    Anchor outputs are computed once; ``data`` is iterated once and its batches are kept. The cost
    at the anchor itself is evaluated once: it must be below ``cutoff`` (``ValueError`` otherwise).

    **Radius.** Along each unit direction :math:`\hat v` a crossing
    :math:`r(\hat v)` of ``cutoff`` (the first one when the cost is monotone along the ray; a cost
    that rises above the cutoff and falls back between two trial points is not seen) is found to
    relative accuracy ``rel_tol`` by a safeguarded
    secant/Illinois search on :math:`\log C` versus :math:`\log r` (slope 2 for a quadratic cost),
    all directions of a group evaluated together with ``torch.func.vmap`` over
    ``functional_call``. A direction still below the cutoff at ``max_radius`` is capped and counted
    (it makes the Lebesgue volume infinite; the Gaussian measure integrates up to the cap). A
    direction that exhausts ``max_evaluations`` is not raised but reported (``num_unconverged``,
    ``converged``) with the last radius known to be inside; a NaN cost raises
    :class:`VolumeComputationError`.

    **Directions.** :math:`u_i` uniform on the sphere, :math:`v_i = P u_i` with a positive diagonal
    :math:`P`, :math:`\det P = 1` (normalised in log space: :math:`\sum_j \log p_j = 0`),
    :math:`\hat v_i = v_i / \|v_i\|`. For the named preconditioners
    :math:`p_j \propto 1 / (s_j + \varepsilon_j)`, :math:`s_j = |d_j|^{e}` with
    ``e = preconditioner_exponent``, and a *scale-free* ε:
    :math:`\varepsilon_j = \max(\rho\,\mathrm{median}_{s_i>0}\,s_i,\ \text{Adam's own eps})` with
    ``ρ = preconditioner_eps`` (default 3), so :math:`P` does not change when the loss (hence
    :math:`d`) is rescaled:

    - ``None``: :math:`P = I`, the naive estimator (paper eq. 10);
    - ``"adam"``: ``d`` = the bias-corrected :math:`\hat v = ` ``exp_avg_sq / (1 - beta2**t)`` of
      every optimizer in ``optimizer`` (one, or a list such as ``trainer.optimizers``), each
      parameter with its own optimizer's step count ``t``. Parameters of a non-Adam optimizer get
      the median scale (with a warning); a parameter without state is an error naming it;
    - ``"adam_exp_avg"``: ``d = |exp_avg| / (1 - beta1**t)``, same rules;
    - ``"hessian_diag"``: ``d = diag(H)`` of the cost at the anchor, computed *exactly* as the
      Gauss-Newton (Fisher) diagonal from per-example Jacobian rows (``cost="kl"`` or
      ``"gaussian"``; see :mod:`~lightning_hessian.volume.ggn_diagonal`);
    - ``"hessian_diag_hutchinson"``: Hutchinson's estimate of diag(H) with
      ``preconditioner_probes`` Rademacher probes (opt-in; too noisy to help on networks: median
      relative error ~300 % with 32 probes);
    - a positive tensor (flat ``[n]`` in ``model.named_parameters()`` order, or a mapping name ->
      tensor): :math:`P`'s diagonal itself, up to scale (``eps`` and ``exponent`` do not apply).

    ``preconditioner_eps="auto"`` tries ``ρ`` in :data:`~lightning_hessian.volume.preconditioner.EPS_GRID`
    with the *same* directions (the paper's procedure) and returns the largest estimate; the
    selection is charged ``log G`` in :meth:`VolumeEstimate.log_volume_lower_bound`
    (``selection_log_penalty``), and the chosen ``ρ`` is ``preconditioner_eps_relative``.

    **Flat coordinates.** With ``measure="lebesgue"``, coordinates the cost does not depend on at
    all (zero Jacobian column on the analysis set, and cost below the cutoff at ``± max_radius``)
    make the volume infinite: ``log_volume = +inf``, with a warning naming them
    (``flat_parameters``); see :mod:`~lightning_hessian.volume.flat`.

    **Lebesgue measure** (paper eq. 15):

    .. math::
        \log\mathrm{vol}(S) \approx \log|S^{n-1}| - \log n - \log k
        + \operatorname{logsumexp}_i\big(n\log r(\hat v_i) - n\log\|v_i\|\big),
        \qquad |S^{n-1}| = 2\pi^{n/2}/\Gamma(n/2).

    **Gaussian measure** (paper eq. 19) with prior :math:`N(0, \mathrm{diag}(s^2))`: with
    :math:`a = \sum_j \hat v_j^2/s_j^2`, :math:`b = \sum_j \theta_j\hat v_j/s_j^2`,
    :math:`q = \sum_j \theta_j^2/s_j^2`,

    .. math::
        \log P(S) \approx \log|S^{n-1}| - \log k + \operatorname{logsumexp}_i\Big(
        -\tfrac n2\log 2\pi - \textstyle\sum_j\log s_j - \tfrac q2
        + \log\!\int_0^{r_i} e^{-a_i t^2/2 - b_i t}\,t^{n-1}dt - n\log\|v_i\|\Big),

    the radial integral by a second-order expansion at :math:`\min(t^*, r_i)` and
    ``torch.special.log_ndtr`` (:func:`log_radial_gaussian_integral`; measured error at most
    0.08 nats at ``n = 50``, 0.03 at ``n = 400``, shrinking roughly like ``n^{-1/2}``). Everything is computed in log
    space in float64; :math:`n\log r` is never exponentiated.

    **Confidence.** The estimate of the volume is unbiased, its log is biased low (Jensen) and
    overestimates by ``log m`` with probability at most ``1/m`` (Markov), so a larger value from a
    valid preconditioner is a better one, and :meth:`VolumeEstimate.log_volume_lower_bound`
    (``log V̂ + log(1 - confidence)``) is a lower bound with the stated confidence. The importance
    weights are heavy-tailed: :attr:`VolumeEstimate.effective_sample_size` (often ≈ 1 on networks:
    one direction carries the estimate) says how many directions effectively count;
    ``log_contribution_std`` is a spread, not an error bar.

    Args:
        model: The network at the anchor :math:`\theta`. Only parameters with ``requires_grad``
            are perturbed. It is left exactly as found (parameters, buffers, train/eval flags,
            ``.grad``, ``requires_grad``, torch's global RNG state).
        data: A re-iterable (list, DataLoader) of batches of the analysis set.
        cost: ``"kl"`` (default), ``"gaussian"``, ``"loss"`` or a callable (see above).
        loss_fn: ``loss_fn(outputs, targets)`` for ``cost="loss"`` with ``(inputs, targets)`` batches.
        batch_loss: ``batch_loss(model, batch) -> scalar mean loss`` for ``cost="loss"``.
        output_fn: ``output_fn(model, batch) -> outputs``; default ``model(batch[0])`` for
            tuple/list batches, ``model(batch)`` otherwise.
        mask_fn: ``mask_fn(batch) -> [B, ...]`` 0/1 mask of the positions counted by the KL and
            Gaussian costs (e.g. padding in sequence models).
        batch_size_fn: Weight of a batch for ``cost="loss"`` (default: leading dimension).
        cutoff: Cost level defining the neighbourhood, in nats (default 1e-2).
        num_directions: Number of sampled directions ``k`` (default 100).
        preconditioner: ``None``, ``"adam"``, ``"adam_exp_avg"``, ``"hessian_diag"``,
            ``"hessian_diag_hutchinson"`` or a tensor.
        optimizer: The optimizer, or a list of optimizers (every one of the model's), whose Adam
            state the ``"adam*"`` preconditioners read (never modified).
        preconditioner_eps: ``ρ``: ε as a fraction of the median scale ``|d|^e`` (default 3, see
            :data:`~lightning_hessian.volume.preconditioner.DEFAULT_RELATIVE_EPS`), or ``"auto"``.
        preconditioner_exponent: ``e`` (default ½).
        preconditioner_probes: Hutchinson probes for ``"hessian_diag_hutchinson"``.
        measure: ``"gaussian"`` (default; finite even for flat directions) or ``"lebesgue"``.
        prior_std: Prior standard deviation(s) ``s`` for the Gaussian measure: a float, or a mapping
            parameter name -> float or tensor of stds (broadcastable to the parameter), e.g. from
            :func:`init_prior_std`. Only trainable parameters enter the measure (frozen ones are
            held at their values).
        rel_tol: Relative tolerance on each radius (default 1e-4). A relative error δ on every
            radius shifts the log-volume by at most ``n * δ``; the interpolated radii are in
            practice far more accurate than the guaranteed bracket.
        max_radius: Search limit along a direction; default ``1e3 * max(||theta||, 1)``.
        initial_radius: First trial distance; default ``1e-2 * max(||theta||, 1e-2)``. Later groups of
            directions start from the median log radius found so far.
        directions_per_batch: Directions searched and evaluated together (memory grows with it);
            default: all, or fewer so that the stacked parameters stay below ~3e7 numbers.
        root_finder: ``"secant"`` (default) or ``"bisection"`` (the paper's baseline, for comparison).
        max_evaluations: Per-direction budget of cost evaluations.
        seed: Seed (or generator) of the directions and probes; global RNG is never used. Direction
            ``i`` depends only on the seed and ``i`` (not on ``directions_per_batch``).
        all_reduce: For distributed use: ``t -> sum of t over processes`` (float64). Each process
            passes its own shard of the analysis data; every cost evaluation then performs one
            collective of ``J + 1`` numbers, and all processes find identical radii and estimates.
            Pass the same integer ``seed`` everywhere (with ``seed=None`` the drawn seeds are summed).
        progress: Called after each group of directions with the number of directions finished
            (e.g. a progress bar's ``update``); it adds up to ``num_directions`` (with several
            candidate preconditioners, ``preconditioner_eps="auto"``, each counts its share).
        before_evaluation: Called before every batched cost evaluation (one forward pass of the
            analysis set for a group of (direction, step) pairs; under DDP the same number of
            times on every process); it may raise to stop the estimate (how
            :class:`~lightning_hessian.callbacks.LocalVolumeMonitor` stops at a SIGTERM).

    Returns:
        A :class:`VolumeEstimate`.

    Raises:
        TypeError: Wrong argument types, integer model outputs, a non-tensor output.
        ValueError: ``cutoff <= 0``, ``num_directions < 1``, an unknown ``cost``/``measure``/
            ``preconditioner``/``root_finder``, ``"adam"`` without Adam state for some parameter,
            bad ``prior_std``, a cost at the anchor already at or above ``cutoff``.
        VolumeComputationError: NaN cost along a direction or non-finite anchor outputs.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_hessian.volume import local_volume
        >>> _ = torch.manual_seed(0)
        >>> gen = torch.Generator().manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> data = [(torch.randn(32, 4, generator=gen), torch.zeros(32))]
        >>> est = local_volume(model, data, num_directions=8, measure="lebesgue")
        >>> est.num_params, est.num_capped, bool(est.forward_passes_per_direction < 8)
        (67, 0, True)
        >>> est.log_volume < 0
        True
    """
    started = time.perf_counter()
    config = validate(
        model,
        data,
        cost=cost,
        loss_fn=loss_fn,
        batch_loss=batch_loss,
        output_fn=output_fn,
        cutoff=cutoff,
        num_directions=num_directions,
        preconditioner=preconditioner,
        optimizer=optimizer,
        preconditioner_eps=preconditioner_eps,
        preconditioner_exponent=preconditioner_exponent,
        preconditioner_probes=preconditioner_probes,
        measure=measure,
        rel_tol=rel_tol,
        max_radius=max_radius,
        initial_radius=initial_radius,
        directions_per_batch=directions_per_batch,
        root_finder=root_finder,
        max_evaluations=max_evaluations,
    )
    names, params = _trainable(model)
    log_s = log_prior_std(prior_std, names, params) if config.measure == "gaussian" else None
    base_seed, aux_generator = direction_seeds(seed, all_reduce, params[0].device)
    with _analysis_mode(model, params[0].device):
        # cost and anchor: C(theta) must be below the cutoff
        evaluator = _cost_evaluator(model, config, mask_fn, batch_size_fn, names, params, all_reduce)
        evaluator.before_call = before_evaluation
        theta = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
        _check_anchor_cost(evaluator, theta, config.cutoff)
        # preconditioner(s), then the shared search set-up and the flat coordinates
        candidates, hvps, passes = _candidates(config, optimizer, evaluator, names, params, aux_generator, all_reduce)
        setup = _setup(config, evaluator, theta, names, log_s, base_seed)
        flat, flat_passes = _flat(setup, aux_generator, all_reduce)
        # directions and radii, per candidate
        share = None if progress is None else _shared(progress, len(candidates))
        searches = [(candidate, _search(setup, candidate, share)) for candidate in candidates]
    result = _select(setup, searches, flat)
    result.preconditioner_hvps = hvps
    result.preconditioner_passes = passes
    result.num_forward_passes += 1 + flat_passes  # + the anchor check and the flat-coordinate check
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the parameters to perturb (``requires_grad``), in registration order."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("The model has no trainable parameters (requires_grad=True): nothing to perturb.")
    sharded = dtensor_parameters(model)
    if sharded:  # FSDP2: functional_call on local shards would perturb nothing meaningful
        raise fsdp2_error("local_volume", sharded)
    return [name for name, _ in named], [p for _, p in named]


@contextlib.contextmanager
def _analysis_mode(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, no autograd graph, no autocast, the math attention kernel; the model restored after."""
    with (
        preserved_model_state(model),
        derivative_friendly_attention(),
        torch.no_grad(),
        torch.autocast(device_type=device.type, enabled=False),
    ):
        model.eval()
        yield


def _select(setup: _Setup, searches: list[tuple[_Candidate, RadiiSearch]], flat: dict[str, int]) -> VolumeEstimate:
    """Each candidate's estimate; the largest one, charged ``log(number of candidates)``.

    ``num_forward_passes`` counts the radius searches of every candidate (the caller adds the rest).
    """
    estimates = [_estimate(setup, candidate, search, flat) for candidate, search in searches]
    best = max(range(len(estimates)), key=lambda i: _order(estimates[i].log_volume))
    result = estimates[best]
    result.selection_log_penalty = math.log(len(estimates))
    result.num_forward_passes = sum(int(s.evaluations.sum()) for _, s in searches)
    return result


def _cost_evaluator(
    model: nn.Module,
    config: VolumeConfig,
    mask_fn: Callable[[Any], Tensor] | None,
    batch_size_fn: Callable[[Any], float] | None,
    names: list[str],
    params: list[Tensor],
    all_reduce: Callable[[Tensor], Tensor] | None,
) -> CostEvaluator:
    batches = [_move(batch, params[0].device) for batch in config.data]
    if not batches and all_reduce is None:
        raise ValueError("`data` is empty: the analysis set needs at least one batch.")
    return CostEvaluator(
        model,
        batches,
        cost=config.cost,
        output_fn=config.output_fn,
        batch_loss=config.batch_loss,
        mask_fn=mask_fn,
        batch_size_fn=batch_size_fn or _default_batch_size,
        names=names,
        params=params,
        all_reduce=all_reduce,
    )


def _check_anchor_cost(evaluator: CostEvaluator, theta: Tensor, cutoff: float) -> None:
    """C(theta) once (one forward pass): the neighbourhood is empty unless it is below the cutoff."""
    zero = torch.zeros(1, theta.numel(), dtype=torch.float64, device=theta.device)
    value = float(evaluator(theta, zero, torch.zeros(1, dtype=torch.float64, device=theta.device))[0])
    if math.isnan(value):
        raise VolumeComputationError("The cost at the anchor is NaN; the local volume is undefined there.")
    if value >= cutoff:
        raise ValueError(
            f"The cost at the anchor is C(theta) = {value:.6g} >= cutoff = {cutoff:.6g}: the neighbourhood "
            "{C < cutoff} does not contain the anchor, so there is nothing to measure. A cost must be "
            "~0 at the anchor (check a custom `cost`), or raise `cutoff`."
        )


def _candidates(
    config: VolumeConfig,
    optimizer: Any,
    evaluator: CostEvaluator,
    names: list[str],
    params: list[Tensor],
    generator: torch.Generator,
    all_reduce: Callable[[Tensor], Tensor] | None,
) -> tuple[list[_Candidate], int, int]:
    """The preconditioner(s) to try, and the HVPs / Jacobian rows spent building them."""
    pre = config.preconditioner
    if pre is None:
        return [_Candidate(None, "none")], 0, 0
    if isinstance(pre, (Tensor, Mapping)):
        return [_Candidate(tensor_log_preconditioner(pre, names, params), "tensor")], 0, 0
    scale = preconditioner_scale(
        pre,
        optimizer=optimizer,
        exponent=config.exponent,
        probes=config.probes,
        names=names,
        params=params,
        evaluator=evaluator,
        generator=generator,
        all_reduce=all_reduce,
    )
    out = []
    for rho in relative_eps_grid(config.preconditioner_eps, pre):
        log_p, eps = log_preconditioner(scale, rho)
        out.append(_Candidate(log_p, pre, eps, rho))
    return out, scale.hvps, scale.passes


def _setup(
    config: VolumeConfig,
    evaluator: CostEvaluator,
    theta: Tensor,
    names: list[str],
    log_s: Tensor | None,
    base_seed: int,
) -> _Setup:
    theta_norm = float(theta.norm())
    n = theta.numel()
    log_max = math.log(config.max_radius if config.max_radius is not None else 1e3 * max(theta_norm, 1.0))
    log_init = math.log(config.initial_radius if config.initial_radius is not None else 1e-2 * max(theta_norm, 1e-2))
    per_batch = config.directions_per_batch or max(
        1, min(config.num_directions, _DIRECTION_ELEMENT_BUDGET // max(n, 1))
    )
    return _Setup(config, evaluator, theta, names, log_s, base_seed, log_max, log_init, per_batch)


def _flat(
    setup: _Setup, generator: torch.Generator, all_reduce: Callable[[Tensor], Tensor] | None
) -> tuple[dict[str, int], int]:
    """Exactly flat coordinates per parameter name (Lebesgue measure only), and passes spent."""
    if setup.config.measure != "lebesgue":
        return {}, 0
    mask, passes = flat_coordinates(
        setup.evaluator,
        setup.theta,
        max_radius=math.exp(setup.log_max),
        cutoff=setup.config.cutoff,
        generator=generator,
        all_reduce=all_reduce,
    )
    counts: dict[str, int] = {}
    offset = 0
    for name, numel in zip(setup.names, setup.evaluator.numels, strict=False):
        count = int(mask[offset : offset + numel].sum())
        if count:
            counts[name] = count
        offset += numel
    if counts:
        listed = ", ".join(f"{name} ({count})" for name, count in list(counts.items())[:8])
        warnings.warn(
            f"local_volume: {sum(counts.values())} coordinate(s) are exactly flat (the cost does not "
            f"depend on them out to max_radius): {listed}{' ...' if len(counts) > 8 else ''}. Their "
            "Lebesgue volume is infinite, so log_volume = +inf. Freeze them (requires_grad=False), "
            "or use measure='gaussian' (finite).",
            UserWarning,
            stacklevel=3,
        )
    return counts, passes


def _shared(progress: Callable[[float], None], parts: int) -> Callable[[float], None]:
    """``progress`` with counts divided among ``parts`` searches (so they add up to ``num_directions``)."""
    if parts == 1:
        return progress
    return lambda count: progress(count / parts)


def _search(setup: _Setup, candidate: _Candidate, progress: Callable[[float], None] | None = None) -> RadiiSearch:
    config = setup.config
    return search_radii(
        setup.evaluator,
        setup.theta,
        candidate.log_p,
        base_seed=setup.base_seed,
        num_directions=config.num_directions,
        per_batch=setup.per_batch,
        cutoff=config.cutoff,
        rel_tol=config.rel_tol,
        log_max_radius=setup.log_max,
        log_initial_radius=setup.log_init,
        max_evaluations=config.max_evaluations,
        root_finder=config.root_finder,
        inv_prior_var=None if setup.log_s is None else torch.exp(-2.0 * setup.log_s),
        progress=progress,
    )


def _finite_std(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.std(unbiased=False)) if finite.numel() else math.nan


def _estimate(setup: _Setup, candidate: _Candidate, search: RadiiSearch, flat: dict[str, int]) -> VolumeEstimate:
    """Assemble one candidate's :class:`VolumeEstimate` (before the selection's bookkeeping)."""
    config = setup.config
    n = setup.theta.numel()
    log_k = math.log(config.num_directions)
    log_r, log_vn = search.log_radii, search.log_direction_norms
    num_capped = int(search.capped.sum())
    leb_contrib = lebesgue_log_contributions(log_r, log_vn, n)
    leb_volume = float(torch.logsumexp(leb_contrib, dim=0)) - log_k
    if num_capped > 0 or flat:
        leb_volume = math.inf
    if setup.log_s is not None:
        assert search.prior_a is not None and search.prior_b is not None
        inv_var = torch.exp(-2.0 * setup.log_s)
        contrib = gaussian_log_contributions(
            log_r,
            log_vn,
            search.prior_a,
            search.prior_b,
            n=n,
            sum_log_prior_std=float(setup.log_s.sum()),
            anchor_quadratic=float((setup.theta * setup.theta * inv_var).sum()),
        )
        log_volume = float(torch.logsumexp(contrib, dim=0)) - log_k
    else:
        contrib = leb_contrib
        log_volume = leb_volume
    ess, top = effective_sample_size(contrib)
    total_evals = int(search.evaluations.sum())
    return VolumeEstimate(
        log_volume=log_volume,
        log10_probability=log_volume / math.log(10.0),
        description_length_bits=-log_volume / math.log(2.0),
        measure=config.measure,
        cutoff=config.cutoff,
        num_params=n,
        num_directions=config.num_directions,
        log_radii=log_r,
        log_direction_norms=log_vn,
        log_contributions=contrib,
        lebesgue_log_contributions=leb_contrib,
        lebesgue_log_volume=leb_volume,
        log_radius_mean=float(log_r.mean()),
        log_radius_std=_finite_std(log_r),
        log_contribution_std=_finite_std(contrib),
        num_capped=num_capped,
        capped=search.capped,
        num_unconverged=int((~search.converged & ~search.capped).sum()),
        converged=search.converged,
        evaluations=search.evaluations,
        num_forward_passes=total_evals + 1,
        forward_passes_per_direction=total_evals / config.num_directions,
        preconditioner=candidate.kind,
        effective_sample_size=ess,
        top_weight_share=top,
        preconditioner_eps=candidate.eps,
        preconditioner_eps_relative=candidate.eps_relative,
        flat_parameters=dict(flat),
        root_finder=config.root_finder,
    )


def _order(value: float) -> float:
    """Sort key of estimates: NaN last."""
    return -math.inf if math.isnan(value) else value
