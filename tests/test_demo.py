"""The demo's logic without a browser: drawing -> model input, styles, the model picker, shared translators, and
concurrent users who each get their own prompt's result."""

import threading

import cv2
import numpy as np
import pytest
from conftest import make_generator
from PIL import Image

from turbo_i2i.checkpoints import save_pretrained
from turbo_i2i.demo import core
from turbo_i2i.demo.core import DemoBackend, drawing_to_condition, model_choices, styled_prompt, upload_to_condition
from turbo_i2i.errors import BadInputError
from turbo_i2i.pipeline import Translator


def circle_drawing(side=512, radius=150, width=12, transparent=True):
    """A black circle outline on a blank canvas, as the sketch widget returns it (RGBA, transparent page)."""
    rgba = np.zeros((side, side, 4), np.uint8)
    if not transparent:
        rgba[:] = 255
    cv2.circle(rgba, (side // 2, side // 2), radius, (0, 0, 0, 255), width)
    return Image.fromarray(rgba, "RGBA")


@pytest.fixture(scope="module")
def stochastic_dir(tmp_path_factory):
    generator, _ = make_generator(stochastic=True, trained_seed=2, prompts={"a2b": "a sketch"}, default_r=0.5)
    return str(save_pretrained(generator, tmp_path_factory.mktemp("models") / "tiny-stochastic"))


def test_styles_wrap_the_prompt_and_blank_means_default():
    assert styled_prompt("a cat", "none") == "a cat"
    assert styled_prompt("  a cat ", "photo") == core.STYLES["photo"].format(prompt="a cat")
    assert styled_prompt("", "photo") is None and styled_prompt(None, None) is None
    with pytest.raises(BadInputError, match="style"):
        styled_prompt("a cat", "cubism")


@pytest.mark.parametrize("transparent", [True, False])
def test_drawing_becomes_white_outlines_on_black_at_the_model_size(transparent):
    condition = drawing_to_condition(circle_drawing(transparent=transparent), side=64)
    pixels = np.asarray(condition)
    assert condition.size == (64, 64) and set(np.unique(pixels)) == {0, 255}
    # the 512 px circle of radius 150 is a 64 px circle of radius ~18.75: white on it, black at the centre and corners
    yy, xx = np.mgrid[:64, :64]
    distance = np.hypot(yy - 31.5, xx - 31.5)
    on_ring = np.abs(distance - 150 / 8) < 0.5
    assert pixels[on_ring].mean() > 200
    assert pixels[distance < 12].max() == 0 and pixels[distance > 24].max() == 0
    # a 12 px brush becomes a 1-2 px line, the outline width of the built-in model's training data
    assert 1 <= (pixels[32, 32:, 0] == 255).sum() <= 3


def test_empty_canvas_is_a_bad_input():
    with pytest.raises(BadInputError, match="empty"):
        drawing_to_condition({"composite": None, "layers": []}, side=64)


def test_upload_gives_its_canny_edge_map_at_the_model_size():
    picture = np.zeros((100, 200, 3), np.uint8)
    picture[:, 100:] = 255  # one vertical edge in the middle
    edges = np.asarray(upload_to_condition(picture, "canny", 100, 200, side=64))
    assert edges.shape == (32, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[:, 30:34].max() == 255 and edges[:, :25].max() == 0 and edges[:, 40:].max() == 0
    as_is = upload_to_condition(picture, "none", 100, 200, side=64)
    assert as_is.size == (64, 32) and np.asarray(as_is)[:, :25].max() == 0 and np.asarray(as_is)[:, 40:].min() == 255
    with pytest.raises(BadInputError, match="thresholds"):
        upload_to_condition(picture, "canny", 200, 100, side=64)


def test_a_sixteen_bit_upload_keeps_its_picture():
    """A 16-bit gray PNG (values up to 65535) was clipped at 255 by Pillow's convert: a white page, no edges."""
    ramp = np.tile(np.linspace(0, 65535, 200).astype(np.uint16), (100, 1))
    ramp[:, 100:] = 65535  # the right half white, the left half a ramp from black
    upload = Image.fromarray(ramp, "I;16")
    as_is = np.asarray(upload_to_condition(upload, "none", 100, 200, side=64), dtype=int)
    assert as_is[:, 0].max() < 10 and as_is[:, -1].min() == 255 and 60 < as_is[:, 16].mean() < 100


def test_a_seed_that_is_not_a_whole_number_is_named_not_cut(stochastic_dir):
    backend = DemoBackend()
    drawing = circle_drawing(side=64, radius=20, width=2)
    whole = backend.translate_drawing(drawing, "x", "none", 0.5, 3.0, "", stochastic_dir)  # Gradio sends floats
    assert np.array_equal(np.asarray(whole), np.asarray(backend.translate_drawing(drawing, "x", "none", 0.5, 3, "",
                                                                                   stochastic_dir)))  # fmt: skip
    for bad in (2.7, float("nan"), float("inf")):
        with pytest.raises(BadInputError, match="seed must be an integer"):
            backend.translate_drawing(drawing, "x", "none", 0.5, bad, "", stochastic_dir)


def test_form_values_a_browser_would_not_send_are_named(stochastic_dir):
    """The core functions are public: None or NaN thresholds, a text r, a float array in [0, 1] (cast to black) and a
    page too large to scale the result back to were TypeErrors, ValueErrors, a blank page or a 1.2 GB picture."""
    backend = DemoBackend()
    photo = np.zeros((40, 60, 3), np.uint8)
    for low in (None, float("nan")):
        with pytest.raises(BadInputError, match="Canny thresholds"):
            backend.translate_upload(photo, "canny", low, 200, "x")
    drawing = circle_drawing(side=64, radius=20, width=2)
    with pytest.raises(BadInputError, match=r"r must be a number in \[0, 1\], got 'abc'"):
        backend.translate_drawing(drawing, "x", "none", "abc", 0, "", stochastic_dir)
    with pytest.raises(BadInputError, match="8-bit values .* got float32"):
        backend.translate_drawing(np.asarray(drawing).astype(np.float32) / 255, "x")
    with pytest.raises(BadInputError, match="8-bit values .* got uint16"):
        backend.translate_drawing(np.asarray(drawing).astype(np.uint16) * 257, "x")
    as_int64 = backend.translate_drawing(np.asarray(drawing).astype(np.int64), "x")  # 0-255 in a wider type: fine
    assert np.array_equal(np.asarray(as_int64), np.asarray(backend.translate_drawing(drawing, "x")))
    with pytest.raises(BadInputError, match="The drawing is 5000x5000 .* more than the limit"):
        backend.translate_drawing(Image.new("L", (5000, 5000), 255), "x")


def test_model_picker_lists_every_named_model_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBO_I2I_CACHE", str(tmp_path))  # nothing downloaded
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # no backbone either
    choices = {c.ref: c for c in model_choices()}
    assert set(choices) == {"demo-circles", "edge_to_image", "sketch_to_image_stochastic", "day_to_night",
                            "night_to_day", "clear_to_rainy", "rainy_to_clear"}  # fmt: skip
    assert choices["demo-circles"].available and choices["demo-circles"].label == "demo-circles"
    day = choices["day_to_night"]
    missing = "needs a download of day2night.pkl and stabilityai/sd-turbo in the hub cache"
    assert not day.available and day.reason == missing  # the backbone is named too
    assert day.label == f"day_to_night (unavailable: {missing})"
    assert next(iter(model_choices())).ref == "demo-circles"  # available models come first
    (tmp_path / "day2night.pkl").write_bytes(b"downloaded")
    day = {c.ref: c for c in model_choices()}["day_to_night"]
    assert not day.available and day.reason == "needs stabilityai/sd-turbo in the hub cache"


def test_a_typed_folder_wins_and_a_missing_one_is_reported(tmp_path):
    assert DemoBackend.resolve("demo-circles", "") == "demo-circles"
    assert DemoBackend.resolve("demo-circles", str(tmp_path)) == str(tmp_path)
    with pytest.raises(BadInputError, match="does not exist"):
        DemoBackend.resolve("demo-circles", str(tmp_path / "nope"))


def test_translate_drawing_is_the_translator_on_the_condition(tmp_path):
    backend = DemoBackend()
    drawing = circle_drawing()
    out = backend.translate_drawing(drawing, "a red circle on a blue background", "none", None, 0, "demo-circles")
    assert out.size == drawing.size and out.mode == "RGB"
    translator = backend.translator("demo-circles")
    condition = drawing_to_condition(drawing, side=64)
    direct = translator(condition, prompt="a red circle on a blue background", edges=None, seed=0)
    expected = direct.resize(drawing.size, Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_translators_load_once_and_are_shared(tiny_model_dir, monkeypatch):
    loads = []
    original = Translator.from_pretrained

    def counting(ref, **kwargs):
        loads.append(ref)
        return original(ref, **kwargs)

    monkeypatch.setattr(Translator, "from_pretrained", counting)
    backend = DemoBackend()
    got = [None] * 6
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, backend.translator(str(tiny_model_dir))))
               for i in range(6)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [str(tiny_model_dir)] and all(g is got[0] for g in got)


def test_least_recently_used_model_is_dropped(tiny_model_dir, stochastic_dir):
    backend = DemoBackend(max_models=1)
    first = backend.translator(str(tiny_model_dir))
    backend.translator(stochastic_dir)
    assert backend.translator(str(tiny_model_dir)) is not first  # reloaded: only one model is kept


def test_live_mode_follows_the_measured_speed(tiny_model_dir, monkeypatch):
    backend = DemoBackend()
    monkeypatch.setattr(core, "LIVE_MAX_SECONDS", 1e9)
    assert backend.is_fast(str(tiny_model_dir)) is True
    seconds = backend._seconds[str(tiny_model_dir)]
    assert 0 < seconds < 1e9
    monkeypatch.setattr(core, "LIVE_MAX_SECONDS", seconds / 2)
    assert backend.is_fast(str(tiny_model_dir)) is False  # timed once, compared with the current limit


def test_a_model_without_a_default_caption_is_timed_too(tmp_path):
    """The official edge and sketch models have no default caption: picking one times it with a placeholder (it
    used to raise "no default prompt", so the page showed an error and kept the previous model's r)."""
    generator, _ = make_generator(stochastic=True, trained_seed=2, default_r=0.4)
    ref = str(save_pretrained(generator, tmp_path / "no-caption"))
    backend = DemoBackend()
    assert backend.translator(ref).config.prompts == {}
    assert backend.is_fast(ref) in (True, False) and backend._seconds[ref] > 0


def test_concurrent_users_each_get_their_own_prompt_r_and_seed(stochastic_dir):
    """Eight users at once on one shared stochastic model, each with its own prompt, r and seed, get exactly what
    each would get alone: the Translator takes them per call and runs one call at a time."""
    backend = DemoBackend()
    drawing = circle_drawing(side=128, radius=40, width=4)
    jobs = [(f"a sketch of shape number {i}", 0.3 + 0.05 * i, 100 + i) for i in range(8)]
    alone = [np.asarray(backend.translate_drawing(drawing, p, "none", r, s, "", stochastic_dir), dtype=int)
             for p, r, s in jobs]  # fmt: skip
    for i in range(8):
        for j in range(i):
            assert np.abs(alone[i] - alone[j]).mean() > 1, (i, j)  # every job's result is told apart from the others
    results = [None] * 8
    barrier = threading.Barrier(8)

    def user(i):
        barrier.wait()  # all eight calls start together
        prompt, r, seed = jobs[i]
        results[i] = np.asarray(backend.translate_drawing(drawing, prompt, "none", r, seed, "", stochastic_dir))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert results[i] is not None and np.abs(results[i].astype(int) - alone[i]).max() <= 1, i


def test_an_unpaired_model_runs_the_direction_asked(tmp_path):
    """The demo always ran an unpaired model's default direction (no control for it)."""
    generator, _ = make_generator("unpaired", trained_seed=4, prompts={"a2b": "night", "b2a": "day"})
    folder = str(save_pretrained(generator, tmp_path / "unpaired"))
    backend = DemoBackend()
    photo = np.asarray(Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)))
    translator = Translator.from_pretrained(folder)
    results = {}
    for direction in ("a2b", "b2a"):
        condition, out = backend.translate_upload(photo, "none", 100, 200, "", "none", None, 0, "", folder, direction)
        expected = translator(condition, direction=direction, edges=None)
        assert np.array_equal(np.asarray(out), np.asarray(expected)), direction
        results[direction] = np.asarray(out, dtype=int)
    assert np.abs(results["a2b"] - results["b2a"]).mean() > 1
    default = backend.translate_upload(photo, "none", 100, 200, "", "none", None, 0, "", folder)[1]
    assert np.array_equal(np.asarray(default), results["a2b"])


def test_r_is_ignored_by_deterministic_models(tiny_model_dir):
    backend = DemoBackend()
    drawing = circle_drawing(side=64, radius=20, width=2)
    a = backend.translate_drawing(drawing, "x", "none", None, 0, "", str(tiny_model_dir))
    b = backend.translate_drawing(drawing, "x", "none", 0.3, 5, "", str(tiny_model_dir))
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_demo_command_serves_locally_unless_share_is_asked(monkeypatch):
    from turbo_i2i import cli
    from turbo_i2i.demo import app

    calls = []
    monkeypatch.setattr(app, "launch_app", lambda **kwargs: calls.append(kwargs))
    assert cli.main(["demo"]) == 0
    assert cli.main(["demo", "--share", "--port", "8123", "--model", "edge_to_image"]) == 0
    assert calls[0]["host"] == "127.0.0.1" and calls[0]["share"] is False and calls[0]["port"] is None
    assert calls[0]["model"] == "demo-circles"
    assert calls[1]["share"] is True and calls[1]["port"] == 8123 and calls[1]["model"] == "edge_to_image"


def test_demo_command_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from turbo_i2i import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert cli.main(["demo"]) == 1
    assert "pip install 'turbo-i2i[demo]'" in capsys.readouterr().err


def test_the_app_builds_with_every_control():
    import gradio as gr

    from turbo_i2i.demo.app import build_app

    blocks = build_app(DemoBackend())
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert {"canvas", "run", "prompt", "output", "model", "new-seed", "live", "direction"} <= ids
    labels = {getattr(b, "label", None) for b in blocks.blocks.values()}
    assert {"seed", "style", "r (stochastic models: faithfulness)", "Canny low threshold", "Canny high threshold",
            "model input (edge map)", "or a local model folder"} <= labels  # fmt: skip
    canvas = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "canvas")
    assert isinstance(canvas, gr.ImageEditor) and canvas.brush.colors == ["#000000"]


def test_a_sixteen_bit_upload_reaches_the_backend_as_stored(tmp_path):
    """Gradio's Image converted uploads to RGB (a 16-bit PNG clipped to white) before the backend saw them."""
    from gradio.data_classes import ImageData

    from turbo_i2i.demo.app import build_app

    ramp = np.tile(np.linspace(0, 65535, 200).astype(np.uint16), (100, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    blocks = build_app(DemoBackend())
    upload = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "upload")
    received = upload.preprocess(ImageData(path=str(tmp_path / "ramp.png")))
    condition = np.asarray(upload_to_condition(received, "none", 100, 200, side=64), dtype=int)
    assert 110 < condition.mean() < 145 and condition[:, 0].max() < 10  # a ramp from black, not a white page
