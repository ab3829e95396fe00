import logging
import warnings

import numpy as np
import pytest
import torch
from conftest import make_generator
from PIL import Image

import turbo_i2i.pipeline as pipeline
from turbo_i2i import preprocess as pre
from turbo_i2i.checkpoints import save_pretrained
from turbo_i2i.errors import BadInputError
from turbo_i2i.pipeline import Translator


@pytest.fixture(scope="module")
def translator(tiny_model_dir):
    return Translator.from_pretrained(tiny_model_dir)


def picture(w=37, h=29, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_output_is_rgb_at_the_input_size(translator):
    out = translator(picture(37, 29), prompt="a blue square on a red background")
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (37, 29)
    assert np.asarray(out).std() > 0


def test_inputs_as_path_pil_tensor_and_batch_agree(translator, tmp_path):
    image = picture(32, 32)
    image.save(tmp_path / "in.png")
    tensor = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255
    outs = [translator(x) for x in (image, tmp_path / "in.png", str(tmp_path / "in.png"), tensor)]
    arrays = [np.asarray(o) for o in outs]
    assert all(np.array_equal(arrays[0], a) for a in arrays[1:])
    batch = translator([image, picture(32, 32, seed=1), picture(24, 40)])
    assert [b.size for b in batch] == [(32, 32), (32, 32), (24, 40)]
    assert np.abs(np.asarray(batch[0], dtype=int) - arrays[0]).max() <= 1  # batched == alone, up to rounding


def test_prompt_is_encoded_once_and_changes_the_output(translator, monkeypatch):
    calls = []
    real = pipeline.encode_prompt
    monkeypatch.setattr(pipeline, "encode_prompt", lambda *a: calls.append(a[2]) or real(*a))
    image = picture(32, 32)
    first = translator(image, prompt="a cyan circle on a pink background")
    translator(image, prompt="a cyan circle on a pink background")
    other = translator(image, prompt="a green triangle on a white background")
    assert calls == [["a cyan circle on a pink background"], ["a green triangle on a white background"]]
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_default_prompt_and_bad_prompts(translator, caplog, monkeypatch):
    image = picture(32, 32)
    assert np.array_equal(
        np.asarray(translator(image)), np.asarray(translator(image, prompt="a red circle on a blue background"))
    )
    for empty in ("", "   "):
        with pytest.raises(BadInputError, match="empty"):
            translator(image, prompt=empty)
    import transformers.tokenization_utils_base as tokenization

    translator.tokenizer.deprecation_warnings.clear()  # transformers says its note once per tokenizer
    theirs = []
    monkeypatch.setattr(tokenization.logger, "warning", lambda message, *args: theirs.append(message))
    with caplog.at_level(logging.WARNING, logger="turbo_i2i"):
        translator(image, prompt="red " * 100)
    assert "longer than 77 tokens" in caplog.text
    assert not theirs  # transformers' note ("will result in indexing errors") beside ours was wrong: ids are cut
    with pytest.raises(BadInputError, match="2 prompts for 1 images"):
        translator([image], prompt=["a", "b"])
    tensor = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)  # 0-255 bytes: would be clamped to black/white
    with pytest.raises(BadInputError, match="floats in \\[0, 1\\], not torch.uint8: divide by 255"):
        translator(tensor)
    for bad in (0, 1.5, True):  # 0 or -1 used to return [None]; 1.5 was a TypeError from range()
        with pytest.raises(BadInputError, match=f"batch_size must be a whole number, at least 1, got {bad!r}"):
            translator([image], batch_size=bad)
    floats = tensor.float() / 255
    for values, hint in (
        (floats * 255, "up to 255: divide by 255"),
        (floats * 2.2 - 1.1, r"down to -1.1: map \[-1, 1\] with \(x \+ 1\) / 2"),  # [-1, 1] with some ringing
    ):
        with pytest.raises(BadInputError, match=f"must hold values in \\[0, 1\\], got values {hint}"):
            translator(values)  # was clipped silently to a nearly white (or black) picture
    with pytest.raises(BadInputError, match="NaN or infinite"):
        translator(torch.full_like(floats, float("nan")))
    ringing = floats * 1.8 - 0.4  # a resampler's overshoot (bicubic reaches about -0.4 .. 1.4) is clamped, as before
    assert np.array_equal(np.asarray(translator(ringing)), np.asarray(translator(ringing.clamp(0, 1))))
    with pytest.raises(BadInputError, match="has no pixels"):
        translator(torch.rand(3, 0, 32))  # was a RuntimeError from min() of nothing
    with pytest.raises(BadInputError, match=r"one image \(3, H, W\) or a batch .* got shape \(32, 32\)"):
        translator(floats[0])  # a grey-level plane used to be named as 32 one-dimensional images
    with pytest.raises(BadInputError, match="between -9223372036854775808 and 18446744073709551615"):
        translator(image, seed=10**20)
    with pytest.raises(BadInputError, match="prompt must be a string or a list of strings, got int"):
        translator(image, prompt=5)
    with pytest.raises(BadInputError, match="A prompt must be a string, got int"):
        translator([image], prompt=[5])


def test_model_without_default_prompt_asks_for_one(tmp_path):
    generator, _ = make_generator()
    translator = Translator.from_pretrained(save_pretrained(generator, tmp_path / "m"))
    with pytest.raises(BadInputError, match="no default prompt"):
        translator(picture())


def test_edges_are_extracted_as_asked(translator):
    image = picture(40, 40)
    via_option = translator(image, edges="canny", canny_thresholds=(50, 150))
    by_hand = translator(pre.canny(image, 50, 150), edges=None)
    assert np.array_equal(np.asarray(via_option), np.asarray(by_hand))
    with pytest.raises(BadInputError, match="thresholds"):
        translator(image, edges="canny", canny_thresholds=(200, 100))
    # "none", as the command line spells it, is None (the message listed "none" and refused it)
    assert np.array_equal(np.asarray(translator(pre.canny(image, 50, 150), edges="none")), np.asarray(by_hand))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(tile_size=128.0), r"tile_size must be a multiple of 8 and at least 128, got 128\.0"),
        (dict(tile_size="128"), r"tile_size must be .* got '128'"),
        (dict(tile_size=True), r"tile_size must be .* got True"),
        (dict(edges="canny", canny_thresholds="100,200"), r"canny_thresholds must be \(low, high\), got '100,200'"),
        (dict(edges="canny", canny_thresholds=(100,)), r"canny_thresholds must be \(low, high\)"),
        (dict(sample_posterior="no"), "sample_posterior must be True or False, got 'no'"),
    ],
)
def test_arguments_of_the_wrong_type_are_bad_input_naming_them(translator, options, message):
    """Each was a TypeError from deep inside (or, for "no", silently True)."""
    with pytest.raises(BadInputError, match=message):
        translator(picture(40, 40), **options)


def test_stochastic_model_seed_and_r(tmp_path):
    generator, _ = make_generator(stochastic=True, trained_seed=2, prompts={"a2b": "a sketch"}, default_r=0.4)
    translator = Translator.from_pretrained(save_pretrained(generator, tmp_path / "s"))
    image = picture(32, 32)
    a, b, c = (np.asarray(translator(image, seed=s)) for s in (5, 5, 6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    faithful = np.asarray(translator(image, r=1.0, seed=5))
    assert not np.array_equal(a, faithful)
    assert np.array_equal(faithful, np.asarray(translator(image, r=1.0, seed=99)))  # r = 1 uses no noise
    for bad, message in (("0.5", r"r must be a number in \[0, 1\], got '0.5' \(str\)"), (True, "got True"),
                         (float("nan"), r"r must be in \[0, 1\], got nan"), (1.5, "got 1.5")):  # fmt: skip
        with pytest.raises(BadInputError, match=message):
            translator(image, r=bad)
    assert np.array_equal(np.asarray(translator(image, r=np.float32(0.4), seed=5)), a)  # numpy numbers are numbers


@pytest.mark.parametrize("sample_posterior", [False, True])
def test_a_seeded_images_result_does_not_depend_on_its_batch(tmp_path, sample_posterior):
    """Each image draws its noise (and posterior sample) from the seed alone: the same result alone, second in a
    list, in a batch of one or of three, and three copies of one image come out alike (each drew another noise map
    from one shared generator before)."""
    generator, _ = make_generator(stochastic=True, trained_seed=2, prompts={"a2b": "a sketch"}, default_r=0.4)
    translator = Translator.from_pretrained(save_pretrained(generator, tmp_path / "s"))
    a, b = picture(32, 32), picture(32, 32).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    options = dict(seed=3, sample_posterior=sample_posterior)
    alone = np.asarray(translator(b, **options), dtype=int)
    for batch_size in (1, 3):
        outputs = translator([a, b, b, b], batch_size=batch_size, **options)
        for out in outputs[1:]:  # batched convolutions may round a pixel by one level
            assert np.abs(np.asarray(out, dtype=int) - alone).max() <= 1, batch_size
    other_seed = np.asarray(translator(b, seed=4, sample_posterior=sample_posterior), dtype=int)
    assert np.abs(other_seed - alone).mean() > 5


def test_unpaired_directions(tmp_path):
    generator, _ = make_generator("unpaired", trained_seed=4, prompts={"a2b": "night", "b2a": "day"})
    translator = Translator.from_pretrained(save_pretrained(generator, tmp_path / "u"))
    image = picture(32, 32)
    assert not np.array_equal(np.asarray(translator(image)), np.asarray(translator(image, direction="b2a")))
    with pytest.raises(BadInputError, match="direction"):
        translator(image, direction="sideways")


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(BadInputError, match="demo-circles.*edge_to_image"):
        Translator.from_pretrained("no-such-model")


def test_a_named_model_offline_names_every_missing_download(tmp_path, monkeypatch):
    """The message named the .pkl only; a user who fetched it then met the missing backbone on the next try."""
    from turbo_i2i.errors import TurboI2IError

    monkeypatch.setenv("TURBO_I2I_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TurboI2IError) as caught:
        Translator.from_pretrained("day_to_night")
    message = str(caught.value)
    assert "day2night.pkl is not in the cache" in message and f"place it at {tmp_path / 'day2night.pkl'}" in message
    assert f"stabilityai/sd-turbo, which is not in the Hugging Face cache ({tmp_path / 'hub'})" in message
    assert "hf download stabilityai/sd-turbo" in message


@pytest.mark.parametrize("answer", ["no such repository", "offline", "gated"])
def test_a_missing_folder_that_looks_like_a_hub_id_is_named_as_both(monkeypatch, answer):
    """ "runs/edges" (a folder that is not there) is also a valid hub id: when the hub says there is no such
    repository it is bad input (exit 2), and either message says no local folder has that name; a gated repository
    exists (exit 1: log in)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    from turbo_i2i.errors import TurboI2IError

    def hub(*args, **kwargs):
        if answer == "offline":
            raise LocalEntryNotFoundError("offline")
        kind = GatedRepoError if answer == "gated" else RepositoryNotFoundError
        refused = kind.__new__(kind)  # their own __init__ wants an HTTP response
        Exception.__init__(refused, "403" if answer == "gated" else "404")
        raise refused

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    expected = "runs/edges.*gated.*hf auth login" if answer == "gated" else "runs/edges.*no local folder"
    with pytest.raises(TurboI2IError, match=expected) as caught:
        Translator.from_pretrained("runs/edges")
    assert isinstance(caught.value, BadInputError) == (answer == "no such repository")


def test_gigapixel_header_is_refused_before_decoding(translator):
    with pytest.raises(BadInputError, match="pixels"):
        translator(Image.new("RGB", (5000, 5000)))
    small = Translator.from_pretrained("demo-circles", max_pixels=40 * 40)  # the limit is a loading option too
    assert small(picture(40, 40)).size == (40, 40)
    with pytest.raises(BadInputError, match="limit of 1600 pixels"):
        small(picture(41, 40))


def test_a_raised_pixel_limit_is_the_limit_of_the_size_the_model_runs_at(monkeypatch):
    # the run size was checked against the default limit: images a raised max_pixels admits (to tile them) failed
    # with "its aspect ratio is too extreme"; a spy, since such an image takes minutes even for the tiny model
    from turbo_i2i import preprocess

    limits, real = [], preprocess.model_size
    monkeypatch.setattr(preprocess, "model_size", lambda *a, **k: limits.append(k.get("max_pixels")) or real(*a, **k))
    big = Translator.from_pretrained("demo-circles", max_pixels=2**26)
    assert big(picture(32, 24)).size == (32, 24)
    assert limits and set(limits) == {2**26}


def test_one_pixel_image_comes_back_as_one_pixel(translator):
    out = translator(Image.new("RGB", (1, 1), (255, 255, 255)))
    assert out.size == (1, 1) and out.mode == "RGB"


@pytest.mark.parametrize("seed", [np.int64(3), torch.tensor(3), 3])
def test_integer_seeds_of_any_kind_give_the_same_image(translator, seed):
    # a numpy or torch integer used to hang: `x in range(-2**63, 2**64)` steps through the range for non-ints
    expected = translator(picture(32, 32), seed=3, sample_posterior=True)
    out = translator(picture(32, 32), seed=seed, sample_posterior=True)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    other = translator(picture(32, 32), seed=4, sample_posterior=True)
    assert not np.array_equal(np.asarray(other), np.asarray(expected))  # the seed matters here


@pytest.mark.parametrize("seed", [3.0, 1.5, True, "3"])
def test_a_seed_that_is_not_an_integer_is_refused(translator, seed):
    with pytest.raises(BadInputError, match="seed must be an integer"):
        translator(picture(32, 32), seed=seed)


def test_translate_folder_mirrors_the_tree_and_reports_instead_of_raising(translator, tmp_path):
    from turbo_i2i.folders import translate_folder

    src = tmp_path / "src"
    (src / "day").mkdir(parents=True)
    picture(32, 32).save(src / "a.png")
    picture(24, 40, seed=1).save(src / "day" / "b.jpg")
    picture(32, 32, seed=2).save(src / "day" / "b.png")  # the same output as b.jpg: reported, neither overwrites
    (src / "broken.png").write_text("not a picture")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"kept")
    result = translate_folder(translator, src, tmp_path / "out", batch_size=2, progress=False, seed=0)
    assert result.inputs == 4 and result.translated == [tmp_path / "out" / "day" / "b.png"]
    assert result.skipped == [tmp_path / "out" / "a.png"] and (tmp_path / "out" / "a.png").read_bytes() == b"kept"
    assert len(result.failed) == 2 and "broken.png" in result.failed[0] and "same output file" in result.failed[1]
    alone = translator(src / "day" / "b.jpg", seed=0)  # batched like this, the same picture as one call gives
    written = Image.open(tmp_path / "out" / "day" / "b.png")
    assert written.size == (24, 40) and np.abs(np.asarray(written, dtype=int) - np.asarray(alone)).max() <= 1


def test_translate_folder_checks_its_options_once_before_reading_any_image(translator, tmp_path, monkeypatch):
    from turbo_i2i import preprocess
    from turbo_i2i.folders import translate_folder

    (tmp_path / "src").mkdir()
    for i in range(3):
        picture(32, 32, seed=i).save(tmp_path / "src" / f"{i}.png")
    monkeypatch.setattr(preprocess, "load_image", lambda *a, **k: pytest.fail("read an image"))
    for options, message in (
        (dict(batch_size=0), "batch_size must be a whole number"),  # 0 used to gather the whole folder in memory
        (dict(direction="b2a"), "Unknown direction 'b2a'"),  # each image used to fail alone
        (dict(prompt=""), "prompt is empty"),
        (dict(tile_size=100), "multiple of 8"),
        (dict(captions={"0.png": "a", "1": "b"}), "1 of 3 file\\(s\\) have no caption in the captions given: 2.png"),
        (dict(captions={"0.png": "a", "1": "b", "2.png": ""}, prompt="c"), 'not non-empty text: 2.png \\(""\\)'),
    ):
        with pytest.raises(BadInputError, match=message):
            translate_folder(translator, tmp_path / "src", tmp_path / "out", progress=False, **options)
    with pytest.raises(BadInputError, match="is the input folder"):  # was "holds no images"
        translate_folder(translator, tmp_path / "src", tmp_path / "src" / ".", progress=False)
    assert not (tmp_path / "out").exists()


def test_arguments_of_the_wrong_kind_are_named_not_tracebacks(translator, tiny_model_dir):
    for bad, kind in ((None, "NoneType"), (5, "int"), (b"in.png", "bytes"), ({"a": 1}, "dict")):
        with pytest.raises(BadInputError, match=f"a tensor or a list of them, got a {kind}"):
            translator(bad)  # were TypeErrors, or "Image file 'a' does not exist" for the dict's key
    with pytest.raises(BadInputError, match=r"got shape \(2, 1, 32, 32\)"):  # named the batch's (1, 32, 32) items
        translator(torch.rand(2, 1, 32, 32))
    with pytest.raises(BadInputError, match="prompt must be a string or a list of strings, got bytes"):
        translator(picture(32, 32), prompt=b"a caption")  # was "Got 9 prompts for 1 images"
    graded = torch.rand(3, 32, 32, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warned about converting a tensor that requires grad
        assert translator(graded).size == (32, 32)
    for device, message in (("bogus", "'bogus' is not a torch device"), ("cuda:64", "this machine has")):
        with pytest.raises(BadInputError, match=message):
            Translator.from_pretrained(tiny_model_dir, device=device)  # were PyTorch RuntimeErrors
    with pytest.raises(BadInputError, match="floating-point torch dtype"):
        Translator.from_pretrained(tiny_model_dir, dtype=torch.int8)
    assert Translator.from_pretrained(tiny_model_dir, dtype="float32").dtype == torch.float32  # a name is taken
