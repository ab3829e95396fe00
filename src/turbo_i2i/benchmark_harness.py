"""The harness the training benchmarks (``benchmarks/train_*.py``) share: timing steps with their peak memory and the
GPU's state, profiling one step, running each case in a fresh worker process over several rounds, and their tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .benchmark import PeakMemory, default_reference, synchronize


def time_steps(
    step: Callable[[], object], device: torch.device, warmup: int, repeats: int, gpu_states: list | None = None
) -> tuple[list[float], int]:
    """Seconds of each of ``repeats`` calls of ``step`` after ``warmup`` untimed ones, and the peak memory of all.

    Args:
        step: one training step (or any call) to time.
        device: where it runs (CUDA is synchronised around each call).
        warmup: untimed calls first (their memory counts: the first step allocates the optimiser states).
        repeats: timed calls.
        gpu_states: on an NVIDIA GPU, ``gpu_state`` is appended to it after each timed call (outside the timing), to
            tell a GPU that lowers its clocks as it heats from a step that got slower.

    Returns:
        (seconds per timed call, peak bytes: ``torch.cuda.max_memory_allocated`` or the sampled peak RSS).
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
    times = []
    with PeakMemory(device) as memory:
        for i in range(warmup + repeats):
            synchronize(device)
            started = time.perf_counter()
            step()
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - started)
                if gpu_states is not None and device.type == "cuda":
                    gpu_states.append(gpu_state(device))
    return times, memory.peak


def measure_steps(step: Callable[[], object], device: torch.device, warmup: int, repeats: int, profile: bool) -> dict:
    """What the training benchmarks record of a case's steps: ``time_steps`` (with the GPU's state after each timed
    step) and, when asked, ``profile_step`` of one more step.

    Args:
        step, device, warmup, repeats: as for ``time_steps``.
        profile: also profile one more step, after the timed ones.

    Returns:
        {"seconds", "peak_memory_gib", "gpu_states"} and, with ``profile``, "profile".
    """
    gpu_states: list = []
    times, peak = time_steps(step, device, warmup, repeats, gpu_states)
    measured = dict(seconds=times, peak_memory_gib=peak / 2**30, gpu_states=gpu_states)
    if profile:
        measured["profile"] = profile_step(step, device)
    return measured


GPU_STATE_FIELDS = ("clocks.sm", "temperature.gpu", "power.draw")


def gpu_state(device: torch.device) -> dict | None:
    """The NVIDIA GPU's SM clock (MHz), temperature (C) and power draw (W) now, as ``nvidia-smi`` reports them.

    Args:
        device: a CUDA device.

    Returns:
        {"sm_mhz", "temperature_c", "power_w"}, or None where ``nvidia-smi`` is missing or does not answer.
    """
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        # by UUID: nvidia-smi numbers the GPUs its own way, CUDA_VISIBLE_DEVICES renumbers them for torch
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        fields = ",".join(GPU_STATE_FIELDS)
        query = ["nvidia-smi", "-i", uuid, f"--query-gpu={fields}", "--format=csv,noheader,nounits"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True)
    except (AttributeError, OSError, subprocess.SubprocessError):
        return None
    return parse_gpu_state(done.stdout)


def parse_gpu_state(line: str) -> dict | None:
    """``nvidia-smi``'s "clock, temperature, power" line as numbers (None for what it cannot read, e.g. "[N/A]")."""
    values = [v.strip() for v in line.strip().split(",")]
    if len(values) != len(GPU_STATE_FIELDS):
        return None

    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    return dict(zip(("sm_mhz", "temperature_c", "power_w"), map(number, values)))


def profile_step(step: Callable[[], object], device: torch.device, rows: int = 12) -> dict:
    """One call of ``step`` under ``torch.profiler``: where its time goes (is it bound by the host or the device?).

    Args:
        step: the call to profile (run it once before, so that first-call costs are not counted).
        device: where it runs.
        rows: how many operators to list.

    Returns:
        ``wall_ms`` (the call, synchronised), ``host_ms`` (self CPU time of the operators and CUDA runtime calls; the
        Python between them is not counted), ``device_ms`` (self time of all CUDA kernels; 0 on the CPU),
        ``operators`` (ATen operator calls, nested ones included), ``kernel_launches``, ``syncs`` (reads of a device
        value on the host, e.g. ``.item()``: each waits for the device), and ``top``: the ``rows`` operators with the
        most self time (device time on CUDA).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        step()
        synchronize(device)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    on_device = device.type == "cuda"

    def self_ms(event) -> float:
        return (event.self_device_time_total if on_device else event.self_cpu_time_total) / 1e3

    top = sorted(events, key=self_ms, reverse=True)[:rows]
    return dict(
        wall_ms=1e3 * wall,
        host_ms=sum(e.self_cpu_time_total for e in events) / 1e3,
        device_ms=sum(e.self_device_time_total for e in events) / 1e3 if on_device else 0.0,
        operators=sum(e.count for e in events if e.key.startswith("aten::")),
        kernel_launches=sum(e.count for e in events if "LaunchKernel" in e.key),
        syncs=sum(e.count for e in events if e.key == "aten::_local_scalar_dense"),
        top=[dict(name=e.key, calls=e.count, self_ms=round(self_ms(e), 3)) for e in top],
    )


def profile_markdown(results: list[dict]) -> str:
    """The ``profile`` entries of a training benchmark's results as a markdown section ("" when none has one).

    Args:
        results: the cases' measurements; those profiled carry ``profile_step``'s dict under ``profile``.

    Returns:
        a table of wall, host and device time, operator calls, launches and syncs per step, then each case's busiest
        operators.
    """
    profiled = [r for r in results if "profile" in r]
    if not profiled:
        return ""
    lines = [
        "",
        "One more step of each case under torch.profiler (host: self CPU time of operators and CUDA runtime calls):",
        "",
        "| size | case | wall ms | host ms | device ms | ATen calls (nested included) | kernel launches | syncs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in profiled:
        f = r["profile"]
        lines.append(
            f"| {r['size']} | {r['case']} | {f['wall_ms']:.0f} | {f['host_ms']:.0f} | {f['device_ms']:.0f} |"
            f" {f['operators']} | {f['kernel_launches']} | {f['syncs']} |"
        )
    for r in profiled:
        top = ", ".join(f"{t['name']} {t['self_ms']:.1f} ms ({t['calls']})" for t in r["profile"]["top"])
        lines += ["", f"{r['size']} px {r['case']}, most self time: {top}"]
    return "\n".join(lines) + "\n"


def training_benchmark_arguments(
    argv: list[str] | None, description: str, cases: list[str], default_cases: list[str], default_sizes: list[int]
) -> argparse.Namespace:
    """The command line shared by the training benchmarks (``benchmarks/train_*.py``).

    Args:
        argv: the arguments (None: ``sys.argv``).
        description: the script's one-line description.
        cases: every case the script can run.
        default_cases: those run when ``--cases`` is not given.
        default_sizes: image sides run when ``--sizes`` is not given.

    Returns:
        the parsed arguments (device, sizes, cases, config, reference, steps, warmup, timeout, rounds, out, profile,
        worker).
    """
    repo = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=default_sizes)
    parser.add_argument("--cases", nargs="+", choices=cases, default=default_cases)
    parser.add_argument("--config", choices=("full", "tiny"), default="full", help="tiny: a smoke test in seconds")
    parser.add_argument("--reference", type=Path, default=default_reference(repo), help="the SD-Turbo configs")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (their memory counts)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case before it is abandoned")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run the cases this many times, every other round in reverse order (machine drift falls on all alike)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one more step per case (host vs device time, operators)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.config == "full" and not (args.reference / "unet" / "config.json").is_file():
        parser.error(f"{args.reference} does not hold the SD-Turbo configs; pass --reference")
    return args


def run_training_cases(
    script: str, args: argparse.Namespace, median_key: str, on_result: Callable[[list[dict]], None] | None = None
) -> list[dict]:
    """Run every (size, case) of a training benchmark ``args.rounds`` times, each run in a fresh ``script --worker``
    process; odd rounds run the cases in reverse order, so a machine that slows down as it warms up (GPU clocks)
    weighs on every case alike.

    Args:
        script: the benchmark script's path.
        args: its parsed ``training_benchmark_arguments``.
        median_key: the measurement's seconds-per-step key, recomputed as the median over every round's ``seconds``.
        on_result: called with the results so far after each run (to write a partial report that a run stopped
            from outside still leaves behind).

    Returns:
        one measurement (or ``error``) per (size, case), in the order of ``args.sizes`` and ``args.cases``; with
        several rounds, ``seconds`` (and ``gpu_states``) hold every round's steps, ``round_medians`` each round's
        median, and the peak memory is the largest of the rounds'. Each run is also printed to stderr as it arrives.
    """
    results: dict[tuple[int, str], dict] = {}
    for round_ in range(args.rounds):
        for size in args.sizes:
            for case in args.cases if round_ % 2 == 0 else args.cases[::-1]:
                profile = args.profile and round_ == 0
                command = [
                    sys.executable, script, "--worker", "--cases", case, "--sizes", str(size), "--device", args.device,
                    "--config", args.config, "--reference", str(args.reference), "--steps", str(args.steps),
                    "--warmup", str(args.warmup), *(["--profile"] if profile else []),
                ]  # fmt: skip
                run = {"case": case, "size": size, **run_worker(command, args.timeout)}
                results[size, case] = merge_rounds(results.get((size, case)), run, median_key)
                shown = {k: v for k, v in run.items() if k not in ("seconds", "profile")}
                print(json.dumps(shown), file=sys.stderr, flush=True)
                if on_result is not None:
                    on_result(ordered(results, args))
    return ordered(results, args)


def ordered(results: dict[tuple[int, str], dict], args: argparse.Namespace) -> list[dict]:
    """The measurements so far, in the order of ``args.sizes`` and ``args.cases``."""
    return [results[size, case] for size in args.sizes for case in args.cases if (size, case) in results]


def merge_rounds(earlier: dict | None, run: dict, median_key: str) -> dict:
    """One case's measurement over its rounds so far.

    Args:
        earlier: the merged measurement of the earlier rounds (None in the first).
        run: this round's measurement (or ``error``).
        median_key: the seconds-per-step key, recomputed over every round's ``seconds``.

    Returns:
        the merged measurement; a round that failed is counted in ``failed_rounds`` and otherwise left out (the
        first round's error when every round failed).
    """
    failed = (earlier or {}).get("failed_rounds", 0) + ("error" in run)
    if "error" in run:
        merged = dict(earlier or run)  # what the earlier rounds measured, if any
    elif earlier is None or "error" in earlier:
        merged = {**run, "round_medians": [run[median_key]]}
    else:
        seconds = earlier["seconds"] + run["seconds"]
        merged = {
            **earlier,
            "seconds": seconds,
            median_key: statistics.median(seconds),
            "round_medians": earlier["round_medians"] + [run[median_key]],
            "gpu_states": earlier.get("gpu_states", []) + run.get("gpu_states", []),
            "peak_memory_gib": max(earlier["peak_memory_gib"], run["peak_memory_gib"]),
        }
    if failed:
        merged["failed_rounds"] = failed
    return merged


def rounds_note(report: dict) -> str:
    """How a training benchmark's medians were taken over rounds ("" for one round), for its table's caption."""
    rounds = report.get("rounds", 1)
    if rounds == 1:
        return ""
    return (
        f" Each case ran {rounds} times, each in a fresh process, every other round in reverse order; the median is"
        " over all of their timed steps, each round's median in brackets."
    )


def seconds_cell(result: dict, median_key: str) -> str:
    """A table cell with the median seconds per step and, over several rounds, each round's median."""
    cell = f"{result[median_key]:.3f}"
    if len(result.get("round_medians", [])) > 1:
        cell += " (" + ", ".join(f"{m:.3f}" for m in result["round_medians"]) + ")"
    return cell


def run_worker(command: list[str], timeout: float) -> dict:
    """Run one benchmark case in a fresh process (so its memory is its own) and read the JSON line it prints last.

    Args:
        command: the worker's command line; it prints its measurement as one JSON object on a line of its own.
        timeout: seconds before the case is abandoned.

    Returns:
        the measurement, or ``{"error": ...}`` saying why there is none (timed out, out of memory, the last lines of
        the worker's error output).
    """
    import subprocess

    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        if "OutOfMemoryError" in done.stderr:
            return {"error": "out of memory"}
        return {"error": " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])}
    return json.loads(lines[-1])
