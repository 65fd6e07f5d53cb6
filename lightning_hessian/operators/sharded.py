r"""Hessian-vector products of an FSDP2-sharded model: :class:`ShardedHessianOperator`.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter into a ``DTensor`` of which
each process holds one slice (placement ``Shard(0)`` over a 1-D data-parallel mesh); the module's
own forward all-gathers the parameters it needs and its backward reduce-scatters the gradients,
so that each process ends up with *its slice* of the gradient. Neither double backward nor
forward-mode AD go through that machinery; finite differences of gradients do:

.. math::

    H v \approx \frac{\nabla L(\theta + h v) - \nabla L(\theta - h v)}{2h},

with both gradients computed by the sharded module's ordinary forward and first-order backward
(Pearlmutter 1994, "Fast exact multiplication by the Hessian", for the finite-difference
baseline; Granziol & Juarev 2026, "Hessian spectral analysis at foundation model scale",
arXiv:2602.00816, for shard-local finite-difference HVPs). Vectors are concatenations of the
local slices (:mod:`~lightning_hessian.operators.sharded_space`): every process holds
``num_params`` = its local size, inner products are all-reduced scalars.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian.errors import NonFiniteHVPError, NonFiniteLossError
from lightning_hessian.operators._batches import BatchLossFn, LossFn, _default_batch_size, _LossModule, _move
from lightning_hessian.operators._state import _analysis_mode, preserved_model_state
from lightning_hessian.operators.base import _check_matrix, _matvec_via_matmat
from lightning_hessian.operators.finite_difference import (
    FiniteDifferenceState,
    central_difference_products,
)
from lightning_hessian.operators.finite_difference import fd_step as default_fd_step
from lightning_hessian.operators.sharded_space import ParameterRange, ShardedSpace

__all__ = ["ShardedHessianOperator", "dtensor_parameters", "fsdp2_error", "reshard_all"]


def dtensor_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of ``model`` that are ``DTensor`` s (FSDP2, tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return []
    return [name for name, p in model.named_parameters() if p.requires_grad and isinstance(p, DTensor)]


def fsdp2_error(what: str, names: Sequence[str]) -> TypeError:
    """The error of an unsharded code path given DTensor parameters (never a silent zero)."""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return TypeError(
        f"{what}: the model's parameters are DTensors ({shown}), as FSDP2 "
        "(torch.distributed.fsdp.fully_shard) or tensor parallelism makes them. Differentiating them "
        "functionally would see only local shards and give wrong (zero) products. Use "
        "lightning_hessian.operators.ShardedHessianOperator(model, loss_fn, data) on every process "
        "(finite-difference HVPs through the sharded module; each process passes its shard of the data), "
        "or, in Lightning, the monitors under Trainer(strategy=ModelParallelStrategy()) with fully_shard "
        "in configure_model."
    )


def reshard_all(model: nn.Module) -> None:
    """Free every FSDP2 module's unsharded parameters (the next forward all-gathers the current shards)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _local_range(param: Any) -> tuple[ParameterRange, Any]:
    """The flat range a ``Shard(0)`` DTensor holds here, and its mesh's process group."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = param.device_mesh, tuple(param.placements)
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(
            f"Only FSDP2 data-parallel sharding (one mesh dimension, placement Shard(0)) is supported; a parameter "
            f"has placements {placements} on a {mesh.ndim}-D mesh (tensor parallel / HSDP are not)."
        )
    shape, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    row = math.prod(param.shape[1:]) if param.ndim > 1 else 1
    start = int(offset[0]) * row if param.ndim > 0 else 0
    return ParameterRange(param.numel(), start, start + math.prod(shape)), mesh.get_group()


class _ShardedPasses:
    """The sharded passes over this process's analysis batches: collectives, gradients, agreed forwards.

    Every method is collective over ``self.group``; :class:`ShardedHessianOperator` sets the
    attributes used here (model, loss wrapper, data, parameters and their local shards).
    """

    model: nn.Module
    data: Iterable[Any]
    batch_size_fn: Callable[[Any], float]
    train_mode_batchnorm: bool
    group: Any
    world_size: int
    _params: list[Tensor]
    _locals: list[Tensor]
    _device: torch.device
    _batches_cache: list[tuple[Any, float]] | None
    _wrapper: _LossModule

    # ------------------------------------------------------------------ data and collectives

    def _reduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return [float(x) for x in t.tolist()]

    def _batches(self) -> list[tuple[Any, float]]:
        if self._batches_cache is None:
            out = []
            for batch in self.data:
                moved = _move(batch, self._device)
                weight = float(self.batch_size_fn(moved))
                if not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"Batch weight must be non-negative and finite, got {weight}.")
                if weight > 0:
                    out.append((moved, weight))
            self._batches_cache = out
        return self._batches_cache

    def _plan(self) -> tuple[list[tuple[Any, float]], int, float]:
        """Local batches, the common number of passes, the global total weight (collective)."""
        batches = self._batches()
        weight = sum(w for _, w in batches)
        steps, empty = self._reduce([float(len(batches)), 0.0 if batches else 1.0], "max")
        (total,) = self._reduce([weight])
        if empty > 0 or total <= 0:
            raise ValueError(
                "ShardedHessianOperator: a process has no analysis batch; FSDP2's forward is collective, so every "
                "process needs at least one micro-batch (use at least world_size analysis samples)."
            )
        return batches, int(steps), total

    def _guarded(self) -> contextlib.ExitStack[bool | None]:
        stack = contextlib.ExitStack()
        stack.callback(reshard_all, self.model)  # training's next forward all-gathers the restored shards
        stack.enter_context(preserved_model_state(self.model))
        stack.enter_context(_analysis_mode(self.model, self.train_mode_batchnorm))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.autocast(device_type=self._device.type, enabled=False))
        return stack

    # ------------------------------------------------------------------ gradients and products

    def _gradient(self, plan: tuple[list[tuple[Any, float]], int, float]) -> tuple[Tensor, float]:
        """This process's slice of :math:`\\nabla L` (float64) and the global mean loss (collective).

        Every process runs the same number of forward/backward passes (FSDP2 collectives): one
        with fewer batches repeats its first with weight 0. FSDP2's reduce-scatter averages over
        the mesh, so each local loss is scaled by the world size.
        """
        batches, steps, total = plan
        saved_grads = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        loss_sum = 0.0
        try:
            with torch.enable_grad():
                for step in range(steps):
                    batch, weight = batches[step] if step < len(batches) else (batches[0][0], 0.0)
                    loss = self._agreed_forward(batch)
                    loss_sum += weight * float(loss.detach())
                    (loss * (weight * self.world_size / total)).backward()
            grads = [
                p.grad.to_local().reshape(-1).to(torch.float64)  # type: ignore[attr-defined]
                if p.grad is not None
                else torch.zeros(t.numel(), dtype=torch.float64, device=self._device)
                for p, t in zip(self._params, self._locals, strict=True)
            ]
        finally:
            for p, g in zip(self._params, saved_grads, strict=True):
                p.grad = g
        (loss_total,) = self._reduce([loss_sum])
        return torch.cat(grads), loss_total / total

    def _agreed_forward(self, batch: Any) -> Tensor:
        """The loss of one batch, after every process agreed it is finite (one collective of 2 flags).

        A forward that raises or gives NaN/Inf on one process must not leave the others waiting in
        the backward's reduce-scatter: all of them learn it here and raise together.
        """
        failure: BaseException | None = None
        try:
            loss = self._wrapper(batch)
            finite = bool(torch.isfinite(loss.detach()))
        except Exception as err:  # noqa: BLE001 - re-raised after the agreement
            failure, finite = err, True
        failed, non_finite = self._reduce([1.0 if failure is not None else 0.0, 0.0 if finite else 1.0])
        if failure is not None:
            raise failure
        if failed > 0:
            raise NonFiniteHVPError("Another process failed in its forward pass of the analysis data.")
        if non_finite > 0:
            raise NonFiniteLossError("The loss is NaN or Inf on the analysis data (on some process).")
        return loss


class ShardedHessianOperator(_ShardedPasses):
    r"""Hessian of a ``fully_shard`` model's size-weighted mean loss, by finite differences of sharded gradients.

    Represents :math:`H = \nabla^2 L(\theta)`, :math:`L = \sum_b \frac{|b|}{N}\ell_b`, over the
    union of every process's ``data`` (:math:`N` the total weight over all processes), acting on
    the local slices: ``matmat(V)`` takes this process's rows ``[num_params, k]`` of the global
    vectors and returns its rows of :math:`H V`. **Collective**: every process of the mesh calls
    every method in the same order. Each column costs two gradients of the whole analysis set
    (forward + backward of every local micro-batch, with FSDP2's all-gathers/reduce-scatters).

    Each column is scaled to unit *global* norm and perturbed by the length
    :math:`\varepsilon = c\,\epsilon^{1/3}\max(1, \mathrm{rms}(\theta))`
    (:func:`~lightning_hessian.operators.finite_difference.fd_step` on global sums; ``fd_step``
    overrides it); the first product also evaluates one column at :math:`2\varepsilon` and exposes
    :attr:`fd_error_estimate`, the measured relative error (logged by the monitors).
    Local shards are perturbed in place and restored bitwise from a saved copy after every
    gradient; ``.grad``, buffers, train/eval flags and the RNG are as found afterwards.

    Args:
        model: A module whose trainable parameters are FSDP2 ``DTensor`` s (``Shard(0)`` on one
            1-D mesh), on every process.
        loss_fn: ``loss_fn(outputs, targets) -> mean loss`` for ``(inputs, targets)`` batches.
        data: This process's micro-batches of the analysis set (a list or loader; may differ in
            count and size between processes; at least one per process).
        batch_loss: Alternative to ``loss_fn``: ``batch_loss(model, batch) -> mean loss``.
        batch_size_fn: ``batch -> weight |b|`` (default: leading dimension).
        train_mode_batchnorm: BatchNorm on batch statistics (running statistics untouched).
        fd_step: Perturbation length :math:`\varepsilon` (``None``: the default rule).
        fd_richardson: Richardson-extrapolated products (4 gradients per vector instead of 2).

    Raises:
        ValueError: A parameter is not an FSDP2 ``Shard(0)`` DTensor, or the model has no
            trainable parameter.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        data: Iterable[Any] | None = None,
        *,
        batch_loss: BatchLossFn | None = None,
        batch_size_fn: Callable[[Any], float] | None = None,
        train_mode_batchnorm: bool = False,
        fd_step: float | None = None,
        fd_richardson: bool = False,
    ) -> None:
        if (loss_fn is None) == (batch_loss is None):
            raise TypeError("Pass exactly one of `loss_fn` and `batch_loss`.")
        if data is None or isinstance(data, Iterator):
            raise TypeError("`data` must be a re-iterable of this process's batches (a list or a DataLoader).")
        self.fd = FiniteDifferenceState(fd_step, fd_richardson)
        self.model = model
        self.data = data
        self.batch_size_fn = batch_size_fn or _default_batch_size
        self.train_mode_batchnorm = bool(train_mode_batchnorm)
        reshard_all(model)  # named_parameters() are the sharded DTensors again
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("The model has no trainable parameters (requires_grad=True).")
        not_dtensor = [n for n in (n for n, _ in named) if n not in set(dtensor_parameters(model))]
        if not_dtensor:
            raise ValueError(
                f"ShardedHessianOperator needs every trainable parameter sharded by fully_shard; {not_dtensor[:3]} "
                "are plain tensors (apply fully_shard to the root module too)."
            )
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        ranges, groups = zip(*(_local_range(p) for p in self._params), strict=True)
        if len({id(g) for g in groups}) != 1:
            raise ValueError("Every parameter must be sharded over the same device mesh.")
        self.group = groups[0]
        self.vector_space = ShardedSpace(ranges, self.group)
        self._locals: list[Tensor] = [p.to_local() for p in self._params]  # type: ignore[attr-defined]
        self._dtype = self._params[0].dtype
        self._device = self._locals[0].device
        self._num_hvps = 0
        self._batches_cache: list[tuple[Any, float]] | None = None
        self._wrapper = _LossModule(model, loss_fn, batch_loss)
        import torch.distributed as dist

        self.world_size = dist.get_world_size(self.group)

    # ------------------------------------------------------------------ properties

    @property
    def num_params(self) -> int:
        """Entries of this process's slices (the length of its rows of every vector)."""
        return self.vector_space.local_size

    @property
    def global_num_params(self) -> int:
        """Trainable parameters of the whole (unsharded) model."""
        return self.vector_space.global_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def num_hvps(self) -> int:
        return self._num_hvps

    @property
    def fd_step(self) -> float | None:
        """The perturbation length in use (``None`` before the first product without an override)."""
        return self.fd.step

    @property
    def fd_error_estimate(self) -> float:
        """Measured relative error of the products (``||S_h - S_2h|| / ||S_h||`` once; NaN before)."""
        return self.fd.error_estimate

    @property
    def num_gradients(self) -> int:
        """Sharded gradient evaluations (micro-batch passes) spent on products so far."""
        return self.fd.num_gradients

    @property
    def backend(self) -> str:
        return "finite_difference"

    @property
    def backend_choices(self) -> dict[int, str]:
        return {}

    def session(self) -> contextlib.AbstractContextManager[None]:
        """Same interface as :meth:`HessianOperator.session`; every sharded product restores its own state."""
        return contextlib.nullcontext()

    def reset_num_hvps(self) -> None:
        self._num_hvps = 0

    def parameters(self) -> list[Tensor]:
        """The trainable (DTensor) parameters, in the order of the local slices."""
        return list(self._params)

    def parameter_names(self) -> list[str]:
        return list(self._names)

    def local_rows(self, vector: Tensor) -> Tensor:
        """This process's rows of a global (unsharded, parameter-order) vector or matrix (tests, small models)."""
        pieces, offset = [], 0
        for r in self.vector_space.ranges:
            pieces.append(vector[offset + r.start : offset + r.stop])
            offset += r.numel
        return torch.cat(pieces)

    def local_parameters(self) -> list[Tensor]:
        """This process's shards (``p.to_local()``), in the order of the vectors' rows."""
        return list(self._locals)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter local tensors into one local vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a local vector into views shaped like the local shards."""
        out, offset = [], 0
        for t in self._locals:
            out.append(vector[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    def _grad_fn(self, plan: Any) -> Callable[[], tuple[list[Tensor], Tensor]]:
        """``() -> (local gradient shards, loss)`` at the shards' current values (collective)."""

        def grad_fn() -> tuple[list[Tensor], Tensor]:
            reshard_all(self.model)  # no stale all-gathered copy survives a change of the shards
            flat, loss = self._gradient(plan)
            return self.unflatten(flat), torch.tensor(loss, dtype=torch.float64)

        return grad_fn

    def _step(self) -> float:
        if self.fd.step is None:
            sq = self.vector_space.all_reduce(
                torch.tensor([sum(float(t.detach().double().pow(2).sum()) for t in self._locals)], dtype=torch.float64)
            )
            self.fd.step = default_fd_step(float(sq[0]), self.global_num_params, self._dtype)
        return self.fd.step

    def _products(self, matrix: Tensor, plan: Any) -> Tensor:
        """Central differences along the unit columns (global norms), scaled back; the 2ε check once."""
        k = matrix.shape[1]
        v = matrix.to(device=self._device, dtype=torch.float64)
        norms = self.vector_space.column_dots(v, v).sqrt().to(self._device)
        units = v / torch.where(norms > 0, norms, torch.ones_like(norms))
        tangents = [
            piece.t().reshape(k, *t.shape).to(t.dtype)
            for piece, t in zip(self._split_rows(units), self._locals, strict=True)
        ]
        step, grad_fn = self._step(), self._grad_fn(plan)
        result = central_difference_products(self._locals, tangents, grad_fn, step, richardson=self.fd.richardson)
        self.fd.num_gradients += result.num_gradients * len(plan[0])
        products = torch.cat([h.reshape(k, -1) for h in result.products], dim=1).t()
        nonzero = [j for j in range(k) if float(norms[j]) > 0]
        if math.isnan(self.fd.error_estimate) and nonzero:
            j = nonzero[0]
            coarse = central_difference_products(
                self._locals, [t[j : j + 1] for t in tangents], grad_fn, 2.0 * step, richardson=self.fd.richardson
            )
            self.fd.num_gradients += coarse.num_gradients * len(plan[0])
            fine = products[:, j : j + 1]
            diff = fine - torch.cat([h.reshape(1, -1) for h in coarse.products], dim=1).t()
            num, den = self.vector_space.column_dots(torch.cat([diff, fine], 1), torch.cat([diff, fine], 1)).sqrt()
            self.fd.error_estimate = float(num / den) if float(den) > 0 else (0.0 if float(num) == 0 else math.inf)
        return products * norms.unsqueeze(0)

    def _split_rows(self, matrix: Tensor) -> list[Tensor]:
        out, offset = [], 0
        for t in self._locals:
            out.append(matrix[offset : offset + t.numel()])
            offset += t.numel()
        return out

    def matmat(self, matrix: Tensor) -> Tensor:
        """This process's rows of ``H @ V`` for its rows ``V`` ``[num_params, k]`` (collective).

        Raises:
            NonFiniteLossError: The loss is NaN/Inf (on any process).
            NonFiniteHVPError: The product contains NaN/Inf (on any process).
        """
        _check_matrix(matrix, self.num_params)
        k = matrix.shape[1]
        if k == 0:
            return matrix.new_zeros((self.num_params, 0))
        with self._guarded():
            out = self._products(matrix, self._plan())
        self._num_hvps += k
        (bad,) = self._reduce([0.0 if bool(torch.isfinite(out).all()) else 1.0])
        if bad > 0:
            raise NonFiniteHVPError("A finite-difference Hessian-vector product contains NaN or Inf.")
        return out.to(matrix.dtype if torch.is_floating_point(matrix) else torch.float64)

    def matvec(self, vector: Tensor) -> Tensor:
        return _matvec_via_matmat(self, vector)

    def gradient(self) -> Tensor:
        """This process's slice of the gradient of the mean loss (float64; collective)."""
        with self._guarded():
            return self._gradient(self._plan())[0]

    def loss(self) -> float:
        """The size-weighted mean loss over every process's data (collective; forward passes only)."""
        with self._guarded(), torch.no_grad():
            batches, steps, total = self._plan()
            local = 0.0
            for step in range(steps):
                batch, weight = batches[step] if step < len(batches) else (batches[0][0], 0.0)
                local += weight * float(self._agreed_forward(batch))
        (summed,) = self._reduce([local])
        return summed / total

    def __repr__(self) -> str:
        return (
            f"ShardedHessianOperator(num_params={self.num_params} of {self.global_num_params}, "
            f"world_size={self.world_size}, dtype={self.dtype}, backend='finite_difference')"
        )
