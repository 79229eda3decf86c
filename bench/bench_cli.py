"""How fast the CLI answers a newcomer: wall time of ``perceptio --help``, of a config error
(``perceptio run --set vqvae.stepz=3``, exit 2 before anything runs) and of ``perceptio stages
--config smoke`` (every stage's cache key, fresh or stale, on an empty workdir), each in a fresh
subprocess (``python -m flows.cli``, so the interpreter start and every import are counted).

Prints a table and writes ``bench/results/cli.json`` (``--out`` to change): per command, the ``n``
wall times (``--n``, default 5), their median, min and max, and the exit codes seen. Commands run
round-robin, so a drift of the machine's own load spreads over all of them. ``--label`` names the
measurement (e.g. ``before``/``after``); an existing JSON file keeps its other labels, so two
measurements sit side by side. Usage: ``python bench/bench_cli.py [--n 5] [--label after]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = {
    "help": ["--help"],
    "config_error": ["run", "--set", "vqvae.stepz=3"],
    "stages_smoke": ["stages", "--config", "smoke"],
}


def time_once(args: list[str], workdir: Path) -> tuple[float, int]:
    """Seconds and exit code of one ``python -m flows.cli ARGS --workdir W`` (``--workdir`` left out
    for ``--help``), run from the repository root."""
    cmd = [sys.executable, "-m", "flows.cli", *args]
    if args != ["--help"]:
        cmd += ["--workdir", str(workdir)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode not in (0, 2):
        print(f"{' '.join(args)}: exit {p.returncode}\n{p.stderr[-2000:]}", file=sys.stderr)
    return dt, p.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5, help="runs per command")
    ap.add_argument("--label", default="current", help="name of this measurement in the JSON file")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cli.json"))
    a = ap.parse_args()

    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    codes: dict[str, set[int]] = {k: set() for k in COMMANDS}
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        for _ in range(a.n):
            for name, args in COMMANDS.items():
                dt, rc = time_once(args, Path(tmp) / "work")
                times[name].append(dt)
                codes[name].add(rc)
    res = {
        name: {"cmd": "perceptio " + " ".join(COMMANDS[name]), "n": a.n, "median_s": round(statistics.median(ts), 3),
               "min_s": round(min(ts), 3), "max_s": round(max(ts), 3), "runs_s": [round(t, 3) for t in ts],
               "exit_codes": sorted(codes[name])}  # fmt: skip
        for name, ts in times.items()
    }
    print(f"{'command':<44}{'median s':>10}{'min s':>8}{'max s':>8}  exit")
    for r in res.values():
        print(f"{r['cmd']:<44}{r['median_s']:>10.2f}{r['min_s']:>8.2f}{r['max_s']:>8.2f}  {r['exit_codes']}")
    out = Path(a.out)
    doc: dict = json.loads(out.read_text()) if out.is_file() else {}
    doc[a.label] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "load_avg": os.getloadavg()}, "commands": res}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out} ({a.label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
