"""Data-parallel generation for the ``evaluate`` stage (SPEC §6; ARCHITECTURE "Scale-out"): every
process of a ``torchrun`` / ``accelerate launch`` takes its share of every benchmark's missing
predictions and writes them to the shared prediction cache; the stage then scores them all.

The stage starts it itself when ``evaluate.processes > 1``::

    perceptio run --set evaluate.processes=8      # torchrun --nproc_per_node 8 -m flows.eval_script JOB

and it may be launched by hand on a job file the stage wrote (``<workdir>/cache/evaluate-<key>/job.json``;
across nodes with a shared filesystem)::

    torchrun --nproc_per_node 8 -m flows.eval_script JOB
    accelerate launch --multi_gpu --num_processes 8 -m flows.eval_script JOB

The job (JSON: ``config`` (a YAML profile path), ``sources``, ``benchmarks``, ``model``, ``base``,
``base_tokenizer``, ``cache``, ``tags``, ``device``) names the resolved config, the sources and
benchmarks JSON, the fine-tuned and base models, the cache folder and the models' cache tags. Each process loads the models on its own device
(``cuda:<local rank>`` when the run's device is CUDA; gloo on CPU), generates its share
(:func:`perceptio_core.evaluation.evaluate.run_evaluation` with ``world=(rank, size)``), meets the
others at a barrier after each benchmark and exits; a killed run resumes from the cache. Process 0
prints how many predictions the cache holds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

def main(argv: list[str] | None = None) -> int:
    from perceptio_core.device import cpu_thread_env

    cpu_thread_env()  # before torch loads: half the cores, passive OpenMP waits (an export wins)
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m flows.eval_script JOB.json (under torchrun or accelerate launch)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch
    import torch.distributed as dist

    from perceptio_core.config import load_config
    from perceptio_core.data.records import Benchmarks, Sources
    from perceptio_core.evaluation.evaluate import load_predictors, run_evaluation
    from perceptio_core.evaluation.predictions import PredictionCache

    job = json.loads(Path(args[0]).read_text())
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = str(job["device"]).startswith("cuda") and torch.cuda.is_available()
    device = f"cuda:{local}" if cuda else "cpu"
    if size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    cfg = load_config(job["config"])
    src, bench = Path(job["sources"]), Path(job["benchmarks"])  # each JSON inside its artifact folder
    sources = Sources.from_json(src.read_text(), root=job["data_root"], artifact=src.parent).with_benchmarks(
        Benchmarks.from_json(bench.read_text(), root=job["data_root"], artifact=bench.parent))
    model, preds = load_predictors(job["model"], cfg.evaluate, job.get("base"), job.get("base_tokenizer"), device)
    cache = PredictionCache(job["cache"], rank=rank)
    run_evaluation(sources=sources, cfg=cfg.evaluate, **preds, depth_spec=model.depth_spec, cache=cache,
                   model_tags=job["tags"], world=(rank, size), barrier=dist.barrier if size > 1 else None)
    if size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"predictions": cache.refresh(), "processes": size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
