"""A workdir remembers its profile (issue 21): ``perceptio run`` records the profile and overrides in
``<workdir>/perceptio-workdir.json``, and ``stages``, ``lineage``, ``verify`` and a plain ``run`` given
the workdir alone use them, saying so; ``--config`` or ``--set`` given means "as given". Also what a
newcomer meets first: a profile name beside a folder of that name, and a CLI that answers ``--help``
and a config error without loading torch, transformers or Prefect.

Every command runs in a process of its own (see ``_cli`` in tests/flows/test_data_roots.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perceptio_core.config import WORKDIR_RECORD, load_config, remember_profile
from storage import ArtifactStore, Manifest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "prefect")


def _cli(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``perceptio ARGV`` in a process of its own, run from ``cwd`` (the repository on its path)."""
    code = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip


def _keys(out: str) -> dict[str, str]:
    """``{stage: key}`` of a ``perceptio stages`` table."""
    rows = [ln.split() for ln in out.splitlines()[2:] if ln.strip()]
    return {r[0]: r[1] for r in rows if len(r) >= 3 and r[2] in ("fresh", "stale", "off")}


def _states(out: str) -> dict[str, str]:
    rows = [ln.split() for ln in out.splitlines()[2:] if ln.strip()]
    return {r[0]: r[2] for r in rows if len(r) >= 3 and r[2] in ("fresh", "stale")}


def test_stages_given_the_workdir_alone_uses_the_remembered_profile(tmp_path):
    wd = tmp_path / "w"
    remember_profile(wd, "smoke", ["vqvae.steps=41"], run_id="r0")
    remembered = _cli(["stages", "--workdir", str(wd)])
    assert remembered.returncode == 0, remembered.stderr
    given = _cli(["stages", "--config", "smoke", "--set", "vqvae.steps=41", "--workdir", str(wd)])
    assert _keys(remembered.stdout) == _keys(given.stdout) and len(_keys(given.stdout)) == 11
    assert (f"perceptio: profile smoke, --set vqvae.steps=41 (remembered in {wd / WORKDIR_RECORD}"
            in remembered.stderr)  # fmt: skip
    assert "remembered" not in given.stderr and "perceptio: profile" not in given.stderr

    # --config given wins; --set alone is on the default profile, and says the record is not used
    tiny = _cli(["stages", "--config", "tiny", "--workdir", str(wd)])
    assert _keys(tiny.stdout)["sources"] != _keys(given.stdout)["sources"] and "remembered" not in tiny.stderr
    only_set = _cli(["stages", "--set", "vqvae.steps=41", "--workdir", str(wd)])
    assert _keys(only_set.stdout) == _keys(_cli(["stages", "--config", "tiny", "--set", "vqvae.steps=41",
                                                 "--workdir", str(wd)]).stdout)  # fmt: skip
    assert (f"perceptio: profile tiny (the default: --set given, so {wd / WORKDIR_RECORD} (profile smoke) "
            "is not used)") in only_set.stderr  # fmt: skip

    # no record: the default profile, and a line saying so
    bare = _cli(["stages", "--workdir", str(tmp_path / "new")])
    assert f"perceptio: profile tiny (the default: {tmp_path / 'new'} has no {WORKDIR_RECORD})" in bare.stderr


def test_lineage_and_verify_read_the_remembered_store(tmp_path):
    """The store and the keys are the remembered config's: ``lineage train_vqvae`` finds the artifact
    (it said "not in the store" under tiny's keys) and ``verify`` checks ``run.store`` of the record."""
    from tasks.runner import compute_keys
    from tasks.stages import STAGES

    wd, store_dir = tmp_path / "w", tmp_path / "elsewhere"
    overrides = [f"run.store={store_dir}"]
    remember_profile(wd, "smoke", overrides)
    cfg = load_config("smoke", [*overrides, f"run.workdir={wd}"])
    keys = {s: k for s, (k, _) in compute_keys(cfg, STAGES, wd.resolve()).items()}
    store = ArtifactStore(store_dir)
    for stage, inputs in (("sources", {}), ("teacher_depth", {"sources": keys["sources"]}),
                          ("train_vqvae", {"sources": keys["sources"], "teacher_depth": keys["teacher_depth"]})):
        w = store.writer(stage, keys[stage])
        with w.atomic("x") as f:
            f.write(stage.encode())
        w.commit(Manifest(stage=stage, key=keys[stage], url="", inputs=inputs))

    r = _cli(["lineage", "train_vqvae", "--workdir", str(wd)])
    assert r.returncode == 0, r.stderr
    assert "remembered in" in r.stderr
    assert [ln.split()[0] for ln in r.stdout.splitlines() if not ln.startswith(" ")] == [
        f"train_vqvae/{keys['train_vqvae']}", f"teacher_depth/{keys['teacher_depth']}", f"sources/{keys['sources']}"]
    assert r.stdout.count(f"    <- sources/{keys['sources']}") == 2  # named by each artifact it feeds
    assert r.stdout.count(store.artifact_url("sources", keys["sources"])) == 1  # in the remembered run.store

    v = _cli(["verify", "--workdir", str(wd)])
    assert v.returncode == 0, v.stderr
    assert f"store {store.url}: 3 artifact(s) checked" in v.stdout


def test_a_profile_name_beside_a_folder_of_that_name(tmp_path):
    """``perceptio run --config smoke`` where the current folder holds a folder ``smoke``: the profile
    (it crashed with IsADirectoryError); an unknown name lists the profiles."""
    (tmp_path / "smoke").mkdir()
    r = _cli(["run", "--config", "smoke", "--set", "vqvae.stepz=3", "--workdir", str(tmp_path / "w")], cwd=tmp_path)
    assert r.returncode == 2 and "perceptio: error: unknown config key vqvae.stepz" in r.stderr, r.stderr
    r = _cli(["stages", "--config", "smoke", "--workdir", str(tmp_path / "w")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli(["stages", "--config", "smok", "--workdir", str(tmp_path / "w")], cwd=tmp_path)
    assert r.returncode == 2 and "unknown profile 'smok' (profiles: " in r.stderr and "smoke" in r.stderr
    assert not (tmp_path / "w" / WORKDIR_RECORD).exists()  # a command that failed remembers nothing


@pytest.mark.parametrize("argv", [["--help"], ["run", "--set", "vqvae.stepz=3"], ["stages", "--config", "smoke"]])
def test_help_a_config_error_and_stages_load_no_heavy_module(argv, tmp_path):
    """``--help`` and a config error need neither torch nor transformers nor Prefect, and neither
    does ``perceptio stages`` (cache keys only): they answer in about a second (bench/bench_cli.py)."""
    code = ("import sys\nfrom flows.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    rc = e.code\nprint('LOADED', sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[0].split(','))))\n"
            "sys.exit(rc)\n")  # fmt: skip
    extra = [] if argv == ["--help"] else ["--workdir", str(tmp_path / "w")]
    r = subprocess.run([sys.executable, "-c", code.replace("sys.argv[0]", repr(",".join(HEAVY))), *argv, *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode in (0, 2), r.stderr
    assert "LOADED []" in r.stdout, (argv, r.stdout[-500:])


@pytest.mark.slow
def test_a_run_records_its_profile_and_a_plain_run_uses_it(tmp_path):
    wd = tmp_path / "w"
    first = _cli(["run", "--config", "smoke", "--set", "vqvae.steps=41", "--workdir", str(wd), "--only", "sources"])
    assert first.returncode == 0, first.stderr[-3000:]
    rec = json.loads((wd / WORKDIR_RECORD).read_text())
    assert (rec["profile"], rec["overrides"], rec["flow"]) == ("smoke", ["vqvae.steps=41"], "perceptio-pipeline")
    assert (wd / "runs" / rec["run_id"] / "summary.json").is_file()

    again = _cli(["run", "--workdir", str(wd), "--only", "sources"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"perceptio: profile smoke, --set vqvae.steps=41 (remembered in {wd / WORKDIR_RECORD}" in again.stderr
    summary = json.loads(Path(again.stdout.strip().splitlines()[-1].removeprefix("summary: ")).read_text())
    assert summary["stages"]["sources"]["status"] == "cached"  # smoke's sources, not tiny's
    assert _states(_cli(["stages", "--workdir", str(wd)]).stdout)["sources"] == "fresh"
