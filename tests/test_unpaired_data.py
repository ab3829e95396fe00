"""Unpaired data: layout, validation messages, --skip-bad, and a pairing that is random per epoch yet a function of
(seed, epoch) alone."""

import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from turbo_i2i.errors import BadInputError
from turbo_i2i.training.unpaired_data import UnpairedDataset, collate_unpaired


def write_unpaired(root, n_a=5, n_b=3, size=16, test=True):
    """Domain A: dark images, domain B: bright ones; every image a distinct flat colour (so its file is known)."""
    for split, counts in (("train", (n_a, n_b)),) + ((("test", (2, 2)),) if test else ()):
        for domain, n, base in (("A", counts[0], 10), ("B", counts[1], 150)):
            folder = root / f"{split}_{domain}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (size, size), (base + 10 * i, base, base)).save(folder / f"{i:03d}.png")
    (root / "fixed_prompt_a.txt").write_text("a dark picture\n")
    (root / "fixed_prompt_b.txt").write_text("  a bright picture  \n")
    return root


def test_items_captions_and_ranges(tmp_path):
    ds = UnpairedDataset(write_unpaired(tmp_path / "d"))
    assert ds.captions == {"A": "a dark picture", "B": "a bright picture"}
    assert len(ds) == 5 and [len(ds.files[d]) for d in "AB"] == [5, 3]
    item = ds[0]
    assert set(item) == {"a", "b", "name_a", "name_b"}
    assert item["a"].shape == (3, 16, 16) and item["a"].dtype == torch.float32
    expected = np.asarray(Image.open(tmp_path / "d" / "train_A" / item["name_a"]), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(item["a"].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert item["b"].min() > 0 > item["a"].max()  # [-1, 1]: bright B above 0, dark A below
    batch = collate_unpaired([ds[0], ds[1]])
    assert batch["a"].shape == (2, 3, 16, 16) and len(batch["name_b"]) == 2


def test_pairing_is_random_per_epoch_and_replayable(tmp_path):
    root = write_unpaired(tmp_path / "d", n_a=6, n_b=6)

    def pairs(ds, epoch):
        ds.set_epoch(epoch)
        return [(ds[i]["name_a"], ds[i]["name_b"]) for i in range(len(ds))]

    ds = UnpairedDataset(root, seed=3)
    first, second = pairs(ds, 0), pairs(ds, 1)
    assert first != second  # a new pairing each epoch
    assert sorted(a for a, _ in first) == sorted(p.name for p in ds.files["A"])  # each A image once per epoch
    assert sorted(b for _, b in first) == sorted(p.name for p in ds.files["B"])
    # a fresh data set (a resumed process) replays any epoch exactly, whatever was read before
    assert pairs(UnpairedDataset(root, seed=3), 1) == second
    assert pairs(UnpairedDataset(root, seed=4), 1) != second


def test_smaller_domain_cycles_through_a_permutation(tmp_path):
    ds = UnpairedDataset(write_unpaired(tmp_path / "d", n_a=7, n_b=3))
    names_b = [ds[i]["name_b"] for i in range(len(ds))]
    assert len(names_b) == 7 and sorted(names_b[:3]) == ["000.png", "001.png", "002.png"]
    assert names_b[3:6] == names_b[:3]


def test_all_problems_in_one_message(tmp_path):
    root = write_unpaired(tmp_path / "d")
    (root / "train_A" / "001.png").write_text("not an image")
    (root / "train_B" / "002.png").write_bytes((root / "train_B" / "002.png").read_bytes()[:40])
    (root / "fixed_prompt_b.txt").unlink()
    with pytest.raises(BadInputError) as info:
        UnpairedDataset(root)
    message = str(info.value)
    assert message.startswith("3 problems in the dataset")
    assert "train_A/001.png" in message and "train_B/002.png" in message and "fixed_prompt_b.txt is missing" in message
    assert info.value.exit_code == 2


def test_skip_bad_drops_bad_images_but_not_missing_parts(tmp_path, caplog):
    root = write_unpaired(tmp_path / "d")
    (root / "train_A" / "001.png").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        ds = UnpairedDataset(root, skip_bad=True)
    assert re.search(r"Skipped 1 of 8 images of the dataset .* \(train split\), 1 problem,", caplog.text)
    assert [p.name for p in ds.files["A"]] == ["000.png", "002.png", "003.png", "004.png"]
    (root / "fixed_prompt_a.txt").write_text("   \n")
    with pytest.raises(BadInputError, match="(?s)fixed_prompt_a.txt is empty.*No usable image is left"):
        UnpairedDataset(root, skip_bad=True)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda root: [p.unlink() for p in (root / "train_B").iterdir()], "folder train_B/ holds no images"),
        (lambda root: (root / "train_A").rename(root / "elsewhere"), "folder train_A/ is missing"),
        (lambda root: (root / "fixed_prompt_a.txt").write_bytes(b"\xff\xfe\x00"), "cannot be read as UTF-8"),
    ],
)
def test_structural_problems(tmp_path, damage, expected):
    root = write_unpaired(tmp_path / "d")
    damage(root)
    with pytest.raises(BadInputError) as info:
        UnpairedDataset(root)
    assert str(info.value).startswith("1 problem in the dataset") and expected in str(info.value)


def test_missing_folder_and_eval_images(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        UnpairedDataset(tmp_path / "nowhere")
    test = UnpairedDataset(write_unpaired(tmp_path / "d"), split="test")
    names = [name for name, _ in test.images("B")]
    assert names == ["000.png", "001.png"] and [n for n, _ in test.images("B", limit=1)] == ["000.png"]


def test_random_transform_differs_per_item_and_epoch_only_by_seed(tmp_path):
    root = write_unpaired(tmp_path / "d", size=40)
    ds = UnpairedDataset(root, transform="resize_286_randomcrop_256x256_hflip", seed=1)
    ds.set_epoch(2)
    again = UnpairedDataset(root, transform="resize_286_randomcrop_256x256_hflip", seed=1)
    again.set_epoch(2)
    assert ds[3]["a"].shape == (3, 256, 256) and torch.equal(ds[3]["a"], again[3]["a"])


def test_an_image_size_the_model_cannot_take_is_a_problem_of_that_image(tmp_path):
    root = write_unpaired(tmp_path / "d")
    Image.new("RGB", (20, 16)).save(root / "train_B" / "001.png")
    with pytest.raises(
        BadInputError,
        match=r"train_B/001.png is 20x16: training needs sides that are multiples of 8"
        r".* such as resize_512 \(--transform\)",
    ):
        UnpairedDataset(root, transform="no_resize")
    Image.new("RGB", (20, 16)).save(root / "test_A" / "009.png")  # the test split's transform is --eval-transform's
    with pytest.raises(BadInputError, match=r"test_A/009.png is 20x16: .* \(--eval-transform\)"):
        UnpairedDataset(root, "test", transform="no_resize", skip_bad=False)
    data = UnpairedDataset(root, transform="no_resize", skip_bad=True)
    assert len(data.files["B"]) == 2 and data.sizes == {(16, 16)}
