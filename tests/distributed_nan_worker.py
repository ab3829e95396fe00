"""Run by torch.distributed.run from test_training_faults.py: rank 1 alone sees a NaN loss at step 1, then the main
process alone fails to write a checkpoint (a full disk).

Each rank writes its trained weights, its count of skipped steps and the error its checkpoint call raised, so the
test can check that both ranks skipped the same step and both stopped at the failed write (no rank left waiting in a
collective call) and stayed identical.
"""

import errno
import json
import sys

import torch
from safetensors.torch import save_file

from turbo_i2i.errors import CheckpointWriteError
from turbo_i2i.training import loop
from turbo_i2i.training.paired import PairedTrainConfig, PairedTrainer

dataset, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
torch.manual_seed(0)
config = PairedTrainConfig(
    dataset=dataset, output_dir=out, base_model="tiny", transform="no_resize", batch_size=2, max_steps=3,
    learning_rate=1e-3, lr_warmup_steps=0, disc="patchgan", lambda_lpips=0.0, lambda_clipsim=0.0,
    checkpoint_every=1000, eval_every=1000, eval_metrics="", report_to="none",
)  # fmt: skip
trainer = PairedTrainer(config)
rank = trainer.accelerator.process_index
real_losses = trainer.losses


def losses(batch):
    terms = real_losses(batch)
    if rank == 1 and trainer.step == 1:
        terms["loss_g"] = terms["loss_g"] * float("nan")
    return terms


trainer.losses = losses
for _ in range(3):
    logs = trainer.train_step()
save_file(trainer.unwrapped.trained_state_dict(), f"{out}/rank{rank}.safetensors")


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


loop.save_model = disk_full  # only the main process writes, so only it meets the full disk
try:
    trainer.save_checkpoint()
    raised = None
except CheckpointWriteError as error:
    raised = str(error)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"skipped_steps": trainer.skipped_steps, "step": trainer.step, "raised": raised}, f)
