"""Smoke test of ``benchmarks/bench_gpu.py --small`` (tiny shapes, CPU): it runs and reports sane figures."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_bench_gpu_small_runs_on_cpu(capsys):
    bench = _load()
    results = bench.main(
        ["--small", "--device", "cpu", "--num-runs", "2", "--num-steps", "2", "--widths", "2", "--repeats", "1"]
    )
    out = capsys.readouterr().out
    assert [r["name"] for r in results] == ["ResNet-18 (--small)", "GPT-2-small shape (--small)"]
    for r in results:
        assert r["num_params"] > 0 and r["gradient_s"] > 0 and r["epoch_s"] > 0
        assert r["evaluation_hvps"] == 2 * 2  # num_runs x num_steps
        assert math.isnan(r["peak_extra_bytes"])  # CPU: n/a
        assert {(b, w) for b, w, _, _ in r["hvp"]["rows"]} == {(b, w) for b in ("func", "autograd") for w in (2,)}
        assert set(r["hvp"]["choices"]) == {2}
    assert "HVP/grad" in out and "n/a (CPU)" in out and "PyHessian" in out


def test_full_size_models_have_the_documented_shapes():
    bench = _load()
    resnet = bench.ResNet18()
    assert sum(p.numel() for p in resnet.parameters()) == 11_173_962
    assert resnet(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with torch.device("meta"):
        gpt = bench.GPT()
    assert sum(p.numel() for p in gpt.parameters()) == 124_439_808  # GPT-2 small, tied embeddings
