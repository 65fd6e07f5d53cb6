"""FSDP2 (``fully_shard``) analysis on 2 CPU processes (gloo): the functional core and the monitors.

Each launch runs ``python -m tests.fsdp_helpers <scenario>`` in a subprocess with a wall-clock
timeout (a deadlock fails the test), every rank writing what it computed; the truth is computed
here, in one process, on the unsharded model and the whole data set (exact float64 Hessians by
double backward).
"""

from __future__ import annotations

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
    op = HessianOperator(model, nn.functional.cross_entropy, [(x, y)], vector_space=parameter_space(list(model.parameters())))
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
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = ShardedSpace([ParameterRange(5, 0, 5), ParameterRange(numel, lo, hi)])
            rows = part.probes(part.local_size, 3, kind, torch.Generator().manual_seed(11))
            pieces.append(rows[5:])
        assert torch.equal(torch.cat(pieces), expected[5:])
    if kind == "rademacher":
        assert set(expected.unique().tolist()) == {-1.0, 1.0}
    else:
        assert abs(float(expected.mean())) < 0.02 and abs(float(expected.std()) - 1) < 0.02
