"""The web demo: draw or upload, get a translated picture (``turbo-i2i demo``).

``core`` holds the logic as plain functions; ``app`` wires it to Gradio (imported only when the app is built, so the
library does not need Gradio).
"""

from .core import STYLES, DemoBackend, drawing_to_condition, model_choices, styled_prompt, upload_to_condition

__all__ = ["STYLES", "DemoBackend", "drawing_to_condition", "model_choices", "styled_prompt", "upload_to_condition"]
