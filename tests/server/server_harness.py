"""What the ``server`` tests run against (the fixtures that start it are in conftest.py).

Everything is started by the tests on loopback (127.0.0.1, a free port) with a temporary
PREFECT_HOME and SQLite database, and stopped at the end of the session. The test process itself
never imports Prefect nor touches its own environment: it talks to the server's REST API with httpx
and starts every Prefect client (the pipeline, ``prefect deploy``, the worker) as a subprocess with
its own environment, so the rest of the suite (which runs flows on an ephemeral server) is unaffected.
Chromium is driven over the DevTools protocol by a small client on ``websockets``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

REPO = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT = 180  # s; a cold start runs the database migrations (slow on a busy 2-core box)
EVENT_FLUSH_S = 1  # the server's event persister flush interval (PREFECT_SERVER_SERVICES_EVENT_...)
PIPELINE_TIMEOUT = 900  # s; a guard against a hang, not a speed requirement


# ---- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any PREFECT_* setting (a developer's own profile, API URL
    or home must not leak into the test server or its clients), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PYTHONUNBUFFERED="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_COLORS="false",
        PREFECT_CLI_WRAP_LINES="false",
        COLUMNS="200",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def prefect_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def perceptio_cmd(*args: str) -> list[str]:
    """The ``perceptio`` console script of this interpreter (as a user types it), else the module."""
    exe = Path(sys.executable).parent / "perceptio"
    if exe.exists():
        return [str(exe), *args]
    found = shutil.which("perceptio")
    return [found, *args] if found else [sys.executable, "-m", "flows.cli", *args]


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process this module started (and its process group, which it leads)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# ---- the server -----------------------------------------------------------------------------------


@dataclass
class PrefectServer:
    """A running ``prefect server start`` and what its clients need to reach it."""

    url: str  # http://127.0.0.1:PORT (the UI)
    home: Path  # the server's PREFECT_HOME
    client_home: Path  # the clients' PREFECT_HOME
    log: Path
    proc: subprocess.Popen
    http: httpx.Client = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def api_url(self) -> str:
        return self.url + "/api"

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(PREFECT_HOME=str(self.client_home), PREFECT_API_URL=self.api_url, **extra)

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log.read_text(errors="replace"), n)

    # -- subprocesses against this server
    def run(self, cmd: list[str], timeout: float = 300, cwd: Path = REPO, check: bool = True,
            **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=cwd, env=self.env(**env), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{_tail(proc.stdout)}\n"
                f"--- stderr\n{_tail(proc.stderr)}\n--- server log\n{self.log_tail()}"
            )
        return proc

    def prefect(self, *args: str, timeout: float = 300, cwd: Path = REPO,
                check: bool = True) -> subprocess.CompletedProcess:
        return self.run(prefect_cmd(*args), timeout=timeout, cwd=cwd, check=check)

    # -- REST API
    def get(self, path: str, **params: Any) -> Any:
        return _json(self.http.get(path, params=params or None))

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return _json(self.http.post(path, json=body or {}))

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return self.get(f"/flow_runs/{flow_run_id}")

    def task_runs(self, flow_run_id: str) -> dict[str, dict[str, Any]]:
        """The flow run's task runs by name (stage task runs are named after their stage)."""
        rows = self.post("/task_runs/filter",
                         {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})
        out: dict[str, dict[str, Any]] = {}
        for tr in rows:
            assert tr["name"] not in out, f"two task runs named {tr['name']} in flow run {flow_run_id}"
            out[tr["name"]] = tr
        return out

    def artifacts(self, flow_run_id: str) -> dict[str, dict[str, Any]]:
        """The flow run's artifacts by key."""
        rows = self.post("/artifacts/filter",
                         {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        out: dict[str, dict[str, Any]] = {}
        for a in rows:
            assert a["key"] not in out, f"two artifacts with key {a['key']} in flow run {flow_run_id}"
            out[a["key"]] = a
        return out

    def events(self, *, names: list[str] | None = None, prefix: list[str] | None = None,
               resource: list[str] | None = None,
               related: list[str] | None = None) -> list[dict[str, Any]]:
        """Events from the server's event store (every page), oldest first."""
        flt: dict[str, Any] = {"occurred": {"since": "2000-01-01T00:00:00Z",
                                            "until": "2100-01-01T00:00:00Z"}, "order": "ASC"}
        if names or prefix:
            flt["event"] = {k: v for k, v in (("name", names), ("prefix", prefix)) if v}
        if resource:
            flt["resource"] = {"id": resource}
        if related:
            flt["related"] = {"id": related}
        page = self.post("/events/filter", {"filter": flt, "limit": 50})
        events = list(page["events"])
        while page.get("next_page"):
            page = _json(self.http.get(page["next_page"]))
            events.extend(page["events"])
        return events

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float = 90) -> Any:
        """Poll ``probe`` until it returns a truthy value (events are persisted in batches)."""
        deadline = time.time() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n--- server log\n{self.log_tail()}")
            time.sleep(0.5)


def _json(r: httpx.Response) -> Any:
    if r.is_error:
        raise AssertionError(f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:2000]}")
    return r.json()


def _start_server(base: Path) -> PrefectServer:
    home, client_home = base / "home", base / "client-home"
    home.mkdir()
    client_home.mkdir()
    log = base / "server.log"
    last_error = ""
    for _attempt in range(3):  # a free port can be taken between the probe and the bind: retry
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = clean_env(
            PREFECT_HOME=str(home),
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{base / 'prefect.db'}",
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(port),
            # the UI is a single-page app that calls the API at this URL (default: port 4200)
            PREFECT_UI_API_URL=url + "/api",
            PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
            PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL=str(EVENT_FLUSH_S),
            # nothing here is scheduled or paused: spare the two shared cores these loops
            PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
            PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
            PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED="false",
        )
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                prefect_cmd("server", "start", "--host", "127.0.0.1", "--port", str(port)),
                cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.time() + SERVER_START_TIMEOUT
        with httpx.Client(timeout=5) as probe:
            while time.time() < deadline and proc.poll() is None:
                try:
                    if probe.get(url + "/api/health").status_code == 200:
                        http = httpx.Client(base_url=url + "/api", timeout=30)
                        return PrefectServer(url=url, home=home, client_home=client_home, log=log,
                                             proc=proc, http=http)
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        _stop(proc)
        last_error = _tail(log.read_text(errors="replace"))
        if "address already in use" not in last_error.lower():
            break
    raise RuntimeError(f"prefect server start did not become healthy\n{last_error}")


# ---- the smoke pipeline, twice --------------------------------------------------------------------


@dataclass
class PipelineRun:
    summary: dict[str, Any]
    stdout: str

    @property
    def flow_run_id(self) -> str:
        return self.summary["flow_run_id"]

    def stage(self, name: str) -> dict[str, Any]:
        return self.summary["stages"][name]


@dataclass
class SmokePipeline:
    workdir: Path
    first: PipelineRun  # everything computed
    second: PipelineRun  # nothing changed: everything cached


def run_pipeline(server: PrefectServer, workdir: Path, *extra: str) -> PipelineRun:
    proc = server.run(perceptio_cmd("run", "--config", "smoke", "--workdir", str(workdir), *extra),
                      timeout=PIPELINE_TIMEOUT)
    m = re.search(r"^summary: (.+summary\.json)\s*$", proc.stdout, re.M)
    assert m, f"perceptio run printed no summary path:\n{_tail(proc.stdout)}"
    summary = json.loads(Path(m.group(1)).read_text())
    assert summary["flow_run_id"], "the run has no flow run id: it did not run against the server"
    return PipelineRun(summary=summary, stdout=proc.stdout + proc.stderr)


# ---- headless Chromium over the DevTools protocol -------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1400,900",
]
VIEWPORT = (1400, 900)


def find_chromium() -> str | None:
    for name in (os.environ.get("PERCEPTIO_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome", "chrome-headless-shell"):
        if name and (path := shutil.which(name)):
            return path
    return None


class Browser:
    """One headless Chromium page, driven over the DevTools protocol (a small client on
    ``websockets``): navigate, read the rendered page, evaluate JavaScript, take screenshots."""

    def __init__(self, exe: str, profile_dir: Path):
        from websockets.sync.client import connect

        self.profile_dir = profile_dir
        self.log = open(profile_dir.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        port_file = profile_dir / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start: {self._log_tail()}")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self._id = 0
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                  deviceScaleFactor=1, mobile=False)

    def _log_tail(self) -> str:
        self.log.flush()
        return _tail((self.profile_dir.parent / "chromium.log").read_text(errors="replace"), 20)

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def open(self, url: str, expect: list[str], timeout: float = 60) -> str:
        """Navigate to ``url`` and wait until the rendered page's text shows every string of
        ``expect``; return that text. Fails with what the page showed and logged otherwise."""
        self.events.clear()
        self.call("Page.navigate", url=url)
        return self.wait_text(expect, timeout, what=url)

    def wait_text(self, expect: list[str], timeout: float, what: str) -> str:
        deadline = time.time() + timeout
        while True:
            text = self.text()
            missing = [e for e in expect if e not in text]
            if not missing:
                return text
            if time.time() > deadline:
                errors = [
                    json.dumps(e["params"])[:400] for e in self.events
                    if e.get("method") in ("Runtime.exceptionThrown", "Log.entryAdded")
                    and "WebGL" not in json.dumps(e["params"])
                ]
                raise AssertionError(
                    f"{what}: the page never showed {missing}\n--- page text\n{text[:3000]}\n"
                    "--- browser errors\n" + "\n".join(errors[:20])
                )
            time.sleep(0.25)

    def click(self, text: str, expect: list[str], timeout: float = 30) -> str:
        """Click the visible element (a tab, a button, a link) whose whole text is ``text``, then
        wait for ``expect`` on the page as :meth:`open` does."""
        js = (
            "(() => { const t = %s; const els = Array.from(document.querySelectorAll("
            "'button, [role=tab], a, li, span, div')).filter(e => e.offsetParent !== null && "
            "e.textContent.trim() === t); if (!els.length) return 0; "
            "els[els.length - 1].click(); return els.length; })()" % json.dumps(text)
        )
        assert self.wait_js(js, f"an element {text!r} to click"), text
        return self.wait_text(expect, timeout, what=f"after clicking {text!r}")

    def wait_js(self, expression: str, what: str, timeout: float = 30) -> Any:
        deadline = time.time() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what} ({expression})")
            time.sleep(0.25)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            _stop(self.proc, timeout=10)
            self.log.close()
