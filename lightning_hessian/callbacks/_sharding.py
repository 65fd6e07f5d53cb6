"""The monitors under FSDP2 (``ModelParallelStrategy`` + ``fully_shard``): detection, checks, operators.

No math here: :class:`~lightning_hessian.operators.sharded.ShardedHessianOperator` computes, and
:mod:`lightning_hessian.operators.sharded_space` draws the probes. A model is *sharded* when its
trainable parameters are ``DTensor`` s (FSDP2 applied in ``configure_model``); only then do the
monitors take the sharded path. Options the sharded path does not implement are refused before
the first training step (the dry run), naming the option.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_hessian.operators.sharded import ShardedHessianOperator, dtensor_parameters
from lightning_hessian.operators.sharded_space import parameter_space

__all__ = ["SHARDED_PATH", "is_sharded", "sharded_hessian_operator", "sharded_options_error", "with_parameter_space"]

SHARDED_PATH = (
    "Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)) with "
    "torch.distributed.fsdp.fully_shard applied in LightningModule.configure_model (FSDP2)"
)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether the trainable parameters are DTensors (FSDP2 / tensor parallel)."""
    return bool(dtensor_parameters(module))


def with_parameter_space(op: Any) -> Any:
    """Give an unsharded operator the per-parameter probes an FSDP2 run draws (same seed, same probes)."""
    op.vector_space = parameter_space(op.parameters())
    return op


def sharded_options_error(monitor: str, options: dict[str, Any]) -> ValueError | None:
    """The error for options the sharded path lacks (``{argument: value}`` of the set ones), or ``None``."""
    if not options:
        return None
    shown = ", ".join(f"{name}={value!r}" for name, value in options.items())
    return ValueError(
        f"{monitor}({shown}) is not supported on FSDP2-sharded parameters (fully_shard): the sharded analysis "
        "computes Hessian-vector products by finite differences of the sharded gradients, with the default "
        "options only. Remove these arguments (or train with strategy='ddp')."
    )


def sharded_hessian_operator(pl_module: torch.nn.Module, data: Any, **kwargs: Any) -> ShardedHessianOperator:
    """A :class:`ShardedHessianOperator` over this process's analysis batches, its mesh checked (all processes).

    Raises:
        ValueError: The parameters are not sharded over all processes (tensor parallel, HSDP).
    """
    import torch.distributed as dist

    op = ShardedHessianOperator(pl_module, data=data, **kwargs)
    world_size = dist.get_world_size()
    if op.world_size != world_size:
        raise ValueError(
            f"The parameters are sharded over {op.world_size} of the {world_size} processes "
            f"(tensor_parallel_size > 1 or HSDP); the monitors support data-parallel FSDP2 only: {SHARDED_PATH}."
        )
    return op
