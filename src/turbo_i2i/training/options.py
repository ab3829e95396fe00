"""Training options: the config dataclasses of paired and unpaired runs and the named presets.

They live apart from the trainers, with no torch import, so that the command line can build its flags (one per
option) without loading torch and diffusers: ``turbo-i2i --help`` and the commands that do not train stay quick.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields

from ..errors import BadInputError
from ..seeds import check_seed

EVAL_METRICS = ("fid", "dino_structure")
DISC_KINDS = ("clip", "patchgan", "none")
STEP_MODES = ("joint", "separate")
MIXED_PRECISIONS = ("no", "bf16", "fp16", "auto")
# diffusers' schedulers that need no option beyond the warm-up and step counts (``diffusers.optimization``)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# accelerate's trackers (``accelerate.utils.LoggerType``), and none
REPORT_TO = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio", "all",
             "none")  # fmt: skip
# options that count something and need at least one of it, and options that may be 0 but not negative
AT_LEAST_ONE = ("unet_lora_rank", "vae_lora_rank", "batch_size", "gradient_accumulation_steps", "max_steps",
                "checkpoint_every", "eval_every", "keep_checkpoints")  # fmt: skip
NOT_NEGATIVE = ("lr_warmup_steps", "adam_weight_decay", "max_grad_norm", "num_eval", "max_bad_steps")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ``BadInputError`` naming the option and its choices unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise BadInputError(f"Unknown {name} {value!r}; choose one of {', '.join(allowed)}.")


def option_help(config_class: type) -> dict[str, str]:
    """What each option of a config dataclass means, from the "Args:" sections of its docstring and its bases' (a
    subclass's own description wins): the command line's help text, written once, beside the fields.

    Args:
        config_class: ``PairedTrainConfig`` or ``UnpairedTrainConfig`` (any class documenting its fields as
            ``name: text`` or ``name_a, name_b: text`` entries, continued on more deeply indented lines).

    Returns:
        {field name: description on one line}.
    """
    descriptions: dict[str, str] = {}
    for cls in reversed(config_class.__mro__):
        lines = inspect.cleandoc(cls.__dict__.get("__doc__") or "").splitlines()
        entries: list[list[str]] = []
        inside = False
        for line in lines:
            if line.strip() == "Args:":
                inside = True
            elif inside and line.startswith(" " * 8) and entries:
                entries[-1].append(line.strip())
            elif inside and line.startswith(" " * 4) and ":" in line:
                entries.append([line.strip()])
            elif inside:
                inside = False
        for entry in entries:
            names, text = " ".join(entry).split(":", 1)
            for name in names.split(","):
                descriptions[name.strip()] = text.strip().replace("``", "")
    return descriptions


def metric_names(eval_metrics: str) -> tuple[str, ...]:
    """The names in a comma-separated ``eval_metrics`` option ("" for none)."""
    return tuple(name.strip() for name in eval_metrics.split(",") if name.strip())


@dataclass
class TrainConfig:
    """What every training run is configured by; ``PairedTrainConfig`` and ``UnpairedTrainConfig`` add their recipe
    (and their own defaults where the recipes differ). Saved beside each checkpoint.

    Args:
        dataset: the data set folder (see the trainer's data module).
        output_dir: run folder: checkpoints/, the exported model/, logs.jsonl and eval images.
        base_model: backbone hub id, folder or built-in name.
        unet_lora_rank, vae_lora_rank: ranks of the UNet's and the VAE's LoRA adapters.
        transform: training transform (see ``training.data``).
        batch_size: images per step (per process; per domain for unpaired runs).
        gradient_accumulation_steps: batches whose gradients are summed into one optimiser step (the effective batch
            is ``batch_size * gradient_accumulation_steps * processes``).
        max_steps: optimiser steps to run.
        learning_rate, lr_scheduler, lr_warmup_steps, adam_weight_decay, max_grad_norm: AdamW's learning rate, its
            schedule (a diffusers scheduler name: constant, linear, cosine, ...) and warm-up steps, weight decay, and
            the norm gradients are clipped to (0: no clipping); for the generator and the discriminator.
        lambda_gan: weight of the adversarial term (0 turns it and the discriminator off).
        disc: discriminator: "clip" (vision-aided), "patchgan", or "none".
        mixed_precision: "no", "bf16" or "fp16" (with loss scaling): trainable weights and optimiser state stay
            fp32, the frozen backbone is stored in the half precision; "auto": bf16 where the device computes it
            natively, else "no" (``compute.resolve_mixed_precision``).
        from_model: start from this model's trained weights (a named model, model folder or official .pkl of the
            same task on the same backbone; LoRA ranks may grow, see ``training.warm_start``), e.g. the edge model
            for a sketch model, or an official unpaired model to fine-tune on one's own two sets.
        gradient_checkpointing: recompute UNet and VAE block activations in the backward pass.
        compile: ``torch.compile`` the UNet and the VAE encoders/decoders (``OneStepGenerator.compile_parts``): the
            first step compiles them (minutes at full size), later steps dispatch fewer, fused kernels.
        seed: seeds the init and every step's randomness.
        checkpoint_every, eval_every: steps between checkpoints, between evaluations.
        num_eval: test items evaluated (all when 0).
        eval_metrics: comma-separated metrics beyond the trainer's own: "fid" (clean-fid of the outputs against the
            target test images; needs 2+ of them) and "dino_structure" (DINO ViT-B/8 distance of input and output);
            "" for none.
        keep_checkpoints: how many of the newest checkpoints are kept.
        max_bad_steps: a step whose loss or gradient is NaN/Inf is skipped (no update) and counted; more than this
            many in a row stop the run, naming the step and the last checkpoint.
        report_to: where logged values go besides ``logs.jsonl``: "tensorboard", "wandb", another tracker of
            accelerate's ("mlflow", ...; its package installed) or "none".
        skip_bad: skip bad items with a warning instead of refusing the data set.
        lpips_path, clip_path: local weights for the loss networks (else their standard cache / download).
        inception_path, dino_path: local weights for the evaluation networks (else their cache / download).
        extra: recipe data that is not a training option (e.g. the demo preset's data set parameters).
    """

    dataset: str
    output_dir: str
    base_model: str = "stabilityai/sd-turbo"
    unet_lora_rank: int = 8
    vae_lora_rank: int = 4
    transform: str = "resize_512"
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = 10000
    learning_rate: float = 5e-6
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    lambda_gan: float = 0.5
    disc: str = "clip"
    mixed_precision: str = "no"
    from_model: str | None = None
    gradient_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    eval_every: int = 500
    num_eval: int = 16
    eval_metrics: str = "fid"
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    report_to: str = "tensorboard"
    skip_bad: bool = False
    lpips_path: str | None = None
    clip_path: str | None = None
    inception_path: str | None = None
    dino_path: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("disc", self.disc, DISC_KINDS)
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_choice("report_to", self.report_to, REPORT_TO)
        unknown = set(self.metric_names) - set(EVAL_METRICS)
        if unknown:
            raise BadInputError(f"Unknown eval metric(s) {sorted(unknown)}; choose from {', '.join(EVAL_METRICS)}.")
        # Checked here, before any model loads: these would otherwise fail in PyTorch, or (an evaluation count)
        # only at the first evaluation, after training, or be silently read as something else (0 steps).
        for name in AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise BadInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        lambdas = tuple(f.name for f in fields(self) if f.name.startswith("lambda_"))
        for name in NOT_NEGATIVE + lambdas:
            if getattr(self, name) < 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}.")
        self.seed = check_seed(self.seed, "--seed")
        if not self.learning_rate > 0:
            raise BadInputError(f"--learning-rate must be more than 0, got {self.learning_rate}.")

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names in ``eval_metrics``."""
        return metric_names(self.eval_metrics)

    @classmethod
    def from_dict(cls, data: dict):
        """Build from a dict, refusing unknown keys (a typo must not be silently ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInputError(f"Unknown training options: {', '.join(unknown)}.")
        return cls(**data)


@dataclass
class PairedTrainConfig(TrainConfig):
    """Everything a paired run depends on: ``TrainConfig``'s options (with its defaults, the paper's edge model recipe:
    UNet / VAE LoRA rank 8 / 4, ``resize_512``, batch 4, learning rate 5e-6) and these.

    Args:
        dataset: a folder in the paired layout (train_A/, train_B/, train_prompts.json, test_*) or a .jsonl manifest.
        train_all: train every backbone weight (the paper's "random init" setting) instead of adapters only.
        stochastic: train the r-blended model (conv_in, LoRA strength and skips follow r, the input is blended with
            noise; r is drawn uniformly in [0, 1] each step); evaluation runs at r = 1.
        lambda_l2, lambda_lpips, lambda_clipsim: weights of the L2, LPIPS and CLIP-similarity loss terms (0 turns a
            term and its network off).
        default_prompt: recorded as the exported model's default prompt.
        eval_transform: transform of the test pairs (by default the training transform; with random crops or flips
            there, a deterministic one such as resized_crop_512 scores whole pictures, as the public trainer's
            ``--test_image_prep`` does).

    ``num_eval`` test pairs are scored with L2, LPIPS and CLIP-sim besides ``eval_metrics``; the first four are also
    saved as an input/output/target grid.
    """

    train_all: bool = False
    stochastic: bool = False
    lambda_l2: float = 1.0
    lambda_lpips: float = 5.0
    lambda_clipsim: float = 5.0
    default_prompt: str | None = None
    eval_transform: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stochastic and self.gradient_checkpointing:
            # the recomputation in the backward pass would run at the trained strength, not at the step's r
            raise BadInputError("--stochastic cannot be combined with --gradient-checkpointing yet.")
        if self.stochastic and self.compile:
            # r is drawn anew each step and the compiled parts read it as a constant: every step would recompile
            raise BadInputError("--stochastic cannot be combined with --compile yet.")


PRESETS: dict[str, dict] = {
    # The built-in offline model: a tiny backbone trained from scratch on generated circles, on a 2-core CPU.
    # LPIPS and CLIP need downloaded weights and a GAN is not needed for flat colours, so the loss is L2 only.
    "demo-circles": dict(
        base_model="tiny-circles",
        train_all=True,
        transform="no_resize",
        # Measured (GPU sweep of the recipe, 8 variants): at learning rate 1e-3 the from-scratch model stays a mean
        # predictor (loss 0.52 after 1250 steps); 3e-4 with batch 64 leaves that plateau within 250 steps. The fill
        # colour is learned last, after shapes and background (a constant rate learned it between steps 1500 and 1800
        # of 2000, then sat at loss 0.036): the rate decays linearly so that the last steps refine the colours.
        # 3000 steps of about 1.1 s each on the 2-core CPU: 56 min in all (README).
        batch_size=64,
        max_steps=3000,
        # bf16 autocast where it is native: 2.8x faster per step than fp32 on the 2-core CPU with AVX-512 bf16, weights
        # stay fp32; fp32 elsewhere (emulated bf16 was 8.5x slower than fp32 on a 2-core AVX2 CPU).
        mixed_precision="auto",
        learning_rate=3e-4,
        lr_scheduler="linear",
        lr_warmup_steps=50,
        adam_weight_decay=0.0,
        lambda_lpips=0.0,
        lambda_clipsim=0.0,
        lambda_gan=0.0,
        disc="none",
        checkpoint_every=500,
        eval_every=500,
        num_eval=64,
        eval_metrics="",  # FID needs downloaded Inception weights; the demo's own metric is turbo-i2i eval-demo
        default_prompt="a red circle on a blue background",
        # 20000 samples (18000 for training): generating them takes seconds; each is seen about 11 times.
        extra={"circles": {"n": 20000, "seed": 1, "size": 64}},
    ),
}


@dataclass
class UnpairedTrainConfig(TrainConfig):
    """Everything an unpaired run depends on: ``TrainConfig``'s options, with the public CycleGAN-Turbo recipe's
    defaults (UNet LoRA rank 128 with alpha = rank, the 256 px random crop, batch 1 per domain, learning rate 1e-5,
    25000 steps, gradient clipping at 10, FID and DINO structure), and these.

    Args:
        dataset: a folder in the unpaired layout (train_A/, train_B/, fixed_prompt_a.txt, fixed_prompt_b.txt, test_*).
        eval_transform: transform of the test images (deterministic).
        use_8bit_adam: bitsandbytes' 8-bit AdamW for the generator (needs ``bitsandbytes``).
        lambda_cycle, lambda_cycle_lpips, lambda_idt, lambda_idt_lpips: weights of the L1 and LPIPS parts of the
            cycle and identity terms (see training.unpaired).
        d_real_target: label of real images for D ("multilevel_sigmoid" of the public recipe: 1).
        step_mode: "joint" (one generator step, six passes) or "separate" (the public three steps, eight passes).

    ``num_eval`` counts test images per domain, scored with the cycle L1 besides ``eval_metrics``.
    """

    unet_lora_rank: int = 128
    transform: str = "resize_286_randomcrop_256x256_hflip"
    batch_size: int = 1
    max_steps: int = 25000
    learning_rate: float = 1e-5
    max_grad_norm: float = 10.0
    eval_metrics: str = "fid,dino_structure"
    eval_transform: str = "no_resize"
    use_8bit_adam: bool = False
    lambda_cycle: float = 1.0
    lambda_cycle_lpips: float = 10.0
    lambda_idt: float = 1.0
    lambda_idt_lpips: float = 1.0
    d_real_target: float = 1.0
    step_mode: str = "joint"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("step_mode", self.step_mode, STEP_MODES)
        if self.step_mode == "separate" and self.gradient_accumulation_steps > 1:
            # its three generator steps each update the weights the next one's translations are made with
            raise BadInputError(
                "--gradient-accumulation-steps needs --step-mode joint (the public schedule steps three times)."
            )
