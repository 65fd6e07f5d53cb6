"""GGNOperator against explicit J^T H_l J built from float64 Jacobians."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian import (
    GGNOperator,
    HessianOperator,
    spectral_density,
    top_eigenvalues,
)
from lightning_hessian.callbacks import HessianMonitor
from lightning_hessian.callbacks._base import default_classification_loss
from tests.curvature_truth import (
    classification_batches,
    exact_ce_ggn,
    exact_jacobians,
    exact_loss_hessian,
    identity_products,
    tanh_mlp,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def ce_case():
    model = tanh_mlp(layernorm=True)
    batches = classification_batches(sizes=(13, 7))
    return model, batches, exact_ce_ggn(model, batches, class_dim=-1)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"backend": "func"}, {"loss_hessian": "autograd"}, {"backend": "autograd"}, {"max_batched_vectors": 3}],
)
def test_ce_ggn_products_equal_explicit(ce_case, kwargs):
    model, batches, truth = ce_case
    op = GGNOperator(model, F.cross_entropy, batches, **kwargs)
    assert op.loss_hessian == kwargs.get("loss_hessian", "cross_entropy")
    v = torch.randn(op.num_params, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert _rel(op.matmat(v), truth @ v) <= 1e-10  # 9 vectors: vmapped torch.func path under "auto"
    assert _rel(op.matmat(v[:, :5]), truth @ v[:, :5]) <= 1e-10  # few vectors: double-VJP path under "auto"
    assert _rel(op.matvec(v[:, 0]), truth @ v[:, 0]) <= 1e-10
    assert op.num_hvps == 15


def test_ggn_is_psd_and_counts(ce_case):
    model, batches, truth = ce_case
    op = GGNOperator(model, F.cross_entropy, batches)
    dense = identity_products(op)
    assert torch.allclose(dense, dense.T, atol=1e-13)
    eig = torch.linalg.eigvalsh(dense)
    assert eig[0] >= -1e-6 * eig[-1]
    assert torch.allclose(eig, torch.linalg.eigvalsh(truth), atol=1e-10)
    top = top_eigenvalues(op, k=1, tol=1e-10)
    assert top.values[0].item() == pytest.approx(eig[-1].item(), rel=1e-5)
    bottom = top_eigenvalues(op, k=1, which="smallest", max_iter=40)
    assert bottom.values[0].item() >= -1e-6 * eig[-1].item()
    sd = spectral_density(op, num_runs=2, num_steps=20)
    assert sd.min_eigenvalue >= -1e-6 * eig[-1].item()


def test_sequence_logits_with_ignore_index():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()  # [B, T, 3] -> [B, T, 5]
    g = torch.Generator().manual_seed(2)
    batches = []
    for b in (3, 2):
        x = torch.randn(b, 4, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (b, 4), generator=g)
        y[0, 1:3] = -100
        batches.append((x, y))
    truth = exact_ce_ggn(model, batches, class_dim=-1, ignore_index=-100)
    closed = GGNOperator(model, default_classification_loss, batches, loss_hessian="cross_entropy", class_dim=-1)
    auto = GGNOperator(model, default_classification_loss, batches)  # unrecognised loss -> autograd
    assert auto.loss_hessian == "autograd"
    v = torch.randn(closed.num_params, 4, dtype=torch.float64, generator=g)
    assert _rel(closed.matmat(v), truth @ v) <= 1e-10
    assert _rel(auto.matmat(v), truth @ v) <= 1e-10
    # [B, C, T] layout of F.cross_entropy (class_dim=1), nn.CrossEntropyLoss(ignore_index=...) recognised
    perm = [(x, y.masked_fill(y == -100, 7)) for x, y in batches]
    loss = nn.CrossEntropyLoss(ignore_index=7)

    class ChannelsFirst(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).transpose(1, 2)

    op = GGNOperator(ChannelsFirst(model), loss, perm)
    assert (op.loss_hessian, op.class_dim, op.ignore_index) == ("cross_entropy", 1, 7)
    assert _rel(op.matmat(v), truth @ v) <= 1e-10


def test_mse_ggn_and_linear_least_squares_equals_hessian():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randn(b, 2, generator=g, dtype=torch.float64))
        for b in (9, 4)
    ]
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    op = GGNOperator(model, F.mse_loss, batches)
    assert op.loss_hessian == "mse"
    total = sum(x.shape[0] for x, _ in batches)
    truth = sum(
        (x.shape[0] / total) * (2.0 / (x.shape[0] * 2)) * (j.reshape(-1, j.shape[-1]).T @ j.reshape(-1, j.shape[-1]))
        for (x, _), (_, j) in ((b, exact_jacobians(model, b[0])) for b in batches)
    )
    v = torch.randn(op.num_params, 3, dtype=torch.float64, generator=g)
    assert _rel(op.matmat(v), truth @ v) <= 1e-10
    assert _rel(GGNOperator(model, nn.MSELoss(), batches, loss_hessian="autograd").matmat(v), truth @ v) <= 1e-10
    # a linear model's loss Hessian is its GGN (no second derivative of the network)
    linear = nn.Linear(4, 2).double()
    hess = exact_loss_hessian(linear, F.mse_loss, batches)
    assert torch.allclose(identity_products(GGNOperator(linear, F.mse_loss, batches)), hess, atol=1e-12)


def test_float32_model_in_float64_and_model_state_untouched(ce_case):
    _model, batches, truth = ce_case
    m32 = tanh_mlp(layernorm=True).float()
    b32 = [(x.float(), y) for x, y in batches]
    before = {k: v.clone() for k, v in m32.state_dict().items()}
    op = GGNOperator(m32, F.cross_entropy, b32, compute_dtype=torch.float64)
    v = torch.randn(op.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert _rel(op.matmat(v), truth @ v) <= 1e-6  # float32 weights, float64 products
    assert all(torch.equal(before[k], v) for k, v in m32.state_dict().items())
    assert all(p.grad is None for p in m32.parameters())


def test_ggn_validation():
    model = tanh_mlp()
    batches = classification_batches()
    with pytest.raises(TypeError, match="loss_fn"):
        GGNOperator(model, data=batches, batch_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(ValueError, match="loss_hessian"):
        GGNOperator(model, F.cross_entropy, batches, loss_hessian="fisher")
    with pytest.raises(ValueError, match="batch_loss"):
        HessianMonitor(curvature="ggn", batch_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(ValueError, match="curvature"):
        HessianMonitor(curvature="fisher")
    assert isinstance(GGNOperator(model, F.cross_entropy, batches), HessianOperator)  # shares its machinery


def test_monitor_ggn_top_eigenvalue_matches_exact():
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Subset

    from tests.lightning_helpers import (
        DigitsModule,
        digits_dataset,
        digits_loader,
        trainer_kwargs,
    )

    pl.seed_everything(0, verbose=False)
    module = DigitsModule(hidden=4)
    monitor = HessianMonitor(curvature="ggn", num_runs=2, num_steps=25, analysis_fraction=0.1, log_density=False)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1))
    trainer.fit(module, digits_loader(limit=300))
    batches = list(DataLoader(Subset(digits_dataset(300), monitor.analysis.indices), batch_size=10**9))
    truth = exact_ce_ggn(module, batches, class_dim=-1)
    eig = torch.linalg.eigvalsh(truth)
    row = monitor.history[-1]
    assert row["top_eigenvalue"] == pytest.approx(eig[-1].item(), rel=1e-4)
    assert row["min_eigenvalue"] >= -1e-5 * eig[-1].item()


def test_monitor_ggn_on_padded_sequences_matches_explicit_token_mean():
    """[B, T, V] logits, -100 padding, default loss and weights: the GGN of the token mean."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from tests.lightning_helpers import trainer_kwargs

    class SeqModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.emb(tokens)))

        def training_step(self, batch, batch_idx):
            tokens, targets = batch
            return F.cross_entropy(self(tokens).transpose(1, 2), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (40, 5), generator=g)
    targets = tokens.roll(1, dims=1)
    targets[::3, 3:] = -100  # padded tails of different lengths
    data = TensorDataset(tokens, targets)
    monitor = HessianMonitor(
        curvature="ggn", num_runs=2, num_steps=20, analysis_fraction=0.5, analysis_batch_size=7, log_density=False
    )
    pl.seed_everything(0, verbose=False)
    module = SeqModule()
    pl.Trainer(callbacks=[monitor], **trainer_kwargs(max_epochs=1)).fit(module, DataLoader(data, batch_size=10))
    subset = Subset(data, monitor.analysis.indices)
    x, y = next(iter(DataLoader(subset, batch_size=len(subset))))
    truth = exact_ce_ggn(module, [(x, y)], class_dim=-1, ignore_index=-100)  # one batch: the token mean
    assert monitor.history[-1]["top_eigenvalue"] == pytest.approx(torch.linalg.eigvalsh(truth)[-1].item(), rel=1e-4)
