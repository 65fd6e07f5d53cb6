r"""The vector space of parameters sharded across processes (FSDP2), and its probes.

A vector of a sharded operator is the concatenation, in parameter order, of every process's
*local slice* of every parameter: with FSDP2 (``torch.distributed.fsdp.fully_shard``, placement
``Shard(0)``), parameter :math:`i` of :math:`n_i` numbers holds on each process a contiguous range
:math:`[a_i, b_i)` of its row-major flattening. Inner products are local partial sums followed by
one all-reduce of the (few) float64 scalars, so no process ever holds a full-size vector.

**Probes independent of the number of processes.** Probe entries are drawn per parameter, in
fixed blocks of :data:`PROBE_BLOCK` consecutive entries, each block from its own
``torch.Generator`` seeded by a hash of (base seed, parameter index, block index); the base seed
is one draw from the caller's generator. A process draws only the blocks that overlap its
ranges and slices them, so the *global* probe is the same for 1, 2 or 64 processes, and the same
as that of an unsharded model whose space is :func:`parameter_space` (every range whole). This is
what makes an FSDP2 run and a single-process run with the same seed analyse the same probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_hessian._utils.random import ProbeKind
from lightning_hessian.operators.space import _chunked_column_dots, _chunked_gram

__all__ = ["PROBE_BLOCK", "ParameterRange", "ShardedSpace", "parameter_space"]

#: Entries of one seeded probe block (a process draws at most this many numbers it does not keep per range end).
PROBE_BLOCK = 1 << 16

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def block_seed(base: int, parameter: int, block: int) -> int:
    """Seed of probe block ``block`` of parameter ``parameter`` (a 63-bit SplitMix64 hash)."""
    return _splitmix64(_splitmix64(_splitmix64(base) ^ parameter) ^ block) & ((1 << 63) - 1)


@dataclass(frozen=True)
class ParameterRange:
    """The entries ``[start, stop)`` of a parameter of ``numel`` entries that this process holds."""

    numel: int
    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop <= self.numel:
            raise ValueError(f"Invalid parameter range [{self.start}, {self.stop}) of {self.numel} entries.")

    @property
    def size(self) -> int:
        return self.stop - self.start


def _draw_block(kind: ProbeKind, generator: torch.Generator, num_probes: int, length: int) -> Tensor:
    if kind == "rademacher":
        bits = torch.randint(0, 2, (num_probes, length), generator=generator, dtype=torch.int8)
        return bits.to(torch.float64).mul_(2).sub_(1)
    if kind == "gaussian":
        return torch.randn((num_probes, length), generator=generator, dtype=torch.float64)
    raise ValueError(f"`probe` must be 'rademacher' or 'gaussian', got {kind!r}.")


def draw_parameter_probes(ranges: Sequence[ParameterRange], num_probes: int, kind: ProbeKind, base_seed: int) -> Tensor:
    """``[sum of range sizes, num_probes]`` float64: the local rows of per-parameter blocked probes."""
    pieces: list[Tensor] = []
    for index, rng in enumerate(ranges):
        if rng.size == 0:
            continue
        for block in range(rng.start // PROBE_BLOCK, (rng.stop - 1) // PROBE_BLOCK + 1):
            lo = block * PROBE_BLOCK
            length = min(PROBE_BLOCK, rng.numel - lo)
            generator = torch.Generator(device="cpu").manual_seed(block_seed(base_seed, index, block))
            values = _draw_block(kind, generator, num_probes, length)
            pieces.append(values[:, max(rng.start, lo) - lo : min(rng.stop, lo + length) - lo])
    if not pieces:
        return torch.zeros((0, num_probes), dtype=torch.float64)
    return torch.cat(pieces, dim=1).t().contiguous()


class ShardedSpace:
    """:class:`~lightning_hessian.operators.space.VectorSpace` of per-parameter local ranges.

    Args:
        ranges: Per trainable parameter (in the operator's order), the entries this process holds.
        group: The process group the parameters are sharded over (``None``: one process, or
            every process holds whole parameters; reductions are then the identity).

    Every method is collective when ``group`` is set: all processes of the group call it in the
    same order.
    """

    def __init__(self, ranges: Sequence[ParameterRange], group: Any = None) -> None:
        self.ranges = tuple(ranges)
        self.group = group
        self.local_size = sum(r.size for r in self.ranges)
        self.global_size = sum(r.numel for r in self.ranges)

    def all_reduce(self, values: Tensor) -> Tensor:
        if self.group is None:
            return values
        import torch.distributed as dist

        out = values.to(torch.float64).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        return self.all_reduce(_chunked_gram(a, b))

    def column_dots(self, a: Tensor, b: Tensor) -> Tensor:
        return self.all_reduce(_chunked_column_dots(a, b))

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
        if num_params != self.local_size:
            raise ValueError(
                f"This space's vectors have {self.local_size} local entries, probes of {num_params} were asked for."
            )
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"`probe` must be 'rademacher' or 'gaussian', got {kind!r}.")
        base = int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))
        return draw_parameter_probes(self.ranges, num_probes, kind, base).to(device=device, dtype=dtype)

    def restricted(self, indices: Sequence[int]) -> ShardedSpace:
        """The space of the parameters ``indices`` only (a diagonal block), with their own probe streams.

        Probe streams are keyed by the parameter's index here, so a block draws different (still
        world-size independent) probes than the same parameters inside the whole space.
        """
        return ShardedSpace([self.ranges[i] for i in indices], self.group)

    def __repr__(self) -> str:
        where = "sharded" if self.group is not None else "whole"
        return f"ShardedSpace({len(self.ranges)} parameters, {self.local_size}/{self.global_size} entries, {where})"


def parameter_space(tensors: Sequence[Tensor]) -> ShardedSpace:
    """The per-parameter space of whole (unsharded) tensors: the probes an FSDP2 run of the same model draws.

    Set it as an operator's ``vector_space`` (``HessianOperator(..., vector_space=parameter_space(
    op.parameters()))`` or the monitors, which always do) so that a single-process analysis
    draws exactly the probes of a :class:`~lightning_hessian.operators.sharded.ShardedHessianOperator`
    on the same model, whatever the number of processes.
    """
    return ShardedSpace([ParameterRange(t.numel(), 0, t.numel()) for t in tensors])
