"""A run stopped by SIGTERM (a cluster scheduler's stop) or Ctrl-C ends cleanly: a summary with the
cut stage ``interrupted``, one line saying how to resume, no traceback, and a rerun that does not
compute again what had finished (issue 21)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CODE = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.slow
def test_sigterm_leaves_a_summary_marked_interrupted_and_the_rerun_keeps_the_finished_stages(tmp_path):
    wd = tmp_path / "w"
    log = tmp_path / "run.log"
    argv = ["run", "--config", "smoke", "--workdir", str(wd)]
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-c", CODE, *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while "Task run 'fit_teacher'" not in log.read_text() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert p.poll() is None, log.read_text()[-3000:]
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=300)
    text = log.read_text()
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert "Traceback" not in text, text[-6000:]
    resume = [line for line in text.splitlines() if line.startswith("perceptio: interrupted (SIGTERM)")]
    assert len(resume) == 1 and f"perceptio {' '.join(argv)}" in resume[0]
    [summary_path] = (wd / "runs").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["interrupted"] is True
    status = {s: r["status"] for s, r in summary["stages"].items()}
    assert status["sources"] == status["benchmarks"] == "computed"
    assert status["fit_teacher"] == "interrupted" and list(status)[-1] == "fit_teacher"

    # the rerun: what finished is taken from the store, the cut stage is made
    r = subprocess.run([sys.executable, "-c", CODE, *argv, "--only", "fit_teacher"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted((wd / "runs").glob("*/summary.json"), key=lambda q: q.stat().st_mtime)
    again = json.loads(runs[-1].read_text())
    assert {s: x["status"] for s, x in again["stages"].items()} == {"sources": "reused", "fit_teacher": "computed"}
    assert again["stages"]["sources"]["key"] == summary["stages"]["sources"]["key"]
    assert "interrupted" not in again
