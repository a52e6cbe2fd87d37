"""bench/gpu.py (issue 13, item 5): the smoke run writes every section with sane numbers, the time guard
still writes results when the budget is spent, and FLOPs / MFU are counted as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu
from tests.conftest import REPO


def _bench(out: Path, *extra: str, timeout: int = 900) -> dict:
    res = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(out), *extra], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (out / "gpu.md").read_text().startswith("GPU bench (smoke)")
    return json.loads((out / "gpu.json").read_text())


@pytest.mark.slow  # ~1-4 min on 2 shared cores: tiny SDXL and FLUX, then two `atelier run`s, each with a Prefect server
def test_smoke_run_writes_every_section_with_sane_numbers(tmp_path: Path) -> None:
    data = _bench(tmp_path, "--peak-tflops", "1")  # a stated peak, so MFU is computed on CPU too
    sec = data["sections"]
    assert list(sec) == list(gpu.SECTIONS)
    assert all(s["status"] == "ok" for s in sec.values()), {k: (v["status"], v.get("error")) for k, v in sec.items()}
    assert data["device"]["peak_tflops"] == 1 and data["elapsed_s"] < data["budget_s"]
    # drafts: A and B per batch size, one round each; no CFG at guidance 1: UNet samples = images x steps
    d = sec["drafts"]
    assert set(d["batches"]) == {"1", "2"}
    for row in d["batches"].values():
        assert len(row["atelier_s"]) == len(row["bare_s"]) == gpu.SMOKE.rounds
        assert min(row["atelier_s"] + row["bare_s"]) > 0
        assert 0.1 < row["ratio"] < 10  # same work on both sides
        assert row["unet_samples"] == d["images"] * d["steps"] == 8
        assert row["flops"] == pytest.approx(d["unet_flops_per_sample"] * 8)
        assert 0 < row["mfu"] < 1 and row["peak_gpu_gib"] is None  # CPU: no GPU memory to read
    assert d["batching_gain"] > 0
    # refine: int(4 x 0.55) = 2 steps run, CFG doubles the batch: 2 images x 2 steps x 2 = 8 UNet samples per call
    r = sec["refine"]
    assert r["units_per_call"] == 8 and r["flops"] == pytest.approx(8 * r["flops_per_unit"])
    assert 0 < r["seconds_per_image"] and 0 < r["mfu"] < 1
    # flux: 2 images x 4 steps, no CFG
    f = sec["flux"]
    assert f["units_per_call"] == 8 and f["flops_per_unit"] > 0 and 0 < f["mfu"] < 1
    # upscale: 32 px input in 16 px tiles padded by 10 px: 4 tiles of 26x26 px through RRDBNet
    u = sec["upscale"]["tiles"]["16"]
    assert u["units_per_call"] == 4 * 26 * 26 and u["flops_per_unit"] > 0 and u["median_s"] > 0
    # campaign: a cold run that computed, then an unchanged re-run that made no model call
    c = sec["campaign"]["profiles"]["tiny"]
    assert c["status"] == "ok"
    assert c["cold"]["model_calls"] > 0 and c["cold"]["computed"] > 0
    assert c["rerun"]["model_calls"] == 0 and c["rerun"]["computed"] == 0
    assert 0 <= c["cold"]["overhead"] < 1 and 0 < c["rerun_ratio"] < 1
    md = (tmp_path / "gpu.md").read_text()
    for name in gpu.SECTIONS:
        assert f"| {name} |" in md


def test_spent_budget_still_writes_every_section(tmp_path: Path) -> None:
    """A budget spent before the first section: it is cut or skipped, the rest skipped, the files written."""
    data = _bench(tmp_path, "--budget", "0.5", timeout=300)
    sec = data["sections"]
    assert list(sec) == list(gpu.SECTIONS)
    assert sec["drafts"]["status"] in ("cut", "skipped")
    assert all(sec[n]["status"] == "skipped" and "time" in sec[n]["reason"] for n in gpu.SECTIONS[1:])


def test_peak_table() -> None:
    assert gpu.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops_for("NVIDIA H200") == 989e12
    assert gpu.peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.peak_flops_for("NVIDIA GeForce RTX 4090") is None  # unknown: MFU omitted


def test_flop_meter_counts_units_and_flops_per_unit() -> None:
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    meter = gpu.FlopMeter(net, gpu._batch)
    with torch.no_grad():
        net(torch.randn(3, 16))
        assert meter.count_flops() == 2 * (16 * 32 + 32 * 8)  # per sample: a multiply and an add per weight
        net(torch.randn(5, 16))
    assert meter.take() == 8 and meter.take() == 0  # the re-run for counting is not a call of the bench
    meter.remove()
    net(torch.randn(2, 16))
    assert meter.take() == 0
