"""The demo in a real browser: Debian's Chromium, driven by Playwright, against the app served on 127.0.0.1 with the
built-in ``demo-circles`` model. A missing browser or Playwright is a failure with the fix in the message, not a
skip: this is the only test that the page itself works.

The app is served from this process with a backend that records each translation, so the test checks the whole
path: the stroke drawn with the mouse is the picture the app received, the typed prompt is the prompt it used, and
the image shown and downloaded is, pixel for pixel, the model's output for them.
"""

from __future__ import annotations

import io
import math
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from turbo_i2i.demo.core import DemoBackend, flatten_drawing
from turbo_i2i.training.circles import COLOURS

CHROMIUM = os.environ.get("TURBO_I2I_CHROMIUM", "/usr/bin/chromium")
PROMPT = "a red circle on a blue background"
TIMEOUT_MS = 30_000
SIDE = 512  # the canvas, in canvas pixels


class RecordingBackend(DemoBackend):
    """A ``DemoBackend`` that keeps what each drawing translation received and returned."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def translate_drawing(self, drawing, prompt, style="none", r=None, seed=0, model="demo-circles", folder=None,
                          direction=None):  # fmt: skip
        output = super().translate_drawing(drawing, prompt, style, r, seed, model, folder, direction)
        page = np.asarray(flatten_drawing(drawing))
        self.calls.append(dict(page=page, prompt=prompt, style=style, seed=seed, model=model, direction=direction,
                               output=output))  # fmt: skip
        return output

    def translate_upload(self, image, edges, low, high, prompt, style="none", r=None, seed=0, model="demo-circles",
                         folder=None, direction=None):  # fmt: skip
        condition, output = super().translate_upload(
            image, edges, low, high, prompt, style, r, seed, model, folder, direction
        )
        self.calls.append(dict(upload=np.asarray(image), edges=edges, low=low, high=high, prompt=prompt,
                               direction=direction, condition=condition, output=output))  # fmt: skip
        return condition, output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    backend = RecordingBackend()
    try:
        from turbo_i2i.demo.app import launch_app

        app = launch_app(port=_free_port(), block=False, backend=backend)
    except ImportError as error:
        pytest.fail(f"the demo needs Gradio ({error}); install it with: pip install -e '.[demo]'")
    yield app.local_url, backend
    app.close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing; install it with: pip install -e '.[demo]'")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium is missing at {CHROMIUM}; install it with: apt-get install -y chromium")
    with sync_playwright() as playwright:
        # Chromium's sandbox refuses to run as root (CI here is root); the page is our own app on 127.0.0.1.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield browser
        browser.close()


def open_demo(browser, url, live: bool):
    page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    page.goto(url, timeout=TIMEOUT_MS)
    page.wait_for_selector("#status:has-text('loaded')", timeout=TIMEOUT_MS)  # the model is loaded on page load
    checkbox = page.locator("#live input[type=checkbox]")
    if checkbox.is_checked() != live:
        checkbox.click()
    page.get_by_label("Brush").first.click()
    return page


def canvas_geometry(page):
    """(screen x, screen y) of the canvas centre and the zoom (screen px per canvas px) the editor shows."""
    box = page.locator("#canvas canvas").first.bounding_box()
    zoom = int(re.search(r"(\d+)%", page.locator("#canvas").inner_text()).group(1)) / 100
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, zoom


def draw_circle(page, centre, radius, segments=24):
    """Drag the mouse around a circle given in canvas pixels."""
    cx, cy, zoom = canvas_geometry(page)
    x0, y0 = cx + (centre[0] - SIDE / 2) * zoom, cy + (centre[1] - SIDE / 2) * zoom
    # Each pointer move repaints the editor's WebGL canvas in software (~0.1 s here), so a 24-gon, not a smooth path.
    page.mouse.move(x0 + radius * zoom, y0)
    page.mouse.down()
    for k in range(1, segments + 1):
        angle = 2 * math.pi * k / segments
        page.mouse.move(x0 + radius * zoom * math.cos(angle), y0 + radius * zoom * math.sin(angle))
    page.mouse.up()


def stroke_is_on_circle(page: np.ndarray, centre, radius) -> bool:
    """A dark stroke runs all the way round the circle (within a brush width) and the inside is blank."""
    dark = page.min(axis=2) < 128
    yy, xx = np.mgrid[: page.shape[0], : page.shape[1]]
    distance = np.hypot(xx - centre[0], yy - centre[1])
    band = dark & (np.abs(distance - radius) < 25)
    angles = np.arctan2(yy[band] - centre[1], xx[band] - centre[0])
    sectors = np.unique(((angles + math.pi) / (2 * math.pi) * 36).astype(int) % 36)
    return len(sectors) == 36 and not dark[distance < radius - 25].any()


def regions(output: np.ndarray, centre=(SIDE / 2, SIDE / 2), radius=150):
    """Mean colour well inside the drawn circle and well outside it."""
    yy, xx = np.mgrid[: output.shape[0], : output.shape[1]]
    distance = np.hypot(xx - centre[0], yy - centre[1])
    pixels = output.astype(float)
    return pixels[distance < 0.5 * radius].mean(0), pixels[distance > 1.4 * radius].mean(0)


@pytest.fixture(scope="module")
def drawn(server, browser, tmp_path_factory):
    """Draw a circle, type the prompt, press Run; return the downloaded output, the screenshot and the app's record."""
    url, backend = server
    out_dir = tmp_path_factory.mktemp("demo-browser")
    page = open_demo(browser, url, live=False)
    draw_circle(page, (SIDE / 2, SIDE / 2), 150)
    page.fill("#prompt textarea", PROMPT)
    # The editor hands its picture to the app about a second after a stroke ends (measured: a Run pressed 0.4 s
    # after the stroke saw an empty canvas, one pressed 2.5 s after saw the drawing), as it would for a person.
    page.wait_for_timeout(1500)
    for _ in range(3):
        page.click("#run")
        page.wait_for_selector("#output img, .toast-body", timeout=TIMEOUT_MS)
        if page.locator("#output img").count():
            break
        page.locator(".toast-body").first.wait_for(state="detached", timeout=TIMEOUT_MS)  # "canvas is empty": again
    page.wait_for_selector("#output img", timeout=TIMEOUT_MS)
    screenshot = out_dir / "demo.png"
    page.screenshot(path=screenshot, full_page=True)
    with page.expect_download(timeout=TIMEOUT_MS) as download:
        page.locator("#output").get_by_label("Download").first.click()
    download.value.save_as(out_dir / "output.png")
    page.close()
    output = np.asarray(Image.open(out_dir / "output.png").convert("RGB"))
    return output, screenshot, backend.calls[-1]


def test_drawn_circle_and_prompt_reach_the_model_and_its_output_comes_back(drawn, capsys):
    output, screenshot, call = drawn
    inside, outside = (c.round().astype(int).tolist() for c in regions(output))
    with capsys.disabled():
        print(
            f"\ndemo screenshot: {screenshot}\ncentre colour {inside} (prompted red {list(COLOURS['red'])}), outside"
            f" {outside} (prompted blue {list(COLOURS['blue'])})"
        )
    assert (call["prompt"], call["style"], call["seed"], call["model"], call["direction"]) == (
        PROMPT, "none", 0, "demo-circles", "a2b",  # the direction control's value reaches the backend too
    )  # fmt: skip
    assert call["page"].shape == (SIDE, SIDE, 3) and stroke_is_on_circle(call["page"], (SIDE / 2, SIDE / 2), 150)
    # the downloaded file is the model's output for that drawing and prompt, pixel for pixel, at the canvas's size
    assert output.shape == (SIDE, SIDE, 3) and np.array_equal(output, np.asarray(call["output"]))
    assert screenshot.is_file() and Image.open(screenshot).size == (1400, 1100)


def test_background_of_the_drawing_has_the_prompted_colour(drawn):
    _, outside = regions(drawn[0])
    assert np.abs(outside - COLOURS["blue"]).mean() < 40, outside


def test_drawn_circle_is_filled_with_the_prompted_colour(drawn):
    inside, _ = regions(drawn[0])
    assert np.abs(inside - COLOURS["red"]).mean() < 40, inside


def test_live_mode_translates_each_stroke_without_run(server, browser):
    url, backend = server
    page = open_demo(browser, url, live=True)
    calls = len(backend.calls)
    draw_circle(page, (96, 96), 60)  # first stroke; Run is never pressed
    page.wait_for_selector("#output img", timeout=TIMEOUT_MS)
    first_src = page.get_attribute("#output img", "src")
    draw_circle(page, (SIDE / 2, SIDE / 2), 150)  # second stroke
    page.wait_for_function(
        "src => { const img = document.querySelector('#output img'); return img && img.src !== src; }",
        arg=first_src,
        timeout=TIMEOUT_MS,
    )
    # Strokes made while a translation runs end in one last translation of the final drawing: wait for it to show.
    deadline, shown = time.monotonic() + TIMEOUT_MS / 1000, None
    while time.monotonic() < deadline:
        src = page.get_attribute("#output img", "src")
        shown = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
        if np.array_equal(shown, np.asarray(backend.calls[-1]["output"])):
            break
        page.wait_for_timeout(300)
    page.close()
    last = backend.calls[-1]
    assert len(backend.calls) >= calls + 2  # at least one translation per stroke, none asked for with Run
    assert stroke_is_on_circle(last["page"], (96, 96), 60) and stroke_is_on_circle(
        last["page"], (SIDE / 2, SIDE / 2), 150
    )
    assert np.array_equal(shown, np.asarray(last["output"]))  # the page shows the latest drawing's translation


def test_upload_tab_shows_the_edge_map_and_translates_it(server, browser, tmp_path):
    from turbo_i2i.demo.core import upload_to_condition

    url, backend = server
    picture = np.zeros((96, 128, 3), np.uint8)
    picture[24:72, 40:88] = (250, 200, 40)  # a yellow square on black: its Canny edges are its outline
    Image.fromarray(picture).save(tmp_path / "square.png")
    expected = np.asarray(upload_to_condition(picture, "canny", 100, 200, side=64))
    page = open_demo(browser, url, live=False)
    page.get_by_role("tab", name="Upload").click()
    page.locator("#upload input[type=file]").set_input_files(tmp_path / "square.png")
    page.wait_for_selector("#edge-map img", timeout=TIMEOUT_MS)
    shown = np.asarray(Image.open(io.BytesIO(page.request.get(page.get_attribute("#edge-map img", "src")).body())))
    assert np.array_equal(shown[..., :3], expected)  # the edge map shown is the model input, at the model's 64 px
    page.fill("#prompt textarea", "a yellow square on a black background")
    page.click("#run-upload")
    page.wait_for_selector("#output img", timeout=TIMEOUT_MS)
    output = np.asarray(Image.open(io.BytesIO(page.request.get(page.get_attribute("#output img", "src")).body())))
    page.close()
    call = backend.calls[-1]
    assert call["prompt"] == "a yellow square on a black background" and (call["low"], call["high"]) == (100, 200)
    assert np.array_equal(call["upload"], picture) and np.array_equal(np.asarray(call["condition"]), expected)
    assert np.array_equal(output[..., :3], np.asarray(call["output"]))
