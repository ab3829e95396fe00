"""Paired training (pix2pix-Turbo): ``turbo-i2i train paired``.

Objective (paper, Sec. 3.3), code names -> paper terms:
    loss_l2      = L2(G(x, c), y)                       reconstruction, weight 1
    loss_lpips   = LPIPS_VGG(G(x, c), y)                perceptual reconstruction, weight 5
    loss_clipsim = 1 - cos(CLIP_img(G(x, c)), CLIP_txt(c)) text alignment, weight 5
    loss_gan     = -log D(G(x, c))  (vision-aided D)    adversarial, weight 0.5

One generator step and one discriminator step per iteration, one LR-scheduler step each (a NaN/Inf loss or gradient
drops the update and is counted: see ``TrainerBase``). The discriminator's
gradients are cleared after the generator's backward, so D is updated only by its own loss. Trainable weights stay
fp32 under bf16/fp16 autocast; frozen weights are stored in that half precision, and activations stay in it
through GroupNorms and LoRA layers (``compute.train_in_half_precision``; fp16 adds a gradient scaler).
All randomness of a step (batch order, crops, DiffAugment) is derived
from (seed, step), so stopping and resuming gives the same run as going straight through.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ..backbone import Backbone, encode_prompt, tokenize
from ..checkpoints import build_generator
from ..config import STOCHASTIC_DEFAULT_R, GeneratorConfig
from ..errors import with_hint
from ..generator import OneStepGenerator
from ..subpixel import use_subpixel_upsampling
from .compute import (
    HALF_PRECISION,
    channels_last_in_training,
    loss_scaler,
    resolve_mixed_precision,
    train_in_half_precision,
    use_math_attention,
)
from .data import EvalImages, PairedDataset, check_batchable, collate
from .loop import (
    Metrics,
    TrainerBase,
    load_splits,
    make_accelerator,
    step_scheduler,
    step_seed,
)
from .losses import loss_l2
from .options import PairedTrainConfig, metric_names

logger = logging.getLogger("turbo_i2i")


def init_from_scratch(generator: OneStepGenerator) -> None:
    """Initialisation for training every weight from random values (the paper's "random init" setting).

    Choices made for fine-tuning a pretrained backbone stall training from scratch:

    - near-zero skip convs would let the decoder ignore the encoder for thousands of steps: default init instead;
    - a random decoder's outputs land far outside [-1, 1], where the output clamp passes no gradient: its last
      conv starts at zero (every pixel 0, inside the clamp).

    Args:
        generator: the freshly built generator, changed in place.
    """
    for vae in generator.vae.values():
        for conv in vae.decoder.skip_convs():
            conv.reset_parameters()
        torch.nn.init.zeros_(vae.decoder.conv_out.weight)
        torch.nn.init.zeros_(vae.decoder.conv_out.bias)


class TextConditionedGenerator(torch.nn.Module):
    """The generator and the text encoder as one module, so that data-parallel training syncs every trained weight
    (the text encoder is trained only in the from-scratch setting; otherwise its outputs are cached).

    Args:
        generator: the one-step generator.
        text_encoder: the CLIP text model.
    """

    def __init__(self, generator: OneStepGenerator, text_encoder: torch.nn.Module):
        super().__init__()
        self.generator = generator
        self.text_encoder = text_encoder

    def forward(self, x: torch.Tensor, condition: torch.Tensor, r: float | None = None) -> torch.Tensor:
        """Args:
            x: input images.
            condition: token ids (N, 77) when the text encoder is trained, else its cached outputs (N, 77, D).
            r: the stochastic model's r for this batch (None: deterministic models).

        Returns:
            translated images in [-1, 1].
        """
        embeds = self.text_encoder(condition)[0] if condition.dtype == torch.long else condition
        return self.generator(x, embeds, r=r)


class PairedTrainer(TrainerBase):
    """Runs, checkpoints, resumes, evaluates and exports a paired training run.

    Args:
        config: the run's settings.
        accelerator: an ``accelerate.Accelerator`` (one is made from the config when None).
        loss_networks: prebuilt (lpips_net, (clip_model, clip_tokenizer)) to use instead of loading pretrained ones
            (tests pass tiny stand-ins).
        backbone: a prebuilt backbone to train on instead of loading ``config.base_model`` (benchmarks pass the
            full-size architecture with random weights).
        metrics: evaluation metrics beyond L2/LPIPS/CLIP-sim (see ``loop.Metrics``); None builds them from
            ``config.eval_metrics`` with the pretrained networks (tests pass tiny stand-ins).
    """

    network_hints = {
        **TrainerBase.network_hints,
        "lpips": "With turbo-i2i train, --lpips-path FILE passes a local copy; --lambda-lpips 0 trains without it.",
        "clip": "With turbo-i2i train, --clip-path FILE passes a local copy;"
        " --lambda-clipsim 0 with --disc patchgan trains without it.",
    }

    collate_fn = staticmethod(collate)

    def __init__(
        self,
        config: PairedTrainConfig,
        accelerator=None,
        loss_networks=None,
        backbone: Backbone | None = None,
        metrics: Metrics | None = None,
    ):
        self.accelerator = accelerator or make_accelerator(config)  # precision: TrainerBase.autocast()
        self.device = self.accelerator.device
        config = self.config = resolve_mixed_precision(config, self.device)
        self.output_dir = Path(config.output_dir)
        self.train_data, self.test_data = load_splits(
            lambda: PairedDataset(
                config.dataset, "train", config.transform, skip_bad=config.skip_bad, seed=config.seed
            ),
            self._test_split,
        )
        for data in (self.train_data, self.test_data):  # evaluation batches test pairs as training batches its own
            if data is not None:
                check_batchable(data, config.batch_size)
        if metrics is None and self.test_data is not None and metric_names(config.eval_metrics):
            metrics = self.load_metrics()  # at start-up, so a missing network fails now, not after hours
        self.metrics = metrics
        torch.manual_seed(config.seed)  # LoRA init and heads: reproducible for a seed
        gen_config = GeneratorConfig(
            base_model=config.base_model,
            unet_lora_rank=config.unet_lora_rank,
            vae_lora_rank=config.vae_lora_rank,
            train_all=config.train_all,
            stochastic=config.stochastic,
            default_r=STOCHASTIC_DEFAULT_R if config.stochastic else None,
            prompts={"a2b": config.default_prompt} if config.default_prompt else {},
        )
        if backbone is None:
            self.generator, backbone = build_generator(gen_config, device=self.device)
        else:
            self.generator = OneStepGenerator(gen_config, backbone.unet, backbone.vae, backbone.schedule)
            self.generator.to(self.device)
            backbone.text_encoder.to(self.device)
        self.tokenizer, self.text_encoder = backbone.tokenizer, backbone.text_encoder
        if config.train_all:
            init_from_scratch(self.generator)
        if config.from_model:
            from .warm_start import warm_start

            warm_start(self.generator, config.from_model, self.text_encoder)
        self.generator.set_trainable(True)
        # The VAE decoders' upsamplers as sub-pixel convolutions (subpixel.py): 4/9 of their multiply-adds, forward and
        # backward, and the padded input kept for backward instead of the 4x larger upsampled one. Not the UNet's: at
        # the latents' size their activations are small, and the four 2x2 kernels each call keeps for backward are not
        # (full size, 256 px: 222 MiB more saved per generator pass with them, 10 MiB less with the VAE's alone).
        self.upsampler_swaps = use_subpixel_upsampling(self.generator.vae)
        if config.mixed_precision in HALF_PRECISION:
            # True mixed precision: the frozen backbone is stored in half (it is only read under autocast), while
            # trainable weights and the optimiser state stay fp32.
            train_in_half_precision(self.generator, HALF_PRECISION[config.mixed_precision])
        if channels_last_in_training(self.device, config.mixed_precision):
            self.generator.to(memory_format=torch.channels_last)
        self.scaler = loss_scaler(self.device, config.mixed_precision)
        if config.gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
        if config.compile:
            self.generator.compile_parts()
        if self.device.type == "cpu":
            use_math_attention(self.generator)
            use_math_attention(self.text_encoder)
        self.generator.train()
        self.lpips, self.clipsim = self._loss_networks(loss_networks)
        self.discriminator = self._discriminator()
        params = [p for p in self.generator.parameters() if p.requires_grad]
        if config.train_all:  # "all parameters trainable" includes the (random) text encoder
            self.text_encoder.requires_grad_(True)
            params += list(self.text_encoder.parameters())
        self.model = self.accelerator.prepare_model(TextConditionedGenerator(self.generator, self.text_encoder))
        self.optimizer_g = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
        self.scheduler_g = self.make_scheduler(self.optimizer_g)
        if self.discriminator is not None:
            d_params = [p for p in self.discriminator.parameters() if p.requires_grad]
            self.optimizer_d = torch.optim.AdamW(
                d_params, lr=config.learning_rate, weight_decay=config.adam_weight_decay
            )
            self.scheduler_d = self.make_scheduler(self.optimizer_d)
            self.discriminator = self.accelerator.prepare_model(self.discriminator)
        self.step = 0
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # --- set-up pieces -------------------------------------------------------------------------------------------

    def _test_split(self) -> PairedDataset | None:
        if str(self.config.dataset).endswith(".jsonl") or not (Path(self.config.dataset) / "test_A").is_dir():
            return None
        transform = self.config.eval_transform or self.config.transform
        return PairedDataset(self.config.dataset, "test", transform, skip_bad=self.config.skip_bad)

    def _loss_networks(self, prebuilt):
        from .losses import CLIPSimLoss, LPIPSLoss
        from .pretrained import load_clip, load_lpips

        lpips_net, clip = prebuilt if prebuilt is not None else (None, None)
        lpips = clipsim = None
        if self.config.lambda_lpips > 0:
            if lpips_net is None:
                with with_hint(self.network_hints["lpips"]):
                    lpips_net = load_lpips(path=self.config.lpips_path)
            lpips = LPIPSLoss(lpips_net)
            lpips.to(self.device)
        # CLIP serves the CLIP-sim term and the vision-aided D; with both off (weight 0) it is not loaded at all
        if self.config.lambda_clipsim > 0 or (self.config.disc == "clip" and self.config.lambda_gan > 0):
            if clip is None:
                with with_hint(self.network_hints["clip"]):
                    clip = load_clip(path=self.config.clip_path)
            self._clip = clip
        if self.config.lambda_clipsim > 0:
            clipsim = CLIPSimLoss(*clip).to(self.device)
        return lpips, clipsim

    def _discriminator(self):
        if self.config.disc == "none" or self.config.lambda_gan == 0:
            return None
        from .discriminators import build_discriminator

        clip_model = self._clip[0] if self.config.disc == "clip" else None
        return build_discriminator(self.config.disc, clip=clip_model).to(self.device).train()

    def condition(self, prompts: list[str]) -> torch.Tensor:
        """What ``TextConditionedGenerator`` takes: token ids if the text encoder is trained, else cached outputs."""
        if self.config.train_all:
            return tokenize(self.tokenizer, prompts).to(self.device)
        return self.encode(prompts)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Caption embeddings, cached while the text encoder is frozen (it runs once per distinct caption)."""
        if self.config.train_all:
            with torch.no_grad():
                return encode_prompt(self.tokenizer, self.text_encoder, prompts)[0]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                embeds, _ = encode_prompt(self.tokenizer, self.text_encoder, missing)
            self._prompt_cache.update(zip(missing, embeds))
        return torch.stack([self._prompt_cache[p] for p in prompts])

    # --- one iteration -------------------------------------------------------------------------------------------

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The generator's loss terms on ``batch`` (the weighted sum under "loss_g")."""
        cfg = self.config
        x = batch["input"].to(self.device)
        y = batch["target"].to(self.device)
        with self.autocast():
            # the stochastic model learns every strength: r uniform in [0, 1], from the step's seeded RNG
            r = float(torch.rand(())) if cfg.stochastic else None
            out = self.model(x, self.condition(batch["prompt"]), r=r)
            terms = {"loss_l2": loss_l2(out.float(), y.float())}
            if self.lpips is not None:
                terms["loss_lpips"] = self.lpips(out.float(), y.float())
            if self.clipsim is not None:
                terms["loss_clipsim"] = self.clipsim(out.float(), batch["prompt"])
            if self.discriminator is not None:
                from .discriminators import generator_gan_loss

                terms["loss_gan"] = generator_gan_loss(self.discriminator, out.float())
        weights = {"loss_l2": cfg.lambda_l2, "loss_lpips": cfg.lambda_lpips}
        weights.update({"loss_clipsim": cfg.lambda_clipsim, "loss_gan": cfg.lambda_gan})
        terms["loss_g"] = sum(weights[k] * v for k, v in terms.items())
        terms["output"] = out
        return terms

    def train_step(self) -> dict[str, float]:
        """One generator step and (with a discriminator) one discriminator step.

        With ``gradient_accumulation_steps`` k > 1 each step sums the gradients of k batches (each loss divided by
        k), so it equals one step on a k times larger batch; under DDP the gradients are all-reduced once, after the
        last of them.
        """
        # Every random draw of the step (DiffAugment, noise) comes from (seed, step): resuming replays it exactly.
        torch.manual_seed(step_seed(self.config.seed, self.step))
        k = self.config.gradient_accumulation_steps
        logs: dict[str, float] = {}
        fakes = []  # (real target, detached output) of each batch, for D's step
        # One autocast around the k batches (``losses`` also enters its own): autocast caches its casts of the fp32
        # trainable weights until the outermost autocast exits, so each is cast to half precision once per iteration,
        # not once per batch. The backward passes run outside it, as the fp32 parts (LPIPS) were computed in fp32.
        with self.autocast():
            for micro, batch in enumerate(self.micro_batches()):
                terms = self.losses(batch)
                for name, value in terms.items():
                    if name.startswith("loss"):
                        logs[name] = logs.get(name, 0.0) + float(value.detach()) / k
                # A NaN/Inf loss is caught before its backward pass: the whole iteration's update is dropped.
                if not self.is_finite(terms["loss_g"]):
                    return self.skip_update(logs, "generator loss")
                with self._sync_on(self.model, micro == k - 1), self.without_autocast():
                    self.accelerator.backward(self.scaler.scale(terms["loss_g"] / k))
                fakes.append((batch["target"].to(self.device), terms["output"].detach().float()))
        if not self.gradients_finite(self.optimizer_g, self.config.max_grad_norm):
            return self.skip_update(logs, "generator gradient")
        self.scaler.step(self.optimizer_g)
        step_scheduler(self.scheduler_g)
        self.optimizer_g.zero_grad(set_to_none=True)
        bad = None
        if self.discriminator is not None:
            bad = self._discriminator_step(fakes, logs)
        self.scaler.update()
        return self.end_step(logs, bad)

    def _sync_on(self, module: torch.nn.Module, last: bool):
        """DDP all-reduces gradients in every backward pass; between accumulated batches that is wasted work."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(module)

    def _discriminator_step(self, fakes: list[tuple], logs: dict[str, float]) -> str | None:
        """D's own step on the iteration's real targets and generated images; returns what was not finite, if any."""
        from .discriminators import discriminator_loss

        # The generator's GAN term also left gradients on D's heads: D must learn from its own loss only.
        self.optimizer_d.zero_grad(set_to_none=True)
        bad, total = None, 0.0
        with self.autocast():  # one for all batches, as in the generator's step: D's weights are cast once
            for i, (real, fake) in enumerate(fakes):
                loss_d = discriminator_loss(self.discriminator, real, fake) / len(fakes)
                total += float(loss_d.detach())
                if not self.is_finite(loss_d):  # only D's update is dropped: G's was applied with a finite loss
                    bad = "discriminator loss"
                    break
                with self._sync_on(self.discriminator, i == len(fakes) - 1), self.without_autocast():
                    self.accelerator.backward(self.scaler.scale(loss_d))
        logs["loss_d"] = total
        if bad is None and not self.gradients_finite(self.optimizer_d):
            bad = "discriminator gradient"
        if bad is None:
            self.scaler.step(self.optimizer_d)
        step_scheduler(self.scheduler_d)  # the LR is a function of the step number
        self.optimizer_d.zero_grad(set_to_none=True)
        return bad

    @property
    def _text_encoder_to_save(self):
        # a from-scratch model's text encoder is trained with it (from random init), so it is saved with it
        return self.text_encoder if self.config.train_all else None

    @property
    def unwrapped(self) -> OneStepGenerator:
        return self.accelerator.unwrap_model(self.model).generator

    # --- evaluation and export -----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """L2, LPIPS and CLIP-sim (those the run has) and ``metrics`` on the test split, plus a grid image.

        The grid (rows: input, output, target of the first four test pairs) goes to ``output_dir/eval/step_*.png``.
        Data-parallel processes translate a share of the pairs each; the main process computes ``metrics`` on all of
        them (the others' scores lack those names).

        Returns:
            {name: value}; empty when the data set has no test split.
        """
        if self.test_data is None:
            return {}
        generator = self.unwrapped.eval()
        n = len(self.test_data) if self.config.num_eval == 0 else min(self.config.num_eval, len(self.test_data))
        names = ["eval_l2"] + ["eval_lpips"] * (self.lpips is not None)
        names += ["eval_clip_sim"] * (self.clipsim is not None)
        totals = dict.fromkeys(names, 0.0)  # score -> sum over this process's images (its share may be empty)
        triples = []  # (input, output, target) of each of this process's images
        share = list(self.my_share(n))
        for start in range(0, len(share), self.config.batch_size):
            batch = collate([self.test_data[i] for i in share[start : start + self.config.batch_size]])
            x, y = batch["input"].to(self.device), batch["target"].to(self.device)
            with self.autocast():
                out = generator(x, self.encode(batch["prompt"])).float()
            scores = {"eval_l2": torch.nn.functional.mse_loss(out, y)}
            if self.lpips is not None:
                scores["eval_lpips"] = self.lpips(out, y)
            if self.clipsim is not None:
                # the similarity (higher is better), as `turbo-i2i eval` reports clip_sim; the loss is 1 minus it
                scores["eval_clip_sim"] = self.clipsim.similarities(out, batch["prompt"]).mean()
            for k, v in scores.items():  # batch means, weighted by batch size
                totals[k] += float(v) * len(x)
            inputs = x.cpu() * 2 - 1 if self.unwrapped.config.input_range == "0,1" else x.cpu()
            triples += zip(inputs, out.cpu(), y.cpu())
        generator.train()
        # the processes' mean of the sums, times their number: the sum over all n images
        scores = {k: v * self.accelerator.num_processes / n for k, v in self.mean_over_processes(totals).items()}
        inputs, outputs, targets = (list(images) for images in zip(*self.gather_shares(triples)))
        if self.metrics is not None and self.accelerator.is_main_process:  # logged by the main process only
            # FID's reference set is the whole test split's targets, whatever num_eval, as the public trainer
            # takes test_B; read lazily, once per run (the metric keeps its statistics)
            test = self.test_data
            extra = self.metrics("a2b", inputs, outputs, EvalImages(len(test), lambda i: test[i]["target"]))
            scores.update({f"eval_{k}": float(v) for k, v in extra.items()})
        self.save_eval_grid([list(images) for images in zip(inputs[:4], outputs[:4], targets[:4])])
        return scores
