"""The demo in a real browser: Debian's Chromium, driven by Playwright, against the app served on 127.0.0.1 with the
built-in ``demo-circles`` model. A missing browser or Playwright is a failure with the fix in the message, not a
skip: this is the only test that the page itself works.
"""

from __future__ import annotations

import io
import math
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from turbo_i2i.training.circles import COLOURS

CHROMIUM = os.environ.get("TURBO_I2I_CHROMIUM", "/usr/bin/chromium")
PROMPT = "a red circle on a blue background"
TIMEOUT_MS = 30_000
KNOWN_GAP = (
    "the shipped demo-circles model fills the drawn shape but has not learned the prompted colours yet (README 'The"
    " built-in model'); strict, so this fails once the model is retrained and the marker gets removed then"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    try:
        from turbo_i2i.demo.app import launch_app

        app = launch_app(port=_free_port(), block=False)
    except ImportError as error:
        pytest.fail(f"the demo needs Gradio ({error}); install it with: pip install -e '.[demo]'")
    yield app.local_url
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


def draw_circle(page, cx, cy, radius, segments=24):
    # Each pointer move repaints the editor's WebGL canvas in software (~0.1 s here), so a 24-gon, not a smooth path.
    page.mouse.move(cx + radius, cy)
    page.mouse.down()
    for k in range(1, segments + 1):
        angle = 2 * math.pi * k / segments
        page.mouse.move(cx + radius * math.cos(angle), cy + radius * math.sin(angle))
    page.mouse.up()


def download_output(page, path: Path) -> Image.Image:
    with page.expect_download(timeout=TIMEOUT_MS) as download:
        page.locator("#output").get_by_label("Download").first.click()
    download.value.save_as(path)
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def drawn(server, browser, tmp_path_factory):
    """Draw a circle, type the prompt, press Run; return the downloaded output and where the circle was drawn."""
    out_dir = tmp_path_factory.mktemp("demo-browser")
    page = open_demo(browser, server, live=False)
    cx, cy, zoom = canvas_geometry(page)
    radius_canvas = 150  # canvas pixels (the canvas is 512 x 512): a circle of radius ~19 px at the model's 64 px
    draw_circle(page, cx, cy, radius_canvas * zoom)
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
    output = download_output(page, out_dir / "output.png")
    page.close()
    return output, screenshot


def regions(output: Image.Image, radius_canvas=150):
    """Mean colour well inside the drawn circle and well outside it."""
    pixels = np.asarray(output, dtype=float)
    h, w = pixels.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    distance = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) * 512 / w
    return pixels[distance < 0.5 * radius_canvas].mean(0), pixels[distance > 1.4 * radius_canvas].mean(0)


def test_drawn_circle_comes_back_filled(drawn, capsys):
    output, screenshot = drawn
    assert output.size == (512, 512)  # the canvas's size, though the model ran at 64 px
    inside, outside = regions(output)
    with capsys.disabled():
        print(
            f"\ndemo screenshot: {screenshot}\ncentre colour {inside.round().astype(int).tolist()} (prompted red"
            f" {list(COLOURS['red'])}), outside {outside.round().astype(int).tolist()} (prompted blue"
            f" {list(COLOURS['blue'])})"
        )
    assert screenshot.is_file() and Image.open(screenshot).size[0] >= 1000
    # the model fills the drawn shape: the centre stands apart from the background (measured ~24 levels of red)
    assert np.abs(inside - outside).max() > 8, (inside, outside)


@pytest.mark.xfail(strict=True, reason=KNOWN_GAP)
def test_centre_has_the_prompted_colour(drawn):
    inside, outside = regions(drawn[0])
    assert np.abs(inside - COLOURS["red"]).mean() < 40, inside
    assert np.abs(outside - COLOURS["blue"]).mean() < 40, outside


def test_live_mode_translates_each_stroke_without_run(server, browser):
    page = open_demo(browser, server, live=True)
    cx, cy, zoom = canvas_geometry(page)
    draw_circle(page, cx, cy, 150 * zoom)
    page.wait_for_selector("#output img", timeout=TIMEOUT_MS)
    first = page.get_attribute("#output img", "src")
    draw_circle(page, cx - 160 * zoom, cy - 160 * zoom, 60 * zoom)  # a second stroke: a small circle top left
    page.wait_for_function(
        "src => { const img = document.querySelector('#output img'); return img && img.src !== src; }",
        arg=first,
        timeout=TIMEOUT_MS,
    )
    image = Image.open(io.BytesIO(page.request.get(page.get_attribute("#output img", "src")).body())).convert("RGB")
    page.close()
    pixels = np.asarray(image, dtype=float)
    # the new shape shows where it was drawn: its centre differs from the same spot's surroundings far from any shape
    small = pixels[96 - 20 : 96 + 20, 96 - 20 : 96 + 20].reshape(-1, 3).mean(0)
    far = pixels[400:, :100].reshape(-1, 3).mean(0)
    assert image.size == (512, 512) and np.abs(small - far).max() > 4, (small, far)
