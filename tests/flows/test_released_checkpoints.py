"""The released-checkpoint path end to end (issue "The released checkpoints, exactly as released"):
a tiny InternVL in OpenGVLab's own layout (InternLM2 text model, as InternVL2.5-8B) goes through
``perceptio convert-internvl``, and a tiny one in the transformers layout whose ``config.json``
lacks ``tie_word_embeddings`` (as the hub ships several) is used as it is; each then goes through a
short ``perceptio run`` with ``model.base`` set, ``perceptio export`` and ``perceptio infer
--model``. The LM head rows of the original vocabulary come out of the export equal to the
checkpoint's (an untied head stays untied). The converted logits against an independent reference
are tested in tests/core/model/test_convert.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.cli import main
from perceptio_core.config import TinyVLMConfig
from perceptio_core.model.internvl import build_tiny_internvl
from perceptio_core.model.processor import TileProcessor

from opengvlab_checkpoints import write_internlm2_checkpoint
from perceptio_helpers import tiny_tokenizer

pytestmark = pytest.mark.slow


def _head_and_embed(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head and input embedding of a saved InternVL (whatever key prefix transformers wrote)."""
    w: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        w.update(load_file(str(f)))
    (head,) = [v for k, v in w.items() if k.endswith("lm_head.weight")]
    (embed,) = [v for k, v in w.items() if k.endswith("embed_tokens.weight")]
    return head, embed


def _native_without_tie_key(path: Path) -> torch.Tensor:
    """A transformers-layout tiny InternVL (Qwen2 text model, untied head) saved with its tokenizer,
    chat template and processor, then its config stripped of ``tie_word_embeddings``. Returns the
    head weight as saved."""
    tok = tiny_tokenizer()
    model = build_tiny_internvl(TinyVLMConfig(), tok, seed=3)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    TileProcessor.for_model(model.config).save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    cfg["text_config"].pop("tie_word_embeddings", None)
    (path / "config.json").write_text(json.dumps(cfg))
    return model.lm_head.weight.detach().clone()


def _run_export_infer(tmp: Path, base: Path, name: str, merge: bool) -> Path:
    work = tmp / "work"
    assert main(["run", "--config", "smoke", "--set", f"model.base={base}", "--workdir", str(work)]) == 0
    out = tmp / f"export-{name}"
    assert main(["export", "--run", str(work), "--out", str(out), *(["--merge"] if merge else [])]) == 0
    image = sorted((work / "worlds").glob("*/images/train2014/*.jpg"))[0]
    answer = tmp / f"answer-{name}"
    assert main(["infer", "--model", str(out), "--image", str(image), "--query", "the red cube",
                 "--out", str(answer)]) == 0  # fmt: skip
    result = json.loads((answer / "result.json").read_text())
    assert result["model"] == str(out.resolve()) and isinstance(result["answer"], str)
    return out


def test_both_layouts_convert_train_export_and_answer_with_their_head(tmp_path):
    # OpenGVLab's layout: refused as it is, converted, then used
    src = tmp_path / "InternVL2_5-8B-tiny"
    original = write_internlm2_checkpoint(src)["weights"]["language_model.output.weight"]
    work = tmp_path / "work"
    assert main(["stages", "--config", "smoke", "--set", f"model.base={src}", "--workdir", str(work)]) == 2
    converted = tmp_path / "InternVL2_5-8B-tiny-converted"
    assert main(["convert-internvl", str(src), str(converted), "--dtype", "float32"]) == 0
    export = _run_export_infer(tmp_path, converted, "internlm2", merge=False)
    head, embed = _head_and_embed(export / "base")
    v0 = original.shape[0]
    assert torch.equal(head[:v0], original)  # the head of the original vocabulary is the checkpoint's
    assert not torch.equal(head[:v0], embed[:v0])  # untied

    # the transformers layout with no tie key: used directly, its head kept through a merged export
    native = tmp_path / "native-tiny"
    saved_head = _native_without_tie_key(native)
    export = _run_export_infer(tmp_path, native, "native", merge=True)
    meta = json.loads((export / "config.json").read_text())
    assert meta["merged"] is True and not (export / "adapter").exists()
    head, _ = _head_and_embed(export / "base")
    v0 = saved_head.shape[0]
    assert torch.equal(head[:v0], saved_head)  # LoRA never touches the head: merged, it is unchanged
    base_cfg = json.loads((export / "base" / "config.json").read_text())
    assert base_cfg["tie_word_embeddings"] is False  # recorded from the weights, not defaulted
    # the second run reused every stage upstream of fine-tuning (the base is finetune's input only)
    summaries = sorted((tmp_path / "work" / "runs").glob("*/summary.json"))
    last = json.loads(summaries[-1].read_text())["stages"]
    assert {s: r["status"] for s, r in last.items() if s not in ("finetune", "evaluate")} == {
        s: "cached" for s in last if s not in ("finetune", "evaluate")
    }
