"""``perceptio demo`` as a person uses it, in headless Chromium (server_harness.Browser): the demo
started as a subprocess on a free loopback port with a tiny saved model (random weights), a new
picture (in no dataset) uploaded through the page's file input, a query typed, the "force the
perception block" box ticked (a random model does not emit the block by itself), the Answer button
pressed; then the answer text, the status and both pictures (the mask over the image, the depth map)
must appear, the pictures at the uploaded image's size, and the files the page shows must be those
``infer`` wrote under the demo's ``--out``.

Beside it, without a browser: ``perceptio demo`` without Gradio exits 2 with the install line, and
``perceptio --help`` does not import Gradio.

Screenshot (1400x900): a temporary folder, and docs/img/demo.png with PERCEPTIO_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server_harness import REPO, Browser, _stop, _tail, clean_env, free_port, perceptio_cmd

DEMO_START_TIMEOUT = 240  # s; loading Gradio and the model on a busy 2-core machine
ANSWER_TIMEOUT = 120  # s
W, H = 72, 40  # the uploaded picture: wider than tall, not a square the model's 32/64 px could hide


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch

    from perceptio_helpers import build_tiny

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("demo-model") / "model"
        build_tiny().save_pretrained(out)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture()
def demo(model_dir: Path, tmp_path: Path):
    """``perceptio demo --model M --port P --out A`` running; yields (url, answers folder)."""
    if importlib.util.find_spec("gradio") is None:
        pytest.skip('gradio is not installed (the demo extra): pip install -e ".[demo]"')
    port = free_port()
    answers = tmp_path / "answers"
    log = tmp_path / "demo.log"
    env = clean_env(GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path / "gradio-tmp"),
                    OMP_NUM_THREADS="1")  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            perceptio_cmd("demo", "--model", str(model_dir), "--port", str(port), "--out", str(answers),
                          "--max-new-tokens", "16"),
            cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + DEMO_START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the demo did not come up (exit {proc.poll()}):\n"
                                     f"{_tail(log.read_text(errors='replace'))}")
            time.sleep(0.5)
        yield url, answers
    finally:
        _stop(proc)


def new_picture(path: Path) -> Path:
    """A picture that is in no dataset: a diagonal gradient with a yellow disc, W x H."""
    yy, xx = np.mgrid[0:H, 0:W]
    arr = np.stack([(xx + yy) * 2, 255 - xx * 3, np.full_like(xx, 140)], -1).clip(0, 255).astype(np.uint8)
    arr[(yy - 20) ** 2 + (xx - 50) ** 2 < 100] = (240, 220, 20)
    Image.fromarray(arr).save(path)
    return path


IMG_SIZE = ("(() => { const im = document.querySelector('#%s img'); return im && im.complete && "
            "im.naturalWidth > 0 ? [im.naturalWidth, im.naturalHeight, im.src] : null; })()")
VALUE = "(() => { const e = document.querySelector('#%s textarea, #%s input'); return e ? e.value : null; })()"


@pytest.mark.server
def test_demo_page_answers_with_mask_and_depth(demo, browser: Browser, screenshot_dirs, tmp_path):
    url, answers = demo
    image = new_picture(tmp_path / "my-photo.png")
    browser.open(url + "/", expect=["Perceptio", "Query", "Template", "Answer"], timeout=90)

    # the picture, as a drop does it: the page's file input gets the file
    browser.wait_js("document.querySelector('#image input[type=file]') !== null", "the image's file input")
    node = browser.call("Runtime.evaluate", expression="document.querySelector('#image input[type=file]')")
    browser.call("DOM.setFileInputFiles", files=[str(image)], objectId=node["result"]["objectId"])
    assert browser.wait_js(IMG_SIZE % "image", "the uploaded picture's preview", timeout=60)

    # the query, typed; the template stays refer_seg; the block forced
    browser.evaluate("document.querySelector('#query textarea, #query input').focus()")
    browser.call("Input.insertText", text="the yellow disc")
    assert browser.wait_js(VALUE % ("query", "query"), "the typed query") == "the yellow disc"
    browser.evaluate("document.querySelector('#force input[type=checkbox]').click()")
    assert browser.wait_js("document.querySelector('#force input[type=checkbox]').checked", "the ticked box")
    browser.evaluate("document.querySelector('#answer-button').click()")

    answer = browser.wait_js(VALUE % ("answer", "answer"), "the answer text", timeout=ANSWER_TIMEOUT)
    overlay = browser.wait_js(IMG_SIZE % "overlay", "the mask over the image", timeout=ANSWER_TIMEOUT)
    depth = browser.wait_js(IMG_SIZE % "depth", "the depth map", timeout=ANSWER_TIMEOUT)
    status = browser.wait_js(VALUE % ("status", "status"), "the status line")
    assert answer.strip()
    assert overlay[:2] == [W, H] and depth[:2] == [W, H], (overlay[:2], depth[:2])
    assert status.startswith("perception block: ok; 1 mask;") and str(answers / "1") in status

    # what the page shows is what infer wrote for this answer
    result = json.loads((answers / "1" / "result.json").read_text())
    assert result["answer"] == answer and result["status"] == "ok"
    assert "the yellow disc" in result["prompt"]
    for name in ("overlay.png", "depth.png", "mask.png"):
        with Image.open(answers / "1" / name) as im:
            assert im.size == (W, H), name
    time.sleep(1)  # let the pictures paint before the screenshot (not a check)
    for d in screenshot_dirs:
        shot = browser.screenshot(d / "demo.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_without_gradio_exits_2_with_the_install_line(monkeypatch, capsys, tmp_path):
    from flows.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert cli_main(["demo", "--model", str(tmp_path)]) == 2
    assert 'pip install -e ".[demo]"' in capsys.readouterr().err


def test_help_does_not_import_gradio():
    code = ("import sys\nfrom flows.cli import main\n"
            "for argv in (['--help'], ['demo', '--help'], ['infer', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'gradio' not in sys.modules, 'gradio imported by --help'\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--port" in p.stdout and "--queries" in p.stdout
