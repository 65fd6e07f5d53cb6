"""Adam-preconditioned curvature, edge-of-stability thresholds, and the new monitor views under DDP."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from lightning_hessian import (
    GGNOperator,
    HessianOperator,
    adam_preconditioned_threshold,
    preconditioned_operator,
    sgd_sharpness_threshold,
    spectral_density,
    stability_threshold,
    top_eigenvalues,
)
from lightning_hessian.callbacks import HessianMonitor, default_classification_loss
from lightning_hessian.estimators.block_trace import FirstProductRecorder, block_traces
from lightning_hessian.operators.block import parameter_slices
from lightning_hessian.operators.sharded_space import parameter_space
from tests.curvature_truth import classification_batches, exact_loss_hessian, tanh_mlp
from tests.lightning_helpers import (
    DigitsModule,
    digits_dataset,
    digits_loader,
    trainer_kwargs,
)


def _train(model, optimizers, batches, steps):
    for step in range(steps):
        for opt in optimizers:
            opt.zero_grad()
        loss = sum(F.cross_entropy(model(x), y) for x, y in batches)
        loss.backward()
        for i, opt in enumerate(optimizers):
            if i == 0 or step % 2 == 0:  # the second optimizer takes fewer steps: per-parameter step counts
                opt.step()


def _exact_preconditioned(model, optimizers, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """D H D with D = (sqrt(v_hat) + eps)^(-1/2) built by hand from the optimizers' state."""
    hess = exact_loss_hessian(model, F.cross_entropy, batches)
    diag = []
    for p in model.parameters():
        for opt in optimizers:
            for group in opt.param_groups:
                if any(q is p for q in group["params"]):
                    state = opt.state[p]
                    step = float(state["step"])
                    v_hat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** step)
                    diag.append((v_hat.sqrt() + group["eps"]).reshape(-1))
    p_diag = torch.cat(diag)
    d = p_diag.rsqrt()
    return d[:, None] * hess * d[None, :], torch.diag(1 / p_diag) @ hess


def test_preconditioned_top_eigenvalue_equals_exact():
    model = tanh_mlp()
    batches = classification_batches()
    body = torch.optim.Adam(
        [{"params": model[0].parameters(), "eps": 1e-3, "betas": (0.9, 0.99)}, {"params": [], "lr": 1e-3}], lr=0.05
    )
    head = torch.optim.AdamW(model[2].parameters(), lr=0.02, eps=1e-6, betas=(0.8, 0.999))
    _train(model, [body, head], batches, steps=5)
    assert head.state[model[2].weight]["step"] == 3 and body.state[model[0].weight]["step"] == 5
    op = HessianOperator(model, F.cross_entropy, batches)
    pre = preconditioned_operator(op, [body, head])
    symmetric, nonsymmetric = _exact_preconditioned(model, [body, head], batches)
    eig = torch.linalg.eigvalsh(symmetric)
    result = top_eigenvalues(pre, k=1, tol=1e-10)
    assert result.values[0].item() == pytest.approx(eig[-1].item(), rel=1e-5)
    # same spectrum as P^-1 H (similar matrices)
    assert torch.linalg.eigvals(nonsymmetric).real.max().item() == pytest.approx(eig[-1].item(), rel=1e-8)
    # products are D H D exactly, counted on the underlying operator
    v = torch.randn(op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = op.num_hvps
    assert torch.allclose(pre.matmat(v), symmetric @ v, rtol=1e-10, atol=1e-12)
    assert op.num_hvps == before + 3 == pre.num_hvps
    # a block and the GGN compose with the preconditioner
    block = preconditioned_operator(op.block(["2.weight", "2.bias"]), [body, head])
    idx = torch.arange(op.num_params - block.num_params, op.num_params)
    assert torch.allclose(block.matmat(v[idx]), symmetric[idx][:, idx] @ v[idx], rtol=1e-10, atol=1e-12)
    ggn = preconditioned_operator(GGNOperator(model, F.cross_entropy, batches), [body, head])
    assert top_eigenvalues(ggn, k=1).values[0].item() > 0


def test_preconditioner_needs_adam_state():
    model = tanh_mlp()
    batches = classification_batches()
    op = HessianOperator(model, F.cross_entropy, batches)
    adam = torch.optim.Adam(model[0].parameters())
    sgd = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"0\.weight.*Adam-family"):  # no step yet
        preconditioned_operator(op, [adam, sgd])
    _train(model, [adam, sgd], batches, steps=1)
    with pytest.raises(ValueError, match=r"\['2\.weight', '2\.bias'\].*SGD"):
        preconditioned_operator(op, [adam, sgd])
    assert isinstance(preconditioned_operator(op.block(["0.weight"]), [adam, sgd]).num_params, int)


def test_thresholds_exactly_as_defined():
    assert adam_preconditioned_threshold(0.01, 0.9) == (2 + 2 * 0.9) / ((1 - 0.9) * 0.01)
    assert adam_preconditioned_threshold(1e-3, 0.9) == pytest.approx(38 / 1e-3, rel=1e-12)
    assert sgd_sharpness_threshold(0.1) == 2 / 0.1
    assert sgd_sharpness_threshold(0.1, 0.9) == (2 + 2 * 0.9) / 0.1
    assert sgd_sharpness_threshold(0.1, 0.5, dampening=0.5) == 3.0 / (0.5 * 0.1)
    assert sgd_sharpness_threshold(0.1, 0.9, nesterov=True) == (2 + 2 * 0.9) / ((1 + 2 * 0.9) * 0.1)
    # Nesterov: the iteration on a quadratic at the threshold has an eigenvalue -1 (and is stable below)
    lr, beta = 0.1, 0.9
    lam = sgd_sharpness_threshold(lr, beta, nesterov=True)
    for scale, stable in ((0.999, True), (1.001, False)):
        c = lr * lam * scale
        m = torch.tensor([[1 - c * (1 + beta), -lr * beta**2], [lam * scale, beta]], dtype=torch.float64)
        assert (torch.linalg.eigvals(m).abs().max().item() < 1) == stable

    model = tanh_mlp()
    params, names = list(model.parameters()), [n for n, _ in model.named_parameters()]
    sgd = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.2}, {"params": model[2].parameters()}], lr=0.1, momentum=0.9
    )
    th = stability_threshold(params, sgd, names)
    assert th.kind == "sgd" and th.value == (2 + 2 * 0.9) / 0.2 and th.lr == 0.2  # smallest group threshold
    assert sorted(th.group_values) == [(2 + 2 * 0.9) / 0.2, (2 + 2 * 0.9) / 0.1]
    plain = torch.optim.SGD(model.parameters(), lr=0.05)
    assert stability_threshold(params, plain).value == 2 / 0.05
    adam = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.95, 0.999))
    th = stability_threshold(params, adam)
    assert th.kind == "adam" and th.value == (2 + 2 * 0.95) / ((1 - 0.95) * 3e-4)
    with pytest.raises(ValueError, match="SGD and Adam"):
        stability_threshold(
            params, [torch.optim.Adam(model[0].parameters()), torch.optim.SGD(model[2].parameters(), lr=0.1)]
        )
    with pytest.raises(ValueError, match="RMSprop"):
        stability_threshold(params, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="no optimizer"):
        stability_threshold(params, torch.optim.SGD(model[0].parameters(), lr=0.1), names)


# --------------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------------


def _fit(module, monitors, max_epochs=2):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=list(monitors), **trainer_kwargs(max_epochs=max_epochs))
    loader = digits_loader(limit=300)
    loader.generator = torch.Generator().manual_seed(0)
    trainer.fit(module, loader)
    return trainer


def test_monitor_preconditioned_sharpness_against_exact():
    module = DigitsModule(hidden=4, optimizer="adam", lr=0.01)
    monitor = HessianMonitor(num_runs=2, num_steps=8, analysis_fraction=0.1, preconditioned=True, log_density=False)
    trainer = _fit(module, [monitor])
    row = monitor.history[-1]
    batches = list(DataLoader(Subset(digits_dataset(300), monitor.analysis.indices), batch_size=10**9))
    optimizer = trainer.optimizers[0]
    symmetric, _ = _exact_preconditioned(module, [optimizer], batches)
    assert row["preconditioned_sharpness"] == pytest.approx(torch.linalg.eigvalsh(symmetric)[-1].item(), rel=1e-4)
    assert row["preconditioned_sharpness_threshold"] == (2 + 2 * 0.9) / ((1 - 0.9) * 0.01)
    assert row["sharpness_ratio"] == row["preconditioned_sharpness"] / row["preconditioned_sharpness_threshold"]
    assert trainer.callback_metrics["hessian/sharpness_ratio"].item() == pytest.approx(row["sharpness_ratio"], rel=1e-6)


def test_monitor_sgd_threshold_and_fail_fast():
    module = DigitsModule(hidden=4)  # SGD lr 0.05, momentum 0.9
    monitor = HessianMonitor(num_runs=2, num_steps=8, sharpness_threshold=True, log_density=False)
    _fit(module, [monitor], max_epochs=1)
    row = monitor.history[-1]
    assert row["sharpness_threshold"] == (2 + 2 * 0.9) / 0.05
    assert row["sharpness_ratio"] == row["top_eigenvalue"] / row["sharpness_threshold"]
    for optimizer, kwargs, match in (
        ("sgd", {"preconditioned": True}, "Adam-family"),
        ("adam", {"sharpness_threshold": True}, "preconditioned=True"),
    ):
        module = DigitsModule(hidden=4, optimizer=optimizer)
        before = [p.detach().clone() for p in module.parameters()]
        with pytest.raises(ValueError, match=match):
            _fit(module, [HessianMonitor(num_runs=2, num_steps=4, **kwargs)])
        assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))  # before the first step
    with pytest.raises(ValueError, match="not both"):
        HessianMonitor(preconditioned=True, sharpness_threshold=True)
    views = HessianMonitor(preconditioned=True).views
    model = DigitsModule(hidden=4)
    with pytest.raises(ValueError, match="Adamax keeps an infinity norm"):
        views.check_optimizers(model, torch.optim.Adamax(model.parameters()))
    views.check_optimizers(model, torch.optim.AdamW(model.parameters()))


class WithUnusedParameter(DigitsModule):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unused = torch.nn.Parameter(torch.zeros(3))  # never gets a gradient: no Adam state


def test_missing_adam_state_gives_nan_preconditioned_values_only():
    monitor = HessianMonitor(num_runs=2, num_steps=6, preconditioned=True, blocks="modules", log_density=False)
    with pytest.warns(UserWarning, match=r"No Adam second moments.*unused"):
        _fit(WithUnusedParameter(hidden=4, optimizer="adam", lr=0.01), [monitor], max_epochs=1)
    row = monitor.history[-1]
    assert math.isfinite(row["trace"]) and math.isfinite(row["top_eigenvalue"]) and math.isfinite(row["trace/net"])
    assert math.isnan(row["preconditioned_sharpness"]) and math.isnan(row["sharpness_ratio"])
    assert math.isnan(row["preconditioned_sharpness_threshold"])


def test_views_leave_training_bit_identical():
    base = DigitsModule(hidden=8, dropout=0.2, optimizer="adam", lr=0.01)
    with_cb, without_cb = copy.deepcopy(base), copy.deepcopy(base)
    monitors = [
        HessianMonitor(
            num_runs=2,
            num_steps=6,
            blocks="modules",
            block_top_eigenvalues=True,
            preconditioned=True,
            log_density=False,
        ),
        HessianMonitor(num_runs=2, num_steps=6, curvature="ggn", preconditioned=True, log_density=False, prefix="ggn/"),
    ]
    t1 = _fit(with_cb, monitors)
    t2 = _fit(without_cb, [])
    assert len(monitors[0].history) == 2 and math.isfinite(monitors[1].history[-1]["preconditioned_sharpness"])
    for a, b in zip(with_cb.state_dict().values(), without_cb.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = t1.optimizers[0].state_dict()["state"], t2.optimizers[0].state_dict()["state"]
    for key in s1:
        for name, value in s1[key].items():
            assert torch.equal(value, s2[key][name])


# --------------------------------------------------------------------------------------------
# DDP: block, GGN and preconditioned values equal the single-process ones
# --------------------------------------------------------------------------------------------

GGN_BLOCKS = {"hidden": r"^net\.0\.", "head": ["net.3.weight", "net.3.bias"]}


def _reference(record: dict[str, Any], monitor_kwargs: dict[str, Any], curvature: str) -> dict[str, float]:
    from tests.ddp_helpers import digits_module

    module = digits_module()
    module.load_state_dict(record["weights"][-1])
    optimizer = torch.optim.Adam(module.parameters(), lr=0.03)
    optimizer.load_state_dict(record["optimizer_states"][-1])
    loader = DataLoader(Subset(digits_dataset(200), record["indices"]["HessianMonitor"]), batch_size=256)
    if curvature == "ggn":
        op: Any = GGNOperator(module, default_classification_loss, loader, loss_hessian="cross_entropy", class_dim=-1)
        blocks = {"hidden": ["net.0.weight", "net.0.bias"], "head": ["net.3.weight", "net.3.bias"]}
    else:
        op = HessianOperator(module, default_classification_loss, loader)
        blocks = {"net.0": ["net.0.weight", "net.0.bias"], "net.3": ["net.3.weight", "net.3.bias"]}
    op.vector_space = parameter_space(list(module.parameters()))  # the monitors' per-parameter probes
    recorder = FirstProductRecorder(op)
    sd = spectral_density(recorder, num_runs=monitor_kwargs["num_runs"], num_steps=monitor_kwargs["num_steps"], seed=42)
    slices = parameter_slices(op)
    values = {"top_eigenvalue": float(sd.top_ritz_values(1)[0][0])}
    for name, est in block_traces(
        recorder.inputs, recorder.products, {b: [slices[n] for n in ns] for b, ns in blocks.items()}
    ).items():
        values[f"trace/{name}"] = est.value
        values[f"trace_stderr/{name}"] = est.stderr
        if curvature == "hessian":
            values[f"top_eigenvalue/{name}"] = float(top_eigenvalues(op.block(blocks[name]), k=1, seed=42).values[0])
    values["preconditioned_sharpness"] = float(
        top_eigenvalues(preconditioned_operator(op, optimizer), k=1, seed=42).values[0]
    )
    return values


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)
def test_ddp_block_ggn_preconditioned_equal_single_process(tmp_path):
    from tests.ddp_helpers import digits_module, fit, hessian_monitor

    common = {"num_runs": 2, "num_steps": 8, "preconditioned": True}
    monitors = [
        hessian_monitor(blocks="modules", block_top_eigenvalues=True, **common),
        hessian_monitor(curvature="ggn", blocks=GGN_BLOCKS, prefix="hessian/ggn/", **common),
    ]
    records = fit(tmp_path, monitors, digits_module, start_method="spawn", max_epochs=1)
    assert [r["world_size"] for r in records] == [2, 2]
    logged = [r["logged"][-1] for r in records]
    for prefix, curvature in (("hessian/", "hessian"), ("hessian/ggn/", "ggn")):
        reference = _reference(records[0], common, curvature)
        for key, value in reference.items():
            got = [entry[f"{prefix}{key}"] for entry in logged]
            assert got[0] == got[1], (prefix, key)  # every rank logs the same number
            assert abs(got[0] - value) <= 1e-5 * max(abs(value), 1e-12), (prefix, key, got[0], value)
        ratio = logged[0][f"{prefix}sharpness_ratio"]
        assert ratio == pytest.approx(
            reference["preconditioned_sharpness"] / ((2 + 2 * 0.9) / ((1 - 0.9) * 0.03)), rel=1e-5
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_block_ggn_preconditioned_match_cpu():
    model = tanh_mlp()
    batches = classification_batches()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    _train(model, [adam], batches, steps=2)
    v = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    cpu = {
        "block": HessianOperator(model, F.cross_entropy, batches).block(["2.weight"]).matmat(v[-18:]),
        "ggn": GGNOperator(model, F.cross_entropy, batches).matmat(v),
        "pre": preconditioned_operator(HessianOperator(model, F.cross_entropy, batches), adam).matmat(v),
    }
    model.cuda()
    adam_cuda = torch.optim.Adam(model.parameters(), lr=0.01)
    adam_cuda.load_state_dict(adam.state_dict())
    on_gpu = [(x.cuda(), y.cuda()) for x, y in batches]
    gpu = {
        "block": HessianOperator(model, F.cross_entropy, on_gpu).block(["2.weight"]).matmat(v[-18:].cuda()),
        "ggn": GGNOperator(model, F.cross_entropy, on_gpu).matmat(v.cuda()),
        "pre": preconditioned_operator(HessianOperator(model, F.cross_entropy, on_gpu), adam_cuda).matmat(v.cuda()),
    }
    for key, value in cpu.items():
        assert gpu[key].device.type == "cuda"
        assert torch.allclose(gpu[key].cpu(), value, rtol=1e-9, atol=1e-12), key


def test_edge_of_stability_example_runs_and_its_thresholds_are_the_core_ones():
    """The example's own training and monitor settings, a few steps: the logged thresholds are exact."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "edge_of_stability.py"
    spec = importlib.util.spec_from_file_location("edge_of_stability", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    sgd = example.run("sgd", 0.2, steps=6, every=3)
    adam = example.run("adam", 0.003, steps=6, every=3)
    assert [r["sharpness_threshold"] for r in sgd["history"]] == [2 / 0.2] * 2
    assert [r["preconditioned_sharpness_threshold"] for r in adam["history"]] == [
        (2 + 2 * 0.9) / ((1 - 0.9) * 0.003)
    ] * 2
    assert all(
        math.isfinite(r["preconditioned_sharpness"]) and r["preconditioned_sharpness"] > 0 for r in adam["history"]
    )
    assert len(sgd["losses"]) == 6
    lines = example.verdicts(sgd) + example.verdicts(adam)
    assert len(lines) == 5 and all(line.startswith("VERDICT") for line in lines)
