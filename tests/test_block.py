"""Diagonal-block operators and per-block traces against exact float64 Hessians."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_hessian import (
    GGNOperator,
    HessianOperator,
    hessian_trace,
    parameter_blocks,
    spectral_density,
    top_eigenvalues,
)
from lightning_hessian.callbacks import HessianMonitor
from lightning_hessian.estimators.block_trace import (
    FirstProductRecorder,
    block_trace_samples,
    block_traces,
)
from lightning_hessian.operators.block import module_blocks, parameter_slices
from tests.curvature_truth import (
    classification_batches,
    exact_loss_hessian,
    identity_products,
    tanh_mlp,
)
from tests.lightning_helpers import (
    DigitsModule,
    digits_dataset,
    digits_loader,
    trainer_kwargs,
)


def _index(op: HessianOperator, names: list[str]) -> torch.Tensor:
    slices = parameter_slices(op)
    return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])


@pytest.fixture(scope="module")
def layernorm_case():
    model = tanh_mlp(layernorm=True)  # Linear, LayerNorm, Tanh, Linear
    batches = classification_batches()
    return model, batches, exact_loss_hessian(model, F.cross_entropy, batches)


@pytest.mark.parametrize("names", [["3.weight", "3.bias"], ["0.weight", "3.bias"], ["1.weight"]])
def test_block_equals_exact_submatrix(names, layernorm_case):
    model, batches, exact = layernorm_case
    op = HessianOperator(model, F.cross_entropy, batches)
    idx = _index(op, names)
    exact_block = exact[idx][:, idx]
    block = op.block(names)
    assert block.num_params == idx.numel() == sum(dict(model.named_parameters())[n].numel() for n in names)
    assert block.parameter_names() == [n for n in op.parameter_names() if n in names]  # model order
    dense = identity_products(block)
    assert torch.allclose(dense, exact_block, rtol=1e-10, atol=1e-12)
    eig = torch.linalg.eigvalsh(exact_block)
    top = top_eigenvalues(block, k=1, tol=1e-9, max_iter=min(idx.numel(), 30))
    assert top.values[0].item() == pytest.approx(eig[-1].item(), rel=1e-5)
    trace = hessian_trace(block, method="hutch++", num_probes=3 * idx.numel())  # sketch spans R^n: exact
    assert trace.value == pytest.approx(eig.sum().item(), rel=1e-5)
    # counted on the block, the parent's counter untouched; outputs carry no autograd graph
    assert block.num_hvps > 0 and op.num_hvps == 0
    assert not block.matvec(torch.ones(block.num_params, dtype=torch.float64)).requires_grad


def test_block_of_float32_model_in_float64_and_autograd_backend():
    model = tanh_mlp().float()
    batches = [(x.float(), y) for x, y in classification_batches()]
    names = ["0.weight", "0.bias"]
    exact = exact_loss_hessian(model, F.cross_entropy, batches)
    for kwargs in ({"compute_dtype": torch.float64}, {"compute_dtype": torch.float64, "backend": "autograd"}):
        op = HessianOperator(model, F.cross_entropy, batches, **kwargs)
        idx = _index(op, names)
        assert torch.allclose(identity_products(op.block(names)), exact[idx][:, idx], rtol=1e-9, atol=1e-11)


def test_block_validation():
    op = HessianOperator(tanh_mlp(), F.cross_entropy, classification_batches())
    with pytest.raises(ValueError, match="Unknown or frozen"):
        op.block(["0.weight", "nope"])
    with pytest.raises(ValueError, match="at least one"):
        op.block([])
    with pytest.raises(TypeError, match="list of parameter names"):
        op.block("0.weight")
    with pytest.raises(ValueError, match="Duplicate"):
        op.block(["0.bias", "0.bias"])


def test_ggn_block_is_ggn_submatrix():
    model = tanh_mlp()
    batches = classification_batches()
    ggn = GGNOperator(model, F.cross_entropy, batches)
    full = identity_products(ggn)
    names = ["2.weight"]
    idx = _index(ggn, names)
    block = ggn.block(names)
    assert isinstance(block, GGNOperator)
    assert torch.allclose(identity_products(block), full[idx][:, idx], rtol=1e-10, atol=1e-13)


def test_parameter_blocks_resolution():
    module = DigitsModule(hidden=8)  # LightningModule -> net (Sequential) -> 0, 2
    assert module_blocks(module) == {"net.0": ["net.0.weight", "net.0.bias"], "net.2": ["net.2.weight", "net.2.bias"]}
    assert parameter_blocks(module, {"w": r"weight$", "head": ["net.2.bias"]}) == {
        "w": ["net.0.weight", "net.2.weight"],
        "head": ["net.2.bias"],
    }
    module.net[0].bias.requires_grad_(False)
    assert module_blocks(module)["net.0"] == ["net.0.weight"]
    with pytest.raises(ValueError, match="matches no trainable"):
        parameter_blocks(module, {"x": r"^encoder\."})
    with pytest.raises(ValueError, match="Unknown or frozen"):
        parameter_blocks(module, {"x": ["net.0.bias"]})
    with pytest.raises(ValueError, match="'modules'"):
        parameter_blocks(module, "layers")

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 1)

    assert module_blocks(Mixed()) == {"scale": ["scale"], "a": ["a.weight", "a.bias"], "b": ["b.weight", "b.bias"]}


def test_block_traces_sum_to_plain_hutchinson_of_same_probes(layernorm_case):
    model, batches, _ = layernorm_case
    op = HessianOperator(model, F.cross_entropy, batches)
    recorder = FirstProductRecorder(op)
    sd = spectral_density(recorder, num_runs=6, num_steps=12, seed=3)
    blocks = {name: [s] for name, s in parameter_slices(op).items()}  # a partition
    samples = block_trace_samples(recorder.inputs, recorder.products, blocks)
    total = sum(samples.values())
    assert torch.allclose(total, sd.trace_samples, rtol=1e-12, atol=1e-12)
    assert op.num_hvps == sd.num_hvps  # no extra product
    with pytest.raises(ValueError, match="Rademacher"):
        block_trace_samples(torch.randn(op.num_params, 2), torch.randn(op.num_params, 2), blocks)


def test_block_traces_are_unbiased_within_error_bars(layernorm_case):
    model, batches, exact = layernorm_case
    op = HessianOperator(model, F.cross_entropy, batches)
    slices = parameter_slices(op)
    blocks = {
        "first": [slices["0.weight"], slices["0.bias"]],
        "norm": [slices["1.weight"], slices["1.bias"]],
        "last": [slices["3.weight"]],
    }
    recorder = FirstProductRecorder(op)
    spectral_density(recorder, num_runs=40, num_steps=2, seed=0)
    estimates = block_traces(recorder.inputs, recorder.products, blocks)
    for name, parts in blocks.items():
        idx = torch.cat([torch.arange(s.start, s.stop) for s in parts])
        truth = exact[idx, idx].sum().item()
        est = estimates[name]
        assert est.num_hvps == 0 and est.num_probes == 40
        assert est.stderr > 0
        assert abs(est.value - truth) <= 4 * est.stderr, (name, est.value, truth, est.stderr)


def _fit(module, monitor, logger=False, max_epochs=2):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=max_epochs, logger=logger))
    loader = digits_loader(limit=300)
    loader.generator = torch.Generator().manual_seed(0)
    trainer.fit(module, loader)
    return trainer


def test_monitor_block_metrics_against_exact(tmp_path: Path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = HessianMonitor(
        num_runs=12, num_steps=6, analysis_fraction=0.2, blocks="modules", block_top_eigenvalues=True, log_density=False
    )
    module = DigitsModule(hidden=4)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _fit(module, monitor, logger=logger)
    row = monitor.history[-1]
    batches = list(DataLoader(Subset(digits_dataset(300), monitor.analysis.indices), batch_size=10**9))
    exact = exact_loss_hessian(module, F.cross_entropy, batches)
    names = [n for n, _ in module.named_parameters()]
    offsets = [0]
    for p in module.parameters():
        offsets.append(offsets[-1] + p.numel())
    for block, members in (("net.0", ["net.0.weight", "net.0.bias"]), ("net.2", ["net.2.weight", "net.2.bias"])):
        idx = torch.cat([torch.arange(offsets[names.index(n)], offsets[names.index(n) + 1]) for n in members])
        sub = exact[idx][:, idx]
        truth = sub.trace().item()
        assert abs(row[f"trace/{block}"] - truth) <= 4 * row[f"trace_stderr/{block}"], (block, row, truth)
        assert row[f"top_eigenvalue/{block}"] == pytest.approx(torch.linalg.eigvalsh(sub)[-1].item(), rel=1e-4)
        assert f"hessian/trace/{block}" in trainer.callback_metrics
    # the partition's block traces sum to the plain Hutchinson trace of the same probes
    assert row["trace/net.0"] + row["trace/net.2"] == pytest.approx(monitor.last_density.trace, rel=1e-12)
    assert row["num_hvps"] > 12 * 6  # the block Lanczos runs are counted
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert "hessian/trace/net.0" in acc.Tags()["scalars"]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    assert monitor.views.layout() == {
        "hessian": {
            "trace per block": ["Multiline", ["hessian/trace/net.0", "hessian/trace/net.2"]],
            "top eigenvalue per block": ["Multiline", ["hessian/top_eigenvalue/net.0", "hessian/top_eigenvalue/net.2"]],
        }
    }


def test_monitor_blocks_fail_fast_and_nan_on_failure():
    module = DigitsModule(hidden=8)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"blocks=.*matches no trainable"):
        _fit(module, HessianMonitor(num_runs=2, num_steps=4, blocks={"enc": r"^encoder\."}))
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))  # no training step ran
    with pytest.raises(ValueError, match="block_top_eigenvalues"):
        HessianMonitor(block_top_eigenvalues=True)
    poisoned = DigitsModule(hidden=8)
    poisoned.poison_epoch = 1
    monitor = HessianMonitor(num_runs=2, num_steps=4, blocks="modules", log_density=False)
    with pytest.warns(UserWarning, match="logging NaN"):
        _fit(poisoned, monitor)
    assert math.isfinite(monitor.history[0]["trace/net.0"])
    assert math.isnan(monitor.history[1]["trace/net.0"]) and math.isnan(monitor.history[1]["trace_stderr/net.2"])


def test_lightning_cli_config_with_blocks_ggn_preconditioned(tmp_path: Path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 1\n"
        "  logger: false\n"
        "  callbacks:\n"
        "    - class_path: lightning_hessian.callbacks.HessianMonitor\n"
        "      init_args:\n"
        "        curvature: ggn\n"
        "        blocks:\n"
        "          hidden: '^net\\.0\\.'\n"
        "          head: [net.2.weight, net.2.bias]\n"
        "        preconditioned: true\n"
    )
    cli = LightningCLI(DigitsModule, run=False, args=["--config", str(config)])
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, HessianMonitor)]
    assert monitor.curvature == "ggn" and monitor.views.preconditioned
    assert monitor.views.blocks == {"hidden": r"^net\.0\.", "head": ["net.2.weight", "net.2.bias"]}
