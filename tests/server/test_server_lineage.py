"""Lineage as a person sees it in a real Prefect server: the smoke pipeline run twice against a
``prefect server start`` (see conftest.py), then read back through the server's REST API.

- the run graph is the DAG: each stage's task run names its upstream stages' task runs as inputs,
  in the first run (everything computed) and in the second (everything ``Cached``);
- one table artifact per stage under a stable key, with the store URL, cache key, status, digests,
  metrics and the upstream artifacts with links to the runs that produced them (in the second run:
  the first run), and a markdown artifact with the stage's pictures;
- one ``prefect.asset.materialization.succeeded`` event per computed stage, its store URL as the
  resource id and its upstream store URLs as related assets; none for a cached stage;
- ``perceptio lineage`` prints the same chain from the store alone, with no server at all.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time

import pytest

from server_harness import (
    EVENT_FLUSH_S, PrefectServer, SmokePipeline, clean_env, free_port, perceptio_cmd,
)

pytestmark = pytest.mark.server

MATERIALIZED = "prefect.asset.materialization.succeeded"
# the issue names this chain; the full expectation is read from tasks.stages below
CHAIN = [("sources", "fit_teacher"), ("fit_teacher", "teacher_depth"),
         ("teacher_depth", "train_vqvae"), ("train_vqvae", "tokenize_depth")]


def expected_upstream(stages: list[str]) -> dict[str, set[str]]:
    """Each stage of this run and the stages it reads (as declared once, in tasks.stages)."""
    from tasks.stages import BY_NAME

    return {s: {u for u in BY_NAME[s].upstream if u in stages} for s in stages}


def table(artifact: dict) -> dict[str, str]:
    data = artifact["data"]
    rows = json.loads(data) if isinstance(data, str) else data
    return {r["field"]: r["value"] for r in rows}


def input_ids(task_run: dict) -> set[str]:
    return {i["id"] for i in task_run["task_inputs"].get("upstream", []) if i.get("input_type") == "task_run"}


def check_graph(server: PrefectServer, flow_run_id: str, stages: list[str], state: str) -> dict:
    fr = server.flow_run(flow_run_id)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    trs = server.task_runs(flow_run_id)
    assert set(trs) == set(stages)
    for name, tr in trs.items():
        assert tr["state"]["type"] == "COMPLETED" and tr["state"]["name"] == state, (name, tr["state"])
    want = expected_upstream(stages)
    for name, tr in trs.items():
        assert input_ids(tr) == {trs[u]["id"] for u in want[name]}, (
            f"{name}: task inputs {tr['task_inputs']} are not its upstream stages {want[name]}"
        )
        # no edge from any other argument (the config, the cache key material, ...)
        assert {k for k, v in tr["task_inputs"].items() if v} <= {"upstream"}, (name, tr["task_inputs"])
    for up, down in CHAIN:
        assert trs[up]["id"] in input_ids(trs[down]), f"no edge {up} -> {down}"
    return trs


def check_artifacts(server: PrefectServer, smoke: SmokePipeline, run, trs: dict, status: str) -> None:
    """One table artifact per stage (and the pictures), each naming what it came from."""
    first = smoke.first
    arts = server.artifacts(run.flow_run_id)
    stages = list(run.summary["stages"])
    tables = {k: a for k, a in arts.items() if a["type"] == "table"}
    assert set(tables) == {f"perceptio-{s.replace('_', '-')}" for s in stages}
    from storage import ArtifactStore

    store = ArtifactStore(smoke.workdir / "store")
    for stage in stages:
        rec = run.stage(stage)
        art = tables[f"perceptio-{stage.replace('_', '-')}"]
        assert art["task_run_id"] == trs[stage]["id"]
        rows = table(art)
        m = store.manifest(stage, rec["key"])
        assert rows["stage"] == stage
        assert rows["status in this run"] == status
        assert rows["store URL"] == rec["url"] == m.url
        assert rows["cache key"] == rec["key"]
        assert rows["config digest"] == m.config_digest[:16]
        assert rows["code digest"] == m.code["digest"][:16]
        # produced by the first run, in both runs: a link into the UI of this server
        made_by = f"run {first.summary['run_id']} {server.url}/runs/flow-run/{first.flow_run_id}"
        this_run = " (this flow run)" if run is first else ""
        assert rows["produced by"] == made_by + this_run
        for k, v in m.metrics.items():
            if not isinstance(v, dict):
                assert f"metric {k}" in rows, (stage, k)
        ups = set(m.inputs)
        assert {f[len("upstream "):] for f in rows if f.startswith("upstream ") and
                not f.endswith((" artifact", " produced by"))} == ups
        for up in ups:
            up_key = f"perceptio-{up.replace('_', '-')}"
            assert rows[f"upstream {up}"] == run.stage(up)["url"]
            assert rows[f"upstream {up} artifact"] == f"{up_key} {server.url}/artifacts/key/{up_key}"
            assert rows[f"upstream {up} produced by"] == made_by + this_run
        # the stage's pictures, inlined as PNG data URIs
        figures = m.produced_by.get("figures") or {}
        fig_key = f"perceptio-{stage.replace('_', '-')}-figures"
        if figures:
            md = arts[fig_key]
            assert md["type"] == "markdown" and md["task_run_id"] == trs[stage]["id"]
            for caption in figures:
                assert f"## {caption}" in md["data"]
            b64 = md["data"].split("data:image/png;base64,", 1)[1].split(")", 1)[0]
            assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert fig_key not in arts
    # the codebook stage draws pictures (the README shows them)
    assert "perceptio-train-vqvae-figures" in arts


def test_first_run_graph_artifacts_and_asset_events(prefect_server: PrefectServer,
                                                    smoke_pipeline: SmokePipeline):
    server, run = prefect_server, smoke_pipeline.first
    stages = list(run.summary["stages"])
    assert {s: r["status"] for s, r in run.summary["stages"].items()} == {s: "computed" for s in stages}
    trs = check_graph(server, run.flow_run_id, stages, state="Completed")
    check_artifacts(server, smoke_pipeline, run, trs, status="computed")

    # the asset materialization events, as the server stored them (its event feed)
    def materialized():
        evs = server.events(names=[MATERIALIZED], related=[f"prefect.flow-run.{run.flow_run_id}"])
        return evs if len(evs) >= len(stages) else None

    events = server.wait_for("one materialization event per stage", materialized)
    by_url = {e["resource"]["prefect.resource.id"]: e for e in events}
    assert len(events) == len(stages) == len(by_url)
    assert set(by_url) == {r["url"] for r in run.summary["stages"].values()}
    want = expected_upstream(stages)
    for stage, rec in run.summary["stages"].items():
        ev = by_url[rec["url"]]
        related = {r["prefect.resource.id"]: r["prefect.resource.role"] for r in ev["related"]}
        assert {k for k, role in related.items() if role == "asset"} == {
            run.stage(u)["url"] for u in want[stage]
        }
        assert related[f"prefect.task-run.{trs[stage]['id']}"] == "task-run"
        assert related[f"prefect.flow-run.{run.flow_run_id}"] == "flow-run"
        assert ev["resource"]["prefect.resource.name"] == stage
        # the asset's metadata: what the stage is and what it came from
        assert ev["payload"]["stage"] == stage
        assert ev["payload"]["cache_key"] == rec["key"]
        assert ev["payload"]["upstream"] == {u: run.stage(u)["url"] for u in want[stage]}
        assert ev["payload"]["metrics"] == rec["metrics"]


def test_second_run_is_cached_emits_no_asset_event_and_keeps_lineage(
        prefect_server: PrefectServer, smoke_pipeline: SmokePipeline):
    server, first, second = prefect_server, smoke_pipeline.first, smoke_pipeline.second
    stages = list(second.summary["stages"])
    assert set(stages) == set(first.summary["stages"])
    assert {s: r["status"] for s, r in second.summary["stages"].items()} == {s: "cached" for s in stages}
    assert {s: r["key"] for s, r in second.summary["stages"].items()} == {
        s: r["key"] for s, r in first.summary["stages"].items()}
    assert second.flow_run_id != first.flow_run_id
    # the graph still draws every edge, between Cached task runs
    trs = check_graph(server, second.flow_run_id, stages, state="Cached")
    # the tables still say where each reused output came from: the first run
    check_artifacts(server, smoke_pipeline, second, trs, status="cached")
    # stable keys: each stage's key now has a history of two versions, one per run
    for stage in stages:
        key = f"perceptio-{stage.replace('_', '-')}"
        versions = server.post("/artifacts/filter", {"artifacts": {"key": {"any_": [key]}},
                                                     "sort": "CREATED_DESC"})
        runs = [v["flow_run_id"] for v in reversed(versions)]
        assert first.flow_run_id in runs and second.flow_run_id in runs
        assert runs.index(first.flow_run_id) < runs.index(second.flow_run_id)

    # no asset event for a reuse. The client sends a task's asset event right after its state
    # event, on the same connection, and the server stores events in batches (every second here):
    # once every stage's Cached event is stored, give the batches after it a few flushes.
    fr_id = f"prefect.flow-run.{second.flow_run_id}"

    def cached_events():
        evs = server.events(names=["prefect.task-run.Cached"], related=[fr_id])
        return evs if len(evs) >= len(stages) else None

    cached = server.wait_for("a Cached event per stage of the second run", cached_events)
    assert sorted(e["resource"]["prefect.resource.name"] for e in cached) == sorted(stages)
    time.sleep(3 * EVENT_FLUSH_S)
    assert server.events(prefix=["prefect.asset."], related=[fr_id]) == []
    # all the materializations the server knows of for these artifacts are the first run's
    urls = {r["url"] for r in first.summary["stages"].values()}
    all_mat = [e for e in server.events(names=[MATERIALIZED])
               if e["resource"]["prefect.resource.id"] in urls]
    assert len(all_mat) == len(stages)
    assert all(
        any(r["prefect.resource.id"] == f"prefect.flow-run.{first.flow_run_id}" for r in e["related"])
        for e in all_mat
    )


def test_lineage_cli_reads_the_store_alone(smoke_pipeline: SmokePipeline, tmp_path):
    """``perceptio lineage`` of the DAG's last artifact, given by its store URL, with no server
    reachable (the API URL points at a closed port): the whole chain, from the manifests."""
    from tasks.stages import STAGES, upstream_of

    run, wd = smoke_pipeline.first, smoke_pipeline.workdir
    keys = {s: r["key"] for s, r in run.summary["stages"].items()}
    sink = [s.name for s in STAGES if s.name in keys][-1]
    chain = {sink} | (upstream_of(sink) & set(keys))
    assert {u for pair in CHAIN for u in pair} <= chain
    env = clean_env(PREFECT_HOME=str(tmp_path / "home"),
                    PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    proc = subprocess.run(
        perceptio_cmd("lineage", run.stage(sink)["url"], "--config", "smoke", "--workdir", str(wd)),
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"{sink}/{keys[sink]}")
    assert f"run {run.summary['run_id']}" in lines[0]
    assert lines[1].strip() == run.stage(sink)["url"]
    # every artifact of the chain once, with its store URL and one "<- parent" line per input; an
    # artifact is printed before the ones it was made from
    headers = [i for i, ln in enumerate(lines) if not ln.startswith(" ")]
    for stage in chain:
        assert sum(ln.startswith(f"{stage}/{keys[stage]}") for ln in lines) == 1, stage
        assert run.stage(stage)["url"] in out, stage
    for stage in set(keys) - chain:
        assert f"{stage}/" not in out, stage

    def block(stage: str) -> list[str]:
        i = next(i for i in headers if lines[i].startswith(f"{stage}/{keys[stage]}"))
        end = next((j for j in headers if j > i), len(lines))
        return lines[i:end]

    for up, down in CHAIN:
        assert f"    <- {up}/{keys[up]}" in block(down), (up, down)
        assert headers.index(lines.index(block(down)[0])) < headers.index(lines.index(block(up)[0])), (up, down)
