"""Building blocks of ``tests/test_sharded.py``: 2-process CPU (gloo) FSDP2 runs whose results land in files.

``python -m tests.fsdp_helpers <scenario> <out_dir> [world_size]`` spawns the processes (a free
port, gloo), runs the scenario on every rank and writes ``<out_dir>/rank<r>.pt``; the test runs
it in a subprocess with a wall-clock timeout, so a deadlock fails instead of hanging.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
NUM_SAMPLES = 13  # uneven shards (7 / 6) of uneven micro-batches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def tiny_data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(NUM_SAMPLES, 6, generator=g, dtype=dtype), torch.randint(0, 3, (NUM_SAMPLES,), generator=g)


def shard_batches(rank: int, world_size: int, batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's contiguous share of the samples, in micro-batches of ``batch_size``."""
    x, y = tiny_data()
    bounds = [round(i * NUM_SAMPLES / world_size) for i in range(world_size + 1)]
    xs, ys = x[bounds[rank] : bounds[rank + 1]], y[bounds[rank] : bounds[rank + 1]]
    return [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, xs.shape[0], batch_size)]


def sharded(model: nn.Module, world_size: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def global_vectors(num: int) -> torch.Tensor:
    n = sum(p.numel() for p in tiny_mlp().parameters())
    return torch.randn(n, num, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def functional(rank: int, world_size: int) -> dict[str, Any]:
    """ShardedHessianOperator products, probes, estimators; HessianOperator's error on the same module."""
    from lightning_hessian import HessianOperator
    from lightning_hessian.operators.sharded import ShardedHessianOperator

    model = sharded(tiny_mlp(), world_size)
    data = shard_batches(rank, world_size)
    loss_fn = nn.functional.cross_entropy
    record: dict[str, Any] = {}
    try:
        HessianOperator(model, loss_fn, data)
        record["hessian_operator_error"] = None
    except TypeError as err:
        record["hessian_operator_error"] = str(err)
    op = ShardedHessianOperator(model, loss_fn, data)
    before = [t.clone() for t in op.local_parameters()]
    record["ranges"] = [(r.numel, r.start, r.stop) for r in op.vector_space.ranges]
    record["num_params"] = op.num_params
    record["global_num_params"] = op.global_num_params
    record["loss"] = op.loss()
    record["products"] = op.matmat(op.local_rows(global_vectors(3)))
    record["restored"] = all(torch.equal(a, b) for a, b in zip(before, op.local_parameters(), strict=True))
    record["grads_untouched"] = all(p.grad is None for p in op.parameters())
    record["probes"] = op.vector_space.probes(op.num_params, 2, "rademacher", torch.Generator().manual_seed(3))
    record["gradient"] = op.gradient()
    if os.environ.get("FSDP_ESTIMATORS", "1") == "1":
        record.update(estimators(op))
    record.update(volumes(model, data))
    return record


VOLUME_OPTIONS: dict[str, Any] = dict(num_directions=16, prior_std=0.5, seed=5)


def adam_with_state(model: nn.Module) -> torch.optim.Adam:
    """Adam whose state (step 3, a known exp_avg_sq) is the same for the sharded and the plain model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    reference = tiny_mlp()
    for i, (p, q) in enumerate(zip(model.parameters(), reference.parameters(), strict=True)):
        square = (q.detach() * (i + 1)) ** 2 + 1e-4
        if isinstance(p, DTensor):
            square = distribute_tensor(square, p.device_mesh, p.placements)
        optimizer.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": square}
    return optimizer


def volumes(model: nn.Module, data: list[Any]) -> dict[str, Any]:
    from lightning_hessian.volume.sharded import sharded_local_volume

    before = [p.to_local().clone() if hasattr(p, "to_local") else p.detach().clone() for p in model.parameters()]
    plain = sharded_local_volume(model, data, **VOLUME_OPTIONS)
    adam = sharded_local_volume(model, data, preconditioner="adam", optimizer=adam_with_state(model), **VOLUME_OPTIONS)
    after = [p.to_local() if hasattr(p, "to_local") else p.detach() for p in model.parameters()]
    return {
        "volume": plain.metrics(),
        "volume_adam": adam.metrics(),
        "volume_log_radii": plain.log_radii,
        "volume_restored": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
    }


def assemble(records: list[dict[str, Any]], key: str) -> torch.Tensor:
    """The global (parameter-order) rows of a per-rank sharded result ``records[r][key]``."""
    numels = [numel for numel, _, _ in records[0]["ranges"]]
    out = torch.zeros((sum(numels), *records[0][key].shape[1:]), dtype=records[0][key].dtype)
    for record in records:
        row, offset = 0, 0
        for numel, start, stop in record["ranges"]:
            out[offset + start : offset + stop] = record[key][row : row + stop - start]
            row, offset = row + stop - start, offset + numel
    return out


def estimators(op: Any) -> dict[str, Any]:
    from lightning_hessian import hessian_trace, top_eigenvalues

    top = top_eigenvalues(op, k=1, seed=0, return_vectors=False)
    trace = hessian_trace(op, num_probes=4, seed=0)
    return {"top_eigenvalue": float(top.values[0]), "trace": float(trace.value)}


# --------------------------------------------------------------------------------------------
# Lightning: ModelParallelStrategy + fully_shard in configure_model
# --------------------------------------------------------------------------------------------


def _shard_in_configure_model(module: Any) -> None:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(module, FSDPModule):
        return
    mesh = module.device_mesh["data_parallel"]
    for layer in module.net:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)


MODULE_OPTIONS: dict[str, Any] = dict(hidden=16, dropout=0.2, optimizer="adam", lr=0.03)


def smooth_digits_module(**kwargs: Any) -> Any:
    """The DDP tests' digits MLP with tanh instead of ReLU, unsharded (the single-process reference).

    A smooth activation: central differences of a ReLU network's gradients cross the kinks that
    the exact (almost-everywhere) Hessian ignores, so the two do not converge to each other.
    """
    from tests.ddp_helpers import RankPoisonedModule

    module = RankPoisonedModule(**{"poison_epoch": -1, **MODULE_OPTIONS, **kwargs})
    module.net[1] = nn.Tanh()
    return module


def sharded_digits_module(**kwargs: Any) -> Any:
    """:func:`smooth_digits_module` whose ``configure_model`` applies ``fully_shard`` (per layer, then the root)."""
    from tests.ddp_helpers import RankPoisonedModule

    class ShardedDigits(RankPoisonedModule):
        def configure_model(self) -> None:
            _shard_in_configure_model(self)

    module = ShardedDigits(**{"poison_rank": 1, "poison_epoch": -1, **MODULE_OPTIONS, **kwargs})
    module.net[1] = nn.Tanh()
    return module


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _full(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_full(v) for v in value]
    return value


def full_recording_callback(out_dir: Any) -> Any:
    from tests.ddp_helpers import RecordingCallback

    class FullRecording(RecordingCallback):
        """Records whole (all-gathered) weights and optimizer state: comparable with one process."""

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.weights.append(_full(dict(pl_module.state_dict())))
            self.optimizer_states.append(_full(trainer.optimizers[0].state_dict()))

    return FullRecording(out_dir)


FSDP_EPOCHS = 2


def fsdp_hessian_monitor(**kwargs: Any) -> Any:
    from lightning_hessian.callbacks import HessianMonitor
    from tests.ddp_helpers import ANALYSIS_BATCH_SIZE, ANALYSIS_FRACTION

    options: dict[str, Any] = dict(
        num_runs=2,
        num_steps=10,
        top_k=2,
        analysis_fraction=ANALYSIS_FRACTION,
        analysis_batch_size=ANALYSIS_BATCH_SIZE,
        log_density=False,
    )
    return HessianMonitor(**{**options, **kwargs})


def fsdp_volume_monitor(**kwargs: Any) -> Any:
    from lightning_hessian.callbacks import LocalVolumeMonitor
    from tests.ddp_helpers import ANALYSIS_BATCH_SIZE, ANALYSIS_FRACTION

    options: dict[str, Any] = dict(
        num_directions=8, analysis_fraction=ANALYSIS_FRACTION, analysis_batch_size=ANALYSIS_BATCH_SIZE
    )
    return LocalVolumeMonitor(**{**options, **kwargs})


def fsdp_fit(out_dir: Path, monitors: list[Any], epochs: int = FSDP_EPOCHS, **module_kwargs: Any) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tests.ddp_helpers import digits_train_loader
    from tests.lightning_helpers import trainer_kwargs

    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    module = sharded_digits_module(**module_kwargs)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=COLLECTIVE_TIMEOUT)
    trainer = pl.Trainer(
        callbacks=[*monitors, full_recording_callback(out_dir)],
        strategy=strategy,
        **trainer_kwargs(devices=2, max_epochs=epochs),
    )
    trainer.fit(module, digits_train_loader())
    trainer.strategy.barrier()


def lightning_scenarios(out_dir: str) -> None:
    """Under ModelParallelStrategy (Lightning re-launches this command for rank 1), in turn."""
    out = Path(out_dir)
    fsdp_fit(out / "with_callbacks", [fsdp_hessian_monitor(), fsdp_volume_monitor()])
    fsdp_fit(out / "without_callbacks", [])
    # rank 1 only: NaN analysis outputs at epoch 1, an exception in its analysis forward at epoch 2
    fsdp_fit(
        out / "failure_on_rank_1",
        [fsdp_hessian_monitor(), fsdp_volume_monitor()],
        epochs=3,
        poison_epoch=1,
        raise_epoch=2,
    )


SCENARIOS = {"functional": functional}


def _worker(rank: int, world_size: int, port: int, scenario: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    try:
        record = SCENARIOS[scenario](rank, world_size)
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run(scenario: str, out_dir: str, world_size: int = 2) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world_size, free_port(), scenario, out_dir), nprocs=world_size)


if __name__ == "__main__":
    if sys.argv[1] == "lightning":
        lightning_scenarios(sys.argv[2])
    else:
        run(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
