"""CPU thread defaults set before torch loads (bench/bench_load.py for why)."""

import os

from perceptio_core.device import cpu_thread_env, default_cpu_threads


def test_thread_defaults_are_half_the_cores_and_an_export_wins(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_cpu_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert default_cpu_threads() == 4
    env = {"OMP_NUM_THREADS": "3"}
    assert cpu_thread_env(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert cpu_thread_env(env) == {"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "PASSIVE"}
