"""The project's deployments (prefect.yaml) on a real server: ``prefect deploy --all`` from the repo,
non-interactive, onto a process work pool; then deployment runs executed by a process worker
(``prefect worker start --run-once``), exactly as docs/prefect-ui.md tells a person to do it.

- ``perceptio-pipeline/pipeline`` on the smoke pipeline's workdir: every stage Cached, Completed;
- ``perceptio-pipeline/teacher-depth`` with an override: only the teacher's depth maps are made
  again, its upstream taken from the store; its asset event names those upstream assets, and its
  table artifact links them to the run that produced them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from server_harness import REPO, PrefectServer, SmokePipeline

pytestmark = pytest.mark.server

POOL = "perceptio-process"
FLOW = "perceptio-pipeline"


def deployment_names() -> dict[str, dict]:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def schedule_with_cli(server: PrefectServer, name: str, **params) -> str:
    """``prefect deployment run`` (each parameter as JSON), as the docs show it."""
    args = ["deployment", "run", f"{FLOW}/{name}"]
    for k, v in params.items():
        args += ["-p", f"{k}={json.dumps(v)}"]
    out = server.prefect(*args).stdout
    m = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert m, out
    return m.group(1)


def schedule_with_api(server: PrefectServer, name: str, **params) -> str:
    """A run with custom parameters through the API (what the UI's "Custom run" does)."""
    dep = server.get(f"/deployments/name/{FLOW}/{name}")
    return server.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})["id"]


def check_completed(server: PrefectServer, flow_run_id: str, name: str, params: dict,
                    worker_output: str) -> None:
    fr = server.flow_run(flow_run_id)
    assert fr["state"]["type"] == "COMPLETED", f"{fr['state']}\n--- worker\n{worker_output}"
    assert fr["parameters"] == {**deployment_names()[name]["parameters"], **params}


def summary_of(workdir: Path, flow_run_id: str) -> dict:
    for p in (workdir / "runs").glob("*/summary.json"):
        s = json.loads(p.read_text())
        if s["flow_run_id"] == flow_run_id:
            return s
    raise AssertionError(f"no summary.json under {workdir}/runs for flow run {flow_run_id}")


def test_deploy_all_and_run_through_a_process_worker(prefect_server: PrefectServer,
                                                     smoke_pipeline: SmokePipeline):
    server, wd, first = prefect_server, smoke_pipeline.workdir, smoke_pipeline.first
    from tasks.stages import STAGES

    # the pool, and every deployment of prefect.yaml, non-interactively from the repo folder
    server.prefect("work-pool", "create", POOL, "--type", "process")
    assert server.get(f"/work_pools/{POOL}")["type"] == "process"
    deployed = server.prefect("--no-prompt", "deploy", "--all").stdout
    spec = deployment_names()
    on_server = {d["name"]: d for d in server.post("/deployments/filter", {"limit": 200})}
    assert set(on_server) == set(spec), deployed
    # the ablations: their own flow, every variant of the paper by default
    ablate = on_server.pop("ablate")
    assert ablate["work_pool_name"] == POOL and ablate["entrypoint"] == "flows/ablate.py:perceptio_ablate"
    assert ablate["parameters"]["variants"] == ["no_depth", "no_seg", "no_rec", "no_dtok"]
    assert {"profile", "overrides", "workdir", "variants"} <= set(ablate["parameter_openapi_schema"]["properties"])
    assert server.get(f"/flows/{ablate['flow_id']}")["name"] == "perceptio-ablate"
    # the whole pipeline, and each stage alone (``only``), all on the process pool
    assert "pipeline" in spec
    assert {d["parameters"].get("only") for d in on_server.values()} == (
        {None} | {s.name for s in STAGES}
    )
    for name, d in on_server.items():
        assert d["work_pool_name"] == POOL
        assert d["entrypoint"] == spec[name]["entrypoint"] == "flows/pipeline.py:perceptio_pipeline"
        assert {"profile", "overrides", "workdir"} <= set(d["parameters"])
        props = d["parameter_openapi_schema"]["properties"]
        assert {"profile", "overrides", "workdir", "only", "from_stage"} <= set(props)
        assert server.get(f"/flows/{d['flow_id']}")["name"] == FLOW

    # two deployment runs, then a process worker that runs what is scheduled to the end:
    # the whole pipeline on the smoke workdir (nothing changed since the smoke runs), and one stage
    # alone with a changed config (made again, its upstream reused from the store)
    p_pipe = {"profile": "smoke", "workdir": str(wd)}
    p_td = {"profile": "smoke", "workdir": str(wd), "overrides": ["teacher.chunk_size=8"]}
    fr_pipe = schedule_with_cli(server, "pipeline", **p_pipe)
    fr_td = schedule_with_api(server, "teacher-depth", **p_td)
    for fr in (fr_pipe, fr_td):
        assert server.flow_run(fr)["state"]["type"] == "SCHEDULED"
    w = server.prefect("worker", "start", "--pool", POOL, "--type", "process", "--run-once",
                       timeout=600)
    out = (w.stdout + w.stderr)[-6000:]
    check_completed(server, fr_pipe, "pipeline", p_pipe, out)
    check_completed(server, fr_td, "teacher-depth", p_td, out)

    summary = summary_of(wd, fr_pipe)
    assert {s: r["status"] for s, r in summary["stages"].items()} == {
        s: "cached" for s in first.summary["stages"]}
    trs = server.task_runs(fr_pipe)
    assert set(trs) == set(first.summary["stages"])
    assert {tr["state"]["name"] for tr in trs.values()} == {"Cached"}

    summary = summary_of(wd, fr_td)
    status = {s: r["status"] for s, r in summary["stages"].items()}
    assert status == {"sources": "reused", "fit_teacher": "reused", "teacher_depth": "computed"}
    td = summary["stages"]["teacher_depth"]
    assert td["key"] != first.stage("teacher_depth")["key"]
    trs = server.task_runs(fr_td)
    assert set(trs) == {"teacher_depth"} and trs["teacher_depth"]["state"]["name"] == "Completed"

    # its asset event names the reused upstream assets (declared, since no task of this run
    # produced them) ...
    ev = server.wait_for("the teacher_depth materialization", lambda: server.events(
        names=["prefect.asset.materialization.succeeded"], resource=[td["url"]]))
    assert len(ev) == 1
    related = {r["prefect.resource.id"] for r in ev[0]["related"]
               if r["prefect.resource.role"] == "asset"}
    assert related == {first.stage("sources")["url"], first.stage("fit_teacher")["url"]}
    # ... and its table links them to the run that produced them
    art = server.artifacts(fr_td)["perceptio-teacher-depth"]
    rows = {r["field"]: r["value"] for r in json.loads(art["data"])}
    assert rows["status in this run"] == "computed"
    assert rows["store URL"] == td["url"]
    assert rows["upstream fit_teacher"] == first.stage("fit_teacher")["url"]
    assert rows["upstream fit_teacher produced by"] == (
        f"run {first.summary['run_id']} {server.url}/runs/flow-run/{first.flow_run_id}")
    assert rows["produced by"].endswith(f"{server.url}/runs/flow-run/{fr_td} (this flow run)")
