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


def _load_study():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sharp_drop_study.py"
    spec = importlib.util.spec_from_file_location("sharp_drop_study", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sharp_drop_study"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_sharp_drop_study_quick(tmp_path):
    """``benchmarks/sharp_drop_study.py --quick``: two tiny runs (digits MLP, tiny GPT) end to end."""
    study = _load_study()
    threads = torch.get_num_threads()
    try:
        out = study.main(["--quick", "--out", str(tmp_path / "study")])
    finally:
        torch.set_num_threads(threads)
    results, summary = out["results"], out["summary"]
    assert [r["run"] for r in results] == ["quick-mlp", "quick-gpt"]
    assert [r["evaluations"] for r in results] == [6, 6]
    assert summary["runs"] == 2
    for r in results:
        assert 0 <= r["plateau_at"] < r["evaluations"]
        for key in ("drop_p0", "drop_p5", "es_p3", "es_p5"):
            assert 0.0 <= r[f"{key}_saved"] < 1.0 and r[f"{key}_lost"] >= 0.0
    for suffix in (".csv", ".md", "_raw.json"):
        assert (tmp_path / f"study{suffix}").stat().st_size > 0
    # the stock EarlyStopping replay: it stops after `patience` evaluations without improvement
    rows = [{"val_loss": v} for v in (1.0, 0.5, 0.6, 0.7, 0.8, 0.4)]
    assert study.early_stopping_stop(rows, 3) == 4
    assert study.early_stopping_stop(rows, 4) is None
