"""Orthonormal bases of (possibly sharded) vectors through an operator's :class:`VectorSpace`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_hessian.operators.space import VectorSpace

__all__ = ["column_norms", "orthonormal_columns", "project_off"]

#: A column is dropped when less than this fraction of its norm is left after projection.
_DROP_RTOL = 1e-10


def column_norms(space: VectorSpace, a: Tensor) -> Tensor:
    """Global Euclidean norms of the columns of ``a: [n, k]`` (float64, one collective)."""
    return space.column_dots(a, a).clamp_min(0.0).sqrt()


def project_off(space: VectorSpace, q: Tensor, a: Tensor) -> Tensor:
    """``a - Q (Q^T a)`` for orthonormal columns ``q`` (float64; one collective)."""
    if q.shape[1] == 0:
        return a.to(torch.float64)
    coeffs = space.gram(q, a).to(q.device)
    return a.to(torch.float64) - q.to(torch.float64) @ coeffs


def orthonormal_columns(space: VectorSpace, a: Tensor, against: Tensor | None = None) -> Tensor:
    r"""An orthonormal basis (float64 ``[n, r]``) of the columns of ``a``, orthogonal to ``against``.

    Classical Gram–Schmidt, twice per column ("twice is enough": Giraud, Langou, Rozložník,
    *The loss of orthogonality in the Gram–Schmidt orthogonalization process*, 2005), with every
    inner product a :class:`VectorSpace` call, so that sharded vectors get the global basis.
    Columns that keep less than ``1e-10`` of their norm after projection (rank deficiency) are
    dropped; the decision uses reduced norms, so every shard drops the same columns. ``against``
    (orthonormal columns, optional) is projected off first and is not part of the result.
    """
    basis = against.to(torch.float64) if against is not None else a.new_zeros((a.shape[0], 0), dtype=torch.float64)
    fixed = basis.shape[1]
    if a.shape[1] == 0:
        return basis[:, fixed:]
    original = column_norms(space, a).tolist()
    for j in range(a.shape[1]):
        v = a[:, j : j + 1].to(torch.float64)
        for _ in range(2):
            v = project_off(space, basis, v)
        norm = float(column_norms(space, v)[0])
        if not math.isfinite(norm) or norm <= _DROP_RTOL * original[j] or norm == 0.0:
            continue
        basis = torch.cat([basis, v / norm], dim=1)
    return basis[:, fixed:]
