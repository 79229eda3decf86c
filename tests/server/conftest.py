"""Fixtures of the ``server`` tests: a real ``prefect server start`` on 127.0.0.1 (a free port,
a temporary PREFECT_HOME and SQLite database), the smoke pipeline run twice against it through the
``perceptio`` CLI, and headless Chromium. See server_harness.py.

Set ``PERCEPTIO_UPDATE_SCREENSHOTS=1`` to write the browser test's screenshots into ``docs/img/``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from server_harness import (
    REPO, Browser, PrefectServer, SmokePipeline, _start_server, _stop, find_chromium, run_pipeline,
)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A ``prefect server start`` on 127.0.0.1:<free port>, SQLite in a temporary PREFECT_HOME."""
    server = _start_server(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield server
    finally:
        server.http.close()
        _stop(server.proc)


@pytest.fixture(scope="session")
def smoke_pipeline(prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory):
    """``perceptio run --config smoke`` against the server, then again with nothing changed."""
    workdir = tmp_path_factory.mktemp("smoke-work")
    first = run_pipeline(prefect_server, workdir)
    second = run_pipeline(prefect_server, workdir)
    return SmokePipeline(workdir=workdir, first=first, second=second)


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory):
    exe = find_chromium()
    if exe is None:
        msg = ("no chromium on PATH: install Debian's chromium (scripts/install.sh does, as root, "
               "with CI=true or PERCEPTIO_INSTALL_BROWSER=1) or set PERCEPTIO_CHROMIUM")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    base = tmp_path_factory.mktemp("chromium")
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=base))  # a fresh --user-data-dir
    b = Browser(exe, profile)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="session")
def screenshot_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Where screenshots go: a temporary folder, and docs/img/ with PERCEPTIO_UPDATE_SCREENSHOTS=1."""
    dirs = [tmp_path_factory.mktemp("screenshots")]
    if os.environ.get("PERCEPTIO_UPDATE_SCREENSHOTS") == "1":
        dirs.append(REPO / "docs" / "img")
    return dirs

