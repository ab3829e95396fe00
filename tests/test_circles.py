import itertools
import json
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from turbo_i2i.errors import BadInputError
from turbo_i2i.training.circles import (
    COLOURS,
    TEMPLATES,
    WORDINGS,
    evaluate,
    evaluate_samples,
    make_sample,
    make_samples,
    parse_prompt,
    write_dataset,
)


def arrays(sample):
    return np.asarray(sample.input), np.asarray(sample.target), sample.mask


def test_palette_is_far_apart_and_wordings_unambiguous():
    assert 8 <= len(COLOURS) <= 12 and set(WORDINGS) == set(COLOURS)
    for a, b in itertools.combinations(COLOURS.values(), 2):
        assert math.dist(a, b) > 100
    all_wordings = [w for ws in WORDINGS.values() for w in ws]
    assert len(all_wordings) == len(set(all_wordings))
    for name, wordings in WORDINGS.items():
        assert len(wordings) >= 2
        for wording in wordings:  # every wording reads back as its own colour
            assert parse_prompt(f"a {wording} circle on a {wording} background") == (COLOURS[name], COLOURS[name])


def test_same_seed_same_samples_different_seed_different():
    first, again, other = make_samples(5, seed=3), make_samples(5, seed=3), make_samples(5, seed=4)
    for a, b in zip(first, again):
        for x, y in zip(arrays(a), arrays(b)):
            np.testing.assert_array_equal(x, y)
        assert (a.prompt, a.fill, a.background) == (b.prompt, b.fill, b.background)
    assert any(not np.array_equal(np.asarray(a.target), np.asarray(b.target)) for a, b in zip(first, other))
    # make_samples is make_sample drawn from one generator.
    rng = np.random.default_rng(3)
    for a in first:
        np.testing.assert_array_equal(np.asarray(make_sample(rng).input), np.asarray(a.input))
    with pytest.raises(BadInputError, match="from 16 to 2048"):
        make_sample(np.random.default_rng(0), size=8)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_sample_images(size):
    kinds = set()
    for sample in make_samples(30, seed=size, size=size):
        inp, target, mask = arrays(sample)
        assert inp.shape == target.shape == (size, size, 3) and inp.dtype == target.dtype == np.uint8
        assert mask.shape == (size, size) and mask.dtype == bool
        assert sample.input.mode == sample.target.mode == "RGB"
        assert 1 <= len(sample.shapes) <= 3
        kinds.update(sample.shapes)
        assert sample.fill != sample.background and {sample.fill, sample.background} <= set(COLOURS)
        # Target: exactly two colours, split by the mask (no outline, no antialiasing).
        assert (target[mask] == COLOURS[sample.fill]).all()
        assert (target[~mask] == COLOURS[sample.background]).all()
        # Shapes are fully inside the image, so the border row/column is background.
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
        # Input: pure white lines on black, drawn inside the filled region.
        white = (inp == 255).all(axis=-1)
        assert ((inp == 0).all(axis=-1) | white).all()
        assert white.any() and not (white & ~mask).any()
    assert kinds == {"circle", "square", "triangle"}


def border_distance(mask):
    """Distance of every pixel to the nearest pixel on the mask's edge."""
    m = mask.astype(np.uint8)
    border = m - cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.distanceTransform((1 - border).astype(np.uint8), cv2.DIST_L2, 3), border.astype(bool)


def test_outlines_lie_on_the_mask_border():
    near, total, single = 0, 0, 0
    for sample in make_samples(60, seed=7):
        inp, _, mask = arrays(sample)
        distance, border = border_distance(mask)
        white = inp[..., 0] == 255
        near += int((distance[white] <= 2).sum())
        total += int(white.sum())
        # The union's edge is always drawn: it is part of some shape's outline.
        assert white[border].all()
        if len(sample.shapes) == 1:  # nothing overlaps: every outline pixel is on the edge
            single += 1
            assert (distance[white] <= 2).all()
    # Overlapping shapes keep their inner lines, so only most outline pixels are on the union's edge.
    assert single > 5 and near / total > 0.7


def test_outline_width_scales():
    def mean_width(size):
        # A band's area over its edge length approximates its width.
        widths = []
        for sample in make_samples(10, seed=0, size=size):
            inp, _, mask = arrays(sample)
            widths.append((inp[..., 0] == 255).sum() / border_distance(mask)[1].sum())
        return np.mean(widths)

    assert 1.5 < mean_width(64) < 2.5
    assert mean_width(128) > 1.5 * mean_width(64) > 2.25 * mean_width(32)


def template_of(prompt):
    """Which caption template wrote a prompt, told apart by its fixed words."""
    for marker, template in [
        ("filled with", TEMPLATES[1]),
        ("against", TEMPLATES[2]),
        ("background with", TEMPLATES[3]),
        (" in ", TEMPLATES[4]),
    ]:
        if marker in prompt:
            return template
    assert prompt.endswith(" background") and " on " in prompt
    return TEMPLATES[0]


def test_caption_parses_back_for_every_template_and_plural():
    seen = set()
    for sample in make_samples(300, seed=11):
        assert parse_prompt(sample.prompt) == (COLOURS[sample.fill], COLOURS[sample.background])
        seen.add((template_of(sample.prompt), len(sample.shapes) > 1))
        kinds = set(sample.shapes)
        if len(kinds) > 1:
            assert "shapes" in sample.prompt
        elif len(sample.shapes) > 1:
            assert f"{sample.shapes[0]}s" in sample.prompt
        else:
            assert sample.shapes[0] in sample.prompt and f"{sample.shapes[0]}s" not in sample.prompt
    assert seen == {(template, plural) for template in TEMPLATES for plural in (False, True)}


@pytest.mark.parametrize(
    ("prompt", "fill", "background"),
    [
        ("a red circle on a blue background", "red", "blue"),
        ("A cyan circle on a light golden background", "cyan", "golden"),
        ("a square filled with cyan, light golden background", "cyan", "golden"),
        ("golden yellow circles on a jet black background", "golden", "black"),
        ("a light-golden background with an orange triangle", "orange", "golden"),
        ("green circle, purple", "green", "purple"),
        ("a red circle", None, None),
    ],
)
def test_parse_prompt_free_text(prompt, fill, background):
    if fill is None:
        with pytest.raises(BadInputError, match="only one colour"):
            parse_prompt(prompt)
    else:
        assert parse_prompt(prompt) == (COLOURS[fill], COLOURS[background])


def test_parse_prompt_without_colour_names_the_problem():
    with pytest.raises(BadInputError, match="No colour found"):
        parse_prompt("a circle on a background")
    with pytest.raises(BadInputError):
        parse_prompt(None)


def test_write_dataset_layout_and_determinism(tmp_path):
    counts = write_dataset(tmp_path / "a", n=20, seed=5, size=32, test_fraction=0.1)
    write_dataset(tmp_path / "b", n=20, seed=5, size=32, test_fraction=0.1)
    assert counts == {"train": 18, "test": 2}
    root = tmp_path / "a"
    assert sorted(p.name for p in root.iterdir()) == [
        "test_A", "test_B", "test_prompts.json", "train_A", "train_B", "train_prompts.json"
    ]  # fmt: skip
    names = set()
    for split, count in counts.items():
        a_files = sorted(p.name for p in (root / f"{split}_A").iterdir())
        assert a_files == sorted(p.name for p in (root / f"{split}_B").iterdir())
        assert len(a_files) == count and all(n.endswith(".png") and len(n) == len("000000.png") for n in a_files)
        prompts = json.loads((root / f"{split}_prompts.json").read_text())
        assert sorted(prompts) == a_files and all(isinstance(p, str) and "background" in p for p in prompts.values())
        names.update(a_files)
        with Image.open(root / f"{split}_B" / a_files[0]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    assert len(names) == 20 and "000000.png" in names
    # Files hold the samples make_samples draws for that seed, byte-identical across runs.
    first = make_samples(1, seed=5, size=32)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(root / "train_B" / "000000.png")), np.asarray(first.target))
    assert json.loads((root / "train_prompts.json").read_text())["000000.png"] == first.prompt
    for path in root.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(root)).read_bytes()


def test_write_dataset_refuses_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not empty"):
        write_dataset(tmp_path, n=4, seed=0)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dataset(empty, n=4, seed=0, size=32)  # an existing empty folder is fine
    with pytest.raises(BadInputError):
        write_dataset(tmp_path / "x", n=0, seed=0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"size": 100000}, "from 16 to 2048 pixels, got 100000"),  # 99999 was a 149 GiB MemoryError traceback
        ({"size": 30}, "multiple of 8"),  # training without resizing refused such a data set later
        ({"seed": 10**23}, "seed must be between"),
    ],
)
def test_write_dataset_refuses_sizes_and_seeds_it_cannot_use_before_writing(tmp_path, options, message):
    with pytest.raises(BadInputError, match=message):
        write_dataset(tmp_path / "data", **{"n": 4, "seed": 0, **options})
    assert not (tmp_path / "data").exists()
    (tmp_path / "file.txt").write_text("mine")
    with pytest.raises(BadInputError, match="is a file, not a folder"):
        write_dataset(tmp_path / "file.txt", n=4, seed=0, size=32)


ERRORS = ("fill_error", "background_error", "fill_error_outline", "fill_error_inside", "fill_colour_offset")


def swapped(sample):
    target = np.where(sample.mask[..., None], COLOURS[sample.background], COLOURS[sample.fill]).astype(np.uint8)
    return Image.fromarray(target)


def test_evaluate_samples_perfect_and_swapped():
    samples = make_samples(20, seed=1)
    perfect = evaluate_samples([s.target for s in samples], samples)
    assert perfect == {"iou": 1.0, "n": 20} | dict.fromkeys(ERRORS, 0.0)
    wrong = evaluate_samples([swapped(s) for s in samples], samples)
    assert wrong["iou"] == pytest.approx(0.0, abs=1e-9)
    assert wrong["fill_error"] > 50 and wrong["background_error"] > 50
    # Upscaled outputs are resized back; a near-perfect answer stays near-perfect.
    big = evaluate_samples([s.target.resize((128, 128), Image.Resampling.NEAREST) for s in samples], samples)
    assert big["iou"] > 0.95
    with pytest.raises(BadInputError):
        evaluate_samples([samples[0].target], samples)


def test_evaluate_samples_known_errors():
    sample = make_samples(1, seed=2)[0]
    target = np.asarray(sample.target).astype(int)
    shifted = Image.fromarray(np.clip(target + 10, 0, 255).astype(np.uint8))
    expected = np.abs(np.clip(target + 10, 0, 255) - target)
    result = evaluate_samples([shifted], [sample])
    assert result["iou"] == 1.0
    assert result["fill_error"] == pytest.approx(expected[sample.mask].mean())
    assert result["background_error"] == pytest.approx(expected[~sample.mask].mean())
    outline = np.asarray(sample.input)[..., 0] == 255
    assert outline.any() and (sample.mask & ~outline).any() and not (outline & ~sample.mask).any()
    assert result["fill_error_outline"] == pytest.approx(expected[sample.mask & outline].mean())
    assert result["fill_error_inside"] == pytest.approx(expected[sample.mask & ~outline].mean())
    # one flat colour inside: the error of its mean colour is the error of every pixel
    assert result["fill_colour_offset"] == pytest.approx(result["fill_error_inside"])


def test_fill_error_splits_into_outline_and_inside():
    """A fill that is right inside the outline but wrong on it shows up on the outline only."""
    sample = make_samples(1, seed=4)[0]
    target = np.asarray(sample.target).copy()
    outline = np.asarray(sample.input)[..., 0] == 255
    target[outline] = COLOURS[sample.background]
    result = evaluate_samples([Image.fromarray(target)], [sample])
    assert result["fill_error_inside"] == 0.0 and result["background_error"] == 0.0
    assert result["fill_error_outline"] > 50 and 0 < result["fill_error"] < result["fill_error_outline"]


def test_fill_colour_offset_tells_a_wrong_colour_from_noise_around_the_right_one():
    sample = next(s for s in make_samples(20, seed=5) if all(10 <= c <= 245 for c in COLOURS[s.fill]))
    inside = sample.mask & ~(np.asarray(sample.input)[..., 0] == 255)
    rows, cols = np.nonzero(inside)
    half = len(rows) // 2
    noisy = np.asarray(sample.target).astype(int)
    noisy[rows[:half], cols[:half]] += 8  # +8 on one half of the pixels, -8 on as many others: the mean is right
    noisy[rows[half : 2 * half], cols[half : 2 * half]] -= 8
    result = evaluate_samples([Image.fromarray(noisy.astype(np.uint8))], [sample])
    assert result["fill_error_inside"] == pytest.approx(8 * 2 * half / len(rows))
    assert result["fill_colour_offset"] == pytest.approx(0.0, abs=1e-9)


def test_evaluate_with_oracle_and_batches():
    n, seed = 37, 123
    answers = {(s.input.tobytes(), s.prompt): s.target for s in make_samples(n, seed=seed)}
    batch_sizes = []

    def oracle(inputs, prompts):
        batch_sizes.append(len(inputs))
        return [answers[(image.tobytes(), prompt)] for image, prompt in zip(inputs, prompts)]

    assert evaluate(oracle, n=n, seed=seed) == {"iou": 1.0, "n": n} | dict.fromkeys(ERRORS, 0.0)
    assert batch_sizes == [16, 16, 5]

    def blank(inputs, prompts):
        return [Image.new("RGB", image.size) for image in inputs]

    assert evaluate(blank, n=8, seed=seed)["background_error"] > 0

    with pytest.raises(BadInputError):
        evaluate(lambda inputs, prompts: inputs[:1], n=4, seed=seed)
