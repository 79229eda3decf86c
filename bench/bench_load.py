"""CPU training under load: the ``fit_teacher`` step (:class:`perceptio_core.training.teacher_fit.TeacherFitTask`,
the tiny profile's Depth Anything V2: hidden 64, 4 layers, 112 px, batch 16) timed clean and beside a
competing CPU load, for each torch thread count and OpenMP wait setting.

Prints a table and writes ``bench/results/load.json`` (``--out`` to change). Each variant runs in a
process of its own (the OpenMP variables are read when torch loads its OpenMP runtime): ``--warmup``
steps, then ``--steps`` timed steps (their median). Variants: ``--threads`` (default 1 and the cores
this process may use) x ``--wait`` (the OpenMP wait setting: ``unset``, ``OMP_WAIT_POLICY=PASSIVE``
(sleep at once at a barrier), ``GOMP_SPINCOUNT=N`` (libgomp spins N iterations, then sleeps; its
default is 300000)), each ``clean`` and under every ``--load``:

- ``spin``: one pure-Python busy loop per core this process may use (anything else on the machine);
- ``torch``: another torch process running matrix products and convolutions with torch's default
  threads and wait policy (a second job whose OpenMP team spins on the same cores);
- ``twin``: the same variant's training step looping in another process (two perceptio runs at once,
  both with the same settings).

Repetitions (``--reps``) run round-robin over the variants, so a drift of the machine's own load
spreads over all of them. Reported per variant: the median over the repetitions of the median step
seconds, ``slowdown`` = loaded / clean of the same variant, and ``vs_best_clean`` = loaded / the
fastest clean variant (what a run actually gets under load, against the best it could get).

Usage: ``python bench/bench_load.py [--threads 1 2] [--wait unset OMP_WAIT_POLICY=PASSIVE]
[--load spin torch twin] [--steps 4] [--warmup 1] [--reps 2]``; a clean 2-core machine on a larger
one: ``taskset -c 0,1 python bench/bench_load.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAITS = ("unset", "OMP_WAIT_POLICY=PASSIVE", "GOMP_SPINCOUNT=10000")
THREAD_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")

SPIN = "while True:\n    pass\n"
TORCH_LOAD = ("import torch\na, w = torch.randn(384, 384), torch.randn(16, 16, 3, 3)\nwhile True:\n    b = a @ a\n"
              "    c = torch.nn.functional.conv2d(torch.randn(8, 16, 56, 56), w)\n")  # fmt: skip


def child(threads: int, steps: int, warmup: int) -> dict:
    """Time ``warmup + steps`` teacher-fit steps at ``threads`` torch threads in this process
    (``steps`` 0: loop for ever, a ``twin`` load)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from perceptio_core.config import load_config
    from perceptio_core.training.teacher_fit import TeacherFitTask

    torch.set_num_threads(threads)
    cfg = load_config("tiny")
    task = TeacherFitTask([], cfg.teacher.fit, cfg.teacher.input_size)
    torch.manual_seed(0)
    model = task.build_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher.fit.lr)
    b, s = cfg.teacher.fit.batch_size, cfg.teacher.input_size
    batch = {"pixel_values": torch.randn(b, 3, s, s), "disparity": torch.rand(b, s, s) + 0.1,  # [B, 3, S, S], [B, S, S]
             "valid": torch.ones(b, s, s, dtype=torch.bool)}  # fmt: skip
    times: list[float] = []
    i = 0
    while steps == 0 or i < warmup + steps:
        t0 = time.perf_counter()
        loss = task.loss(model, batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        i += 1
    return {"threads": torch.get_num_threads(), "step_s": times, "median_s": statistics.median(times)}


def variant_env(wait: str) -> dict[str, str]:
    """This environment less the OpenMP thread variables, plus ``wait`` (``NAME=VALUE`` or ``unset``)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    if wait != "unset":
        name, value = wait.split("=", 1)
        env[name] = value
    return env


def start_load(kind: str, cores: int, threads: int, wait: str) -> list[subprocess.Popen]:
    """The competing load ``kind`` (none for ``clean``), started now."""
    if kind == "clean":
        return []
    if kind == "spin":
        return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(cores)]
    if kind == "torch":
        return [subprocess.Popen([sys.executable, "-c", TORCH_LOAD], env=variant_env("unset"))]
    cmd = [sys.executable, __file__, "--child", "--threads", str(threads), "--steps", "0", "--warmup", "0"]
    return [subprocess.Popen(cmd, env=variant_env(wait), stdout=subprocess.DEVNULL)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run_variant(threads: int, wait: str, load: str, cores: int, steps: int, warmup: int) -> dict:
    procs = start_load(load, cores, threads, wait)
    try:
        time.sleep(3.0 if load == "twin" else 1.0 if procs else 0.0)  # the load is running before the timing
        r = subprocess.run([sys.executable, __file__, "--child", "--threads", str(threads), "--steps", str(steps),
                            "--warmup", str(warmup)], env=variant_env(wait), capture_output=True, text=True,
                           timeout=1800)  # fmt: skip
    finally:
        stop_load(procs)
    if r.returncode:
        raise RuntimeError(f"variant threads={threads} {wait} {load} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, cores}))
    p.add_argument("--wait", nargs="+", default=list(WAITS), help="unset, or NAME=VALUE of an OpenMP variable")
    p.add_argument("--load", nargs="+", default=["spin", "torch", "twin"], choices=("spin", "torch", "twin"))
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and repetition")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=2, help="repetitions of every variant (round-robin)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.threads[0], args.steps, args.warmup)))
        return {}

    variants = [(t, w, load) for t in args.threads for w in args.wait for load in ("clean", *args.load)]
    runs: dict[tuple, list[dict]] = {v: [] for v in variants}
    t_start = time.perf_counter()
    for rep in range(args.reps):
        for v in variants:
            r = run_variant(*v, cores=cores, steps=args.steps, warmup=args.warmup)
            runs[v].append(r)
            print(f"rep {rep + 1}/{args.reps} threads={v[0]} {v[1]:<24} {v[2]:<5}  median step {r['median_s']:.3f} s",
                  flush=True)  # fmt: skip

    def med(v: tuple) -> float:
        return statistics.median(r["median_s"] for r in runs[v])

    best_clean = min(med(v) for v in variants if v[2] == "clean")
    rows = []
    for t, w, load in variants:
        m = med((t, w, load))
        rows.append({"threads": t, "wait": w, "load": load, "median_step_s": round(m, 4),
                     "rep_medians_s": [round(r["median_s"], 4) for r in runs[(t, w, load)]],
                     "slowdown": round(m / med((t, w, "clean")), 2), "vs_best_clean": round(m / best_clean, 2)})  # fmt: skip
    print(f"\nteacher fit step (tiny: 112 px, batch 16), {cores} cores, {args.reps} reps x {args.steps} steps")
    print(f"{'threads':>7}  {'wait':<25}{'load':<7}{'step s':>8}{'slowdown':>10}{'vs best clean':>15}")
    for r in rows:
        print(f"{r['threads']:>7}  {r['wait']:<25}{r['load']:<7}{r['median_step_s']:>8.3f}"
              f"{r['slowdown']:>10.2f}{r['vs_best_clean']:>15.2f}")  # fmt: skip
    import torch

    result = {
        "bench": "load", "step": "fit_teacher (tiny profile: Depth Anything V2 h64 x 4 layers, 112 px, batch 16)",
        "cores": cores, "cpu_count": os.cpu_count(), "reps": args.reps, "steps": args.steps,
        "warmup": args.warmup, "loads": args.load, "rows": rows, "best_clean_step_s": round(best_clean, 4),
        "wall_s": round(time.perf_counter() - t_start, 1), "torch": torch.__version__,
        "machine": platform.machine(), "python": platform.python_version(),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
