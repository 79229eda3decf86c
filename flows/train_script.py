"""Command-line entry point of the one training loop, for ``accelerate launch`` (SPEC §4 scale-out;
ARCHITECTURE "Scale-out"). The same functions the Prefect tasks call in-process run here:

    accelerate launch [--num_processes 8] -m flows.train_script \\
        --stage finetune --config tiny --set finetune.steps=300 \\
        --data SHARD_DIR --base BASE_MODEL_DIR --vqvae VQVAE_DIR [--depth-maps TEACHER_DIR] --out OUT

    accelerate launch -m flows.train_script --stage base --config tiny \\
        --data examples.json --out OUT      # examples.json: [{"image", "prompt", "answer"}, ...]

Sharded (bases that do not fit one GPU; ``configs/accelerate/*.yaml`` say when to use which)::

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8 \\
        -m flows.train_script --stage finetune --config paper-8b ...
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes 8 \\
        -m flows.train_script --stage finetune --config paper-8b ...   # needs pip install deepspeed

(launch from the repository root: the DeepSpeed yamls name their JSON relative to it). FSDP also
runs on CPU processes (gloo), as tests/core/training/test_fsdp.py does: ``--config_file
configs/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no ... --set run.device=cpu``.

``python -m flows.train_script ...`` runs one process. Several CPU processes (gloo), as the
tests run them: ``accelerate launch --multi_gpu --num_processes 2 -m flows.train_script
--set run.device=cpu ...`` (accelerate's torchrun-based launcher; the script's ``Accelerator(cpu=True)``
picks gloo) or ``torchrun --nproc_per_node 2 -m flows.train_script ...``. Note that
``accelerate launch --cpu --num_processes 2`` starts a single process unless it goes through mpirun
(``--mpirun_hostfile``); the script warns when it detects that. Every process must see the same
``--out`` (a shared filesystem across nodes); process 0 writes checkpoints, history and the final
model. Rerunning the same command resumes from the latest checkpoint (``--no-resume`` starts over).
Prints the metrics as JSON on process 0 (and writes ``<out>/metrics.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from perceptio_core.config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flows.train_script", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("finetune", "base"), default="finetune")
    p.add_argument("--config", default=None, help="profile name or YAML path (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", required=True, help="finetune: curated shard dir; base: examples JSON")
    p.add_argument("--out", required=True, help="output / checkpoint directory (shared by all processes)")
    p.add_argument("--base", default=None, help="finetune: base model dir (save_pretrained InternVL + tokenizer)")
    p.add_argument("--vqvae", default=None,
                   help="finetune: the train_vqvae artifact dir (the depth tokenizer; K and N are read from it)")
    p.add_argument("--depth-maps", default=None, help="finetune: the teacher_depth artifact dir (for L_rec)")
    p.add_argument("--sam2", default=None,
                   help="finetune: a SAM2 checkpoint in Meta's format to start from and embed "
                        "(the fit_sam2 artifact's model/sam2.pt); a released one: --set model.sam2_checkpoint=...")
    p.add_argument("--tokenizer-texts", default=None, help="base: JSON list of extra texts for the tokenizer")
    p.add_argument("--no-resume", action="store_true", help="ignore (and delete) existing checkpoints")
    p.add_argument("--dump-grads", default=None, help="write the first step's synchronised gradients here")
    return p.parse_args(argv)


def _warn_single_cpu_launch() -> None:
    """``accelerate launch --cpu --num_processes N`` starts ONE process unless it runs through mpirun
    (``--mpirun_hostfile``); it still sets MASTER_ADDR. Say so instead of silently training alone."""
    env = os.environ
    launched_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_ADDR" in env
    ranked = any(k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"))
    if launched_cpu and not ranked:
        logging.getLogger(__name__).warning(
            "accelerate launch --cpu started a single process (its multi-CPU launcher needs mpirun and "
            "--mpirun_hostfile); for N CPU processes on gloo use `accelerate launch --multi_gpu "
            "--num_processes N -m flows.train_script --set run.device=cpu ...` or "
            "`torchrun --nproc_per_node N -m flows.train_script ...`"
        )


def main(argv: list[str] | None = None) -> int:
    from perceptio_core.device import cpu_thread_env

    cpu_thread_env()  # before torch loads: half the cores, passive OpenMP waits (an export wins)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _warn_single_cpu_launch()
    cfg = load_config(args.config, args.overrides)
    from perceptio_core.training.tracking import TrackingSpec, tracking_scope

    # tracked like the stage's own fit (run.trackers), under <out>/tracking/<launch time>/<stage>
    spec = TrackingSpec.for_stage(cfg, time.strftime("launch-%Y%m%d-%H%M%S"), args.stage, workdir=args.out)
    with tracking_scope(spec):
        metrics = _fit(args, cfg)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        print(json.dumps(metrics, sort_keys=True))
    state.wait_for_everyone()
    state.destroy_process_group()
    return 0


def _fit(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    if args.stage == "base":
        from perceptio_core.training.base_fit import fit_base

        examples = json.loads(Path(args.data).read_text())
        texts = json.loads(Path(args.tokenizer_texts).read_text()) if args.tokenizer_texts else None
        metrics = fit_base(
            examples, cfg, args.out, resume=not args.no_resume, tokenizer_texts=texts, grad_dump_dir=args.dump_grads
        )
    else:
        from perceptio_core.training.finetune import finetune

        if args.vqvae is None:
            raise SystemExit("--stage finetune needs --vqvae (the train_vqvae artifact: the depth codec, K and N)")
        metrics = finetune(
            cfg, args.data, args.out, base_dir=args.base, depth_tokenizer=args.vqvae,
            depth_maps_dir=args.depth_maps, sam2_checkpoint=args.sam2, resume=not args.no_resume, grad_dump_dir=args.dump_grads,
        )  # fmt: skip
    return metrics


if __name__ == "__main__":
    sys.exit(main())
