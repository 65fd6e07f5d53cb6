"""LocalVolumeMonitor end to end: logging, exactness, isolation from training, resume, validation."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, Subset

from lightning_hessian import init_prior_std, local_volume
from lightning_hessian.callbacks import LocalVolumeMonitor
from tests.lightning_helpers import (
    DigitsModule,
    digits_dataset,
    digits_loader,
    trainer_kwargs,
)

SCALARS = [
    "log_volume",
    "log_volume_lower_bound",
    "effective_sample_size",
    "top_weight_share",
    "num_flat",
    "log10_probability",
    "description_length_bits",
    "log_radius_mean",
    "log_radius_std",
    "num_forward_passes",
    "seconds",
]
K = 8  # directions per evaluation: enough for the checks, cheap on 2 CPU cores


def _fit(module, monitor=None, seed=0, loader_seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    callbacks = [monitor] if monitor is not None else []
    callbacks += kwargs.pop("extra_callbacks", [])
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(**kwargs))
    loader = digits_loader(limit=400)
    loader.generator = torch.Generator().manual_seed(loader_seed)
    trainer.fit(module, loader)
    return trainer


def _monitor(**kwargs) -> LocalVolumeMonitor:
    kwargs.setdefault("num_directions", K)
    return LocalVolumeMonitor(**kwargs)


def test_tensorboard_logs_and_exact_values(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = _monitor(analysis_fraction=0.2, analysis_batch_size=32, seed=3)
    module = DigitsModule(hidden=16, optimizer="adam", lr=0.01)
    initial = copy.deepcopy(module)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _fit(module, monitor, max_epochs=2, logger=logger)

    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for name in SCALARS:
        assert f"volume/{name}" in tags["scalars"], name
        assert len(acc.Scalars(f"volume/{name}")) == 2
        assert f"volume/{name}" in trainer.callback_metrics
    assert "volume/log_radii" in tags["histograms"]
    hist = acc.Histograms("volume/log_radii")
    assert len(hist) == 2 and hist[-1].histogram_value.num == K
    est = monitor.last_estimate
    assert est is not None
    assert hist[-1].histogram_value.min == pytest.approx(float(est.log_radii.min()), rel=1e-6)
    assert hist[-1].histogram_value.max == pytest.approx(float(est.log_radii.max()), rel=1e-6)

    # The "init" prior is the snapshot of the weights before training.
    assert monitor.init_prior == init_prior_std(initial)
    # Defaults: Adam preconditioner from the trainer's optimizers, the library's scale-free eps.
    assert est.preconditioner == "adam" and est.measure == "gaussian"
    assert monitor.effective_preconditioner_eps is None and est.preconditioner_eps_relative == 3.0
    # Confidence: ESS in [1, k], the Markov bound at 95 % below the estimate, both logged.
    assert 1.0 <= monitor.history[-1]["effective_sample_size"] <= K
    assert monitor.history[-1]["log_volume_lower_bound"] == pytest.approx(est.log_volume + math.log(0.05))
    assert monitor.history[-1]["log_volume_lower_bound"] < monitor.history[-1]["log_volume"]

    # The logged value equals a direct call on the final model, same subset / optimizer / seed.
    dataset = digits_dataset(400)
    assert len(monitor.analysis.indices) == 80
    data = DataLoader(Subset(dataset, monitor.analysis.indices), batch_size=32)
    direct = local_volume(
        module,
        data,
        preconditioner="adam",
        optimizer=trainer.optimizers,
        prior_std=init_prior_std(initial),
        num_directions=K,
        seed=3,
    )
    logged = acc.Scalars("volume/log_volume")[-1].value  # float32 in the event file
    assert logged == pytest.approx(direct.log_volume, rel=1e-6)
    assert monitor.history[-1]["log_volume"] == pytest.approx(direct.log_volume, rel=1e-12)
    assert monitor.history[-1]["description_length_bits"] == pytest.approx(direct.description_length_bits, rel=1e-12)
    assert monitor.history[-1]["num_forward_passes"] == direct.num_forward_passes
    assert torch.equal(est.log_radii, direct.log_radii)
    assert direct.log_volume < 0 and direct.num_capped == 0


def _state(module):
    return [p.detach().clone() for p in module.parameters()] + [b.detach().clone() for b in module.buffers()]


def test_bit_identical_training():
    """Dropout + BatchNorm + Adam: identical final weights and optimizer state with and without the callback."""
    base = DigitsModule(hidden=16, batchnorm=True, dropout=0.3, optimizer="adam", lr=0.01)
    with_cb, without_cb = copy.deepcopy(base), copy.deepcopy(base)
    monitor = _monitor()
    t1 = _fit(with_cb, monitor, max_epochs=2)
    t2 = _fit(without_cb, None, max_epochs=2)
    assert len(monitor.history) == 2 and math.isfinite(monitor.history[-1]["log_volume"])
    for a, b in zip(_state(with_cb), _state(without_cb), strict=True):
        assert torch.equal(a, b)
    opt1, opt2 = t1.optimizers[0].state_dict(), t2.optimizers[0].state_dict()
    assert opt1["state"].keys() == opt2["state"].keys() and opt1["state"]
    for key in opt1["state"]:
        for name, value in opt1["state"][key].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt2["state"][key][name])


def test_resume_restores_history_indices_and_init_prior(tmp_path: Path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    monitor = _monitor(seed=7, analysis_fraction=0.2)
    module = DigitsModule(hidden=8, optimizer="adam", lr=0.01)
    initial_prior = init_prior_std(module)
    _fit(module, monitor, max_epochs=2, enable_checkpointing=True, extra_callbacks=[ckpt_cb])
    indices, history = list(monitor.analysis.indices), [dict(r) for r in monitor.history]
    assert monitor.init_prior == initial_prior and len(history) == 2
    trained_prior = init_prior_std(module)
    assert trained_prior != initial_prior

    resumed = _monitor(seed=7, analysis_fraction=0.2)
    pl.seed_everything(1, verbose=False)
    trainer = pl.Trainer(callbacks=[resumed], **trainer_kwargs(max_epochs=3, default_root_dir=tmp_path))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*snapshotted from the restored.*")
        trainer.fit(
            DigitsModule(hidden=8, optimizer="adam", lr=0.01),
            digits_loader(limit=400),
            ckpt_path=str(tmp_path / "last.ckpt"),
        )
    assert resumed.analysis.indices == indices
    assert resumed.init_prior == initial_prior  # not re-snapshotted from the restored weights
    assert [int(r["epoch"]) for r in resumed.history] == [0, 1, 2]
    for restored, original in zip(resumed.history[:2], history, strict=False):
        assert restored == original
    assert math.isfinite(resumed.history[2]["log_volume"])


def test_csv_logger_only(tmp_path: Path):
    logger = CSVLogger(tmp_path, name="csv")
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        _fit(DigitsModule(hidden=8, optimizer="adam"), _monitor(), max_epochs=1, logger=logger)
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in SCALARS:
        assert f"volume/{name}" in header


def test_no_logger_every_n_epochs_and_alternatives():
    """logger=False; every_n_epochs; SGD with the naive and Hessian-diagonal preconditioners."""
    monitor = _monitor(every_n_epochs=2, preconditioner=None, prior_std=1.0)
    hdiag = _monitor(preconditioner="hessian_diag", measure="lebesgue", prefix="vol_h/")
    with pytest.warns(UserWarning, match=r"exactly flat.*net\.0\.weight.*Warned once") as record:
        trainer = _fit(DigitsModule(hidden=8, optimizer="sgd"), monitor, max_epochs=3, extra_callbacks=[hdiag])
    assert sum("exactly flat" in str(w.message) for w in record) == 1  # three evaluations, one warning
    assert monitor.state_key != hdiag.state_key
    assert [int(r["epoch"]) for r in monitor.history] == [1]
    assert monitor.last_estimate is not None and monitor.last_estimate.preconditioner == "none"
    assert monitor.init_prior is None  # a float prior needs no snapshot
    assert math.isfinite(float(trainer.callback_metrics["volume/log_volume"]))
    assert len(hdiag.history) == 3 and hdiag.last_estimate is not None
    assert hdiag.last_estimate.preconditioner == "hessian_diag" and hdiag.last_estimate.measure == "lebesgue"
    assert hdiag.last_estimate.preconditioner_passes == 40 * 10  # exact Gauss-Newton diagonal: 40 samples x 10 classes
    # The digits' border pixels are always zero: the weights reading them are exactly flat, so the
    # Lebesgue volume is infinite (and said so), while the sampled directions all crossed.
    assert float(trainer.callback_metrics["vol_h/log_volume"]) == math.inf
    assert hdiag.last_estimate.flat_parameters.get("net.0.weight", 0) >= 8
    assert hdiag.history[-1]["num_flat"] == sum(hdiag.last_estimate.flat_parameters.values())
    assert hdiag.last_estimate.num_capped == 0
    assert math.isfinite(hdiag.last_estimate.log_radius_mean)


@pytest.mark.parametrize("preconditioner", ["adam", "adam_exp_avg"])
def test_sgd_with_adam_preconditioner_raises_before_training(preconditioner):
    monitor = _monitor(preconditioner=preconditioner)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=2))
    key = "exp_avg_sq" if preconditioner == "adam" else "exp_avg"
    with pytest.raises(ValueError, match=rf"`{key}`.*SGD.*preconditioner=None"):
        trainer.fit(DigitsModule(hidden=8, optimizer="sgd"), digits_loader(limit=200))
    assert trainer.global_step == 0 and monitor.history == []


def test_optimizer_index_out_of_range_raises():
    monitor = _monitor(optimizer_index=1)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1))
    with pytest.raises(ValueError, match="optimizer_index"):
        trainer.fit(DigitsModule(hidden=8, optimizer="adam"), digits_loader(limit=200))
    assert trainer.global_step == 0


def test_prior_mapping_missing_names_raises_at_fit_start():
    monitor = _monitor(prior_std={"net.0.weight": 0.1})
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1))
    with pytest.raises(ValueError, match=r"prior_std.*net\.0\.bias"):
        trainer.fit(DigitsModule(hidden=8, optimizer="adam"), digits_loader(limit=200))
    assert trainer.global_step == 0


def test_nan_epoch_warns_and_training_continues():
    module = DigitsModule(hidden=8, optimizer="adam")
    module.poison_epoch = 1
    monitor = _monitor()
    with pytest.warns(UserWarning, match="local-volume computation failed at epoch 1"):
        trainer = _fit(module, monitor, max_epochs=3)
    assert trainer.current_epoch == 3
    assert [int(r["epoch"]) for r in monitor.history] == [0, 1, 2]
    bad = monitor.history[1]
    for name in ("log_volume", "log10_probability", "description_length_bits", "log_radius_mean", "log_radius_std"):
        assert math.isnan(bad[name]), name
    assert bad["num_forward_passes"] == 0.0
    assert math.isfinite(monitor.history[0]["log_volume"]) and math.isfinite(monitor.history[2]["log_volume"])


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
        "    - class_path: lightning_hessian.callbacks.LocalVolumeMonitor\n"
        "      init_args:\n"
        "        num_directions: 12\n"
        "        preconditioner: null\n"
        "        prior_std: 0.5\n"
        "    - class_path: lightning_hessian.callbacks.LocalVolumeMonitor\n"
        "      init_args:\n"
        "        prior_std: {net.0.weight: 0.1, net.0.bias: 0.1}\n"
        "        prefix: other/\n"
    )
    cli = LightningCLI(DigitsModule, run=False, args=["--config", str(config)])
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, LocalVolumeMonitor)]
    assert len(monitors) == 2
    assert monitors[0].num_directions == 12 and monitors[0].preconditioner is None and monitors[0].prior_std == 0.5
    assert monitors[1].prior_std == {"net.0.weight": 0.1, "net.0.bias": 0.1} and monitors[1].preconditioner == "adam"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"analysis_fraction": 0.0}, "analysis_fraction"),
        ({"max_samples": 0}, "max_samples"),
        ({"analysis_batch_size": -1}, "analysis_batch_size"),
        ({"seed": 1.5}, "seed"),
        ({"dataset": [1, 2, 3]}, "dataset"),
        ({"dataloader": [1, 2, 3]}, "dataloader"),
        ({"cost": "mse"}, "cost"),
        ({"output_fn": 3}, "output_fn"),
        ({"mask_fn": "x"}, "mask_fn"),
        ({"loss_fn": F.cross_entropy}, "loss_fn"),  # only with cost="loss"
        ({"cost": "loss", "batch_loss": 3}, "batch_loss"),
        ({"cutoff": 0.0}, "cutoff"),
        ({"cutoff": float("nan")}, "cutoff"),
        ({"num_directions": 0}, "num_directions"),
        ({"num_directions": 2.0}, "num_directions"),
        ({"preconditioner": "fisher"}, "preconditioner"),
        ({"preconditioner_eps": -1e-3}, "preconditioner_eps"),
        ({"measure": "uniform"}, "measure"),
        ({"prior_std": "initial"}, "prior_std"),
        ({"prior_std": 0.0}, "prior_std"),
        ({"prior_std": {"net.0.weight": -1.0}}, "prior_std"),
        ({"prior_std": {}}, "prior_std"),
        ({"init_prior_fallback": 0.0}, "init_prior_fallback"),
        ({"rel_tol": 0.0}, "rel_tol"),
        ({"rel_tol": 0.5}, "rel_tol"),
        ({"optimizer_index": -1}, "optimizer_index"),
        ({"data": "test"}, "data"),
        ({"data": "val", "dataset": digits_dataset(10)}, "data"),
        ({"confidence": 1.0}, "confidence"),
        ({"preconditioner_eps": "best"}, "preconditioner_eps"),
        ({"prefix": 3}, "prefix"),
    ],
)
def test_invalid_arguments_raise(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        LocalVolumeMonitor(**kwargs)


def test_state_dict_round_trip():
    monitor = _monitor()
    monitor.history = [{"epoch": 0.0, "log_volume": -3.0}]
    monitor.analysis.indices, monitor.analysis.dataset_length = [1, 5], 10
    monitor.init_prior = {"w": 0.1}
    other = _monitor()
    other.load_state_dict(copy.deepcopy(monitor.state_dict()))
    assert other.history == monitor.history and other.analysis.indices == [1, 5]
    assert other.init_prior == {"w": 0.1} and monitor.state_dict()["seed"] == 42
    assert LocalVolumeMonitor().prefix == "volume/"


# --------------------------------------------------------------------------------------------
# Several optimizers, held-out data, confidence, configuration errors at fit start
# --------------------------------------------------------------------------------------------


class _ManualModule(pl.LightningModule):
    """Digits MLP with manual optimization: one Adam, or two (body and head) with the same settings."""

    def __init__(self, two_optimizers: bool, head_sgd: bool = False, unused: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.two_optimizers = two_optimizers
        self.head_sgd = head_sgd
        self.body = torch.nn.Linear(64, 16)
        self.head = torch.nn.Linear(16, 10)
        self.unused = torch.nn.Linear(2, 2) if unused else None  # never gets a gradient

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        for opt in optimizers:
            opt.step()

    def configure_optimizers(self):
        body = list(self.body.parameters()) + (list(self.unused.parameters()) if self.unused is not None else [])
        if not self.two_optimizers:
            return torch.optim.Adam(body + list(self.head.parameters()), lr=0.01)
        head = (
            torch.optim.SGD(self.head.parameters(), lr=0.05)
            if self.head_sgd
            else torch.optim.Adam(self.head.parameters(), lr=0.01)
        )
        return [torch.optim.Adam(body, lr=0.01), head]


def test_two_optimizer_manual_optimization_equals_the_single_optimizer_run():
    two, one = _monitor(), _monitor()
    torch.manual_seed(0)
    _fit(_ManualModule(two_optimizers=True), two, max_epochs=2)
    torch.manual_seed(0)
    _fit(_ManualModule(two_optimizers=False), one, max_epochs=2)
    assert len(two.history) == len(one.history) == 2
    for a, b in zip(two.history, one.history, strict=False):
        assert math.isfinite(a["log_volume"])
        # Two Adams over disjoint parameters step exactly like one: same weights, same exp_avg_sq.
        assert a["log_volume"] == pytest.approx(b["log_volume"], rel=1e-9)


def test_adam_body_with_sgd_head_warns_and_stays_finite():
    monitor = _monitor()
    with pytest.warns(UserWarning, match="SGD.*median scale"):
        _fit(_ManualModule(two_optimizers=True, head_sgd=True), monitor, max_epochs=1)
    assert math.isfinite(monitor.history[-1]["log_volume"])


def test_parameter_in_no_optimizer_fails_at_fit_start_and_one_without_gradient_is_named():
    class HeadOnly(_ManualModule):
        def configure_optimizers(self):
            return torch.optim.Adam(self.head.parameters(), lr=0.01)

    monitor = _monitor()
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1))
    with pytest.raises(ValueError, match=r"\['body.weight', 'body.bias'\] belong to no optimizer"):
        trainer.fit(HeadOnly(two_optimizers=False), digits_loader(limit=200))
    assert trainer.global_step == 0
    # In an optimizer but never given a gradient: Adam has no state for it at the evaluation.
    monitor = _monitor()
    with pytest.warns(
        UserWarning, match=r"no Adam `exp_avg_sq`.*\['unused.weight', 'unused.bias'\].*requires_grad=False"
    ):
        _fit(_ManualModule(two_optimizers=True, unused=True), monitor, max_epochs=1)
    assert math.isnan(monitor.history[-1]["log_volume"])


class _ValidatedModule(DigitsModule):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def test_held_out_data_is_one_argument_away():
    monitor = _monitor(data="val", analysis_fraction=0.5, seed=1)
    module = _ValidatedModule(hidden=8, optimizer="adam")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1, num_sanity_val_steps=0))
    full = digits_dataset(600)
    val = Subset(full, list(range(400, 600)))
    trainer.fit(module, DataLoader(Subset(full, list(range(400))), batch_size=64), DataLoader(val, batch_size=64))
    assert monitor.analysis.dataset_length == 200 and len(monitor.analysis.indices) == 100
    direct = local_volume(
        module,
        DataLoader(Subset(val, monitor.analysis.indices), batch_size=256),
        preconditioner="adam",
        optimizer=trainer.optimizers,
        prior_std=monitor.init_prior,
        num_directions=K,
        seed=1,
    )
    assert monitor.history[-1]["log_volume"] == pytest.approx(direct.log_volume, rel=1e-12)
    # Without validation, data="val" is a configuration error before the first step.
    trainer = pl.Trainer(callbacks=[_monitor(data="val")], **trainer_kwargs(max_epochs=1))
    with pytest.raises(ValueError, match=r"data='val'.*dataset="):
        trainer.fit(DigitsModule(hidden=8, optimizer="adam"), digits_loader(limit=200))
    assert trainer.global_step == 0


def test_low_effective_sample_size_warns_once():
    monitor = _monitor(num_directions=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(DigitsModule(hidden=8, optimizer="adam"), monitor, max_epochs=2)
    low = [r for r in record if "effective sample size" in str(r.message)]
    ess = [row["effective_sample_size"] for row in monitor.history]
    assert all(1.0 <= value <= 4 for value in ess)
    assert len(low) == (1 if min(ess) < 2.0 else 0)
