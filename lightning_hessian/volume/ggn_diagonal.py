r"""The exact Gauss-Newton (Fisher) diagonal of the KL / Gaussian cost at the anchor.

At the anchor :math:`\theta' = \theta` the cost's gradient with respect to the outputs vanishes,
so its Hessian *is* the Gauss-Newton matrix (no approximation):

.. math::
    \mathrm{KL}:\ H = \frac1W\sum_{x,\,\text{pos}} m\,J^\top(\mathrm{diag}(p) - pp^\top)J,\qquad
    \mathrm{diag}(H)_j = \frac1W\sum_{x,\,\text{pos}} m \sum_k p_k\,(J_{kj} - \textstyle\sum_l p_l J_{lj})^2,

with :math:`J = \partial\,\text{logits}/\partial\theta` per position, :math:`p` the anchor's
softmax, :math:`m` the position mask and :math:`W` the total weight; for the Gaussian cost
:math:`\mathrm{diag}(H)_j = \frac1W\sum m\sum_k J_{kj}^2`. Each example's rows
:math:`\sqrt{p_k}(e_k - p)^\top J` come from one ``torch.func.vjp`` with a batch of cotangents,
``torch.func.vmap``-ed over the examples of a chunk (a per-example loop if vmap fails), and are
squared before summing over examples: deterministic, float64 accumulation, no probes
(HesScale-like but exact, Dangel et al. 2020 "BackPACK" DiagGGN).

Cost: ``positions × classes`` Jacobian rows per example, i.e. about that many backward passes of
one example; fine for classifiers with tens of classes, expensive for language-model vocabularies
(use ``"adam"`` there).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_hessian.volume.cost import CostEvaluator, _Batch, reduce_with_failure_flag
from lightning_hessian.volume.result import VolumeComputationError

__all__ = ["ggn_diagonal"]

# Jacobian entries (rows x parameters) materialised at once.
_ELEMENT_BUDGET = 2**25


def _cotangent_rows(anchor: Tensor, mask: Tensor | None, kl: bool) -> Tensor:
    """``[P*C, P, C]`` cotangents: ``sqrt(m_p p_pk) (e_k - p_p)`` (KL) or ``sqrt(m_p) e_k`` at position p."""
    classes = anchor.shape[-1]
    positions = anchor.numel() // classes
    eye = torch.eye(classes, dtype=torch.float64, device=anchor.device)
    if kl:
        prob = anchor.reshape(positions, classes).exp()
        rows = prob.sqrt().unsqueeze(-1) * (eye.unsqueeze(0) - prob.unsqueeze(1))  # [P, k, C]
    else:
        rows = eye.unsqueeze(0).expand(positions, classes, classes)
    if mask is not None:
        rows = rows * mask.reshape(positions, 1, 1).clamp(min=0).sqrt()
    place = torch.eye(positions, dtype=torch.float64, device=anchor.device)
    cot = rows.unsqueeze(2) * place.reshape(positions, 1, positions, 1)  # [P, k, P, C]
    return cot.reshape(positions * classes, positions, classes)


def _squared_rows(
    evaluator: CostEvaluator, params: dict[str, Tensor], kl: bool, batched: list[bool], spec: Any
) -> Callable[[list[Any], Tensor, Tensor | None], Tensor]:
    """``f(example_leaves, anchor, mask) -> sum of squared Jacobian rows`` for one example."""

    def one(leaves: list[Any], anchor: Tensor, mask: Tensor | None) -> Tensor:
        leaves = [leaf.unsqueeze(0) if flag else leaf for leaf, flag in zip(leaves, batched, strict=False)]
        batch = tree_unflatten(leaves, spec)

        def forward(p: dict[str, Tensor]) -> Tensor:
            return torch.func.functional_call(evaluator.wrapper, {**evaluator.constants, **p}, (batch,))

        primal = torch.func.vjp(forward, params)
        out, vjp_fn = primal[0], primal[1]
        cot = _cotangent_rows(anchor, mask, kl)
        cot = cot.reshape(cot.shape[0], *out.shape).to(out.dtype)
        grads = torch.func.vmap(vjp_fn)(cot)[0]
        return torch.cat(
            [grads[name].reshape(cot.shape[0], -1).to(torch.float64).pow(2).sum(0) for name in evaluator.prefixed]
        )

    return one


def _batch_diagonal(evaluator: CostEvaluator, entry: _Batch, params: dict[str, Tensor], kl: bool) -> tuple[Tensor, int]:
    assert entry.anchor is not None
    anchor = entry.anchor
    size = anchor.shape[0]
    leaves, spec = tree_flatten(entry.batch)
    batched = [isinstance(leaf, Tensor) and leaf.ndim > 0 and leaf.shape[0] == size for leaf in leaves]
    rows_per_example = anchor[0].numel()
    n = sum(evaluator.numels)
    chunk = max(1, _ELEMENT_BUDGET // max(1, rows_per_example * n))
    one = _squared_rows(evaluator, params, kl, batched, spec)
    total = torch.zeros(n, dtype=torch.float64, device=evaluator.device)
    mask = entry.mask
    for start in range(0, size, chunk):
        stop = min(size, start + chunk)
        sub = [leaf[start:stop] if flag else leaf for leaf, flag in zip(leaves, batched, strict=False)]
        sub_mask = None if mask is None else mask[start:stop]
        if evaluator._ggn_vmap_ok is not False:
            try:
                in_dims = ([0 if flag else None for flag in batched], 0, None if mask is None else 0)
                total += torch.func.vmap(one, in_dims=in_dims)(sub, anchor[start:stop], sub_mask).sum(0)
                evaluator._ggn_vmap_ok = True
                continue
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
                if evaluator._ggn_vmap_ok:
                    raise
                evaluator._ggn_vmap_ok = False
                warnings.warn(
                    "The exact Gauss-Newton diagonal could not vmap over examples for this model "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
                    "looping over examples instead (slower).",
                    RuntimeWarning,
                    stacklevel=6,
                )
        for i in range(stop - start):
            example = [leaf[i] if flag else leaf for leaf, flag in zip(sub, batched, strict=False)]
            total += one(example, anchor[start + i], None if sub_mask is None else sub_mask[i])
    return total, size * rows_per_example


def ggn_diagonal(
    evaluator: CostEvaluator, *, all_reduce: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, int]:
    """The exact diagonal of the cost's Hessian at the anchor (= its Gauss-Newton diagonal).

    Args:
        evaluator: The cost (``"kl"`` or ``"gaussian"``) with its anchored analysis batches.
        all_reduce: Sum across processes (one collective of ``n`` numbers), for DDP.

    Returns:
        ``(diag, rows)``: float64 ``[n]`` in parameter order, and the number of Jacobian rows
        computed (≈ single-example backward passes) on this process.

    Raises:
        ValueError: Another cost (``"loss"`` or a callable): use ``"hessian_diag_hutchinson"``.
    """
    if evaluator.cost not in ("kl", "gaussian"):
        raise ValueError(
            f"preconditioner='hessian_diag' computes the exact Gauss-Newton diagonal of cost='kl' or "
            f"'gaussian'; with cost={evaluator.cost!r} use preconditioner='hessian_diag_hutchinson' "
            "(noisy) or 'adam'."
        )
    kl = evaluator.cost == "kl"
    params = {
        name: p.detach().to(evaluator.dtype) for name, p in zip(evaluator.prefixed, evaluator.params, strict=False)
    }
    n = sum(evaluator.numels)
    total = torch.zeros(n, dtype=torch.float64, device=evaluator.device)
    rows = 0
    failure: BaseException | None = None
    with torch.enable_grad():
        try:
            for entry in evaluator.batches:
                part, count = _batch_diagonal(evaluator, entry, params, kl)
                total += part
                rows += count
        except Exception as err:
            if all_reduce is None:
                raise
            failure = err
    if all_reduce is not None:
        total = reduce_with_failure_flag(total, failure, all_reduce, "computing the Gauss-Newton diagonal")
    if not bool(torch.isfinite(total).all()):
        raise VolumeComputationError("The Gauss-Newton diagonal has non-finite entries at the anchor.")
    return total / evaluator.total_weight, rows
