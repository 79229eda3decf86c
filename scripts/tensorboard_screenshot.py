"""A picture of a run's training curves in TensorBoard (the README's), taken in headless Chromium.

    python3 scripts/tensorboard_screenshot.py WORKDIR/tracking OUT.png [--runs REGEX] [--tags REGEX]

Starts ``tensorboard --logdir`` on a free local port, opens its time-series page filtered to the
runs and tags given (default: the fine-tuning's per-step curves), waits for the charts to draw and
saves the screenshot. Uses the Chromium driver of the browser tests (tests/server/server_harness.py).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "server"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logdir")
    ap.add_argument("out")
    ap.add_argument("--runs", default="finetune", help="run filter (regex), default finetune")
    ap.add_argument("--tags", default="train/", help="tag filter (regex), default train/")
    args = ap.parse_args()
    from server_harness import Browser, find_chromium

    exe = find_chromium()
    if exe is None:
        print("no Chromium found (the browser tests' find_chromium)", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--port", str(port),
                           "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("tensorboard did not start within 120 s") from None
                time.sleep(1)
        query = urllib.parse.urlencode({"tagFilter": args.tags, "runFilter": args.runs})
        with tempfile.TemporaryDirectory() as tmp:
            profile = Path(tmp) / "profile"
            profile.mkdir()
            b = Browser(exe, profile)
            try:
                b.open(f"http://127.0.0.1:{port}/?{query}#timeseries", expect=[args.tags.rstrip("/")], timeout=120)
                time.sleep(15)  # the charts draw after the page's text
                b.screenshot(Path(args.out))
            finally:
                b.close()
    finally:
        tb.terminate()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
