import json
import logging
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from turbo_i2i.errors import BadInputError
from turbo_i2i.training.circles import write_dataset
from turbo_i2i.training.data import (
    TRANSFORMS,
    PairedDataset,
    build_transform,
    collate,
    sample_generator,
)

RANDOM = "resize_286_randomcrop_256x256_hflip"


@pytest.fixture
def circles(tmp_path):
    """A 9-train / 1-test circles data set of 32x32 images."""
    root = tmp_path / "d"
    write_dataset(root, n=10, seed=1, size=32)
    return root


def prompts_of(root, split="train"):
    return json.loads((root / f"{split}_prompts.json").read_text())


def write_prompts(root, prompts, split="train"):
    (root / f"{split}_prompts.json").write_text(json.dumps(prompts))


def same_target_as_input(root):
    """Make every target a copy of its input, so target * 0.5 + 0.5 == input whatever the transform does."""
    for path in (root / "train_A").iterdir():
        shutil.copyfile(path, root / "train_B" / path.name)


def problem_lines(message):
    return [line for line in message.splitlines() if line.startswith("  - ")]


# ---------------------------------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------------------------------


def test_items_shapes_ranges_and_prompts(circles):
    ds = PairedDataset(circles)
    prompts = prompts_of(circles)
    assert len(ds) == 9 and len(PairedDataset(circles, split="test")) == 1
    assert [r.name for r in ds.pairs] == sorted(prompts)
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"input", "target", "prompt", "name"}
        for key in ("input", "target"):
            assert item[key].shape == (3, 32, 32) and item[key].dtype == torch.float32
        assert 0 <= item["input"].min() and item["input"].max() <= 1 and item["input"].max() == 1  # white outlines
        assert -1 <= item["target"].min() and item["target"].max() <= 1
        assert item["prompt"] == prompts[item["name"]]
        expected = np.asarray(Image.open(circles / "train_B" / item["name"]), dtype=np.float32) / 127.5 - 1
        np.testing.assert_allclose(item["target"].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert min(ds[i]["target"].min() for i in range(len(ds))) < 0  # really [-1, 1], not [0, 1]
    assert ds[-1]["name"] == ds[8]["name"]
    with pytest.raises(IndexError):
        ds[9]


def test_manifest_equals_folder_and_collate(circles):
    folder = PairedDataset(circles, transform="resize_64")
    prompts = prompts_of(circles)
    lines = []
    for i, name in enumerate(sorted(prompts)):
        # Relative and absolute paths both work; relative ones are relative to the manifest's folder.
        inp = f"d/train_A/{name}" if i % 2 else str(circles / "train_A" / name)
        lines.append(json.dumps({"input": inp, "target": f"d/train_B/{name}", "prompt": prompts[name]}))
    manifest = circles.parent / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n\n")  # blank lines are ignored
    listed = PairedDataset(manifest, split="test", transform="resize_64")  # split is ignored for a manifest
    assert len(listed) == len(folder) == 9
    for a, b in zip(folder, listed):
        assert a["name"] == b["name"] and a["prompt"] == b["prompt"]
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])

    batch = next(iter(DataLoader(listed, batch_size=4, collate_fn=collate)))
    assert batch["input"].shape == batch["target"].shape == (4, 3, 64, 64)
    assert batch["prompt"] == [prompts[n] for n in batch["name"]] and len(batch["name"]) == 4
    assert torch.equal(batch["input"][1], folder[1]["input"])
    # The data set must survive being sent to DataLoader worker processes.
    assert torch.equal(pickle.loads(pickle.dumps(listed))[3]["target"], folder[3]["target"])


def test_extensions_are_case_insensitive_and_other_files_ignored(circles):
    for folder in ("train_A", "train_B"):
        (circles / folder / "000000.png").rename(circles / folder / "000000.PNG")
        (circles / folder / "notes.txt").write_text("not an image")
        (circles / folder / ".hidden.png").write_text("macOS metadata")
    prompts = prompts_of(circles)
    prompts["000000.PNG"] = prompts.pop("000000.png")
    write_prompts(circles, prompts)
    ds = PairedDataset(circles)
    assert len(ds) == 9 and ds[0]["name"] == "000000.PNG"


# ---------------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, size",
    [("no_resize", 32), ("resize_64", 64), ("resize_48x48", 48), ("resize_512", 512), ("resized_crop_512", 512),
     (RANDOM, 256)],
)  # fmt: skip
def test_transform_sizes_and_identical_on_the_pair(circles, name, size):
    same_target_as_input(circles)
    ds = PairedDataset(circles, transform=name)
    for epoch in (0, 1) if name == RANDOM else (0,):
        ds.set_epoch(epoch)
        for i in (0, 5):
            item = ds[i]
            assert item["input"].shape == item["target"].shape == (3, size, size)
            torch.testing.assert_close(item["target"] * 0.5 + 0.5, item["input"], atol=1e-6, rtol=0)


def test_resized_crop_keeps_aspect_and_centres(tmp_path):
    root = tmp_path / "wide"
    rng = np.random.default_rng(0)
    for folder in ("train_A", "train_B"):
        (root / folder).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / folder / "a.png")
    write_prompts(root, {"a.png": "noise"})
    item = PairedDataset(root, transform="resized_crop_512")[0]
    # Shorter side 30 -> 512, so 40 -> int(512 * 40 / 30) = 682; the centre crop starts at round(170 / 2) = 85.
    expected = Image.open(root / "train_A" / "a.png").resize((682, 512), Image.Resampling.LANCZOS)
    expected = np.asarray(expected.crop((85, 0, 597, 512)), dtype=np.float32) / 255
    np.testing.assert_allclose(item["input"].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_random_transform_depends_only_on_seed_epoch_index(circles):
    same_target_as_input(circles)
    ds = PairedDataset(circles, transform=RANDOM, seed=7)
    ds.set_epoch(3)
    indices = range(5)
    first = [ds[i]["input"] for i in indices]

    # Another object, other items drawn before, the global RNG changed: item 4 of epoch 3 is still the same.
    again = PairedDataset(circles, transform=RANDOM, seed=7)
    again.set_epoch(3)
    for i in (8, 0, 2):
        again[i]  # draws of other items must not shift item 4's crop
    with torch.random.fork_rng(devices=[]):  # leave the global RNG of later tests untouched
        torch.manual_seed(123)
        torch.rand(10)
        assert torch.equal(again[4]["input"], first[4])
    assert all(torch.equal(again[i]["input"], first[i]) for i in indices)

    again.set_epoch(4)
    assert any(not torch.equal(again[i]["input"], first[i]) for i in indices)
    other_seed = PairedDataset(circles, transform=RANDOM, seed=8)
    other_seed.set_epoch(3)
    assert any(not torch.equal(other_seed[i]["input"], first[i]) for i in indices)
    # The generator depends on all three numbers, in order.
    assert torch.equal(sample_generator(7, 3, 4).get_state(), sample_generator(7, 3, 4).get_state())
    assert not torch.equal(sample_generator(7, 3, 4).get_state(), sample_generator(7, 4, 3).get_state())


def test_random_transform_matches_a_manual_crop_and_flip(circles):
    ds = PairedDataset(circles, transform=RANDOM, seed=2)
    flips = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        g = sample_generator(2, epoch, 1)
        top, left = int(torch.randint(0, 31, (1,), generator=g)), int(torch.randint(0, 31, (1,), generator=g))
        flip = bool(torch.rand((), generator=g) < 0.5)
        flips.add(flip)
        image = Image.open(circles / "train_A" / ds.pairs[1].name).convert("RGB")
        image = image.resize((286, 286), Image.Resampling.LANCZOS).crop((left, top, left + 256, top + 256))
        expected = np.asarray(image, dtype=np.float32)[:, :: -1 if flip else 1] / 255
        np.testing.assert_allclose(ds[1]["input"].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert flips == {True, False}


def test_unknown_transform_lists_the_names(circles):
    with pytest.raises(BadInputError) as info:
        PairedDataset(circles, transform="resize_big")
    for name in TRANSFORMS:
        assert name in str(info.value)
    for bad in ("resize_0", "random_crop", "resize_99999"):
        with pytest.raises(BadInputError):
            build_transform(bad)
    with pytest.raises(BadInputError, match="'resize_30': the sides must be multiples of 8, e.g. resize_32"):
        build_transform("resize_30")  # the VAE's 8x8 blocks: it used to fail inside the model at the first step
    with pytest.raises(BadInputError, match="e.g. resize_304x208"):
        build_transform("resize_300x201")


def test_sizes_the_model_cannot_take_or_batch_are_refused_before_training(circles):
    """no_resize keeps each image's size: one that is no multiple of 8 is a problem of that pair (it used to fail
    inside the model, at the step that drew it), and sizes that differ cannot share a batch (it used to fail at the
    first step that batched two of them)."""
    from turbo_i2i.training.data import check_batchable

    (name,) = sorted(p.name for p in (circles / "train_A").iterdir())[:1]
    for folder in ("train_A", "train_B"):
        Image.new("RGB", (30, 30)).save(circles / folder / name)
    with pytest.raises(
        BadInputError,
        match=f"input train_A/{name} is 30x30: training needs sides that are multiples"
        r".*resize_512 \(--transform\)$",
    ):  # paired training has no --eval-transform to name
        PairedDataset(circles, transform="no_resize")
    assert len(PairedDataset(circles, transform="resize_32").sizes) == 1  # resized: one size, batchable
    for folder in ("train_A", "train_B"):
        Image.new("RGB", (40, 40)).save(circles / folder / name)
    data = PairedDataset(circles, transform="no_resize")
    assert data.sizes == {(32, 32), (40, 40)}
    check_batchable(data, 1)
    with pytest.raises(
        BadInputError,
        match="The train images have 2 sizes after --transform no_resize \\(32x32, 40x40\\).*--batch-size 1",
    ):
        check_batchable(data, 2)
    with pytest.raises(BadInputError, match="split"):
        PairedDataset(circles, split="validation")


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


def break_dataset(root):
    """Five broken pairs (000001-000005) and one orphan target; 000000 and 000006-000008 stay good."""
    (root / "train_B" / "000001.png").unlink()
    prompts = prompts_of(root)
    del prompts["000002.png"]
    prompts["000005.png"] = "   "  # a blank caption
    write_prompts(root, prompts)
    (root / "train_A" / "000003.png").write_text("this is text, not a picture")
    data = (root / "train_B" / "000004.png").read_bytes()
    (root / "train_B" / "000004.png").write_bytes(data[: len(data) // 2])
    shutil.copyfile(root / "test_B" / "000009.png", root / "train_B" / "000099.png")


def test_all_problems_in_one_error(circles):
    break_dataset(circles)
    with pytest.raises(BadInputError) as info:
        PairedDataset(circles)
    message = str(info.value)
    assert message.startswith(f"6 problems in the dataset {circles} (train split):")
    lines = problem_lines(message)
    assert len(lines) == 6
    expected = {
        "train_A/000001.png has no target train_B/000001.png",
        "train_A/000002.png has no caption in train_prompts.json",
        "000003.png' cannot be decoded",
        "000004.png' is corrupt or truncated",
        "caption of train_A/000005.png in train_prompts.json is empty",
        "train_B/000099.png has no input train_A/000099.png",
    }
    for text in expected:
        assert sum(text in line for line in lines) == 1, text
    assert info.value.exit_code == 2


def test_problems_of_the_test_split_name_it(circles, caplog):
    # the test split is checked when training starts: its warning must not read like one about the training pairs
    shutil.copyfile(circles / "train_A" / "000000.png", circles / "test_A" / "extra.png")  # no target
    with pytest.raises(BadInputError, match=rf"^2 problems in the dataset {re.escape(str(circles))} \(test split\):"):
        PairedDataset(circles, split="test")
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        assert len(PairedDataset(circles, split="test", skip_bad=True)) == 1
    assert re.search(r"Skipped 1 of 2 pairs of the dataset .* \(test split\), 2 problems,", caplog.text)


def test_skip_bad_keeps_the_good_pairs_and_warns(circles, caplog):
    break_dataset(circles)
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        ds = PairedDataset(circles, skip_bad=True)
    (record,) = caplog.records
    assert re.search(r"Skipped 5 of 9 pairs of the dataset .* \(train split\), 6 problems", record.getMessage())
    assert [r.name for r in ds.pairs] == ["000000.png", "000006.png", "000007.png", "000008.png"]
    assert len(ds.problems) == 6 and ds[3]["name"] == "000008.png"


def test_size_mismatch_is_a_problem(circles):
    Image.new("RGB", (16, 32)).save(circles / "train_B" / "000002.png")
    with pytest.raises(BadInputError, match=r"(?s)1 problem in .*train_A/000002.png is 32x32 but target .* 16x32"):
        PairedDataset(circles)


def test_many_problems_list_twenty_and_count_the_rest(tmp_path, caplog):
    root = tmp_path / "d"
    write_dataset(root, n=30, seed=2, size=16)  # 27 train pairs
    prompts = prompts_of(root)
    write_prompts(root, {name: prompts[name] for name in sorted(prompts)[:2]})
    with pytest.raises(BadInputError) as info:
        PairedDataset(root)
    message = str(info.value)
    assert message.startswith("25 problems in the dataset")
    assert len(problem_lines(message)) == 20 and message.endswith("  ... and 5 more")
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        assert len(PairedDataset(root, skip_bad=True)) == 2
    assert "and 20 more" in caplog.text


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda root: shutil.rmtree(root / "train_B"), "folder train_B/ is missing"),
        (lambda root: (root / "train_prompts.json").unlink(), "captions file train_prompts.json is missing"),
        (lambda root: (root / "train_prompts.json").write_text("{'a': 1"), "train_prompts.json is not valid JSON"),
        (lambda root: (root / "train_prompts.json").write_text("[1, 2]"), "must hold a JSON object"),
    ],
)
def test_structural_problems_are_named_once_and_skip_bad_cannot_hide_them(circles, damage, expected):
    damage(circles)
    with pytest.raises(BadInputError) as info:
        PairedDataset(circles)
    assert str(info.value).startswith("1 problem in the dataset") and expected in str(info.value)
    with pytest.raises(BadInputError, match="No usable pair is left"):
        PairedDataset(circles, skip_bad=True)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        PairedDataset(tmp_path / "nowhere")
    with pytest.raises(BadInputError, match="does not exist"):
        PairedDataset(tmp_path / "nowhere.jsonl")
    for folder in ("train_A", "train_B"):
        (tmp_path / "empty" / folder).mkdir(parents=True)
    write_prompts(tmp_path / "empty", {})
    with pytest.raises(BadInputError, match="holds no images"):
        PairedDataset(tmp_path / "empty")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(BadInputError, match="holds no entries"):
        PairedDataset(tmp_path / "blank.jsonl")
    (tmp_path / "pairs.txt").write_text("")
    with pytest.raises(BadInputError, match="not a .jsonl manifest"):
        PairedDataset(tmp_path / "pairs.txt")


def test_bad_manifest_lines_are_named_by_number(circles, caplog):
    good = {"input": "d/train_A/000000.png", "target": "d/train_B/000000.png", "prompt": "a red circle"}
    lines = [
        json.dumps(good),
        '{"input": "d/train_A/000001.png", "target": ',  # line 2: not JSON
        json.dumps({"input": "d/train_A/000002.png", "target": "d/train_B/000002.png"}),  # line 3: no prompt
        json.dumps({**good, "input": "d/train_A/missing.png"}),  # line 4: no such file
        json.dumps({**good, "prompt": ""}),  # line 5: empty prompt
        json.dumps(["a", "list"]),  # line 6: not an object
        json.dumps({**good, "target": "d/train_prompts.json"}),  # line 7: not an image
    ]
    manifest = circles.parent / "pairs.jsonl"
    manifest.write_text("\n".join(lines))
    with pytest.raises(BadInputError) as info:
        PairedDataset(manifest)
    lines = problem_lines(str(info.value))
    assert str(info.value).startswith(f"6 problems in the dataset {manifest}:")  # a manifest has no splits
    assert lines[0].startswith("  - manifest line 2: not valid JSON")
    assert lines[1] == "  - manifest line 3: missing key 'prompt'"
    assert lines[2].startswith("  - manifest line 4: Image file") and "missing.png' does not exist" in lines[2]
    assert lines[3] == "  - manifest line 5: the prompt is empty"
    assert lines[4].startswith("  - manifest line 6: a JSON list, not an object")
    assert lines[5].startswith("  - manifest line 7: target 'd/train_prompts.json' is not an image file")
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        assert len(PairedDataset(manifest, skip_bad=True)) == 1
    assert "Skipped 6 of 7 pairs" in caplog.text


def test_collate_refuses_mixed_sizes():
    small = {"input": torch.zeros(3, 8, 8), "target": torch.zeros(3, 8, 8), "prompt": "a", "name": "a.png"}
    large = {"input": torch.zeros(3, 8, 16), "target": torch.zeros(3, 8, 16), "prompt": "b", "name": "b.png"}
    with pytest.raises(BadInputError, match="8x8, 16x8"):
        collate([small, large])
    with pytest.raises(BadInputError, match="empty"):
        collate([])
