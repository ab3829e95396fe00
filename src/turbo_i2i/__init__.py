"""turbo-i2i: one-step image-to-image translation (pix2pix-Turbo, CycleGAN-Turbo) on SD-Turbo."""

__version__ = "0.1.0"
