"""The finetune stage sharded with FSDP2 (``accelerate launch --config_file configs/accelerate/fsdp.yaml``)
on 2 CPU processes (gloo), through the real entry point (``flows.train_script``) and the real tiny
Perceptio model (LoRA + new token rows + [SEG] projection + SAM2 mask decoder trained, base frozen).

* Sharding changes no number: the trained tensors after 3 steps equal those of the same launch
  under DDP (``--multi_gpu``, same per-process batches), to a stated tolerance.
* Exact resume: a run "killed" after its step-1 checkpoint (later checkpoints and the final model
  removed) and relaunched ends with the weights of the uninterrupted run.
* The final model (gathered whole on process 0) reloads with ``PerceptioModel.from_pretrained``
  and holds the trained tensors of the last checkpoint.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perceptio_helpers import one_torch_thread, tiny_depth_tokenizer, tiny_tokenizer  # noqa: F401

ROOT = Path(__file__).resolve().parents[3]
FSDP_YAML = ROOT / "configs" / "accelerate" / "fsdp.yaml"
STEPS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(launcher: list[str], args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env = {k: v for k, v in env.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           "-m", "flows.train_script", *args]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-8000:]}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Curated shards (12 samples, half with a mask), a tiny InternVL base with its tokenizer and
    a small real depth tokenizer (K = 16, N = 9) saved as the train_vqvae artifact."""
    from perceptio_core.config import TinyVLMConfig
    from perceptio_core.model.internvl import build_tiny_internvl

    from test_trainer import _shards

    d = tmp_path_factory.mktemp("fsdp-inputs")
    tok = tiny_tokenizer()
    build_tiny_internvl(TinyVLMConfig(), tok, seed=0).save_pretrained(str(d / "base"))
    tok.save_pretrained(str(d / "base"))
    tiny_depth_tokenizer(codebook_size=16, grid=3).save_pretrained(d / "vqvae")
    return {"data": _shards(d / "shards"), "base": d / "base", "vqvae": d / "vqvae"}


def _args(inputs, out: Path) -> list[str]:
    sets = [f"finetune.steps={STEPS}", "finetune.batch_size=1", "finetune.grad_accum=2", "finetune.num_workers=0",
            "finetune.checkpoint_every=1", "finetune.keep_checkpoints=5", "model.lora_rank=4", "model.lora_alpha=8",
            "run.device=cpu"]  # fmt: skip
    args = ["--stage", "finetune", "--config", "tiny", "--data", str(inputs["data"]), "--base", str(inputs["base"]),
            "--vqvae", str(inputs["vqvae"]), "--out", str(out)]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    return args


def _trained(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


@pytest.mark.slow
def test_fsdp_trains_like_ddp_resumes_exactly_and_saves_a_model_that_reloads(tmp_path, inputs):
    from perceptio_core.model.perceptio_model import PerceptioModel
    from perceptio_core.training.trainer import read_history

    ddp, fsdp, cut = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "cut"
    _launch(["--multi_gpu"], _args(inputs, ddp))
    _launch(["--config_file", str(FSDP_YAML)], _args(inputs, fsdp))

    # it did shard: FSDP2 in the metrics and the checkpoint fingerprint; DDP's have neither
    m_fsdp = json.loads((fsdp / "metrics.json").read_text())
    m_ddp = json.loads((ddp / "metrics.json").read_text())
    assert m_fsdp.get("fsdp") == 1.0 and "fsdp" not in m_ddp and m_fsdp["num_processes"] == 2
    meta = json.loads((fsdp / "checkpoints" / f"step-{STEPS:08d}" / "meta.json").read_text())
    assert meta["fingerprint"]["sharding"] == "fsdp2" and "sharding" not in json.loads(
        (ddp / "checkpoints" / f"step-{STEPS:08d}" / "meta.json").read_text())["fingerprint"]  # fmt: skip
    assert m_fsdp["trainable_parameters"] == m_ddp["trainable_parameters"]

    # the same numbers as DDP: losses per step and the trained tensors (LoRA, token rows, [SEG]
    # projection, SAM2 mask decoder). Tolerance: reduce-scatter and all-reduce sum in other
    # orders (fp32) and Adam's m / sqrt(v) can magnify such 1e-7 relative gradient differences;
    # measured: max |FSDP - DDP| = 1.2e-7 after 3 steps at the tiny profile's lr 1e-3 (updates of
    # up to 1.5e-3); allowed: atol 2e-6
    h_ddp, h_fsdp = read_history(ddp / "history.jsonl"), read_history(fsdp / "history.jsonl")
    assert [r["step"] for r in h_fsdp] == list(range(1, STEPS + 1))
    for a, b in zip(h_ddp, h_fsdp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["seg_bce"] == pytest.approx(a["seg_bce"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    w_ddp, w_fsdp = _trained(ddp, STEPS), _trained(fsdp, STEPS)
    # DDP's checkpoint keys carry its wrapper's "module." prefix
    w_ddp = {k.removeprefix("module."): v for k, v in w_ddp.items()}
    assert w_ddp.keys() == w_fsdp.keys()
    kinds = {"lora_": 0, "trainable_tokens_": 0, "seg_projection.": 0, "sam_mask_decoder.": 0}
    fresh = {k.removeprefix("module."): v for k, v in _trained(ddp, 1).items()}
    for k in w_ddp:
        torch.testing.assert_close(w_fsdp[k], w_ddp[k], rtol=0, atol=2e-6, msg=k)
        kinds = {s: n + (s in k) for s, n in kinds.items()}
    assert all(n > 0 for n in kinds.values()), kinds
    assert sum(not torch.equal(w_ddp[k], fresh[k]) for k in w_ddp) > 0.9 * len(w_ddp)  # steps 2-3 moved them

    # exact resume: killed after the step-1 checkpoint, relaunched
    shutil.copytree(fsdp, cut)
    for p in [*(cut / "checkpoints").glob("step-*"), cut / "model"]:
        if p.name != "step-00000001":
            shutil.rmtree(p)
    _launch(["--config_file", str(FSDP_YAML)], _args(inputs, cut))
    w_cut = _trained(cut, STEPS)
    for k in w_fsdp:
        torch.testing.assert_close(w_cut[k], w_fsdp[k], rtol=0, atol=1e-6, msg=k)
    assert [r["loss"] for r in read_history(cut / "history.jsonl")] == pytest.approx(
        [r["loss"] for r in h_fsdp], rel=1e-6)  # fmt: skip

    # the final model, gathered on process 0, reloads and holds the trained tensors
    for f in ("adapter/adapter_model.safetensors", "heads.safetensors"):
        a, b = load_file(str(ddp / "model" / f)), load_file(str(fsdp / "model" / f))
        assert a.keys() == b.keys() and len(a) > 4
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-6, msg=f"{f}: {k}")
    model = PerceptioModel.from_pretrained(fsdp / "model")
    state = model.state_dict()
    checked = 0
    for k, v in w_fsdp.items():
        if "lora_" in k or k.startswith(("seg_projection.", "sam2.sam_mask_decoder.")):
            torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
            checked += 1
    assert checked > 10 and model.codebook_size == 16


# ---- the accelerate configs, checked offline (DeepSpeed is not installed here; no GPU) --------


def _launch_env(config: str) -> dict[str, str]:
    """The ACCELERATE_* / FSDP_* environment ``accelerate launch --config_file <config>
    --num_processes 8`` gives the processes (accelerate's own parser, validation and env builders)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(ROOT / "configs" / "accelerate" / config), "--num_processes", "8", "x.py"])  # fmt: skip
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its deepspeed launcher
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_accelerate_configs_load_and_resolve(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    from perceptio_core.config import load_config
    from perceptio_core.training.sharding import configure_deepspeed

    zero = DistributedType.DEEPSPEED
    kinds = {"ddp.yaml": DistributedType.MULTI_GPU, "fsdp.yaml": DistributedType.FSDP,
             "deepspeed_zero2.yaml": zero, "deepspeed_zero3.yaml": zero}  # fmt: skip
    for name, kind in kinds.items():
        assert load_config_from_file(str(ROOT / "configs" / "accelerate" / name)).distributed_type == kind, name

    env = _launch_env("fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == [
        "Qwen2DecoderLayer", "LlamaDecoderLayer", "InternVLVisionLayer"]  # fmt: skip

    loop = load_config("paper-8b").finetune
    for name, stage in (("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)):
        for k in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
            monkeypatch.delenv(k)
        env = _launch_env(name)
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.chdir(ROOT)  # the yaml names its JSON relative to the repo root (launch from there)
        ds = DeepSpeedPlugin()
        ds.set_mixed_precision("bf16")  # what the trainer's Accelerator(mixed_precision="bf16") does on CUDA
        ds.fill_match("gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=loop.grad_accum)
        configure_deepspeed(ds, loop)
        cfg = ds.deepspeed_config
        assert ds.zero_stage == stage and cfg["zero_optimization"]["stage"] == stage
        assert cfg["bf16"]["enabled"] is True and cfg["gradient_accumulation_steps"] == loop.grad_accum == 8
        assert cfg["gradient_clipping"] == loop.max_grad_norm
        assert "optimizer" not in cfg and "scheduler" not in cfg  # the trainer's AdamW and schedule are used
