"""One run per workdir: a second run waits for the first (saying so), or stops with the holder named;
a killed holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.runner import LOCK_FILE, PipelineError, workdir_lock

ROOT = Path(__file__).resolve().parents[2]


def test_a_second_run_on_the_same_workdir_is_refused_naming_the_first(tmp_path):
    with workdir_lock(tmp_path / "w") as path:
        assert path.read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(PipelineError, match=rf"workdir .*w is in use by another perceptio run \(pid {os.getpid()} "):
            with workdir_lock(tmp_path / "w"):
                pass
        with workdir_lock(tmp_path / "other"):  # another workdir is free
            pass
    with workdir_lock(tmp_path / "w"):  # released at the end of the first
        pass


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    wd = tmp_path / "w"
    code = ("import sys, time; from pathlib import Path; from tasks.runner import workdir_lock\n"
            "with workdir_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(wd)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineError, match=f"pid {holder.pid} "):
            with workdir_lock(wd):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (wd / LOCK_FILE).is_file()  # the file stays; the lock went with the process
    with workdir_lock(wd) as path:
        assert path.read_text().startswith(f"pid {os.getpid()} ")


def test_perceptio_run_on_a_held_workdir_exits_with_the_message(tmp_path):
    wd = tmp_path / "w"
    with workdir_lock(wd):
        code = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
        r = subprocess.run([sys.executable, "-c", code, "run", "--config", "smoke", "--workdir", str(wd), "--only",
                            "sources", "--set", "run.lock_wait_s=0"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"perceptio: error: workdir {wd.resolve()} is in use by another perceptio run (pid {os.getpid()} " in r.stderr
    assert not (wd / "store").exists() or not any((wd / "store").rglob("manifest.json"))  # nothing computed


def test_a_second_run_waits_for_the_first_and_says_so(tmp_path):
    import threading

    wd = tmp_path / "w"
    said: list[str] = []
    order: list[str] = []
    first = workdir_lock(wd)
    first.__enter__()

    def release_later():
        threading.Event().wait(1.5)
        order.append("first done")
        first.__exit__(None, None, None)

    t = threading.Thread(target=release_later)
    t.start()
    with workdir_lock(wd, wait_s=120, log=said.append):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]
    assert len(said) == 1 and said[0].startswith(f"workdir {wd} is in use by another perceptio run (pid {os.getpid()} ")
    assert said[0].endswith("waiting for it (up to 120 s, run.lock_wait_s)")
