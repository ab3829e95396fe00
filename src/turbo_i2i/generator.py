"""The one-step generator (pix2pix-Turbo / CycleGAN-Turbo) as plain ``nn.Module`` composition.

Recipe of one translation (paper, Sec. 3):

1. ``SkipEncoder``: the VAE encoder, returning its latent *and* the activations entering each down block;
2. the UNet runs once at timestep 999 on the encoded input (no noise is added: in a one-step model the noise
   map decides the layout, so the condition goes straight into the UNet's input);
3. the DDPM formula turns the epsilon prediction into the clean latent;
4. ``SkipDecoder``: the VAE decoder, adding ``gamma`` * 1x1 conv(skip activation) to the input of each up block.

Only LoRA adapters, the skip convs and the UNet's ``conv_in`` are trained (unless ``train_all``).
"""

from __future__ import annotations

import copy
import hashlib
import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.autoencoders.vae import Decoder, DiagonalGaussianDistribution, Encoder
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .adapters import (
    UNET_ADAPTER,
    UNPAIRED_UNET_ADAPTERS,
    VAE_ADAPTER,
    activate_adapters,
    attach_lora,
    lora_scale,
    merge_lora,
    unmerge_lora,
    unpaired_unet_targets,
)
from .backbone import OneStepSchedule
from .config import GeneratorConfig
from .derived import clear_derived_weights
from .errors import BadInputError

SKIP_CONV_INIT = 1e-5  # "zero-conv": near-zero so training starts from the plain VAE decode


def skip_channels(block_out_channels: list[int]) -> list[tuple[int, int]]:
    """(in, out) channels of skip_conv_1..n, read from the VAE config rather than hard-coded.

    skip_conv_k takes the activation entering encoder down block n - k and feeds decoder up block k - 1.

    Args:
        block_out_channels: the VAE's ``block_out_channels``.

    Returns:
        one (in_channels, out_channels) pair per skip conv; for SD-Turbo (512, 512), (256, 512), (128, 512),
        (128, 256).
    """
    n = len(block_out_channels)
    encoder_in = [block_out_channels[0]] + list(block_out_channels[:-1])
    reversed_out = list(reversed(block_out_channels))
    decoder_in = [reversed_out[0]] + reversed_out[:-1]
    return [(encoder_in[n - k], decoder_in[k - 1]) for k in range(1, n + 1)]


def run_block(block: nn.Module, checkpointed: bool, *args) -> torch.Tensor:
    """Run one VAE block, recomputing its activations in the backward pass when ``checkpointed`` (training only)."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class SkipEncoder(nn.Module):
    """The diffusers VAE encoder's blocks, run so that the input of every down block is returned too.

    Args:
        encoder: a diffusers ``Encoder``; its sub-modules are reused (not copied), so parameter names stay the
            diffusers ones (``conv_in``, ``down_blocks.0...``).
    """

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.conv_in = encoder.conv_in
        self.down_blocks = encoder.down_blocks
        self.mid_block = encoder.mid_block
        self.conv_norm_out = encoder.conv_norm_out
        self.conv_act = encoder.conv_act
        self.conv_out = encoder.conv_out
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Args:
            x: images (N, 3, H, W).

        Returns:
            (the encoder output before ``quant_conv``, the activations entering down blocks 0..n-1).
        """
        h = self.conv_in(x)
        skips = []
        for block in self.down_blocks:
            skips.append(h)
            h = run_block(block, self.gradient_checkpointing, h)
        h = run_block(self.mid_block, self.gradient_checkpointing, h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h))), skips


class SkipDecoder(nn.Module):
    """The diffusers VAE decoder's blocks plus 1x1 skip convs from the encoder.

    Args:
        decoder: a diffusers ``Decoder`` whose sub-modules are reused.
        block_out_channels: the VAE's ``block_out_channels`` (sets the skip conv widths).
    """

    def __init__(self, decoder: Decoder, block_out_channels: list[int]):
        super().__init__()
        self.conv_in = decoder.conv_in
        self.mid_block = decoder.mid_block
        self.up_blocks = decoder.up_blocks
        self.conv_norm_out = decoder.conv_norm_out
        self.conv_act = decoder.conv_act
        self.conv_out = decoder.conv_out
        self.gradient_checkpointing = False
        for k, (c_in, c_out) in enumerate(skip_channels(block_out_channels), start=1):
            conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
            nn.init.constant_(conv.weight, SKIP_CONV_INIT)
            setattr(self, f"skip_conv_{k}", conv)  # official name, so official keys map one to one
        self.num_skips = len(block_out_channels)

    def skip_convs(self) -> list[nn.Module]:
        """skip_conv_1..n in order (deepest first)."""
        return [getattr(self, f"skip_conv_{k}") for k in range(1, self.num_skips + 1)]

    def forward(self, z: torch.Tensor, skips: list[torch.Tensor], gamma: float = 1.0) -> torch.Tensor:
        """Args:
            z: latents after ``post_quant_conv``.
            skips: the encoder's skip activations, shallowest first (as ``SkipEncoder`` returns them).
            gamma: skip strength (r for the stochastic model, 1 otherwise).

        Returns:
            decoded images (N, 3, H, W), not clamped.
        """
        h = self.conv_in(z)
        h = run_block(self.mid_block, self.gradient_checkpointing, h, None)
        for block, conv, skip in zip(self.up_blocks, self.skip_convs(), reversed(skips)):
            # gamma scales the activation before the conv, as in the released models (it matters for LoRA'd convs
            # only through linearity, so the two orders agree).
            h = h + conv(skip * gamma)
            h = run_block(block, self.gradient_checkpointing, h, None)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class SkipVAE(nn.Module):
    """A VAE whose decoder sees the encoder's activations: ``encode`` returns them, ``decode`` consumes them.

    Parameter names are the diffusers ``AutoencoderKL`` names plus ``decoder.skip_conv_k``.

    Args:
        vae: a diffusers ``AutoencoderKL``; its modules are reused, not copied.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.encoder = SkipEncoder(vae.encoder)
        self.decoder = SkipDecoder(vae.decoder, list(vae.config.block_out_channels))
        self.quant_conv = vae.quant_conv
        self.post_quant_conv = vae.post_quant_conv
        self.scaling_factor = float(vae.config.scaling_factor)

    def encode(self, x: torch.Tensor) -> tuple[DiagonalGaussianDistribution, list[torch.Tensor]]:
        """Images -> (latent posterior in VAE units, skip activations)."""
        h, skips = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussianDistribution(h), skips

    def decode(self, z: torch.Tensor, skips: list[torch.Tensor], gamma: float = 1.0) -> torch.Tensor:
        """Latents (VAE units) + skips -> images, not clamped."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, skips, gamma)


class TwinConv(nn.Module):
    """conv_in of the stochastic model: ``r * trained(x) + (1 - r) * pretrained(x)``.

    ``r`` is read from an attribute because the UNet calls ``conv_in(x)`` itself; it is set only inside
    ``OneStepGenerator.forward`` (and restored there), never left behind.

    Args:
        conv_in_pretrained: the backbone's conv_in (frozen).
        conv_in_curr: the trained conv_in.
    """

    def __init__(self, conv_in_pretrained: nn.Conv2d, conv_in_curr: nn.Conv2d):
        super().__init__()
        self.conv_in_pretrained = conv_in_pretrained
        self.conv_in_curr = conv_in_curr
        self.r = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 1.0:  # exactly the trained conv: the deterministic path
            return self.conv_in_curr(x)
        # detach, as the official TwinConv does: the pretrained branch is a fixed reference that the VAE encoder's
        # adapters do not learn through (their gradient comes through the trained branch alone); kept so that our
        # stochastic training follows the released recipe
        return self.conv_in_curr(x) * self.r + self.conv_in_pretrained(x).detach() * (1.0 - self.r)


class _ClampImage(torch.autograd.Function):
    """Clamp to [-1, 1] in the forward pass; pass the gradient through unchanged in the backward pass.

    A plain clamp gives no gradient to pixels outside the range, so a pixel that overshoots can never be pulled back
    (training from random weights stalls on it). The forward values are exactly ``clamp``'s.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def clamp_image(x: torch.Tensor) -> torch.Tensor:
    """Decoded images clamped to [-1, 1], with a straight-through gradient."""
    return _ClampImage.apply(x)


def attach_unet_lora(unet: UNet2DConditionModel, config: GeneratorConfig) -> None:
    """The UNet adapters of the config's task: one (paired) or three, all active (unpaired)."""
    if config.task == "paired":
        attach_lora(unet, UNET_ADAPTER, config.unet_lora_targets, config.unet_lora_rank, config.unet_lora_alpha)
        return
    for adapter, targets in unpaired_unet_targets(unet, config.unet_lora_targets).items():
        attach_lora(unet, adapter, targets, config.unet_lora_rank, config.unet_lora_alpha)
    activate_adapters(unet, list(UNPAIRED_UNET_ADAPTERS))


def share_frozen(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the *same tensors* as the original's.

    The unpaired model needs one VAE adapter set per direction on one frozen VAE: each direction gets its own
    module tree (so peft wraps each separately and nothing is switched per call) over shared base weights.
    """
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


class OneStepGenerator(nn.Module):
    """pix2pix-Turbo (paired) or CycleGAN-Turbo (unpaired) generator.

    Args:
        config: what to build (task, ranks, targets, stochastic).
        unet: the backbone UNet (adapters are attached to it in place).
        vae: the backbone VAE (its modules are reused by every direction's ``SkipVAE``).
        schedule: the one-step scheduler maths.
    """

    def __init__(
        self, config: GeneratorConfig, unet: UNet2DConditionModel, vae: AutoencoderKL, schedule: OneStepSchedule
    ):
        super().__init__()
        self.config = config
        self.schedule = schedule
        # With every weight trained (train_all), LoRA would only add redundant parameters, whose tiny gradients also
        # drive Adam's second moments into slow denormal floats on CPUs.
        if not config.train_all:
            attach_unet_lora(unet, config)
        if config.stochastic:
            unet.conv_in = TwinConv(copy.deepcopy(unet.conv_in).requires_grad_(False), unet.conv_in)
        self.unet = unet
        first, *others = config.directions
        vaes = {first: SkipVAE(vae)}
        for direction in others:
            vaes[direction] = SkipVAE(share_frozen(vae))
        if not config.train_all:
            for skip_vae in vaes.values():
                attach_lora(
                    skip_vae, VAE_ADAPTER, config.vae_lora_targets, config.vae_lora_rank, config.vae_lora_alpha
                )
        self.vae = nn.ModuleDict(vaes)
        self.merged_strength: float | None = None  # the LoRA strength folded into the base weights, if any
        self.set_trainable(False)

    # --- which weights are trained -------------------------------------------------------------------------------

    def is_trained(self, name: str) -> bool:
        """Whether parameter ``name`` is trained (and so saved in our checkpoints)."""
        if self.config.train_all:
            return True
        if "lora_" in name or ".skip_conv_" in name:
            return True
        return name.startswith("unet.conv_in.") and "conv_in_pretrained" not in name

    def set_trainable(self, trainable: bool = True) -> None:
        """Switch ``requires_grad`` on for the trained weights (or off for all), frozen ones always off."""
        for name, param in self.named_parameters():
            param.requires_grad_(trainable and self.is_trained(name))

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained tensor (adapters, skip convs, conv_in; all with ``train_all``), detached and contiguous."""
        if self.merged_strength is not None:  # merged base weights already hold the LoRA update: saving doubles it
            raise RuntimeError("The LoRA adapters are merged into the base weights; call unmerge_lora() first.")
        return {n: p.detach().contiguous() for n, p in self.named_parameters() if self.is_trained(n)}

    def trained_digest(self) -> str:
        """A fingerprint of the trained tensors (names, dtypes, shapes and values; a video resume compares it).

        Merged or not, it is the same: the base weights of LoRA layers, which merging rewrites, are left out; the
        adapters, which any retraining changes, are in (and so is every other trained tensor).

        Returns:
            the first 16 hex digits of a SHA-256.
        """
        digest = hashlib.sha256()
        for name, param in self.named_parameters():
            if self.is_trained(name) and ".base_layer." not in name:
                # reshape(-1), not contiguous(): a channels-last 1x1 kernel counts as contiguous but is not a row
                flat = param.detach().reshape(-1)
                digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}|".encode())
                digest.update(flat.view(torch.uint8).cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def load_trained_state_dict(self, state: dict[str, torch.Tensor], allow_missing: frozenset[str] = frozenset()):
        """Load trained tensors after ``check_trained_state_dict``.

        Args:
            state: name -> tensor, as ``trained_state_dict`` returns.
            allow_missing: trained names that may be absent (they keep the backbone's values).
        """
        self.check_trained_state_dict(state, allow_missing)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)

    def check_trained_state_dict(self, state: dict[str, torch.Tensor], allow_missing: frozenset[str] = frozenset()):
        """Check that ``state`` holds exactly this model's trained tensors, with the right shapes.

        Args:
            state: name -> tensor, as ``trained_state_dict`` returns.
            allow_missing: trained names that may be absent (they keep the backbone's values).

        Raises:
            BadInputError: a missing or unexpected tensor, or the first tensor whose shape does not fit.
        """
        params = dict(self.named_parameters())
        expected = {n for n in params if self.is_trained(n)}
        missing = sorted(expected - set(state) - allow_missing)
        unexpected = sorted(set(state) - expected)
        if unexpected:
            raise BadInputError(
                f"The checkpoint has {len(unexpected)} tensors this model does not have, e.g. {unexpected[0]!r}:"
                f" it was made for another architecture or task."
            )
        if missing:
            raise BadInputError(f"The checkpoint lacks {len(missing)} trained tensors, e.g. {missing[0]!r}.")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise BadInputError(
                    f"Tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint but"
                    f" {tuple(params[name].shape)} in the model built from {self.config.base_model!r}: the"
                    f" checkpoint does not fit this base model."
                )

    # --- merged LoRA (inference) ----------------------------------------------------------------------------------

    def _mergeable(self) -> list[nn.Module]:
        # The directions of an unpaired model share their frozen VAE tensors: merging one direction's adapter into
        # them would change the other direction too, so only the (shared) UNet is merged there.
        return [self.unet] if len(self.vae) > 1 else [self.unet, *self.vae.values()]

    def merge_lora(self, r: float | None = None) -> None:
        """Fold the LoRA updates into the base weights for inference at a fixed strength (one conv per layer).

        A later call with another ``r`` unmerges automatically, so results never depend on the merge.

        Args:
            r: the strength to merge at (the stochastic model's r; None = the trained strength, 1).
        """
        self.unmerge_lora()
        strength = 1.0 if r is None else float(r)
        merge_lora(self._mergeable(), strength)
        clear_derived_weights(self)  # peft changed weight.data in place, which the caches' keys cannot see
        self.merged_strength = strength

    def unmerge_lora(self) -> None:
        """Restore the separate LoRA branches (needed for another strength, for training and for saving)."""
        if self.merged_strength is not None:
            unmerge_lora(self._mergeable(), self.merged_strength)
            clear_derived_weights(self)
            self.merged_strength = None

    # --- the forward pass ----------------------------------------------------------------------------------------

    @contextmanager
    def _strength(self, direction: str, r: float | None) -> Iterator[None]:
        """LoRA scale and conv_in blend set to r for one call (stochastic models), restored afterwards."""
        if r is None:
            yield
            return
        twin = self.unet.conv_in
        with lora_scale([self.unet, self.vae[direction]], r):
            twin.r = r
            try:
                yield
            finally:
                twin.r = 1.0

    def check_r(self, r: float | None) -> None:
        """Refuse an ``r`` this model cannot take.

        Args:
            r: the faithfulness of a stochastic model, in [0, 1]; None: the model's own.

        Raises:
            BadInputError: ``r`` given to a deterministic model, or outside [0, 1].
        """
        if r is not None:
            if not self.config.stochastic:
                raise BadInputError("r applies only to stochastic models; this one is deterministic.")
            if isinstance(r, bool) or not isinstance(r, numbers.Real):  # "0.5" from a form, not a number
                raise BadInputError(f"r must be a number in [0, 1], got {r!r} ({type(r).__name__}).")
            if not 0.0 <= r <= 1.0:
                raise BadInputError(f"r must be in [0, 1], got {r}.")

    def forward(
        self,
        x: torch.Tensor,
        prompt_embeds: torch.Tensor,
        direction: str | None = None,
        r: float | None = None,
        noise: torch.Tensor | None = None,
        sample_posterior: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        posterior_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Translate a batch in one UNet evaluation.

        Args:
            x: input images (N, 3, H, W) in the model's input range (``config.input_range``), H and W multiples of 8.
            prompt_embeds: text encoder states (N or 1, 77, D).
            direction: "a2b" or "b2a" (unpaired); defaults to ``config.default_direction``.
            r: stochastic models only: 1 = faithful to the input, 0 = pure text-to-image from ``noise``.
            noise: the latent noise map for r < 1 (drawn from ``generator`` when None).
            sample_posterior: sample the VAE posterior (with ``generator``) instead of taking its mode.
            generator: RNG for the noise map and posterior sampling, so the same seed gives the same image; a list
                (one per image) makes each image's draws independent of the others in the batch.
            posterior_noise: with ``sample_posterior``, the standard normal draw of the sample (drawn from
                ``generator`` when None; the latent shape), so tiles of one image can share one draw.

        Returns:
            images (N, 3, H, W) in [-1, 1].
        """
        direction = direction or self.config.default_direction
        if direction not in self.vae:
            raise BadInputError(f"Unknown direction {direction!r}; this model has {', '.join(self.vae)}.")
        self.check_r(r)
        if self.merged_strength is not None and self.merged_strength != (1.0 if r is None else r):
            self.unmerge_lora()  # per-call r: the merged weights hold another strength
        vae = self.vae[direction]
        if prompt_embeds.shape[0] == 1 and x.shape[0] > 1:
            prompt_embeds = prompt_embeds.expand(x.shape[0], -1, -1)
        with self._strength(direction, r):
            posterior, skips = vae.encode(x)
            if not sample_posterior:
                z = posterior.mode()
            elif posterior_noise is None:
                z = posterior.sample(generator)
            else:  # what posterior.sample computes, with the draw given
                z = posterior.mean + posterior.std * posterior_noise.to(posterior.mean.dtype)
            z = z * vae.scaling_factor
            if r is not None and r < 1.0:
                if noise is None:
                    noise = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = z * r + noise * (1.0 - r)
            t = torch.full((z.shape[0],), self.schedule.timestep, device=z.device, dtype=torch.long)
            prediction = self.unet(z, t, encoder_hidden_states=prompt_embeds.to(z.dtype)).sample
            x0 = self.schedule.x0(z, prediction)
            return clamp_image(vae.decode(x0 / vae.scaling_factor, skips, gamma=1.0 if r is None else r))

    def compile_parts(self) -> None:
        """``torch.compile`` the UNet and each direction's VAE encoder and decoder, in place (training's --compile).

        The parts, not ``forward``: both directions' passes then share the UNet's graphs, and checks and per-call
        settings stay eager Python (the ``Translator`` compiles the whole pass instead, for CUDA graphs). The first
        call of each part compiles it (minutes at full size), and so does each new input shape, train/eval mode or
        LoRA strength r (the parts read r as a constant; torch.compile runs a part eagerly once it has recompiled too
        often); later calls dispatch fewer, fused kernels.
        """
        for module in (self.unet, *(part for vae in self.vae.values() for part in (vae.encoder, vae.decoder))):
            module.compile()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute UNet and VAE block activations in the backward pass (memory for compute)."""
        self.unet.enable_gradient_checkpointing()
        for vae in self.vae.values():
            vae.encoder.gradient_checkpointing = vae.decoder.gradient_checkpointing = True
