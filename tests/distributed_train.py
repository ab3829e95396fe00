"""Run by ``torch.distributed.run`` (or alone) from the training tests: a tiny trainer's run of three steps (logged to
``OUT/logs.jsonl``), each rank saving its trained weights, the discriminators' (when there are any), the generator's
gradient at the first optimiser step (``gradient.<name>``) and its own ``loss_g`` of each step (``own_loss_g``) to
``OUT/rank<N>.safetensors``. Before training, an evaluation of every test image: its scores (``eval.<name>``), the
images this rank's generator passes took in it (``eval_passes``) and, where a metric was computed, the mean of each
output it saw, in order (``metric_outputs.<direction>``).

Usage: ``distributed_train.py paired|unpaired DATASET OUT BATCH_SIZE [DISC]`` (DISC: unpaired only, default none).
"""

import sys

import torch
from safetensors.torch import save_file

task, dataset, out, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)
if task == "paired":
    from turbo_i2i.training.paired import PairedTrainConfig, PairedTrainer
    from turbo_i2i.training.pretrained import tiny_clip, tiny_lpips

    config = PairedTrainConfig(
        dataset=dataset, output_dir=out, base_model="tiny", transform="no_resize", batch_size=batch_size, max_steps=3,
        learning_rate=1e-3, lr_warmup_steps=0, disc="none", lambda_clipsim=1.0, checkpoint_every=1000,
        eval_every=1000, eval_metrics="", num_eval=0, report_to="none",
    )  # fmt: skip
    trainer = PairedTrainer(config, loss_networks=(tiny_lpips(), tiny_clip()))
else:
    from trainers import make_unpaired_trainer  # this folder is the script's: on sys.path

    disc = sys.argv[5] if len(sys.argv) > 5 else "none"
    trainer = make_unpaired_trainer(
        dataset, out, batch_size=batch_size, disc=disc, max_steps=3, checkpoint_every=1000, report_to="none",
        num_eval=0,
    )  # fmt: skip
passes = []
hook = trainer.unwrapped.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
metric_outputs = {}


def metric(direction, inputs, outputs, targets):
    """A stand-in for FID & co.: records which outputs, in which order, reached it."""
    metric_outputs[f"metric_outputs.{direction}"] = torch.stack([image.mean() for image in outputs])
    return {"images": len(outputs)}


trainer.metrics = metric
evaluation = {f"eval.{k}": torch.tensor(v) for k, v in trainer.evaluate().items()}
trainer.metrics = None
hook.remove()
first_gradient = {}
take_step = trainer.optimizer_g.step


def step_recording_the_first_gradient(*args, **kwargs):
    """The optimiser's step; the first call also keeps the gradient it is given (averaged over the processes)."""
    if not first_gradient:
        named = trainer.unwrapped.named_parameters()
        first_gradient.update({f"gradient.{n}": p.grad.clone() for n, p in named if p.grad is not None})
    return take_step(*args, **kwargs)


trainer.optimizer_g.step = step_recording_the_first_gradient
own_losses = []  # this process's loss_g of each step, before the run loop averages the logs over the processes
take_train_step = trainer.train_step


def train_step_recording_the_loss():
    logs = take_train_step()
    own_losses.append(logs["loss_g"])
    return logs


trainer.train_step = train_step_recording_the_loss
trainer.train()
weights = {**trainer.unwrapped.trained_state_dict(), **first_gradient, "own_loss_g": torch.tensor(own_losses)}
weights.update({**evaluation, **metric_outputs, "eval_passes": torch.tensor(sum(passes))})
if trainer.discriminator is not None:
    weights.update({f"discriminator.{k}": v for k, v in trainer.discriminator.state_dict().items()})
save_file(weights, f"{out}/rank{trainer.accelerator.process_index}.safetensors")
