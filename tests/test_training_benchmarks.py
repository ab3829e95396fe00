"""The training benchmarks' tools: a profiled step counts what it should, and ``benchmarks/train_unpaired.py`` runs
its cases end to end on the tiny config (the numbers in the README come from the same code at full size)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from turbo_i2i.benchmark_harness import profile_markdown, profile_step

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


FAKE_WORKER = """
import json, sys
args = sys.argv[1:]
case, size = args[args.index("--cases") + 1], int(args[args.index("--sizes") + 1])
with open(sys.argv[0] + ".log", "a") as log:
    log.write(case + "\\n")
if case == "broken":
    sys.exit("no GPU memory left")
seconds = {"a": [2.0, 4.0], "b": [1.0, 1.0]}[case]
runs = open(sys.argv[0] + ".log").read().split().count(case)
print(json.dumps(dict(seconds=[s * runs for s in seconds], seconds_per_step=sum(seconds) * runs / 2,
                      peak_memory_gib=float(runs))))
"""


def test_rounds_alternate_the_order_merge_the_steps_and_report_after_every_run(tmp_path):
    import argparse

    from turbo_i2i.benchmark_harness import run_training_cases

    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    args = argparse.Namespace(
        sizes=[32], cases=["a", "b", "broken"], rounds=2, device="cpu", config="tiny", reference=tmp_path, steps=2,
        warmup=0, profile=False, timeout=60,
    )  # fmt: skip
    partial = []
    results = run_training_cases(str(script), args, "seconds_per_step", on_result=lambda r: partial.append(r))
    # round 2 runs the cases in reverse order, so drift over the run falls on every case alike
    assert (tmp_path / "worker.py.log").read_text().split() == ["a", "b", "broken", "broken", "b", "a"]
    assert [len(r) for r in partial] == [1, 2, 3, 3, 3, 3]  # a report after each run, cases in the given order
    a, b, broken = results
    assert a["seconds"] == [2.0, 4.0, 4.0, 8.0] and a["seconds_per_step"] == 4.0  # median over both rounds' steps
    assert a["round_medians"] == [3.0, 6.0] and a["peak_memory_gib"] == 2.0  # the larger round's memory
    assert b["round_medians"] == [1.0, 2.0] and "failed_rounds" not in b
    assert "no GPU memory left" in broken["error"] and broken["failed_rounds"] == 2


def test_a_failed_round_is_counted_and_left_out_of_the_median():
    from turbo_i2i.benchmark_harness import merge_rounds

    first = dict(case="a", seconds=[1.0, 3.0], seconds_per_iteration=2.0, peak_memory_gib=5.0, gpu_states=[None, None])
    merged = merge_rounds(merge_rounds(None, first, "seconds_per_iteration"), {"error": "timed out"}, "x")
    assert merged["seconds"] == [1.0, 3.0] and merged["round_medians"] == [2.0] and merged["failed_rounds"] == 1
    both = merge_rounds(merged, {**first, "gpu_states": [{"sm_mhz": 1.0}] * 2}, "seconds_per_iteration")
    assert both["seconds"] == [1.0, 3.0] * 2 and both["gpu_states"] == [None, None, {"sm_mhz": 1.0}, {"sm_mhz": 1.0}]
    # a first round that failed, then one that measured: the measurement, with the failure counted
    later = merge_rounds(merge_rounds(None, {"error": "out of memory"}, "x"), first, "seconds_per_iteration")
    assert "error" not in later and later["round_medians"] == [2.0] and later["failed_rounds"] == 1


def test_gpu_state_reads_nvidia_smi_numbers_and_is_recorded_only_on_gpus():
    from turbo_i2i.benchmark_harness import parse_gpu_state, time_steps

    assert parse_gpu_state("1980, 61, 512.35\n") == {"sm_mhz": 1980.0, "temperature_c": 61.0, "power_w": 512.35}
    assert parse_gpu_state("1410, 40, [N/A]") == {"sm_mhz": 1410.0, "temperature_c": 40.0, "power_w": None}
    assert parse_gpu_state("No devices were found") is None
    states: list = []
    times, _ = time_steps(lambda: None, torch.device("cpu"), warmup=1, repeats=2, gpu_states=states)
    assert len(times) == 2 and states == []  # no GPU to read
