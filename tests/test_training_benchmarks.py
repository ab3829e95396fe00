"""The training benchmarks' tools: a profiled step counts what it should, and ``benchmarks/train_unpaired.py`` runs
its cases end to end on the tiny config (the numbers in the README come from the same code at full size)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from turbo_i2i.benchmark import profile_markdown, profile_step

ROOT = Path(__file__).resolve().parents[1]


def test_profile_step_counts_operators_and_host_syncs():
    x = torch.arange(12.0)

    def step():
        return float((x * 2).sum()) + float(x.max())  # two reads of a tensor value on the host

    step()
    profile = profile_step(step, torch.device("cpu"), rows=3)
    assert profile["syncs"] == 2 and profile["device_ms"] == 0.0 and profile["kernel_launches"] == 0
    assert profile["operators"] >= 5  # mul, sum, max and the two value reads
    assert len(profile["top"]) == 3 and all(t["name"].startswith("aten::") for t in profile["top"])
    assert profile["wall_ms"] >= 0 and profile["host_ms"] >= 0


def test_profile_markdown_lists_only_profiled_cases():
    assert profile_markdown([{"case": "public", "size": 64}]) == ""
    profile = dict(wall_ms=10.4, host_ms=8.2, device_ms=3.0, operators=120, kernel_launches=40, syncs=2,
                   top=[dict(name="aten::mm", calls=7, self_ms=1.5)])  # fmt: skip
    text = profile_markdown([{"case": "public", "size": 64}, {"case": "ours-fp32", "size": 64, "profile": profile}])
    assert "| 64 | ours-fp32 | 10 | 8 | 3 | 120 | 40 | 2 |" in text and "public" not in text
    assert "aten::mm 1.5 ms (7)" in text


def test_unpaired_benchmark_runs_its_cases_and_profiles_them(tmp_path):
    out = tmp_path / "bench"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "train_unpaired.py"), "--config", "tiny", "--sizes", "32",
        "--cases", "public", "ours-fp32", "--steps", "1", "--warmup", "1", "--profile", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = {r["case"]: r for r in json.loads(out.with_suffix(".json").read_text())["results"]}
    assert results["public"]["passes_per_iteration"] == 8 and results["ours-fp32"]["passes_per_iteration"] == 6
    public, ours = results["public"]["profile"], results["ours-fp32"]["profile"]
    # six passes and one generator step instead of eight passes and three steps: fewer operator calls and host syncs
    assert ours["operators"] < 0.8 * public["operators"] and ours["syncs"] < public["syncs"]
    table = out.with_suffix(".md").read_text()
    assert "| 32 | ours-fp32 | 6 |" in table and "torch.profiler" in table
