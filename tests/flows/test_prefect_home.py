"""A ``perceptio run`` without a Prefect server of the user's keeps its temporary server's database in
``<workdir>/prefect/`` (not the ``~/.prefect/prefect.db`` every run of the machine shares); a user who
names a server (environment, profiles.toml, project files) or a PREFECT_HOME keeps theirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import configured_prefect_server, use_workdir_prefect_home

ROOT = Path(__file__).resolve().parents[2]
URL = "http://127.0.0.1:4200/api"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty HOME and current folder, and none of the user's PREFECT_* variables."""
    for k in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "home"


def _profiles(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_without_a_server_the_home_is_the_workdirs_and_the_users_profiles_stay_read(home, tmp_path):
    env: dict[str, str] = {}
    assert use_workdir_prefect_home(tmp_path / "w", env) == (tmp_path / "w" / "prefect").resolve()
    assert env == {"PREFECT_HOME": str((tmp_path / "w" / "prefect").resolve())}
    assert (tmp_path / "w" / "prefect").is_dir()
    # a profiles.toml whose active profile names no server: the home moves, the profile is still read
    prof = _profiles(home / ".prefect" / "profiles.toml",
                     'active = "dev"\n[profiles.dev]\nPREFECT_LOGGING_LEVEL = "DEBUG"\n'
                     f'[profiles.local]\nPREFECT_API_URL = "{URL}"\n')  # fmt: skip
    env = {}
    assert use_workdir_prefect_home(tmp_path / "w", env) is not None
    assert env["PREFECT_PROFILES_PATH"] == str(prof)


@pytest.mark.parametrize("where", ["default", "prefect_home", "profiles_path", "selected"])
def test_an_api_url_in_the_active_profile_leaves_the_home_alone(home, tmp_path, where):
    server = f'[profiles.local]\nPREFECT_API_URL = "{URL}"\n[profiles.ephemeral]\n'
    env: dict[str, str] = {}
    if where == "default":  # ~/.prefect/profiles.toml, its active profile
        _profiles(home / ".prefect" / "profiles.toml", 'active = "local"\n' + server)
    elif where == "prefect_home":  # $PREFECT_HOME/profiles.toml: an explicit home is never replaced anyway
        _profiles(tmp_path / "ph" / "profiles.toml", 'active = "local"\n' + server)
        env["PREFECT_HOME"] = str(tmp_path / "ph")
    elif where == "profiles_path":
        env["PREFECT_PROFILES_PATH"] = str(_profiles(tmp_path / "p.toml", 'active = "local"\n' + server))
    else:  # PREFECT_PROFILE picks the profile, over the file's active one
        _profiles(home / ".prefect" / "profiles.toml", 'active = "ephemeral"\n' + server)
        assert configured_prefect_server({}, Path.cwd()) is None
        env["PREFECT_PROFILE"] = "local"
    if where != "prefect_home":
        assert "PREFECT_API_URL in profile 'local'" in configured_prefect_server(env, Path.cwd())
    before = dict(env)
    assert use_workdir_prefect_home(tmp_path / "w", env) is None
    assert env == before and not (tmp_path / "w").exists()


@pytest.mark.parametrize("setting", ["env", "env_db", "home", "dotenv", "prefect_toml", "pyproject"])
def test_a_server_or_home_named_elsewhere_leaves_the_home_alone(home, tmp_path, setting):
    env = {"env": {"PREFECT_API_URL": URL},
           "env_db": {"PREFECT_SERVER_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:////tmp/x.db"},
           "home": {"PREFECT_HOME": str(tmp_path / "mine")}}.get(setting, {})  # fmt: skip
    files = {"dotenv": (".env", f"PREFECT_API_URL={URL}\n"),
             "prefect_toml": ("prefect.toml", f'[api]\nurl = "{URL}"\n'),
             "pyproject": ("pyproject.toml", f'[tool.prefect.api]\nurl = "{URL}"\n')}  # fmt: skip
    if setting in files:
        Path(files[setting][0]).write_text(files[setting][1])
    before = dict(env)
    assert use_workdir_prefect_home(tmp_path / "w", env) is None
    assert env == before


def test_the_cli_imports_no_prefect_before_it_prepares_the_environment():
    code = "import sys, flows.cli; sys.exit('prefect' in sys.modules or 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def test_a_run_without_a_server_keeps_its_prefect_database_under_the_workdir(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # the session's home too
    env.update(HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    wd = tmp_path / "w"
    code = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "run", "--config", "smoke", "--only", "sources", "--workdir",
                        str(wd)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    db = wd.resolve() / "prefect" / "prefect.db"
    assert db.is_file() and db.stat().st_size > 0
    assert not (tmp_path / "home" / ".prefect" / "prefect.db").exists()
    assert (f"perceptio: this run's Prefect database is {db}; browse it afterwards with "
            f"`PREFECT_HOME={db.parent} prefect server start`") in r.stderr  # fmt: skip
    assert len(list((wd / "store" / "sources").glob("*/manifest.json"))) == 1
