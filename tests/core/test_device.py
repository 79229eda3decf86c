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


def test_a_dataloader_worker_ignores_ctrl_c():
    """quiet_worker, the loaders' worker_init_fn: a worker process ignores SIGINT (the main process
    ends it), so Ctrl-C prints no traceback per worker."""
    import signal

    import torch
    from torch.utils.data import DataLoader

    from perceptio_core.device import quiet_worker

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.tensor(int(signal.getsignal(signal.SIGINT) == signal.SIG_IGN))

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's (CI may run us ignoring it)
    try:
        loader = DataLoader(Probe(), batch_size=2, num_workers=1, worker_init_fn=quiet_worker)
        assert next(iter(loader)).tolist() == [1, 1]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the main process keeps its own
    finally:
        signal.signal(signal.SIGINT, before)
