"""``perceptio demo``: a local web page (Gradio) that answers a query about a dropped image.

The page: an image, a query, the prompt template it fills (as ``perceptio infer --template``), a box
that forces the perception block (``[SEG]<d_start>`` at the start of the answer, for a model that does
not emit it by itself yet) and an "Answer" button; it shows the answer text, the block status, the
mask(s) over the image and the depth map as a picture.

Every answer is :func:`perceptio_core.evaluation.infer.infer` with the model loaded once, written
into ``<out>/<n>/`` (n = 1, 2, ... per answer): the pictures shown are the ``overlay.png`` and
``depth.png`` it writes, at the image's size, so the page shows exactly what ``perceptio infer``
writes. Gradio is an optional extra (``pip install -e ".[demo]"``) and is imported by
:func:`build_app` only, so that importing this module (and ``perceptio --help``) does not load it.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATES = ("refer_seg", "semantic_seg", "depth_cot", "instruct", "none")
"""The template choices, as ``perceptio infer --template`` takes them (none: the query is the prompt)."""

FORCE_BLOCK = "[SEG]<d_start>"
"""The answer prefix of the "force the perception block" box."""

ANSWER_BUTTON = "Answer"


@dataclass
class DemoAnswer:
    """What the page shows for one question: the answer text, the block status line, the overlay
    and depth pictures (None: the answer has no ``[SEG]`` / no well-formed depth block) and the
    folder they were written to."""

    answer: str
    status: str
    overlay_png: Path | None
    depth_png: Path | None
    out_dir: Path


class Answerer:
    """One loaded model answering the page's questions, one at a time (a lock: a model is not
    shared between threads); each answer in a new numbered folder of ``out_dir``."""

    def __init__(self, model: Any, out_dir: str | os.PathLike[str], *, max_new_tokens: int = 160,
                 constrained: bool = True):
        self.model = model
        self.out_dir = Path(out_dir)
        self.max_new_tokens = max_new_tokens
        self.constrained = constrained
        self._lock = threading.Lock()
        self._count = itertools.count(1)

    def __call__(self, image_path: str | os.PathLike[str], query: str, template: str = "refer_seg",
                 force_block: bool = False) -> DemoAnswer:
        """Answer ``query`` about the image file at ``image_path``. Raises ``ImageError`` (an
        unreadable image) or ``ValueError`` (an empty query, an unknown template)."""
        from perceptio_core.evaluation.infer import infer

        with self._lock:
            out = self.out_dir / str(next(self._count))
            r = infer(self.model, image_path, query, out, template=None if template == "none" else template,
                      response_prefix=FORCE_BLOCK if force_block else "", max_new_tokens=self.max_new_tokens,
                      constrained=self.constrained)  # fmt: skip
        masks = len(r.masks_png)
        status = (f"perception block: {r.status}; {masks} mask{'s' if masks != 1 else ''}"
                  f"{'' if r.depth_png is not None else ', no depth map'}; files in {out}")  # fmt: skip
        return DemoAnswer(r.answer, status, r.overlay_png, r.depth_png, out)


def build_app(answerer: Answerer, title: str = "Perceptio") -> Any:
    """The Gradio ``Blocks`` page around ``answerer`` (module docstring). Element ids for scripts
    and tests: ``image``, ``query``, ``template``, ``force``, ``answer``, ``status``, ``overlay``,
    ``depth``."""
    import gradio as gr

    from perceptio_core.data.image_io import ImageError

    def respond(image: str | None, query: str, template: str, force: bool) -> tuple[str, str, Any, Any]:
        if not image:
            raise gr.Error("drop an image first")
        try:
            a = answerer(image, query or "", template, bool(force))
        except (ImageError, ValueError) as e:
            raise gr.Error(str(e)) from None
        overlay = str(a.overlay_png) if a.overlay_png is not None else None
        depth = str(a.depth_png) if a.depth_png is not None else None
        return a.answer, a.status, overlay, depth

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nDrop an image, ask about it: the answer, the mask of each `[SEG]` over "
                    "the image, and the depth map (bright = near).")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                 elem_id="image")
                query = gr.Textbox(label="Query", placeholder="the red ball", lines=1, elem_id="query")
                template = gr.Dropdown(list(TEMPLATES), value="refer_seg", label="Template",
                                       info="the prompt the query fills (none: the query is the prompt)",
                                       elem_id="template")
                force = gr.Checkbox(False, label="Force the perception block ([SEG] and depth)", elem_id="force")
                button = gr.Button(ANSWER_BUTTON, variant="primary", elem_id="answer-button")
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
                overlay = gr.Image(type="filepath", label="Mask over the image", interactive=False,
                                   elem_id="overlay")
                depth = gr.Image(type="filepath", label="Depth", interactive=False, elem_id="depth")
        inputs = [image, query, template, force]
        outputs = [answer, status, overlay, depth]
        button.click(respond, inputs, outputs)
        query.submit(respond, inputs, outputs)
    return app


def serve(model_dir: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int | None = None,
          out_dir: str | os.PathLike[str] | None = None, device: str = "cpu", max_new_tokens: int = 160,
          constrained: bool = True) -> int:
    """Load the model of ``model_dir`` once and serve the page on ``host:port`` (port None: Gradio
    picks a free one from 7860) until Ctrl-C. Answers go to ``out_dir`` (a new temporary folder
    when None). Returns 0."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page: nothing sent anywhere
    from perceptio_core.evaluation.infer import load_model, resolve_model_dir

    import gradio as gr

    model_dir = resolve_model_dir(model_dir)
    print(f"perceptio: loading the model of {model_dir}", file=sys.stderr)
    model = load_model(model_dir, device=device)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="perceptio-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"perceptio: answers are written to {out}", file=sys.stderr)
    app = build_app(Answerer(model, out, max_new_tokens=max_new_tokens, constrained=constrained))
    # system fonts: the page asks nothing of the internet (the default theme loads Google fonts)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # fmt: skip
    app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, allowed_paths=[str(out)],
               show_error=True, inbrowser=False, theme=theme)  # fmt: skip
    return 0


__all__ = ["ANSWER_BUTTON", "FORCE_BLOCK", "TEMPLATES", "Answerer", "DemoAnswer", "build_app", "serve"]
