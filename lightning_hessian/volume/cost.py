r"""The behavioural cost :math:`C(\theta')` over the analysis set, evaluated for many points at once.

Anchor outputs are computed once; :class:`CostEvaluator` then returns float64 size-weighted means
of the per-position costs at ``theta + t_j v_j`` for a whole group of directions with one
``torch.func.vmap`` over ``functional_call`` per batch (and one collective under DDP).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian.operators._batches import _cast_floats
from lightning_hessian.volume.result import VolumeComputationError

__all__ = ["CostEvaluator", "CostFn", "default_output_fn"]

CostFn = Callable[[Tensor, Tensor, Any], Tensor]


def reduce_with_failure_flag(
    local: Tensor, failure: BaseException | None, all_reduce: Callable[[Tensor], Tensor], what: str
) -> Tensor:
    """Sum ``local`` across processes with a failure flag in the same collective.

    Every process joins the one collective, even one whose own computation failed, so none hangs;
    the failing process re-raises its error and the others raise :class:`VolumeComputationError`
    saying what failed.

    Args:
        local: This process's float64 partial sums (1-D; the same shape on every process).
        failure: This process's exception, or ``None``.
        all_reduce: Sums a float64 tensor across processes.
        what: For the message, e.g. ``"evaluating the local-volume cost"``.

    Returns:
        The global sums, shaped like ``local``.
    """
    flag = torch.tensor([1.0 if failure is not None else 0.0], dtype=torch.float64, device=local.device)
    packed = all_reduce(torch.cat([local.reshape(-1).to(torch.float64), flag]))
    if failure is not None:
        raise failure
    if float(packed[-1]) > 0:
        raise VolumeComputationError(f"Another process failed while {what}.")
    return packed[:-1].reshape(local.shape)


def default_output_fn(model: nn.Module, batch: Any) -> Tensor:
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


class CostEvaluator:
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
        self.before_call: Callable[[], None] | None = None
        self.names = names
        self.params = params
        self.device = params[0].device
        # Forward passes of float16/bfloat16 models run on float32 copies (Trainer precision
        # "bf16-true"/"16-true"): parameters, buffers and frozen parameters are cast, the model
        # itself is untouched; floating inputs are rounded to the model's dtype, then cast.
        self.model_dtype = params[0].dtype
        self.dtype = torch.float32 if self.model_dtype in (torch.float16, torch.bfloat16) else self.model_dtype
        self.constants: dict[str, Tensor] = {}
        if self.dtype != self.model_dtype:
            trainable = {id(p) for p in params}
            self.constants = {
                f"model.{name}": t.detach().to(self.dtype)
                for name, t in [*model.named_parameters(), *model.named_buffers()]
                if t is not None and id(t) not in trainable and torch.is_floating_point(t)
            }
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.wrapper = _Forward(model, batch_loss if cost == "loss" else output_fn)  # type: ignore[arg-type]
        self.prefixed = [f"model.{name}" for name in names]
        self._vmap_ok: bool | None = None
        self._ggn_vmap_ok: bool | None = None
        self.batches: list[_Batch] = []
        local_weight = 0.0
        failure: BaseException | None = None
        try:
            for batch in batches:
                entry = self._anchor(batch, mask_fn, batch_size_fn)
                self.batches.append(entry)
                local_weight += entry.weight
        except Exception as err:
            if all_reduce is None:
                raise
            failure = err
        if all_reduce is not None:
            local = torch.tensor([local_weight if failure is None else 0.0], dtype=torch.float64, device=self.device)
            total = reduce_with_failure_flag(local, failure, all_reduce, "computing the anchor outputs")
            local_weight = float(total[0])
        if not local_weight > 0:
            raise ValueError("`data` yielded no batches (or only fully masked ones): the analysis set is empty.")
        self.total_weight = local_weight

    # ------------------------------------------------------------------ anchor

    def _forward_at_anchor(self, batch: Any) -> Any:
        if self.dtype == self.model_dtype:
            return self.wrapper(batch)
        cast = {name: p.detach().to(self.dtype) for name, p in zip(self.prefixed, self.params, strict=False)}
        return torch.func.functional_call(self.wrapper, {**self.constants, **cast}, (batch,))

    def forward_with_grad_leaves(self, batch: Any) -> tuple[Any, list[Tensor]]:
        """Outputs at the anchor and the leaves to differentiate them by (cast copies for half models)."""
        if self.dtype == self.model_dtype:
            return self.wrapper(batch), list(self.params)
        cast = {
            name: p.detach().to(self.dtype).requires_grad_(True)
            for name, p in zip(self.prefixed, self.params, strict=False)
        }
        out = torch.func.functional_call(self.wrapper, {**self.constants, **cast}, (batch,))
        return out, list(cast.values())

    def _anchor(self, batch: Any, mask_fn: Any, batch_size_fn: Callable[[Any], float]) -> _Batch:
        batch = _cast_floats(_cast_floats(batch, self.model_dtype), self.dtype)
        out = self._forward_at_anchor(batch)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"The model/`output_fn` must return a Tensor, got {type(out).__name__}; pass "
                "`output_fn=lambda model, batch: model(...).logits` (or similar)."
            )
        if self.cost == "loss":
            if out.numel() != 1:
                raise TypeError(f"The loss must be a scalar (a mean over the batch), got shape {tuple(out.shape)}.")
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
                raise TypeError(
                    "A custom `cost(outputs, anchor_outputs, batch)` must return a floating tensor of per-example "
                    "costs."
                )
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
        assert entry.anchor is not None
        if callable(self.cost):
            return self.cost(out, entry.anchor, entry.batch).to(torch.float64).sum()
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
        for name, shape, numel in zip(self.prefixed, self.shapes, self.numels, strict=False):
            block = torch.addcmul(
                theta[offset : offset + numel].unsqueeze(0), t.unsqueeze(1), directions[:, offset : offset + numel]
            )
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
            out = torch.func.functional_call(wrapper, {**self.constants, **pdict}, (entry.batch,))
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
        if self.before_call is not None:  # e.g. a monitor's signal check (may raise to stop)
            self.before_call()
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
        total = reduce_with_failure_flag(sums, failure, self.all_reduce, "evaluating the local-volume cost")
        return (total / self.total_weight).cpu()
