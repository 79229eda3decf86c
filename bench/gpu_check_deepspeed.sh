#!/usr/bin/env bash
# GPU check of the sharded launches (configs/accelerate/*.yaml): the DeepSpeed ZeRO-2/3 configs
# cannot run on the CPU machines (no deepspeed, no GPU), FSDP runs there on gloo
# (tests/core/training/test_fsdp.py) but not yet on NCCL + bf16. Run from the repo root on a GPU machine:
#
#   bash bench/gpu_check_deepspeed.sh            # the bench shape (InternVL2.5-1B-shaped, random weights,
#                                                #   LoRA 256, bf16, SAM2.1 Hiera-L), 3 steps per launch
#   SMOKE=1 bash bench/gpu_check_deepspeed.sh    # 1 layer per tower, tiny SAM2: the code path in ~2 min
#   CONFIGS="fsdp deepspeed_zero3" NPROCS="1 2" bash bench/gpu_check_deepspeed.sh
#
# For each config (ddp fsdp deepspeed_zero2 deepspeed_zero3) and process count (1, and 2 when the
# machine has 2 GPUs): `accelerate launch --config_file configs/accelerate/<c>.yaml -m flows.train_script
# --stage finetune` for 3 steps with a checkpoint every step, then a relaunch after removing the
# step-2/3 checkpoints and the final model (a kill after step 1). Then bench/results/gpu_check.json:
# per launch the exit status, peak memory, losses, and the largest difference of the final
# trained tensors (adapter + heads) to DDP's at the same process count and to the uninterrupted run.
# Expect: every launch exits 0; resumed == uninterrupted (FSDP exactly; DeepSpeed to bf16 rounding);
# the configs agree with DDP to bf16 tolerance (~1e-2 relative after 3 steps). Needs `pip install deepspeed`
# (done below if missing and the network allows; else install a wheel first).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/perceptio-gpu-check}
CONFIGS=${CONFIGS:-"ddp fsdp deepspeed_zero2 deepspeed_zero3"}
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
NPROCS=${NPROCS:-$([ "$NGPU" -ge 2 ] && echo "1 2" || echo "1")}
STEPS=${STEPS:-3}
if [ "$NGPU" -lt 1 ]; then echo "no GPU here: nothing to check"; exit 2; fi
python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 pip install "deepspeed>=0.15" || echo "deepspeed NOT installed: its launches will fail"
python -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null
mkdir -p "$OUT" bench/results

# inputs: the bench shape's base (save_pretrained) + tokenizer, a real DepthTokenizer (K 128, N 100), shards
SMOKE=${SMOKE:-0} OUT=$OUT python - <<'PY'
import os, sys
from pathlib import Path
sys.path[:0] = ["bench", "tests", "."]
import torch
from bench_train import CORPUS, build_base, make_shards
from perceptio_core.model.internvl import train_tokenizer
from perceptio_helpers import tiny_depth_tokenizer
out, smoke = Path(os.environ["OUT"]), os.environ["SMOKE"] == "1"
tok = train_tokenizer(CORPUS, 400)
base, _, _ = build_base("internvl2.5-1b", tok, torch.device("cpu"), smoke)
base.save_pretrained(str(out / "base")); tok.save_pretrained(str(out / "base"))
tiny_depth_tokenizer(codebook_size=128, grid=10, input_size=80).save_pretrained(out / "vqvae")
side = (128, 96) if smoke else (640, 480)
make_shards(out / "shards", 64, side[0], side[1], 128, 100)
print("inputs in", out)
PY
[ $? -eq 0 ] || { echo "input preparation failed"; exit 1; }

SAM2=$([ "${SMOKE:-0}" = 1 ] && echo tiny-test || echo sam2.1_hiera_large)
run() {  # run <config> <nprocs> <out dir>
  python -m accelerate.commands.launch --config_file "configs/accelerate/$1.yaml" --num_processes "$2" \
    --main_process_port $((29500 + RANDOM % 1000)) -m flows.train_script --stage finetune --config tiny \
    --data "$OUT/shards" --base "$OUT/base" --vqvae "$OUT/vqvae" --out "$3" \
    --set run.device=cuda --set finetune.steps="$STEPS" --set finetune.batch_size=1 --set finetune.grad_accum=2 \
    --set finetune.num_workers=2 --set finetune.checkpoint_every=1 --set finetune.keep_checkpoints=5 \
    --set model.lora_rank=256 --set model.lora_alpha=512 --set model.dtype=bfloat16 \
    --set model.gradient_checkpointing=true --set model.sam2_variant="$SAM2" > "$3.log" 2>&1
  echo $?
}
STATUS="$OUT/status.txt"; : > "$STATUS"
for c in $CONFIGS; do
  for n in $NPROCS; do
    d="$OUT/run-$c-$n"; rm -rf "$d" "$d-cut"
    rc=$(run "$c" "$n" "$d")
    rc_cut=skipped
    if [ "$rc" = 0 ]; then
      cp -r "$d" "$d-cut"; rm -rf "$d-cut/model"
      find "$d-cut/checkpoints" -maxdepth 1 -name 'step-*' ! -name step-00000001 -exec rm -rf {} +
      rc_cut=$(run "$c" "$n" "$d-cut")
    fi
    echo "$c $n $rc $rc_cut" | tee -a "$STATUS"
  done
done

OUT=$OUT python - <<'PY'
import json, os
from pathlib import Path
from safetensors.torch import load_file
out = Path(os.environ["OUT"])
def trained(d):
    m = d / "model"
    if not (m / "heads.safetensors").is_file():
        return None
    s = {f"heads/{k}": v.float() for k, v in load_file(str(m / "heads.safetensors")).items()}
    s.update({f"adapter/{k}": v.float() for k, v in load_file(str(m / "adapter" / "adapter_model.safetensors")).items()})
    return s
def maxdiff(a, b):
    if a is None or b is None or a.keys() != b.keys():
        return None
    return max(float((a[k] - b[k]).abs().max()) for k in a)
rows = []
for line in (out / "status.txt").read_text().splitlines():
    c, n, rc, rc_cut = line.split()
    d = out / f"run-{c}-{n}"
    m = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
    hist = [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()] if (d / "history.jsonl").is_file() else []
    rows.append({
        "config": c, "processes": int(n), "rc": int(rc), "rc_resumed": rc_cut,
        "peak_memory_gib": m.get("peak_memory_bytes", 0) / 2**30, "losses": [r["loss"] for r in hist],
        "samples_per_s": m.get("samples_per_s"),
        "max_diff_to_ddp": maxdiff(trained(d), trained(out / f"run-ddp-{n}")),
        "max_diff_resumed": maxdiff(trained(d), trained(Path(f"{d}-cut"))),
        "log_tail": (Path(f"{d}.log").read_text()[-1500:] if int(rc) != 0 else ""),
    })
res = Path("bench/results/gpu_check.json")
res.write_text(json.dumps(rows, indent=1) + "\n")
for r in rows:
    print(f"{r['config']:16s} x{r['processes']}: rc {r['rc']} (resumed {r['rc_resumed']}), peak {r['peak_memory_gib']:.1f} GiB, "
          f"losses {[round(x, 4) for x in r['losses']]}, vs DDP {r['max_diff_to_ddp']}, resumed vs not {r['max_diff_resumed']}")
print("wrote", res)
PY
