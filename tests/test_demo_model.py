"""The shipped offline model: quality on held-out samples, and the prompt steers the colours."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from turbo_i2i.pipeline import Translator
from turbo_i2i.training.circles import COLOURS, evaluate, make_sample


@pytest.fixture(scope="module")
def translator():
    return Translator.from_pretrained("demo-circles")


KNOWN_GAP = (
    "the shipped model (preset demo-circles, 3000 steps on a 2-core CPU) has not learned to read colours from the"
    " prompt yet; see README 'The built-in model'. strict: this fails once the model meets the targets, so the"
    " marker gets removed then."
)


@pytest.mark.xfail(strict=True, reason=KNOWN_GAP)
def test_held_out_quality_meets_the_targets(translator):
    scores = evaluate(lambda images, prompts: translator(images, prompt=prompts), n=32)
    assert scores["iou"] >= 0.95, scores
    assert scores["fill_error"] <= 12 and scores["background_error"] <= 12, scores


@pytest.mark.xfail(strict=True, reason=KNOWN_GAP)
def test_colour_words_alone_set_the_colours(translator):
    sample = make_sample(np.random.default_rng(123), size=64)
    mask = sample.mask
    for fill, background in (("red", "blue"), ("green", "white"), ("cyan", "black")):
        out = np.asarray(translator(sample.input, prompt=f"a {fill} circle on a {background} background"), dtype=float)
        inside, outside = out[mask].mean(0), out[~mask].mean(0)
        assert np.abs(inside - COLOURS[fill]).mean() < 25, (fill, inside)
        assert np.abs(outside - COLOURS[background]).mean() < 25, (background, outside)


def test_readme_example_runs_offline(tmp_path):
    from turbo_i2i.cli import main

    out = tmp_path / "out.png"
    example = Path(__file__).resolve().parents[1] / "examples" / "circles.png"
    args = ["--input", str(example), "--prompt", "a red circle on a blue background", "--output", str(out)]
    assert main(["translate", "--model", "demo-circles", *args]) == 0
    image = Image.open(out)
    assert image.mode == "RGB" and image.size == Image.open(example).size
