"""Config profiles load, overrides apply with type checks, errors name the key."""

import re

import pytest
import yaml

from perceptio_core import config as C
from perceptio_core.config import ConfigError, PerceptioConfig, dump_config, load_config


def test_every_profile_loads_and_matches_the_code():
    profiles = sorted(C.CONFIG_DIR.glob("*.yaml"))
    assert {p.stem for p in profiles} >= {"tiny"}
    for p in profiles:
        cfg = load_config(p.stem)
        assert isinstance(cfg, PerceptioConfig)
        # every key of the YAML is a field of the dataclass it configures (checked by load_config),
        # and the dump reloads to the same config
        again = load_config(p.stem)
        assert C.to_dict(cfg) == C.to_dict(again)


@pytest.mark.parametrize("profile", ["paper-8b", "paper-4b"])
def test_paper_profiles_carry_the_spec_values(profile):
    """SPEC §3/§4 values that the tiny profile departs from must not leak into the paper profiles."""
    cfg = load_config(profile)
    assert (cfg.loss.bce, cfg.loss.dice) == (1.0, 0.25)
    assert cfg.model.lora_rank == 256 and cfg.model.freeze_sam2_image_encoder
    assert cfg.model.sam2_checkpoint and cfg.model.base  # released weights: no fit stages
    assert (cfg.finetune.warmup_frac, cfg.finetune.max_grad_norm) == (0.05, 1.0)
    assert (cfg.vqvae.grid, cfg.vqvae.code_dim) == (10, 128)


def test_override_sets_typed_values():
    cfg = load_config("tiny", ["vqvae.steps=7", "vqvae.lr=0.5", "data.root=/x", "run.seed=3"])
    assert cfg.vqvae.steps == 7 and cfg.vqvae.lr == 0.5 and cfg.data.root == "/x" and cfg.run.seed == 3
    cfg = load_config("tiny", ["vqvae.lr=1"])  # an int where a float is expected is fine
    assert cfg.vqvae.lr == 1.0 and isinstance(cfg.vqvae.lr, float)


def test_derived_value_follows_its_base():
    cfg = load_config("tiny", ["vqvae.input_size=320"])
    assert cfg.vqvae.downsample == 32
    tiny = load_config("tiny", ["vqvae.grid=5", "vqvae.input_size=40"])
    assert tiny.vqvae.downsample == 8 and tiny.vqvae.num_tokens == 25


@pytest.mark.parametrize(
    "override, message",
    [
        ("vqvae.codebok_size=3", "unknown config key vqvae.codebok_size"),
        ("nosuch.x=1", "unknown config key nosuch"),
        ("vqvae.steps=ten", "vqvae.steps: expected an integer, got 'ten'"),
        ("vqvae.steps=1.5", "vqvae.steps: expected an integer"),
        ("data.refer_datasets=refcoco", "data.refer_datasets: expected a list"),
        ("vqvae.input_size=85", "multiple of vqvae.grid"),
        ("vqvae", "not of the form section.key=value"),
        # ranges and choices, refused when the config is loaded, not in a later stage
        ("teacher.fit=3", "teacher.fit is a section: give its fields (teacher.fit.<field>=...), not 3"),
        ("vqvae.steps=-5", "vqvae.steps and batch_size must be >= 1 and lr > 0"),
        ("finetune.steps=0", "finetune.steps must be >= 1, got 0"),
        ("base.precision=fp8", "base.precision must be auto, no, bf16 or fp16, got 'fp8'"),
        ("sam2_fit.warmup_frac=1.5", "sam2_fit.warmup_frac must be in [0, 1), got 1.5"),
        ("run.device=tpu", "run.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ("evaluate.batch_size=0", "evaluate.max_new_tokens, num_beams, depth_pairs, batch_size"),
        ("data.mcq.seedbench=3", "data.mcq.seedbench: expected a string, got 3"),
        ("run.trackers=[neptune]", "run.trackers must list distinct trackers among tensorboard, wandb, mlflow"),
        ("run.trackers=[tensorboard, tensorboard]", "run.trackers must list distinct trackers"),
        ("run.trackers=tensorboard", "run.trackers: expected a list"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [override])


def test_run_trackers_default_to_tensorboard_and_empty_turns_tracking_off():
    assert load_config("tiny").run.trackers == ["tensorboard"]
    assert load_config("tiny", ["run.trackers=[]"]).run.trackers == []
    assert load_config("tiny", ["run.trackers=[wandb, mlflow]"]).run.trackers == ["wandb", "mlflow"]


def test_bad_profile_key_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("vqvae:\n  steps: 3\n  colour: red\n")
    with pytest.raises(ConfigError, match="unknown config key vqvae.colour"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_config("nope")


def test_dump_reloads_identically(tmp_path):
    cfg = load_config("tiny", ["vqvae.steps=9"])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert C.to_dict(load_config(p)) == C.to_dict(cfg)
    assert yaml.safe_load(p.read_text())["vqvae"]["steps"] == 9


def test_a_mapping_field_takes_new_keys_from_set():
    cfg = load_config("tiny", ["data.mcq.seedbench=/data/SEEDBench_IMG.tsv", "data.mcq.mmbench="])
    assert cfg.data.mcq == {"mmbench": "", "seedbench": "/data/SEEDBench_IMG.tsv"}
    assert load_config("tiny", ["run.device=cuda:1"]).run.device == "cuda:1"


def test_a_profile_name_is_a_profile_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """``--config smoke`` with a folder (or a file) ``smoke`` in the current folder is the profile:
    only a ``/`` or a ``.yaml``/``.yml`` suffix makes a path (it crashed with IsADirectoryError)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").mkdir()
    (tmp_path / "tiny").write_text("vqvae: {steps: 1}\n")
    assert C.resolve_profile("smoke") == C.CONFIG_DIR / "smoke.yaml"
    assert C.resolve_profile("tiny") == C.CONFIG_DIR / "tiny.yaml"
    assert load_config("smoke").run.workdir == "perceptio-smoke"
    assert [C.is_profile_path(x) for x in ("smoke", "./smoke", "a/b", "x.yaml", "x.yml", tmp_path)] == [
        False, True, True, True, True, True]


def test_a_path_is_a_file_and_an_unknown_name_lists_the_profiles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("vqvae: {steps: 5}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine").write_text("vqvae: {steps: 6}\n")
    assert load_config("mine.yaml").vqvae.steps == 5
    assert load_config("sub/mine").vqvae.steps == 6  # a path without a suffix: it has a /
    with pytest.raises(ConfigError, match="config file not found: gone.yaml"):
        load_config("gone.yaml")
    with pytest.raises(ConfigError, match="config sub is not a file"):
        load_config("./sub")
    with pytest.raises(ConfigError) as e:
        load_config("mine")  # a file ``mine`` here is not looked at; ``mine.yaml`` is the way to name it
    assert "unknown profile 'mine'" in str(e.value) and "smoke, tiny" in str(e.value)
    (tmp_path / "mine").write_text("vqvae: {steps: 7}\n")
    with pytest.raises(ConfigError, match=r"a YAML file is named with a / or a \.yaml suffix"):
        load_config("mine")


def test_a_workdir_remembers_its_profile(tmp_path, monkeypatch):
    """What ``perceptio run`` records in a workdir (:func:`remember_profile`) reads back, a YAML file
    as its absolute path, ``run.workdir`` left out (the record's folder is the workdir)."""
    monkeypatch.chdir(tmp_path)
    assert C.remembered_profile(tmp_path / "w") is None
    C.remember_profile(tmp_path / "w", "smoke", ["vqvae.steps=3", "run.workdir=elsewhere"], run_id="r1")
    assert C.remembered_profile(tmp_path / "w") == ("smoke", ["vqvae.steps=3"])
    (tmp_path / "mine.yaml").write_text("vqvae: {steps: 5}\n")
    C.remember_profile(tmp_path / "w", "mine.yaml", [])
    assert C.remembered_profile(tmp_path / "w") == (str(tmp_path / "mine.yaml"), [])
    (tmp_path / "w" / C.WORKDIR_RECORD).write_text('{"profile": 3}')
    with pytest.raises(ConfigError, match="does not read as a workdir record"):
        C.remembered_profile(tmp_path / "w")
