r"""Sampled directions :math:`\hat v_i = P u_i / \|P u_i\|` with :math:`u_i` uniform on the sphere.

Direction ``i`` is drawn from its own generator seeded with ``base + i``, so it depends only on
the seed and ``i`` (not on how directions are grouped), and the same ``u_i`` can be shared by
several preconditioners (``preconditioner_eps="auto"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_hessian._utils.random import make_generator
from lightning_hessian.operators.space import LOCAL_SPACE, VectorSpace

__all__ = ["DirectionGroup", "direction_seeds", "draw_directions"]


def direction_seeds(
    seed: int | torch.Generator | None, all_reduce: Callable[[Tensor], Tensor] | None, device: torch.device
) -> tuple[int, torch.Generator]:
    """Base seed of the directions (direction i uses base + i) and a generator for the probes."""
    generator = make_generator(seed)
    base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    if seed is None and all_reduce is not None:
        # Every process drew its own seed; their sum is the same everywhere.
        total = all_reduce(torch.tensor([float(base)], dtype=torch.float64, device=device))
        base = int(total.reshape(-1)[0].item()) % (2**31 - 1)
    aux = torch.Generator(device="cpu")
    aux.manual_seed(base + 7919)
    return base, aux


@dataclass
class DirectionGroup:
    """A group of unit directions and their importance corrections.

    Attributes:
        unit: float64 ``[J, n]`` unit vectors :math:`\\hat v_i`.
        log_norms: float64 ``[J]`` :math:`\\log\\|P u_i\\|` on the CPU.
    """

    unit: Tensor
    log_norms: Tensor


def draw_directions(
    base_seed: int,
    start: int,
    count: int,
    n: int,
    log_p: Tensor | None,
    device: torch.device,
    space: VectorSpace = LOCAL_SPACE,
) -> DirectionGroup:
    """Directions ``start .. start+count-1``: ``u_i`` uniform, ``v_i = P u_i`` (``P = exp(log_p)``).

    ``space`` draws the Gaussian vectors (a sharded space draws this process's rows).
    """
    z = torch.cat(
        [space.probes(n, 1, "gaussian", make_generator(base_seed + start + j), device=device).t() for j in range(count)]
    )  # [J, n] float64
    log_z_norm = torch.log(z.norm(dim=1))
    shift = float(log_p.max()) if log_p is not None else 0.0
    v = z if log_p is None else z * torch.exp(log_p - shift)
    v_norm = v.norm(dim=1)
    log_v_norm = torch.log(v_norm) + shift - log_z_norm  # log ||P u||, u = z/||z||
    return DirectionGroup(v / v_norm.unsqueeze(1), log_v_norm.cpu())
