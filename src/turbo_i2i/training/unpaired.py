"""Unpaired training (CycleGAN-Turbo): ``turbo-i2i train unpaired``.

Objective (paper, Sec. 3.3 / Eq. 4), code names -> paper terms; G(x, c_Y) is the generator with the direction's
caption and VAE adapters, G_a2b: A -> B, G_b2a: B -> A, D_A judges domain B images, D_B domain A images::

    loss_cycle_a = L1(G_b2a(G_a2b(a)), a) + 10 * LPIPS(G_b2a(G_a2b(a)), a)     L_cyc, A -> B -> A
    loss_cycle_b = L1(G_a2b(G_b2a(b)), b) + 10 * LPIPS(G_a2b(G_b2a(b)), b)     L_cyc, B -> A -> B
    loss_idt_a   = L1(G_a2b(b), b) + 1 * LPIPS(G_a2b(b), b)                   L_idt, B through a2b stays B
    loss_idt_b   = L1(G_b2a(a), a) + 1 * LPIPS(G_b2a(a), a)                   L_idt, A through b2a stays A
    loss_gan_a   = -log D_A(G_a2b(a))                                          L_GAN of the a2b translation
    loss_gan_b   = -log D_B(G_b2a(b))                                          L_GAN of the b2a translation
    loss_g       = loss_cycle_a + loss_cycle_b + loss_idt_a + loss_idt_b + 0.5 * (loss_gan_a + loss_gan_b)

(weights: ``lambda_cycle`` / ``lambda_cycle_lpips`` = 1 / 10, ``lambda_idt`` / ``lambda_idt_lpips`` = 1 / 1,
``lambda_gan`` = 0.5, the paper's and the public implementation's values.)

Step modes:

- ``joint`` (default, the paper's equation): each translation is computed once per iteration and reused, six
  generator passes: a2b(a) = fake_b, b2a(fake_b) = rec_a, b2a(b) = fake_a, a2b(fake_a) = rec_b, a2b(b) = idt_a,
  b2a(a) = idt_b; one generator step on ``loss_g``. Its gradient is taken in segments by the chain rule (see
  ``joint_backward``), so at most two passes' activations are held at once instead of six.
- ``separate`` (the public implementation's schedule, for comparison): three generator steps per iteration, on the
  cycle terms (four passes), the GAN terms (fake_b and fake_a recomputed with the updated weights: two passes) and
  the identity terms (two passes): eight passes. Unlike the public script the LR schedule still steps once per
  iteration.

Then one discriminator step on ``0.5 * (loss_d_a + loss_d_b)``, D_A on real b vs. fake_b and D_B on real a vs. fake_a
(the fakes of the iteration, detached), after clearing the gradients the generator's GAN terms left on the
discriminators. Memory: trainable weights stay fp32 under bf16 / fp16 autocast while the frozen backbone is stored in
that half precision and half-precision activations stay so through its GroupNorms and LoRA layers
(``compute.train_in_half_precision``; fp16 adds a gradient scaler, ``compute.loss_scaler``); gradient
checkpointing recomputes UNet and VAE blocks; both directions share one frozen VAE; the text encoder is freed once
the two captions are encoded; ``use_8bit_adam`` keeps Adam's moments in 8 bits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbone import Backbone, encode_prompt
from ..checkpoints import build_generator
from ..config import GeneratorConfig
from ..errors import BadInputError, with_hint
from ..generator import OneStepGenerator
from ..subpixel import use_subpixel_upsampling
from .compute import (
    HALF_PRECISION,
    cast_frozen,
    channels_last_in_training,
    loss_scaler,
    resolve_mixed_precision,
    train_in_half_precision,
)
from .data import check_batchable
from .loop import (
    Metrics,
    TrainerBase,
    gradients,
    load_splits,
    make_accelerator,
    step_scheduler,
    step_seed,
)
from .options import UnpairedTrainConfig
from .unpaired_data import UnpairedDataset, collate_unpaired, has_split

logger = logging.getLogger("turbo_i2i")


def reconstruction_loss(
    output: torch.Tensor, target: torch.Tensor, lambda_l1: float, lambda_lpips: float, lpips: torch.nn.Module | None
) -> torch.Tensor:
    """``lambda_l1 * L1 + lambda_lpips * LPIPS`` of ``output`` against ``target`` (the cycle and identity terms).

    Args:
        output: generated images (N, 3, H, W) in [-1, 1].
        target: the images they should reproduce.
        lambda_l1: weight of the mean absolute error.
        lambda_lpips: weight of the LPIPS distance (ignored when ``lpips`` is None).
        lpips: an ``LPIPSLoss`` or None.

    Returns:
        a scalar (fp32).
    """
    output, target = output.float(), target.float()
    loss = lambda_l1 * F.l1_loss(output, target)
    if lpips is not None and lambda_lpips > 0:
        loss = loss + lambda_lpips * lpips(output, target)
    return loss


def make_optimizer(params: list[torch.nn.Parameter], config: UnpairedTrainConfig, eight_bit: bool = False):
    """AdamW over ``params`` with the config's learning rate and weight decay (8-bit AdamW when asked).

    Args:
        params: the trained parameters.
        config: the run's settings.
        eight_bit: use bitsandbytes' ``AdamW8bit`` (its moments take a quarter of the memory).

    Returns:
        the optimiser.

    Raises:
        BadInputError: 8-bit AdamW was asked for but bitsandbytes is not installed.
    """
    if eight_bit:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise BadInputError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from error
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)


class UnpairedTrainer(TrainerBase):
    """Runs, checkpoints, resumes, evaluates and exports an unpaired (CycleGAN-Turbo) training run.

    Args:
        config: the run's settings.
        accelerator: an ``accelerate.Accelerator`` (one is made from the config when None); under data parallelism
            each process trains on its share of the batch and the gradients are averaged before each step.
        loss_networks: prebuilt (lpips_net, (clip_model, clip_tokenizer)) to use instead of loading pretrained ones
            (tests and benchmarks pass stand-ins).
        metrics: the evaluation metrics per direction (see ``Metrics``), logged as ``eval_<direction>_<name>``; None
            builds ``translation_metrics`` from ``config.eval_metrics`` with the pretrained networks (tests pass
            ``translation_metrics(tiny_inception(), tiny_dino())``).
        backbone: a prebuilt backbone to train on instead of loading ``config.base_model`` (benchmarks pass the
            full-size architecture with random weights); the trainer keeps its UNet and VAE, and its text encoder is
            freed once the captions are encoded unless the caller still holds it.
    """

    network_hints = {
        **TrainerBase.network_hints,
        "lpips": "With turbo-i2i train, --lpips-path FILE passes a local copy;"
        " --lambda-cycle-lpips 0 --lambda-idt-lpips 0 train without it.",
        "clip": "With turbo-i2i train, --clip-path FILE passes a local copy; --disc patchgan trains without it.",
    }

    collate_fn = staticmethod(collate_unpaired)

    def __init__(
        self,
        config: UnpairedTrainConfig,
        accelerator=None,
        loss_networks=None,
        metrics: Metrics | None = None,
        backbone: Backbone | None = None,
    ):
        # Data parallel without a DDP wrapper: the joint step's gradient comes from several backward passes, so the
        # processes average it once it is complete (``average_over_processes``), before each optimiser step.
        self.accelerator = accelerator or make_accelerator(config)  # precision: TrainerBase.autocast()
        self.device = self.accelerator.device
        config = self.config = resolve_mixed_precision(config, self.device)
        self.output_dir = Path(config.output_dir)
        self.train_data, self.test_data = load_splits(
            lambda: UnpairedDataset(
                config.dataset, "train", config.transform, skip_bad=config.skip_bad, seed=config.seed
            ),
            lambda: (
                UnpairedDataset(config.dataset, "test", config.eval_transform, skip_bad=config.skip_bad)
                if has_split(config.dataset, "test")
                else None
            ),
        )
        check_batchable(self.train_data, config.batch_size)
        if metrics is None and self.test_data is not None and config.metric_names:
            metrics = self.load_metrics()  # at start-up, so a missing network fails now, not after hours
        self.metrics = metrics
        torch.manual_seed(config.seed)  # LoRA init and discriminator heads: reproducible for a seed
        captions = self.train_data.captions
        # Each direction is conditioned on the caption of the domain it translates *to*.
        prompts = {"a2b": captions["B"], "b2a": captions["A"]}
        gen_config = GeneratorConfig(
            base_model=config.base_model,
            task="unpaired",
            unet_lora_rank=config.unet_lora_rank,
            unet_lora_alpha=float(config.unet_lora_rank),
            vae_lora_rank=config.vae_lora_rank,
            prompts=prompts,
        )
        if backbone is None:
            self.generator, backbone = build_generator(gen_config, device=self.device)
        else:
            generator = OneStepGenerator(gen_config, backbone.unet, backbone.vae, backbone.schedule)
            self.generator = generator.to(self.device)
        with torch.no_grad():  # wherever the text encoder is: a given backbone's stays where the caller put it
            self.prompt_embeds = {
                d: encode_prompt(backbone.tokenizer, backbone.text_encoder, [p])[0].to(self.device)
                for d, p in prompts.items()
            }
        del backbone  # the text encoder is not needed again: its memory goes back now (UNet and VAE live on)
        if config.from_model:
            from .warm_start import warm_start

            warm_start(self.generator, config.from_model)
        self.generator.set_trainable(True)
        # The VAE decoders' upsamplers as sub-pixel convolutions (subpixel.py): 4/9 of their multiply-adds, forward and
        # backward, and the padded input kept for backward instead of the 4x larger upsampled one. Not the UNet's: at
        # the latents' size their activations are small, and the four 2x2 kernels each call keeps for backward are not
        # (full size, 256 px: 222 MiB more saved per generator pass with them, 10 MiB less with the VAE's alone).
        self.upsampler_swaps = use_subpixel_upsampling(self.generator.vae)
        if config.gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
        self.generator.train()
        self.lpips, clip = self._loss_networks(loss_networks)
        self.discriminator = self._discriminators(clip)
        half = HALF_PRECISION.get(config.mixed_precision)
        if half is not None:
            train_in_half_precision(self.generator, half)
            if self.discriminator is not None:
                cast_frozen(self.discriminator, half)
        self.scaler = loss_scaler(self.device, config.mixed_precision)
        if channels_last_in_training(self.device, config.mixed_precision):
            self.generator.to(memory_format=torch.channels_last)  # in place: shared frozen weights stay shared
        if config.compile:
            self.generator.compile_parts()
        self.optimizer_g = make_optimizer(
            [p for p in self.generator.parameters() if p.requires_grad], config, config.use_8bit_adam
        )
        self.scheduler_g = self.make_scheduler(self.optimizer_g)
        if self.discriminator is not None:
            self.optimizer_d = make_optimizer([p for p in self.discriminator.parameters() if p.requires_grad], config)
            self.scheduler_d = self.make_scheduler(self.optimizer_d)
        self.step = 0

    # --- set-up pieces -------------------------------------------------------------------------------------------

    def _loss_networks(self, prebuilt):
        from .losses import LPIPSLoss
        from .pretrained import load_clip, load_lpips

        lpips_net, clip = prebuilt if prebuilt is not None else (None, None)
        lpips = None
        if self.config.lambda_cycle_lpips > 0 or self.config.lambda_idt_lpips > 0:
            if lpips_net is None:
                with with_hint(self.network_hints["lpips"]):
                    lpips_net = load_lpips(path=self.config.lpips_path)
            lpips = LPIPSLoss(lpips_net)
            lpips.to(self.device)
        if self.config.disc == "clip" and self.config.lambda_gan > 0 and clip is None:
            with with_hint(self.network_hints["clip"]):
                clip = load_clip(path=self.config.clip_path)
        return lpips, clip

    def _discriminators(self, clip) -> torch.nn.ModuleDict | None:
        """D_A (judges domain B) and D_B (judges domain A); vision-aided ones share one frozen CLIP tower."""
        if self.config.disc == "none" or self.config.lambda_gan == 0:
            return None
        from .discriminators import build_discriminator

        clip_model = clip[0] if self.config.disc == "clip" else None
        discs = {d: build_discriminator(self.config.disc, clip=clip_model) for d in ("a", "b")}
        return torch.nn.ModuleDict(discs).to(self.device).train()

    @property
    def unwrapped(self) -> OneStepGenerator:
        return self.generator

    # --- one iteration -------------------------------------------------------------------------------------------

    def translate(self, x: torch.Tensor, direction: str) -> torch.Tensor:
        """One generator pass with the direction's cached caption embedding (under the run's autocast).

        Args:
            x: images (N, 3, H, W) in [-1, 1].
            direction: "a2b" or "b2a".

        Returns:
            translated images in [-1, 1].
        """
        with self.autocast():
            return self.generator(x, self.prompt_embeds[direction], direction)

    def _cycle_term(self, real: torch.Tensor, fake: torch.Tensor, back: str) -> torch.Tensor:
        """loss_cycle of one side: L1 + LPIPS (weighted) of ``real`` against ``fake`` translated back."""
        cfg = self.config
        return reconstruction_loss(
            self.translate(fake, back), real, cfg.lambda_cycle, cfg.lambda_cycle_lpips, self.lpips
        )

    def _identity_term(self, real: torch.Tensor, direction: str) -> torch.Tensor:
        """loss_idt of one side: L1 + LPIPS (weighted) of ``real`` against itself translated by ``direction``."""
        cfg = self.config
        return reconstruction_loss(
            self.translate(real, direction), real, cfg.lambda_idt, cfg.lambda_idt_lpips, self.lpips
        )

    def _gan_term(self, fake: torch.Tensor, judge: str) -> torch.Tensor:
        """loss_gan of one side (unweighted): discriminator ``judge`` on the translated images ``fake``."""
        from .discriminators import generator_gan_loss

        with self.autocast():
            return generator_gan_loss(self.discriminator[judge], fake.float())

    def _cycle(self, real_a: torch.Tensor, real_b: torch.Tensor, terms: dict, images: dict) -> None:
        images["fake_b"] = self.translate(real_a, "a2b")
        terms["loss_cycle_a"] = self._cycle_term(real_a, images["fake_b"], "b2a")
        images["fake_a"] = self.translate(real_b, "b2a")
        terms["loss_cycle_b"] = self._cycle_term(real_b, images["fake_a"], "a2b")

    def _identity(self, real_a: torch.Tensor, real_b: torch.Tensor, terms: dict) -> None:
        terms["loss_idt_a"] = self._identity_term(real_b, "a2b")
        terms["loss_idt_b"] = self._identity_term(real_a, "b2a")

    def _gan(self, images: dict, terms: dict) -> None:
        if self.discriminator is not None:
            terms["loss_gan_a"] = self._gan_term(images["fake_b"], "a")
            terms["loss_gan_b"] = self._gan_term(images["fake_a"], "b")

    def _weighted(self, terms: dict, keys: tuple[str, ...]) -> torch.Tensor:
        # the cycle and identity terms carry their weights already; the GAN terms are weighted here
        weight = {"loss_gan_a": self.config.lambda_gan, "loss_gan_b": self.config.lambda_gan}
        return sum(weight.get(k, 1.0) * terms[k] for k in keys if k in terms)

    def losses(self, real_a: torch.Tensor, real_b: torch.Tensor) -> tuple[dict, dict]:
        """Every generator loss term of the joint objective, from six generator passes.

        The objective in its plain form, for inspecting it: training runs :meth:`joint_backward`, which gives the
        gradient of this ``loss_g`` with less memory, and is tested against a backward pass through this.

        Args:
            real_a: domain A images (N, 3, H, W) in [-1, 1], on the device.
            real_b: domain B images.

        Returns:
            (terms: ``loss_cycle_a/b``, ``loss_idt_a/b``, ``loss_gan_a/b`` and their weighted sum ``loss_g``;
            images: ``fake_b`` = a2b(a) and ``fake_a`` = b2a(b), which the discriminator step reuses).
        """
        terms: dict[str, torch.Tensor] = {}
        images: dict[str, torch.Tensor] = {}
        self._cycle(real_a, real_b, terms, images)
        self._identity(real_a, real_b, terms)
        self._gan(images, terms)
        terms["loss_g"] = self._weighted(terms, tuple(terms))
        return terms, images

    def joint_backward(
        self, real_a: torch.Tensor, real_b: torch.Tensor, scale: float = 1.0
    ) -> tuple[dict, dict, str | None]:
        """The gradient of ``loss_g`` (as one backward pass over ``losses`` would give it) with at most two generator
        passes' activations alive at a time.

        Chain rule in segments: fake_b = a2b(a) is cut from its graph as a leaf; the terms that read it (loss_cycle_a
        through b2a, and loss_gan_a) are backpropagated to that leaf, and its gradient is then sent through a2b. Each
        segment's graph is freed by its backward pass. The same for fake_a, then each identity term on its own.

        Args:
            real_a: domain A images (N, 3, H, W) in [-1, 1], on the device.
            real_b: domain B images.
            scale: the gradient is the one of ``scale * loss_g`` (1 / k when k batches are accumulated), added to the
                gradients already there; the returned terms are not scaled.

        Returns:
            (terms as in ``losses``, detached; images ``fake_b`` and ``fake_a``, detached; what was NaN/Inf, else
            None: the gradients are then cleared as soon as it is seen, before its backward pass).
        """
        terms: dict[str, torch.Tensor] = {}
        images: dict[str, torch.Tensor] = {}

        def backward(loss: torch.Tensor, keys: tuple[str, ...]) -> bool:
            if not self.is_finite(loss):
                self.optimizer_g.zero_grad(set_to_none=True)
                return False
            with self.without_autocast():
                self.accelerator.backward(self.scaler.scale(loss if scale == 1 else loss * scale))
            for key in keys:
                terms[key] = terms[key].detach()
            return True

        # One autocast around the six passes (each pass also enters its own): autocast caches its casts of the
        # trainable fp32 weights until the outermost autocast exits, so each LoRA weight is cast to half precision
        # once per iteration instead of once per pass (the UNet's adapters serve all six passes). The backward
        # passes run outside it: under autocast they would also run the fp32 parts (LPIPS) in half precision.
        with self.autocast():
            for real, forward, back, side in ((real_a, "a2b", "b2a", "a"), (real_b, "b2a", "a2b", "b")):
                fake = self.translate(real, forward)
                leaf = fake.detach().requires_grad_()
                images["fake_b" if side == "a" else "fake_a"] = leaf
                terms[f"loss_cycle_{side}"] = self._cycle_term(real, leaf, back)
                if self.discriminator is not None:
                    terms[f"loss_gan_{side}"] = self._gan_term(leaf, side)
                keys = tuple(k for k in (f"loss_cycle_{side}", f"loss_gan_{side}") if k in terms)
                if not backward(self._weighted(terms, keys), keys):
                    return terms, images, "generator loss"
                with self.without_autocast():
                    fake.backward(leaf.grad)  # the leaf's gradient, through the pass that made it
            for real, direction, side in ((real_b, "a2b", "a"), (real_a, "b2a", "b")):
                key = f"loss_idt_{side}"
                terms[key] = self._identity_term(real, direction)
                if not backward(terms[key], (key,)):
                    return terms, images, "generator loss"
        terms["loss_g"] = self._weighted(terms, tuple(terms))
        images = {k: v.detach() for k, v in images.items()}
        return terms, images, None

    def _generator_step(self, loss: torch.Tensor | None) -> str | None:
        """Backward (unless ``loss`` is None: its gradients are in place already) and one optimiser step; returns
        what was NaN/Inf (the step then not taken), else None. Under fp16 the gradients are scaled: they are
        unscaled before clipping, and the scaler skips a step whose gradients overflowed (routine, not a fault)."""
        if loss is not None:
            if not self.is_finite(loss):  # caught before its backward pass
                return "generator loss"
            self.accelerator.backward(self.scaler.scale(loss))
        self.average_over_processes(gradients(self.optimizer_g))  # an overflow on any process reaches all
        if not self.gradients_finite(self.optimizer_g, self.config.max_grad_norm):
            self.optimizer_g.zero_grad(set_to_none=True)
            return "generator gradient"
        self.scaler.step(self.optimizer_g)
        self.scaler.update()  # per generator step: the public schedule takes three, each unscaled once
        self.optimizer_g.zero_grad(set_to_none=True)
        return None

    def _discriminator_step(self, fakes: list[tuple], logs: dict) -> str | None:
        """One discriminator step on each batch's (real_a, real_b, images) of the iteration, their gradients summed
        (each loss divided by their number); returns "discriminator loss" or "discriminator gradient" when one was
        NaN/Inf (the update then dropped)."""
        from .discriminators import discriminator_loss

        # The generator's GAN terms also left gradients on D's heads: D must learn from its own loss only.
        self.optimizer_d.zero_grad(set_to_none=True)
        target, k = self.config.d_real_target, len(fakes)
        bad, totals = None, {"loss_d_a": 0.0, "loss_d_b": 0.0}
        with self.autocast():  # one for all batches, as in the generator's step: D's weights are cast once
            for real_a, real_b, images in fakes:
                loss_d_a = discriminator_loss(self.discriminator["a"], real_b, images["fake_b"].float(), target)
                loss_d_b = discriminator_loss(self.discriminator["b"], real_a, images["fake_a"].float(), target)
                totals["loss_d_a"] += float(loss_d_a.detach()) / k
                totals["loss_d_b"] += float(loss_d_b.detach()) / k
                loss_d = 0.5 * (loss_d_a + loss_d_b) / k
                if not self.is_finite(loss_d):
                    bad = "discriminator loss"
                    break
                with self.without_autocast():
                    self.accelerator.backward(self.scaler.scale(loss_d))
        logs.update(totals)
        if bad is None:
            self.average_over_processes(gradients(self.optimizer_d))
            if self.gradients_finite(self.optimizer_d):
                self.scaler.step(self.optimizer_d)  # under fp16: skipped after an overflow
                self.scaler.update()
            else:
                bad = "discriminator gradient"
        step_scheduler(self.scheduler_d)  # the LR is a function of the step number
        self.optimizer_d.zero_grad(set_to_none=True)
        return bad

    def end_step(self, logs: dict[str, float], bad: str | None = None) -> dict[str, float]:
        """``TrainerBase.end_step``, after averaging the discriminators' running statistics over the processes: a
        PatchGAN's BatchNorms updated theirs from this process's images alone, in the GAN terms and the D step."""
        if self.discriminator is not None:
            self.average_over_processes([b for b in self.discriminator.buffers() if b.is_floating_point()])
        return super().end_step(logs, bad)

    def train_step(self) -> dict[str, float]:
        """One iteration: the generator step(s) of ``step_mode``, then one discriminator step.

        With ``gradient_accumulation_steps`` k > 1 (joint mode) the generator's and D's gradients are summed over k
        batches, each loss divided by k: one step on a k times larger batch, at the memory of one. The logged losses
        are the batches' means.
        """
        # Every random draw of the step (DiffAugment) comes from (seed, step): resuming replays it exactly.
        torch.manual_seed(step_seed(self.config.seed, self.step))
        k = self.config.gradient_accumulation_steps
        if self.config.step_mode == "joint":
            logs, fakes, bad = {}, [], None
            with self.autocast():  # around the k batches too: each trainable weight is cast once per iteration
                for batch in self.micro_batches():
                    real_a, real_b = batch["a"].to(self.device), batch["b"].to(self.device)
                    terms, images, bad = self.joint_backward(real_a, real_b, scale=1 / k)
                    for name, value in terms.items():
                        logs[name] = logs.get(name, 0.0) + float(value.detach()) / k
                    if bad is not None:
                        break
                    fakes.append((real_a, real_b, images))
            if bad is None:
                bad = self._generator_step(None)
        else:
            (batch,) = self.micro_batches()  # one batch: the options refuse accumulation with this schedule
            real_a, real_b = batch["a"].to(self.device), batch["b"].to(self.device)
            # A NaN/Inf in one of the three generator steps drops it and the rest of the iteration; the steps before
            # it were taken with finite losses and stay.
            terms, images = {}, {}
            self._cycle(real_a, real_b, terms, images)
            bad = self._generator_step(self._weighted(terms, ("loss_cycle_a", "loss_cycle_b")))
            if bad is None and self.discriminator is not None:
                # the public schedule recomputes both translations with the weights the cycle step just updated
                images = {"fake_b": self.translate(real_a, "a2b"), "fake_a": self.translate(real_b, "b2a")}
                self._gan(images, terms)
                bad = self._generator_step(self._weighted(terms, ("loss_gan_a", "loss_gan_b")))
            if bad is None:
                self._identity(real_a, real_b, terms)
                bad = self._generator_step(self._weighted(terms, ("loss_idt_a", "loss_idt_b")))
            terms["loss_g"] = self._weighted(terms, tuple(terms)).detach()
            logs = {name: float(value.detach()) for name, value in terms.items()}
            fakes = [(real_a, real_b, {name: image.detach() for name, image in images.items()})]
        if bad is not None:
            return self.skip_update(logs, bad)
        step_scheduler(self.scheduler_g)  # once per iteration, whatever the number of generator steps
        if self.discriminator is not None:
            bad = self._discriminator_step(fakes, logs)
        return self.end_step(logs, bad)

    # --- evaluation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean L1 of the cycle reconstructions of the test images, per direction, plus ``metrics`` if given, and a
        grid image.

        ``eval_cycle_l1_a`` is the mean |b2a(a2b(a)) - a| over test_A, ``eval_cycle_l1_b`` the same for test_B;
        ``metrics`` sees each direction's inputs and outputs (``num_eval`` of them) and all the target domain's test
        images (FID's reference set, as the public trainer takes it). The grid (rows:
        input, translation, translation back, for the first four test images of A, then of B) goes to
        ``output_dir/eval/step_*.png``. Data-parallel processes translate a share of the images each; the main
        process computes ``metrics`` on all of them (the others' scores lack those names).

        Returns:
            {name: value}; empty when the data set has no test split.
        """
        if self.test_data is None:
            return {}
        self.generator.eval()
        limit = self.config.num_eval or None
        test = {d: list(self.test_data.tensors(d, limit)) for d in ("A", "B")}
        scores: dict[str, float] = {}
        rows = []
        for source, target, forward, back in (("A", "B", "a2b", "b2a"), ("B", "A", "b2a", "a2b")):
            images, results = test[source], []  # (output, cycle L1, image translated back for the grid's first four)
            for i in self.my_share(len(images)):  # one at a time: test images may differ in size
                x = images[i][None].to(self.device)
                out = self.translate(x, forward)
                cycled = self.translate(out, back).float()
                results.append((out[0].float().cpu(), float(F.l1_loss(cycled, x)), cycled[0].cpu() if i < 4 else None))
            results = self.gather_shares(results)
            scores[f"eval_cycle_l1_{source.lower()}"] = sum(r[1] for r in results) / len(images)
            rows += [[images[i], results[i][0], results[i][2]] for i in range(min(4, len(images)))]
            if self.metrics is not None and self.accelerator.is_main_process:  # logged by the main process only
                # FID's reference set is the target domain's whole test split, whatever num_eval (16 references
                # measured small-sample bias); loaded lazily, once per run: the metric keeps its statistics
                extra = self.metrics(forward, images, [r[0] for r in results], self.test_data.tensors(target))
                scores.update({f"eval_{forward}_{k}": float(v) for k, v in extra.items()})
        self.generator.train()
        self.save_eval_grid(rows)
        return scores
