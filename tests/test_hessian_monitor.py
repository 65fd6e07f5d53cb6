"""HessianMonitor end to end: logging, exactness, isolation from training, resume, validation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, Subset

from lightning_hessian.callbacks import HessianMonitor
from tests.helpers import exact_hessian
from tests.lightning_helpers import DigitsModule, digits_dataset, digits_loader, trainer_kwargs

SCALARS = [
    "trace",
    "trace_stderr",
    "trace_ci_low",
    "trace_ci_high",
    "top_eigenvalue",
    "top_eigenvalue_2",
    "min_eigenvalue",
    "negative_mass",
    "negative_mass_threshold",
    "num_hvps",
    "seconds",
    "trace_sharp_drop",
    "trace_sharp_drop_epoch",
]


def _fit(module, monitor=None, seed=0, loader_seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    callbacks = [monitor] if monitor is not None else []
    callbacks += kwargs.pop("extra_callbacks", [])
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(**kwargs))
    loader = digits_loader(limit=400)
    loader.generator = torch.Generator().manual_seed(loader_seed)
    trainer.fit(module, loader)
    return trainer


def _analysis_batches(monitor: HessianMonitor, dataset, batch_size=10**9):
    subset = Subset(dataset, monitor.analysis.indices)
    return list(DataLoader(subset, batch_size=batch_size))


def test_tensorboard_logs_and_exact_values(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = HessianMonitor(num_runs=4, num_steps=40, top_k=2, analysis_fraction=0.25)
    module = DigitsModule(hidden=16)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _fit(module, monitor, max_epochs=3, logger=logger)

    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for name in SCALARS:
        assert f"hessian/{name}" in tags["scalars"], name
        assert len(acc.Scalars(f"hessian/{name}")) == 3
    assert "hessian/eigenvalue_density" in tags["histograms"]
    hist = acc.Histograms("hessian/eigenvalue_density")
    assert len(hist) == 3
    n = sum(p.numel() for p in module.parameters())
    assert hist[-1].histogram_value.num == n
    assert sum(hist[-1].histogram_value.bucket) == pytest.approx(n, rel=1e-2)
    assert "hessian/eigenvalue_density_plot" in tags["images"]

    # callback_metrics see the values (EarlyStopping/ModelCheckpoint can monitor them)
    for name in ("trace", "top_eigenvalue", "min_eigenvalue", "negative_mass"):
        assert f"hessian/{name}" in trainer.callback_metrics

    # logged values against the exact Hessian of the final model on the analysis set
    batches = _analysis_batches(monitor, digits_dataset(400))
    hess = exact_hessian(module, batches)
    eig = torch.linalg.eigvalsh(hess)
    last = acc.Scalars("hessian/top_eigenvalue")[-1].value
    assert last == pytest.approx(float(eig[-1]), rel=1e-4)
    second = acc.Scalars("hessian/top_eigenvalue_2")[-1].value
    assert second == pytest.approx(float(eig[-2]), rel=1e-3)
    trace = acc.Scalars("hessian/trace")[-1].value
    stderr = acc.Scalars("hessian/trace_stderr")[-1].value
    exact_trace = float(eig.sum())
    assert stderr > 0
    assert abs(trace - exact_trace) <= 5 * stderr  # t(3 dof) 99.5 % is ~5.8
    low, high = acc.Scalars("hessian/trace_ci_low")[-1].value, acc.Scalars("hessian/trace_ci_high")[-1].value
    assert high - low == pytest.approx(2 * 3.182446 * stderr, rel=1e-4)  # Student t, 3 dof, 95 %
    assert low <= trace <= high
    tau = acc.Scalars("hessian/negative_mass_threshold")[-1].value
    assert 0 < tau < 0.03 * float(eig.abs().max())  # relative to the bulk, not the outliers
    assert acc.Scalars("hessian/negative_mass")[-1].value == pytest.approx(
        monitor.last_density.negative_fraction(threshold=tau), rel=1e-5
    )
    assert acc.Scalars("hessian/min_eigenvalue")[-1].value >= float(eig[0]) - 1e-5
    assert acc.Scalars("hessian/num_hvps")[-1].value == 4 * 40


def _weights(module):
    return [p.detach().clone() for p in module.parameters()] + [b.detach().clone() for b in module.buffers()]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bit_identical_training(optimizer):
    """Dropout + BatchNorm + RNG consumers: identical final weights with and without the callback."""
    base = DigitsModule(hidden=16, batchnorm=True, dropout=0.3, optimizer=optimizer)
    with_cb, without_cb = copy.deepcopy(base), copy.deepcopy(base)
    monitor = HessianMonitor(num_runs=2, num_steps=10, train_mode_batchnorm=False)
    t1 = _fit(with_cb, monitor, max_epochs=3)
    t2 = _fit(without_cb, None, max_epochs=3)
    assert len(monitor.history) == 3
    for a, b in zip(_weights(with_cb), _weights(without_cb), strict=True):
        assert torch.equal(a, b)
    opt1, opt2 = t1.optimizers[0].state_dict(), t2.optimizers[0].state_dict()
    for key in opt1["state"]:
        for name, value in opt1["state"][key].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt2["state"][key][name])


def test_train_mode_batchnorm_leaves_running_stats():
    base = DigitsModule(hidden=16, batchnorm=True, dropout=0.2)
    with_cb, without_cb = copy.deepcopy(base), copy.deepcopy(base)
    _fit(with_cb, HessianMonitor(num_runs=2, num_steps=8, train_mode_batchnorm=True), max_epochs=2)
    _fit(without_cb, None, max_epochs=2)
    for a, b in zip(_weights(with_cb), _weights(without_cb), strict=True):
        assert torch.equal(a, b)


def test_resume_keeps_indices_and_history(tmp_path: Path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    monitor = HessianMonitor(num_runs=2, num_steps=8, seed=7, analysis_fraction=0.2)
    module = DigitsModule(hidden=8)
    _fit(module, monitor, max_epochs=2, enable_checkpointing=True, extra_callbacks=[ckpt_cb])
    indices, history = list(monitor.analysis.indices), [dict(r) for r in monitor.history]
    assert len(history) == 2

    resumed = HessianMonitor(num_runs=2, num_steps=8, seed=7, analysis_fraction=0.2)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[resumed], **trainer_kwargs(max_epochs=4, default_root_dir=tmp_path))
    trainer.fit(DigitsModule(hidden=8), digits_loader(limit=400), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.analysis.indices == indices
    assert len(resumed.history) == 4
    for restored, original in zip(resumed.history[:2], history, strict=False):
        assert restored.keys() == original.keys()
        for key, value in original.items():
            assert restored[key] == value or (math.isnan(value) and math.isnan(restored[key])), key
    assert [int(r["epoch"]) for r in resumed.history] == [0, 1, 2, 3]


def test_two_monitors_coexist(tmp_path: Path):
    a = HessianMonitor(num_runs=2, num_steps=8, prefix="h_a/")
    b = HessianMonitor(num_runs=2, num_steps=12, every_n_epochs=2, prefix="h_b/")
    assert a.state_key != b.state_key
    trainer = _fit(DigitsModule(hidden=8), a, max_epochs=2, extra_callbacks=[b])
    assert "h_a/trace" in trainer.callback_metrics and "h_b/trace" in trainer.callback_metrics
    assert len(a.history) == 2 and len(b.history) == 1


def test_csv_logger_only(tmp_path: Path):
    logger = CSVLogger(tmp_path, name="csv")
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        _fit(DigitsModule(hidden=8), HessianMonitor(num_runs=2, num_steps=8), max_epochs=2, logger=logger)
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    header = text.splitlines()[0].split(",")
    for name in ("hessian/trace", "hessian/top_eigenvalue", "hessian/min_eigenvalue", "hessian/num_hvps"):
        assert name in header


def test_no_logger_runs():
    monitor = HessianMonitor(num_runs=2, num_steps=8)
    trainer = _fit(DigitsModule(hidden=8), monitor, max_epochs=2, logger=False)
    assert len(monitor.history) == 2
    assert math.isfinite(float(trainer.callback_metrics["hessian/trace"]))


def test_float32_basis_on_cpu_gives_same_values():
    a = HessianMonitor(num_runs=2, num_steps=12)
    b = HessianMonitor(num_runs=2, num_steps=12, lanczos_basis_dtype="float32", lanczos_basis_on_cpu=True)
    base = DigitsModule(hidden=8)
    _fit(copy.deepcopy(base), a, max_epochs=1)
    _fit(copy.deepcopy(base), b, max_epochs=1)
    assert b.history[0]["top_eigenvalue"] == pytest.approx(a.history[0]["top_eigenvalue"], rel=1e-5)
    assert b.history[0]["trace"] == pytest.approx(a.history[0]["trace"], rel=1e-4)


def test_float64_hvp_precision_matches_exact_top_eigenvalue():
    monitor = HessianMonitor(num_runs=2, num_steps=30, hvp_precision="float64", analysis_fraction=0.25)
    module = DigitsModule(hidden=16)
    _fit(module, monitor, max_epochs=1)
    assert next(module.parameters()).dtype == torch.float32
    hess = exact_hessian(module, _analysis_batches(monitor, digits_dataset(400)))
    top = float(torch.linalg.eigvalsh(hess)[-1])
    assert abs(monitor.history[0]["top_eigenvalue"] - top) <= 1e-6 * abs(top)


def test_every_n_epochs():
    monitor = HessianMonitor(num_runs=2, num_steps=8, every_n_epochs=2)
    _fit(DigitsModule(hidden=8), monitor, max_epochs=5)
    assert [int(r["epoch"]) for r in monitor.history] == [1, 3]


def test_nan_epoch_warns_and_training_continues():
    module = DigitsModule(hidden=8)
    module.poison_epoch = 1
    monitor = HessianMonitor(num_runs=2, num_steps=8)
    with pytest.warns(UserWarning, match="curvature computation failed at epoch 1"):
        trainer = _fit(module, monitor, max_epochs=3)
    assert trainer.current_epoch == 3
    assert math.isnan(monitor.history[1]["trace"]) and math.isnan(monitor.history[1]["top_eigenvalue"])
    assert math.isfinite(monitor.history[2]["trace"])


def test_early_stopping_can_monitor_metric():
    monitor = HessianMonitor(num_runs=2, num_steps=8)
    stopper = EarlyStopping(
        monitor="hessian/top_eigenvalue", mode="min", patience=0, check_on_train_epoch_end=True, stopping_threshold=1e9
    )
    trainer = _fit(DigitsModule(hidden=8), monitor, max_epochs=3, extra_callbacks=[stopper])
    assert trainer.current_epoch < 3  # stopping_threshold is met at once


def test_dict_batches_with_batch_loss():
    class DictDataset(torch.utils.data.Dataset):
        def __init__(self):
            self.inner = digits_dataset(200)

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            x, y = self.inner[i]
            return {"pixels": x, "label": y}

    class DictModule(DigitsModule):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["pixels"]), batch["label"])

    def batch_loss(model, batch):
        return F.cross_entropy(model(batch["pixels"]), batch["label"])

    monitor = HessianMonitor(num_runs=2, num_steps=8, batch_loss=batch_loss)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1))
    trainer.fit(DictModule(hidden=8), DataLoader(DictDataset(), batch_size=32))
    assert math.isfinite(monitor.history[0]["top_eigenvalue"])


def test_sequence_logits_default_loss():
    """[B, T, V] logits with [B, T] targets: the default loss flattens positions."""

    class SeqModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 5)
            self.out = torch.nn.Linear(5, 7)

        def forward(self, tokens):
            return self.out(torch.tanh(self.emb(tokens)))

        def training_step(self, batch, batch_idx):
            tokens, targets = batch
            return F.cross_entropy(self(tokens).transpose(1, 2), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (64, 6), generator=g)
    data = torch.utils.data.TensorDataset(tokens, tokens.roll(1, dims=1))
    monitor = HessianMonitor(num_runs=2, num_steps=10, analysis_fraction=0.5)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1))
    trainer.fit(SeqModule(), DataLoader(data, batch_size=16))
    assert math.isfinite(monitor.history[0]["trace"])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"analysis_fraction": 0.0}, "analysis_fraction"),
        ({"analysis_fraction": 1.5}, "analysis_fraction"),
        ({"max_samples": 0}, "max_samples"),
        ({"analysis_batch_size": -1}, "analysis_batch_size"),
        ({"seed": 1.5}, "seed"),
        ({"num_runs": 0}, "num_runs"),
        ({"num_steps": 0}, "num_steps"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 20, "num_steps": 10}, "top_k"),
        ({"sharp_drop_patience": -1}, "sharp_drop_patience"),
        ({"stop_on_sharp_drop": True, "detect_sharp_drop": False}, "stop_on_sharp_drop"),
        ({"sharp_drop_kwargs": {"window": 0}}, "window"),
        ({"sharp_drop_kwargs": {"nonsense": 1}}, "sharp_drop_kwargs"),
        ({"loss_fn": 3}, "loss_fn"),
        ({"loss_fn": F.cross_entropy, "batch_loss": lambda m, b: 0}, "batch_loss"),
        ({"dataset": [1, 2, 3]}, "dataset"),
        ({"dataloader": [1, 2, 3]}, "dataloader"),
        ({"prefix": 3}, "prefix"),
        ({"lanczos_basis_dtype": "float16"}, "lanczos_basis_dtype"),
        ({"hvp_precision": "half"}, "hvp_precision"),
    ],
)
def test_invalid_arguments_raise(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        HessianMonitor(**kwargs)


def test_unsupported_strategy_raises():
    from lightning.pytorch.strategies import FSDPStrategy

    monitor = HessianMonitor()

    class FakeTrainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)

    with pytest.raises(RuntimeError, match="FSDPStrategy"):
        monitor.setup(FakeTrainer(), None, "fit")  # type: ignore[arg-type]


def test_explicit_dataset_and_max_samples():
    dataset = digits_dataset(300)
    monitor = HessianMonitor(num_runs=2, num_steps=8, dataset=dataset, analysis_fraction=1.0, max_samples=50)
    _fit(DigitsModule(hidden=8), monitor, max_epochs=1)
    assert len(monitor.analysis.indices) == 50


def test_lightning_cli_config(tmp_path: Path):
    """Plain type-hinted constructor arguments: LightningCLI builds the callback from YAML."""
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 1\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        "  callbacks:\n"
        "    - class_path: lightning_hessian.callbacks.HessianMonitor\n"
        "      init_args:\n"
        "        num_runs: 2\n"
        "        num_steps: 9\n"
        "        top_k: 2\n"
    )
    cli = LightningCLI(DigitsModule, run=False, args=["--config", str(config)])
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, HessianMonitor)]
    assert len(monitors) == 1 and monitors[0].num_steps == 9 and monitors[0].top_k == 2
