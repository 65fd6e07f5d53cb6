"""Per-micro-batch Hessian-vector products as plain functions of tensors, eager or compiled.

:class:`~lightning_hessian.HessianOperator` computes the product of one micro-batch's mean-loss
Hessian with ``k`` vectors by one of three exact paths:

* forward-over-reverse: ``torch.func.jvp`` of ``torch.func.grad`` through ``functional_call``,
  vmapped over the vectors (:func:`func_products`);
* double backward: ``torch.autograd.grad(create_graph=True)``, then one backward pass of the
  gradient per vector, or one batched pass for all of them (``is_grads_batched=True``, a vmap
  over the backward; :func:`double_backward_products`);
* reverse-over-reverse written with ``torch.func`` (``grad`` of :math:`\\langle\\nabla\\ell, v\\rangle`;
  :func:`reverse_products`): the same arithmetic as double backward, in a form that
  ``torch.compile`` captures as one graph (``torch.autograd.grad`` inside a compiled region is
  a graph break).

:class:`CompiledProducts` wraps the first and the third in ``torch.compile`` (``compile=True``),
falling back to eager, with one warning, where compilation fails.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

logger = logging.getLogger("lightning_hessian")

Products = tuple[list[Tensor], Tensor]


def _loss_with_aux(
    wrapper: nn.Module, names: Sequence[str], constants: dict[str, Tensor], batch: Any
) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, Tensor]]:
    def loss_and_aux(params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        loss = torch.func.functional_call(wrapper, {**constants, **dict(zip(names, params, strict=True))}, (batch,))
        return loss, loss.detach()

    return loss_and_aux


def func_products(
    wrapper: nn.Module,
    names: Sequence[str],
    primals: tuple[Tensor, ...],
    constants: dict[str, Tensor],
    batch: Any,
    tangents: tuple[Tensor, ...],
    chunk_size: int | None,
) -> Products:
    """Forward-over-reverse HVPs of one batch: ``jvp(grad(loss), primals, v)`` per vector.

    ``tangents`` have a leading vector dimension; a single vector skips the vmap (~20 % cheaper).
    Returns the products (per parameter, ``[k, *shape]``) and the batch's loss.
    """
    grad_fn = torch.func.grad(_loss_with_aux(wrapper, names, constants, batch), has_aux=True)

    def hvp_one(tangent: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], Tensor]:
        # has_aux=True returns (out, tangent_out, aux); torch annotates jvp as a 2- or 3-tuple.
        _, hvp, loss = cast("tuple[Any, Any, Any]", torch.func.jvp(grad_fn, (primals,), (tangent,), has_aux=True))
        return hvp, loss

    if tangents[0].shape[0] == 1:
        hvp, loss = hvp_one(tuple(t[0] for t in tangents))
        return [h.unsqueeze(0) for h in hvp], loss
    hvps, losses = torch.func.vmap(hvp_one, chunk_size=chunk_size)(tangents)
    return list(hvps), losses.reshape(-1)[0]


def reverse_products(
    wrapper: nn.Module,
    names: Sequence[str],
    primals: tuple[Tensor, ...],
    constants: dict[str, Tensor],
    batch: Any,
    tangents: tuple[Tensor, ...],
    chunk_size: int | None,
) -> Products:
    r"""Reverse-over-reverse HVPs of one batch: :math:`\nabla_\theta \langle \nabla_\theta \ell, v\rangle` per vector.

    The double-backward arithmetic in ``torch.func`` form (``grad`` of a ``grad``), so that
    ``torch.compile`` traces it into one graph. Same inputs and outputs as :func:`func_products`.
    """
    grad_fn = torch.func.grad(_loss_with_aux(wrapper, names, constants, batch), has_aux=True)

    def hvp_one(tangent: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], Tensor]:
        def directional(params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
            grads, loss = grad_fn(params)
            total = sum((g * t).sum() for g, t in zip(grads, tangent, strict=True))
            return cast(Tensor, total), loss

        hvp, loss = torch.func.grad(directional, has_aux=True)(primals)
        return hvp, loss

    if tangents[0].shape[0] == 1:
        hvp, loss = hvp_one(tuple(t[0] for t in tangents))
        return [h.unsqueeze(0) for h in hvp], loss
    hvps, losses = torch.func.vmap(hvp_one, chunk_size=chunk_size)(tangents)
    return list(hvps), losses.reshape(-1)[0]


def loss_gradient(
    wrapper: nn.Module,
    names: Sequence[str],
    primals: tuple[Tensor, ...],
    constants: dict[str, Tensor],
    batch: Any,
    tangents: tuple[Tensor, ...],
    chunk_size: int | None,
) -> Products:
    r"""The batch loss's gradient at ``primals`` (``torch.func.grad``; ``tangents`` unused).

    What finite differences evaluate twice per vector, at :math:`\theta \pm \varepsilon u`.
    """
    grads, loss = torch.func.grad(_loss_with_aux(wrapper, names, constants, batch), has_aux=True)(primals)
    return list(grads), loss


_EAGER: dict[str, Callable[..., Products]] = {}


class DoubleBackward:
    """Second backward passes of a gradient with ``create_graph=True``: looped, or batched.

    For ``k > 1`` vectors one batched backward pass (``is_grads_batched=True``: a vmap over the
    backward graph) replaces ``k`` passes, which removes most of the per-pass fixed cost on small
    models. Whether it is faster depends on the model (vmap batching rules, the shapes), so the
    first product of each width times both forms once (after one untimed call of each) and keeps
    the faster; where the batched form is unsupported it falls back to the loop for good.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.batched: dict[int, bool] = {}
        self.batched_failed = False
        self.clock = clock

    def products(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        tangents: Sequence[Tensor],
        k: int,
        chunk_size: int | None,
    ) -> list[Tensor | None]:
        """``H v_j`` for the ``k`` rows of ``tangents`` (matching ``grads``), per parameter ``[k, *shape]``."""
        if k == 1 or self.batched_failed:
            return self._looped(grads, params, tangents, k, chunk_size)
        choice = self.batched.get(k)
        if choice is None:
            return self._measure(grads, params, tangents, k, chunk_size)
        if choice:
            return self._batched_or_loop(grads, params, tangents, k, chunk_size)
        return self._looped(grads, params, tangents, k, chunk_size)

    def _measure(
        self, grads: Sequence[Tensor], params: Sequence[Tensor], tangents: Sequence[Tensor], k: int, chunk: int | None
    ) -> list[Tensor | None]:
        out = self._batched_or_loop(grads, params, tangents, k, chunk)
        if self.batched_failed:
            return out
        self._looped(grads, params, tangents, k, chunk)  # untimed: the first call of each pays warm-up
        start = self.clock()
        out = self._batched_or_loop(grads, params, tangents, k, chunk)
        batched_s = self.clock() - start
        start = self.clock()
        self._looped(grads, params, tangents, k, chunk)
        looped_s = self.clock() - start
        self.batched[k] = batched_s <= looped_s
        logger.debug("double backward, %d vectors: batched %.3g s, looped %.3g s", k, batched_s, looped_s)
        return out

    def _batched_or_loop(
        self, grads: Sequence[Tensor], params: Sequence[Tensor], tangents: Sequence[Tensor], k: int, chunk: int | None
    ) -> list[Tensor | None]:
        step = chunk or k
        parts: list[list[Tensor | None]] = []
        try:
            with warnings.catch_warnings():
                # vmap's "performance drop" notes for ops without a batching rule: still exact
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                for start in range(0, k, step):
                    rows = [t[start : start + step] for t in tangents]
                    parts.append(
                        list(
                            torch.autograd.grad(
                                grads, params, rows, retain_graph=True, allow_unused=True, is_grads_batched=True
                            )
                        )
                    )
        except (RuntimeError, NotImplementedError):
            self.batched_failed = True
            return self._looped(grads, params, tangents, k, chunk)
        if len(parts) == 1:
            return parts[0]
        return [None if p[0] is None else torch.cat(cast("list[Tensor]", p)) for p in zip(*parts, strict=True)]

    @staticmethod
    def _looped(
        grads: Sequence[Tensor], params: Sequence[Tensor], tangents: Sequence[Tensor], k: int, chunk: int | None
    ) -> list[Tensor | None]:
        columns = [
            torch.autograd.grad(grads, params, [t[j] for t in tangents], retain_graph=True, allow_unused=True)
            for j in range(k)
        ]
        out: list[Tensor | None] = []
        for i, p in enumerate(params):
            rows = [c[i] for c in columns]
            if all(r is None for r in rows):
                out.append(None)
            else:
                out.append(torch.stack([torch.zeros_like(p) if r is None else r for r in rows]))
        return out


class CompiledProducts:
    """``torch.compile`` of the per-batch product functions, with an eager fallback per path.

    Each path (``"func"``: :func:`func_products`, ``"autograd"``: :func:`reverse_products`,
    ``"gradient"``: :func:`loss_gradient`, for finite differences) is compiled once
    (``fullgraph=True``: a graph break is a failure, not a silent partial compilation); torch
    recompiles it for new shapes and vector counts as usual. Where a compiled
    call raises and the eager call of the same inputs succeeds, compilation is abandoned for that
    path, with one ``RuntimeWarning`` naming the cause; where the eager call raises too, its error
    is the one raised (a genuine failure of the product, not of the compiler).
    """

    def __init__(self, wrapper: nn.Module, names: Sequence[str], chunk_size: int | None) -> None:
        self.wrapper = wrapper
        self.names = list(names)
        self.chunk_size = chunk_size
        self.failed: dict[str, str] = {}
        self._compiled: dict[str, Callable[..., Products]] = {}
        self._warned = False

    def _function(self, path: str) -> Callable[..., Products]:
        if path not in self._compiled:
            self._compiled[path] = torch.compile(_EAGER[path], fullgraph=True)
        return self._compiled[path]

    def run(
        self,
        path: str,
        primals: tuple[Tensor, ...],
        constants: dict[str, Tensor],
        batch: Any,
        tangents: tuple[Tensor, ...],
    ) -> Products | None:
        """The compiled product of ``path``, or ``None`` where compilation failed (the caller runs eager)."""
        if path in self.failed:
            return None
        args = (self.wrapper, self.names, primals, constants, batch, tangents, self.chunk_size)
        try:
            return self._function(path)(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            result = _EAGER[path](*args)  # raises the product's own error where the eager path fails too
            self._abandon(path, err)
            return result

    def _abandon(self, path: str, err: BaseException) -> None:
        first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        self.failed[path] = f"{type(err).__name__}: {first_line}"
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"HessianOperator(compile=True): torch.compile of the {path!r} product failed for this model "
                f"({self.failed[path]}); computing its products eagerly instead (same results, no speed-up). "
                "Pass compile=False to silence this warning.",
                RuntimeWarning,
                stacklevel=6,
            )
        else:
            logger.info("HessianOperator(compile=True): the %r product runs eagerly (%s).", path, self.failed[path])


_EAGER.update(func=func_products, autograd=reverse_products, gradient=loss_gradient)
