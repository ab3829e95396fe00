"""Try a variant of the demo-circles recipe: train it, print the loss every 250 steps, then score the model.

A variant is a JSON object of training options that override the ``demo-circles`` preset (``learning_rate``,
``batch_size``, ...), plus two optional keys that change the ``tiny-circles`` backbone for this process only:
``scheduler`` (e.g. ``{"prediction_type": "sample"}``) and ``vae`` (e.g. ``{"scaling_factor": 1.0}``). The score is
``turbo-i2i eval-demo``'s (IoU, colour errors) on 200 held-out samples.

Usage (from a checkout, ``PYTHONPATH=src`` unless the package is installed; one variant per process, so several can
share a GPU)::

    turbo-i2i data circles --out /tmp/circles --n 6000 --seed 1 --size 64
    python benchmarks/demo_recipe.py --name lr3e-4 --data /tmp/circles --steps 1000 --variant '{"learning_rate": 3e-4}'

Prints ``PROGRESS name step mean-loss-of-last-50 seconds`` lines and one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="a label for the output lines and the run folder")
    parser.add_argument("--data", required=True, help="a circles data set (turbo-i2i data circles)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--variant", default="{}", help="JSON: preset overrides, plus 'scheduler' and 'vae'")
    parser.add_argument("--out", default="/tmp/demo-recipe", help="parent folder of the run folders")
    args = parser.parse_args(argv)
    variant = json.loads(args.variant)

    from turbo_i2i import backbone

    spec = backbone.BUILTIN_BACKBONES["tiny-circles"]
    spec["scheduler"] = {**spec.get("scheduler", {}), **variant.pop("scheduler", {})}
    spec["vae"] = {**spec["vae"], **variant.pop("vae", {})}

    from turbo_i2i.pipeline import Translator
    from turbo_i2i.training.circles import evaluate
    from turbo_i2i.training.options import PRESETS
    from turbo_i2i.training.paired import PairedTrainConfig, PairedTrainer

    options = {k: v for k, v in PRESETS["demo-circles"].items() if k != "extra"}
    options.update(
        dataset=args.data, output_dir=f"{args.out}/{args.name}", report_to="none", eval_every=10**9,
        checkpoint_every=10**9, max_steps=args.steps, **variant,
    )  # fmt: skip
    trainer = PairedTrainer(PairedTrainConfig(**options))
    start, losses = time.time(), []
    for step in range(1, args.steps + 1):
        losses.append(trainer.train_step()["loss_g"])
        if step % 250 == 0:
            recent = losses[-50:]
            print("PROGRESS", args.name, step, round(sum(recent) / len(recent), 4), round(time.time() - start, 1))
    seconds = time.time() - start
    translator = Translator.from_pretrained(trainer.export(), device=trainer.device)
    scores = evaluate(lambda images, prompts: translator(images, prompt=prompts), n=200)
    result = dict(name=args.name, variant=args.variant, steps=args.steps, seconds=seconds, **scores)
    print("RESULT", json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
