"""HessianMonitor and LocalVolumeMonitor under DDP: 2 CPU processes, gloo.

Two launches serve every DDP test (each costs two fresh Python processes, the bulk of the time):

* ``spawn_records``: ``DDPStrategy(start_method="spawn")`` (= ``strategy="ddp_spawn"``) with both
  monitors, 2 epochs; every rank writes its histories, logged metrics and per-epoch weights and
  optimizer state (:mod:`tests.ddp_helpers`). The values are recomputed in this process, single
  process, on the same global analysis set and the same weights.
* ``ddp_scenarios``: ``python -m tests.ddp_helpers`` in a subprocess with a wall-clock timeout,
  under ``strategy="ddp"`` (Lightning re-launches the command for rank 1), running in turn: both
  monitors, no monitor (bit-identical weights), a NaN on rank 1 only, a forced sharp drop with
  ``stop_on_sharp_drop=True``, a one-sample analysis set (rank 1's shard is empty). Every collective also times out
  after 60 s (``DDPStrategy(timeout=...)``), so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from lightning_hessian import HessianOperator, local_volume, spectral_density
from lightning_hessian.callbacks import HessianMonitor, default_classification_loss
from lightning_hessian.callbacks._analysis_set import AnalysisSet
from lightning_hessian.operators.sharded_space import parameter_space
from tests.ddp_helpers import (
    ANALYSIS_FRACTION,
    DROP_EPOCH,
    NUM_SAMPLES,
    ROOT,
    SCENARIO_EPOCHS,
    digits_module,
    fit,
    hessian_monitor,
    load_records,
    sharp_drop_monitor,
    volume_monitor,
)
from tests.lightning_helpers import digits_dataset

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)

REL_TOL = 1e-5
SCENARIOS_TIMEOUT_S = 480
HESSIAN_METRICS = (
    "trace",
    "trace_stderr",
    "top_eigenvalue",
    "top_eigenvalue_2",
    "min_eigenvalue",
    "negative_mass",
)
VOLUME_METRICS = (
    "log_volume",
    "log10_probability",
    "description_length_bits",
    "log_radius_mean",
    "log_radius_std",
    "log_contribution_std",
    "num_capped",
    "num_unconverged",
    "num_forward_passes",
)
# Timings differ from rank to rank; everything else must be identical.
PER_RANK_KEYS = ("seconds", "overhead")


# --------------------------------------------------------------------------------------------
# Launches
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spawn_records(tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp_spawn")
    records = fit(out, [hessian_monitor(), volume_monitor()], digits_module, start_method="spawn", max_epochs=2)
    assert [r["world_size"] for r in records] == [2, 2]
    assert [r["strategy"] for r in records] == ["DDPStrategy", "DDPStrategy"]
    return records


@pytest.fixture(scope="module")
def ddp_scenarios(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp_popen")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ddp_helpers", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: rank 1 is killed with it on a timeout
    )
    try:
        output, _ = proc.communicate(timeout=SCENARIOS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"The DDP scenarios did not finish within {SCENARIOS_TIMEOUT_S} s (deadlock?):\n{output[-6000:]}")
    assert proc.returncode == 0, output[-6000:]
    records = {name: load_records(out / name, 2) for name in SCENARIO_EPOCHS}
    for name, ranks in records.items():
        assert [r["rank"] for r in ranks] == [0, 1], name
        assert all(r["world_size"] == 2 and r["strategy"] == "DDPStrategy" for r in ranks), name
    return {"records": records, "output": output}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _assert_ranks_identical(records: list[dict[str, Any]], monitor: str) -> None:
    """Histories and logged metrics are the same on every rank (bit for bit, timings aside)."""
    first, *others = records
    for other in others:
        assert len(other["histories"][monitor]) == len(first["histories"][monitor])
        for row0, row in zip(first["histories"][monitor], other["histories"][monitor], strict=False):
            assert row.keys() == row0.keys()
            for key in row0:
                if key not in PER_RANK_KEYS:
                    assert _same(row[key], row0[key]), (monitor, key, row0[key], row[key])
        assert len(other["logged"]) == len(first["logged"])
        for logged0, logged in zip(first["logged"], other["logged"], strict=False):
            assert logged.keys() == logged0.keys()
            for key in logged0:
                if not key.endswith(PER_RANK_KEYS):
                    assert _same(logged[key], logged0[key]), (key, logged0[key], logged[key])


def _assert_weights_identical(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for epoch, (sa, sb) in enumerate(zip(a, b, strict=False)):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (epoch, key)


def _assert_optimizer_states_identical(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for sa, sb in zip(a, b, strict=False):
        assert sa["state"].keys() == sb["state"].keys()
        for index, state in sa["state"].items():
            for name, value in state.items():
                other = sb["state"][index][name]
                assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def _rel_diff(value: float, reference: float) -> float:
    if value == reference:
        return 0.0
    return abs(value - reference) / max(abs(reference), 1e-300)


def _analysis_loader(indices: list[int]) -> DataLoader:
    """The single-process analysis set: every index, one process, the monitors' batch size."""
    return DataLoader(Subset(digits_dataset(NUM_SAMPLES), indices), batch_size=256, shuffle=False)


def _module_at(record: dict[str, Any], epoch: int):
    model = digits_module()
    model.load_state_dict(record["weights"][epoch])
    return model


def _reference_hessian_values(record: dict[str, Any], epoch: int, monitor: HessianMonitor) -> dict[str, float]:
    model = _module_at(record, epoch)
    op = HessianOperator(
        model,
        default_classification_loss,
        _analysis_loader(record["indices"]["HessianMonitor"]),
        vector_space=parameter_space(list(model.parameters())),  # the monitors' per-parameter probes
    )
    sd = spectral_density(op, num_runs=monitor.num_runs, num_steps=monitor.num_steps, seed=monitor.seed)
    top, _ = sd.top_ritz_values(2)
    bottom, _ = sd.bottom_ritz_values(1)
    return {
        "trace": sd.deflated_trace,
        "trace_stderr": sd.deflated_trace_stderr,
        "top_eigenvalue": float(top[0]),
        "top_eigenvalue_2": float(top[1]),
        "min_eigenvalue": float(bottom[0]),
        "negative_mass": sd.negative_mass,
    }


def _reference_volume_values(record: dict[str, Any], epoch: int, monitor: Any) -> dict[str, float]:
    model = _module_at(record, epoch)
    optimizer = torch.optim.Adam(model.parameters(), lr=model.hparams.lr)
    optimizer.load_state_dict(record["optimizer_states"][epoch])
    est = local_volume(
        model,
        _analysis_loader(record["indices"]["LocalVolumeMonitor"]),
        cost=monitor.cost,
        cutoff=monitor.cutoff,
        num_directions=monitor.num_directions,
        preconditioner=monitor.preconditioner,
        optimizer=optimizer,
        preconditioner_eps=monitor.effective_preconditioner_eps,
        measure=monitor.measure,
        prior_std=record["init_priors"]["LocalVolumeMonitor"],
        rel_tol=monitor.rel_tol,
        seed=monitor.seed,
    )
    return est.metrics()


# --------------------------------------------------------------------------------------------
# No processes needed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_analysis_shards_partition_the_single_process_set(world_size):
    dataset = digits_dataset(NUM_SAMPLES)
    single = AnalysisSet(ANALYSIS_FRACTION, seed=42, batch_size=16, max_samples=None)
    assert single.shard_indices(len(dataset), 0, 1) == single.indices
    reference = single.indices
    assert reference is not None and len(reference) == 101
    shards = []
    for rank in range(world_size):
        analysis = AnalysisSet(ANALYSIS_FRACTION, seed=42, batch_size=16, max_samples=None)
        shard = analysis.shard_indices(len(dataset), rank, world_size)
        assert analysis.indices == reference  # every rank draws the same global set
        shards.append(shard)
    flat = [i for shard in shards for i in shard]
    assert len(flat) == len(set(flat)) == len(reference)  # disjoint
    assert sorted(flat) == sorted(reference)  # union = the single-process set


@pytest.mark.parametrize("strategy_name", ["FSDPStrategy", "DeepSpeedStrategy", "subclass"])
@pytest.mark.parametrize("factory", [hessian_monitor, volume_monitor], ids=["hessian", "volume"])
def test_unsupported_strategies_raise_at_setup(strategy_name, factory):
    import lightning.pytorch.strategies as strategies

    if strategy_name == "subclass":
        strategy_cls: type = type("MyShardedStrategy", (strategies.FSDPStrategy,), {})
        match = r"MyShardedStrategy \(a FSDPStrategy\) strategy"
    else:
        strategy_cls = getattr(strategies, strategy_name)
        match = f"the {strategy_name} strategy"

    class FakeTrainer:
        strategy = strategy_cls.__new__(strategy_cls)
        world_size = 2
        global_rank = 0

    with pytest.raises(RuntimeError, match=match) as info:
        factory().setup(FakeTrainer(), None, "fit")  # type: ignore[arg-type]
    # the supported sharded path is named
    assert "ModelParallelStrategy" in str(info.value) and "fully_shard" in str(info.value)


@pytest.mark.parametrize("strategy_name", ["DDPStrategy", "SingleDeviceStrategy", "ModelParallelStrategy"])
def test_supported_strategies_pass_setup(strategy_name):
    import lightning.pytorch.strategies as strategies

    strategy_cls = getattr(strategies, strategy_name)

    class FakeTrainer:
        strategy = strategy_cls.__new__(strategy_cls)

    for monitor in (hessian_monitor(), volume_monitor()):
        monitor.setup(FakeTrainer(), None, "fit")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# ddp_spawn: values against one process
# --------------------------------------------------------------------------------------------


def test_hessian_monitor_ddp_spawn_equals_single_process(spawn_records):
    _assert_ranks_identical(spawn_records, "HessianMonitor")
    monitor = hessian_monitor()
    record = spawn_records[0]
    indices = record["indices"]["HessianMonitor"]
    assert indices == spawn_records[1]["indices"]["HessianMonitor"]
    assert indices == AnalysisSet(ANALYSIS_FRACTION, monitor.seed, 256, None).draw(NUM_SAMPLES)
    assert len(indices) == 101  # shards of 51 and 50 samples, in micro-batches of 32
    history = record["histories"]["HessianMonitor"]
    assert [int(row["epoch"]) for row in history] == [0, 1]
    for epoch, row in enumerate(history):
        assert row["num_hvps"] == monitor.num_runs * monitor.num_steps
        reference = _reference_hessian_values(record, epoch, monitor)
        for name in HESSIAN_METRICS:
            assert math.isfinite(row[name]), name
            assert _rel_diff(row[name], reference[name]) <= REL_TOL, (epoch, name, row[name], reference[name])
        # what reached the loggers is the history's value (float32 in callback_metrics)
        logged = record["logged"][epoch]
        for name in HESSIAN_METRICS:
            assert logged[f"hessian/{name}"] == pytest.approx(row[name], rel=1e-6, abs=1e-12), name


def test_local_volume_monitor_ddp_spawn_equals_single_process(spawn_records):
    _assert_ranks_identical(spawn_records, "LocalVolumeMonitor")
    monitor = volume_monitor()
    record = spawn_records[0]
    assert record["init_priors"]["LocalVolumeMonitor"] == spawn_records[1]["init_priors"]["LocalVolumeMonitor"]
    history = record["histories"]["LocalVolumeMonitor"]
    assert [int(row["epoch"]) for row in history] == [0, 1]
    for epoch, row in enumerate(history):
        reference = _reference_volume_values(record, epoch, monitor)
        for name in VOLUME_METRICS:
            assert math.isfinite(row[name]), name
            assert _rel_diff(row[name], reference[name]) <= REL_TOL, (epoch, name, row[name], reference[name])
        logged = record["logged"][epoch]
        assert logged["volume/log_volume"] == pytest.approx(row["log_volume"], rel=1e-6)


def test_ddp_spawn_ranks_keep_identical_weights(spawn_records):
    _assert_weights_identical(spawn_records[0]["weights"], spawn_records[1]["weights"])
    _assert_optimizer_states_identical(spawn_records[0]["optimizer_states"], spawn_records[1]["optimizer_states"])


# --------------------------------------------------------------------------------------------
# strategy="ddp": training untouched, NaN on one rank, sharp-drop stop
# --------------------------------------------------------------------------------------------


def test_ddp_values_equal_ddp_spawn_values(ddp_scenarios, spawn_records):
    """Same seed, same weights, same shards: "ddp" and "ddp_spawn" log the same numbers."""
    records = ddp_scenarios["records"]["with_callbacks"]
    for monitor in ("HessianMonitor", "LocalVolumeMonitor"):
        _assert_ranks_identical(records, monitor)
        _assert_ranks_identical([spawn_records[0], records[0]], monitor)


def test_bit_identical_weights_with_and_without_callbacks(ddp_scenarios, spawn_records):
    with_cb = ddp_scenarios["records"]["with_callbacks"]
    without_cb = ddp_scenarios["records"]["without_callbacks"]
    assert all(len(r["histories"]["HessianMonitor"]) == 2 for r in with_cb)
    assert all(r["histories"] == {} for r in without_cb)
    for rank in (0, 1):
        _assert_weights_identical(with_cb[rank]["weights"], without_cb[rank]["weights"])
        _assert_optimizer_states_identical(with_cb[rank]["optimizer_states"], without_cb[rank]["optimizer_states"])
    # the ddp_spawn run (with both callbacks) trained to the same weights as well
    _assert_weights_identical(spawn_records[0]["weights"], without_cb[0]["weights"])


def test_nan_on_one_rank_no_hang_nan_logged_training_continues(ddp_scenarios):
    records = ddp_scenarios["records"]["nan_on_rank_1"]
    epochs = SCENARIO_EPOCHS["nan_on_rank_1"]
    assert "curvature computation failed at epoch 1" in ddp_scenarios["output"]
    assert "local-volume computation failed at epoch 1" in ddp_scenarios["output"]
    # epoch 2: a KeyError (not a numerical failure) on rank 1 only: every rank warns + NaN
    assert "curvature computation failed at epoch 2" in ddp_scenarios["output"]
    assert "injected failure on one rank" in ddp_scenarios["output"]
    for record in records:
        assert record["current_epoch"] == epochs  # trained to max_epochs
        assert record["global_step"] == records[0]["global_step"] > 0
        hessian = record["histories"]["HessianMonitor"]
        volume = record["histories"]["LocalVolumeMonitor"]
        assert [int(row["epoch"]) for row in hessian] == list(range(epochs))
        assert [int(row["epoch"]) for row in volume] == list(range(epochs))
        for epoch in range(epochs):
            poisoned = epoch in (1, 2)
            for name in ("trace", "top_eigenvalue", "min_eigenvalue"):
                assert math.isnan(hessian[epoch][name]) == poisoned, (epoch, name)
                assert math.isnan(record["logged"][epoch][f"hessian/{name}"]) == poisoned, (epoch, name)
            assert math.isnan(volume[epoch]["log_volume"]) == poisoned, epoch
            assert math.isnan(record["logged"][epoch]["volume/log_volume"]) == poisoned, epoch
    for monitor in ("HessianMonitor", "LocalVolumeMonitor"):
        _assert_ranks_identical(records, monitor)
    _assert_weights_identical(records[0]["weights"], records[1]["weights"])


def test_sharp_drop_stops_every_rank_at_the_same_epoch(ddp_scenarios, tmp_path):
    records = ddp_scenarios["records"]["sharp_drop"]
    single = fit(tmp_path, [sharp_drop_monitor()], digits_module, devices=1, max_epochs=SCENARIO_EPOCHS["sharp_drop"])[
        0
    ]
    expected_stop = DROP_EPOCH + 1  # window=1, confirm=1: confirmed one evaluation after the drop
    assert single["stopped_epochs"]["HessianMonitor"] == expected_stop
    assert single["current_epoch"] == expected_stop + 1 < SCENARIO_EPOCHS["sharp_drop"]
    for record in records:
        assert record["should_stop"]
        assert record["stopped_epochs"]["HessianMonitor"] == expected_stop
        assert record["current_epoch"] == single["current_epoch"]
        assert record["global_step"] == records[0]["global_step"]
        history = record["histories"]["HessianMonitor"]
        assert [row["trace_sharp_drop"] for row in history] == [0.0] * expected_stop + [1.0]
        assert (
            history[-1]["trace_sharp_drop_epoch"] == single["histories"]["HessianMonitor"][-1]["trace_sharp_drop_epoch"]
        )
    _assert_ranks_identical(records, "HessianMonitor")


def test_one_analysis_sample_leaves_a_rank_with_an_empty_shard(ddp_scenarios):
    records = ddp_scenarios["records"]["one_sample"]
    record = records[0]
    for monitor in ("HessianMonitor", "LocalVolumeMonitor"):
        assert len(record["indices"][monitor]) == 1
        _assert_ranks_identical(records, monitor)
    row = record["histories"]["HessianMonitor"][0]
    reference = _reference_hessian_values(record, 0, hessian_monitor(max_samples=1))
    for name in HESSIAN_METRICS:
        assert math.isfinite(row[name]), name
        assert _rel_diff(row[name], reference[name]) <= REL_TOL, (name, row[name], reference[name])
    row = record["histories"]["LocalVolumeMonitor"][0]
    reference = _reference_volume_values(record, 0, volume_monitor(max_samples=1))
    for name in VOLUME_METRICS:
        assert math.isfinite(row[name]), name
        assert _rel_diff(row[name], reference[name]) <= REL_TOL, (name, row[name], reference[name])
