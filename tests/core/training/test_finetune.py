"""The finetune stage's data boundary (SPEC §1, §4): K and N come from the depth codec (the
``train_vqvae`` artifact, read without its weights), and samples curated against another codebook
are refused by name."""

from __future__ import annotations

import pytest
import torch

from perceptio_core.config import VQVAEConfig, load_config
from perceptio_core.curation.sample import Sample
from perceptio_core.depth.codec import DepthCodecSpec
from perceptio_core.depth.vqvae import VQVAE
from perceptio_core.format.target import format_target
from perceptio_core.training.finetune import FinetuneTask, SampleToExample

from perceptio_helpers import StandInDepthTokenizer, png_bytes


def _sample(codes: list[int]) -> Sample:
    img = png_bytes(seed=0)
    return Sample(key="s-1", source="refcoco", split="train", task="depth_cot", image_digest="d" * 64, image=img,
                  prompt="Which point is the closest to the camera?", target=format_target(False, codes, "(A)"),
                  answer="(A)", masks_rle=[], depth_tokens=codes)  # fmt: skip


def test_samples_must_fit_the_codec():
    to_example = SampleToExample(DepthCodecSpec(16, 2, 8, source="vq/config.json"))  # K = 16, N = 4
    assert to_example(_sample([0, 5, 15, 3])).depth_tokens == [0, 5, 15, 3]
    with pytest.raises(ValueError, match=r"sample s-1: 9 depth tokens.*vq/config\.json.*N = 4, K = 16"):
        to_example(_sample(list(range(9))))
    with pytest.raises(ValueError, match=r"sample s-1: 4 depth tokens in \[0, 16\]"):
        to_example(_sample([0, 1, 2, 16]))


def test_the_task_reads_k_and_n_from_the_artifact_or_the_codec(tmp_path):
    cfg = load_config("tiny", ["run.device=cpu"])
    torch.manual_seed(0)
    VQVAE(VQVAEConfig(codebook_size=16, code_dim=8, grid=2, input_size=8, hidden=16)).save_pretrained(tmp_path / "vq")
    task = FinetuneTask(cfg, tmp_path / "shards", depth_tokenizer=tmp_path / "vq")
    assert task.depth_spec == DepthCodecSpec(16, 2, 8) and task.depth_spec.num_tokens == 4
    assert task.load_depth_tokenizer().num_tokens == 4
    assert task.fingerprint()["depth_codec"] == {"codebook_size": 16, "grid": 2, "map_size": 8, "num_tokens": 4}
    given = FinetuneTask(cfg, tmp_path / "shards", depth_tokenizer=StandInDepthTokenizer(codebook_size=8, grid=3))
    assert (given.depth_spec.codebook_size, given.depth_spec.num_tokens) == (8, 9)
