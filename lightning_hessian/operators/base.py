"""The linear-operator interface every estimator consumes, and an explicit-matrix operator.

:class:`CurvatureOperator` is what the estimators (:func:`~lightning_hessian.hessian_trace`,
:func:`~lightning_hessian.top_eigenvalues`, :func:`~lightning_hessian.spectral_density`) see: a
symmetric map with ``matmat``. :class:`MatrixOperator` wraps an explicit symmetric matrix behind
the same interface (tests, known spectra, small models whose Hessian was formed exactly).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["CurvatureOperator", "MatrixOperator", "WrappedOperator"]


@runtime_checkable
class CurvatureOperator(Protocol):
    """What an estimator needs: a symmetric linear map on ``R^num_params``.

    ``matmat(V)`` maps ``[num_params, k]`` to ``[num_params, k]``; ``num_hvps`` counts the
    columns multiplied so far.
    """

    @property
    def num_params(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def num_hvps(self) -> int: ...

    def matmat(self, matrix: Tensor) -> Tensor: ...


def _matvec_via_matmat(op: CurvatureOperator, vector: Tensor) -> Tensor:
    if vector.ndim != 1 or vector.shape[0] != op.num_params:
        raise ValueError(
            f"`vector` must be 1-D with {op.num_params} entries (num_params), got shape {tuple(vector.shape)}."
        )
    return op.matmat(vector.unsqueeze(1)).squeeze(1)


def _check_matrix(matrix: Tensor, num_params: int) -> None:
    if not isinstance(matrix, Tensor):
        raise TypeError(f"`matrix` must be a torch.Tensor, got {type(matrix).__name__}.")
    if matrix.ndim != 2 or matrix.shape[0] != num_params:
        raise ValueError(
            f"`matrix` must have shape [num_params={num_params}, k], got {tuple(matrix.shape)}; "
            "use matvec for a single flat vector."
        )


class MatrixOperator:
    """An explicit symmetric matrix behind the :class:`CurvatureOperator` interface.

    Args:
        matrix: A square symmetric tensor ``[n, n]`` (any float dtype; products run in its dtype).

    Example:
        >>> import torch
        >>> from lightning_hessian import MatrixOperator, top_eigenvalues
        >>> op = MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> round(top_eigenvalues(op, k=1).values[0].item(), 6)
        10.0
    """

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError("`matrix` must be a square 2-D torch.Tensor.")
        if not torch.is_floating_point(matrix):
            raise TypeError(f"`matrix` must have a floating dtype, got {matrix.dtype}.")
        self.matrix = matrix
        self._num_hvps = 0

    @property
    def num_params(self) -> int:
        return self.matrix.shape[0]

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def num_hvps(self) -> int:
        return self._num_hvps

    def matmat(self, matrix: Tensor) -> Tensor:
        _check_matrix(matrix, self.num_params)
        self._num_hvps += matrix.shape[1]
        out = self.matrix @ matrix.to(device=self.device, dtype=self.dtype)
        return out.to(matrix.dtype)

    def matvec(self, vector: Tensor) -> Tensor:
        return _matvec_via_matmat(self, vector)


class WrappedOperator:
    """Base of operators built on another one: size, device and HVP count pass through.

    Subclasses set :attr:`op` and implement ``matmat``; ``num_hvps`` counts the wrapped
    operator's products, so wrappers never double-count.
    """

    op: CurvatureOperator

    @property
    def num_params(self) -> int:
        return self.op.num_params

    @property
    def device(self) -> torch.device:
        return self.op.device

    @property
    def num_hvps(self) -> int:
        return self.op.num_hvps

    @property
    def vector_space(self) -> object | None:
        """The wrapped operator's vector space (sharded operators; ``None`` otherwise)."""
        return getattr(self.op, "vector_space", None)

    @property
    def fd_error_estimate(self) -> float:
        """The wrapped operator's measured finite-difference error (NaN: exact products)."""
        return float(getattr(self.op, "fd_error_estimate", math.nan))

    def matmat(self, matrix: Tensor) -> Tensor:
        raise NotImplementedError

    def matvec(self, vector: Tensor) -> Tensor:
        return _matvec_via_matmat(self, vector)
