r"""Per-block Hessian traces from the full trace's own probes (no extra HVP).

For a Rademacher probe :math:`v` (:math:`\mathbb E[vv^\top] = I`) and a block :math:`b` of
coordinates, :math:`v_b^\top (Hv)_b = \sum_{i,j\in b} v_i H_{ij} v_j + \sum_{i\in b, j\notin b}
v_i H_{ij} v_j` has expectation :math:`\operatorname{tr}(H_{bb})`: the Hutchinson estimator of
the block's trace reads the block's rows of the products already made for the full trace
(``hessian-dynamics-trace-maxeig.txt`` §2.1 applied blockwise). The block samples of one probe
sum, over a partition of the parameters, to the full sample :math:`v^\top Hv` exactly.

Error bars are plain Hutchinson (sample standard error over the probes). The full trace's
deflation control variate (:attr:`~lightning_hessian.SpectralDensity.deflated_trace_samples`)
would carry over as :math:`\sum_j \ell_j[(y_j^\top v)(y_{j,b}^\top v_b) - \|y_{j,b}\|^2]` (zero
mean for each block), but it needs the outlier Ritz vectors :math:`y_j`, which the density does
not keep; block traces therefore have wider error bars than the full deflated trace.

:class:`FirstProductRecorder` captures the first product of an estimator (the probes, for
Lanczos-based :func:`~lightning_hessian.spectral_density`: its start vectors, normalised) and
:func:`block_traces` turns them into one :class:`~lightning_hessian.TraceEstimate` per block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_hessian.estimators.trace import TraceEstimate
from lightning_hessian.operators.base import CurvatureOperator, WrappedOperator
from lightning_hessian.operators.space import LOCAL_SPACE, VectorSpace

__all__ = ["FirstProductRecorder", "block_trace_samples", "block_traces"]


class FirstProductRecorder(WrappedOperator):
    """A transparent wrapper that keeps the first ``matmat`` call's input and output (float64).

    Everything else (``num_params``, ``device``, ``num_hvps``, ``parameters()``, ...) is the
    wrapped operator's.
    """

    def __init__(self, op: CurvatureOperator) -> None:
        self.op = op
        self.inputs: Tensor | None = None
        self.products: Tensor | None = None

    def matmat(self, matrix: Tensor) -> Tensor:
        out = self.op.matmat(matrix)
        if self.inputs is None:
            self.inputs = matrix.detach().to(torch.float64).clone()
            self.products = out.detach().to(torch.float64).clone()
        return out

    def __getattr__(self, name: str) -> object:
        if name in ("op", "inputs", "products"):
            raise AttributeError(name)
        return getattr(self.op, name)


def block_trace_samples(
    probes: Tensor,
    products: Tensor,
    blocks: Mapping[str, Sequence[slice]],
    *,
    rtol: float = 1e-6,
    space: VectorSpace = LOCAL_SPACE,
) -> dict[str, Tensor]:
    r"""Per-block Hutchinson samples :math:`v_b^\top (Hv)_b` of Rademacher-direction probes.

    Args:
        probes: ``[n, R]`` probes, each a rescaled Rademacher vector (all entries of equal
            magnitude), e.g. Lanczos' normalised start vectors :math:`q = v/\sqrt n`.
        products: ``[n, R]`` the operator's products with ``probes``.
        blocks: ``{block name: [slices of the flat vector]}``.
        rtol: Tolerance of the equal-magnitude check.
        space: The vector space of ``probes`` (a sharded one sums over the shards; ``blocks``
            then index this process's rows).

    Returns:
        ``{block name: [R] float64 samples}``, scaled to a Rademacher probe of norm
        :math:`\sqrt n` (:math:`n/\|q\|^2 \cdot q_b^\top (Hq)_b`).

    Raises:
        ValueError: A probe is not a rescaled Rademacher vector (the block samples would be
            biased), or the shapes disagree.
    """
    if probes.shape != products.shape or probes.ndim != 2:
        raise ValueError(
            f"`probes` and `products` must both be [n, R], got {tuple(probes.shape)}, {tuple(products.shape)}."
        )
    q = probes.to(torch.float64)
    magnitude = q.abs()
    # one collective: the size, the magnitudes' sums and the squared norms of every probe
    width = q.shape[1]
    sums = space.all_reduce(
        torch.cat([torch.tensor([float(q.shape[0])], dtype=torch.float64, device=q.device), magnitude.sum(dim=0)])
    )
    n = float(sums[0])
    scale = (sums[1:] / n).unsqueeze(0)
    bad = ((magnitude - scale).abs() > rtol * scale).sum().to(torch.float64).reshape(1)
    if float(space.all_reduce(bad)[0]) > 0:  # the same decision on every shard
        raise ValueError("Block traces need Rademacher probes (all entries of equal magnitude).")
    terms = q * products.to(torch.float64)
    names = list(blocks)
    local = torch.zeros((len(names) + 1, width), dtype=torch.float64, device=q.device)
    local[0] = (q * q).sum(dim=0)
    for row, name in enumerate(names, start=1):
        for s in blocks[name]:
            local[row] += terms[s].sum(dim=0)
    totals = space.all_reduce(local)  # one collective for all blocks
    weight = n / totals[0]
    return {name: (weight * totals[row]).cpu() for row, name in enumerate(names, start=1)}


def block_traces(
    probes: Tensor,
    products: Tensor,
    blocks: Mapping[str, Sequence[slice]],
    *,
    space: VectorSpace = LOCAL_SPACE,
) -> dict[str, TraceEstimate]:
    """Per-block trace estimates (mean and standard error of :func:`block_trace_samples`).

    ``num_hvps`` is 0: the products are the full trace's.
    """
    out: dict[str, TraceEstimate] = {}
    for name, samples in block_trace_samples(probes, products, blocks, space=space).items():
        m = samples.numel()
        stderr = float(samples.std() / math.sqrt(m)) if m > 1 else math.nan
        out[name] = TraceEstimate(
            value=float(samples.mean()), stderr=stderr, num_probes=m, num_hvps=0, method="hutchinson", samples=samples
        )
    return out
