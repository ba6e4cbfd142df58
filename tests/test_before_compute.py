"""What a study needs to know before (or without) compute: passkey lengths too short for their prompt fail in eval's
checks before the model runs, a run that never leaves warmup is warned about at planning, the console line carries
elapsed time and ETA, config.yaml and wandb record the resolved model, `--help` lists only selectable config groups,
and the spectrum docs and plot hold (the issue "a study end to end", finding 8)."""

from __future__ import annotations

import importlib.util
import logging
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fope_lm.checkpoint import save_model
from fope_lm.errors import ConfigError
from fope_lm.evaluation.config import EvalConfig
from fope_lm.evaluation.passkey import PasskeyPrompts, check_lengths, sample_trials
from fope_lm.evaluation.runner import evaluate_checkpoint
from fope_lm.evaluation.spectrum import logit_spectrum, spectra_figure
from fope_lm.nn.model import Transformer, build_model
from fope_lm.schema import validated
from fope_lm.training import callbacks
from fope_lm.training.callbacks import ConsoleProgress, duration

from conftest import REPO
from helpers.evaluation import passkey_tokenizer, prepare_passkey_data

pytestmark = pytest.mark.usefixtures("one_thread")


# --- passkey lengths: checked before any compute ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory) -> Path:
    """A tiny model in the passkey tokenizer, untrained: nothing here runs it."""
    directory = tmp_path_factory.mktemp("checkpoint") / "step_000000"
    save_model(directory, build_model("tiny", vocab_size=len(passkey_tokenizer()), max_seq_len=128), {"step": 0})
    return directory


@pytest.fixture(scope="module")
def passkey_data(tmp_path_factory) -> dict:
    return prepare_passkey_data(tmp_path_factory.mktemp("data"))


def shortest_passkey_length(trials: int, seed: int, distractors: int) -> int:
    prompts = PasskeyPrompts(passkey_tokenizer())
    return max(prompts.fixed_length(trial.key) for trial in sample_trials(trials, seed, distractors))


def test_passkey_lengths_shorter_than_the_prompt_fail_before_the_model_runs(untrained_checkpoint, passkey_data, tmp_path, monkeypatch):
    cfg = validated(
        EvalConfig,
        OmegaConf.create(
            {
                "checkpoint": str(untrained_checkpoint),
                "data": passkey_data,
                "output_dir": str(tmp_path / "out"),
                "device": "cpu",
                "progress": False,
                "perplexity": {"lengths": [64, 128, 256]},
                "passkey": {"lengths": [16, 40, 128, 40], "trials": 7},
            }
        ),
    )

    def no_compute(*args, **kwargs):
        raise AssertionError("the model ran before the passkey lengths were checked")

    monkeypatch.setattr(Transformer, "forward", no_compute)
    with pytest.raises(ConfigError) as raised:
        evaluate_checkpoint(cfg)
    message = str(raised.value)
    shortest = shortest_passkey_length(trials=7, seed=0, distractors=9)
    assert "\n" not in message
    assert message.startswith("passkey.lengths [16, 40] are shorter than the passkey prompt without filler")
    assert f"use passkey.lengths of at least {shortest}" in message
    # the length it names is the shortest that works for these trials: every prompt fits at it, one does not below it
    prompts = PasskeyPrompts(passkey_tokenizer())
    keys = [trial.key for trial in sample_trials(7, 0, 9)]
    assert all(len(prompts.build(shortest, key, 0.5).token_ids) == shortest for key in keys)
    with pytest.raises(ConfigError):
        for key in keys:
            prompts.build(shortest - 1, key, 0.5)


def test_passkey_check_names_one_length_and_passes_lengths_that_fit():
    tokenizer = passkey_tokenizer()
    shortest = shortest_passkey_length(trials=50, seed=3, distractors=4)
    check_lengths(tokenizer, [shortest, 4 * shortest], trials=50, seed=3, distractors=4)  # fits: no error
    with pytest.raises(
        ConfigError, match=rf"^passkey.lengths \[{shortest - 1}\] is shorter .* at least {shortest}, or passkey.enabled=false$"
    ):
        check_lengths(tokenizer, [shortest - 1, shortest], trials=50, seed=3, distractors=4)


# --- warmup that fills the run ---------------------------------------------------------------------------------------
@pytest.fixture
def planned(plan_with):
    """plan_with, with each plan's hold on its run dir let go at the end."""
    plans = []

    def make(*overrides):
        plans.append(plan_with(*overrides))
        return plans[-1]

    yield make
    for made in plans:
        if made.lock is not None:
            made.lock.release()


@pytest.mark.parametrize(
    "max_steps, warmup, words",
    [
        (2, 3, ["train.max_steps=2 <= optim.warmup_steps=3", "never reaches its peak optim.lr=0.003", "to 0.002 (67% of it)"]),
        (3, 3, ["train.max_steps=3 <= optim.warmup_steps=3", "reaches its peak optim.lr=0.003 only at the last step and never decays"]),
    ],
)
def test_a_run_that_never_leaves_warmup_is_warned_about_at_planning(planned, caplog, max_steps, warmup, words):
    caplog.set_level(logging.WARNING, logger="fope_lm")
    planned(f"run_name=warmup-{max_steps}", f"train.max_steps={max_steps}", f"optim.warmup_steps={warmup}")
    (record,) = [r for r in caplog.records if "never leaves warmup" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert all(word in record.getMessage() for word in words), record.getMessage()


def test_a_run_that_leaves_warmup_is_not_warned_about(planned, caplog):
    caplog.set_level(logging.WARNING, logger="fope_lm")
    planned("run_name=warmup-ok", "train.max_steps=4", "optim.warmup_steps=3")
    assert not [r for r in caplog.records if "warmup" in r.getMessage()]


# --- the console line: elapsed and ETA -------------------------------------------------------------------------------
class Clock:
    def __init__(self, now: float = 5000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def console_lines(start_step: int, last_step: int, seconds_per_step: float, caplog) -> list[str]:
    """ConsoleProgress's lines for a launch that begins after `start_step` (a resume) and logs every 10 steps."""
    clock = Clock()
    progress = ConsoleProgress(clock=clock)
    trainer = SimpleNamespace(step=start_step, config=SimpleNamespace(run_name="eta", train=SimpleNamespace(max_steps=1000)))
    caplog.set_level(logging.INFO, logger="fope_lm")
    progress.on_train_start(trainer)
    for step in range(start_step + 1, last_step + 1):
        progress.on_step_start(trainer, step)
        clock.now += seconds_per_step
        progress.on_step_end(trainer, step, SimpleNamespace(loss=2.0))
        if step % 10 == 0:
            progress.on_log(trainer, step, {"train/loss": 2.0})
    progress.on_finish(trainer, False)
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]


def test_console_line_has_elapsed_and_eta(caplog):
    lines = console_lines(0, 120, 1.6, caplog)
    assert lines[-1] == "step 120/1000 | loss 2.0000 | elapsed 3m12s eta 23m28s"  # 120 steps in 192 s, 880 to go
    assert lines[0] == "step 10/1000 | loss 2.0000 | elapsed 16s eta 26m24s"


def test_a_resumed_runs_eta_counts_only_its_own_steps(caplog):
    # resumed at step 900: 20 steps of this launch in 192 s, 80 to go; the 900 steps before it are not this pace
    assert console_lines(900, 920, 9.6, caplog)[-1] == "step 920/1000 | loss 2.0000 | elapsed 3m12s eta 12m48s"


@pytest.mark.parametrize(
    "seconds, text", [(0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (192, "3m12s"), (7509, "2h05m09s"), (90061, "25h01m01s")]
)
def test_duration(seconds, text):
    assert duration(seconds) == text


# --- the resolved model: config.yaml, trainer_state.json, wandb ----------------------------------------------------
@pytest.fixture
def in_process(planned):
    """Trainers built and run in this process, with what they set process-wide put back."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    log_handlers, threads = list(logging.getLogger().handlers), torch.get_num_threads()
    from fope_lm.training.trainer import Trainer

    yield lambda *overrides: Trainer(planned(*overrides))
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    for handler in set(logging.getLogger().handlers) - set(log_handlers):
        logging.getLogger().removeHandler(handler)
    torch.set_num_threads(threads)


def test_config_yaml_and_wandb_record_the_resolved_model(in_process, planned, runs, monkeypatch, caplog):
    from fope_lm.training.trainer import plan

    wandb_configs, plans = [], []

    def held(made):
        plans.append(made)
        return made

    def fake_wandb(section, **kwargs):
        wandb_configs.append(kwargs["config"])
        return SimpleNamespace(log=lambda *args, **kwargs: None, finish=lambda: None)

    monkeypatch.setattr(callbacks, "start_wandb", fake_wandb)
    caplog.set_level(logging.INFO, logger="fope_lm")
    trainer = in_process("run_name=resolved", "+pe=fope", "train.max_steps=2", "train.save_interval=2", "train.eval_interval=2")
    trainer.fit()

    run_dir = runs / "resolved"
    recorded = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    resolved = recorded["model_resolved"]
    vocab = trainer.plan.data.vocab_size
    shape = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_size", "vocab_size", "max_seq_len", "pe")
    assert [resolved[key] for key in shape] == [128, 2, 4, 4, 512, vocab, 32, "fope"]
    assert resolved["pe_options"] == {k: v for k, v in recorded["pe"].items() if k != "name"}
    assert resolved["n_parameters"] == trainer.num_parameters  # the model the trainer built
    assert recorded["model"]["d_model"] is None and recorded["model"]["vocab_size"] is None  # what was asked: unchanged
    (wandb_config,) = wandb_configs
    assert wandb_config["model_resolved"] == resolved
    assert any(r.getMessage().startswith("model: d_model 128, 2 layers, 4 heads (4 key/value), ffn 512") for r in caplog.records)

    # a resume compares only what a resume may change (train.*, optim.*): the record adds no difference
    resume = planned("run_name=resolved", "+pe=fope", "resume=auto", "train.max_steps=3")
    assert resume.resume_changes == {"train.max_steps": [2, 3]}
    assert resume.config.model_resolved == resolved

    # config.yaml runs again as it is, silently; with another preset its record is recomputed, the difference named
    caplog.clear()
    recorded_config = OmegaConf.load(run_dir / "config.yaml")
    again = held(plan(OmegaConf.merge(recorded_config, {"run_name": "resolved-again"})))
    assert again.config.model_resolved == resolved and not [r for r in caplog.records if "model_resolved" in r.getMessage()]
    bigger = held(plan(OmegaConf.merge(recorded_config, {"run_name": "resolved-20m", "model": {"preset": "20m"}})))
    assert bigger.config.model_resolved["d_model"] == 256 and bigger.config.model.d_model is None
    (warning,) = [r.getMessage() for r in caplog.records if "model_resolved" in r.getMessage()]
    assert "d_model 128 -> 256" in warning and "set the shape with model.*" in warning
    for made in plans:
        made.lock.release()


# --- --help: the selectable groups only ------------------------------------------------------------------------------
def help_groups(script: str) -> dict[str, list[str]]:
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    groups = {}
    for line in section.splitlines():
        if match := re.fullmatch(r"([a-z_]+): (.+)", line):
            groups[match[1]] = match[2].split(", ")
    return groups


def yaml_options(group: str) -> list[str]:
    return sorted(path.stem for path in (REPO / "configs" / group).glob("*.yaml"))


@pytest.mark.slow
def test_train_help_lists_only_the_groups_a_run_selects():
    groups = help_groups("train.py")
    assert sorted(groups) == ["data", "experiment", "model", "pe"]  # not accelerate/ (launcher configs) nor paper/
    for group, options in groups.items():
        assert options == yaml_options(group)


@pytest.mark.slow
def test_eval_help_lists_only_data():
    assert help_groups("eval.py") == {"data": yaml_options("data")}  # eval.yaml writes the options: this keeps them true


# --- the spectrum: the documented command, and a title that fits -------------------------------------------------
def test_reproduce_docs_run_analyze_spectrum_as_it_parses():
    spec = importlib.util.spec_from_file_location("analyze_spectrum_script", REPO / "scripts" / "analyze_spectrum.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    docs = (REPO / "docs" / "reproduce.md").read_text()
    (command,) = re.findall(r"`(python scripts/analyze_spectrum\.py [^`]*)`", docs)
    args = script.parse_args(shlex.split(command.replace("<run>", "c4_60m_L512_fope"))[2:])  # exits on an unknown flag
    assert args.checkpoint == "runs/c4_60m_L512_fope" and args.out == "spectrum/c4_60m_L512_fope"


def test_spectrum_title_fits_the_figure():
    options = dict(sigma=0.3, pad_value=1.0, learnable=False, scale=1.0, original_max_seq_len=None, dynamic=False,
                   attention_factor=None, beta_fast=32.0, beta_slow=1.0)  # fmt: skip
    title = "step_010000: fope" + "".join(f" {k}={v}" for k, v in options.items()) + ", L=512, mean logit over 8 x 2048 tokens"
    n_layers, heads, n = 3, 4, 4 * 512
    omega, energy = logit_spectrum(np.random.default_rng(0).normal(size=(n_layers, heads, n)))
    fig = spectra_figure(
        omega, energy, max_seq_len=512, pe_frequencies=np.geomspace(1e-3, 1, 16), fractions=np.full(n_layers, 0.1), title=title
    )
    try:
        renderer = fig.canvas.get_renderer()
        suptitle = fig._suptitle
        extent = suptitle.get_window_extent(renderer)
        assert extent.x0 >= 0 and extent.x1 <= fig.bbox.width  # within the figure's width, as drawn
        assert suptitle.get_text().replace("\n", " ") == title  # wrapped, nothing dropped
        assert suptitle.get_fontsize() == 9  # wrapping sufficed: no word is wider than the figure
        panels_top = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes)
        assert extent.y0 >= panels_top  # above the panels and their titles: more lines never overlap them
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
