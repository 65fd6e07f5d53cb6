"""Shared test fixtures' building blocks: digits data, tiny models, exact Hessians.

Also imported by ``benchmarks/`` (which put the repository root on ``sys.path``).
"""

from __future__ import annotations

import copy
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@cache
def digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits (1,797 8x8 images), pixels scaled to [0, 1], float32."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def analysis_batches(fraction: float = 0.1, seed: int = 42, batch_size: int = 64, images: bool = False):
    """A seeded ``fraction`` of the digits data as a list of ``(inputs, targets)`` batches."""
    x, y = digits_tensors()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=g)[: round(fraction * x.shape[0])]
    xs, ys = x[idx], y[idx]
    if images:
        xs = xs.reshape(-1, 1, 8, 8)
    return [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, xs.shape[0], batch_size)]


def digits_mlp(seed: int = 0, hidden: int = 64) -> nn.Module:
    """The 64-64-10 MLP (4,810 parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def small_cnn(seed: int = 0) -> nn.Module:
    """A small CNN with BatchNorm for 1x8x8 digits."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def train(model: nn.Module, steps: int = 300, lr: float = 1e-2, images: bool = False, seed: int = 0) -> nn.Module:
    """Full-batch Adam on the digits data (deterministic)."""
    x, y = digits_tensors()
    if images:
        x = x.reshape(-1, 1, 8, 8)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model


@cache
def trained_digits_mlp() -> nn.Module:
    return train(digits_mlp(0), steps=200)


def exact_hessian(model: nn.Module, batches, train_mode_batchnorm: bool = False) -> Tensor:
    """Exact float64 Hessian (``torch.func.hessian``) of the size-weighted mean cross-entropy."""
    m64 = copy.deepcopy(model).double()
    m64.eval()
    if train_mode_batchnorm:
        for mod in m64.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.train()
                mod.track_running_stats = False
    named = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    total = sum(int(b[0].shape[0]) for b in batches)

    def loss(flat: Tensor) -> Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            params[name] = flat[offset : offset + size].view(shape)
            offset += size
        out = 0.0
        for xb, yb in batches:
            logits = torch.func.functional_call(m64, params, (xb.double(),))
            out = out + F.cross_entropy(logits, yb) * (xb.shape[0] / total)
        return out

    if train_mode_batchnorm:
        # torch.func.hessian (jacfwd over jacrev) is silently wrong, by several per cent, through
        # a training-mode BatchNorm: the vmapped batch_norm backward is mis-differentiated (a
        # pytorch/pytorch#196699-style forward-AD bug). Forward over *grad* agrees with plain
        # double backward to ~1e-15 (tests/test_operator.py checks this).
        return torch.func.jacfwd(torch.func.grad(loss))(flat0).detach()
    return torch.func.hessian(loss)(flat0).detach()
