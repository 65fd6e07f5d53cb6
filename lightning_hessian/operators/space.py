"""The vector space an operator acts on: inner products, norms and probes of its vectors.

Every estimator works with vectors of length :attr:`~CurvatureOperator.num_params` and needs,
besides ``matmat``, only inner products, norms and random probes. On one process (or under DDP,
where every process holds every parameter) these are plain local tensor operations:
:data:`LOCAL_SPACE`. When the parameters are *sharded* (FSDP2 ``fully_shard``: each process holds
a slice of every parameter), an operator's vectors are the local slices, and every inner product
is a local partial sum followed by one all-reduce of scalars; probes are drawn so that the global
vector does not depend on the number of processes. Such an operator exposes a
:class:`VectorSpace` as its ``vector_space`` attribute, and :func:`space_of` returns it.

Estimators never call ``torch.dot``/``norm``/``@`` across the parameter dimension directly: they
go through the space of their operator, so the same code serves one device, DDP and FSDP2.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_hessian._utils.random import ProbeKind, draw_probes

__all__ = ["LOCAL_SPACE", "LocalSpace", "VectorSpace", "space_of"]

#: Elements per slice of a float64 reduction (bounds temporaries independently of model size).
_CHUNK_ELEMENTS = 1 << 20


@runtime_checkable
class VectorSpace(Protocol):
    """Inner products, reductions and probes of an operator's (possibly sharded) vectors.

    Every method is *collective* for a sharded space: all processes call it, in the same order,
    with their own local slices; every process gets the same (global) result.
    """

    def all_reduce(self, values: Tensor) -> Tensor:
        """Sum of ``values`` (float64, any shape) over the shards; the identity on one process."""
        ...

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        """``a^T b`` as float64 ``[k, m]`` for ``a: [n, k]`` and ``b: [n, m]`` (global sums)."""
        ...

    def column_dots(self, a: Tensor, b: Tensor) -> Tensor:
        """Column-wise ``sum_i a[i, j] b[i, j]`` as float64 ``[k]`` for ``a, b: [n, k]``."""
        ...

    def probes(
        self,
        num_params: int,
        num_probes: int,
        kind: ProbeKind,
        generator: torch.Generator,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """``[num_params, num_probes]`` probes with ``E[v v^T] = I`` (this process's rows)."""
        ...


def _chunked_gram(a: Tensor, b: Tensor) -> Tensor:
    n = a.shape[0]
    out = torch.zeros((a.shape[1], b.shape[1]), dtype=torch.float64, device=a.device)
    for lo in range(0, n, max(1, _CHUNK_ELEMENTS // max(a.shape[1], b.shape[1], 1))):
        hi = min(n, lo + max(1, _CHUNK_ELEMENTS // max(a.shape[1], b.shape[1], 1)))
        out += a[lo:hi].to(torch.float64).t() @ b[lo:hi].to(device=a.device, dtype=torch.float64)
    return out


def _chunked_column_dots(a: Tensor, b: Tensor) -> Tensor:
    n = a.shape[0]
    out = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
    rows = max(1, _CHUNK_ELEMENTS // max(a.shape[1], 1))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        out += (a[lo:hi].to(torch.float64) * b[lo:hi].to(device=a.device, dtype=torch.float64)).sum(dim=0)
    return out


class LocalSpace:
    """The space of an operator whose vectors are whole on every process (one device, DDP)."""

    def all_reduce(self, values: Tensor) -> Tensor:
        return values

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        return _chunked_gram(a, b)

    def column_dots(self, a: Tensor, b: Tensor) -> Tensor:
        return _chunked_column_dots(a, b)

    def probes(
        self,
        num_params: int,
        num_probes: int,
        kind: ProbeKind,
        generator: torch.Generator,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        return draw_probes(num_params, num_probes, kind, generator, device=device, dtype=dtype)

    def __repr__(self) -> str:
        return "LocalSpace()"


LOCAL_SPACE = LocalSpace()
"""The space of every operator without a ``vector_space`` attribute."""


def space_of(op: object) -> VectorSpace:
    """The :class:`VectorSpace` of ``op``: its ``vector_space`` attribute, or :data:`LOCAL_SPACE`."""
    space = getattr(op, "vector_space", None)
    return space if space is not None else LOCAL_SPACE
