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


def with_eigenvectors(
    eigvals: Tensor, kind: Literal["haar", "axis"] = "haar", seed: int = 0, num_axis: int = 10
) -> Tensor:
    """``Q diag(eigvals) Q^T`` with Haar-random ``Q``, or (``"axis"``) the ``num_axis`` eigenvalues
    of largest magnitude on coordinate axes and the rest Haar-rotated among the other coordinates.

    With ``"axis"`` Rademacher probes see the same outlier Ritz vectors in every run (the case
    that fooled the old cross-run multiplicity test) while Hutchinson keeps a real variance.
    """
    n = eigvals.numel()
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if kind == "axis":
        order = torch.argsort(eigvals.abs(), descending=True)
        eigvals = eigvals[order]
        m = n - num_axis
        q = torch.zeros(n, n, dtype=torch.float64)
        q[:num_axis, :num_axis] = torch.eye(num_axis, dtype=torch.float64)
        sub, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        q[num_axis:, num_axis:] = sub * torch.sign(torch.diagonal(r))
        perm = torch.randperm(n, generator=g)
        q = q[perm]
    a = (q * eigvals) @ q.T
    return 0.5 * (a + a.T)
