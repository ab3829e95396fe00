"""turbo-i2i: one-step image-to-image translation (pix2pix-Turbo, CycleGAN-Turbo) on SD-Turbo."""

__version__ = "0.1.0"
__all__ = ["GeneratorConfig", "OneStepGenerator", "Translator"]

_LAZY = {"Translator": "pipeline", "GeneratorConfig": "config", "OneStepGenerator": "generator"}


def __getattr__(name: str):
    # Imported on first use: `import turbo_i2i` stays cheap for the CLI's argument parsing.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
