"""The docs' commands are the real interfaces: every `python train.py` / `eval.py` / `accelerate launch ... train.py` /
`fope-lm train|eval` line in README.md and docs/*.md composes with Hydra (the config keys and groups exist), and every
`python scripts/...py` / `fope-lm <command>` line parses with that script's own argument parser. Nothing runs: each
parser is stopped right after it has parsed the documented arguments."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fope_lm import cli

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPT_COMMANDS = {
    "prepare": "prepare_data",
    "export": "export_hf",
    "import": "import_hf",
    "compare": "compare_results",
    "download": "download_data",
}
HYDRA_FLAGS = {"-m", "--multirun", "--cfg", "job", "hydra", "all", "--resolve", "--help", "-h", "--info"}


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command line in the docs' fenced code blocks, continuation lines joined and
    trailing comments dropped."""
    found = []
    for doc in DOCS:
        in_block, pending = False, ""
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            if line.lstrip().startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            line = pending + re.sub(r"\s+#\s.*$", "", line.strip()).removeprefix("$ ")
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            command = re.sub(r"^([A-Z_]+=\S+\s+)+", "", line)  # environment assignments in front
            command = re.split(r"\s(?:>|\||&&|;)\s", command)[0]  # the command itself, not what the shell does with it
            if re.match(r"(python (train|eval)\.py|accelerate launch .*train\.py|python scripts/\S+\.py|fope-lm \w+)", command):
                found.append((f"{doc.name}:{number}", command))
    return found


COMMANDS = documented_commands()


def hydra_overrides(words: list[str]) -> list[str]:
    return [word for word in words if word not in HYDRA_FLAGS and not word.startswith("-") and "=" in word]


class Parsed(Exception):
    """Raised by the patched parser once it has parsed: the script stops before doing anything."""


@pytest.fixture
def stop_after_parsing(monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def load_main(script: Path):
    spec = importlib.util.spec_from_file_location(f"doc_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))  # as `python scripts/x.py` has it
    spec.loader.exec_module(module)
    return module.main


def test_the_docs_show_commands():
    kinds = {command.split()[1] if command.startswith("python") else command.split()[0] for _, command in COMMANDS}
    assert {"train.py", "eval.py", "scripts/prepare_data.py", "scripts/export_hf.py", "fope-lm"} <= kinds, kinds


@pytest.mark.parametrize("where, command", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_a_documented_command_is_the_real_interface(where, command, stop_after_parsing, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # a script may put its checkout on sys.path
    words = shlex.split(command)
    if words[0] == "fope-lm":
        name, args = words[1], words[2:]
        if name in ("train", "eval"):
            target, script = ("train" if name == "train" else "eval"), None
        elif name == "sweep":
            target, script = None, REPO / "scripts" / "sweep.py"
        else:
            assert name in SCRIPT_COMMANDS, f"{where}: fope-lm has no command {name!r} ({', '.join(cli.COMMANDS)})"
            target, script = None, REPO / "scripts" / f"{SCRIPT_COMMANDS[name]}.py"
    elif words[0] == "accelerate" or words[1] in ("train.py", "eval.py"):
        at = next(i for i, word in enumerate(words) if word in ("train.py", "eval.py"))
        target, script, args = words[at].removesuffix(".py"), None, words[at + 1 :]
    else:
        target, script, args = None, REPO / words[1], words[2:]
    if target is not None:
        if target == "eval":
            import fope_lm.evaluation.config  # noqa: F401  (registers eval_schema)
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            compose(target, overrides=hydra_overrides(args))  # unknown keys or groups raise here
        return
    assert script.is_file(), f"{where}: {script} does not exist"
    if "--help" in args or "-h" in args:
        args = [arg for arg in args if arg not in ("--help", "-h")]
    with pytest.raises(Parsed):
        load_main(script)(args)
    capsys.readouterr()
