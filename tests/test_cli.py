"""The `fope-lm` command (fope_lm/cli.py) and the installed package: one entry point with a line of help per command, the
scripts' and Hydra's own arguments behind it, configs found in a checkout and in a wheel, and a wheel installed
elsewhere that prepares, trains and evaluates from an empty directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from fope_lm import cli, paths

from conftest import REPO
from helpers.training import TINY

COMMANDS = ["train", "eval", "prepare", "export", "import", "sweep", "compare", "download"]


def run_cli(capsys, *argv: str) -> tuple[int | str | None, str, str]:
    """fope_lm.cli.main in this process: (exit code, stdout, stderr)."""
    try:
        code: int | str | None = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert list(cli.COMMANDS) == COMMANDS
    for name in COMMANDS:
        (line,) = [line for line in out.splitlines() if line.split()[:1] == [name]]
        assert line.split(maxsplit=1)[1] == cli.COMMANDS[name][0]  # the whole help on the command's own line


@pytest.mark.parametrize("argv, words", [([], ["required: <command>"]), (["trian"], ["invalid choice: 'trian'", "train"])])
def test_no_or_unknown_command_is_a_usage_error(capsys, argv, words):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("usage: fope-lm") and all(word in err for word in words)


@pytest.mark.parametrize("command", ["prepare", "export", "import", "sweep", "compare", "download"])
def test_script_commands_take_the_scripts_arguments(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: fope-lm {command} [-h]")
    assert sys.argv[0] != f"fope-lm {command}"  # restored


@pytest.mark.parametrize("script", ["prepare_data", "export_hf", "import_hf", "compare_results", "download_data"])
def test_script_commands_run_the_scripts_main(script):
    search_path = list(sys.path)
    main = cli.script_main(script)
    module = sys.modules[f"fope_lm_scripts_{script}"]
    assert Path(module.__file__) == paths.SCRIPTS_DIR / f"{script}.py" and main is module.main  # its own or one it imports
    assert sys.path == search_path  # compare_results.py puts its checkout first on sys.path: undone


def test_train_errors_are_one_line(capsys):
    code, _, err = run_cli(capsys, "train", "model=tiny", "+pe=nosuch")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and "Could not find 'pe/nosuch'" in line and "fope" in line


def test_train_and_eval_are_hydra(capsys):
    code, out, _ = run_cli(capsys, "train", "--cfg", "job", "model=tiny", "+pe=fope", "train.seq_len=64")
    assert code == 0
    assert "preset: tiny" in out and "name: fope" in out and "seq_len: 64" in out
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0 and out.startswith("train is powered by Hydra.")  # the job is still named train
    assert "pe: alibi, " in out
    code, out, _ = run_cli(capsys, "eval", "--cfg", "job", "checkpoint=runs/x", "perplexity.lengths=[32]")
    assert code == 0 and "checkpoint: runs/x" in out and "- 32" in out


def test_config_dir_is_the_checkouts_else_the_packages(monkeypatch, tmp_path):
    assert paths.CONFIG_DIR == REPO / "configs" and paths.SCRIPTS_DIR == REPO / "scripts"  # this checkout (editable or not)
    assert paths.CONFIG_DIR.is_absolute()
    package, repo = tmp_path / "site-packages" / "fope_lm", tmp_path / "site-packages"
    monkeypatch.setattr(paths, "PACKAGE_ROOT", package)
    monkeypatch.setattr(paths, "REPO_ROOT", repo)
    (repo / "configs").mkdir(parents=True)  # somebody else's top-level configs/ in site-packages: not ours
    (package / "configs").mkdir(parents=True)
    assert paths._shipped_or_checkout("configs", "train.yaml") == repo / "configs"  # no package copy: the checkout's
    (package / "configs" / "train.yaml").write_text("")
    assert paths._shipped_or_checkout("configs", "train.yaml") == package / "configs"  # an installed wheel: its copy


def test_every_package_is_in_the_wheel_list():
    """pyproject.toml lists the packages (the configs/ and scripts/ mapping needs that): a new directory of fope_lm/
    holding Python files must be added there, or the wheel would lack it."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "fope_lm").rglob("*.py") if "__pycache__" not in path.parts}
    assert found <= set(setuptools["packages"]), (
        f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - set(setuptools['packages']))}"
    )
    assert setuptools["package-dir"] == {"fope_lm.configs": "configs", "fope_lm.scripts": "scripts"}


# --- the installed package ------------------------------------------------------------------------------------------
def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FOPE_", "WANDB_", "ACCELERATE_", "PYTHON"))}
    return env | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"} | extra


def check(command: list, cwd: Path, env: dict, timeout: float = 300) -> str:
    result = subprocess.run([str(word) for word in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}:\n{(result.stdout + result.stderr)[-5000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """An sdist and a wheel, built offline with this environment's setuptools from a copy of the checkout (no build/ or
    egg-info written into it): the wheel as `pip wheel --no-deps -w DIR .` makes it, and one built from the sdist."""
    tmp = tmp_path_factory.mktemp("build")
    source = tmp / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    for name in ("fope_lm", "configs", "scripts"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    env = clean_env()
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    check([*pip_wheel, "-w", tmp / "wheel", "."], cwd=source, env=env)
    check([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(tmp / 'sdist')!r})"], cwd=source, env=env)
    (sdist,) = (tmp / "sdist").glob("fope_lm-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    check([*pip_wheel, "-w", tmp / "wheel_from_sdist", "."], cwd=unpacked, env=env)
    (wheel,) = (tmp / "wheel").glob("fope_lm-*.whl")
    (wheel_from_sdist,) = (tmp / "wheel_from_sdist").glob("fope_lm-*.whl")
    return {"wheel": wheel, "sdist": sdist, "wheel_from_sdist": wheel_from_sdist}


def files_under(root: Path, directory: str) -> set[str]:
    return {
        path.relative_to(root).as_posix() for path in (root / directory).rglob("*") if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.mark.slow
def test_wheel_and_sdist_carry_the_configs_and_scripts(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read(next(name for name in names if name.endswith(".dist-info/entry_points.txt"))).decode()
    assert "fope-lm = fope_lm.cli:main" in entry_points
    configs = {f"fope_lm/{name}" for name in files_under(REPO, "configs")}
    assert configs and configs <= names, sorted(configs - names)
    assert {"fope_lm/configs/train.yaml", "fope_lm/configs/eval.yaml", "fope_lm/configs/deepspeed/zero2.json"} <= names
    scripts = {
        f"fope_lm/scripts/{name}.py" for name in ("prepare_data", "export_hf", "import_hf", "sweep", "compare_results", "download_data")
    }
    assert scripts <= names, sorted(scripts - names)
    package = files_under(REPO, "fope_lm")  # every module and data file (a package missing from pyproject.toml's list)
    assert package <= names, sorted(package - names)
    assert "fope_lm/schemas/results.schema.json" in names
    with tarfile.open(built["sdist"]) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert files_under(REPO, "configs") <= in_sdist and "scripts/prepare_data.py" in in_sdist and "pyproject.toml" in in_sdist
    with zipfile.ZipFile(built["wheel_from_sdist"]) as wheel_from_sdist:
        assert set(wheel_from_sdist.namelist()) == names  # the sdist is complete


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel (a non-editable install, no checkout on its path) whose dependencies come from
    this environment: a .pth line puts this environment's site-packages after the venv's own, without running its .pth
    files (so not this checkout's editable finder). Offline and a few seconds: `pip --python` installs into it."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    check([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent, env=clean_env())
    python = venv / "bin" / "python"
    purelib = Path(
        check([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv.parent, env=clean_env()).strip()
    )
    ours = sysconfig.get_paths()
    (purelib / "_fope_lm_test_deps.pth").write_text("\n".join(dict.fromkeys([ours["purelib"], ours["platlib"]])) + "\n")
    check(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", built["wheel"]],
        cwd=venv.parent,
        env=clean_env(),
    )
    return venv


@pytest.mark.slow
def test_installed_wheel_trains_and_evaluates_from_an_empty_directory(installed, data_root, tmp_path):
    fope_lm = installed / "bin" / "fope-lm"
    work = tmp_path / "empty"
    work.mkdir()
    env = clean_env()
    where = check([installed / "bin" / "python", "-c", "import fope_lm.paths as p; print(p.CONFIG_DIR, p.SCRIPTS_DIR)"], cwd=work, env=env)
    config_dir, scripts_dir = map(Path, where.split())
    assert config_dir.is_relative_to(installed) and config_dir.parent.name == "fope_lm" and (config_dir / "train.yaml").is_file()
    assert scripts_dir == config_dir.parent / "scripts"
    help_text = check([fope_lm, "--help"], cwd=work, env=env | {"COLUMNS": "80"})
    assert all(f"    {name} " in help_text for name in COMMANDS) and f"configs: {config_dir}" in help_text

    # the session's embedded corpus (prepared once for the suite): `prepare` finds it prepared, the run reads it
    out = check([fope_lm, "prepare", "embedded", f"root={data_root}"], cwd=work, env=env)  # scripts/prepare_data.py's main
    assert Path(out.strip().splitlines()[-1]).parent == data_root
    runs = tmp_path / "runs"
    train = [*TINY, "+pe=rope", "train.max_steps=2", "train.save_interval=2", f"data.root={data_root}", f"run_root={runs}"]
    check([fope_lm, "train", "-m", *train, "seed=0,1"], cwd=work, env=env)  # a Hydra multirun: two runs
    run_dirs = sorted(checkpoint.parents[1] for checkpoint in runs.glob("*/checkpoints/step_000002"))
    assert len(run_dirs) == 2, sorted(runs.rglob("*"))
    run_dir = run_dirs[0]
    assert json.loads((run_dir / "run_info.json").read_text())["command"][:2] == ["fope-lm train", "-m"]

    evaluate = [f"checkpoint={run_dir}", "perplexity.lengths=[32]", "perplexity.tokens_total=2048", "passkey.enabled=false"]
    check([fope_lm, "eval", *evaluate], cwd=work, env=env)  # on the data the run trained on
    (results,) = run_dir.glob("eval/step_*/*/results.json")
    assert [row["length"] for row in json.loads(results.read_text())["perplexity"]] == [32]
    check([fope_lm, "compare", results, "--output-dir", tmp_path / "compare"], cwd=work, env=env)  # scripts/compare_results.py
    assert (tmp_path / "compare" / "comparison.md").is_file()
    assert sorted(path.name for path in work.iterdir()) == []  # nothing written into the working directory
