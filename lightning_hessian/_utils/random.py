"""Seeded random probes that never touch torch's global RNG."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

ProbeKind = Literal["rademacher", "gaussian"]

__all__ = ["ProbeKind", "draw_probes", "make_generator"]


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU ``torch.Generator`` from a seed, or the generator itself.

    ``None`` draws a seed from Python's ``random``-free OS entropy via a fresh generator, so the
    global torch RNG is never consumed.
    """
    if isinstance(seed, torch.Generator):
        return seed
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, a torch.Generator or None, got {type(seed).__name__}.")
        generator.manual_seed(seed)
    return generator


def draw_probes(
    num_params: int,
    num_probes: int,
    kind: ProbeKind,
    generator: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``[num_params, num_probes]`` probes with ``E[v v^T] = I``.

    Drawn on the CPU from ``generator`` (identical on every device and every process given the
    same seed), then moved to ``device``.
    """
    if kind == "rademacher":
        bits = torch.randint(0, 2, (num_probes, num_params), generator=generator, dtype=torch.int8)
        probes = bits.to(dtype).mul_(2).sub_(1)
    elif kind == "gaussian":
        probes = torch.randn((num_probes, num_params), generator=generator, dtype=torch.float64).to(dtype)
    else:
        raise ValueError(f"`probe` must be 'rademacher' or 'gaussian', got {kind!r}.")
    return probes.t().contiguous().to(device)
