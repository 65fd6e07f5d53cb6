r"""Local volume of a network's behavioural neighbourhood (METHODS.md §4).

Implements the estimator of *Estimating the Probability of Sampling a Trained Neural Network at
Random* (``papers/local-volume-probability-of-sampling.txt`` §3): the volume, or the probability
under the initialisation prior, of the star domain

.. math::
    S = \{\theta + t\hat u : 0 \le t < r(\hat u)\},\qquad
    r(\hat u) = \min\{t > 0 : C(\theta + t\hat u) = \text{cutoff}\},

around the trained parameters :math:`\theta`, where :math:`C` is a behavioural cost that is zero
at :math:`\theta` (by default the expected KL divergence between the anchor's and the perturbed
model's predictive distributions over the analysis set).

The entry point is :func:`local_volume`; :func:`init_prior_std` snapshots the per-tensor standard
deviations of freshly initialised weights for the Gaussian measure.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from lightning_hessian._radius import RadiusSearchNaNError, RootFinder, find_radii
from lightning_hessian._random import draw_probes, make_generator
from lightning_hessian.errors import HessianComputationError
from lightning_hessian.operators import HessianOperator, derivative_friendly_attention, preserved_model_state
from lightning_hessian.operators._batches import _default_batch_size, _move

__all__ = ["VolumeComputationError", "VolumeEstimate", "init_prior_std", "local_volume"]

CostName = Literal["kl", "gaussian", "loss"]
CostFn = Callable[[Tensor, Tensor, Any], Tensor]
PreconditionerName = Literal["adam", "adam_exp_avg", "hessian_diag"]
Measure = Literal["gaussian", "lebesgue"]
PriorStd = Union[float, Mapping[str, Union[float, Tensor]]]

_DEFAULT_EPS = {"adam": 1e-3, "adam_exp_avg": 1e-3, "hessian_diag": 1e-2}
_PRECONDITIONER_NAMES = ("adam", "adam_exp_avg", "hessian_diag")
# Elements of the perturbed-parameter stack kept at once when choosing directions_per_batch.
_DIRECTION_ELEMENT_BUDGET = 2**25


class VolumeComputationError(HessianComputationError):
    """A numerical failure of :func:`local_volume` (NaN cost, non-finite anchor outputs, ...).

    Subclasses :class:`~lightning_hessian.errors.HessianComputationError`, so callbacks turn it
    into a warning and a NaN metric instead of a crash.
    """


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass
class VolumeEstimate:
    r"""Result of :func:`local_volume`. Log quantities are natural logs, float64, on the CPU.

    Attributes:
        log_volume: The estimate in nats: :math:`\log P(S)` under the Gaussian measure (a log
            probability, ``<= 0``), :math:`\log \mathrm{vol}(S)` under the Lebesgue measure
            (``+inf`` when some direction hit ``max_radius``, see ``num_capped``).
        log10_probability: ``log_volume / ln 10`` (for the Lebesgue measure: log10 of the volume).
        description_length_bits: ``-log_volume / ln 2``. Gaussian measure: :math:`-\log_2 P(S)`,
            the bits needed to single out the neighbourhood under the prior. Lebesgue measure:
            bits relative to a quantisation cell of unit volume in parameter space (only
            differences between networks of the same size are meaningful); ``-inf`` if capped.
        measure: ``"gaussian"`` or ``"lebesgue"``.
        cutoff: The cost level defining the neighbourhood.
        num_params: Number of trainable parameters ``n``.
        num_directions: Number of sampled directions ``k``.
        log_radii: ``[k]`` log distance ``log r(v_hat_i)`` from the anchor to the first crossing
            along each unit direction (parameter-space units).
        log_direction_norms: ``[k]`` ``log ||v_i||`` for ``v_i = P u_i`` (importance correction).
        log_contributions: ``[k]`` one-direction estimates of ``log_volume`` for the chosen
            measure; ``log_volume = logsumexp(log_contributions) - log k``.
        lebesgue_log_contributions: ``[k]`` the same for the Lebesgue measure,
            ``log|S^{n-1}| - log n + n (log r_i - log ||v_i||)`` (finite even when capped).
        lebesgue_log_volume: Lebesgue estimate (``+inf`` if any direction is capped), reported
            whatever the measure.
        log_radius_mean: Mean of ``log_radii``.
        log_radius_std: Standard deviation of ``log_radii`` across directions.
        log_contribution_std: Standard deviation of ``log_contributions`` (the estimator's spread).
        num_capped: Directions whose cost stayed below the cutoff up to ``max_radius``.
        capped: ``[k]`` mask of the capped directions.
        num_unconverged: Directions whose root finding ran out of evaluations (their radius is
            the last point known to be inside, a conservative value).
        converged: ``[k]`` mask of the directions bracketed to ``rel_tol``.
        evaluations: ``[k]`` cost evaluations (forward passes over the analysis set) per direction.
        num_forward_passes: Total forward passes over the analysis set, counting one per
            (direction, step) pair plus one for the anchor.
        forward_passes_per_direction: Mean of ``evaluations``.
        preconditioner: ``"none"``, ``"adam"``, ``"adam_exp_avg"``, ``"hessian_diag"`` or ``"tensor"``.
        preconditioner_hvps: Hessian-vector products spent on the ``"hessian_diag"`` preconditioner.
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
    preconditioner_hvps: int = 0
    root_finder: str = "secant"
    seconds: float = field(default=0.0, compare=False)

    def metrics(self) -> dict[str, float]:
        """Scalar summary for logging (names without a prefix)."""
        return {
            "log_volume": self.log_volume,
            "log10_probability": self.log10_probability,
            "description_length_bits": self.description_length_bits,
            "log_radius_mean": self.log_radius_mean,
            "log_radius_std": self.log_radius_std,
            "log_contribution_std": self.log_contribution_std,
            "num_capped": float(self.num_capped),
            "num_unconverged": float(self.num_unconverged),
            "num_forward_passes": float(self.num_forward_passes),
        }


# --------------------------------------------------------------------------------------------
# Prior standard deviations
# --------------------------------------------------------------------------------------------


def init_prior_std(model: nn.Module, *, fallback: float = 1.0) -> dict[str, float]:
    r"""Per-tensor standard deviation of the (freshly initialised) parameters, for the prior.

    Call it right after initialisation (the local-volume callback does so at fit start and keeps
    the result in its ``state_dict``); pass the result as ``prior_std`` to :func:`local_volume`,
    which then uses the diagonal prior :math:`N(0, s_T^2)` for every entry of tensor ``T``.

    ``s_T`` is the population standard deviation of the entries of ``T``. A tensor whose entries
    are all equal (zero-initialised biases, normalisation weights set to one, single-element
    tensors) has ``s_T = 0``, which would make the prior degenerate. Fallback, in order:

    1. the standard deviation of the largest non-constant parameter of the same module (a
       zero-initialised ``Linear``/``Conv`` bias gets its weight's std; with PyTorch's default
       initialisation, bias and weight are both drawn from ``U(±1/sqrt(fan_in))``, so this is
       the std the bias would have had under the default init);
    2. otherwise ``fallback`` (default ``1.0``, e.g. for LayerNorm/BatchNorm affine parameters).

    Args:
        model: The module, at initialisation.
        fallback: Standard deviation used when neither the tensor nor its module gives one.

    Returns:
        ``{name: std}`` for every parameter in ``model.named_parameters()``.

    Raises:
        ValueError: ``fallback`` is not positive and finite.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_hessian.volume import init_prior_std
        >>> layer = nn.Linear(100, 10)
        >>> _ = nn.init.zeros_(layer.bias)
        >>> stds = init_prior_std(layer)
        >>> stds["bias"] == stds["weight"]
        True
    """
    if not (isinstance(fallback, (int, float)) and math.isfinite(fallback) and fallback > 0):
        raise ValueError(f"`fallback` must be a positive finite float, got {fallback!r}.")
    own: dict[str, float] = {}
    numel: dict[str, int] = {}
    for name, p in model.named_parameters():
        data = p.detach()
        std = float(data.double().std(unbiased=False)) if data.numel() > 1 else 0.0
        own[name] = std if math.isfinite(std) else 0.0
        numel[name] = data.numel()
    result: dict[str, float] = {}
    for name, std in own.items():
        if std > 0:
            result[name] = std
            continue
        prefix = name.rpartition(".")[0]
        siblings = [
            (numel[other], own[other])
            for other in own
            if other.rpartition(".")[0] == prefix and other != name and own[other] > 0
        ]
        result[name] = max(siblings)[1] if siblings else float(fallback)
    return result


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _log_sphere_area(n: int) -> float:
    """log |S^{n-1}| = log 2 + (n/2) log pi - lgamma(n/2)."""
    return math.log(2.0) + 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_ndtr_diff(alpha: Tensor, beta: Tensor) -> Tensor:
    """log(Phi(beta) - Phi(alpha)) for alpha < beta, accurate in both tails."""
    upper = alpha > 0  # both in the upper tail: use Phi(-alpha) - Phi(-beta)
    lo = torch.where(upper, -beta, alpha)
    hi = torch.where(upper, -alpha, beta)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    return log_hi + _log1mexp(torch.clamp(log_lo - log_hi, max=0.0))


def log_radial_gaussian_integral(a: Tensor, b: Tensor, n: int, r: Tensor) -> Tensor:
    r"""``log ∫_0^r exp(-a t²/2 - b t) t^{n-1} dt`` by a second-order expansion (METHODS.md §4).

    The log-integrand :math:`g(t) = -\tfrac12 a t^2 - b t + (n-1)\log t` is concave with its
    maximum at :math:`t^* = (-b + \sqrt{b^2 + 4a(n-1)})/(2a)`. ``g`` is expanded to second order
    at :math:`m = \min(t^*, r)` (the maximum of ``g`` on ``[0, r]``), and the resulting Gaussian
    is integrated over ``[0, r]`` as a difference of normal CDFs in log space
    (``torch.special.log_ndtr``). The error in nats shrinks like ``n^{-1/2}`` (worst when the
    cut ``r`` is near ``t*``: about 0.03 at ``n = 50``, 0.003 at ``n = 4810``, 2e-4 at ``n = 1e6``),
    negligible against the Monte Carlo spread of the volume estimate.

    Args:
        a: ``[k]`` positive curvatures (float64).
        b: ``[k]`` linear coefficients (float64).
        n: Dimension (``>= 1``).
        r: ``[k]`` upper limits (``> 0``).
    """
    a, b, r = (x.to(torch.float64) for x in (a, b, r))
    m1 = float(n - 1)
    disc = torch.sqrt(b * b + 4.0 * a * m1)
    t_star = torch.where(b <= 0, (-b + disc) / (2.0 * a), (2.0 * m1) / (b + disc))
    if m1 == 0:
        t_star = torch.clamp(-b / a, min=0.0)
    m = torch.minimum(t_star, r)
    m_safe = torch.clamp(m, min=torch.finfo(torch.float64).tiny)
    g = -0.5 * a * m * m - b * m + m1 * torch.log(m_safe)
    g1 = torch.clamp(-a * m - b + m1 / m_safe, min=0.0) if m1 > 0 else torch.clamp(-a * m - b, min=0.0)
    c = a + m1 / (m_safe * m_safe)
    mu = m + g1 / c
    sqrt_c = torch.sqrt(c)
    beta = (r - mu) * sqrt_c
    alpha = -mu * sqrt_c
    return g + g1 * g1 / (2.0 * c) + 0.5 * math.log(2.0 * math.pi) - torch.log(sqrt_c) + _log_ndtr_diff(alpha, beta)


def _check_positive_float(value: Any, name: str, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__}. {hint}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be positive and finite, got {value}. {hint}")
    return value


def _default_output_fn(model: nn.Module, batch: Any) -> Tensor:
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    if isinstance(batch, Mapping):
        raise TypeError(
            "Batches are mappings; pass `output_fn=lambda model, batch: ...` to say how to get "
            "the model's outputs from a batch."
        )
    return model(batch)


def _reduce_cost_numel(tensor: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return tensor.sum()
    return (tensor * mask).sum()


# --------------------------------------------------------------------------------------------
# Cost evaluation
# --------------------------------------------------------------------------------------------


class _Forward(nn.Module):
    """``forward(batch) = fn(model, batch)`` so that ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, batch: Any) -> Tensor:
        return self._fn(self.model, batch)


@dataclass
class _Batch:
    batch: Any
    anchor: Tensor | None  # kl: anchor log-probs (float64); gaussian/custom: anchor outputs
    mask: Tensor | None  # float64 mask over positions, or None
    weight: float  # number of averaged terms (positions, examples)
    anchor_loss: float = 0.0


class _CostEvaluator:
    """Batched costs ``C(theta + t_j v_j)``: float64 size-weighted means over the analysis set.

    Anchor outputs are computed once at construction. Every call evaluates all requested
    (direction, step) pairs with ``torch.func.vmap`` over stacked parameters and, with
    ``all_reduce``, performs exactly one collective (the per-direction sums and a failure flag).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[Any],
        *,
        cost: str | CostFn,
        output_fn: Callable[[nn.Module, Any], Tensor],
        batch_loss: Callable[[nn.Module, Any], Tensor] | None,
        mask_fn: Callable[[Any], Tensor] | None,
        batch_size_fn: Callable[[Any], float],
        names: list[str],
        params: list[Tensor],
        all_reduce: Callable[[Tensor], Tensor] | None,
    ) -> None:
        self.model = model
        self.cost = cost
        self.output_fn = output_fn
        self.batch_loss = batch_loss
        self.all_reduce = all_reduce
        self.names = names
        self.params = params
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.wrapper = _Forward(model, batch_loss if cost == "loss" else output_fn)  # type: ignore[arg-type]
        self.prefixed = [f"model.{name}" for name in names]
        self._vmap_ok: bool | None = None
        self.batches: list[_Batch] = []
        local_weight = 0.0
        failure: BaseException | None = None
        try:
            for batch in batches:
                entry = self._anchor(batch, mask_fn, batch_size_fn)
                self.batches.append(entry)
                local_weight += entry.weight
        except Exception as err:  # noqa: BLE001 - re-raised (after the collective when distributed)
            if all_reduce is None:
                raise
            failure = err
        if all_reduce is not None:
            # One collective: the total weight, and whether any process failed on its shard
            # (every process joins it, so none hangs; all raise).
            packed = torch.tensor(
                [local_weight if failure is None else 0.0, 1.0 if failure is not None else 0.0],
                dtype=torch.float64,
                device=self.device,
            )
            total = all_reduce(packed).reshape(-1)
            if failure is not None:
                raise failure
            if float(total[1]) > 0:
                raise VolumeComputationError("Another process failed while computing the anchor outputs.")
            local_weight = float(total[0])
        if not local_weight > 0:
            raise ValueError("`data` yielded no batches (or only fully masked ones): the analysis set is empty.")
        self.total_weight = local_weight

    # ------------------------------------------------------------------ anchor

    def _anchor(self, batch: Any, mask_fn: Any, batch_size_fn: Callable[[Any], float]) -> _Batch:
        out = self.wrapper(batch)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"The model/`output_fn` must return a Tensor, got {type(out).__name__}; pass "
                "`output_fn=lambda model, batch: model(...).logits` (or similar)."
            )
        if self.cost == "loss":
            if out.numel() != 1:
                raise TypeError(
                    f"The loss must be a scalar (a mean over the batch), got shape {tuple(out.shape)}."
                )
            loss = float(out)
            if not math.isfinite(loss):
                raise VolumeComputationError(f"The loss at the anchor is {loss} on an analysis batch.")
            weight = float(batch_size_fn(batch))
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"Batch weight must be positive and finite, got {weight}.")
            return _Batch(batch, None, None, weight, loss)
        if not torch.is_floating_point(out):
            raise TypeError(
                f"The model's outputs have dtype {out.dtype}; the {self.cost!r} cost needs floating "
                "outputs (logits or predictions). Return logits rather than class indices, e.g. via "
                "`output_fn=lambda model, batch: model(batch[0])`."
            )
        if not torch.isfinite(out).all():
            raise VolumeComputationError(
                "The model's outputs at the anchor contain NaN/Inf; the local volume is undefined there."
            )
        mask = None
        if callable(self.cost):
            anchor = out.detach()
            value = self.cost(anchor, anchor, batch)
            if not isinstance(value, Tensor) or not torch.is_floating_point(value):
                raise TypeError("A custom `cost(outputs, anchor_outputs, batch)` must return a floating tensor of per-example costs.")
            return _Batch(batch, anchor, None, float(value.numel()))
        if self.cost == "kl":
            if out.ndim < 2:
                raise ValueError(
                    f"cost='kl' needs logits with a class dimension (shape [batch, ..., classes]), got "
                    f"shape {tuple(out.shape)}; use cost='gaussian' for regression outputs."
                )
            anchor = torch.log_softmax(out.detach().to(torch.float64), dim=-1)
            positions = out.shape[:-1]
        else:  # gaussian
            anchor = out.detach().to(torch.float64)
            if anchor.ndim == 1:
                anchor = anchor.unsqueeze(-1)
            positions = anchor.shape[:-1]
        if mask_fn is not None:
            mask_t = mask_fn(batch)
            if not isinstance(mask_t, Tensor) or tuple(mask_t.shape) != tuple(positions):
                raise ValueError(
                    f"`mask_fn` must return a tensor of shape {tuple(positions)} (the outputs' shape "
                    f"without the last dimension), got {getattr(mask_t, 'shape', type(mask_t).__name__)}."
                )
            mask = mask_t.to(device=anchor.device, dtype=torch.float64)
            weight = float(mask.sum())
        else:
            weight = float(math.prod(positions))
        return _Batch(batch, anchor, mask, weight)

    # ------------------------------------------------------------------ per-batch cost sums

    def _cost_sum(self, out: Tensor, entry: _Batch) -> Tensor:
        """Sum of per-position costs of one (unbatched) perturbed output against the anchor."""
        if self.cost == "loss":
            return (out.reshape(()).to(torch.float64) - entry.anchor_loss) * entry.weight
        if callable(self.cost):
            return self.cost(out, entry.anchor, entry.batch).to(torch.float64).sum()
        assert entry.anchor is not None
        if self.cost == "kl":
            log_q = torch.log_softmax(out.to(torch.float64), dim=-1)
            log_p = entry.anchor
            per = (log_p.exp() * (log_p - log_q)).sum(-1)
        else:
            diff = out.to(torch.float64)
            if diff.ndim == entry.anchor.ndim - 1:
                diff = diff.unsqueeze(-1)
            per = 0.5 * (diff - entry.anchor).pow(2).sum(-1)
        return _reduce_cost_numel(per, entry.mask)

    def batch_mean_cost(self, model: nn.Module, item: tuple[int, Any]) -> Tensor:
        """Mean cost of one batch as a function of ``model``'s parameters (for HVPs)."""
        index, _ = item
        entry = self.batches[index]
        fn = self.batch_loss if self.cost == "loss" else self.output_fn
        out = fn(model, entry.batch)  # type: ignore[misc]
        return self._cost_sum(out, entry) / entry.weight

    # ------------------------------------------------------------------ batched evaluation

    def _stacked_params(self, theta: Tensor, directions: Tensor, t: Tensor) -> dict[str, Tensor]:
        """``theta + t_j * directions_j`` (float64, rounded once to the model dtype), per parameter.

        ``theta`` is ``[n]``, ``directions`` ``[J, n]`` and ``t`` ``[J]`` (float64, on the device);
        returns ``{name: [J, *shape]}``. Built one parameter at a time to bound peak memory.
        """
        out: dict[str, Tensor] = {}
        offset = 0
        count = directions.shape[0]
        for name, shape, numel in zip(self.prefixed, self.shapes, self.numels):
            block = torch.addcmul(theta[offset : offset + numel].unsqueeze(0), t.unsqueeze(1), directions[:, offset : offset + numel])
            out[name] = block.to(self.dtype).reshape(count, *shape)
            offset += numel
        return out

    def _local_sums(self, stacked: dict[str, Tensor], count: int) -> Tensor:
        sums = torch.zeros(count, dtype=torch.float64, device=self.device)
        for entry in self.batches:
            sums += self._batch_sums(stacked, entry, count)
        return sums

    def _batch_sums(self, stacked: dict[str, Tensor], entry: _Batch, count: int) -> Tensor:
        wrapper = self.wrapper

        def one(pdict: dict[str, Tensor]) -> Tensor:
            out = torch.func.functional_call(wrapper, pdict, (entry.batch,))
            return self._cost_sum(out, entry)

        if self._vmap_ok is not False:
            try:
                result = torch.func.vmap(one, randomness="same")(stacked)
                self._vmap_ok = True
                return result
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
                if self._vmap_ok:  # vmap worked before: a genuine error
                    raise
                self._vmap_ok = False
                warnings.warn(
                    "Evaluating many directions at once with torch.func.vmap failed for this model "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
                    "falling back to one functional_call per direction (slower).",
                    RuntimeWarning,
                    stacklevel=6,
                )
        return torch.stack([one({k: v[j] for k, v in stacked.items()}) for j in range(count)])

    def __call__(self, theta: Tensor, directions: Tensor, t: Tensor) -> Tensor:
        """Costs at ``theta + t_j * directions_j`` (float64 inputs): float64 ``[J]`` on the CPU."""
        count = directions.shape[0]
        stacked = self._stacked_params(theta, directions, t)
        if self.all_reduce is None:
            sums = self._local_sums(stacked, count)
            return (sums / self.total_weight).cpu()
        failure: BaseException | None = None
        try:
            sums = self._local_sums(stacked, count)
        except Exception as err:  # noqa: BLE001 - re-raised after the collective
            failure = err
            sums = torch.zeros(count, dtype=torch.float64, device=self.device)
        flag = torch.tensor([1.0 if failure is not None else 0.0], dtype=torch.float64, device=self.device)
        packed = self.all_reduce(torch.cat([sums, flag]))
        if failure is not None:
            raise failure
        if float(packed[-1]) > 0:
            raise VolumeComputationError("Another process failed while evaluating the local-volume cost.")
        return (packed[:count] / self.total_weight).cpu()


# --------------------------------------------------------------------------------------------
# Preconditioners and priors
# --------------------------------------------------------------------------------------------


def _unwrap_optimizer(optimizer: Any) -> Any:
    inner = getattr(optimizer, "_optimizer", None)  # lightning's LightningOptimizer
    return inner if inner is not None else optimizer


def _adam_buffer(optimizer: Any, params: list[Tensor], names: list[str], key: str, kind: str) -> Tensor:
    if optimizer is None:
        raise ValueError(
            f"preconditioner={kind!r} needs the optimizer: pass `optimizer=` (a torch.optim.Adam/AdamW "
            "that has taken at least one step), or use preconditioner=None or 'hessian_diag'."
        )
    optimizer = _unwrap_optimizer(optimizer)
    state = getattr(optimizer, "state", None)
    if state is None:
        raise TypeError(f"`optimizer` has no `.state` (got {type(optimizer).__name__}); pass a torch optimizer.")
    blocks = []
    for name, p in zip(names, params):
        entry = state.get(p) if hasattr(state, "get") else None
        if not entry or key not in entry:
            raise ValueError(
                f"preconditioner={kind!r} needs Adam's `{key}` for every trainable parameter, but "
                f"the optimizer ({type(optimizer).__name__}) has none for {name!r}. Use an Adam-type "
                "optimizer that has taken at least one step (its state is created lazily), or "
                "preconditioner=None / 'hessian_diag'."
            )
        blocks.append(entry[key].detach().to(torch.float64).reshape(-1).to(p.device))
    return torch.cat(blocks)


def _flat_from_mapping(value: Mapping[str, Any], names: list[str], params: list[Tensor], what: str) -> Tensor:
    missing = [n for n in names if n not in value]
    if missing:
        raise ValueError(
            f"`{what}` has no entry for trainable parameter(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            "give one per name in model.named_parameters()."
        )
    blocks = []
    for name, p in zip(names, params):
        item = value[name]
        if isinstance(item, Tensor):
            t = item.detach().to(device=p.device, dtype=torch.float64)
            try:
                t = torch.broadcast_to(t, p.shape)
            except RuntimeError:
                raise ValueError(
                    f"`{what}[{name!r}]` has shape {tuple(item.shape)}, not broadcastable to {tuple(p.shape)}."
                ) from None
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            t = torch.full(p.shape, float(item), dtype=torch.float64, device=p.device)
        else:
            raise TypeError(f"`{what}[{name!r}]` must be a float or a tensor, got {type(item).__name__}.")
        blocks.append(t.reshape(-1))
    return torch.cat(blocks)


def _log_preconditioner(
    preconditioner: Any,
    *,
    optimizer: Any,
    eps: float | None,
    exponent: float,
    probes: int,
    names: list[str],
    params: list[Tensor],
    evaluator: _CostEvaluator,
    generator: torch.Generator,
    all_reduce: Callable[[Tensor], Tensor] | None,
) -> tuple[Tensor | None, str, int]:
    """``log p`` (float64 ``[n]``, summing to zero) or None for the naive estimator."""
    n = sum(p.numel() for p in params)
    if preconditioner is None or (isinstance(preconditioner, str) and preconditioner == "none"):
        return None, "none", 0
    hvps = 0
    if isinstance(preconditioner, (Tensor, Mapping)):
        if isinstance(preconditioner, Tensor):
            diag = preconditioner.detach().to(device=params[0].device, dtype=torch.float64).reshape(-1)
            if diag.numel() != n:
                raise ValueError(
                    f"A tensor `preconditioner` must have num_params={n} entries (flat, in "
                    f"model.named_parameters() order), got {diag.numel()}."
                )
        else:
            diag = _flat_from_mapping(preconditioner, names, params, "preconditioner")
        if not (torch.isfinite(diag).all() and (diag > 0).all()):
            raise ValueError("A tensor `preconditioner` must be finite and strictly positive (it is P's diagonal).")
        log_p = torch.log(diag)
        kind = "tensor"
    else:
        if not isinstance(preconditioner, str) or preconditioner not in _PRECONDITIONER_NAMES:
            raise ValueError(
                f"Unknown `preconditioner` {preconditioner!r}: use None, 'adam', 'adam_exp_avg', "
                "'hessian_diag', or a positive tensor of num_params entries (P's diagonal)."
            )
        kind = preconditioner
        eps_value = _DEFAULT_EPS[kind] if eps is None else float(eps)
        if kind == "adam":
            d = _adam_buffer(optimizer, params, names, "exp_avg_sq", kind)
        elif kind == "adam_exp_avg":
            d = _adam_buffer(optimizer, params, names, "exp_avg", kind)
        else:
            d = _hutchinson_diagonal(evaluator, probes, generator, all_reduce)
            hvps = probes
        denom = d.abs().pow(exponent) + eps_value
        if not (torch.isfinite(denom).all() and (denom > 0).all()):
            raise ValueError(
                f"The {kind!r} preconditioner has zero or non-finite entries (d^e + eps); use "
                "`preconditioner_eps` > 0."
            )
        log_p = -torch.log(denom)
    log_p = log_p - log_p.mean()
    return log_p, kind, hvps


def _hutchinson_diagonal(
    evaluator: _CostEvaluator, probes: int, generator: torch.Generator, all_reduce: Callable[[Tensor], Tensor] | None
) -> Tensor:
    """diag(H) of the cost at the anchor, ``mean_k z_k * (H z_k)`` with Rademacher ``z_k``."""
    items = [(i, None) for i in range(len(evaluator.batches))]
    weights = [entry.weight for entry in evaluator.batches]
    op = HessianOperator(
        evaluator.model,
        data=items,
        batch_loss=evaluator.batch_mean_cost,
        batch_size_fn=lambda item: weights[item[0]],
        device=evaluator.device,
        all_reduce=all_reduce,
        max_batched_vectors=8,
    )
    z = draw_probes(op.num_params, probes, "rademacher", generator, device=evaluator.device, dtype=evaluator.dtype)
    hz = op.matmat(z).to(torch.float64)
    return (z.to(torch.float64) * hz).mean(dim=1)


def _log_prior_std(prior_std: Any, names: list[str], params: list[Tensor]) -> Tensor:
    if isinstance(prior_std, str):
        raise ValueError(
            f"`prior_std={prior_std!r}`: the functional API takes a float or a mapping name -> float/"
            "tensor; for the initialisation prior pass `init_prior_std(model_at_init)` (the callback "
            "resolves 'init' itself)."
        )
    if isinstance(prior_std, Mapping):
        s = _flat_from_mapping(prior_std, names, params, "prior_std")
    elif isinstance(prior_std, (int, float)) and not isinstance(prior_std, bool):
        n = sum(p.numel() for p in params)
        s = torch.full((n,), float(prior_std), dtype=torch.float64, device=params[0].device)
    else:
        raise TypeError(
            f"`prior_std` must be a float or a mapping name -> float/tensor, got {type(prior_std).__name__}."
        )
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("`prior_std` must be strictly positive and finite for every parameter.")
    return torch.log(s)


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------


def _direction_seeds(
    seed: int | torch.Generator | None, all_reduce: Callable[[Tensor], Tensor] | None, device: torch.device
) -> tuple[int, torch.Generator]:
    """Base seed of the directions (direction i uses base + i) and a generator for the probes."""
    generator = make_generator(seed)
    base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    if seed is None and all_reduce is not None:
        # Every process drew its own seed; their sum is the same everywhere.
        total = all_reduce(torch.tensor([float(base)], dtype=torch.float64, device=device))
        base = int(total.reshape(-1)[0].item()) % (2**31 - 1)
    aux = torch.Generator(device="cpu")
    aux.manual_seed(base + 7919)
    return base, aux


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
    preconditioner_eps: float | None = None,
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
) -> VolumeEstimate:
    r"""Estimate the local volume (or prior probability) of the behavioural neighbourhood of ``model``.

    Paper §3 (``papers/local-volume-probability-of-sampling.txt``), METHODS.md §4.

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

    Anchor outputs are computed once; ``data`` is iterated once and its batches are kept.

    **Radius.** Along each unit direction :math:`\hat v` the first crossing
    :math:`r(\hat v)` of ``cutoff`` is found to relative accuracy ``rel_tol`` by a safeguarded
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
    :math:`p_j \propto 1 / (|d_j|^{e} + \varepsilon)` with ``e = preconditioner_exponent``:

    - ``None``: :math:`P = I`, the naive estimator (paper eq. 10);
    - ``"adam"``: ``d = exp_avg_sq`` of ``optimizer`` (raw buffer, no bias correction), ε = 1e-3;
    - ``"adam_exp_avg"``: ``d = exp_avg`` (absolute value), ε = 1e-3;
    - ``"hessian_diag"``: ``d = diag(H)`` of the cost at the anchor (the Fisher for the KL cost) by
      Hutchinson's estimator with ``preconditioner_probes`` Rademacher probes through
      :class:`~lightning_hessian.HessianOperator`, ε = 1e-2;
    - a positive tensor (flat ``[n]`` in ``model.named_parameters()`` order, or a mapping name ->
      tensor): :math:`P`'s diagonal itself, up to scale (``eps`` and ``exponent`` do not apply).

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
    ``torch.special.log_ndtr`` (:func:`log_radial_gaussian_integral`). Everything is computed in
    log space in float64; :math:`n\log r` is never exponentiated. The estimate of the volume is
    unbiased, its log is biased low (Jensen) and overestimates by ``log m`` with probability at most
    ``1/m`` (Markov), so a larger value from a valid preconditioner is a better one.

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
        preconditioner: ``None``, ``"adam"``, ``"adam_exp_avg"``, ``"hessian_diag"`` or a tensor.
        optimizer: The optimizer whose Adam state the ``"adam*"`` preconditioners read (not modified).
        preconditioner_eps: ε; default 1e-3 for the Adam kinds, 1e-2 for ``"hessian_diag"``.
        preconditioner_exponent: ``e`` (default ½).
        preconditioner_probes: Hutchinson probes for ``"hessian_diag"``.
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

    Returns:
        A :class:`VolumeEstimate`.

    Raises:
        TypeError: Wrong argument types, integer model outputs, a non-tensor output.
        ValueError: ``cutoff <= 0``, ``num_directions < 1``, an unknown ``cost``/``measure``/
            ``preconditioner``/``root_finder``, ``"adam"`` without Adam state, bad ``prior_std``.
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
    # ------------------------------------------------------------------ validation
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if data is None:
        raise ValueError("`data` is required: a list of batches or a DataLoader over the analysis set.")
    if isinstance(data, Iterator):
        data = list(data)
    cutoff = _check_positive_float(cutoff, "cutoff", "It is the cost level in nats, e.g. cutoff=1e-2.")
    if isinstance(num_directions, bool) or not isinstance(num_directions, int):
        raise TypeError(f"`num_directions` must be an int, got {type(num_directions).__name__}.")
    if num_directions < 1:
        raise ValueError(f"`num_directions` must be >= 1, got {num_directions}; the paper uses 100.")
    if not (isinstance(cost, str) and cost in ("kl", "gaussian", "loss")) and not callable(cost):
        raise ValueError(
            f"Unknown `cost` {cost!r}: use 'kl', 'gaussian', 'loss' or a callable cost(outputs, anchor_outputs, batch)."
        )
    if measure not in ("gaussian", "lebesgue"):
        raise ValueError(f"`measure` must be 'gaussian' or 'lebesgue', got {measure!r}.")
    if root_finder not in ("secant", "bisection"):
        raise ValueError(f"`root_finder` must be 'secant' or 'bisection', got {root_finder!r}.")
    rel_tol = _check_positive_float(rel_tol, "rel_tol", "E.g. rel_tol=1e-4.")
    if rel_tol >= 0.5:
        raise ValueError(f"`rel_tol` must be < 0.5, got {rel_tol}.")
    exponent = _check_positive_float(preconditioner_exponent, "preconditioner_exponent", "The default is 0.5.")
    if preconditioner_eps is not None:
        if isinstance(preconditioner_eps, bool) or not isinstance(preconditioner_eps, (int, float)):
            raise TypeError("`preconditioner_eps` must be a float or None.")
        if not (math.isfinite(preconditioner_eps) and preconditioner_eps >= 0):
            raise ValueError(f"`preconditioner_eps` must be >= 0 and finite, got {preconditioner_eps}.")
    if isinstance(preconditioner_probes, bool) or not isinstance(preconditioner_probes, int) or preconditioner_probes < 1:
        raise ValueError(f"`preconditioner_probes` must be an int >= 1, got {preconditioner_probes!r}.")
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 2:
        raise ValueError(f"`max_evaluations` must be an int >= 2, got {max_evaluations!r}.")
    if directions_per_batch is not None and (
        isinstance(directions_per_batch, bool) or not isinstance(directions_per_batch, int) or directions_per_batch < 1
    ):
        raise ValueError(f"`directions_per_batch` must be an int >= 1 or None, got {directions_per_batch!r}.")
    if preconditioner is not None and not isinstance(preconditioner, (str, Tensor, Mapping)):
        raise ValueError(
            f"Unknown `preconditioner` {preconditioner!r}: use None, 'adam', 'adam_exp_avg', "
            "'hessian_diag', or a positive tensor."
        )
    if isinstance(preconditioner, str) and preconditioner not in (*_PRECONDITIONER_NAMES, "none"):
        raise ValueError(
            f"Unknown `preconditioner` {preconditioner!r}: use None, 'adam', 'adam_exp_avg', "
            "'hessian_diag', or a positive tensor of num_params entries."
        )
    if isinstance(preconditioner, str) and preconditioner in ("adam", "adam_exp_avg") and optimizer is None:
        raise ValueError(
            f"preconditioner={preconditioner!r} needs the optimizer: pass `optimizer=` (an Adam-type "
            "optimizer that has taken at least one step), or use preconditioner=None or 'hessian_diag'."
        )
    if cost == "loss":
        if (loss_fn is None) == (batch_loss is None):
            raise TypeError("cost='loss' needs exactly one of `loss_fn` (for (inputs, targets) batches) and `batch_loss`.")
    out_fn = output_fn if output_fn is not None else _default_output_fn
    loss_of_batch = batch_loss
    if cost == "loss" and batch_loss is None:
        assert loss_fn is not None
        user_loss_fn = loss_fn

        def loss_of_batch(model: nn.Module, batch: Any) -> Tensor:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise TypeError("With `loss_fn`, batches must be (inputs, targets); pass `batch_loss` instead.")
            return user_loss_fn(out_fn(model, batch), batch[1])

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("The model has no trainable parameters (requires_grad=True): nothing to perturb.")
    names = [name for name, _ in named]
    params = [p for _, p in named]
    n = sum(p.numel() for p in params)
    device = params[0].device
    if measure == "gaussian":
        log_s = _log_prior_std(prior_std, names, params)
    else:
        log_s = None

    base_seed, aux_generator = _direction_seeds(seed, all_reduce, device)

    with preserved_model_state(model), derivative_friendly_attention(), torch.no_grad(), torch.autocast(
        device_type=device.type, enabled=False
    ):
        model.eval()
        batches = [_move(batch, device) for batch in data]
        if not batches and all_reduce is None:
            raise ValueError("`data` is empty: the analysis set needs at least one batch.")
        evaluator = _CostEvaluator(
            model,
            batches,
            cost=cost,
            output_fn=out_fn,
            batch_loss=loss_of_batch,
            mask_fn=mask_fn,
            batch_size_fn=batch_size_fn or _default_batch_size,
            names=names,
            params=params,
            all_reduce=all_reduce,
        )
        log_p, kind, hvps = _log_preconditioner(
            preconditioner,
            optimizer=optimizer,
            eps=preconditioner_eps,
            exponent=exponent,
            probes=preconditioner_probes,
            names=names,
            params=params,
            evaluator=evaluator,
            generator=aux_generator,
            all_reduce=all_reduce,
        )
        theta = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
        theta_norm = float(theta.norm())
        log_max = math.log(max_radius if max_radius is not None else 1e3 * max(theta_norm, 1.0))
        if max_radius is not None:
            _check_positive_float(max_radius, "max_radius", "")
        x_init = math.log(
            _check_positive_float(initial_radius, "initial_radius", "")
            if initial_radius is not None
            else 1e-2 * max(theta_norm, 1e-2)
        )
        per_batch = directions_per_batch or max(1, min(num_directions, _DIRECTION_ELEMENT_BUDGET // max(n, 1)))

        if log_s is not None:
            inv_var = torch.exp(-2.0 * log_s)
            q = float((theta * theta * inv_var).sum())
            sum_log_s = float(log_s.sum())

        log_radii, log_norms, evaluations, converged, capped = [], [], [], [], []
        log_gauss: list[Tensor] = []
        log_p_shift = float(log_p.max()) if log_p is not None else 0.0
        found: list[float] = []
        for start in range(0, num_directions, per_batch):
            count = min(per_batch, num_directions - start)
            z = torch.cat(
                [
                    draw_probes(n, 1, "gaussian", make_generator(base_seed + start + j), device=device).t()
                    for j in range(count)
                ]
            )  # [J, n] float64
            log_z_norm = torch.log(z.norm(dim=1))
            v = z if log_p is None else z * torch.exp(log_p - log_p_shift)
            v_norm = v.norm(dim=1)
            log_v_norm = torch.log(v_norm) + log_p_shift - log_z_norm  # log ||P u||, u = z/||z||
            v_hat = v / v_norm.unsqueeze(1)
            del v, z

            def evaluate(idx: Tensor, t: Tensor, v_hat: Tensor = v_hat) -> Tensor:
                idx_dev = idx.to(device)
                return evaluator(theta, v_hat[idx_dev], t.to(device=device, dtype=torch.float64))

            x0 = torch.full((count,), x_init if not found else float(torch.tensor(found).median()), dtype=torch.float64)
            try:
                search = find_radii(
                    evaluate,
                    x0,
                    cutoff=cutoff,
                    rel_tol=rel_tol,
                    log_max_radius=log_max,
                    max_evaluations=max_evaluations,
                    method=root_finder,
                )
            except RadiusSearchNaNError as err:
                raise VolumeComputationError(
                    f"The cost is NaN at distance t={err.t:.4g} along direction {start + err.index} "
                    "(the perturbed model's outputs overflowed?). Lower `max_radius`, check the model "
                    "for NaNs, or use a float64 model."
                ) from None
            found.extend(search.log_radius[search.converged].tolist())
            log_radii.append(search.log_radius)
            log_norms.append(log_v_norm.cpu())
            evaluations.append(search.evaluations)
            converged.append(search.converged)
            capped.append(search.capped)
            if log_s is not None:
                a = (v_hat * v_hat * inv_var).sum(dim=1).cpu()
                b = (v_hat * theta * inv_var).sum(dim=1).cpu()
                log_int = log_radial_gaussian_integral(a, b, n, torch.exp(search.log_radius))
                log_gauss.append(log_int)
            del v_hat

    log_r = torch.cat(log_radii)
    log_vn = torch.cat(log_norms)
    evals = torch.cat(evaluations)
    conv = torch.cat(converged)
    cap = torch.cat(capped)
    num_capped = int(cap.sum())
    log_sphere = _log_sphere_area(n)
    log_k = math.log(num_directions)
    leb_contrib = log_sphere - math.log(n) + n * (log_r - log_vn)
    leb_volume = float(torch.logsumexp(leb_contrib, dim=0)) - log_k
    if num_capped > 0:
        leb_volume = math.inf
    if measure == "gaussian":
        const = log_sphere - 0.5 * n * math.log(2.0 * math.pi) - sum_log_s - 0.5 * q
        contrib = const + torch.cat(log_gauss) - n * log_vn
        log_volume = float(torch.logsumexp(contrib, dim=0)) - log_k
    else:
        contrib = leb_contrib
        log_volume = leb_volume
    total_evals = int(evals.sum())
    return VolumeEstimate(
        log_volume=log_volume,
        log10_probability=log_volume / math.log(10.0),
        description_length_bits=-log_volume / math.log(2.0),
        measure=measure,
        cutoff=cutoff,
        num_params=n,
        num_directions=num_directions,
        log_radii=log_r,
        log_direction_norms=log_vn,
        log_contributions=contrib,
        lebesgue_log_contributions=leb_contrib,
        lebesgue_log_volume=leb_volume,
        log_radius_mean=float(log_r.mean()),
        log_radius_std=float(log_r.std(unbiased=False)),
        log_contribution_std=float(contrib.std(unbiased=False)),
        num_capped=num_capped,
        capped=cap,
        num_unconverged=int((~conv & ~cap).sum()),
        converged=conv,
        evaluations=evals,
        num_forward_passes=total_evals + 1,
        forward_passes_per_direction=total_evals / num_directions,
        preconditioner=kind,
        preconditioner_hvps=hvps,
        root_finder=root_finder,
        seconds=time.perf_counter() - started,
    )
