"""Run by ``accelerate launch`` from test_train_paired.py: a few paired steps, each rank saving its weights."""

import sys

import torch
from safetensors.torch import save_file

from turbo_i2i.training.paired import PairedTrainConfig, PairedTrainer
from turbo_i2i.training.pretrained import tiny_clip, tiny_lpips

dataset, out, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(0)
config = PairedTrainConfig(
    dataset=dataset, output_dir=out, base_model="tiny", transform="no_resize", batch_size=batch_size, max_steps=3,
    learning_rate=1e-3, lr_warmup_steps=0, disc="none", lambda_clipsim=1.0, checkpoint_every=1000, eval_every=1000,
    eval_metrics="", report_to="none",
)  # fmt: skip
trainer = PairedTrainer(config, loss_networks=(tiny_lpips(), tiny_clip()))
for _ in range(3):
    trainer.train_step()
rank = trainer.accelerator.process_index
save_file(trainer.unwrapped.trained_state_dict(), f"{out}/rank{rank}.safetensors")
