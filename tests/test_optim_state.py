"""optim_state: per-parameter optimizer state across several optimizers, read-only."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_hessian.optim_state import adam_state, param_groups


def _two_optimizers(adam_cls: type = torch.optim.Adam):
    torch.manual_seed(0)
    body, head = nn.Linear(3, 4), nn.Linear(4, 2)
    opt_body = adam_cls(body.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-7)
    opt_head = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        opt_body.zero_grad(), opt_head.zero_grad()
        head(torch.tanh(body(torch.randn(8, 3)))).pow(2).mean().backward()
        opt_body.step(), opt_head.step()
    return body, head, opt_body, opt_head


@pytest.mark.parametrize("adam_cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("bias_corrected", [True, False])
def test_adam_state_bias_correction_and_owners(adam_cls: type, bias_corrected: bool) -> None:
    body, head, opt_body, opt_head = _two_optimizers(adam_cls)
    params = [*body.parameters(), *head.parameters()]
    before = [t.clone() for s in opt_body.state.values() for t in s.values() if torch.is_tensor(t)]
    state = adam_state(params, [opt_head, opt_body], ["w", "b", "hw", "hb"], bias_corrected=bias_corrected)
    after = [t for s in opt_body.state.values() for t in s.values() if torch.is_tensor(t)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # read-only
    assert state.missing == ["hw", "hb"] and not state.complete
    assert state.optimizer_index == [1, 1, 0, 0]
    assert state.steps == [4, 4, 0, 0]
    assert state.lr == [1e-2, 1e-2, 0.1, 0.1]
    assert state.eps[:2] == [1e-7, 1e-7] and math.isnan(state.eps[2])
    assert state.beta1[:2] == [0.8, 0.8] and state.beta2[:2] == [0.99, 0.99]
    raw = opt_body.state[body.weight]["exp_avg_sq"]
    factor = 1.0 / (1 - 0.99**4) if bias_corrected else 1.0
    torch.testing.assert_close(state.second_moments[0], raw * factor, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="hw"):
        state.flat()
    full = adam_state(list(body.parameters()), opt_body)
    assert full.complete and full.flat().numel() == 3 * 4 + 4


def test_parameter_in_two_optimizers_is_refused() -> None:
    layer = nn.Linear(2, 2)
    a, b = torch.optim.Adam(layer.parameters()), torch.optim.SGD([layer.weight], lr=0.1)
    with pytest.raises(ValueError, match="ambiguous"):
        param_groups(layer.parameters(), [a, b])


def test_lightning_optimizer_is_unwrapped() -> None:
    class Wrapper:
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self._optimizer = inner

    body, _, opt_body, _ = _two_optimizers()
    state = adam_state(list(body.parameters()), [Wrapper(opt_body)])
    assert state.complete and state.optimizer_names == ["Adam", "Adam"]
