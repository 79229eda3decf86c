"""What a person sees in the Prefect UI, in headless Chromium against the test server: the flow run
pages of both smoke runs (the stages, the graph), the VQ-VAE codebook's table artifact (its store URL,
its upstream teacher-depth artifact and the run that produced it, as links that lead there), the
artifact's history under its stable key, the pictures, and the asset events in the event feed.

Screenshots (1400x900) go to a temporary folder, and to docs/img/ (the ones docs/prefect-ui.md
shows) with PERCEPTIO_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from server_harness import Browser, PrefectServer, SmokePipeline

pytestmark = pytest.mark.server

ANCHORS = "JSON.stringify(Array.from(document.querySelectorAll('a')).map(a => a.href))"


def save(browser: Browser, dirs: list[Path], name: str) -> None:
    for d in dirs:
        path = browser.screenshot(d / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def latest_artifact(server: PrefectServer, key: str, flow_run_id: str) -> dict:
    rows = server.post("/artifacts/filter", {
        "artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [flow_run_id]}}})
    assert len(rows) == 1, rows
    return rows[0]


def test_flow_run_pages_show_the_stages_and_the_graph(prefect_server: PrefectServer,
                                                      smoke_pipeline: SmokePipeline,
                                                      browser: Browser, screenshot_dirs):
    server = prefect_server
    for run, shot, state in ((smoke_pipeline.first, "flow-run-graph.png", "Completed"),
                             (smoke_pipeline.second, "flow-run-cached.png", "Cached")):
        name = server.flow_run(run.flow_run_id)["name"]
        stages = list(run.summary["stages"])
        # the run's name and state, and its stage task runs with their states
        browser.open(f"{server.url}/runs/flow-run/{run.flow_run_id}",
                     expect=[name, "perceptio-pipeline", f"{len(stages)} Task runs", "Task Runs"])
        text = browser.click("Task Runs", expect=[f"({len(stages)} Completed)", *stages])
        for s in stages:
            assert re.search(rf"^{s}\s*\n\s*{state}\s*$", text, re.M), (s, state, text[-2000:])
        # the run graph is drawn on a canvas (its nodes and edges are checked through the API)
        browser.wait_js("document.querySelectorAll('canvas').length > 0", "the run graph")
        time.sleep(2)  # let the graph lay out before the picture (not a check)
        save(browser, screenshot_dirs, shot)


def test_codebook_artifact_page_links_its_upstream(prefect_server: PrefectServer,
                                                   smoke_pipeline: SmokePipeline,
                                                   browser: Browser, screenshot_dirs):
    server, first, second = prefect_server, smoke_pipeline.first, smoke_pipeline.second
    art = latest_artifact(server, "perceptio-train-vqvae", second.flow_run_id)
    vq, td = second.stage("train_vqvae"), second.stage("teacher_depth")
    first_name = server.flow_run(first.flow_run_id)["name"]
    second_name = server.flow_run(second.flow_run_id)["name"]
    text = browser.open(f"{server.url}/artifacts/artifact/{art['id']}", expect=[
        "perceptio-train-vqvae", "status in this run", "cached", vq["url"], vq["key"],
        "upstream teacher_depth", td["url"], "upstream teacher_depth produced by",
        f"run {first.summary['run_id']}", second_name,
    ])
    assert "upstream sources" in text
    links = json.loads(browser.evaluate(ANCHORS))
    run_link = f"{server.url}/runs/flow-run/{first.flow_run_id}"
    td_link = f"{server.url}/artifacts/key/perceptio-teacher-depth"
    assert run_link in links and td_link in links
    save(browser, screenshot_dirs, "artifact-train-vqvae.png")

    # the links lead where they say: the run that produced the reused outputs ...
    browser.open(run_link, expect=[first_name, "train_vqvae: computed in"])
    # ... and the teacher-depth artifact's history, this run's version and the first run's
    browser.open(td_link, expect=["perceptio-teacher-depth", first_name, second_name])

    # the codebook's stable key: one version per run
    browser.open(f"{server.url}/artifacts/key/perceptio-train-vqvae",
                 expect=["perceptio-train-vqvae", first_name, second_name])
    save(browser, screenshot_dirs, "artifact-history.png")


def test_pictures_and_asset_events(prefect_server: PrefectServer, smoke_pipeline: SmokePipeline,
                                   browser: Browser, screenshot_dirs):
    server, first = prefect_server, smoke_pipeline.first
    from storage import ArtifactStore

    vq = first.stage("train_vqvae")
    figures = ArtifactStore(smoke_pipeline.workdir / "store").manifest(
        "train_vqvae", vq["key"]).produced_by["figures"]
    assert figures
    art = latest_artifact(server, "perceptio-train-vqvae-figures", first.flow_run_id)
    browser.open(f"{server.url}/artifacts/artifact/{art['id']}",
                 expect=["perceptio-train-vqvae-figures", vq["url"], *figures])
    loaded = browser.wait_js(
        "(() => { const im = Array.from(document.images).filter(i => i.src.startsWith("
        "'data:image/png') && i.complete && i.naturalWidth > 0); return im.length; })()",
        "the inlined pictures")
    assert loaded == len(figures)
    save(browser, screenshot_dirs, "artifact-figures.png")

    # the server's event feed, filtered to asset materializations: the store URLs, with their
    # upstream assets as related resources
    browser.open(f"{server.url}/events?events=prefect.asset.materialization.succeeded",
                 expect=["Asset materialization succeeded", vq["url"],
                         first.stage("teacher_depth")["url"], "Related Resources"])
    save(browser, screenshot_dirs, "event-feed.png")
