"""Session fixtures for the functional-core tests: the trained digits MLP, its exact Hessian and
spectrum (computed once: ~10 s + ~5 s), and a small BatchNorm CNN with its exact Hessians.

Everything here is *truth* computed independently of ``lightning_hessian`` (``torch.func`` on a
float64 copy of the model, LAPACK/ARPACK through SciPy), never by the code under test.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.helpers import analysis_batches, exact_hessian, small_cnn, trained_digits_mlp


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: intra-op threads only add spin-wait overhead
    (measured: a single HVP of the digits MLP takes 12 ms with one thread, 750 ms with two
    under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    with one_thread():
        yield


# --------------------------------------------------------------------------------------------
# The trained digits MLP (4,810 parameters) on the 10 % analysis set (3 batches: 64, 64, 52)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPTruth:
    model: nn.Module
    batches: list
    hessian: Tensor  # exact float64 Hessian [n, n]
    eigvals: Tensor  # all eigenvalues, ascending (float64)
    top_vectors: Tensor  # [n, 3] exact eigenvectors of the three largest eigenvalues, descending

    @property
    def num_params(self) -> int:
        return self.hessian.shape[0]

    @property
    def trace(self) -> float:
        return float(self.hessian.diagonal().sum())


@pytest.fixture(scope="session")
def mlp_truth() -> MLPTruth:
    import scipy.sparse.linalg
    from threadpoolctl import threadpool_limits

    with one_thread(), threadpool_limits(1):
        model = trained_digits_mlp()
        batches = analysis_batches()
        hessian = exact_hessian(model, batches)
        # symmetric to the last bit, and row-major: torch.func.hessian returns a transposed
        # layout, with which a narrow matmul is ~6x slower
        hessian = (0.5 * (hessian + hessian.T)).contiguous()
        # A parameter that never influences the loss here (a first-layer weight of a pixel that is
        # 0 in every analysis image, a weight of a dead ReLU unit) has an exactly zero row and
        # column: it contributes an exact eigenvalue 0, and the rest of the spectrum is that of
        # the remaining block. 1,559 of the 4,810 rows are zero, which makes the
        # eigendecomposition 4-5 times cheaper.
        zero = (hessian == 0).all(dim=1)
        block = hessian[~zero][:, ~zero]
        eigvals = torch.cat([torch.linalg.eigvalsh(block), torch.zeros(int(zero.sum()), dtype=torch.float64)])
        eigvals = eigvals.sort().values
        h = hessian.numpy()
        vals, vecs = scipy.sparse.linalg.eigsh(h, k=3, which="LA", tol=1e-13, v0=np.ones(h.shape[0]))
    order = np.argsort(vals)[::-1]
    # two independent eigensolvers (LAPACK on the block, ARPACK on the whole matrix) agree
    assert np.allclose(vals[order], eigvals[-3:].numpy()[::-1], rtol=1e-10, atol=0)
    return MLPTruth(
        model=model,
        batches=batches,
        hessian=hessian,
        eigvals=eigvals,
        top_vectors=torch.from_numpy(np.ascontiguousarray(vecs[:, order])),
    )


@pytest.fixture(scope="session")
def mlp_op64(mlp_truth):
    """The digits MLP and its analysis batches in float64: the very function whose Hessian
    ``mlp_truth`` holds, without the ~1e-6 noise floor of float32 HVPs."""
    from lightning_hessian.operators import HessianOperator

    model = copy.deepcopy(mlp_truth.model).double()
    return HessianOperator(model, F.cross_entropy, [(x.double(), y) for x, y in mlp_truth.batches])


# --------------------------------------------------------------------------------------------
# A small CNN with BatchNorm (374 parameters), non-trivial running statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CNNTruth:
    model: nn.Module
    batches: list  # 18 images in uneven batches 8, 8, 2
    hessian_eval: Tensor
    hessian_train_bn: Tensor


@pytest.fixture(scope="session")
def cnn_truth() -> CNNTruth:
    with one_thread():
        model = small_cnn(0)
        # Running statistics far from their (0, 1) initial values, so that eval mode and
        # batch-statistics mode give clearly different Hessians.
        images = analysis_batches(fraction=0.3, seed=7, batch_size=1000, images=True)[0][0]
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(images * 3.0 + 0.5)
        model.eval()
        batches = analysis_batches(fraction=0.01, batch_size=8, images=True)
        assert [int(x.shape[0]) for x, _ in batches] == [8, 8, 2]
        h_eval = exact_hessian(model, batches).contiguous()
        h_train = exact_hessian(model, batches, train_mode_batchnorm=True).contiguous()
    return CNNTruth(model=model, batches=batches, hessian_eval=h_eval, hessian_train_bn=h_train)
