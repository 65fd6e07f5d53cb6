"""Isolation of an analysis from the training run: everything the run could observe is restored."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lightning_hessian.operators import preserved_model_state

__all__ = ["isolated_training_state"]

@contextlib.contextmanager
def isolated_training_state(pl_module: torch.nn.Module, optimizers: Sequence[Any] = ()) -> Iterator[None]:
    """Everything the training run could observe is restored on exit.

    Python ``random``, NumPy and torch (CPU and CUDA) RNG streams; every module's train/eval
    flag, ``requires_grad`` flags and buffers (:func:`~lightning_hessian.preserved_model_state`);
    parameters and ``.grad`` are checked bit for bit, and optimizer state tensors are never
    written (the estimators only read them).
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in pl_module.parameters()]
    try:
        with preserved_model_state(pl_module):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for param, grad in grads:
            if grad is None:
                if param.grad is not None:
                    param.grad = None
            elif param.grad is None or not torch.equal(param.grad, grad):
                param.grad = grad
