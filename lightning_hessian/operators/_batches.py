"""Micro-batch machinery shared by the operators: moving, casting, sizing, and the loss wrapper."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[Any, Any], Tensor]
BatchLossFn = Callable[[nn.Module, Any], Tensor]


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        if batch.is_inference():
            batch = batch.clone()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _move(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_move(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


def _cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(dtype) if torch.is_floating_point(batch) else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _cast_floats(v, dtype) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_cast_floats(v, dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cast_floats(v, dtype) for v in batch)
    return batch


def _nbytes(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, Mapping):
        return sum(_nbytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(_nbytes(v) for v in batch)
    return 0


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _default_batch_size(batch: Any) -> int:
    tensor = _first_tensor(batch)
    if tensor is None or tensor.ndim == 0:
        raise ValueError(
            "Could not infer the size of a batch (no tensor with a batch dimension found); "
            "pass `batch_size_fn=lambda batch: ...` to HessianOperator."
        )
    return int(tensor.shape[0])


class _LossModule(nn.Module):
    """Wraps model + loss so that ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, batch_loss: BatchLossFn | None) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn
        self._batch_loss = batch_loss

    def forward(self, batch: Any) -> Tensor:
        if self._batch_loss is not None:
            loss = self._batch_loss(self.model, batch)
        else:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise TypeError(
                    "With `loss_fn`, each batch must be an (inputs, targets) pair; got "
                    f"{type(batch).__name__}. Pass `batch_loss=lambda model, batch: ...` instead."
                )
            inputs, targets = batch[0], batch[1]
            assert self._loss_fn is not None
            loss = self._loss_fn(self.model(inputs), targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(
                "The loss must be a scalar tensor (a mean over the batch); got "
                f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}."
            )
        return loss.reshape(())
