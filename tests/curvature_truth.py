"""Exact float64 curvature matrices of tiny models, for the block / GGN / preconditioned tests.

Truth is computed by double backward (``torch.autograd.functional.hessian``) and explicit
Jacobians (``torch.autograd.functional.jacobian``), independently of the operators under test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_double(x: Tensor) -> Tensor:
    return x.double() if torch.is_floating_point(x) else x


def _flat_params(model: nn.Module) -> tuple[list[str], list[torch.Size], Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p.shape for _, p in named], torch.cat([p.detach().reshape(-1) for _, p in named])


def _unflat(names: list[str], shapes: list[torch.Size], flat: Tensor) -> dict[str, Tensor]:
    params, offset = {}, 0
    for name, shape in zip(names, shapes, strict=True):
        params[name] = flat[offset : offset + shape.numel()].view(shape)
        offset += shape.numel()
    return params


def exact_loss_hessian(
    model: nn.Module, loss_fn: Callable[[Tensor, Any], Tensor], batches: Sequence[tuple[Tensor, Any]]
) -> Tensor:
    """Float64 Hessian of the size-weighted mean loss by double backward; checked symmetric."""
    m64 = copy.deepcopy(model).double().eval()
    names, shapes, flat0 = _flat_params(m64)
    total = sum(int(x.shape[0]) for x, _ in batches)

    def loss(flat: Tensor) -> Tensor:
        params = _unflat(names, shapes, flat)
        out = flat.new_zeros(())
        for x, y in batches:
            y = y.double() if torch.is_floating_point(y) else y
            out = out + loss_fn(torch.func.functional_call(m64, params, (_as_double(x),)), y) * (x.shape[0] / total)
        return out

    hess = torch.autograd.functional.hessian(loss, flat0)
    assert torch.allclose(hess, hess.T, atol=1e-12, rtol=0), "exact Hessian is not symmetric"
    return hess


def exact_jacobians(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs ``f(x)`` and the Jacobian ``[*outputs.shape, num_params]`` (float64)."""
    m64 = copy.deepcopy(model).double().eval()
    names, shapes, flat0 = _flat_params(m64)

    def outputs(flat: Tensor) -> Tensor:
        return torch.func.functional_call(m64, _unflat(names, shapes, flat), (_as_double(x),))

    return outputs(flat0).detach(), torch.autograd.functional.jacobian(outputs, flat0)


def exact_ce_ggn(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], *, class_dim: int = -1, ignore_index: int = -100
) -> Tensor:
    r"""``sum_b |b|/N J_b^T H_b J_b`` with ``H_b`` built entry by entry from ``diag p - p p^T / N_valid``."""
    total = sum(int(x.shape[0]) for x, _ in batches)
    ggn = None
    for x, y in batches:
        out, jac = exact_jacobians(model, x)
        c = out.shape[class_dim]
        logits = out.movedim(class_dim, -1).reshape(-1, c)
        jac = jac.movedim(class_dim if class_dim >= 0 else out.ndim + class_dim, out.ndim - 1).reshape(
            -1, c, jac.shape[-1]
        )
        targets = y.reshape(-1)
        valid = targets != ignore_index
        num_valid = int(valid.sum())
        part = torch.zeros(jac.shape[-1], jac.shape[-1], dtype=torch.float64)
        for pos in range(logits.shape[0]):
            if not valid[pos]:
                continue
            p = torch.softmax(logits[pos], dim=0)
            h = torch.diag(p) - torch.outer(p, p)
            part += jac[pos].T @ h @ jac[pos]
        part = part / num_valid * (x.shape[0] / total)
        ggn = part if ggn is None else ggn + part
    assert ggn is not None
    return ggn


def identity_products(op: Any) -> Tensor:
    """The operator as an explicit float64 matrix (``n`` products)."""
    return op.matmat(torch.eye(op.num_params, dtype=torch.float64)).to(torch.float64)


def tanh_mlp(seed: int = 0, sizes: tuple[int, ...] = (5, 6, 3), layernorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(sizes[0], sizes[1])]
    if layernorm:
        layers.append(nn.LayerNorm(sizes[1]))
    layers += [nn.Tanh(), nn.Linear(sizes[1], sizes[2])]
    return nn.Sequential(*layers).double()


def classification_batches(seed: int = 1, sizes: tuple[int, ...] = (13, 7), dim: int = 5, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, dim, generator=g, dtype=torch.float64), torch.randint(0, classes, (b,), generator=g))
        for b in sizes
    ]


ce = F.cross_entropy
