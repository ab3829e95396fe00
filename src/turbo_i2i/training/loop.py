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
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_model

from ..checkpoints import TEXT_ENCODER_NAME, WEIGHTS_NAME, save_pretrained
from ..errors import BadInputError
from ..generator import OneStepGenerator

logger = logging.getLogger("turbo_i2i")
TRAINER_STATE = "trainer_state.json"
HALF_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZER_STATE = "optimizer.pt"
DISCRIMINATOR = "discriminator.safetensors"


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The seed of one step's randomness: the same (seed, step, stream) always gives the same numbers."""
    return (seed * 1_000_003 + step * 7919 + stream) % (2**63)


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen (``requires_grad=False``) parameters of ``module`` in ``dtype``; trainable ones stay fp32.

    True mixed precision: the frozen backbone is only ever read under autocast, so keeping it in bf16 halves its
    memory and spares autocast a cast per use (the casts of frozen weights are also kept alive for the backward pass
    of every generator pass). Parameters shared between modules (the unpaired model's frozen VAE) are cast once.

    Args:
        module: the model, changed in place.
        dtype: the storage dtype of its frozen parameters, e.g. ``torch.bfloat16``.
    """
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


class TrainerBase:
    """The run machinery shared by the trainers.

    A subclass sets, in its ``__init__``: ``config`` (with ``output_dir``, ``seed``, ``batch_size``, ``max_steps``,
    ``lr_scheduler``, ``lr_warmup_steps``, ``checkpoint_every``, ``eval_every``), ``accelerator``, ``output_dir``,
    ``train_data`` (a data set with ``set_epoch``), ``optimizer_g`` / ``scheduler_g``, ``discriminator`` (a module or
    None) with ``optimizer_d`` / ``scheduler_d``, and ``step = 0``; and it defines ``unwrapped`` (the generator),
    ``train_step()`` and ``evaluate()``.
    """

    collate_fn = staticmethod(lambda items: items)  # replaced by the data set's collate function
    config: object
    step: int

    # --- set-up pieces -------------------------------------------------------------------------------------------

    def autocast(self) -> torch.autocast:
        """Autocast to the run's half precision (``config.mixed_precision`` "bf16" / "fp16"; a no-op for "no").

        The trainer's own setting rather than Accelerate's: Accelerate keeps its precision in process-wide state that
        cannot change once set, and benchmarks and tests compare fp32 and half-precision runs in one process.
        """
        dtype = HALF_PRECISION.get(self.config.mixed_precision)
        return torch.autocast(self.accelerator.device.type, dtype=dtype, enabled=dtype is not None)

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

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def _states(self) -> dict:
        states = {"optimizer_g": self.optimizer_g, "scheduler_g": self.scheduler_g}
        if self.discriminator is not None:
            states.update(optimizer_d=self.optimizer_d, scheduler_d=self.scheduler_d)
        return states

    def save_checkpoint(self) -> Path:
        """Everything a resume needs: trained weights, D, optimiser and scheduler states, the step and config."""
        folder = self.output_dir / "checkpoints" / f"step_{self.step:07d}"
        if self.accelerator.is_main_process:
            save_pretrained(self.unwrapped, folder / "model", self._text_encoder_to_save)
            if self.discriminator is not None:
                # save_model: the two unpaired discriminators share one frozen CLIP tower, which a plain state dict
                # would list twice (safetensors refuses shared tensors); it is stored once and restored to both.
                save_model(self.accelerator.unwrap_model(self.discriminator), str(folder / DISCRIMINATOR))
            torch.save({k: v.state_dict() for k, v in self._states().items()}, folder / OPTIMIZER_STATE)
            (folder / TRAINER_STATE).write_text(json.dumps({"step": self.step, "config": asdict(self.config)}))
        self.accelerator.wait_for_everyone()
        return folder

    def load_checkpoint(self, folder: str | Path) -> None:
        """Resume from ``save_checkpoint``'s folder (loaded with safetensors / ``weights_only``: no code runs)."""
        folder = Path(folder)
        state_file = folder / TRAINER_STATE
        if not state_file.is_file():
            raise BadInputError(f"{folder} is not a training checkpoint ({TRAINER_STATE} missing).")
        self.step = int(json.loads(state_file.read_text())["step"])
        self.unwrapped.load_trained_state_dict(load_file(folder / "model" / WEIGHTS_NAME))
        if self._text_encoder_to_save is not None:
            self._text_encoder_to_save.load_state_dict(load_file(folder / "model" / TEXT_ENCODER_NAME))
        state = torch.load(folder / OPTIMIZER_STATE, map_location="cpu", weights_only=True)
        for name, stateful in self._states().items():
            stateful.load_state_dict(state[name])
        if self.discriminator is not None:
            load_model(self.accelerator.unwrap_model(self.discriminator), str(folder / DISCRIMINATOR))

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint of this run, if any."""
        found = sorted((self.output_dir / "checkpoints").glob("step_*"))
        return found[-1] if found else None

    # --- export and the run loop ---------------------------------------------------------------------------------

    def export(self) -> Path:
        """Write the final model (our format) to ``output_dir/model``."""
        folder = self.output_dir / "model"
        if self.accelerator.is_main_process:
            save_pretrained(self.unwrapped, folder, self._text_encoder_to_save)
        self.accelerator.wait_for_everyone()
        return folder

    def train(self, resume: bool = False, stop_at: int | None = None) -> dict[str, float]:
        """Run to ``max_steps`` (or ``stop_at``), checkpointing and evaluating on schedule, then export.

        Args:
            resume: continue from the newest checkpoint of this run folder.
            stop_at: stop early at this step (the run can be resumed later).

        Returns:
            the last step's losses and the last evaluation.
        """
        if resume and (latest := self.latest_checkpoint()) is not None:
            self.load_checkpoint(latest)
            logger.warning("resumed from %s (step %d)", latest, self.step)
        end = min(self.config.max_steps, stop_at if stop_at is not None else math.inf)
        logs: dict[str, float] = {}
        started = time.perf_counter()
        while self.step < end:
            logs = self.train_step()
            if self.step % max(1, self.config.eval_every) == 0 or self.step == self.config.max_steps:
                logs.update(self.evaluate())
                seconds = (time.perf_counter() - started) / max(1, self.step)
                logger.warning("step %d %s (%.2f s/step)", self.step, _fmt(logs), seconds)
            if self.step % max(1, self.config.checkpoint_every) == 0 or self.step == end:
                self.save_checkpoint()
        if self.step >= self.config.max_steps:
            self.export()
        return logs


def _fmt(logs: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in logs.items())
