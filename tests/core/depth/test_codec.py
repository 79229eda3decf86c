"""The depth codec interface (SPEC §1, §2): the tokenizer satisfies it, K and N read from a saved
codebook artifact are the VQ-VAE config's, and mismatches are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from perceptio_core.config import VQVAEConfig
from perceptio_core.depth.codec import DepthCodec, DepthCodecSpec
from perceptio_core.depth.tokenizer import DepthTokenizer
from perceptio_core.depth.vqvae import VQVAE

from perceptio_helpers import StandInDepthTokenizer

CFG = VQVAEConfig(codebook_size=16, code_dim=8, grid=2, input_size=8, hidden=16)  # K = 16, N = 4


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A codebook artifact as ``train_vqvae`` writes it (config.json + model.safetensors)."""
    out = tmp_path_factory.mktemp("train_vqvae")
    torch.manual_seed(0)
    VQVAE(CFG).save_pretrained(out)
    return out


def test_the_tokenizer_and_the_test_stand_in_are_codecs(artifact):
    tok = DepthTokenizer.from_pretrained(artifact)
    assert isinstance(tok, DepthCodec) and isinstance(tok, torch.nn.Module)
    assert isinstance(StandInDepthTokenizer(), DepthCodec)
    assert (tok.codebook_size, tok.num_tokens, tok.grid, tok.map_size) == (16, 4, 2, 8)
    assert tok.encode(torch.rand(3, 20, 20)).shape == (3, tok.num_tokens)
    assert tok.decode(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 8, 8)
    assert tok.soft_decode(torch.randn(2, 4, 16)).shape == (2, 8, 8)
    assert not isinstance(object(), DepthCodec)


def test_k_and_n_read_from_the_artifact_are_the_vqvae_configs(artifact):
    spec = DepthCodecSpec.from_pretrained(artifact)  # config.json only: no weights loaded
    assert (spec.codebook_size, spec.num_tokens, spec.grid, spec.map_size) == (
        CFG.codebook_size, CFG.num_tokens, CFG.grid, CFG.input_size)  # fmt: skip
    assert spec.source == str(artifact / "config.json")
    assert spec == DepthCodecSpec.of(DepthTokenizer.from_pretrained(artifact))
    assert DepthCodecSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict() == {"codebook_size": 16, "grid": 2, "map_size": 8, "num_tokens": 4}


def test_mismatches_and_non_codecs_are_clear_errors(artifact, tmp_path):
    spec = DepthCodecSpec.from_pretrained(artifact)
    other = DepthCodecSpec.of(StandInDepthTokenizer(codebook_size=16, grid=3))  # N = 9
    with pytest.raises(ValueError, match=r"config\.json has K = 16, N = 4 .*StandInDepthTokenizer has K = 16, N = 9"):
        spec.check_matches(other)
    spec.check_matches(DepthCodecSpec(16, 2, 8, source="elsewhere"))  # the source is no part of the numbers
    with pytest.raises(TypeError, match="not a DepthCodec"):
        DepthCodecSpec.of(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="no depth codebook"):
        DepthCodecSpec.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"grid": 2}))
    with pytest.raises(ValueError, match="missing"):
        DepthCodecSpec.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not grid"):
        DepthCodecSpec.from_dict({"codebook_size": 16, "grid": 2, "map_size": 8, "num_tokens": 100})
