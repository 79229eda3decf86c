"""Shared test fixtures.

``tiny_world``: one small synthetic world (24 COCO images at 64x48, 8 ADE20k images, 2 HardBLINK
questions per point count, 12 VQA questions, 2 MME images per subtask), generated once per test session into a temporary
folder; treat it as read-only (copy what a test needs to modify).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest

# In-process pipeline runs use Prefect's temporary server; give the test session its own Prefect
# home so it never shares (and locks) a developer's ~/.prefect database. The server tests start
# their own server with their own home (tests/server/conftest.py).
if "PREFECT_API_URL" not in os.environ:
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="perceptio-test-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from perceptio_core.config import SynthConfig
from perceptio_core.world.synth import generate_world

TINY_WORLD = dict(images=24, ade_images=8, hardblink_per_count=2, vqa_questions=12, mme_images=2,
                  width=64, height=48, seed=0)


@pytest.fixture(scope="session")
def tiny_world_config() -> SynthConfig:
    """The :class:`SynthConfig` of ``tiny_world``."""
    return SynthConfig(**TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory, tiny_world_config: SynthConfig) -> Path:
    """The root folder of a small synthetic world (generated once per session; read-only)."""
    root = tmp_path_factory.mktemp("tiny_world") / "world"
    generate_world(root, tiny_world_config)
    return root


def pytest_unconfigure(config: pytest.Config) -> None:
    """Prefect stops its temporary server at interpreter exit and logs that to a stream pytest has
    already closed; that log line is not worth a "Logging error" traceback after the summary."""
    logging.raiseExceptions = False
