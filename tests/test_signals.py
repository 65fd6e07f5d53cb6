"""SIGTERM / SIGINT during an evaluation, and resumes that fill the gap (subprocesses: pytest is never signalled).

Each scenario of :mod:`tests.signal_helpers` runs in its own Python process with a wall-clock
timeout (a hang fails the test). The analysis loss sleeps, so one product lasts a known time
(``PRODUCT_SLEEP_S`` per micro-batch) and the uninterrupted evaluation ~4 s; the signal is sent
1 s into it from a timer thread.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.ddp_helpers import ROOT
from tests.signal_helpers import MICRO_BATCHES, PRODUCT_SLEEP_S

TIMEOUT_S = 240
# "within 2 s of the signal plus one product"; one product sleeps PRODUCT_SLEEP_S per micro-batch
STOP_BOUND_S = 2.0 + 2 * PRODUCT_SLEEP_S * MICRO_BATCHES


def _run(scenario: str, out_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.signal_helpers", scenario, str(out_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    records = [torch.load(p, weights_only=False) for p in sorted(out_dir.glob("rank*.pt"))]
    assert records, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode, records


def _assert_stopped(record: dict[str, Any], exception: str, reason: str) -> None:
    assert record["exception"] == exception
    before, after = record["weights_before"], record["weights_at_exception"]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored exactly
    assert record["training_at_exception"] == record["training_before"]
    for g0, g1 in zip(record["grads_before"], record["grads"], strict=True):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    assert record["histories"] == [[]]  # no row for the interrupted evaluation
    (missed,) = record["missed"]
    assert [(m["epoch"], m["reason"]) for m in missed] == [(1, reason)]


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("sigterm")
    rc, records = _run("sigterm", out)
    return out, rc, records


def test_sigterm_stops_the_evaluation_within_one_product(sigterm_run: Any) -> None:
    out, rc, (record,) = sigterm_run
    assert rc == 0  # SIGTERMException is a SystemExit without a code
    _assert_stopped(record, "SIGTERMException", "SIGTERM")
    assert record["exception_time"] - record["signal_time"] <= STOP_BOUND_S
    assert (out / "ckpt" / "interrupted.ckpt").is_file()  # Lightning's on_exception path ran
    assert any("stopped by SIGTERM" in w for w in record["warnings"])


@pytest.mark.parametrize("mode", ["rerun", "warn"])
def test_resume_fills_or_names_the_interrupted_evaluation(sigterm_run: Any, tmp_path: Path, mode: str) -> None:
    out, _, _ = sigterm_run
    shutil.copytree(out / "ckpt", tmp_path / "ckpt")
    _, (record,) = _run(f"resume-{mode}", tmp_path)
    (history,) = record["histories"]
    if mode == "rerun":
        # the missed row, at its epoch/step, on the restored (= interrupted) weights; no warning
        assert [(row["epoch"], row["step"]) for row in history] == [(1.0, 8.0)]
        assert history[0]["num_hvps"] == 80 and torch.isfinite(torch.tensor(history[0]["trace"]))
        assert record["missed"] == [[]]
        assert not any("no valid history row" in w for w in record["warnings"])
    else:
        assert history == []
        (warning,) = [w for w in record["warnings"] if "no valid history row" in w]
        assert "epoch 1 (SIGTERM)" in warning and "resume_missed='warn'" in warning


def test_sigint_stops_the_evaluation(tmp_path: Path) -> None:
    rc, (record,) = _run("sigint", tmp_path)
    assert rc == 1  # Lightning's graceful shutdown exits with 1
    _assert_stopped(record, "KeyboardInterrupt", "SIGINT")
    assert record["exception_time"] - record["signal_time"] <= STOP_BOUND_S
    assert (tmp_path / "ckpt" / "interrupted.ckpt").is_file()


def test_sigterm_stops_the_volume_between_cost_evaluations(tmp_path: Path) -> None:
    _, (record,) = _run("sigterm-volume", tmp_path)
    _assert_stopped(record, "SIGTERMException", "SIGTERM")
    assert record["exception_time"] - record["signal_time"] <= STOP_BOUND_S
    assert (tmp_path / "ckpt" / "interrupted.ckpt").is_file()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo is needed")
def test_sigterm_on_one_ddp_rank_stops_every_rank(tmp_path: Path) -> None:
    _, records = _run("sigterm-ddp1", tmp_path)
    assert len(records) == 2
    signalled = records[1]
    assert records[0]["signal_time"] is None and signalled["signal_time"] is not None
    for record in records:
        _assert_stopped(record, "SIGTERMException", "SIGTERM")
        assert record["exception_time"] - signalled["signal_time"] <= STOP_BOUND_S
    assert records[0]["missed"] == records[1]["missed"]
    assert (tmp_path / "ckpt" / "interrupted.ckpt").is_file()
