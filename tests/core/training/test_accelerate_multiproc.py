"""``accelerate launch --multi_gpu --num_processes 2`` of the training script on the CPU (gloo): 2 processes x batch b
give the gradients of 1 process x batch 2b (ARCHITECTURE "Scale-out": prove the multi-process path on
CPU). The tiny InternVL of the base fit, one optimizer step; every answer is one letter, so every
sample has the same number of target tokens and the per-process token means average to the global one.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[3]  # the repository root


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _examples(d: Path, n: int = 8) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = np.full((24, 24, 3), 30 * i, np.uint8)
        p = d / f"im{i}.png"
        Image.fromarray(arr).save(p)
        rows.append({"image": str(p), "prompt": "Which is it? (A) (B) (C) (D)", "answer": "ABCD"[i % 4]})
    path = d / "examples.json"
    path.write_text(json.dumps(rows))
    return path


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}"


def test_two_processes_give_the_gradients_of_one_with_twice_the_batch(tmp_path):
    data = _examples(tmp_path / "data")
    common = ["--stage", "base", "--config", "tiny", "--data", str(data),
              "--set", "run.device=cpu", "--set", "base.steps=1", "--set", "base.num_workers=0"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    # one process, in this process (the script's code path without its argument parsing)
    from perceptio_core.training.base_fit import fit_base
    from perceptio_core.config import load_config

    cfg = load_config("tiny", ["run.device=cpu", "base.steps=1", "base.num_workers=0", "base.batch_size=4"])
    fit_base(json.loads(data.read_text()), cfg, one, grad_dump_dir=one / "grads")
    shutil.copytree(one / "tokenizer", two / "tokenizer")  # the same vocabulary in both runs
    # accelerate's --cpu launcher starts more than one process only through mpirun (+ hostfile);
    # its torchrun-based launcher (--multi_gpu) with run.device=cpu gives 2 CPU processes on gloo
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
          "-m", "flows.train_script", *common, "--set", "base.batch_size=2",
          "--out", str(two), "--dump-grads", str(two / "grads")])  # fmt: skip

    g1 = load_file(str(one / "grads" / "grads-step-00000001.safetensors"))
    g2 = load_file(str(two / "grads" / "grads-step-00000001.safetensors"))
    assert g1.keys() == g2.keys() and len(g1) > 20
    nonzero = 0
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)
        nonzero += int(g1[k].abs().sum() > 0)
    assert nonzero > len(g1) // 2
    h1 = [json.loads(x) for x in (one / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (two / "history.jsonl").read_text().splitlines()]
    assert h1[0]["loss"] == pytest.approx(h2[0]["loss"], rel=1e-5)  # the logged loss is the global mean
    meta = json.loads((two / "checkpoints" / "step-00000001" / "meta.json").read_text())
    assert meta["fingerprint"]["num_processes"] == 2
    assert sorted(p.name for p in (two / "checkpoints" / "step-00000001").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # fmt: skip
    assert (two / "model" / "model.safetensors").is_file()
