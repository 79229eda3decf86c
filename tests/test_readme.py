"""The README's commands are run by tests, so a wrong README line is a failing test (STYLE rule 10).

Every command in a ```bash block of README.md is listed in :data:`RUN_BY`, with the test that runs
it. The CLI commands run here, on the ``smoke`` profile in a temporary work folder (``--workdir W``
added, and ``--config smoke`` where the README line names no profile and the workdir does not
remember one: the stage commands after the main job run as written, on the profile the workdir
remembers from its last run; placeholders such as ``photo.jpg`` or
``STORE/curate/KEY`` replaced by real files of that run), and what the README's comment claims
about the command ("reruns a, b and c") is checked against the run's summary. The few commands that
need a running server or CI's clean clone are run by the tests named in :data:`RUN_BY`.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main as cli_main
from perceptio_core.config import WORKDIR_RECORD
from tasks.stages import downstream_of, upstream_of

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SMOKE = ["--config", "smoke"]

# README command -> the test that runs it ("test_x" in this file, or "path::test" elsewhere)
RUN_BY = {
    "bash scripts/install.sh && perceptio run": "test_main_job_then_the_stage_commands",
    "bash scripts/install.sh && python3 -m pytest -q": "test_ci_runs_the_readme_test_command",
    "perceptio stages": "test_main_job_then_the_stage_commands",
    "perceptio run --set vqvae.steps=800": "test_main_job_then_the_stage_commands",
    "perceptio run --only teacher_depth": "test_main_job_then_the_stage_commands",
    "perceptio run --from train_vqvae": "test_main_job_then_the_stage_commands",
    "perceptio lineage train_vqvae": "test_main_job_then_the_stage_commands",
    "perceptio ablate":
        "tests/flows/test_pipeline_e2e.py::test_ablate_runs_a_variant_once_and_only_the_new_one_after",
    "perceptio verify":
        "tests/flows/test_pipeline_e2e.py::test_a_copied_workdir_reads_itself_and_damage_is_found_and_recomputed",
    "perceptio synth --out world --images 60 --seed 1": "test_synth_command",
    'perceptio infer --run perceptio-work --image photo.jpg --query "the red ball" --out answer/':
        "test_main_job_then_the_stage_commands",
    "perceptio run --config paper-8b --set data.root=/data/perceptio --set "
    "teacher.checkpoint=/ckpt/Depth-Anything-V2-Large-hf --set run.store=s3://bucket/perceptio":
        "test_paper_commands_name_what_is_missing",
    "accelerate launch --multi_gpu --num_processes 8 -m flows.train_script --config paper-8b --data "
    "STORE/curate/KEY --vqvae STORE/train_vqvae/KEY --depth-maps STORE/teacher_depth/KEY --set "
    "model.sam2_checkpoint=/ckpt/sam2.1_hiera_large.pt --out /scratch/finetune":
        "test_paper_commands_name_what_is_missing",
    "perceptio convert-internvl /checkpoints/InternVL2_5-8B /checkpoints/InternVL2_5-8B-converted":
        "test_paper_commands_name_what_is_missing",
    "accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8 -m flows.train_script "
    "--config paper-8b --data STORE/curate/KEY --vqvae STORE/train_vqvae/KEY --depth-maps STORE/teacher_depth/KEY "
    "--out /scratch/finetune-fsdp": "test_paper_commands_name_what_is_missing",
    "perceptio export --run perceptio-work --out perceptio-model --merge":
        "tests/flows/test_export_cli.py::test_readme_export_and_infer_model_commands",
    'perceptio infer --model perceptio-model --image photo.jpg --query "the red ball" --out answer/':
        "tests/flows/test_export_cli.py::test_readme_export_and_infer_model_commands",
    "prefect server start": "tests/server/test_server_lineage.py::test_first_run_graph_artifacts_and_asset_events",
    "prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api":
        "tests/server/test_server_lineage.py::test_first_run_graph_artifacts_and_asset_events",
    "perceptio run": "tests/server/test_server_lineage.py::test_first_run_graph_artifacts_and_asset_events",
}


def readme_commands(text: str | None = None) -> list[tuple[str, str]]:
    """``(command, comment)`` of every command in the ```bash blocks of the README, continuation
    lines joined; a line holding only a comment continues the previous command's comment."""
    text = README.read_text() if text is None else text
    out: list[tuple[str, str]] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            code, _, comment = line.partition("  #") if "  #" in line else (line, "", "")
            if not code.strip() and line.strip().startswith("#") and out:
                out[-1] = (out[-1][0], f"{out[-1][1]} {line.strip().lstrip('#').strip()}".strip())
                continue
            if code.rstrip().endswith("\\"):
                pending += code.rstrip()[:-1].strip() + " "
                continue
            cmd = (pending + code.strip()).strip()
            pending = ""
            if cmd:
                out.append((cmd, comment.strip()))
    return out


def _named_stages(comment: str) -> set[str]:
    """``"reruns a, b and c"`` -> ``{"a", "b", "c"}``."""
    m = re.match(r"reruns (.+?)(?:;|$)", comment)
    assert m, f"a README 'perceptio run --set' line must say what it reruns: {comment!r}"
    return {s.strip() for s in re.split(r",| and ", m.group(1)) if s.strip()}


def test_readme_parser_joins_continuations_and_comments():
    text = "x\n```bash\na --b \\\n    --c d   # one\n    # two\ne  # three\n```\n"
    assert readme_commands(text) == [("a --b --c d", "one two"), ("e", "three")]


def test_every_readme_command_is_run_by_a_test():
    commands = [c for c, _ in readme_commands()]
    assert sorted(set(commands)) == sorted(RUN_BY), "README commands and RUN_BY differ: add a test for the new line"
    here = {n.name for n in ast.parse(Path(__file__).read_text()).body if isinstance(n, ast.FunctionDef)}
    for test in set(RUN_BY.values()):
        if "::" in test:
            path, name = test.split("::")
            assert f"def {name}(" in (ROOT / path).read_text(), test
        else:
            assert test in here, test


def test_ci_runs_the_readme_test_command():
    test_cmd = next(c for c, _ in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci and (ROOT / "scripts" / "install.sh").is_file()


def _cli(cmd: str, workdir: Path, *, profile: bool = True) -> int:
    argv = shlex.split(cmd)
    assert argv[0] == "perceptio", cmd
    argv = argv[1:]
    if argv[0] in {"run", "stages", "lineage"}:
        # the workdir's own profile (perceptio-workdir.json) serves a line with neither --config nor
        # --set (either means "as given"); the main job, on a new workdir, is given smoke
        remembered = (workdir / WORKDIR_RECORD).is_file() and "--set" not in argv
        argv += (SMOKE if profile and "--config" not in argv and not remembered else []) + ["--workdir", str(workdir)]
    return cli_main(argv)


def _last_summary(workdir: Path) -> dict:
    runs = sorted((workdir / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return json.loads((runs[-1] / "summary.json").read_text())


def _readme(prefix: str) -> tuple[str, str]:
    return next((c, m) for c, m in readme_commands() if c.startswith(prefix))


@pytest.mark.slow
def test_main_job_then_the_stage_commands(tmp_path, capsys):
    wd = tmp_path / "work"
    main_job, _ = _readme("bash scripts/install.sh && perceptio run")
    assert _cli(main_job.split("&&")[1].strip(), wd) == 0  # the install half is CI's (.ci/run)
    first = _last_summary(wd)
    assert {s["status"] for s in first["stages"].values()} == {"computed"}

    capsys.readouterr()
    assert _cli(_readme("perceptio stages")[0], wd) == 0
    assert "stale" not in capsys.readouterr().out

    cmd, comment = _readme("perceptio run --set")
    assert _cli(cmd, wd) == 0
    status = {s: r["status"] for s, r in _last_summary(wd)["stages"].items()}
    assert {s for s, v in status.items() if v == "computed"} == _named_stages(comment), (cmd, comment)

    cmd, comment = _readme("perceptio run --only")
    assert "its upstream must be in the store" in comment
    assert _cli(cmd, wd) == 0
    only = _last_summary(wd)["stages"]  # the stage, and the upstream artifacts it read from the store
    assert set(only) == upstream_of("teacher_depth") | {"teacher_depth"}
    assert only.pop("teacher_depth")["status"] == "cached"  # nothing changed since the last run
    assert {r["status"] for r in only.values()} == {"reused"}

    cmd, comment = _readme("perceptio run --from")
    assert "downstream" in comment
    assert _cli(cmd, wd) == 0
    ran = {s for s, r in _last_summary(wd)["stages"].items() if r["status"] != "reused"}
    assert ran == downstream_of("train_vqvae") and "train_vqvae" in ran

    capsys.readouterr()
    assert _cli(_readme("perceptio lineage")[0], wd) == 0
    keys = {s: r["key"] for s, r in first["stages"].items()}
    assert f"<- teacher_depth/{keys['teacher_depth']}" in capsys.readouterr().out

    cmd, _ = _readme("perceptio infer")
    image = next((wd / "worlds").rglob("COCO_train2014_*.jpg"))
    cmd = cmd.replace("--run perceptio-work", f"--run {wd}").replace("photo.jpg", str(image))
    cmd = cmd.replace("--out answer/", f"--out {tmp_path / 'answer'}")
    assert _cli(cmd, wd) == 0
    result = json.loads((tmp_path / "answer" / "result.json").read_text())
    files = {p.name for p in (tmp_path / "answer").iterdir()}
    assert "answer" in result and "the red ball" in result["prompt"]
    assert ("mask.png" in files) == (result["mask_png"] is not None)  # a mask when it emitted [SEG]
    assert ("depth.png" in files) == (result["depth_png"] is not None)  # a depth map from a whole block


@pytest.mark.slow
def test_synth_command(tmp_path, monkeypatch):
    cmd, comment = _readme("perceptio synth")
    assert "real formats" in comment
    monkeypatch.chdir(tmp_path)
    assert _cli(cmd, tmp_path) == 0
    images = int(re.search(r"--images (\d+)", cmd).group(1))
    assert len(list((tmp_path / "world" / "images" / "train2014").glob("*.jpg"))) == images
    assert (tmp_path / "world" / "refcoco" / "refs(unc).p").is_file()


@pytest.mark.slow
def test_paper_commands_name_what_is_missing(tmp_path):
    """Offline there is no /data/perceptio and no /ckpt: each paper command stops with an error that
    names what it could not find (the flags themselves parse, the entry point exists)."""
    cmd, _ = _readme("perceptio run --config paper-8b")
    argv = shlex.split(cmd)[1:] + ["--workdir", str(tmp_path / "work")]
    # in a process of its own: the failing flow run logs through Prefect's console handler
    r = subprocess.run([sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))",
                        *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode != 0
    assert "perceptio: error: data.root /data/perceptio does not exist" in r.stderr, r.stderr[-2000:]

    cmd, _ = _readme("perceptio convert-internvl")
    r = subprocess.run([sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))",
                        *shlex.split(cmd)[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 2 and "/checkpoints/InternVL2_5-8B/config.json: no config.json" in r.stderr, r.stderr

    launches = [c for c, _ in readme_commands() if c.startswith("accelerate launch")]
    assert len(launches) == 2  # DDP and FSDP
    for cmd in launches:
        argv = shlex.split(cmd)
        module = argv.index("-m")
        launcher, script = argv[:module], argv[module + 1:]
        assert launcher[:2] == ["accelerate", "launch"]
        if "--config_file" in launcher:  # the config the line names exists and accelerate reads it
            from accelerate.commands.config.config_args import load_config_from_file

            assert load_config_from_file(str(ROOT / launcher[launcher.index("--config_file") + 1])).distributed_type
        # one process instead of 8 GPUs: the script's own arguments exactly as the README gives them,
        # the STORE/<stage>/KEY placeholders pointing at empty folders (the codebook is read first)
        store = tmp_path / "store"
        for stage in ("curate", "train_vqvae", "teacher_depth"):
            (store / stage / "KEY").mkdir(parents=True, exist_ok=True)
        script = [a.replace("STORE/", f"{store}/") for a in script]
        r = subprocess.run([sys.executable, "-m", *script], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]  # the error, naming the first thing it could not find
        assert last.startswith("FileNotFoundError") and str(store / "train_vqvae" / "KEY") in last, r.stderr[-2000:]

