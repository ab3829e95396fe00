"""``turbo-i2i demo``: the Gradio app. Thin wiring only; the logic is in ``core`` and is tested without a browser."""

from __future__ import annotations

import random

from PIL import Image

from ..errors import TurboI2IError
from .core import STYLES, DemoBackend, model_choices

CANVAS_SIDE = 512
# The editor sizes its brush in screen pixels: at its default zoom (56 %) 12 px draws ~21 canvas pixels, ~2.7 px
# at 64 px, close to the 2 px outlines the built-in model was trained on.
BRUSH_SIZE = 12
MAX_SEED = 2**31 - 1
# Offline-friendly theme: system fonts, so the page never asks a font CDN for anything.
FONTS = {"font": ["ui-sans-serif", "system-ui", "sans-serif"], "font_mono": ["ui-monospace", "monospace"]}


def build_app(backend: DemoBackend | None = None, model: str = "demo-circles"):
    """Build the demo's Gradio Blocks.

    Args:
        backend: the shared translators (a new ``DemoBackend`` on the CPU when None).
        model: the model picked when the page opens.

    Returns:
        a ``gradio.Blocks`` (call ``launch_app`` or ``.launch`` on it).
    """
    import gradio as gr

    backend = backend or DemoBackend()
    choices = model_choices()
    names = [c.ref for c in choices]
    if model not in names:
        names.append(model)

    def guarded(fn):
        # Gradio shows gr.Error as a toast; our errors carry a message meant for the user.
        def call(*args):
            try:
                return fn(*args)
            except TurboI2IError as error:
                raise gr.Error(str(error)) from error

        return call

    @guarded
    def on_model(name, folder):
        ref = backend.resolve(name, folder)
        picked = next((c for c in choices if c.ref == ref), None)
        if picked is not None and not picked.available:
            return (
                f"**{ref}** is unavailable here: {picked.reason}.",
                gr.update(interactive=False),
                gr.update(value=False),
                gr.update(interactive=False),
            )
        translator = backend.translator(ref)
        fast = backend.is_fast(ref)
        stochastic = translator.config.stochastic
        note = "translating on every stroke" if fast else "too slow for every stroke: press Run"
        status = f"**{ref}** loaded ({backend.native_side(ref)} px, {note})."
        r = gr.update(interactive=stochastic, value=translator.config.default_r if stochastic else 1.0)
        unpaired = len(translator.config.directions) > 1
        direction = gr.update(interactive=unpaired, value=translator.config.default_direction)
        return status, r, gr.update(value=fast), direction

    @guarded
    def run_drawing(drawing, prompt, style, r, seed, name, folder, direction):
        return backend.translate_drawing(drawing, prompt, style, r, seed, name, folder, direction)

    def live_drawing(drawing, prompt, style, r, seed, name, folder, direction, live):
        if not live or drawing is None or _blank(drawing):
            return gr.skip()
        return run_drawing(drawing, prompt, style, r, seed, name, folder, direction)

    @guarded
    def show_edges(image, edges, low, high, name, folder):
        if image is None:
            return None
        from .core import upload_to_condition

        return upload_to_condition(image, edges, low, high, backend.native_side(backend.resolve(name, folder)))

    @guarded
    def run_upload(image, edges, low, high, prompt, style, r, seed, name, folder, direction):
        return backend.translate_upload(image, edges, low, high, prompt, style, r, seed, name, folder, direction)

    with gr.Blocks(title="turbo-i2i demo", analytics_enabled=False) as app:
        gr.Markdown("# turbo-i2i: one-step image translation\nDraw or upload, describe the picture, get it back.")
        with gr.Row():
            with gr.Column():
                with gr.Tabs():
                    with gr.Tab("Sketch", id="sketch"):
                        canvas = gr.ImageEditor(
                            label="canvas", elem_id="canvas", type="pil", image_mode="RGBA",
                            canvas_size=(CANVAS_SIDE, CANVAS_SIDE), fixed_canvas=True, sources=(), transforms=(),
                            layers=False, brush=gr.Brush(default_size=BRUSH_SIZE, colors=["#000000"],
                                                         color_mode="fixed"),
                            eraser=gr.Eraser(default_size=3 * BRUSH_SIZE), format="png",
                        )  # fmt: skip
                        run = gr.Button("Run", variant="primary", elem_id="run")
                    with gr.Tab("Upload", id="upload"):
                        # image_mode None: the picture as stored (Gradio's default "RGB" clips 16-bit ones to white
                        # before the backend sees them; core scales them)
                        upload = gr.Image(
                            label="picture", type="pil", sources=["upload", "clipboard"], elem_id="upload",
                            image_mode=None,
                        )  # fmt: skip
                        edges = gr.Radio(["canny", "none"], value="canny", label="edge extraction")
                        low = gr.Slider(0, 255, value=100, step=1, label="Canny low threshold")
                        high = gr.Slider(0, 255, value=200, step=1, label="Canny high threshold")
                        edge_map = gr.Image(
                            label="model input (edge map)", type="pil", interactive=False, format="png",
                            elem_id="edge-map",
                        )  # fmt: skip
                        run_up = gr.Button("Translate upload", variant="primary", elem_id="run-upload")
                prompt = gr.Textbox(label="prompt", elem_id="prompt", placeholder="blank: the model's default")
                style = gr.Dropdown(list(STYLES), value="none", label="style")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed", minimum=0, maximum=MAX_SEED)
                    new_seed = gr.Button("new seed", elem_id="new-seed")
                r = gr.Slider(0, 1, value=1.0, step=0.05, label="r (stochastic models: faithfulness)")
                direction = gr.Radio(
                    ["a2b", "b2a"], value="a2b", label="direction (unpaired models)", interactive=False,
                    elem_id="direction",
                )  # fmt: skip
            with gr.Column():
                model = gr.Dropdown(
                    [(c.label, c.ref) for c in choices] + ([] if model in (c.ref for c in choices) else [model]),
                    value=model, label="model", elem_id="model",
                )  # fmt: skip
                folder = gr.Textbox(label="or a local model folder", placeholder="/path/to/model (wins when set)")
                status = gr.Markdown(elem_id="status")
                live = gr.Checkbox(value=True, label="translate on every stroke", elem_id="live")
                output = gr.Image(
                    label="output", elem_id="output", type="pil", format="png", interactive=False,
                    buttons=["download"],
                )  # fmt: skip

        drawing_inputs = [canvas, prompt, style, r, seed, model, folder, direction]
        # One translation at a time for the whole app (they share the model), and per user only the latest
        # request runs: strokes made while one runs collapse into a single follow-up.
        queue = dict(concurrency_limit=1, concurrency_id="translate", trigger_mode="always_last")
        canvas.change(live_drawing, [*drawing_inputs, live], output, show_progress="hidden", **queue)
        run.click(run_drawing, drawing_inputs, output, **queue)
        prompt.submit(run_drawing, drawing_inputs, output, **queue)
        new_seed.click(lambda: random.randint(0, MAX_SEED), None, seed).then(
            live_drawing, [*drawing_inputs, live], output, **queue
        )
        edge_inputs = [upload, edges, low, high, model, folder]
        for trigger in (upload.change, edges.change, low.release, high.release):
            trigger(show_edges, edge_inputs, edge_map, show_progress="hidden")
        run_up.click(run_upload, [upload, edges, low, high, prompt, style, r, seed, model, folder, direction],
                     [edge_map, output], **queue)  # fmt: skip
        for trigger in (model.change, folder.submit, app.load):
            trigger(on_model, [model, folder], [status, r, live, direction])
    return app


def _blank(drawing) -> bool:
    """True for an empty canvas (no stroke yet), which is not worth a translation."""
    image = drawing.get("composite") if isinstance(drawing, dict) else drawing
    if image is None:
        return True
    return isinstance(image, Image.Image) and image.getbbox() is None and image.mode == "RGBA"


def launch_app(
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    model: str = "demo-circles",
    device=None,
    dtype=None,
    block: bool = True,
    backend: DemoBackend | None = None,
):
    """Serve the demo.

    Args:
        host: interface to bind; 127.0.0.1 (this machine only) unless asked otherwise.
        port: TCP port (Gradio picks a free one from 7860 when None).
        share: also open a public Gradio share link (never by default).
        model: the model picked when the page opens.
        device: torch device for the models.
        dtype: weight dtype.
        block: serve until interrupted; False returns once the server is up.
        backend: the translators to serve (a new ``DemoBackend`` on ``device`` / ``dtype`` when None).

    Returns:
        the served ``gradio.Blocks`` (its ``local_url`` is the address; ``close()`` stops it).
    """
    import gradio as gr

    app = build_app(backend or DemoBackend(device=device, dtype=dtype), model=model)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block,
        theme=gr.themes.Default(**FONTS), footer_links=[],
    )  # fmt: skip
    return app
