"""The training config: every value that cannot work, and every typo, is a one-line error before anything is
built or written; the documented messages are the printed ones; one source of truth per setting."""

from __future__ import annotations

import dataclasses
import inspect
import shlex
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from fope_lm.errors import ConfigError, DataError, FopeError
from fope_lm.nn.model import PRESETS, ModelConfig
from fope_lm.position.registry import get_class
from fope_lm.training.config import SET_ELSEWHERE, ModelSection
from fope_lm.training.trainer import plan

from conftest import REPO
from helpers.training import TINY, compose_config, launch


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (["pe.name=nosuch"], ConfigError, ["unknown position encoding 'nosuch'", "fope", "rope", "yarn"]),
        (["model.preset=huge"], ConfigError, ["unknown model preset 'huge'", "tiny", "60m"]),
        (["+train.lr=1"], ConfigError, ["unknown config key train.lr", "valid keys", "seq_len"]),
        (["+pe=fope", "+pe.sigmaa=0.3"], ConfigError, ["no option(s) sigmaa", "sigma"]),
        (["train.max_steps=many"], ConfigError, ["train.max_steps", "many"]),
        (["train.precision=fp8"], ConfigError, ["train.precision", "bf16"]),
        (["train.global_batch_size=6"], ConfigError, ["global_batch_size=6", "micro_batch_size"]),
        (["model.vocab_size=1000"], DataError, ["vocab_size", "8192"]),
        (["data=local", "data.name=missing", "data.paths={train:[x.txt]}"], DataError, ["not prepared", "missing"]),
        (["train.deepspeed=zero9"], ConfigError, ["zero9", "zero2"]),
        # values an optimizer or the loop cannot work with: refused before the run dir exists
        (["train.grad_clip=-1"], ConfigError, ["train.grad_clip must be positive", "null for no clipping", "-1"]),
        (["train.grad_clip=0"], ConfigError, ["train.grad_clip must be positive"]),
        (["optim.lr=-1"], ConfigError, ["optim.lr must be positive, got -1"]),
        (["optim.lr=0"], ConfigError, ["optim.lr must be positive, got 0"]),
        (["optim.weight_decay=-1"], ConfigError, ["optim.weight_decay must be >= 0, got -1"]),
        (["optim.betas=[0.9,1.0]"], ConfigError, ["optim.betas needs two values in [0, 1)", "1.0"]),
        (["optim.betas=[-0.1,0.95]"], ConfigError, ["optim.betas needs two values in [0, 1)"]),
        (["optim.betas=[0.9]"], ConfigError, ["optim.betas needs two values"]),
        (["optim.eps=0"], ConfigError, ["optim.eps must be positive"]),
        (["train.max_steps=0"], ConfigError, ["train.max_steps must be at least 1, got 0"]),
        (["train.global_batch_tokens=512"], ConfigError, ["global_batch_size=8 and train.global_batch_tokens=512 are both set", "=null"]),
        (["train.global_batch_size=null"], ConfigError, ["set train.global_batch_size", "or train.global_batch_tokens"]),
        (["run_name=../escape"], ConfigError, ["run_name='../escape' must name a directory inside run_root", "no '..'"]),
        (["run_name=/tmp/elsewhere"], ConfigError, ["must name a directory inside run_root"]),
        (["+train.eval_hooks.lengths._target_=nosuch.evaluate"], ConfigError, ["train.eval_hooks.lengths", "nosuch"]),
        (["train.deepspeed=zero3", "train.compile=true"], ConfigError, ["train.compile=true with DeepSpeed ZeRO-3", "ZeRO-1/2"]),
        (["train.attention=fast"], ConfigError, ["train.attention must be one of auto, flash, sdpa", "fast"]),
        (["train.global_batch_size=40000", "train.micro_batch_size=40000"], ConfigError, ["is more than the", "training instances"]),
        (["train.attention=flash"], ConfigError, ["attention=flash but flash-attn is not installed", "--no-build-isolation"]),
    ],
)
def test_bad_config_fails_fast_with_one_line(plan_with, runs, overrides, error, words):
    before = sorted(runs.iterdir())
    with pytest.raises(error) as info:
        plan_with(*overrides)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert sorted(runs.iterdir()) == before  # nothing written: planning creates no run dir


@pytest.mark.slow
def test_entry_point_prints_one_line_and_exits_nonzero(data_root, runs):
    result = launch([*TINY, "pe.name=nosuch"], data_root=data_root, runs=runs, expect_rc=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown position encoding 'nosuch'; choose one of:"), lines
    assert "Traceback" not in result.output
    result = launch([*TINY, "optim.lr=-1", "run_name=negative-lr"], data_root=data_root, runs=runs, expect_rc=1)
    assert result.stderr.strip().splitlines() == ["error: optim.lr must be positive, got -1.0"]
    assert not (runs / "negative-lr").exists()
    # what Hydra itself rejects (a group option or key that does not exist) is one line too, listing the options
    for bad, words in (
        ("model=huge", ["Could not find 'model/huge'", "available options in 'model':", "tiny"]),
        ("+pe=nosuch", ["Could not find 'pe/nosuch'", "fope", "rope"]),
        ("train.bogus=1", ["Could not override 'train.bogus'"]),
    ):
        result = launch([bad], data_root=data_root, runs=runs, expect_rc=2)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines
        assert "Traceback" not in result.output


def test_docs_quote_the_messages_really_printed(plan_with):
    """docs/training.md shows command lines and the error each prints: they must be what `plan` raises."""
    lines = (REPO / "docs" / "training.md").read_text().splitlines()
    examples = [
        (line.removeprefix("$ python train.py ").split(), lines[i + 1])
        for i, line in enumerate(lines)
        if line.startswith("$ python train.py ")
    ]
    assert len(examples) >= 4
    for overrides, printed in examples:
        with pytest.raises(FopeError) as info:
            plan_with(*overrides)
        assert printed == f"error: {info.value}", overrides


def test_compile_defaults_to_cuda_without_zero3(plan_with, monkeypatch):
    assert plan_with().compile is False  # CPU: compiling a small model costs more than it saves
    assert plan_with("train.compile=true").compile is True
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # as a GPU node would say (fp32: no capability query)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert plan_with("train.precision=fp32").compile is True
    assert plan_with("train.precision=fp32", "train.deepspeed=zero2").compile is True
    assert plan_with("train.precision=fp32", "train.deepspeed=zero3").compile is False  # compile=true with it is refused
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # a CPU run on a GPU machine
    assert plan_with("train.precision=fp32").compile is False


def test_batch_in_tokens_alone(plan_with):
    train = plan_with("train.global_batch_size=null", "train.global_batch_tokens=512").config.train
    assert (train.global_batch_size, train.tokens_per_step) == (16, 512)


@pytest.mark.slow
def test_data_not_prepared_hint_is_a_command_that_works(plan_with, data_root, tmp_path):
    """The hint for unprepared local files is the exact prepare command; running it makes the same config plan."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A small corpus of local text. " * 400)
    tokenizer = next(data_root.glob("embedded-py*")) / "tokenizer"
    config = ["data=local", "data.name=mine", f"data.root={tmp_path / 'prepared'}", f"data.tokenizer={tokenizer}"]
    config.append(f"data.paths={{train:[{corpus}],validation:[{corpus}]}}")
    with pytest.raises(DataError) as info:
        plan(compose_config([f"run_root={tmp_path}", *TINY, *config]))
    message = str(info.value)
    assert "\n" not in message and "data 'mine' is not prepared" in message
    command = shlex.split(message.split("run `")[1].rstrip("`"))
    assert command[:3] == ["python", "scripts/prepare_data.py", "local"]
    result = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert plan(compose_config([f"run_root={tmp_path}", *TINY, *config])).data.num_tokens("train") > 0


# --- one source of truth per setting --------------------------------------------------------------------------
def test_model_presets_live_in_one_place(plan_with, monkeypatch):
    """configs/model/*.yaml select a preset and restate none of its shape; train.yaml's model section lists exactly
    the schema's overridable keys, which are derived from ModelConfig; an edit of PRESETS reaches a Hydra run."""
    for path in sorted((REPO / "configs" / "model").glob("*.yaml")):
        assert OmegaConf.to_container(OmegaConf.load(path)) == {"preset": path.stem}, path
    assert {path.stem for path in (REPO / "configs" / "model").glob("*.yaml")} == set(PRESETS)
    declared = set(OmegaConf.load(REPO / "configs" / "train.yaml").model)
    assert declared == {f.name for f in dataclasses.fields(ModelSection)} - {"preset"}
    assert declared == {f.name for f in dataclasses.fields(ModelConfig)} - set(SET_ELSEWHERE)
    monkeypatch.setitem(PRESETS, "tiny", {**PRESETS["tiny"], "n_layers": 3})
    assert plan_with().model_config.n_layers == 3
    assert plan_with("model.n_layers=1").model_config.n_layers == 1  # a deliberate override still wins


def constructor_defaults(cls) -> dict:
    """Keyword-only defaults along a position encoding's constructor chain (the source of truth for its options)."""
    defaults = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        for param in inspect.signature(init).parameters.values() if init else ():
            if param.kind is param.KEYWORD_ONLY and param.default is not param.empty:
                defaults[param.name] = param.default
    return defaults


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pe").glob("*.yaml")), ids=lambda path: path.stem)
def test_pe_configs_agree_with_the_constructors(path):
    """A PE's own config (configs/pe/<name>.yaml) may show its options, each equal to the constructor's default;
    a variant (fope_nomix.yaml, ...) states only what it changes."""
    values = OmegaConf.to_container(OmegaConf.load(path))
    name = values.pop("name")
    defaults = constructor_defaults(get_class(name))
    assert set(values) <= set(defaults), f"{path.name}: unknown options {set(values) - set(defaults)}"
    if path.stem == name:
        assert values == {key: defaults[key] for key in values}, path.name
    else:
        assert values and all(value != defaults[key] for key, value in values.items()), path.name
