"""FSDP2 (``fully_shard``) analysis on 2 CPU processes (gloo): the functional core and the monitors.

Each launch runs ``python -m tests.fsdp_helpers <scenario>`` in a subprocess with a wall-clock
timeout (a deadlock fails the test), every rank writing what it computed; the truth is computed
here, in one process, on the unsharded model and the whole data set (exact float64 Hessians by
double backward).
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_hessian import HessianOperator
from lightning_hessian.operators.sharded_space import PROBE_BLOCK, ParameterRange, ShardedSpace, parameter_space
from tests.fsdp_helpers import ROOT, assemble, global_vectors, tiny_data, tiny_mlp

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)

LAUNCH_TIMEOUT_S = 240


def launch(scenario: str, out_dir: Any, world_size: int = 2) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "tests.fsdp_helpers", scenario, str(out_dir), str(world_size)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def functional_records(tmp_path_factory) -> list[dict[str, Any]]:
    return launch("functional", tmp_path_factory.mktemp("fsdp_functional"))


def exact_hessian() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact float64 Hessian (symmetric-checked), gradient and loss of the unsharded model on all samples."""
    model, (x, y) = tiny_mlp(), tiny_data()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        pieces, offset = [], 0
        for shape in shapes:
            numel = int(torch.Size(shape).numel())
            pieces.append(theta[offset : offset + numel].view(shape))
            offset += numel
        out = torch.func.functional_call(model, dict(zip(names, pieces, strict=True)), (x,))
        return nn.functional.cross_entropy(out, y)

    hessian = torch.autograd.functional.hessian(loss, flat)
    assert torch.allclose(hessian, hessian.t(), atol=1e-12)
    theta = flat.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(theta), theta)
    return hessian, grad, float(loss(flat))


def test_hessian_operator_on_fully_shard_module_raises_naming_the_sharded_path(functional_records):
    for record in functional_records:
        message = record["hessian_operator_error"]
        assert message is not None, "HessianOperator accepted DTensor parameters (it would return zeros)"
        assert "fully_shard" in message and "ShardedHessianOperator" in message and "ModelParallelStrategy" in message


def test_sharded_products_equal_the_exact_hessian(functional_records):
    hessian, grad, loss = exact_hessian()
    r0, r1 = functional_records
    assert r0["global_num_params"] == hessian.shape[0]
    assert r0["num_params"] + r1["num_params"] == hessian.shape[0]  # no rank holds a full-size vector
    assert 0 < r1["num_params"] < hessian.shape[0]
    for record in functional_records:
        assert record["loss"] == pytest.approx(loss, rel=1e-12)
        assert record["restored"] and record["grads_untouched"]
    expected = hessian @ global_vectors(3)
    got = assemble(functional_records, "products")
    assert float(expected.norm()) > 0.1
    assert float((got - expected).norm() / expected.norm()) < 1e-7  # float64 model: central differences
    assert torch.allclose(assemble(functional_records, "gradient"), grad, rtol=1e-10, atol=1e-13)


def test_sharded_estimators_equal_the_exact_values(functional_records):
    hessian, _, _ = exact_hessian()
    eigenvalues = torch.linalg.eigvalsh(hessian)
    for record in functional_records:
        assert record["top_eigenvalue"] == pytest.approx(float(eigenvalues[-1]), rel=1e-6)
        assert record["top_eigenvalue"] > 1e-3  # never a silent zero
    assert functional_records[0]["trace"] == functional_records[1]["trace"]
    # the same 4 Rademacher probes as the unsharded operator with the per-parameter space
    model, (x, y) = tiny_mlp(), tiny_data()
    op = HessianOperator(
        model, nn.functional.cross_entropy, [(x, y)], vector_space=parameter_space(list(model.parameters()))
    )
    from lightning_hessian import hessian_trace

    expected = hessian_trace(op, num_probes=4, seed=0).value
    assert functional_records[0]["trace"] == pytest.approx(float(expected), rel=1e-7)


def test_sharded_probes_do_not_depend_on_the_world_size(functional_records):
    model = tiny_mlp()
    whole = parameter_space(list(model.parameters()))
    expected = whole.probes(whole.local_size, 2, "rademacher", torch.Generator().manual_seed(3))
    assert torch.equal(assemble(functional_records, "probes"), expected)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blocked_probes_are_the_same_for_any_split_of_a_parameter(kind):
    numel = 2 * PROBE_BLOCK + 123
    whole = ShardedSpace([ParameterRange(5, 0, 5), ParameterRange(numel, 0, numel)])
    expected = whole.probes(whole.local_size, 3, kind, torch.Generator().manual_seed(11))
    for bounds in ([0, numel], [0, 70000, numel], [0, 1, PROBE_BLOCK, PROBE_BLOCK + 5, numel]):
        pieces = []
        for lo, hi in itertools.pairwise(bounds):
            part = ShardedSpace([ParameterRange(5, 0, 5), ParameterRange(numel, lo, hi)])
            rows = part.probes(part.local_size, 3, kind, torch.Generator().manual_seed(11))
            pieces.append(rows[5:])
        assert torch.equal(torch.cat(pieces), expected[5:])
    if kind == "rademacher":
        assert set(expected.unique().tolist()) == {-1.0, 1.0}
    else:
        assert abs(float(expected.mean())) < 0.02 and abs(float(expected.std()) - 1) < 0.02


# --------------------------------------------------------------------------------------------
# Lightning: Trainer(strategy=ModelParallelStrategy(...)), fully_shard in configure_model
# --------------------------------------------------------------------------------------------

FD_REL_TOL = 1e-3  # finite-difference float32 products against exact double backward
LIGHTNING_SCENARIOS = {"with_callbacks": 2, "without_callbacks": 2, "failure_on_rank_1": 3}


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory) -> dict[str, Any]:
    import os
    import signal

    out = tmp_path_factory.mktemp("fsdp_lightning")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fsdp_helpers", "lightning", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: rank 1 is killed with it on a timeout
    )
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"The FSDP2 scenarios did not finish within {LAUNCH_TIMEOUT_S} s (deadlock?):\n{output[-6000:]}")
    assert proc.returncode == 0, output[-6000:]
    from tests.ddp_helpers import load_records

    records = {name: load_records(out / name, 2) for name in LIGHTNING_SCENARIOS}
    for name, ranks in records.items():
        assert [r["strategy"] for r in ranks] == ["ModelParallelStrategy"] * 2, name
        assert [r["current_epoch"] for r in ranks] == [LIGHTNING_SCENARIOS[name]] * 2, name
    return {"records": records, "output": output}


def _plain_module_at(record: dict[str, Any], epoch: int) -> Any:
    from tests.fsdp_helpers import smooth_digits_module

    model = smooth_digits_module()
    model.load_state_dict(record["weights"][epoch])
    return model


def _single_process_hessian_values(record: dict[str, Any], epoch: int) -> dict[str, float]:
    """The same monitor, one process, the whole analysis set, the unsharded model: exact (AD) HVPs."""
    from torch.utils.data import DataLoader, Subset

    from lightning_hessian import spectral_density
    from lightning_hessian.callbacks import default_classification_loss
    from tests.ddp_helpers import NUM_SAMPLES
    from tests.fsdp_helpers import fsdp_hessian_monitor
    from tests.lightning_helpers import digits_dataset

    monitor = fsdp_hessian_monitor()
    model = _plain_module_at(record, epoch)
    loader = DataLoader(Subset(digits_dataset(NUM_SAMPLES), record["indices"]["HessianMonitor"]), batch_size=256)
    op = HessianOperator(
        model, default_classification_loss, loader, vector_space=parameter_space(list(model.parameters()))
    )
    sd = spectral_density(op, num_runs=monitor.num_runs, num_steps=monitor.num_steps, seed=monitor.seed)
    return {"trace": sd.deflated_trace, "top_eigenvalue": float(sd.top_ritz_values(1)[0][0])}


def _assert_same_histories(records: list[dict[str, Any]], monitor: str) -> None:
    first, second = (r["histories"][monitor] for r in records)
    assert len(first) == len(second) > 0
    for row0, row1 in zip(first, second, strict=True):
        for key in row0:
            if key not in ("seconds", "overhead"):
                assert row0[key] == row1[key] or (row0[key] != row0[key] and row1[key] != row1[key]), key


@pytest.mark.slow  # one ~100 s launch of 3 ModelParallelStrategy fits, shared by these tests
def test_hessian_monitor_under_model_parallel_equals_the_single_process_values(lightning_runs):
    records = lightning_runs["records"]["with_callbacks"]
    _assert_same_histories(records, "HessianMonitor")
    assert records[0]["indices"]["HessianMonitor"] == records[1]["indices"]["HessianMonitor"]
    history = records[0]["histories"]["HessianMonitor"]
    assert [int(row["epoch"]) for row in history] == [0, 1]
    for epoch, row in enumerate(history):
        reference = _single_process_hessian_values(records[0], epoch)
        for key, value in reference.items():
            assert row[key] == pytest.approx(value, rel=FD_REL_TOL), (epoch, key, row[key], value)
        assert row["num_hvps"] == 20


@pytest.mark.slow  # one ~100 s launch of 3 ModelParallelStrategy fits, shared by these tests
def test_model_parallel_training_is_bit_identical_with_and_without_the_monitors(lightning_runs):
    with_cb = lightning_runs["records"]["with_callbacks"]
    without_cb = lightning_runs["records"]["without_callbacks"]
    assert all(r["histories"] == {} for r in without_cb)
    for rank in (0, 1):
        for a, b in zip(with_cb[rank]["weights"], without_cb[rank]["weights"], strict=True):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(with_cb[rank]["optimizer_states"], without_cb[rank]["optimizer_states"], strict=True):
            for index, state in a["state"].items():
                for name, value in state.items():
                    assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][name]))


@pytest.mark.slow  # one ~100 s launch of 3 ModelParallelStrategy fits, shared by these tests
def test_model_parallel_failure_on_one_rank_warns_on_every_rank_and_training_continues(lightning_runs):
    records = lightning_runs["records"]["failure_on_rank_1"]
    output = lightning_runs["output"]
    assert "[rank 1] HessianMonitor: curvature computation failed at epoch 1" in output
    assert "HessianMonitor: curvature computation failed at epoch 1 (NonFiniteLossError" in output
    assert "[rank 1] HessianMonitor: curvature computation failed at epoch 2 (KeyError" in output
    assert "curvature computation failed at epoch 2 (NonFiniteHVPError: Another process failed" in output
    _assert_same_histories(records, "HessianMonitor")
    for record in records:
        history = record["histories"]["HessianMonitor"]
        assert [int(row["epoch"]) for row in history] == [0, 1, 2]
        assert [math.isnan(row["trace"]) for row in history] == [False, True, True]
        volume = record["histories"]["LocalVolumeMonitor"]
        assert [math.isnan(row["log_volume"]) for row in volume] == [False, True, True]
    assert "[rank 1] LocalVolumeMonitor: local-volume computation failed at epoch 1" in output
    assert "LocalVolumeMonitor: local-volume computation failed at epoch 2 (VolumeComputationError: Another" in output


def _single_process_volume(record: dict[str, Any], epoch: int) -> dict[str, float]:
    """The volume monitor's estimate, one process, the whole analysis set, the unsharded model and optimizer."""
    from torch.utils.data import DataLoader, Subset

    from lightning_hessian.volume.sharded import sharded_local_volume
    from tests.ddp_helpers import NUM_SAMPLES
    from tests.fsdp_helpers import fsdp_volume_monitor
    from tests.lightning_helpers import digits_dataset

    monitor = fsdp_volume_monitor()
    model = _plain_module_at(record, epoch)
    optimizer = torch.optim.Adam(model.parameters(), lr=model.hparams.lr)
    optimizer.load_state_dict(record["optimizer_states"][epoch])
    loader = DataLoader(Subset(digits_dataset(NUM_SAMPLES), record["indices"]["LocalVolumeMonitor"]), batch_size=256)
    est = sharded_local_volume(
        model,
        list(loader),
        cutoff=monitor.cutoff,
        num_directions=monitor.num_directions,
        preconditioner=monitor.preconditioner,
        optimizer=optimizer,
        measure=monitor.measure,
        prior_std=record["init_priors"]["LocalVolumeMonitor"],
        rel_tol=monitor.rel_tol,
        seed=monitor.seed,
    )
    return est.metrics()


@pytest.mark.slow  # one ~100 s launch of 3 ModelParallelStrategy fits, shared by these tests
def test_local_volume_monitor_under_model_parallel_equals_the_single_process_values(lightning_runs):
    records = lightning_runs["records"]["with_callbacks"]
    _assert_same_histories(records, "LocalVolumeMonitor")
    assert records[0]["init_priors"]["LocalVolumeMonitor"] == records[1]["init_priors"]["LocalVolumeMonitor"]
    history = records[0]["histories"]["LocalVolumeMonitor"]
    assert [int(row["epoch"]) for row in history] == [0, 1]
    for epoch, row in enumerate(history):
        reference = _single_process_volume(records[0], epoch)
        assert math.isfinite(row["log_volume"]) and row["log_volume"] < 0
        assert abs(row["log_volume"] - reference["log_volume"]) <= 0.5, (epoch, row["log_volume"], reference)
        assert row["num_forward_passes"] > 8
