"""Tiny trainers on generated data, shared by the training tests (the built-in tiny backbone, stand-in loss and
evaluation networks: no download)."""

import contextlib
import shutil

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from turbo_i2i.evaluation import tiny_inception
from turbo_i2i.training.circles import write_dataset
from turbo_i2i.training.loop import translation_metrics
from turbo_i2i.training.paired import PairedTrainConfig, PairedTrainer
from turbo_i2i.training.pretrained import tiny_clip, tiny_lpips
from turbo_i2i.training.unpaired import UnpairedTrainConfig, UnpairedTrainer

FID_NET = tiny_inception()
CAPTION_A, CAPTION_B = "white outlines of shapes", "filled shapes"


def make_paired_trainer(dataset, out, **overrides):
    """A paired trainer: L2, LPIPS, CLIP-sim (tiny stand-ins) and PatchGAN; ``overrides`` change its options."""
    options = dict(
        dataset=str(dataset), output_dir=str(out), base_model="tiny", transform="no_resize", batch_size=3,
        max_steps=20, learning_rate=1e-3, lr_warmup_steps=0, disc="patchgan", lambda_clipsim=1.0,
        checkpoint_every=10, eval_every=10, num_eval=1, default_prompt="a red circle on a blue background",
    )  # fmt: skip
    options.update(overrides)
    torch.manual_seed(0)
    return PairedTrainer(
        PairedTrainConfig(**options), loss_networks=(tiny_lpips(), tiny_clip()), metrics=translation_metrics(FID_NET)
    )


def make_unpaired(root, n=10, size=32, drop_b=2, keep_test=True, test_fraction=0.1):
    """Circle outlines as domain A, filled shapes as domain B, unpaired (B has fewer images; a caption per domain)."""
    write_dataset(root, n=n, seed=3, size=size, test_fraction=test_fraction)
    for path in root.glob("*_prompts.json"):
        path.unlink()
    for path in sorted((root / "train_B").iterdir())[:drop_b]:
        path.unlink()
    if not keep_test:
        for domain in "AB":
            shutil.rmtree(root / f"test_{domain}")
    (root / "fixed_prompt_a.txt").write_text(CAPTION_A + "\n")
    (root / "fixed_prompt_b.txt").write_text(CAPTION_B + "\n")
    return root


def make_unpaired_trainer(dataset, out, metrics=None, **overrides):
    """An unpaired trainer: UNet LoRA rank 4, PatchGAN discriminators, tiny LPIPS; ``overrides`` change its options."""
    options = dict(
        dataset=str(dataset), output_dir=str(out), base_model="tiny", transform="no_resize", batch_size=1,
        max_steps=4, learning_rate=1e-3, lr_warmup_steps=0, unet_lora_rank=4, disc="patchgan", checkpoint_every=2,
        eval_every=1000, num_eval=1, eval_metrics="",
    )  # fmt: skip
    options.update(overrides)
    return UnpairedTrainer(UnpairedTrainConfig(**options), loss_networks=(tiny_lpips(), None), metrics=metrics)


def build_trainer(task, tmp_path, **overrides):
    """A paired or unpaired trainer on data generated in ``tmp_path / "data"``, writing to ``tmp_path / "run"``."""
    if task == "paired":
        write_dataset(tmp_path / "data", n=10, seed=3, size=32)
        return make_paired_trainer(tmp_path / "data", tmp_path / "run", **overrides)
    make_unpaired(tmp_path / "data")
    return make_unpaired_trainer(tmp_path / "data", tmp_path / "run", **overrides)


def train_three_steps(task, dataset, out, batch_size, processes=1, disc="none"):
    """Three steps of ``distributed_train.py`` in ``processes`` CPU processes (gloo, launched the way Accelerate
    launches them); returns what each rank saved (weights, first gradient, own losses: see that script), by rank."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = Path(__file__).with_name("distributed_train.py")
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    Path(out).mkdir(parents=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    command = [*launch, str(script), task, str(dataset), str(out), str(batch_size), disc]
    # a time limit, so that a process left waiting in a collective call fails the test instead of hanging the suite
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [load_file(Path(out) / f"rank{rank}.safetensors") for rank in range(processes)]


def check_shared_evaluation(rank0, rank1, single):
    """The evaluation ``distributed_train.py`` ran before training, in two processes against one: the ranks
    translated the test images once between them, both got the single process's scores (up to float rounding), and
    the metrics ran on the main process only, on every output in order. Pops the evaluation's entries."""
    import torch

    passes = [int(r.pop("eval_passes")) for r in (rank0, rank1, single)]  # images through the generator
    assert passes[0] + passes[1] == passes[2] and passes[1] <= passes[0] <= 2 * passes[1], passes  # strided shares
    seen = {k: single.pop(k) for k in list(single) if k.startswith("metric_outputs.")}
    assert seen and not any(k.startswith("metric_outputs.") for k in rank1)
    for key, means in seen.items():
        torch.testing.assert_close(rank0.pop(key), means, rtol=1e-5, atol=1e-5)
    scores = [{k: r.pop(k) for k in list(r) if k.startswith("eval.")} for r in (rank0, rank1, single)]
    assert scores[0].keys() == scores[2].keys() and scores[1].keys() < scores[0].keys()  # no metric on rank 1
    for key, value in scores[2].items():
        torch.testing.assert_close(scores[0][key], value, rtol=1e-5, atol=1e-6, msg=key)
        if key in scores[1]:
            assert torch.equal(scores[1][key], scores[0][key]), key


class WeightCasts(TorchDispatchMode):
    """Counts, per tensor, the dtype casts (``aten._to_copy``) of ``weights`` (e.g. fp32 trainable weights -> bf16
    under autocast) while active: ``casts[name]`` is how often the weight of that name was cast."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.names = {id(w): name for name, w in weights.items()}
        self.casts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and id(args[0]) in self.names:
            name = self.names[id(args[0])]
            self.casts[name] = self.casts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def trained_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s trainable parameters by name, less the VAE upsamplers' (cast as the sub-pixel kernels made from
    them, ``subpixel.py``, not directly)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad and "upsamplers" not in n}


@contextlib.contextmanager
def autocast_in_backward(module: torch.nn.Module):
    """While active, whether autocast was on in the backward pass of each output of ``module`` (e.g. a loss network):
    yields the list the answers are appended to."""
    seen: list[bool] = []

    def watch(_, inputs, output):
        output.register_hook(lambda grad: seen.append(torch.is_autocast_enabled(output.device.type)))

    handle = module.register_forward_hook(watch)
    try:
        yield seen
    finally:
        handle.remove()
