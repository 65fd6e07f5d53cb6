"""NoisyInputAccuracy: exact value, clean limit, no effect on training, logging, validation."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_hessian.callbacks.noisy_accuracy import NoisyInputAccuracy
from tests.lightning_helpers import DigitsModule, digits_loader, trainer_kwargs


class EvalDigitsModule(DigitsModule):
    """DigitsModule with validation/test steps logging the clean accuracy."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(-1) == y).float().mean())


def _model(seed: int = 0, **kwargs) -> EvalDigitsModule:
    torch.manual_seed(seed)
    return EvalDigitsModule(hidden=16, **kwargs)


def _hand_accuracy(model, loader, callback: NoisyInputAccuracy, epoch: int, dataloader_idx: int = 0) -> float:
    """(model(x + noise).argmax(-1) == y) over the loader, with the generator draws rebuilt here."""
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for batch_idx, (x, y) in enumerate(loader):
            generator = torch.Generator().manual_seed(callback.noise_seed(epoch, batch_idx, dataloader_idx))
            noise = callback.noise_std * torch.randn(x.shape, generator=generator)
            correct += int((model(x + noise).argmax(-1) == y).sum())
            total += y.numel()
    return correct / total


def test_validate_and_test_match_hand_computation():
    model = _model()
    loader = digits_loader(batch_size=50, limit=200, shuffle=False)
    callback = NoisyInputAccuracy(noise_std=0.25, seed=3)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs())

    trainer.validate(model, loader, verbose=False)
    expected = _hand_accuracy(model, loader, callback, epoch=trainer.current_epoch)
    assert "ood/acc" in trainer.callback_metrics
    assert float(trainer.callback_metrics["ood/acc"]) == pytest.approx(expected, abs=1e-6)
    # the shift is real: noisy accuracy differs from clean accuracy on these inputs
    assert expected != pytest.approx(float(trainer.callback_metrics["val/acc"]), abs=1e-6)

    results = trainer.test(model, loader, verbose=False)
    assert results[0]["ood/acc"] == pytest.approx(expected, abs=1e-6)
    assert callback.last_values["ood/acc"] == pytest.approx(expected, abs=1e-6)


def test_zero_noise_is_clean_accuracy():
    model = _model(seed=1)
    loader = digits_loader(batch_size=64, limit=200, shuffle=False)
    callback = NoisyInputAccuracy(noise_std=0.0, also_clean=True)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs())
    metrics = trainer.validate(model, loader, verbose=False)[0]
    assert metrics["ood/acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)
    assert metrics["val/clean_acc"] == pytest.approx(metrics["val/acc"], abs=1e-6)


def test_noise_is_reproducible_and_leaves_global_rng_alone():
    callback = NoisyInputAccuracy(noise_std=0.5, seed=7)
    x = torch.zeros(4, 64)
    state = torch.get_rng_state()
    a = callback.noise(x, epoch=2, batch_idx=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, callback.noise(x, epoch=2, batch_idx=5))
    assert a.std().item() == pytest.approx(0.5, rel=0.3)
    for other in (callback.noise(x, 3, 5), callback.noise(x, 2, 6), callback.noise(x, 2, 5, dataloader_idx=1)):
        assert not torch.equal(a, other)
    assert not torch.equal(a, NoisyInputAccuracy(noise_std=0.5, seed=8).noise(x, 2, 5))
    assert callback.noise(x.double(), 2, 5).dtype == torch.float64


class _ConsumesGlobalRNG(Callback):
    """Negative control: what the callback must not do."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            torch.randn(1)


def _fit(callbacks, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = _model(seed=0, dropout=0.2)  # dropout: training consumes the global RNG
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(max_epochs=2, **kwargs))
    train = digits_loader(batch_size=64, limit=300)
    train.generator = torch.Generator().manual_seed(0)
    trainer.fit(model, train, digits_loader(batch_size=50, limit=100, shuffle=False))
    return model, trainer


def test_training_is_bit_identical_with_and_without_callback():
    reference, _ = _fit([])
    callback = NoisyInputAccuracy(also_clean=True)
    with_callback, trainer = _fit([callback])
    for p, q in zip(reference.parameters(), with_callback.parameters(), strict=True):
        assert torch.equal(p, q)
    assert "ood/acc" in trainer.callback_metrics and "val/clean_acc" in trainer.callback_metrics
    assert trainer.callback_metrics["val/clean_acc"] == pytest.approx(
        float(trainer.callback_metrics["val/acc"]), abs=1e-6
    )
    # the comparison is sensitive: one global draw per validation batch changes the weights
    perturbed, _ = _fit([_ConsumesGlobalRNG()])
    assert any(not torch.equal(p, q) for p, q in zip(reference.parameters(), perturbed.parameters(), strict=True))


def test_sanity_check_is_skipped():
    model = _model()
    callback = NoisyInputAccuracy()
    seen = []
    original = callback._on_batch_end

    def spy(stage, trainer, *args):
        seen.append((trainer.sanity_checking, trainer.current_epoch))
        return original(stage, trainer, *args)

    callback._on_batch_end = spy
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=1, num_sanity_val_steps=2))
    trainer.fit(model, digits_loader(limit=64), digits_loader(batch_size=50, limit=100, shuffle=False))
    assert any(sanity for sanity, _ in seen)
    assert trainer.callback_metrics["ood/acc"] == pytest.approx(
        _hand_accuracy(model, digits_loader(batch_size=50, limit=100, shuffle=False), callback, epoch=0), abs=1e-6
    )


def test_several_dataloaders():
    model = _model()
    loaders = [
        digits_loader(batch_size=50, limit=100, shuffle=False),
        digits_loader(batch_size=40, limit=120, shuffle=False),
    ]
    trainer = pl.Trainer(callbacks=[NoisyInputAccuracy()], **trainer_kwargs())
    trainer.validate(model, loaders, verbose=False)
    assert {"ood/acc/dataloader_idx_0", "ood/acc/dataloader_idx_1"} <= set(trainer.callback_metrics)

    callback = NoisyInputAccuracy(dataloader_idx=1, seed=5)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs())
    trainer.validate(model, loaders, verbose=False)
    expected = _hand_accuracy(model, loaders[1], callback, epoch=0, dataloader_idx=1)
    assert float(trainer.callback_metrics["ood/acc"]) == pytest.approx(expected, abs=1e-6)


def test_dict_batches_sequence_logits_and_bad_inputs():
    class SeqModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 5)

        def forward(self, x):  # [B, T, 3] -> [B, T, 5]
            return self.proj(x)

        def validation_step(self, batch, batch_idx):
            pass

    torch.manual_seed(0)
    data = [{"x": torch.randn(4, 6, 3), "y": torch.randint(0, 5, (4, 6))} for _ in range(3)]
    module = SeqModule()
    callback = NoisyInputAccuracy(input_index="x", target_index="y", noise_std=0.1)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs())
    trainer.validate(module, DataLoader(data, batch_size=None), verbose=False)
    correct = total = 0
    with torch.no_grad():
        for i, batch in enumerate(data):
            pred = module(batch["x"] + callback.noise(batch["x"], 0, i)).argmax(-1)
            correct += int((pred == batch["y"]).sum())
            total += batch["y"].numel()
    assert float(trainer.callback_metrics["ood/acc"]) == pytest.approx(correct / total, abs=1e-6)

    token_batches = [(torch.randint(0, 5, (4, 3)), torch.randint(0, 5, (4,)))]
    trainer = pl.Trainer(callbacks=[NoisyInputAccuracy()], **trainer_kwargs())
    with pytest.raises(TypeError, match="floating-point"):
        trainer.validate(module, DataLoader(token_batches, batch_size=None), verbose=False)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"noise_std": -0.1}, "noise_std"),
        ({"noise_std": float("nan")}, "noise_std"),
        ({"noise_std": True}, "noise_std"),
        ({"input_index": 1.5}, "input_index"),
        ({"target_index": None}, "target_index"),
        ({"num_classes": 1}, "num_classes"),
        ({"name": ""}, "name"),
        ({"stages": ("fit",)}, "stages"),
        ({"stages": ()}, "stages"),
        ({"seed": "0"}, "seed"),
        ({"clean_name": "ood/acc"}, "clean_name"),
        ({"dataloader_idx": -1}, "dataloader_idx"),
        ({"ignore_index": 0.5}, "ignore_index"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        NoisyInputAccuracy(**kwargs)


@pytest.mark.parametrize("argument", ["input_fn", "target_fn", "forward_fn"])
def test_non_callable_functions_rejected(argument):
    with pytest.raises(TypeError, match=f"`{argument}`"):
        NoisyInputAccuracy(**{argument: 3})


def test_forward_fn_and_input_fn():
    model = _model()
    loader = digits_loader(batch_size=50, limit=100, shuffle=False)
    callback = NoisyInputAccuracy(
        input_fn=lambda batch: batch[0],
        target_fn=lambda batch: batch[1],
        forward_fn=lambda module, x: -module(x),  # the worst classifier: accuracy changes
    )
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs())
    trainer.validate(model, loader, verbose=False)
    correct = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            correct += int(((-model(x + callback.noise(x, 0, i))).argmax(-1) == y).sum())
    assert float(trainer.callback_metrics["ood/acc"]) == pytest.approx(correct / 100, abs=1e-6)
