"""Constructed Hessian-like spectra with known eigenvalues (for the numerics audit tests).

A few outliers (100 ... 5), a positive bulk up to 1, more than half of the eigenvalues within
+-1e-4 of zero and ~9 % negatives down to -0.3, as in trained networks' Hessians.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def hessian_like_eigenvalues(
    n: int = 300, seed: int = 0, outliers: tuple[float, ...] = (100.0, 50.0, 20.0, 10.0, 5.0)
) -> Tensor:
    """Eigenvalues (descending outliers first, then bulk, near-zero mass and negatives), float64."""
    g = torch.Generator().manual_seed(10_000 + seed)
    k = len(outliers)
    num_neg = int(0.09 * n)
    num_zero = int(0.55 * n)
    num_bulk = n - k - num_neg - num_zero
    bulk = torch.rand(num_bulk, generator=g, dtype=torch.float64) ** 2  # (0, 1], denser near 0
    zeros = (torch.rand(num_zero, generator=g, dtype=torch.float64) * 2 - 1) * 1e-4
    negatives = -0.3 * torch.rand(num_neg, generator=g, dtype=torch.float64) ** 2
    return torch.cat([torch.tensor(outliers, dtype=torch.float64), bulk, zeros, negatives])


def with_eigenvectors(eigvals: Tensor, kind: Literal["haar", "axis"] = "haar", seed: int = 0) -> Tensor:
    """``Q diag(eigvals) Q^T`` with Haar-random ``Q`` or a random permutation (axis-aligned)."""
    n = eigvals.numel()
    g = torch.Generator().manual_seed(seed)
    if kind == "axis":
        perm = torch.randperm(n, generator=g)
        return torch.diag(eigvals[perm])
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    a = (q * eigvals) @ q.T
    return 0.5 * (a + a.T)
