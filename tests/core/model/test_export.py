"""``export_model`` (``perceptio export``): a self-contained folder that ``PerceptioModel.from_pretrained``
loads with nothing else, merged or not; equivalence with the source model, the model card, the
manifest check, atomic writing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from perceptio_core.config import LossConfig
from perceptio_core.model.export import (
    EXPORT_JSON,
    MODEL_CARD,
    ExportError,
    export_model,
    probe_tolerance,
    verify_export,
)
from perceptio_core.model.generation import generate
from perceptio_core.model.internvl import build_tiny_internvl, new_token_rows
from perceptio_core.model.perceptio_model import PerceptioModel
from perceptio_core.model.sam2_decoder import build_sam2

from perceptio_helpers import (  # noqa: F401
    StandInDepthTokenizer,
    build_tiny,
    examples,
    one_torch_thread,
    png_bytes,
    tiny_depth_tokenizer,
    tiny_model_config,
    tiny_tokenizer,
)

FORCE = "[SEG]<d_start>"  # a random model does not emit the block by itself: force it
METRICS = {"finetune.llm_last": 1.25, "evaluate.refcoco.val.ciou": 0.375, "evaluate.hardblink.mean.accuracy": 0.5}
LINEAGE = [
    {"stage": "finetune", "key": "ft-key-1", "config_digest": "cfg-ft", "code_digest": "code-ft",
     "git_commit": "0123456789ab", "run_id": "run-1", "inputs": ["train_vqvae/vq-key-2"]},
    {"stage": "train_vqvae", "key": "vq-key-2", "config_digest": "cfg-vq", "code_digest": "code-vq",
     "git_commit": "0123456789ab", "run_id": "run-0", "inputs": []},
]  # fmt: skip
MERGED_ATOL = 1e-4  # float32: (W + s B A) x against W x + s B (A x)


def _perturb(model: PerceptioModel, scale: float = 0.05) -> None:
    """Move every trainable parameter off its initialisation (LoRA B starts at 0, the new rows all
    equal), so that the adapter and the trained rows matter."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@torch.no_grad()
def _logits(model: PerceptioModel, batch: dict) -> torch.Tensor:
    """[B, T, V] logits of every position of a collated batch (image and text)."""
    model.eval()
    return model.lm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], logits_from=0).logits


def _generated(model: PerceptioModel) -> tuple[list[int], list[int]]:
    """Greedy response ids of a forced perception block, and of a free answer."""
    img = png_bytes(seed=3)
    forced = generate(model, model.tokenizer, img, "Please segment the object described as: the red cube.",
                      max_new_tokens=model.num_depth_tokens + 4, response_prefix=FORCE)  # fmt: skip
    free = generate(model, model.tokenizer, img, "What colour is the box?", max_new_tokens=6, constrained=False)
    return forced.token_ids, free.token_ids


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained-looking tiny model whose base lives in its own folder (``model.base`` set, so the
    saved model does not hold it, as at paper scale) with an untied LM head, saved; its reference
    outputs; then both exports, and the base and model folders removed."""
    root = tmp_path_factory.mktemp("export")
    tok = tiny_tokenizer()
    n_vocab = len(tok)
    base = build_tiny_internvl(tiny_model_config().tiny, tok)
    head = base.get_output_embeddings().weight.detach().clone()
    assert not torch.equal(head, base.get_input_embeddings().weight)  # untied
    base.save_pretrained(root / "base")
    model = PerceptioModel.build(tiny_model_config(base=str(root / "base")), LossConfig(), tiny_depth_tokenizer(),
                                 tokenizer=tok)  # fmt: skip
    _perturb(model)
    model.save_pretrained(root / "run" / "model")
    assert not (root / "run" / "model" / "base").exists()  # the base is referenced, not stored
    # a file the run's tokenizer folder holds beyond what save_pretrained writes (processor files)
    extra = root / "run" / "model" / "tokenizer" / "processor_extra.json"
    extra.write_text(json.dumps({"note": "copied verbatim"}) + "\n")
    batch = model.collator()(examples(model.num_depth_tokens, model.codebook_size))
    ref = {
        "logits": _logits(model, batch),
        "generated": _generated(model),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "head_rows": new_token_rows(model.vlm, list(range(n_vocab)))[1].detach().clone(),
        "token_rows": [t.detach().clone() for t in new_token_rows(model.vlm, model.token_ids.all)],
        "checkpoint_head": head[:n_vocab],
        "n_vocab": n_vocab,
        "tokenizer_files": {p.relative_to(root / "run" / "model" / "tokenizer").as_posix(): p.read_bytes()
                            for p in (root / "run" / "model" / "tokenizer").rglob("*") if p.is_file()},
    }  # fmt: skip
    results = {}
    for name, merge in (("unmerged", False), ("merged", True)):
        results[name] = export_model(root / "run" / "model", root / "staging" / name, merge=merge, metrics=METRICS,
                                     lineage=LINEAGE, source={"run_id": "run-1"})  # fmt: skip
    # nothing of the run is left: the base checkpoint and the model folder are gone, the exports moved
    shutil.rmtree(root / "base")
    shutil.rmtree(root / "run")
    shutil.move(str(root / "staging"), str(root / "moved"))
    return {"root": root, "dirs": {n: root / "moved" / n for n in results}, "results": results, "ref": ref,
            "batch": batch}  # fmt: skip


@pytest.fixture()
def elsewhere(tmp_path, monkeypatch):
    """Run from a different working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_unmerged_export_reproduces_the_source_without_store_or_base(world, elsewhere):
    d = world["dirs"]["unmerged"]
    files = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
    assert {"config.json", "adapter/adapter_model.safetensors", "base/model.safetensors", "heads.safetensors",
            "sam2.safetensors", "depth_tokenizer/model.safetensors", "tokenizer/tokenizer.json",
            "tokenizer/processor_extra.json", MODEL_CARD, EXPORT_JSON} <= files  # fmt: skip
    assert "sam2_frozen.safetensors" not in files and not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    meta = json.loads((d / "config.json").read_text())
    assert meta["merged"] is False and meta["model"]["base"] is None and meta["model"]["sam2_checkpoint"] is None
    loaded = PerceptioModel.from_pretrained(d)
    assert hasattr(loaded.vlm, "get_base_model") and not loaded.trainable_parameters() and not loaded.training
    torch.testing.assert_close(_logits(loaded, world["batch"]), world["ref"]["logits"], rtol=0, atol=1e-6)
    assert _generated(loaded) == world["ref"]["generated"]
    ref_state, n = world["ref"]["state"], world["ref"]["n_vocab"]
    for k, v in loaded.state_dict().items():  # every weight and buffer, the whole SAM2 and the codec included
        if "token_adapter.base_layer" in k:  # the new rows under the trained-token adapter are unused
            v, ref_state_k = v[:n], ref_state[k][:n]
        else:
            ref_state_k = ref_state[k]
        assert torch.equal(v, ref_state_k), k
    # a model exported unmerged can be fine-tuned further
    again = PerceptioModel.from_pretrained(d, trainable=True)
    assert again.trainable_parameters()


def test_merged_export_reproduces_the_source_within_tolerance(world, elsewhere):
    d = world["dirs"]["merged"]
    files = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
    assert not any(f.startswith("adapter/") for f in files) and {"base/model.safetensors", "sam2.safetensors"} <= files
    assert json.loads((d / "config.json").read_text())["merged"] is True
    base_state = load_file(str(d / "base" / "model.safetensors"))
    assert not any("lora_" in k or "trainable_tokens" in k or "base_layer" in k for k in base_state)
    loaded = PerceptioModel.from_pretrained(d)
    assert not hasattr(loaded.vlm, "get_base_model")  # the plain InternVL
    assert not loaded.trainable_parameters() and not loaded.training
    assert probe_tolerance("float32", merged=True) == MERGED_ATOL
    torch.testing.assert_close(_logits(loaded, world["batch"]), world["ref"]["logits"], rtol=0, atol=MERGED_ATOL)
    assert _generated(loaded) == world["ref"]["generated"]
    # the trained rows of the K + 3 tokens are in the merged embeddings and head
    ids = loaded.token_ids.all
    ref_state = world["ref"]["state"]
    embed, head = new_token_rows(loaded.vlm, ids)
    assert torch.equal(embed, world["ref"]["token_rows"][0]) and torch.equal(head, world["ref"]["token_rows"][1])
    for k, v in loaded.state_dict().items():  # SAM2, projection and codec are the source's
        if k.startswith(("sam2.", "seg_projection.", "depth_tokenizer.")):
            assert torch.equal(v, ref_state[k]), k
    with pytest.raises(ValueError, match="merged.*cannot be trained further"):
        PerceptioModel.from_pretrained(d, trainable=True)
    with pytest.raises(ValueError, match="carries its own merged base"):
        PerceptioModel.from_pretrained(d, base="somewhere")


@pytest.mark.parametrize("name", ["unmerged", "merged"])
def test_head_rows_of_the_original_vocabulary_are_the_checkpoints_and_stay_untied(world, name, elsewhere):
    loaded = PerceptioModel.from_pretrained(world["dirs"][name])
    n = world["ref"]["n_vocab"]
    embed, head = new_token_rows(loaded.vlm, list(range(n)))
    assert torch.equal(head, world["ref"]["checkpoint_head"]) and torch.equal(head, world["ref"]["head_rows"])
    assert not torch.equal(head, embed)
    base = loaded.base_model
    assert base.get_output_embeddings().weight.data_ptr() != base.get_input_embeddings().weight.data_ptr()
    assert base.config.get_text_config().tie_word_embeddings is False


@pytest.mark.parametrize("name", ["unmerged", "merged"])
def test_tokenizer_folder_is_the_runs_and_the_card_holds_metrics_and_lineage(world, name):
    d = world["dirs"][name]
    for rel, data in world["ref"]["tokenizer_files"].items():
        assert (d / "tokenizer" / rel).read_bytes() == data, rel
    card = (d / MODEL_CARD).read_text()
    record = json.loads((d / EXPORT_JSON).read_text())
    for k, v in METRICS.items():
        assert f"| {k} | {v:.4g} |" in card and record["metrics"][k] == v
    for row in LINEAGE:
        assert f"| {row['stage']} | {row['key']} | {row['config_digest']} | {row['code_digest']} |" in card
    assert record["lineage"] == LINEAGE and record["merged"] is (name == "merged")
    assert "PerceptioModel.from_pretrained" in card and f"perceptio infer --model {name}" in card
    assert '"lora_rank": 16' in card  # the config
    assert record["source"]["run_id"] == "run-1" and record["source"]["base"].endswith("base")
    tol = probe_tolerance("float32", merged=name == "merged")
    assert record["check"]["tolerance"] == tol and all(v <= tol for v in record["check"]["outputs"].values())
    assert world["results"][name].files == len(record["files"]) and EXPORT_JSON not in record["files"]
    assert verify_export(d)["files"] == record["files"]


def test_a_tampered_missing_or_extra_file_is_refused_naming_it(world, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(world["dirs"]["unmerged"], d)
    heads = d / "heads.safetensors"
    data = bytearray(heads.read_bytes())
    data[-1] ^= 0x01  # same size, other bytes
    heads.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"heads\.safetensors \(sha256 mismatch\)"):
        PerceptioModel.from_pretrained(d)
    shutil.copyfile(world["dirs"]["unmerged"] / "heads.safetensors", heads)
    (d / "tokenizer" / "added_tokens.json").write_text("{}")  # a file a loader would pick up
    with pytest.raises(ExportError, match=r"tokenizer/added_tokens\.json \(not in the manifest\)"):
        PerceptioModel.from_pretrained(d)
    (d / "tokenizer" / "added_tokens.json").unlink()
    (d / "sam2.safetensors").unlink()
    with pytest.raises(ExportError, match=r"sam2\.safetensors \(missing\)"):
        PerceptioModel.from_pretrained(d)


def test_sam2_from_a_meta_checkpoint_is_stored_whole(tmp_path):
    """A run that started SAM2 from Meta's checkpoint: the export holds the whole SAM2 and loads
    after the checkpoint is gone."""
    sam2 = build_sam2("tiny-128", seed=7)
    torch.save({"model": dict(sam2.state_dict())}, str(tmp_path / "sam2.pt"))  # Meta's layout
    model = build_tiny(sam2_checkpoint=str(tmp_path / "sam2.pt"))
    _perturb(model)
    model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "sam2_frozen.safetensors").exists()  # referenced, not stored
    export_model(tmp_path / "model", tmp_path / "export", check_reload=False)
    source_sam2 = {k: v.clone() for k, v in model.sam2.state_dict().items()}
    (tmp_path / "sam2.pt").unlink()
    shutil.rmtree(tmp_path / "model")
    loaded = PerceptioModel.from_pretrained(tmp_path / "export")
    assert loaded.model_cfg.sam2_checkpoint is None
    state = loaded.sam2.state_dict()
    assert state.keys() == source_sam2.keys() and all(torch.equal(state[k], source_sam2[k]) for k in state)


def test_written_atomically_never_over_an_existing_folder_unless_asked(tmp_path, monkeypatch):
    src = tmp_path / "model"
    build_tiny().save_pretrained(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="exists"):
        export_model(src, out)
    assert (out / "old.txt").read_text() == "old"
    # a failing check leaves the old folder as it was and no temporary folder behind
    import perceptio_core.model.export as export_mod

    with monkeypatch.context() as m:
        m.setattr(export_mod, "probe_tolerance", lambda dtype, merged: -1.0)
        with pytest.raises(ExportError, match="does not reproduce"):
            export_model(src, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model", "out"] and (out / "old.txt").is_file()
    res = export_model(src, out, overwrite=True)  # no run record given: no metrics, no lineage
    assert res.path == out.resolve() and not (out / "old.txt").exists() and (out / EXPORT_JSON).is_file()
    card = (out / MODEL_CARD).read_text()
    assert "No run record was given: no metrics." in card and "No run record was given: no lineage." in card
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]
    with pytest.raises(ValueError, match="must not be inside"):
        export_model(src, src / "export")
    # a model trained with a codec that is not saved with it cannot be exported whole
    build_tiny(StandInDepthTokenizer()).save_pretrained(tmp_path / "standin")
    with pytest.raises(ExportError, match="must hold its codec"):
        export_model(tmp_path / "standin", tmp_path / "x", load_kwargs={"depth_tokenizer": StandInDepthTokenizer()})
    assert not (tmp_path / "x").exists() and sorted(os.listdir(tmp_path)) == ["model", "out", "standin"]
