r"""The local volume of an FSDP2-sharded model (``fully_shard``): :func:`sharded_local_volume`.

The same estimator as :func:`~lightning_hessian.local_volume` (paper §3; Gaussian measure,
METHODS-free summary: :math:`\log V = \log \frac1K\sum_i \mathrm{contrib}(r_i, \hat v_i)`), with
every vector sharded like the parameters:

- directions :math:`u_i` are per-parameter blocked Gaussian draws
  (:mod:`~lightning_hessian.operators.sharded_space`) seeded by ``base + i``, sliced to this
  process's shards, so the global direction does not depend on the number of processes;
- the Adam preconditioner reads ``exp_avg_sq`` shards (``to_local()``); its median is an exact
  distributed order statistic (bisection on the float64 bit patterns, one all-reduce of a count
  per step);
- the prior, norms and the quadratic forms :math:`\sum_j \hat v_j^2/s_j^2`,
  :math:`\sum_j\theta_j\hat v_j/s_j^2` are local partial sums plus one all-reduce;
- the cost :math:`C(\theta + t\hat v)` perturbs the local shards in place (restored bitwise from
  a saved copy), runs the sharded module's own forward on each process's analysis batches, and
  all-reduces the KL sums.

No process ever holds a full-size vector. :func:`sharded_local_volume` also runs on an unsharded
model in one process (every range whole): that is the single-process reference of an FSDP2 run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_hessian.operators._batches import _default_batch_size, _move
from lightning_hessian.operators._state import preserved_model_state
from lightning_hessian.operators.sharded import _local_range, reshard_all
from lightning_hessian.operators.sharded_space import ParameterRange, ShardedSpace, draw_parameter_probes
from lightning_hessian.optim_state import adam_state
from lightning_hessian.volume.cost import CostEvaluator, _Batch, reduce_with_failure_flag
from lightning_hessian.volume.measure import gaussian_log_contributions, lebesgue_log_contributions
from lightning_hessian.volume.preconditioner import DEFAULT_RELATIVE_EPS, MissingOptimizerStateError
from lightning_hessian.volume.radius import RadiusSearchNaNError, find_radii
from lightning_hessian.volume.result import VolumeComputationError, VolumeEstimate, effective_sample_size

__all__ = ["distributed_median", "sharded_local_volume"]


# --------------------------------------------------------------------------------------------
# The vector space of the (possibly sharded) parameters
# --------------------------------------------------------------------------------------------


def _parameter_space(params: list[Tensor]) -> tuple[ShardedSpace, list[Tensor]]:
    """The space of ``params`` (sharded DTensors, or whole tensors on one process) and their local tensors."""
    if dtensor_parameters_of(params):
        ranges, groups = zip(*(_local_range(p) for p in params), strict=True)
        if len({id(g) for g in groups}) != 1:
            raise ValueError("Every parameter must be sharded over the same device mesh.")
        return ShardedSpace(ranges, groups[0]), [p.to_local() for p in params]  # type: ignore[attr-defined]
    return ShardedSpace([ParameterRange(p.numel(), 0, p.numel()) for p in params]), [p.data for p in params]


def dtensor_parameters_of(params: list[Tensor]) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in params)


def _global_max(space: ShardedSpace, value: float) -> float:
    if space.group is None:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=space.group)
    return float(t[0])


def _sum(space: ShardedSpace, *values: float) -> list[float]:
    return [float(x) for x in space.all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()]


def distributed_median(space: ShardedSpace, values: Tensor) -> float:
    """``torch.median`` (the lower median) of the positive entries of a sharded non-negative vector, exactly.

    Bisection on the int64 bit patterns of positive float64 numbers (monotone in the value):
    64 all-reduces of one count, whatever the size. 0.0 when no entry is positive.
    """
    positive = values[values > 0].to(torch.float64).cpu()
    (count,) = _sum(space, float(positive.numel()))
    if count == 0:
        return 0.0
    rank = (int(count) - 1) // 2  # the lower middle, as torch.median
    bits = positive.view(torch.int64)
    lo, hi = 0, 0x7FF0000000000000  # [+0, +inf) in bit patterns
    while lo < hi:  # smallest pattern p with #(bits <= p) >= rank + 1
        mid = (lo + hi) // 2
        (below,) = _sum(space, float(int((bits <= mid).sum())))
        if below >= rank + 1:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor([lo], dtype=torch.int64).view(torch.float64)[0])


# --------------------------------------------------------------------------------------------
# Cost: in-place perturbation of the local shards, the sharded forward, all-reduced sums
# --------------------------------------------------------------------------------------------


class ShardedCostEvaluator(CostEvaluator):
    """A :class:`~lightning_hessian.volume.cost.CostEvaluator` of local shards: ``C(theta + t v)`` perturbing in place.

    Every process runs the same number of forward passes (FSDP2's forward is collective): one with
    fewer batches repeats its first and discards the output. Each forward is followed by one
    all-reduce of a failure flag, so a forward that raises on one process cannot leave the others
    waiting in the next all-gather.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[Any],
        *,
        cost: Any,
        output_fn: Any,
        mask_fn: Any,
        space: ShardedSpace,
        locals_: list[Tensor],
    ) -> None:
        self.model, self.cost, self.output_fn, self.batch_loss = model, cost, output_fn, None
        self.space, self.locals = space, locals_
        self.all_reduce = space.all_reduce
        self.device = locals_[0].device
        self.model_dtype = self.dtype = locals_[0].dtype
        self.constants = {}
        self.before_call: Any = None
        from lightning_hessian.volume.cost import _Forward

        self.wrapper = _Forward(model, output_fn)
        self.saved = [t.detach().clone() for t in locals_]
        (steps,) = _global_max_list(space, [float(len(batches))])
        if steps == 0:
            raise ValueError("`data` is empty on every process: the analysis set needs at least one batch.")
        if not batches:
            raise ValueError(
                "sharded_local_volume: a process has no analysis batch; FSDP2's forward is collective, so every "
                "process needs at least one micro-batch (use at least world_size analysis samples)."
            )
        self.steps = int(steps)
        self.batches: list[_Batch] = []
        for step in range(self.steps):
            batch = batches[step] if step < len(batches) else batches[0]
            entry = self._agreed(lambda batch=batch: self._anchor(batch, mask_fn, _default_batch_size))
            if step < len(batches):
                self.batches.append(entry)
        (self.total_weight,) = _sum(space, sum(e.weight for e in self.batches))
        if not self.total_weight > 0:
            raise ValueError("`data` yielded no batches (or only fully masked ones): the analysis set is empty.")

    def _agreed(self, fn: Any) -> Any:
        failure: BaseException | None = None
        result = None
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised by the agreement
            failure = err
        reduce_with_failure_flag(
            torch.zeros(0, dtype=torch.float64), failure, self.space.all_reduce, "in a forward pass"
        )
        return result

    def _set(self, theta: Tensor | None, direction: Tensor | None, t: float) -> None:
        reshard_all_if_sharded(self.model, self.space)
        offset = 0
        with torch.no_grad():
            for local, saved in zip(self.locals, self.saved, strict=True):
                n = local.numel()
                if theta is None or direction is None:
                    local.copy_(saved)
                else:
                    value = theta[offset : offset + n] + t * direction[offset : offset + n]
                    local.copy_(value.to(local.dtype).view_as(local))
                offset += n

    def _direction_sum(self, theta: Tensor, direction: Tensor, t: float) -> Tensor:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        self._set(theta, direction, t)
        for step in range(self.steps):
            index = step if step < len(self.batches) else 0
            entry = self.batches[index]
            out = self._agreed(lambda entry=entry: self.wrapper(entry.batch))
            if step < len(self.batches):
                total = total + self._cost_sum(out, entry)
        return total

    def __call__(self, theta: Tensor, directions: Tensor, t: Tensor) -> Tensor:
        """Costs at ``theta + t_j directions_j`` (local rows, float64): float64 ``[J]`` on the CPU (collective)."""
        if self.before_call is not None:  # e.g. a monitor's signal check (may raise to stop)
            self.before_call()
        sums = torch.zeros(directions.shape[0], dtype=torch.float64, device=self.device)
        try:
            for j in range(directions.shape[0]):
                sums[j] = self._direction_sum(theta, directions[j], float(t[j]))
        finally:
            self._set(None, None, 0.0)
            reshard_all_if_sharded(self.model, self.space)
        total = self.space.all_reduce(sums)
        return (total / self.total_weight).cpu()


def _global_max_list(space: ShardedSpace, values: list[float]) -> list[float]:
    return [_global_max(space, v) for v in values]


def reshard_all_if_sharded(model: nn.Module, space: ShardedSpace) -> None:
    if space.group is not None:
        reshard_all(model)


# --------------------------------------------------------------------------------------------
# Preconditioner (Adam moments of the local shards), prior, directions
# --------------------------------------------------------------------------------------------


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _adam_log_p(
    optimizer: Any, names: list[str], params: list[Tensor], space: ShardedSpace, relative_eps: float
) -> tuple[Tensor, float]:
    """``log p`` (local rows, global mean zero) of ``p_j ∝ 1/(|d_j|^½ + ε_j)`` from Adam's moments, and ε."""
    state = adam_state(params, optimizer, names, bias_corrected=True)
    scales, floors, missing = [], [], []
    for i, name in enumerate(names):
        v = state.second_moments[i]
        if v is None or not math.isfinite(state.eps[i]):
            missing.append(name)
            continue
        scales.append(_local(v).to(torch.float64).abs().pow(0.5).reshape(-1))
        floors.append(torch.full_like(scales[-1], state.eps[i]))
    if missing:
        raise MissingOptimizerStateError(
            "preconditioner='adam': no Adam state for trainable parameter(s) {missing[:5]} (no step yet, a "
            "non-Adam optimizer, or no gradient); under FSDP2 every trainable parameter needs Adam state."
        )
    scale, floor = torch.cat(scales), torch.cat(floors)
    eps_value = relative_eps * distributed_median(space, scale)
    denom = scale + torch.maximum(torch.full_like(scale, eps_value), floor)
    (bad,) = _sum(space, float((~(torch.isfinite(denom) & (denom > 0))).sum()))
    if bad > 0:
        raise ValueError("The 'adam' preconditioner has zero or non-finite entries; use preconditioner_eps > 0.")
    log_p = -torch.log(denom)
    (total,) = _sum(space, float(log_p.sum()))
    return log_p - total / space.global_size, eps_value


def _log_prior(prior_std: Any, names: list[str], space: ShardedSpace) -> Tensor:
    """``log s`` per local entry from a float or a ``{name: float}`` mapping (per-tensor stds)."""
    pieces = []
    for name, rng in zip(names, space.ranges, strict=True):
        if isinstance(prior_std, dict):
            if name not in prior_std:
                raise ValueError(f"`prior_std` has no entry for trainable parameter {name!r}.")
            value = prior_std[name]
        else:
            value = prior_std
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < float(value) < math.inf):
            raise ValueError(f"`prior_std` must be a positive finite float per parameter (FSDP2), got {value!r}.")
        pieces.append(torch.full((rng.size,), math.log(float(value)), dtype=torch.float64))
    return torch.cat(pieces)


def _directions(
    space: ShardedSpace, base_seed: int, start: int, count: int, log_p: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Unit directions ``[count, n_local]`` ``P u / ||P u||`` and ``log ||P u||`` (u = z/||z||), globally."""
    z = torch.cat([draw_parameter_probes(space.ranges, 1, "gaussian", base_seed + start + j).t() for j in range(count)])
    shift = _global_max(space, float(log_p.max()) if log_p is not None and log_p.numel() else -math.inf)
    shift = shift if math.isfinite(shift) else 0.0
    v = z if log_p is None else z * torch.exp(log_p - shift)
    z_norm = space.column_dots(z.t(), z.t()).sqrt()
    v_norm = space.column_dots(v.t(), v.t()).sqrt()
    return v / v_norm.unsqueeze(1), torch.log(v_norm) + shift - torch.log(z_norm)


# --------------------------------------------------------------------------------------------
# Radii and the estimate
# --------------------------------------------------------------------------------------------


def _search(
    evaluator: ShardedCostEvaluator,
    theta: Tensor,
    log_p: Tensor | None,
    log_s: Tensor | None,
    options: dict[str, Any],
) -> dict[str, Tensor]:
    """Radii along ``num_directions`` directions (groups of ``per_batch``), prior quadratic forms (collective)."""
    space = evaluator.space
    out: dict[str, list[Tensor]] = {k: [] for k in ("log_r", "log_vn", "evals", "conv", "capped", "a", "b")}
    found: list[float] = []
    inv_var = None if log_s is None else torch.exp(-2.0 * log_s)
    total, per_batch = options["num_directions"], options["per_batch"]
    for start in range(0, total, per_batch):
        count = min(per_batch, total - start)
        v_hat, log_vn = _directions(space, options["base_seed"], start, count, log_p)

        def evaluate(idx: Tensor, t: Tensor, v_hat: Tensor = v_hat) -> Tensor:
            return evaluator(theta, v_hat[idx], t.to(torch.float64))

        x0 = torch.full((count,), options["log_init"] if not found else float(torch.tensor(found).median()))
        try:
            result = find_radii(
                evaluate,
                x0.to(torch.float64),
                cutoff=options["cutoff"],
                rel_tol=options["rel_tol"],
                log_max_radius=options["log_max"],
                max_evaluations=options["max_evaluations"],
                method=options["root_finder"],
            )
        except RadiusSearchNaNError as err:
            raise VolumeComputationError(
                f"The cost is NaN at distance t={err.t:.4g} along direction {start + err.index}."
            ) from None
        found.extend(result.log_radius[result.converged].tolist())
        for key, value in (("log_r", result.log_radius), ("log_vn", log_vn), ("evals", result.evaluations)):
            out[key].append(value.cpu())
        out["conv"].append(result.converged)
        out["capped"].append(result.capped)
        if inv_var is not None:
            out["a"].append(space.column_dots(v_hat.t(), (v_hat * inv_var).t()).cpu())
            out["b"].append(space.column_dots(v_hat.t(), (theta * inv_var).expand_as(v_hat).t()).cpu())
        if options.get("progress") is not None:
            options["progress"](count)
    return {k: torch.cat(v) for k, v in out.items() if v}


def _estimate(
    search: dict[str, Tensor], theta: Tensor, log_s: Tensor | None, space: ShardedSpace, info: dict[str, Any]
) -> VolumeEstimate:
    n, k = space.global_size, info["num_directions"]
    log_r, log_vn = search["log_r"], search["log_vn"]
    leb = lebesgue_log_contributions(log_r, log_vn, n)
    num_capped = int(search["capped"].sum())
    leb_volume = math.inf if num_capped else float(torch.logsumexp(leb, dim=0)) - math.log(k)
    contrib, log_volume = leb, leb_volume
    if log_s is not None:
        inv_var = torch.exp(-2.0 * log_s)
        sum_log_s, quadratic = _sum(space, float(log_s.sum()), float((theta * theta * inv_var).sum()))
        contrib = gaussian_log_contributions(
            log_r, log_vn, search["a"], search["b"], n=n, sum_log_prior_std=sum_log_s, anchor_quadratic=quadratic
        )
        log_volume = float(torch.logsumexp(contrib, dim=0)) - math.log(k)
    ess, top = effective_sample_size(contrib)
    evaluations = search["evals"]
    finite = log_r[torch.isfinite(log_r)]
    finite_c = contrib[torch.isfinite(contrib)]
    return VolumeEstimate(
        log_volume=log_volume,
        log10_probability=log_volume / math.log(10.0),
        description_length_bits=-log_volume / math.log(2.0),
        measure=info["measure"],
        cutoff=info["cutoff"],
        num_params=n,
        num_directions=k,
        log_radii=log_r,
        log_direction_norms=log_vn,
        log_contributions=contrib,
        lebesgue_log_contributions=leb,
        lebesgue_log_volume=leb_volume,
        log_radius_mean=float(log_r.mean()),
        log_radius_std=float(finite.std(unbiased=False)) if finite.numel() else math.nan,
        log_contribution_std=float(finite_c.std(unbiased=False)) if finite_c.numel() else math.nan,
        num_capped=num_capped,
        capped=search["capped"],
        num_unconverged=int((~search["conv"] & ~search["capped"]).sum()),
        converged=search["conv"],
        evaluations=evaluations,
        num_forward_passes=int(evaluations.sum()) + 1,
        forward_passes_per_direction=float(evaluations.sum()) / k,
        preconditioner=info["preconditioner"],
        effective_sample_size=ess,
        top_weight_share=top,
        preconditioner_eps=info["eps"],
        preconditioner_eps_relative=info["eps_relative"],
        flat_parameters={},
        root_finder=info["root_finder"],
    )


def _radius_options(space: ShardedSpace, theta: Tensor, options: dict[str, Any]) -> dict[str, Any]:
    (theta_sq,) = _sum(space, float((theta * theta).sum()))
    theta_norm = math.sqrt(theta_sq)
    max_radius, initial_radius = options.pop("max_radius"), options.pop("initial_radius")
    options["log_max"] = math.log(max_radius if max_radius is not None else 1e3 * max(theta_norm, 1.0))
    options["log_init"] = math.log(initial_radius if initial_radius is not None else 1e-2 * max(theta_norm, 1e-2))
    options["per_batch"] = max(1, min(options["num_directions"], 2**25 // max(space.global_size, 1)))
    return options


def sharded_local_volume(
    model: nn.Module,
    data: Iterable[Any],
    *,
    cost: Any = "kl",
    output_fn: Any = None,
    mask_fn: Any = None,
    cutoff: float = 1e-2,
    num_directions: int = 100,
    preconditioner: str | None = None,
    optimizer: Any = None,
    preconditioner_eps: float | None = None,
    measure: str = "gaussian",
    prior_std: float | dict[str, float] = 1.0,
    rel_tol: float = 1e-4,
    max_radius: float | None = None,
    initial_radius: float | None = None,
    root_finder: str = "secant",
    max_evaluations: int = 100,
    seed: int = 0,
    progress: Any = None,
    before_evaluation: Any = None,
) -> VolumeEstimate:
    r""":func:`~lightning_hessian.local_volume` of an FSDP2-sharded model (collective: every process calls it).

    Each process passes its own shard of the analysis set (at least one micro-batch); the result is
    the same on every process and does not depend on the number of processes. Supported: the
    ``"kl"``/``"gaussian"``/custom costs (not ``"loss"``), ``preconditioner=None`` or ``"adam"``
    (``exp_avg_sq`` shards), one ``preconditioner_eps`` (not ``"auto"``), the Gaussian measure with a
    float or per-tensor ``prior_std``, and the Lebesgue measure without the flat-coordinate check.
    Arguments as in :func:`~lightning_hessian.local_volume`.

    Raises:
        ValueError: An unsupported option, or a process without analysis data.
        VolumeComputationError: NaN costs (on any process).
    """
    started = time.perf_counter()
    if preconditioner not in (None, "adam") or cost == "loss" or measure not in ("gaussian", "lebesgue"):
        raise ValueError(
            "sharded_local_volume supports preconditioner=None/'adam', costs 'kl'/'gaussian'/custom and the "
            f"gaussian/lebesgue measures; got preconditioner={preconditioner!r}, cost={cost!r}, measure={measure!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an int (the same on every process), got {seed!r}.")
    from lightning_hessian.volume.cost import default_output_fn

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [cast(Tensor, p) for _, p in named]
    space, locals_ = _parameter_space(params)
    base_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(seed)))
    with (
        preserved_model_state(model),
        torch.no_grad(),
        torch.autocast(device_type=locals_[0].device.type, enabled=False),
    ):
        model.eval()
        batches = [_move(b, locals_[0].device) for b in data]
        evaluator = ShardedCostEvaluator(
            model,
            batches,
            cost=cost,
            output_fn=output_fn or default_output_fn,
            mask_fn=mask_fn,
            space=space,
            locals_=locals_,
        )
        evaluator.before_call = before_evaluation
        theta = torch.cat([s.reshape(-1).to(torch.float64) for s in evaluator.saved])
        anchor = float(evaluator(theta, torch.zeros(1, theta.numel(), dtype=torch.float64), torch.zeros(1))[0])
        if not anchor < cutoff:
            raise VolumeComputationError(f"The cost at the anchor is {anchor:.6g}, not below the cutoff {cutoff:.6g}.")
        log_p, eps, rho = None, math.nan, math.nan
        if preconditioner == "adam":
            rho = DEFAULT_RELATIVE_EPS["adam"] if preconditioner_eps is None else float(preconditioner_eps)
            log_p, eps = _adam_log_p(optimizer, names, params, space, rho)
        log_s = _log_prior(prior_std, names, space) if measure == "gaussian" else None
        options = _radius_options(
            space,
            theta,
            dict(
                num_directions=num_directions,
                base_seed=base_seed,
                cutoff=cutoff,
                rel_tol=rel_tol,
                max_radius=max_radius,
                initial_radius=initial_radius,
                max_evaluations=max_evaluations,
                root_finder=root_finder,
                progress=progress,
            ),
        )
        search = _search(evaluator, theta, log_p, log_s, options)
    info = dict(
        num_directions=num_directions,
        measure=measure,
        cutoff=cutoff,
        preconditioner=preconditioner or "none",
        eps=eps,
        eps_relative=rho,
        root_finder=root_finder,
    )
    result = _estimate(search, theta, log_s, space, info)
    result.seconds = time.perf_counter() - started
    return result
