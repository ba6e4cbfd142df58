"""The `fope-lm` command: one entry point for training, evaluation, data preparation, export, import, the sweep and the
comparison of results, installed with the package (pyproject.toml's [project.scripts]).

    fope-lm train model=tiny +pe=fope train.max_steps=200         # = python train.py ... (Hydra overrides, -m, --cfg job)
    fope-lm eval checkpoint=runs/fope-tiny-L512-s0                # = python eval.py ...
    fope-lm prepare embedded                                      # = python scripts/prepare_data.py ...

train and eval run Hydra on fope_lm.paths.CONFIG_DIR (the checkout's configs/, or the installed package's copy); the
other commands run the `main(argv)` of their script in fope_lm.paths.SCRIPTS_DIR (sweep: fope_lm.training.sweep's),
so `fope-lm <command> ARGS` and the script take the same arguments. train.py and eval.py call `train` and `evaluate`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from typing import Any

from fope_lm.paths import CONFIG_DIR, SCRIPTS_DIR

PROG = "fope-lm"


@contextlib.contextmanager
def _argv(prog: str | None, argv: list[str]) -> Iterator[None]:
    """sys.argv as the command would have it run alone: Hydra parses sys.argv[1:]; argparse and Hydra's usage line name
    sys.argv[0]; the run dir records it. prog None keeps sys.argv[0] (train.py / eval.py)."""
    saved = sys.argv
    sys.argv = [saved[0] if prog is None else prog, *argv]
    try:
        yield
    finally:
        sys.argv = saved


def _run_hydra(task: Callable[[Any], None], config_name: str, argv: list[str], prog: str | None) -> int:
    import hydra

    main = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)(task)
    with _argv(prog, argv):
        main()  # errors: Hydra's report and sys.exit(1); --help, --cfg job, -m: Hydra's
    return 0


def _train_task(cfg: Any) -> None:
    from fope_lm.training.trainer import main

    main(cfg)


def _eval_task(cfg: Any) -> None:
    from fope_lm.errors import FopeError
    from fope_lm.evaluation import report
    from fope_lm.evaluation.config import EvalConfig
    from fope_lm.evaluation.runner import run_evaluation
    from fope_lm.schema import validated

    try:
        results, paths = run_evaluation(validated(EvalConfig, cfg))
    except FopeError as err:  # a bad checkpoint, data or setting: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(report.markdown_table(*report.results_table(results)))
    print(f"wrote {', '.join(str(path) for path in paths.values())}")


# Hydra names the job (hydra.job.name: "train is powered by Hydra" in --help) after the task function's module, which
# was train.py / eval.py when they held these functions
_train_task.__module__ = "train"
_eval_task.__module__ = "eval"


def train(argv: list[str], prog: str | None = None) -> int:
    """`python train.py ARGV`: Hydra overrides (model=tiny +pe=fope ...), checked first for a one-line error."""
    from fope_lm.errors import FopeError
    from fope_lm.training import trainer  # noqa: F401  (imported before Hydra runs, as train.py did: what it registers)
    from fope_lm.training.config import check_command_line

    try:
        check_command_line(str(CONFIG_DIR), "train", argv)  # left to Hydra when argv has flags (-m, --help, --cfg)
    except FopeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _run_hydra(_train_task, "train", argv, prog)


def evaluate(argv: list[str], prog: str | None = None) -> int:
    """`python eval.py ARGV`: Hydra overrides (checkpoint=runs/... perplexity.lengths=[...] ...)."""
    import fope_lm.evaluation.config  # noqa: F401  (registers the `eval_schema` that configs/eval.yaml selects)

    return _run_hydra(_eval_task, "eval", argv, prog)


def script_main(name: str) -> Callable[[list[str]], int]:
    """The main(argv) of scripts/<name>.py (an installed package's copy in fope_lm/scripts/)."""
    path = SCRIPTS_DIR / f"{name}.py"
    module_name = f"fope_lm_scripts_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no script {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    search_path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:  # a script may put its checkout on sys.path (runnable without installing): not for the command's process
        sys.path[:] = search_path
    return module.main


def _sweep_main(argv: list[str]) -> int:
    from fope_lm.training.sweep import main

    return main(argv)


def _script(name: str) -> Callable[[list[str]], int]:
    return lambda argv: script_main(name)(argv)


# name: (one line of help, the function of argv that runs it; train and eval also take prog)
COMMANDS: dict[str, tuple[str, Callable[..., int]]] = {
    "train": ("train a model: Hydra overrides as train.py (model=tiny +pe=fope)", train),
    "eval": ("evaluate a checkpoint (perplexity, passkey), as eval.py", evaluate),
    "prepare": ("tokenize a corpus into shards (embedded, c4, books, local...)", _script("prepare_data")),
    "export": ("export a checkpoint as a Hugging Face model directory", _script("export_hf")),
    "import": ("import a local Llama-architecture model dir", _script("import_hf")),
    "sweep": ("the paper's experiment grid on SLURM (configs, cost, submit)", _sweep_main),
    "compare": ("overlay evaluations (results.json): one plot, one table", _script("compare_results")),
    "download": ("download files by URL, resumable and in parallel", _script("download_data")),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fope-lm")
    except PackageNotFoundError:  # a checkout that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Pretrain and evaluate OLMo-style decoders with NoPE, RoPE, ALiBi, YaRN or FoPE.",
        epilog=f"`{PROG} <command> --help` shows a command's arguments.\nconfigs: {CONFIG_DIR}",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog's lines as written: the path whole
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", title="commands", required=True)
    for name, (help_line, _) in COMMANDS.items():
        commands.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = build_parser().parse_args(argv[:1]).command  # --help, --version and an unknown command end here
    _, run = COMMANDS[command]
    prog = f"{PROG} {command}"
    if run in (train, evaluate):
        return run(argv[1:], prog=prog)
    with _argv(prog, argv[1:]):
        return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
