"""What every trainer shares: per-step seeding, the batch of a step, checkpoints, resume, export and the run loop.

``PairedTrainer`` and ``UnpairedTrainer`` subclass :class:`TrainerBase` and add their model, objective,
``train_step`` and ``evaluate``. Keeping these pieces in one place is what makes "resume equals uninterrupted" hold for
both: a step's randomness comes from (seed, step) only, its batch from (seed, epoch) only, and a checkpoint holds
every trained weight, discriminator and optimiser / scheduler state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model

from ..checkpoints import (
    TEXT_ENCODER_NAME,
    WEIGHTS_NAME,
    check_tensors,
    readable_like_other_files,
    save_pretrained,
)
from ..errors import BadInputError, CheckpointWriteError, TrainingDivergedError, load_failure
from ..generator import OneStepGenerator
from .compute import HALF_PRECISION
from .options import metric_names
from .state_files import load_state, save_state

logger = logging.getLogger("turbo_i2i")
TRAINER_STATE = "trainer_state.json"
LOG_FILE = "logs.jsonl"
# What a full disk or failing storage raises while writing: Python's OSError and safetensors' own error type (every
# file of a checkpoint is safetensors or JSON).
WRITE_ERRORS = (OSError, SafetensorError)
CHECKPOINT_NAME = re.compile(r"step_\d{7}")
# options a checkpoint's contents depend on (with the discriminator and fp16 loss scaling: ``check_resumable_config``)
STRUCTURAL_OPTIONS = ("unet_lora_rank", "vae_lora_rank", "train_all", "stochastic", "disc", "use_8bit_adam")
# options of a run's length, saving, evaluation and logging, which a resume may change freely
BOOKKEEPING_OPTIONS = ("output_dir", "max_steps", "checkpoint_every", "eval_every", "num_eval", "eval_metrics",
                       "keep_checkpoints", "max_bad_steps", "report_to", "skip_bad", "lpips_path", "clip_path",
                       "inception_path", "dino_path", "from_model", "compile", "extra")  # fmt: skip

# metrics(direction, inputs, outputs, references) -> {name: value}: inputs and outputs are the translated test images
# of one direction (lists of (3, H, W) tensors in [-1, 1], num_eval of them), references all the test images of the
# target domain (a sequence read lazily, ``data.EvalImages``: each access reads the file again).
Metrics = Callable[[str, list[torch.Tensor], list[torch.Tensor], Sequence[torch.Tensor]], dict[str, float]]


def translation_metrics(inception: torch.nn.Module | None = None, dino: torch.nn.Module | None = None) -> Metrics:
    """The evaluation metrics of one direction: FID against the target domain and the DINO structure distance.

    Args:
        inception: the FID feature network (``load_inception()``; ``tiny_inception()`` in tests), or None for no FID.
        dino: the structure distance's ViT (``load_dino()``; ``tiny_dino()`` in tests), or None for none.

    Returns:
        ``metrics(direction, inputs, outputs, references) -> {"fid": ..., "dino_structure": ...}``; the reference
        statistics of each direction are computed once and reused at every evaluation.
    """
    from ..evaluation import DINOStructureDistance, compute_fid, fid_statistics

    structure = DINOStructureDistance(dino) if dino is not None else None
    reference_stats: dict = {}

    def metrics(direction, inputs, outputs, references) -> dict[str, float]:
        scores = {}
        if inception is not None and len(outputs) >= 2 and len(references) >= 2:  # FID needs two images per set
            if direction not in reference_stats:
                reference_stats[direction] = fid_statistics(references, inception)
            scores["fid"] = compute_fid(outputs, reference_stats[direction], inception)
        if structure is not None:  # one image at a time: test images may differ in size
            distances = [float(structure(x[None], y[None])[0]) for x, y in zip(inputs, outputs)]
            scores["dino_structure"] = sum(distances) / len(distances)
        return scores

    return metrics


OPTIMIZER_STATE = "optimizer.safetensors"  # optimiser, scheduler and scaler states (``state_files``)
DISCRIMINATOR = "discriminator.safetensors"


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The seed of one step's randomness: the same (seed, step, stream) always gives the same numbers."""
    return (seed * 1_000_003 + step * 7919 + stream) % (2**63)


def step_scheduler(scheduler) -> None:
    """Step an LR scheduler once per iteration, whether or not its optimiser updated (a NaN/Inf step, or an fp16 step
    whose overflowing gradients the ``GradScaler`` skipped).

    PyTorch warns when a scheduler steps before its optimiser ever has (fp16's first step often overflows); here that
    order is intended: the learning rate follows the step number, whatever updates were skipped.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


def gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The gradients an optimiser's next step will use (of its parameters that have one), in parameter order."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def load_splits(*builders: Callable[[], Any]) -> list[Any]:
    """Build each split's data set, listing every split's problems in one message.

    The test split used to be checked only once the training split passed, so a second run was needed to see its
    problems.

    Args:
        builders: each builds one split's data set (or returns None).

    Returns:
        the data sets, in order.

    Raises:
        BadInputError: the problems of every split that has some, one split's message after the other.
    """
    results, messages = [], []
    for build in builders:
        try:
            results.append(build())
        except BadInputError as error:
            results.append(None)
            messages.append(str(error))
    if messages:
        raise BadInputError("\n".join(messages))
    return results


class TrainerBase:
    """The run machinery shared by the trainers.

    A subclass sets, in its ``__init__``: ``config`` (with ``output_dir``, ``seed``, ``batch_size``, ``max_steps``,
    ``lr_scheduler``, ``lr_warmup_steps``, ``checkpoint_every``, ``eval_every``, ``max_bad_steps``), ``accelerator``,
    ``output_dir``, ``train_data`` (a data set with ``set_epoch``), ``optimizer_g`` / ``scheduler_g``,
    ``discriminator`` (a module or None) with ``optimizer_d`` / ``scheduler_d``, and ``step = 0``; and it defines
    ``unwrapped`` (the generator), ``train_step()`` and ``evaluate()``.

    Numerical faults: a subclass's ``train_step`` checks each loss with :meth:`is_finite` (and each gradient norm,
    :meth:`gradients_finite`) before it is used; a NaN/Inf drops the update through :meth:`skip_update` and every
    step ends in :meth:`end_step`. A skipped step still advances the step counter and the LR schedules, so the data
    order and the learning rate stay functions of (seed, step) whatever was skipped; only the weights and optimiser
    moments keep their values. Skipped steps are counted (``skipped_steps`` in the logs and checkpoints), and more than
    ``config.max_bad_steps`` of them in a row stop the run with :class:`~turbo_i2i.errors.TrainingDivergedError`.
    """

    # What ``turbo-i2i train`` adds to a loader's missing-weights paragraph (``errors.with_hint``); each trainer adds
    # its loss networks' own (their weights' options differ).
    network_hints: dict[str, str] = {
        "inception": "With turbo-i2i train, --inception-path FILE passes a local copy; leaving fid out of"
        " --eval-metrics skips FID (--eval-metrics '' for no metric).",
        "dino": "With turbo-i2i train, --dino-path FILE passes a local copy; leaving dino_structure out of"
        " --eval-metrics skips it.",
    }

    collate_fn = staticmethod(lambda items: items)  # replaced by the data set's collate function
    config: object
    scaler: torch.amp.GradScaler  # ``loss_scaler``: enabled for fp16 only
    step: int
    skipped_steps: int = 0  # steps whose update was dropped for a NaN/Inf, over the whole run
    bad_steps_in_row: int = 0

    # --- set-up pieces -------------------------------------------------------------------------------------------

    def autocast(self) -> torch.autocast:
        """Autocast to the run's half precision (``config.mixed_precision`` "bf16" / "fp16"; a no-op for "no").

        The trainer's own setting rather than Accelerate's: Accelerate keeps its precision in process-wide state that
        cannot change once set, and benchmarks and tests compare fp32 and half-precision runs in one process.
        """
        dtype = HALF_PRECISION.get(self.config.mixed_precision)
        return torch.autocast(self.accelerator.device.type, dtype=dtype, enabled=dtype is not None)

    def without_autocast(self) -> torch.autocast:
        """Autocast off, e.g. for a backward pass inside an autocast region: the autograd engine runs the backward
        operators under the autocast state of the ``backward()`` call, not of their forward operators."""
        return torch.autocast(self.accelerator.device.type, enabled=False)

    def make_scheduler(self, optimizer: torch.optim.Optimizer):
        """The config's learning-rate schedule for ``optimizer`` (stepped once per iteration)."""
        from diffusers.optimization import get_scheduler

        return get_scheduler(
            self.config.lr_scheduler,
            optimizer,
            num_warmup_steps=self.config.lr_warmup_steps,
            num_training_steps=self.config.max_steps,
        )

    def batch(self, step: int) -> dict:
        """The batch of ``step`` for this process: a slice of a global batch drawn from a per-epoch permutation."""
        n, world, rank = len(self.train_data), self.accelerator.num_processes, self.accelerator.process_index
        global_size = self.config.batch_size * world
        start = step * global_size
        items, orders = [], {}
        for position in range(start + rank * self.config.batch_size, start + (rank + 1) * self.config.batch_size):
            epoch, offset = divmod(position, n)
            if epoch not in orders:  # one permutation per epoch (a batch spans at most two)
                orders[epoch] = torch.randperm(
                    n, generator=torch.Generator().manual_seed(step_seed(self.config.seed, epoch, 1))
                )
            self.train_data.set_epoch(epoch)
            items.append(self.train_data[int(orders[epoch][offset])])
        return self.collate_fn(items)

    def micro_batches(self) -> Iterator[dict]:
        """The batches of the current step, loaded one at a time: ``gradient_accumulation_steps`` consecutive ones of
        the data order (one without accumulation), so the data order is a function of the step whatever k is."""
        k = self.config.gradient_accumulation_steps
        for micro in range(k):
            yield self.batch(self.step * k + micro)

    @property
    def unwrapped(self) -> OneStepGenerator:
        """The generator (outside any data-parallel wrapper)."""
        raise NotImplementedError

    @property
    def _text_encoder_to_save(self) -> torch.nn.Module | None:
        """A text encoder that belongs to the model (trained from scratch), else None (the backbone's is used)."""
        return None

    def train_step(self) -> dict[str, float]:
        """One iteration; returns the logged losses."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Metrics on the test split (empty when there is none)."""
        raise NotImplementedError

    # --- numerical faults ----------------------------------------------------------------------------------------

    def is_finite(self, value: torch.Tensor) -> bool:
        """Whether every element of a loss or gradient norm is finite (no NaN, no Inf) on every process.

        Under data parallelism the processes must agree: one skipping its backward pass while the others run theirs
        would leave DDP's gradient all-reduce waiting forever, so a NaN on any process skips the step on all.

        Args:
            value: the loss or gradient norm of this process.

        Returns:
            True when it is finite everywhere.
        """
        bad = (~torch.isfinite(value.detach())).any().float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad.reshape(1), reduction="sum")
        return not bool(bad.sum())

    def gradients_finite(self, optimizer: torch.optim.Optimizer, max_norm: float = 0.0) -> bool:
        """Unscale ``optimizer``'s gradients, clip them to ``max_norm`` and say whether they are finite.

        Checked with clipping off too (``max_norm`` 0): a NaN gradient would otherwise reach the weights. Under fp16
        the scaler skips a step whose gradients overflowed by itself, which is routine, not a fault: True.

        Args:
            optimizer: the optimiser about to step.
            max_norm: clip the gradients' total norm to this (0: no clipping).

        Returns:
            whether the step may be taken.
        """
        self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if max_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm(gradients(optimizer))
        return self.scaler.is_enabled() or self.is_finite(norm)

    def average_over_processes(self, tensors: list[torch.Tensor], bucket_numel: int = 2**24) -> None:
        """Average ``tensors`` over the data-parallel processes, in place (nothing in one process).

        What DDP does for a trainer that builds its gradient in several backward passes (the unpaired joint step's
        segments), where DDP would all-reduce in every pass and expect each parameter in each: called with the
        gradients once they are complete, before clipping and the optimiser step; and with the running statistics of
        BatchNorm layers, which DDP would send from the main process. The tensors are concatenated into buckets of
        about ``bucket_numel`` elements, so a few collective calls move them instead of one per tensor.

        Args:
            tensors: floating-point tensors, the same shapes in the same order on every process (the processes run
                the same graph, so a parameter without a gradient here has none anywhere).
            bucket_numel: elements per all-reduce call.
        """
        world = self.accelerator.num_processes
        if world == 1:
            return
        import torch.distributed as dist

        buckets: dict[tuple, list[list[torch.Tensor]]] = {}
        for tensor in tensors:
            kind = buckets.setdefault((tensor.dtype, tensor.device), [[]])
            if sum(t.numel() for t in kind[-1]) >= bucket_numel:
                kind.append([])
            kind[-1].append(tensor)
        for bucket in (bucket for kind in buckets.values() for bucket in kind):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            flat /= world
            for tensor, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                tensor.copy_(part.view_as(tensor))

    def mean_over_processes(self, logs: dict[str, float]) -> dict[str, float]:
        """A step's logged values averaged over the data-parallel processes (each computed them on its share of the
        batch), so the log shows the whole batch's losses; ``logs`` itself in one process.

        Args:
            logs: this process's values; every process has the same names.

        Returns:
            {name: mean over the processes}.
        """
        if self.accelerator.num_processes == 1:
            return logs
        names = sorted(logs)
        values = torch.tensor([logs[k] for k in names], dtype=torch.float64, device=self.accelerator.device)
        return dict(zip(names, self.accelerator.reduce(values, reduction="mean").tolist()))

    def my_share(self, n: int) -> range:
        """The indices of ``n`` evaluation items this process handles: every ``num_processes``-th, from its rank, so
        data-parallel processes translate the test images once between them (all of them in one process).

        Args:
            n: the number of items.

        Returns:
            this process's indices, ascending.
        """
        return range(self.accelerator.process_index, n, self.accelerator.num_processes)

    def gather_shares(self, results: list) -> list:
        """Every process's results for its ``my_share`` of the items, in the items' order, on every process.

        Args:
            results: this process's results, one per index of its share, in that order (picklable: CPU tensors).

        Returns:
            the results of all items; ``results`` itself in one process.
        """
        world = self.accelerator.num_processes
        if world == 1:
            return results
        from accelerate.utils import gather_object

        shares = gather_object([results])  # one list per process, by rank
        return [shares[i % world][i // world] for i in range(sum(map(len, shares)))]

    def skip_update(self, logs: dict[str, float], what: str) -> dict[str, float]:
        """Drop this iteration's update after a non-finite ``what``: no optimiser step, gradients cleared.

        The LR schedulers still step, so the learning rate stays a function of the step number.

        Args:
            logs: the step's logged values (the non-finite ones included, so the log shows what happened).
            what: the value that was not finite, e.g. "generator loss".

        Returns:
            ``end_step``'s logs.
        """
        for name, stateful in self._states().items():
            if name.startswith("optimizer"):
                stateful.zero_grad(set_to_none=True)
            elif name.startswith("scheduler"):
                step_scheduler(stateful)
        return self.end_step(logs, bad=what)

    def end_step(self, logs: dict[str, float], bad: str | None = None) -> dict[str, float]:
        """Advance the step counter; count a bad step and stop after more than ``max_bad_steps`` in a row.

        Args:
            logs: the step's logged values; ``skipped_steps`` (the run's count so far) is added.
            bad: what was not finite in this step (its update, or part of it, was skipped), or None.

        Returns:
            the logs.

        Raises:
            TrainingDivergedError: more than ``config.max_bad_steps`` bad steps in a row; names the step and the last
                checkpoint.
        """
        self.step += 1
        if bad is None:
            self.bad_steps_in_row = 0
        else:
            self.skipped_steps += 1
            self.bad_steps_in_row += 1
            logger.warning(
                "step %d: the %s is NaN or Inf; its update was skipped (%d in a row)",
                self.step, bad, self.bad_steps_in_row,
            )  # fmt: skip
            limit = getattr(self.config, "max_bad_steps", 5)
            if self.bad_steps_in_row > limit:
                raise TrainingDivergedError(self._diverged_message(bad, limit))
        logs["skipped_steps"] = float(self.skipped_steps)
        return logs

    def _diverged_message(self, bad: str, limit: int) -> str:
        first = self.step - self.bad_steps_in_row + 1
        last = self.latest_checkpoint()
        where = (
            f"The last good checkpoint is {last} (step {int(last.name.removeprefix('step_'))}); resume from it with"
            f" --resume latest"
            if last is not None
            else "No checkpoint was saved yet; start again"
        )
        return (
            f"Training stopped at step {self.step}: the {bad} was NaN or Inf at {self.bad_steps_in_row} steps in a"
            f" row (steps {first}-{self.step}), more than max_bad_steps={limit}. Skipped updates left the weights"
            f" untouched, but the run is not recovering. {where}, e.g. with a lower --learning-rate, or check the data"
            f" around these steps."
        )

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def _states(self) -> dict:
        states = {"optimizer_g": self.optimizer_g, "scheduler_g": self.scheduler_g}
        if self.discriminator is not None:
            states.update(optimizer_d=self.optimizer_d, scheduler_d=self.scheduler_d)
        if self.scaler.is_enabled():  # the loss scale is part of an exact resume in fp16
            states["scaler"] = self.scaler
        return states

    def save_checkpoint(self) -> Path:
        """Everything a resume needs: trained weights, D, optimiser and scheduler states, the step and config.

        Written into a temporary folder that is renamed into place when complete, so a crash mid-write never leaves a
        half checkpoint that ``--resume`` would pick; then only the newest ``keep_checkpoints`` are kept. A write that
        fails (disk full, quota, I/O error) removes the partial folder and stops the run; earlier checkpoints are
        never touched before the new one is complete.

        Returns:
            the checkpoint folder.

        Raises:
            CheckpointWriteError: the checkpoint could not be written (exit code 1); names the folder, the OS error,
                the free space and the newest intact checkpoint.
        """
        root = self.output_dir / "checkpoints"
        folder = root / f"step_{self.step:07d}"
        failure = None
        if self.accelerator.is_main_process:
            partial = root / f".{folder.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)  # left by an earlier crash
            try:
                self._write_checkpoint(partial)
            except WRITE_ERRORS as error:
                shutil.rmtree(partial, ignore_errors=True)  # a half checkpoint would only take the space back
                failure = CheckpointWriteError(self._write_failed_message(folder, error))
                failure.__cause__ = error
            else:
                if folder.exists():  # the same step saved again (e.g. after a resume): replace it
                    shutil.rmtree(folder)
                os.replace(partial, folder)
                for old in self.checkpoints()[: -max(1, self.config.keep_checkpoints)]:
                    shutil.rmtree(old)
        self._stop_all_if(failure, folder)
        return folder

    def _stop_all_if(self, failure: CheckpointWriteError | None, folder: Path) -> None:
        """Raise ``failure`` on the main process and a matching error on every other one.

        Only the main process writes; the others would otherwise wait for it forever in ``wait_for_everyone``.
        """
        if self.accelerator.num_processes > 1:
            failed = torch.tensor([float(failure is not None)], device=self.accelerator.device)
            if float(self.accelerator.reduce(failed, reduction="sum").sum()) and failure is None:
                failure = CheckpointWriteError(f"The main process could not write {folder}; see its message.")
        if failure is not None:
            raise failure
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, partial: Path) -> None:
        save_pretrained(self.unwrapped, partial / "model", self._text_encoder_to_save)
        if self.discriminator is not None:
            # save_model: the two unpaired discriminators share one frozen CLIP tower, which a plain state dict
            # would list twice (safetensors refuses shared tensors); it is stored once and restored to both.
            save_model(self.accelerator.unwrap_model(self.discriminator), str(partial / DISCRIMINATOR))
            readable_like_other_files(partial / DISCRIMINATOR)
        save_state({k: v.state_dict() for k, v in self._states().items()}, partial / OPTIMIZER_STATE)
        state = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_row": self.bad_steps_in_row,
            "config": asdict(self.config),
        }
        (partial / TRAINER_STATE).write_text(json.dumps(state))  # written last: its presence marks completeness

    def _write_failed_message(self, folder: Path, error: Exception) -> str:
        reason = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
        try:
            free = f"{shutil.disk_usage(folder.parent).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        last = self.latest_checkpoint()
        kept = f"the last complete checkpoint {last} is intact" if last is not None else "no earlier checkpoint exists"
        return (
            f"Could not write {folder} ({reason}; {free}). Training stopped at step"
            f" {self.step}; {kept}. Free some space (or lower --keep-checkpoints) and continue with --resume latest."
        )

    def load_checkpoint(self, folder: str | Path) -> None:
        """Resume from ``save_checkpoint``'s folder (safetensors and JSON only: nothing in it can run code)."""
        folder = Path(folder)
        state_file = folder / TRAINER_STATE
        if not state_file.is_file():
            raise BadInputError(f"{folder} is not a training checkpoint ({TRAINER_STATE} missing).")
        try:
            trainer_state = json.loads(state_file.read_text())
            self.check_resumable_config(trainer_state.get("config", {}), folder)
            self.step = int(trainer_state["step"])
            # absent in checkpoints written before skipped steps were counted
            self.skipped_steps = int(trainer_state.get("skipped_steps", 0))
            self.bad_steps_in_row = int(trainer_state.get("bad_steps_in_row", 0))
            # checked as a model folder's are: a NaN or integer tensor would otherwise train on silently
            weights = load_file(folder / "model" / WEIGHTS_NAME)
            check_tensors(weights, folder / "model" / WEIGHTS_NAME)
            self.unwrapped.load_trained_state_dict(weights)
            if self._text_encoder_to_save is not None:
                text_weights = load_file(folder / "model" / TEXT_ENCODER_NAME)
                check_tensors(text_weights, folder / "model" / TEXT_ENCODER_NAME)
                self._text_encoder_to_save.load_state_dict(text_weights)
            state = load_state(folder / OPTIMIZER_STATE)
            for name, stateful in self._states().items():
                stateful.load_state_dict(state[name])
            if self.discriminator is not None:
                load_model(self.accelerator.unwrap_model(self.discriminator), str(folder / DISCRIMINATOR))
        except BadInputError:
            raise
        except Exception as error:  # safetensors and json each raise their own types for damage
            raise BadInputError(
                f"Cannot resume from {folder}: it is damaged or from another run ({load_failure(error)})."
                f" Pass an older checkpoint with --resume PATH."
            ) from error

    def check_resumable_config(self, saved: dict, folder: Path) -> None:
        """Compare this run's options with those a checkpoint was written with (``saved``).

        Options that change what the checkpoint holds (the model's shape, the discriminator, the fp16 loss scale)
        must match; other changes (learning rate, batch size, data, ...) are allowed and listed in a warning, as the
        run then differs from an uninterrupted one (another ``--base-model`` too: the same backbone moved to a local
        folder is a common case, and weights that do not fit it are refused as they load). Options of the run's
        bookkeeping (length, saving, evaluation, logging) are not compared.

        Args:
            saved: the checkpoint's config (``trainer_state.json``'s "config"; empty in old checkpoints: no check).
            folder: the checkpoint, named in the message.

        Raises:
            BadInputError: a structural option differs; names each with both values.
        """
        if not saved:  # a checkpoint from before options were saved with it
            return
        now = asdict(self.config)
        foreign = sorted(set(saved) - set(now))  # options are only ever added: these belong to another trainer
        if foreign:
            raise BadInputError(
                f"{folder} was written by another kind of training run (its options include {', '.join(foreign[:3])},"
                f" which this one does not take): resume it with the command that wrote it (turbo-i2i train paired"
                f" or train unpaired)."
            )

        def contents(config: dict) -> dict:  # what the checkpoint's contents depend on
            d_on = config.get("disc", "none") != "none" and config.get("lambda_gan", 0) > 0
            shape = {k: config.get(k) for k in STRUCTURAL_OPTIONS}
            shape["disc"] = shape["disc"] if d_on else "none"
            return {**shape, "fp16": config.get("mixed_precision") == "fp16"}

        was, is_ = contents(saved), contents(now)

        def shown(config: dict, contents: dict, k: str):  # the discriminator is off with --lambda-gan 0 too
            return f"{config.get(k)} with --lambda-gan {config.get('lambda_gan')}" if k == "disc" else contents[k]

        differ = [f"--{k.replace('_', '-')} {shown(now, is_, k)} (the checkpoint's: {shown(saved, was, k)})"
                  for k in STRUCTURAL_OPTIONS if was[k] != is_[k]]  # fmt: skip
        if was["fp16"] != is_["fp16"]:  # the loss scale is saved under fp16 only
            differ.append(f"--mixed-precision {now['mixed_precision']} (the checkpoint's: {saved['mixed_precision']})")
        if differ:
            raise BadInputError(
                f"Cannot resume from {folder} with other options than it was written with: {', '.join(differ)}."
                f" Pass the checkpoint's values, or start a new run in another --output-dir."
            )
        changed = [
            f"{k} {saved[k]!r} -> {v!r}"
            for k, v in now.items()
            if k in saved and saved[k] != v and k not in BOOKKEEPING_OPTIONS and k not in STRUCTURAL_OPTIONS
        ]
        if changed:
            logger.warning("resuming with changed options: %s (unlike an uninterrupted run)", ", ".join(changed))

    def checkpoints(self) -> list[Path]:
        """This run's complete checkpoints, oldest first."""
        return run_checkpoints(self.output_dir)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of this run, if any."""
        found = self.checkpoints()
        return found[-1] if found else None

    def check_unused_output_dir(self) -> None:
        """Refuse to start a new run in a folder that holds one: its checkpoints would be rotated away, its model
        replaced and its log mixed with the new one's.

        Raises:
            BadInputError: ``output_dir`` holds checkpoints, an exported model or a log; names them (nothing changed).
        """
        latest = self.latest_checkpoint()
        held = [f"checkpoints up to {latest.name}"] if latest is not None else []
        held += ["an exported model/"] if (self.output_dir / "model").exists() else []
        held += [LOG_FILE] if (self.output_dir / LOG_FILE).exists() else []
        if held:
            raise BadInputError(
                f"{self.output_dir} already holds a training run ({', '.join(held)}). Continue it with --resume, or"
                f" start a new one in another --output-dir; nothing there was changed."
            )

    def set_aside_what_follows(self) -> None:
        """After a resume at ``self.step``, move what a run beyond that step left into
        ``output_dir/superseded/after_step_XXXXXXX_<time>/``: newer checkpoints, evaluation grids and log lines of
        later steps, and the exported model (this run exports its own; a finished run's model is kept unless it is
        only resumed to export again). ``--resume latest``, the checkpoint rotation and the log then follow this run
        alone, and nothing is deleted or overwritten. Main process only.
        """
        later = [c for c in self.checkpoints() if int(c.name.removeprefix("step_")) > self.step]
        grids = [g for g in (self.output_dir / "eval").glob("step_*.png") if _grid_step(g) > self.step]
        log = self.output_dir / LOG_FILE
        kept, after = [], []
        for line in log.read_text().splitlines(keepends=True) if log.is_file() else []:
            (after if _logged_step(line) > self.step else kept).append(line)
        model = self.output_dir / "model"
        model_aside = model.exists() and (bool(later) or self.step < self.config.max_steps)
        if not (later or grids or after or model_aside):
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.output_dir / "superseded" / f"after_step_{self.step:07d}_{stamp}"
        for n in range(2, 1000):  # a second resume within the same second
            if not aside.exists():
                break
            aside = aside.with_name(f"after_step_{self.step:07d}_{stamp}_{n}")
        for files, folder in ((later, aside / "checkpoints"), (grids, aside / "eval")):
            for path in files:
                folder.mkdir(parents=True, exist_ok=True)
                os.replace(path, folder / path.name)
        aside.mkdir(parents=True, exist_ok=True)
        if model_aside:
            os.replace(model, aside / "model")
        if after:
            (aside / LOG_FILE).write_text("".join(after))
            partial = log.with_name(f".{LOG_FILE}.partial")
            partial.write_text("".join(kept))
            os.replace(partial, log)
        logger.warning(
            "moved what followed step %d (%d checkpoints, %d evaluation grids, %d log lines%s) to %s",
            self.step, len(later), len(grids), len(after), ", the exported model" if model_aside else "", aside,
        )  # fmt: skip

    # --- export and the run loop ---------------------------------------------------------------------------------

    def export(self) -> Path:
        """Write the final model (our format) to ``output_dir/model``, atomically like a checkpoint.

        Returns:
            the model folder.

        Raises:
            CheckpointWriteError: it could not be written (the checkpoints are intact).
        """
        folder = self.output_dir / "model"
        failure = None
        if self.accelerator.is_main_process:
            partial = self.output_dir / ".model.partial"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                save_pretrained(self.unwrapped, partial, self._text_encoder_to_save)
            except WRITE_ERRORS as error:
                shutil.rmtree(partial, ignore_errors=True)
                failure = CheckpointWriteError(self._write_failed_message(folder, error))
                failure.__cause__ = error
            else:
                if folder.exists():
                    shutil.rmtree(folder)
                os.replace(partial, folder)
        self._stop_all_if(failure, folder)
        return folder

    def train(self, resume: bool | str | Path = False, stop_at: int | None = None) -> dict[str, float]:
        """Run to ``max_steps`` (or ``stop_at``), checkpointing and evaluating on schedule, then export.

        Every logged value goes to ``output_dir/logs.jsonl`` (one JSON object per line) and to the accelerator's
        trackers (TensorBoard by default); a progress bar shows the running losses.

        Args:
            resume: False (a new run: ``output_dir`` must not hold one); True or "latest" (the newest checkpoint
                of this run, if there is one); or a checkpoint folder. What a run beyond the checkpoint left is set
                aside (``set_aside_what_follows``).
            stop_at: stop early at this step (the run can be resumed later).

        Returns:
            the last step's losses and the last evaluation.

        Raises:
            BadInputError: a new run in a folder that holds one, a bad checkpoint, or ``stop_at`` below 1.
        """
        from tqdm import tqdm

        if stop_at is not None and stop_at < 1:
            raise BadInputError(f"--stop-at must be at least 1, got {stop_at}.")
        try:  # now, not at the first log line or checkpoint after a step's work
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BadInputError(f"Cannot use --output-dir {self.output_dir} ({error.strerror}).") from error
        if resume:
            folder = self.latest_checkpoint() if resume is True or resume == "latest" else Path(resume)
            if folder is None:
                logger.warning("no checkpoint in %s yet: starting from step 0", self.output_dir / "checkpoints")
            else:
                self.load_checkpoint(folder)
                logger.warning("resumed from %s (step %d)", folder, self.step)
            failure = None
            if self.accelerator.is_main_process:
                try:
                    self.set_aside_what_follows()
                except OSError as error:
                    failure = CheckpointWriteError(
                        f"Could not move the superseded files of {self.output_dir}: {error}"
                    )
            self._stop_all_if(failure, self.output_dir / "superseded")  # the other processes wait for this
        elif self.step == 0:  # a new run (a trainer that has trained goes on with its own run)
            self.check_unused_output_dir()
        end = min(self.config.max_steps, stop_at if stop_at is not None else math.inf)
        if self.step >= end:  # a resume past the end: say so rather than exit as if it had trained
            limit = "--max-steps" if end == self.config.max_steps else "--stop-at"
            logger.warning(
                "already at step %d, %s is %d: nothing to train (pass a larger %s, or --resume PATH to an earlier"
                " checkpoint)", self.step, limit, end, limit,
            )  # fmt: skip
        main = self.accelerator.is_main_process
        # A resume hides from TensorBoard what earlier runs logged after this step (their log lines are set aside)
        purge = {"tensorboard": {"purge_step": self.step + 1}} if resume else {}
        self.accelerator.init_trackers(self.output_dir.name, config=_flat(asdict(self.config)), init_kwargs=purge)
        logs: dict[str, float] = {}
        bar = tqdm(total=end, initial=self.step, desc="training", unit="step", disable=not main)
        while self.step < end:
            started = time.perf_counter()
            # raises TrainingDivergedError after too many NaN/Inf steps in a row
            logs = self.mean_over_processes(self.train_step())
            logs["seconds_per_step"] = time.perf_counter() - started
            logs["lr"] = self.scheduler_g.get_last_lr()[0]
            if self.step % max(1, self.config.eval_every) == 0 or self.step == self.config.max_steps:
                logs.update(self.evaluate())
                if main:
                    bar.write(f"step {self.step} {format_logs(logs)}")
            self.log(logs)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")}, refresh=False)
            if self.step % max(1, self.config.checkpoint_every) == 0 or self.step == end:
                self.save_checkpoint()
        bar.close()
        if self.step >= self.config.max_steps:
            self.export()
        self.accelerator.end_training()
        return logs

    def save_eval_grid(self, rows: list[list[torch.Tensor]]) -> None:
        """Write an evaluation's image grid (``save_grid``) to ``output_dir/eval/step_XXXXXXX.png`` and show it in the
        run's trackers (TensorBoard's images tab, a W&B image) as ``eval_grid``; the main process only.

        Args:
            rows: the grid's rows of (3, H, W) images in [-1, 1].
        """
        if not self.accelerator.is_main_process:
            return
        path = save_grid(rows, self.output_dir / "eval" / f"step_{self.step:07d}.png")
        trackers = {tracker.name: tracker for tracker in self.accelerator.trackers}
        if not trackers:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as grid:
            pixels = np.asarray(grid.convert("RGB"))
        if "tensorboard" in trackers:
            trackers["tensorboard"].log_images({"eval_grid": pixels[None]}, step=self.step, dataformats="NHWC")
        if "wandb" in trackers:
            trackers["wandb"].log_images({"eval_grid": [pixels]}, step=self.step)

    def log(self, values: dict[str, float]) -> None:
        """Record ``values`` at the current step: JSONL file (main process) and trackers."""
        self.accelerator.log(values, step=self.step)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / LOG_FILE, "a") as f:
                f.write(json.dumps({"step": self.step, **values}) + "\n")

    def load_metrics(self) -> Metrics:
        """``translation_metrics`` with the pretrained networks named by ``config.eval_metrics``."""
        from ..evaluation import load_networks

        paths = (("inception", self.config.inception_path), ("dino", self.config.dino_path))
        nets = load_networks(metric_names(self.config.eval_metrics), weights={k: v for k, v in paths if v},
                             device=self.accelerator.device, hints=self.network_hints)  # fmt: skip
        return translation_metrics(nets.inception, nets.dino)


def save_grid(rows: list[list[torch.Tensor]], path: str | Path) -> Path:
    """Save images in [-1, 1] as a grid, one row per list (e.g. input / output / target of each test pair).

    Args:
        rows: lists of (3, H, W) tensors, as many in each; an image of another size than the first is shown resized
            to it (test images may differ in size).
        path: the PNG to write (folders are created).

    Returns:
        the path.
    """
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = rows[0][0].shape[-2:]

    def cell(image: torch.Tensor) -> torch.Tensor:
        image = image.float().cpu()
        if image.shape[-2:] == size:
            return image
        return torch.nn.functional.interpolate(image[None], size=tuple(size), mode="bilinear", antialias=True)[0]

    images = torch.stack([cell(image) for row in rows for image in row])
    save_image((images + 1) / 2, path, nrow=len(rows[0]), padding=2)
    return path


def make_accelerator(config):
    """An ``Accelerator`` logging to ``config.report_to`` ("tensorboard", "wandb" or "none") under the run folder."""
    from accelerate import Accelerator

    report_to = None if config.report_to == "none" else config.report_to
    return Accelerator(log_with=report_to, project_dir=config.output_dir)


def _grid_step(path: Path) -> int:
    """The step of an evaluation grid ``eval/step_XXXXXXX.png`` (-1 for another name)."""
    digits = path.stem.removeprefix("step_")
    return int(digits) if digits.isdigit() else -1


def _logged_step(line: str) -> float:
    """The step of a ``logs.jsonl`` line; infinite for a line cut short (a crash mid-write), which a resume sets
    aside with the rest of what followed its checkpoint."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _flat(config: dict) -> dict:
    # trackers take flat scalars and strings only
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.items()}


def run_checkpoints(output_dir: str | Path) -> list[Path]:
    """A run folder's complete checkpoints, oldest first.

    Args:
        output_dir: the run's folder.

    Returns:
        the ``checkpoints/step_*`` folders holding a ``TRAINER_STATE`` (written last: a complete checkpoint).
    """
    root = Path(output_dir) / "checkpoints"
    found = root.glob("step_*") if root.is_dir() else []
    return sorted(p for p in found if CHECKPOINT_NAME.fullmatch(p.name) and (p / TRAINER_STATE).is_file())


def saved_options(output_dir: str | Path, resume: bool | str | Path) -> dict:
    """The options the checkpoint a resume continues from was written with, so that a ``--resume`` needs only the
    options it changes (it fell back to the defaults: another batch size, the hub backbone, ...).

    Args:
        output_dir: the run's folder.
        resume: True or "latest" (its newest checkpoint) or a checkpoint folder.

    Returns:
        the checkpoint's config; {} when there is none or it cannot be read (the trainer then says what is wrong).
    """
    if resume is True or resume == "latest":
        found = run_checkpoints(output_dir)
        folder = found[-1] if found else None
    else:
        folder = Path(resume)
    try:
        config = json.loads((folder / TRAINER_STATE).read_text()).get("config")
    except (TypeError, OSError, ValueError, AttributeError):
        return {}
    return dict(config) if isinstance(config, dict) else {}


def format_logs(logs: dict[str, float]) -> str:
    """One line of a step's logged values: counts as integers, other values with 4 significant digits (.4f showed a
    learning rate of 5e-6 as 0.0000).

    Args:
        logs: name -> value.

    Returns:
        "name=value name=value ...".
    """
    return " ".join(f"{k}={int(v)}" if float(v).is_integer() else f"{k}={v:.4g}" for k, v in logs.items())
