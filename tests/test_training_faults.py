"""Faults during training lose at most the work since the last complete checkpoint.

A SIGKILL in the middle of a checkpoint write leaves the previous checkpoint intact, ``--resume latest`` picks it and
the finished run equals an uninterrupted one; a full disk while saving stops with a clear message and leaves the
previous checkpoint intact; a NaN/Inf loss is skipped and counted, and too many in a row stop the run naming the step
and the last checkpoint.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbo_i2i.cli import main
from turbo_i2i.errors import BadInputError, CheckpointWriteError, TrainingDivergedError
from turbo_i2i.training import loop
from turbo_i2i.training.circles import write_dataset
from turbo_i2i.training.loop import OPTIMIZER_STATE, TRAINER_STATE, TrainerBase
from turbo_i2i.training.paired import PairedTrainConfig, PairedTrainer
from turbo_i2i.training.state_files import load_state

WORKER = Path(__file__).with_name("train_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "circles"
    write_dataset(folder, n=10, seed=3, size=32)
    return folder


def train_args(dataset, out, *extra):
    """A tiny paired run through the CLI: no pretrained networks (L2 + PatchGAN only), no trackers."""
    return [
        "train", "paired", "--dataset", str(dataset), "--output-dir", str(out), "--base-model", "tiny",
        "--transform", "no_resize", "--batch-size", "3", "--max-steps", "6", "--learning-rate", "1e-3",
        "--lr-warmup-steps", "0", "--lambda-lpips", "0", "--lambda-clipsim", "0", "--disc", "patchgan",
        "--checkpoint-every", "3", "--eval-every", "100", "--eval-metrics", "", "--report-to", "none", *extra,
    ]  # fmt: skip


def make_trainer(dataset, out, **overrides):
    options = dict(
        dataset=str(dataset), output_dir=str(out), base_model="tiny", transform="no_resize", batch_size=3,
        max_steps=8, learning_rate=1e-3, lr_warmup_steps=0, lambda_lpips=0.0, lambda_clipsim=0.0, disc="patchgan",
        checkpoint_every=2, eval_every=100, eval_metrics="", report_to="none",
    )  # fmt: skip
    options.update(overrides)
    torch.manual_seed(0)
    return PairedTrainer(PairedTrainConfig(**options))


def worker(args, **env):
    """Start train_worker.py (the CLI, optionally pausing inside a checkpoint write) in a new process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return err


def checkpoints_of(run: Path) -> list[Path]:
    return TrainerBase.checkpoints(SimpleNamespace(output_dir=run))


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if
            p.is_file()}  # fmt: skip


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --- a crash in the middle of a checkpoint write ---------------------------------------------------------------------


def test_sigkill_during_a_checkpoint_write_loses_nothing_saved(dataset, tmp_path):
    straight_run, crashed_run = tmp_path / "straight", tmp_path / "crashed"
    paused = tmp_path / "paused"
    # the uninterrupted run and the run to be killed, side by side
    straight = worker(train_args(dataset, straight_run))
    crashed = worker(train_args(dataset, crashed_run), TURBO_I2I_TEST_PAUSE_AT="6", TURBO_I2I_TEST_PAUSED=str(paused))
    deadline = time.monotonic() + 240
    while not paused.exists():
        assert crashed.poll() is None, crashed.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached the step-6 checkpoint write"
        time.sleep(0.1)
    partial = crashed_run / "checkpoints" / ".step_0000006.partial"
    assert (partial / "model" / "model.safetensors").is_file()  # the write is under way ...
    assert not (partial / TRAINER_STATE).exists()  # ... and not complete
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(timeout=60)
    assert crashed.returncode == -signal.SIGKILL
    finish(straight)

    # the last complete checkpoint is intact: the same tensors an uninterrupted run wrote at that step
    assert [p.name for p in checkpoints_of(crashed_run)] == ["step_0000003"]
    assert not (crashed_run / "model").exists()
    kept, reference = crashed_run / "checkpoints" / "step_0000003", straight_run / "checkpoints" / "step_0000003"
    a, b = load_file(kept / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b) and set(a) == set(b)
    # (not byte-compared: safetensors orders its JSON header differently from process to process)
    assert (kept / "model" / "config.json").read_bytes() == (reference / "model" / "config.json").read_bytes()
    opt_a, opt_b = load_state(kept / OPTIMIZER_STATE), load_state(reference / OPTIMIZER_STATE)
    assert opt_a["scheduler_g"] == opt_b["scheduler_g"]
    for state_a, state_b in zip(opt_a["optimizer_g"]["state"].values(), opt_b["optimizer_g"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_b)

    # --resume latest picks it, and the finished run matches the uninterrupted one
    err = finish(worker(train_args(dataset, crashed_run, "--resume", "latest")))
    assert "resumed from" in err and "step_0000003 (step 3)" in err
    assert not partial.exists()  # the half-written folder was replaced by the complete step-6 checkpoint
    assert [p.name for p in checkpoints_of(crashed_run)] == ["step_0000003", "step_0000006"]
    final, expected = (
        load_file(crashed_run / "model" / "model.safetensors"),
        load_file(straight_run / "model" / "model.safetensors"),
    )
    assert max_difference(final, expected) == 0
    d_final = load_file(crashed_run / "checkpoints" / "step_0000006" / loop.DISCRIMINATOR)
    d_expected = load_file(straight_run / "checkpoints" / "step_0000006" / loop.DISCRIMINATOR)
    assert max_difference(d_final, d_expected) == 0


# --- a full disk while saving ----------------------------------------------------------------------------------------


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_exits_1(dataset, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save_model, calls = loop.save_model, []

    def fill_the_disk_on_the_second_save(*args, **kwargs):
        # the second checkpoint fails after its model files are written: "partway", as a real full disk would
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_model(*args, **kwargs)

    monkeypatch.setattr(loop, "save_model", fill_the_disk_on_the_second_save)
    code = main(train_args(dataset, run))
    err = capsys.readouterr().err
    assert code == 1 and CheckpointWriteError.exit_code == 1
    assert "Traceback" not in err
    assert "step_0000006" in err and "No space left on device" in err and "MiB free" in err
    assert "step_0000003 is intact" in err and "--resume latest" in err
    assert [p.name for p in checkpoints_of(run)] == ["step_0000003"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003"]  # partial folder removed
    before = digest(run / "checkpoints" / "step_0000003")
    # with space again, --resume latest continues from the intact checkpoint and finishes
    monkeypatch.setattr(loop, "save_model", real_save_model)
    assert main(train_args(dataset, run, "--resume", "latest")) == 0
    assert (run / "model" / "model.safetensors").is_file()
    assert digest(run / "checkpoints" / "step_0000003") == before


def _mount_tmpfs(folder: Path, size: str) -> bool:
    if shutil.which("mount") is None or (hasattr(os, "geteuid") and os.geteuid() != 0):
        return False
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return result.returncode == 0


def test_a_really_full_tmpfs_stops_with_a_clear_message(dataset, tmp_path):
    """The same on a real full file system (a small tmpfs; needs root, skipped elsewhere): safetensors and torch.save
    report a full disk with their own error types, which must give the same message."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        trainer = make_trainer(dataset, disk / "run", max_steps=4, checkpoint_every=2, keep_checkpoints=5)
        trainer.train(stop_at=2)
        before = digest(disk / "run" / "checkpoints" / "step_0000002")
        # fill the disk, then give back 64 KiB: room for the small files, not for a checkpoint's weights
        filler = disk / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        os.truncate(filler, max(0, filler.stat().st_size - 64 * 1024))
        with pytest.raises(CheckpointWriteError, match=r"step_0000004.*MiB free.*step_0000002 is intact"):
            trainer.train()
        assert [p.name for p in checkpoints_of(disk / "run")] == ["step_0000002"]
        assert not any(p.name.endswith(".partial") for p in (disk / "run" / "checkpoints").iterdir())
        assert digest(disk / "run" / "checkpoints" / "step_0000002") == before
    finally:
        # lazy: a traceback held by pytest may still keep a file on it open
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)


# --- NaN / Inf ------------------------------------------------------------------------------------------------------


def poison(trainer, bad_steps):
    """Make the generator loss NaN at the given (0-based) steps, wrapping the trainer's own loss computation."""
    real_losses = trainer.losses

    def losses(batch):
        terms = real_losses(batch)
        if trainer.step in bad_steps:
            terms["loss_g"] = terms["loss_g"] * float("nan")
        return terms

    trainer.losses = losses


def test_a_nan_loss_skips_the_update_and_is_counted(dataset, tmp_path, caplog):
    trainer = make_trainer(dataset, tmp_path)
    poison(trainer, {1})
    trainer.train_step()
    weights = {k: v.clone() for k, v in trainer.unwrapped.trained_state_dict().items()}
    d_weights = {k: v.detach().clone() for k, v in trainer.discriminator.named_parameters()}
    moments = [s["exp_avg"].clone() for s in trainer.optimizer_g.state.values()]
    lr_steps = trainer.scheduler_g.last_epoch
    with caplog.at_level("WARNING", logger="turbo_i2i"):
        logs = trainer.train_step()
    assert "step 2: the generator loss is NaN or Inf; its update was skipped (1 in a row)" in caplog.text
    assert logs["skipped_steps"] == 1 and logs["loss_g"] != logs["loss_g"]  # NaN is logged as it was
    assert trainer.step == 2 and trainer.skipped_steps == 1 and trainer.bad_steps_in_row == 1
    # no update anywhere, no gradient left behind, but the LR schedule moved on with the step number
    assert all(torch.equal(v, weights[k]) for k, v in trainer.unwrapped.trained_state_dict().items())
    assert all(torch.equal(v, d_weights[k]) for k, v in trainer.discriminator.named_parameters())
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(trainer.optimizer_g.state.values(), moments))
    assert all(p.grad is None for p in trainer.unwrapped.parameters())
    assert all(p.grad is None for p in trainer.discriminator.parameters())
    assert trainer.scheduler_g.last_epoch == trainer.scheduler_d.last_epoch == lr_steps + 1
    logs = trainer.train_step()  # a good step: learns again and resets the run of bad steps
    assert logs["skipped_steps"] == 1 and trainer.bad_steps_in_row == 0
    assert any(not torch.equal(v, weights[k]) for k, v in trainer.unwrapped.trained_state_dict().items())


def test_an_inf_discriminator_loss_skips_only_its_update(dataset, tmp_path, monkeypatch):
    from turbo_i2i.training import discriminators

    trainer = make_trainer(dataset, tmp_path)
    monkeypatch.setattr(discriminators, "discriminator_loss", lambda *args, **kwargs: torch.tensor(float("inf")))
    d_weights = {k: v.detach().clone() for k, v in trainer.discriminator.named_parameters()}
    weights = {k: v.clone() for k, v in trainer.unwrapped.trained_state_dict().items()}
    logs = trainer.train_step()
    assert logs["skipped_steps"] == 1 and logs["loss_d"] == float("inf")
    assert all(torch.equal(v, d_weights[k]) for k, v in trainer.discriminator.named_parameters())
    assert any(not torch.equal(v, weights[k]) for k, v in trainer.unwrapped.trained_state_dict().items())


def poison_gradients(optimizer):
    """Every gradient of ``optimizer``'s parameters becomes NaN in the backward pass (the losses stay finite)."""
    return [p.register_hook(lambda g: g * float("nan")) for group in optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("part", ["generator", "discriminator"])
def test_a_nan_gradient_is_caught_with_clipping_off_too(dataset, tmp_path, part, caplog):
    # with --max-grad-norm 0 only a clipped norm was checked: a NaN gradient went into the weights
    trainer = make_trainer(dataset, tmp_path, max_grad_norm=0.0)
    hooks = poison_gradients(trainer.optimizer_g if part == "generator" else trainer.optimizer_d)
    weights = {k: v.clone() for k, v in trainer.unwrapped.trained_state_dict().items()}
    d_weights = {k: v.detach().clone() for k, v in trainer.discriminator.named_parameters()}
    with caplog.at_level("WARNING", logger="turbo_i2i"):
        logs = trainer.train_step()
    assert f"the {part} gradient is NaN or Inf; its update was skipped" in caplog.text
    assert logs["skipped_steps"] == 1
    assert all(torch.equal(v, d_weights[k]) for k, v in trainer.discriminator.named_parameters())
    g_equal = [torch.equal(v, weights[k]) for k, v in trainer.unwrapped.trained_state_dict().items()]
    assert all(g_equal) if part == "generator" else not all(g_equal)  # D's fault spares G's finite update
    for hook in hooks:
        hook.remove()
    trainer.train_step()
    assert all(torch.isfinite(v).all() for v in trainer.unwrapped.trained_state_dict().values())


def test_unpaired_nan_gradients_are_caught_with_clipping_off_too(tmp_path):
    from trainers import make_unpaired, make_unpaired_trainer

    data = make_unpaired(tmp_path / "data", n=6)
    for part in ("g", "d"):
        trainer = make_unpaired_trainer(data, tmp_path / part, max_grad_norm=0.0)
        hooks = poison_gradients(getattr(trainer, f"optimizer_{part}"))
        weights = {k: v.clone() for k, v in trainer.unwrapped.trained_state_dict().items()}
        d_weights = {k: v.detach().clone() for k, v in trainer.discriminator.named_parameters()}
        assert trainer.train_step()["skipped_steps"] == 1, part
        assert all(torch.equal(v, d_weights[k]) for k, v in trainer.discriminator.named_parameters()), part
        g_equal = [torch.equal(v, weights[k]) for k, v in trainer.unwrapped.trained_state_dict().items()]
        assert all(g_equal) if part == "g" else not all(g_equal), part
        for hook in hooks:
            hook.remove()


def test_too_many_bad_steps_in_a_row_stop_with_the_step_and_the_last_checkpoint(dataset, tmp_path):
    trainer = make_trainer(dataset, tmp_path, max_bad_steps=2, checkpoint_every=2)
    poison(trainer, {1, 3, 4, 5, 6, 7})  # one isolated bad step, then a run of them from step 4 (0-based 3)
    with pytest.raises(TrainingDivergedError) as caught:
        trainer.train()
    message = str(caught.value)
    assert trainer.step == 6 and trainer.skipped_steps == 4
    assert "Training stopped at step 6" in message and "3 steps in a row (steps 4-6)" in message
    assert "max_bad_steps=2" in message
    assert f"{tmp_path / 'checkpoints' / 'step_0000004'} (step 4)" in message and "--resume latest" in message
    assert TrainingDivergedError.exit_code == 1
    lines = (tmp_path / loop.LOG_FILE).read_text().splitlines()
    assert [int(json.loads(line)["skipped_steps"]) for line in lines] == [0, 1, 1, 2, 3]


def test_the_count_of_skipped_steps_survives_a_resume(dataset, tmp_path):
    trainer = make_trainer(dataset, tmp_path, max_steps=4)
    poison(trainer, {0, 1})
    trainer.train(stop_at=2)
    resumed = make_trainer(dataset, tmp_path, max_steps=4)
    resumed.train(resume="latest")
    assert resumed.skipped_steps == 2 and resumed.step == 4


def test_exploding_training_stops_through_the_cli_with_exit_1(dataset, tmp_path, capsys):
    """No injection: a learning rate of 1e30 blows the weights up after one step, so every later loss is NaN/Inf."""
    args = train_args(dataset, tmp_path, "--learning-rate", "1e30", "--max-bad-steps", "1", "--checkpoint-every", "1")
    code = main(args)  # argparse keeps the last --learning-rate
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "Training stopped at step 3" in err and "steps 2-3" in err and "step_0000002 (step 2)" in err


def test_unpaired_training_skips_nan_steps_through_the_same_loop(tmp_path):
    """Both trainers share TrainerBase's handling: joint and separate generator steps."""
    from trainers import make_unpaired, make_unpaired_trainer

    data = make_unpaired(tmp_path / "data", n=6)
    for mode in ("joint", "separate"):
        trainer = make_unpaired_trainer(data, tmp_path / mode, step_mode=mode, max_bad_steps=2)
        # b2a turns everything into NaN: the first generator step (joint) or the cycle step (separate) fails, and
        # with it the rest of the iteration, D's step included

        def translate(x, direction, compute=trainer.translate):
            out = compute(x, direction)
            return out * float("nan") if direction == "b2a" else out

        trainer.translate = translate
        weights = {k: v.clone() for k, v in trainer.unwrapped.trained_state_dict().items()}
        d_weights = {k: v.detach().clone() for k, v in trainer.discriminator.named_parameters()}
        logs = trainer.train_step()
        assert logs["skipped_steps"] == 1 and trainer.step == 1, mode
        assert all(torch.equal(v, weights[k]) for k, v in trainer.unwrapped.trained_state_dict().items()), mode
        assert all(torch.equal(v, d_weights[k]) for k, v in trainer.discriminator.named_parameters()), mode
        trainer.train_step()
        with pytest.raises(TrainingDivergedError, match="Training stopped at step 3.*steps 1-3"):
            trainer.train_step()


def test_resuming_from_a_damaged_or_hostile_checkpoint_is_bad_input(dataset, tmp_path):
    import builtins
    import pickle

    trainer = make_trainer(dataset, tmp_path, max_steps=2, checkpoint_every=2)
    trainer.train()
    checkpoint = tmp_path / "checkpoints" / "step_0000002"
    marker = tmp_path / "ran"

    class WritesMarker:
        def __reduce__(self):
            return builtins.exec, (f"open({str(marker)!r}, 'w').write('code ran')",)

    (checkpoint / OPTIMIZER_STATE).write_bytes(pickle.dumps({"optimizer_g": WritesMarker()}))  # not safetensors
    with pytest.raises(BadInputError, match=r"Cannot resume from .*step_0000002.*SafetensorError"):
        make_trainer(dataset, tmp_path, max_steps=2).load_checkpoint(checkpoint)
    assert not marker.exists()
    weights = checkpoint / "model" / "model.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] * float("nan")  # a NaN weight is refused as a model folder's is, not trained on
    save_file(state, weights)
    with pytest.raises(BadInputError, match=rf"tensor '{name}' holds NaN or Inf"):
        make_trainer(dataset, tmp_path, max_steps=2).load_checkpoint(checkpoint)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BadInputError, match=r"Cannot resume from .*step_0000002.*SafetensorError"):
        make_trainer(dataset, tmp_path, max_steps=2).load_checkpoint(checkpoint)


def test_faults_on_one_process_stop_or_skip_on_all(dataset, tmp_path):
    """Under data parallelism (2 CPU processes, gloo) a NaN seen by rank 1 alone skips the step on both ranks, so
    neither waits forever in DDP's all-reduce, and the two stay identical; a checkpoint write that fails on the main
    process stops both."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    script = Path(__file__).with_name("distributed_nan_worker.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, str(script), str(dataset), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(report["skipped_steps"] == 1 and report["step"] == 3 for report in reports)
    # the main process's failed checkpoint write stops both processes, each with a message
    assert "No space left on device" in reports[0]["raised"]
    folder = tmp_path / "checkpoints" / "step_0000003"
    assert reports[1]["raised"] == f"The main process could not write {folder}; see its message."
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


# --- a run folder used again -----------------------------------------------------------------------------------------


def test_a_resume_needs_only_the_options_it_changes(dataset, tmp_path, caplog):
    """`--resume` with the data and run folders alone went on with the defaults (the hub backbone offline: exit 1;
    another batch size and transform: a warning): the checkpoint's options are taken for those not given."""
    run = tmp_path / "run"
    assert main(train_args(dataset, run, "--stop-at", "3")) == 0
    resume = ["train", "paired", "--dataset", str(dataset), "--output-dir", str(run), "--resume"]
    with caplog.at_level("WARNING", logger="turbo_i2i"):
        assert main([*resume, "--learning-rate", "5e-4"]) == 0  # a given option still wins
    (warning,) = [r.getMessage() for r in caplog.records if "changed options" in r.getMessage()]
    assert "learning_rate 0.001 -> 0.0005" in warning and "batch_size" not in warning and "base_model" not in warning
    state = json.loads((run / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["config"]["batch_size"] == 3 and state["config"]["base_model"] == "tiny"


def test_a_new_run_in_a_folder_that_holds_one_is_refused_and_changes_nothing(dataset, tmp_path, capsys):
    """Without --resume, a second run in the same --output-dir used to rotate the first run's checkpoints away,
    replace its model and append to its log."""
    run = tmp_path / "run"
    assert main(train_args(dataset, run, "--max-steps", "3", "--learning-rate", "5e-6")) == 0
    summary = capsys.readouterr().out.splitlines()[-1]  # the last step's values, as the log lines show them
    assert "lr=5e-06" in summary and "skipped_steps=0 " in f"{summary} " and ".00000" not in summary, summary
    before = digest(run)
    code = main(train_args(dataset, run, "--max-steps", "2", "--learning-rate", "5e-4"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "already holds a training run (checkpoints up to step_0000003, an exported model/, logs.jsonl)" in err
    assert "Continue it with --resume" in err and "nothing there was changed" in err
    assert digest(run) == before


def test_a_resume_sets_aside_what_a_run_beyond_its_checkpoint_left(dataset, tmp_path):
    """Resuming from an older checkpoint (or after a crash past the last one): the newer checkpoints, the model they
    exported and the log lines of later steps move to superseded/, so --resume latest, the checkpoint rotation and
    the log all follow the resumed run alone, and nothing is deleted."""
    run = tmp_path / "run"
    make_trainer(dataset, run, max_steps=4, checkpoint_every=2, keep_checkpoints=2).train()
    model = digest(run / "model")
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "step_0000004.png").write_bytes(b"the later run's grid")
    with open(run / loop.LOG_FILE, "a") as log:
        log.write('{"step": 5, "loss')  # a line cut short by a crash
    resumed = make_trainer(dataset, run, max_steps=4, checkpoint_every=1, keep_checkpoints=2)
    resumed.train(resume=run / "checkpoints" / "step_0000002", stop_at=3)
    assert [p.name for p in checkpoints_of(run)] == ["step_0000002", "step_0000003"]
    assert [json.loads(line)["step"] for line in (run / loop.LOG_FILE).read_text().splitlines()] == [1, 2, 3]
    (aside,) = (run / "superseded").iterdir()
    assert aside.name.startswith("after_step_0000002_")
    assert [p.name for p in (aside / "checkpoints").iterdir()] == ["step_0000004"]
    assert digest(aside / "model") == model and not (run / "model").exists()
    lines = (aside / loop.LOG_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines[:2]] == [3, 4] and lines[2:] == ['{"step": 5, "loss']
    assert (aside / "eval" / "step_0000004.png").read_bytes() == b"the later run's grid"


def test_a_resume_hides_what_tensorboard_got_after_its_checkpoint(dataset, tmp_path):
    """TensorBoard showed the superseded run's later points beside the resumed run's (steps 1, 2, 3, 4, 3)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    make_trainer(dataset, run, max_steps=4, checkpoint_every=2, report_to="tensorboard").train()
    resumed = make_trainer(dataset, run, max_steps=4, checkpoint_every=1, report_to="tensorboard")
    resumed.train(resume=run / "checkpoints" / "step_0000002", stop_at=3)
    events = EventAccumulator(str(run / "run"))  # accelerate's folder: the run folder's name
    events.Reload()
    assert [event.step for event in events.Scalars("loss_l2")] == [1, 2, 3]


def test_a_resume_without_a_checkpoint_keeps_an_existing_model(dataset, tmp_path):
    """--resume in a folder whose checkpoints are gone starts at step 0; the model a finished run exported there is
    set aside, not replaced by this run's export."""
    run = tmp_path / "run"
    make_trainer(dataset, run, max_steps=2, checkpoint_every=2).train()
    model = digest(run / "model")
    shutil.rmtree(run / "checkpoints")
    make_trainer(dataset, run, max_steps=2, checkpoint_every=2).train(resume=True)
    (aside,) = (run / "superseded").iterdir()
    assert digest(aside / "model") == model and (run / "model" / "model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (run / loop.LOG_FILE).read_text().splitlines()] == [1, 2]


def test_a_resume_with_nothing_left_to_train_says_so(dataset, tmp_path, caplog):
    run = tmp_path / "run"
    make_trainer(dataset, run, max_steps=2, checkpoint_every=2).train()
    for options, resume, stop_at, limit in (({"max_steps": 2}, True, None, "--max-steps is 2"),
                                            ({"max_steps": 4}, True, 1, "--stop-at is 1")):  # fmt: skip
        caplog.clear()
        trainer = make_trainer(dataset, run, checkpoint_every=2, **options)
        with caplog.at_level("WARNING", logger="turbo_i2i"):
            trainer.train(resume=resume, stop_at=stop_at)
        assert trainer.step == 2 and f"already at step 2, {limit}: nothing to train" in caplog.text


def test_a_resume_with_other_options_names_them(dataset, tmp_path, capsys):
    """Options the checkpoint's contents depend on must match (they used to fail as a "damaged" checkpoint, or be
    ignored: --disc none threw the saved discriminator away); other changes go on with a warning naming them."""
    run = tmp_path / "run"
    assert main(train_args(dataset, run, "--max-steps", "3")) == 0
    capsys.readouterr()
    before = digest(run)
    code = main(train_args(dataset, run, "--resume", "--disc", "none", "--unet-lora-rank", "4"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"Cannot resume from {run / 'checkpoints' / 'step_0000003'} with other options" in err
    assert (
        "--unet-lora-rank 4 (the checkpoint's: 8)" in err
        and "--disc none with --lambda-gan 0.5 (the checkpoint's: patchgan with --lambda-gan 0.5)" in err
    )
    assert digest(run) == before
    code = main(train_args(dataset, run, "--resume", "--max-steps", "4", "--learning-rate", "5e-4"))
    err = capsys.readouterr().err
    assert code == 0 and "resuming with changed options: learning_rate 0.001 -> 0.0005" in err


def test_a_checkpoint_of_the_other_trainer_is_named_as_such(dataset, tmp_path):
    # an unpaired run resumed with train paired listed "other options" (--unet-lora-rank, --train-all None, ...)
    trainer = make_trainer(dataset, tmp_path, max_steps=2, checkpoint_every=2)
    trainer.train()
    checkpoint = tmp_path / "checkpoints" / "step_0000002"
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    state["config"].update(lambda_cycle=1.0, lambda_idt=1.0, step_mode="joint")
    (checkpoint / TRAINER_STATE).write_text(json.dumps(state))
    with pytest.raises(BadInputError, match=r"another kind of training run \(its options include lambda_cycle,"):
        make_trainer(dataset, tmp_path, max_steps=4).load_checkpoint(checkpoint)


def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_the_first_step(dataset, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    assert main(train_args(dataset, tmp_path / "taken")) == 2
    err = capsys.readouterr().err
    assert f"Cannot use --output-dir {tmp_path / 'taken'}" in err and "Traceback" not in err
    assert (tmp_path / "taken").read_text() == "a file"
