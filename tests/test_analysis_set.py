"""The analysis set: read once with seeded, forked RNGs; isolated from dataset-held RNGs; kept.

Truth here is equality: with the weights frozen (lr = 0) an augmenting dataset must give the same
logged value at every epoch; a resumed run the same values as an uninterrupted one; training with
the callbacks bit-identical to training without them.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Subset

from lightning_hessian.callbacks import HessianMonitor, LocalVolumeMonitor
from lightning_hessian.callbacks._analysis_set import AnalysisSet
from lightning_hessian.callbacks._isolation import find_held_generators
from tests.helpers import digits_tensors
from tests.lightning_helpers import DigitsModule, trainer_kwargs

NUM_SAMPLES = 300


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GlobalRngAugmented(Dataset):
    """torchvision-style augmentation from the *global* RNGs (torch noise, python flip, numpy scale)."""

    def __init__(self, n: int = NUM_SAMPLES) -> None:
        self.x, self.y = digits_tensors()
        self.x, self.y = self.x[:n], self.y[:n]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i] + 0.3 * torch.randn(64)
        if random.random() < 0.5:
            x = x.flip(0)
        return x * float(np.random.uniform(0.8, 1.2)), self.y[i]  # noqa: NPY002 - augmentation from the global RNG on purpose


class TorchGeneratorAugmented(GlobalRngAugmented):
    def __init__(self, n: int = NUM_SAMPLES) -> None:
        super().__init__(n)
        self.generator = torch.Generator().manual_seed(123)

    def __getitem__(self, i: int):
        return self.x[i] + 0.3 * torch.randn(64, generator=self.generator), self.y[i]


class NumpyGeneratorAugmented(GlobalRngAugmented):
    def __init__(self, n: int = NUM_SAMPLES) -> None:
        super().__init__(n)
        self.rng = np.random.default_rng(123)

    def __getitem__(self, i: int):
        noise = torch.from_numpy(self.rng.normal(0.0, 0.3, 64).astype(np.float32))
        return self.x[i] + noise, self.y[i]


class SeededStream(IterableDataset):
    """A seeded stream: ``__iter__`` restarts the same sequence; noise from the global torch RNG."""

    def __init__(self, n: int = NUM_SAMPLES) -> None:
        self.x, self.y = digits_tensors()
        self.n = n
        self.iterations = 0

    def __iter__(self):
        self.iterations += 1
        for i in range(self.n):
            yield self.x[i] + 0.3 * torch.randn(64), self.y[i]


class CountingStream(IterableDataset):
    """A moving stream: a shared position (itertools.count) that every read advances."""

    def __init__(self) -> None:
        self.x, self.y = digits_tensors()
        self.position = itertools.count()

    def __iter__(self):
        for _ in range(64):
            i = next(self.position) % len(self.y)
            yield self.x[i], self.y[i]


class OneShotStream(IterableDataset):
    """A stream held as a Python generator: no state to restore, no copy possible."""

    def __init__(self) -> None:
        x, y = digits_tensors()
        self.source = ((x[i % len(y)], y[i % len(y)]) for i in itertools.count())

    def __iter__(self):
        for _ in range(64):
            yield next(self.source)


def _trainer(callbacks, **kwargs):
    return pl.Trainer(callbacks=callbacks, **trainer_kwargs(**kwargs))


def _monitors(**common):
    hessian = HessianMonitor(num_runs=2, num_steps=8, analysis_fraction=0.1, detect_sharp_drop=False, **common)
    volume = LocalVolumeMonitor(num_directions=6, preconditioner=None, analysis_fraction=0.1, **common)
    return hessian, volume


def _values(history):
    return [{k: v for k, v in row.items() if k not in ("seconds", "epoch", "step", "overhead")} for row in history]


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# --------------------------------------------------------------------------------------------
# Unit: the read
# --------------------------------------------------------------------------------------------


def test_read_is_seeded_isolated_and_kept():
    dataset = GlobalRngAugmented()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 - the global RNG is what is checked
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())  # noqa: NPY002
    first = AnalysisSet(0.1, seed=5, batch_size=8, max_samples=None)
    batches = first.materialize(dataset, None, 0, 1)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])  # noqa: NPY002 - global RNGs untouched
    assert first.materialize(dataset, None, 0, 1) is batches  # idempotent: kept, not re-read
    torch.manual_seed(99)  # a different global state at the time of the read
    again = AnalysisSet(0.1, seed=5, batch_size=8, max_samples=None).materialize(dataset, None, 0, 1)
    assert len(batches) == len(again) == 4 and first.num_samples == 30
    for (x1, y1), (x2, y2) in zip(batches, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    clean = torch.cat([dataset.x[i] for i in first.indices]).reshape(-1, 64)
    assert not torch.allclose(torch.cat([b[0] for b in batches]), clean)  # augmentation did run
    other = AnalysisSet(0.1, seed=6, batch_size=8, max_samples=None).materialize(dataset, None, 0, 1)
    assert not torch.equal(other[0][0], batches[0][0])  # the seed matters


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_read_the_single_process_samples(world_size):
    """Each sample's augmentation depends on (seed, index) only, so DDP shards equal the single set."""
    dataset = GlobalRngAugmented()
    single = torch.cat([b[0] for b in AnalysisSet(0.1, 3, 7, None).materialize(dataset, None, 0, 1)])
    shards = [
        torch.cat([b[0] for b in AnalysisSet(0.1, 3, 7, None).materialize(dataset, None, r, world_size)])
        for r in range(world_size)
    ]
    for rank, shard in enumerate(shards):
        assert torch.equal(shard, single[rank::world_size])


def test_generators_found_through_wrappers_and_closures():
    inner = TorchGeneratorAugmented(20)
    rng = np.random.default_rng(0)
    state = random.Random(1)

    class Wrapped(Dataset):
        def __init__(self) -> None:
            self.base = ConcatDataset([Subset(inner, [0, 1]), NumpyGeneratorAugmented(5)])
            self.transform = lambda x: x + rng.normal()
            self.extra = {"python": state}

        def __len__(self) -> int:
            return 7

        def __getitem__(self, i):
            return self.base[i]

    found, opaque = find_held_generators(Wrapped())
    kinds = sorted(type(g.generator).__name__ for g in found)
    assert kinds == ["Generator", "Generator", "Generator", "Random"], kinds  # torch, 2 numpy, python
    assert not opaque
    _, opaque = find_held_generators(OneShotStream())
    assert opaque == ["OneShotStream.source"]


@pytest.mark.parametrize("cls", [TorchGeneratorAugmented, NumpyGeneratorAugmented])
def test_dataset_generators_reseeded_per_sample_and_restored(cls):
    dataset = cls()
    probe = copy.deepcopy(dataset)
    expected_next = probe[0][0]  # what the dataset's generator yields next without any read
    a = AnalysisSet(0.1, 1, 16, None).materialize(dataset, None, 0, 1)
    assert torch.equal(dataset[0][0], expected_next)  # the read left the generator where it was
    b = AnalysisSet(0.1, 1, 16, None).materialize(dataset, None, 0, 1)  # generator has moved on
    for (x1, _), (x2, _) in zip(a, b, strict=True):
        assert torch.equal(x1, x2)


def test_stream_read_once_and_identical_for_a_seeded_stream():
    stream = SeededStream()
    torch.manual_seed(1)
    a = AnalysisSet(1.0, 4, 10, max_samples=25).materialize(stream, None, 0, 1)
    torch.manual_seed(2)
    b = AnalysisSet(1.0, 4, 10, max_samples=25).materialize(stream, None, 0, 1)
    assert [len(batch[1]) for batch in a] == [10, 10, 5]
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))
    assert torch.equal(torch.cat([y for _, y in a]), stream.y[:25])  # the stream's first samples


def test_moving_stream_is_read_from_a_copy():
    stream = CountingStream()
    AnalysisSet(1.0, 0, 8, max_samples=16).materialize(stream, None, 0, 1)
    assert next(stream.position) == 0  # the training stream did not move


def test_explicit_loader_read_once_with_seeded_rngs_and_its_generator_restored():
    generator = torch.Generator().manual_seed(3)
    loader = DataLoader(GlobalRngAugmented(40), batch_size=16, shuffle=True, generator=generator)
    state = generator.get_state()
    a = AnalysisSet(1.0, 2, 16, None).materialize(None, None, 0, 1, explicit_loader=loader)
    assert torch.equal(generator.get_state(), state)  # the loader's shuffling generator did not move
    torch.manual_seed(5)
    b = AnalysisSet(1.0, 2, 16, None).materialize(None, None, 0, 1, explicit_loader=loader)
    assert [len(y) for _, y in a] == [16, 16, 8]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    shard = AnalysisSet(1.0, 2, 16, None).materialize(None, None, 1, 2, explicit_loader=loader)
    assert len(shard) == 1 and torch.equal(shard[0][0], a[1][0])  # batch i goes to rank i % world


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_kept_on_the_gpu_when_they_fit():
    device = torch.device("cuda", torch.cuda.current_device())
    batches = AnalysisSet(0.1, 0, 8, None).materialize(GlobalRngAugmented(), None, 0, 1, device=device)
    assert all(x.device == device and y.device == device for x, y in batches)
    host = AnalysisSet(0.1, 0, 8, None).materialize(GlobalRngAugmented(), None, 0, 1)
    assert all(torch.equal(x.cpu(), xh) for (x, _), (xh, _) in zip(batches, host, strict=True))


def test_budget_error_names_the_fix():
    with pytest.raises(ValueError, match="max_analysis_bytes"):
        AnalysisSet(1.0, 0, 8, None, max_bytes=1000).materialize(GlobalRngAugmented(), None, 0, 1)


# --------------------------------------------------------------------------------------------
# Lightning: frozen weights, resume, bit-identical training, warning, fail-fast
# --------------------------------------------------------------------------------------------


def test_frozen_weights_with_augmentation_log_identical_values():
    """lr = 0, augmenting training data: every logged curvature and volume value is the same at every epoch."""
    hessian, volume = _monitors()
    pl.seed_everything(0, verbose=False)
    loader = DataLoader(GlobalRngAugmented(), batch_size=64, shuffle=True)
    _trainer([hessian, volume], max_epochs=3).fit(DigitsModule(hidden=8, lr=0.0), loader)
    for monitor in (hessian, volume):
        rows = _values(monitor.history)
        assert len(rows) == 3 and all(math.isfinite(v) for v in rows[0].values())
        for row in rows[1:]:
            assert row.keys() == rows[0].keys()
            assert all(_same(row[k], rows[0][k]) for k in row), (type(monitor).__name__, row, rows[0])


def test_stream_with_frozen_weights_read_once():
    hessian = HessianMonitor(num_runs=2, num_steps=8, max_samples=40, detect_sharp_drop=False)
    stream = SeededStream(200)
    pl.seed_everything(0, verbose=False)
    _trainer([hessian], max_epochs=3).fit(DigitsModule(hidden=8, lr=0.0), DataLoader(stream, batch_size=50))
    assert stream.iterations == 3 + 1  # three training epochs + one analysis read
    rows = _values(hessian.history)
    assert len(rows) == 3 and all(row == rows[0] for row in rows)


def test_resumed_run_logs_the_uninterrupted_values(tmp_path: Path):
    """Training on fixed data; the monitors analyse an augmenting dataset (``dataset=``)."""
    x, y = digits_tensors()
    clean = DataLoader(torch.utils.data.TensorDataset(x[:NUM_SAMPLES], y[:NUM_SAMPLES]), batch_size=64)

    def run(max_epochs, ckpt_path=None, checkpoint=None):
        hessian, volume = _monitors(dataset=GlobalRngAugmented())
        pl.seed_everything(ckpt_path is not None, verbose=False)  # different global RNG on resume
        callbacks = [hessian, volume] + ([checkpoint] if checkpoint else [])
        trainer = _trainer(callbacks, max_epochs=max_epochs, enable_checkpointing=True, default_root_dir=tmp_path)
        trainer.fit(DigitsModule(hidden=8, lr=0.05), clean, ckpt_path=ckpt_path)
        return hessian, volume

    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    full = run(4, checkpoint=checkpoint)
    resumed = run(4, ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    for uninterrupted, restarted in zip(full, resumed, strict=False):
        assert len(uninterrupted.history) == len(restarted.history) == 4
        tail_a, tail_b = _values(uninterrupted.history[2:]), _values(restarted.history[2:])
        assert tail_a[0] != _values(uninterrupted.history[:1])[0]  # the weights did move
        for row_a, row_b in zip(tail_a, tail_b, strict=False):
            assert all(_same(row_a[k], row_b[k]) for k in row_a), (row_a, row_b)


class _Weights(Callback):
    def on_train_end(self, trainer, pl_module):
        self.weights = [p.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("cls", [TorchGeneratorAugmented, NumpyGeneratorAugmented])
@pytest.mark.parametrize("num_workers", [0, 1])
def test_generator_holding_dataset_bit_identical_training(cls, num_workers):
    def fit(with_monitor):
        pl.seed_everything(0, verbose=False)
        loader = DataLoader(cls(), batch_size=64, shuffle=True, num_workers=num_workers)
        weights = _Weights()
        monitors = [HessianMonitor(num_runs=2, num_steps=4, detect_sharp_drop=False)] if with_monitor else []
        _trainer([*monitors, weights], max_epochs=3).fit(DigitsModule(hidden=8), loader)
        return weights.weights

    for a, b in zip(fit(True), fit(False), strict=True):
        assert torch.equal(a, b)


def test_moving_stream_bit_identical_training():
    def fit(with_monitor):
        pl.seed_everything(0, verbose=False)
        weights = _Weights()
        monitors = [HessianMonitor(num_runs=2, num_steps=4, max_samples=32, detect_sharp_drop=False)] * with_monitor
        _trainer([*monitors, weights], max_epochs=2).fit(
            DigitsModule(hidden=8), DataLoader(CountingStream(), batch_size=16)
        )
        return weights.weights

    for a, b in zip(fit(True), fit(False), strict=True):
        assert torch.equal(a, b)


class _CountSteps(Callback):
    steps = 0

    def on_train_batch_start(self, *args):
        type(self).steps += 1


def test_unisolatable_stream_warns_once_before_training():
    counter = _CountSteps()
    _CountSteps.steps = 0
    monitor = HessianMonitor(num_runs=2, num_steps=4, max_samples=32, detect_sharp_drop=False)

    with pytest.warns(UserWarning, match=r"OneShotStream.*source.*`dataset=`") as record:
        _trainer([monitor, counter], max_epochs=2).fit(
            DigitsModule(hidden=8), DataLoader(OneShotStream(), batch_size=16)
        )
    warned = [w for w in record if "OneShotStream" in str(w.message)]
    assert len(warned) == 1 and _CountSteps.steps == 8
    assert len(monitor.history) == 2 and math.isfinite(monitor.history[-1]["trace"])


def test_fit_start_read_is_shared_with_the_evaluations():
    """A dry run at ``on_fit_start`` (before Lightning loads the train loader) reads the set the evaluations use."""
    hessian = HessianMonitor(num_runs=2, num_steps=4, detect_sharp_drop=False)

    class DryRun(Callback):
        def on_fit_start(self, trainer, pl_module):
            self.batches = hessian._analysis_data(trainer)

    class Evaluations(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            assert hessian._analysis_data(trainer) is dry.batches  # kept, never re-read

    dry = DryRun()
    loader = DataLoader(GlobalRngAugmented(), batch_size=64, shuffle=True)
    _trainer([dry, hessian, Evaluations()], max_epochs=2).fit(DigitsModule(hidden=8), loader)
    assert len(dry.batches) == 1 and len(hessian.history) == 2
    fresh = AnalysisSet(0.1, hessian.seed, 256, None).materialize(GlobalRngAugmented(), None, 0, 1)
    assert torch.equal(fresh[0][0], dry.batches[0][0])


def test_over_budget_fails_before_the_first_step():
    _CountSteps.steps = 0
    monitor = HessianMonitor(num_runs=2, num_steps=4, max_analysis_bytes=1000)
    loader = DataLoader(GlobalRngAugmented(), batch_size=64)
    with pytest.raises(ValueError, match="max_analysis_bytes"):
        _trainer([monitor, _CountSteps()], max_epochs=1).fit(DigitsModule(hidden=8), loader)
    assert _CountSteps.steps == 0


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, np.int64(7), np.uint32(3), 2**63 - 1])
@pytest.mark.parametrize("cls", [HessianMonitor, LocalVolumeMonitor])
def test_integral_seeds_accepted(cls, seed):
    monitor = cls(seed=seed)
    assert monitor.seed == int(seed) and type(monitor.seed) is int


@pytest.mark.parametrize("seed", [-1, 2**63, 2**70, 1.0, True, "1", None, np.float64(2.0)])
@pytest.mark.parametrize("cls", [HessianMonitor, LocalVolumeMonitor])
def test_bad_seeds_rejected_at_construction(cls, seed):
    with pytest.raises(ValueError, match=r"`seed` must be an integer in \[0, 2\*\*63\)"):
        cls(seed=seed)


def test_largest_seed_runs_both_monitors():
    hessian, volume = _monitors(seed=np.uint64(2**63 - 1))
    pl.seed_everything(0, verbose=False)
    loader = DataLoader(GlobalRngAugmented(), batch_size=64)
    _trainer([hessian, volume], max_epochs=1).fit(DigitsModule(hidden=8), loader)
    assert math.isfinite(hessian.history[0]["trace"]) and math.isfinite(volume.history[0]["log_volume"])


# --------------------------------------------------------------------------------------------
# DDP: each rank reads its shard; the estimate equals the single-process one on the same set
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="gloo is needed"
)
def test_ddp_shards_of_an_augmenting_dataset_give_the_single_process_estimate(tmp_path: Path):
    from lightning_hessian import HessianOperator, spectral_density
    from lightning_hessian.callbacks import default_classification_loss
    from lightning_hessian.operators.sharded_space import parameter_space
    from tests.ddp_helpers import digits_module, fit, hessian_monitor

    monitor = hessian_monitor(dataset=GlobalRngAugmented(200), seed=11)
    records = fit(tmp_path, [monitor], digits_module, start_method="spawn", max_epochs=1)
    assert [r["world_size"] for r in records] == [2, 2]
    logged = records[0]["histories"]["HessianMonitor"][0]
    assert records[1]["histories"]["HessianMonitor"][0]["trace"] == logged["trace"]

    single = AnalysisSet(monitor.analysis_fraction, 11, monitor.analysis_batch_size, None)
    batches = single.materialize(GlobalRngAugmented(200), None, 0, 1)  # one process reads everything
    assert single.indices == records[0]["indices"]["HessianMonitor"]
    model = digits_module()
    model.load_state_dict(records[0]["weights"][0])
    op = HessianOperator(
        model, default_classification_loss, batches, vector_space=parameter_space(list(model.parameters()))
    )
    sd = spectral_density(op, num_runs=monitor.num_runs, num_steps=monitor.num_steps, seed=11)
    reference = {"trace": sd.deflated_trace, "top_eigenvalue": float(sd.top_ritz_values(1)[0][0])}
    for key, value in reference.items():
        assert logged[key] == pytest.approx(value, rel=1e-5), key
