"""Released checkpoints named by the paper profiles (tasks/checkpoints.py): every path under the
roots the profiles document, each missing one named with its ``--set`` before anything runs, the
OpenGVLab layout refused with the conversion command, and a checkpoint keyed on its content."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from perceptio_core.config import ConfigError, load_config
from tasks.checkpoints import content_digest, is_local
from tasks.runner import compute_keys
from tasks.stages import STAGES

PAPER_PROFILES = ["paper-8b", "paper-4b", "internvl3-8b"]
PATH_FIELDS = [("data", "root"), ("data", "mme"), ("data", "llava_json"), ("data", "glamm_json"),
               ("teacher", "checkpoint"), ("model", "base"), ("model", "tokenizer"), ("model", "sam2_checkpoint")]


@pytest.mark.parametrize("profile", PAPER_PROFILES)
def test_paper_profiles_name_only_the_documented_roots(profile):
    cfg = load_config(profile)
    paths = {f"{s}.{k}": getattr(getattr(cfg, s), k) for s, k in PATH_FIELDS}
    paths |= {f"data.mcq.{name}": tsv for name, tsv in cfg.data.mcq.items()}
    given = {k: v for k, v in paths.items() if v}
    assert {"data.root", "teacher.checkpoint", "model.base", "model.sam2_checkpoint"} <= set(given)
    for key, value in given.items():
        assert value.startswith(("/data/", "/checkpoints/")), (key, value)
    # the training shapes InternVL uses: 6 tiles to train, 12 to evaluate; steps from an epoch
    assert (cfg.model.max_tiles, cfg.evaluate.max_tiles, cfg.finetune.epochs) == (6, 12, 1.0)
    assert "-hf" not in cfg.model.base or profile == "internvl3-8b"  # no "InternVL2_5-8B-hf" exists


def _world_overrides(world: Path) -> list[str]:
    return [f"data.root={world}", "data.mcq={mmbench: vqa/mmbench_world.tsv}", "data.mme=MME_Benchmark_release_version",
            "data.llava_json=llava/llava_world.json", "data.glamm_json="]  # fmt: skip


def _keys_error(profile: str, overrides: list[str], workdir: Path) -> str:
    with pytest.raises((FileNotFoundError, ConfigError)) as info:
        compute_keys(load_config(profile, overrides), STAGES, workdir)
    return str(info.value)


def test_each_missing_checkpoint_is_named_with_its_set_before_any_stage(tiny_world, tmp_path):
    ov = _world_overrides(tiny_world)
    msg = _keys_error("paper-8b", ov, tmp_path / "w")
    assert "teacher.checkpoint /checkpoints/Depth-Anything-V2-Large-hf does not exist" in msg
    assert "--set teacher.checkpoint=PATH" in msg

    teacher = tmp_path / "da"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    ov.append(f"teacher.checkpoint={teacher}")
    msg = _keys_error("paper-8b", ov, tmp_path / "w")
    assert "model.base /checkpoints/InternVL2_5-8B-converted does not exist" in msg and "--set model.base=" in msg

    original = tmp_path / "InternVL2_5-8B"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"],
                                                      "model_type": "internvl_chat"}))  # fmt: skip
    msg = _keys_error("paper-8b", ov + [f"model.base={original}"], tmp_path / "w")
    assert "OpenGVLab's own layout" in msg and f"perceptio convert-internvl {original}" in msg

    native = tmp_path / "native"
    native.mkdir()
    (native / "config.json").write_text(json.dumps({"architectures": ["InternVLForConditionalGeneration"],
                                                    "model_type": "internvl"}))  # fmt: skip
    ov.append(f"model.base={native}")
    msg = _keys_error("paper-8b", ov, tmp_path / "w")
    assert "model.sam2_checkpoint /checkpoints/sam2.1_hiera_large.pt does not exist" in msg

    sam2 = tmp_path / "sam2.1_hiera_large.pt"
    sam2.write_bytes(b"weights")
    ov.append(f"model.sam2_checkpoint={sam2}")
    keys = compute_keys(load_config("paper-8b", ov), STAGES, tmp_path / "w")
    assert {"teacher_depth", "finetune", "evaluate"} <= set(keys) and "base" not in keys

    # a checkpoint replaced under the same path re-keys what was trained from it, and only that
    (native / "model.safetensors").write_bytes(b"other weights")
    again = compute_keys(load_config("paper-8b", ov), STAGES, tmp_path / "w")
    assert again["finetune"][0] != keys["finetune"][0] and again["evaluate"][0] != keys["evaluate"][0]
    assert again["teacher_depth"][0] == keys["teacher_depth"][0] and again["curate"][0] == keys["curate"][0]


def test_content_digest_is_cached_by_size_and_mtime_and_follows_the_bytes(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "a.safetensors").write_bytes(b"x" * 1000)
    (ck / ".hidden").write_bytes(b"ignored")
    cache = tmp_path / "cache"
    first = content_digest(ck, cache)
    assert json.loads((cache / "checkpoint-digests.json").read_text())  # one entry per file read
    assert content_digest(ck, cache) == first == content_digest(ck)  # cached or not, the same
    st = (ck / "a.safetensors").stat()
    (ck / "a.safetensors").write_bytes(b"y" * 1000)  # same size ...
    os.utime(ck / "a.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # ... new mtime
    assert content_digest(ck, cache) != first
    assert is_local("/x/y") and is_local("./x") and not is_local("OpenGVLab/InternVL3-8B-hf")
