"""An export that serves (fope_lm.hf.export, scripts/export_hf.py): config.json and generation_config.json hold the
tokenizer's bos/eos/pad ids, native and remote; config.json declares the context the export serves
(max_position_embeddings: the training length, times the scale of a static length scaling, 16 x L0 for dynamic
scaling, or --max-position-embeddings), which is what lm-evaluation-harness takes as max_length; the remote config
answers transformers' standard names; every export carries a model card (README.md) with the PE, lengths, data,
steps, evaluations and the lm_eval command; a checkpoint without a tokenizer exports with a warning; a native export
also holds transformers 4.x's rope_scaling and rope_theta (and loads there: the slow test, given a transformers 4.x
Python in FOPE_TRANSFORMERS4_PYTHON)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from fope_lm.checkpoint import load_model, save_model
from fope_lm.hf import ExportError, export_hf
from fope_lm.nn.model import build_model
from fope_lm.run_dir import COMPLETE_MARKER, RunDir

from conftest import REPO
from helpers.evaluation import passkey_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
L = 32  # the training length of every tiny checkpoint here
EXPORT = str(REPO / "scripts" / "export_hf.py")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """passkey_tokenizer: EOS only (no BOS, no pad: pad falls back to EOS)."""
    path = tmp_path_factory.mktemp("tokenizer")
    passkey_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def special_tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer with BOS, EOS and pad all set, each its own id."""
    path = tmp_path_factory.mktemp("special")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=passkey_tokenizer().backend_tokenizer, eos_token="<|endoftext|>")
    tokenizer.add_special_tokens({"bos_token": "<s>", "pad_token": "<pad>"})
    tokenizer.save_pretrained(path)
    return path


def checkpoint(directory: Path, pe: str = "rope", pe_options: dict | None = None, vocab_size: int = 400, **metadata) -> Path:
    torch.manual_seed(0)
    model = build_model("tiny", pe=pe, pe_options=pe_options or {}, vocab_size=vocab_size, max_seq_len=L, init_std=0.1).eval()
    save_model(directory, model, metadata=metadata or None)
    return directory


def config_json(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


# --- bos / eos / pad ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["native", "remote"])
@pytest.mark.parametrize("which", ["eos-only", "bos-eos-pad"])
def test_token_ids_are_the_tokenizers_in_config_and_generation_config(format, which, tmp_path, tokenizer_dir, special_tokenizer_dir):
    tokenizer_path = tokenizer_dir if which == "eos-only" else special_tokenizer_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    out = export_hf(checkpoint(tmp_path / "ckpt"), tmp_path / "hf", tokenizer=tokenizer_path, format=format)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # as generation_config_for
    expected = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
    if which == "eos-only":
        assert expected == {"bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0}  # never LlamaConfig's 1 / 2
    else:
        assert len(set(expected.values())) == 3 and None not in expected.values()
    written = config_json(out)
    assert {name: written[name] for name in expected} == expected
    generation = json.loads((out / "generation_config.json").read_text())
    assert {name: generation.get(name) for name in expected} == expected
    loaded = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert {name: getattr(loaded, name) for name in expected} == expected  # `config.eos_token_id` works, remote too


def test_remote_config_answers_transformers_standard_names(tmp_path, tokenizer_dir):
    out = export_hf(checkpoint(tmp_path / "ckpt", pe="fope"), tmp_path / "hf", tokenizer=tokenizer_dir)
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    model = build_model("tiny", pe="fope", vocab_size=400, max_seq_len=L).config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (model.d_model, model.n_heads, model.n_layers)
    assert (config.vocab_size, config.tie_word_embeddings, config.max_position_embeddings) == (400, model.tie_embeddings, L)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (None, 0, 0)
    lm_eval_utils = pytest.importorskip("lm_eval.models.utils", reason="lm-evaluation-harness is not installed")
    assert lm_eval_utils.resolve_max_length(config, AutoTokenizer.from_pretrained(out, trust_remote_code=True)) == L  # not lm_eval's 2048


# --- max_position_embeddings ---------------------------------------------------------------------------------------
CONTEXTS = {  # name: (pe, pe_options, format, config.json's max_position_embeddings, the length the card's lm_eval serves)
    "rope": ("rope", {}, "native", L, L),
    "alibi": ("alibi", {}, "remote", L, L),
    "fope": ("fope", {}, "remote", L, L),
    "yarn-static": ("yarn", {"scale": 4.0}, "native", 4 * L, 4 * L),  # YaRN s=4 at L: L0 x s
    "yarn-static-remote": ("yarn", {"scale": 4.0}, "remote", 4 * L, 4 * L),
    "yarn-from-L0": ("yarn", {"scale": 4.0, "original_max_seq_len": L // 2}, "native", 2 * L, 2 * L),  # L0 x s
    "linear": ("rope", {"scaling": "linear", "scale": 2.0}, "native", 2 * L, 2 * L),
    "fope-yarn": ("fope", {"scale": 2.0}, "remote", 2 * L, 2 * L),
    "yarn-dynamic": ("yarn", {"dynamic": True}, "remote", 16 * L, 16 * L),  # no bound: 16 x L0
    "dynamic-ntk-remote": ("rope", {"scaling": "dynamic_ntk", "scale": 2.0}, "remote", 16 * L, 16 * L),
    "dynamic-ntk-native": ("rope", {"scaling": "dynamic_ntk", "scale": 2.0}, "native", L, 16 * L),  # transformers reads L0 there
}


@pytest.mark.parametrize("case", CONTEXTS)
def test_max_position_embeddings_is_the_context_the_export_serves(case, tmp_path, tokenizer_dir):
    pe, options, format, declared, served = CONTEXTS[case]
    out = export_hf(checkpoint(tmp_path / "ckpt", pe, options), tmp_path / "hf", tokenizer=tokenizer_dir, format=format)
    assert config_json(out)["max_position_embeddings"] == declared
    assert AutoConfig.from_pretrained(out, trust_remote_code=True).max_position_embeddings == declared
    card = (out / "README.md").read_text()
    assert f"max_length={served}" in card
    assert ("max_position_embeddings is" in card) == (declared != served)  # the card says why they differ


def test_max_position_embeddings_option(tmp_path, tokenizer_dir):
    rope = checkpoint(tmp_path / "rope")
    for format in ("native", "remote"):
        out = export_hf(rope, tmp_path / format, tokenizer=tokenizer_dir, format=format, max_position_embeddings=4096)
        assert config_json(out)["max_position_embeddings"] == 4096 and "max_length=4096" in (out / "README.md").read_text()
    dynamic = checkpoint(tmp_path / "dynamic", "rope", {"scaling": "dynamic_ntk", "scale": 2.0})
    with pytest.raises(ExportError) as info:  # transformers' dynamic NTK reads max_position_embeddings as L0
        export_hf(dynamic, tmp_path / "dynamic-native", tokenizer=tokenizer_dir, max_position_embeddings=4096)
    assert str(info.value) == (
        f"--max-position-embeddings 4096: a native export of pe 'rope' {{'scale': 2.0, 'scaling': 'dynamic_ntk'}} must hold "
        f"max_position_embeddings={L}, the original length transformers' rope_type 'dynamic' scales from; pass the length to "
        "serve to lm_eval instead (--model_args ...,max_length=4096), or export with --format remote"
    )
    assert not (tmp_path / "dynamic-native").exists()
    out = export_hf(dynamic, tmp_path / "dynamic-L0", tokenizer=tokenizer_dir, max_position_embeddings=L)  # L0 itself is fine
    assert config_json(out)["max_position_embeddings"] == L
    out = export_hf(dynamic, tmp_path / "dynamic-remote", tokenizer=tokenizer_dir, format="remote", max_position_embeddings=4096)
    assert config_json(out)["max_position_embeddings"] == 4096
    with pytest.raises(ExportError, match="must be a positive number of tokens, got 0"):
        export_hf(rope, tmp_path / "zero", tokenizer=tokenizer_dir, max_position_embeddings=0)


def test_native_config_holds_transformers4_keys_that_transformers5_reads_silently(tmp_path, tokenizer_dir):
    for name, options, rope_type in (("rope", {}, None), ("yarn", {"scale": 4.0}, "yarn"),
                                     ("rope", {"scaling": "dynamic_ntk", "scale": 2.0}, "dynamic")):  # fmt: skip
        out = export_hf(checkpoint(tmp_path / f"ckpt-{rope_type}", name, options), tmp_path / f"hf-{rope_type}", tokenizer=tokenizer_dir)
        written = config_json(out)
        assert written["rope_theta"] == 10000.0
        if rope_type is None:
            assert written["rope_scaling"] is None  # 4.x: unscaled
        else:  # 4.x's rope_scaling: rope_parameters without rope_theta (at the top level instead)
            assert written["rope_scaling"] == {key: value for key, value in written["rope_parameters"].items() if key != "rope_theta"}
            assert written["rope_scaling"]["rope_type"] == rope_type
        with CaptureLogger(transformers_logging.get_logger("transformers")) as captured:
            loaded = AutoConfig.from_pretrained(out)
        assert captured.out == "", captured.out  # no unknown keys, no factor mismatch
        assert loaded.rope_parameters == written["rope_parameters"]


# --- the model card ------------------------------------------------------------------------------------------------
def results(label: str, ppl: dict[int, float], passkey: dict[int, tuple[float, float]] | None = None) -> dict:
    """A results.json of eval.py's schema (fope_lm/schemas/results.schema.json)."""
    rows = [
        {"length": length, "batch_size": 1, "n_chunks": 1, "scored_tokens": length - 1, "loss": 2.0, "ppl": value,
         "buckets": [{"start": 0, "end": length, "scored_tokens": length - 1, "loss": 2.0}], "wall_time_s": 0.1}
        for length, value in ppl.items()
    ]  # fmt: skip
    key = None
    if passkey:
        lengths = [{"length": length, "greedy_accuracy": greedy, "teacher_forced_accuracy": forced, "trials": 4, "mean_key_logprob": -1.0,
                    "by_depth": [{"start": 0.0, "end": 1.0, "teacher_forced_accuracy": forced, "greedy_accuracy": greedy, "trials": 4}],
                    "wall_time_s": 0.1}
                   for length, (greedy, forced) in passkey.items()]  # fmt: skip
        key = {"trials": 4, "seed": 0, "distractors": 9, "chance": 0.1, "max_new_tokens": 8, "lengths": lengths}
    return {
        "format_version": 2, "label": label, "checkpoint": "/ckpt", "pe": "fope", "pe_options": {}, "eval_pe": "fope",
        "eval_pe_options": {}, "eval_scaling": None, "train_seq_len": L, "step": 20, "model": {"config": {}, "n_parameters": 1},
        "data": {"dir": "/data", "name": "embedded", "fingerprint": "f" * 16, "training_fingerprint": None, "split": "validation",
                 "tokens_available": 100, "tokens_evaluated": 32},
        "settings": {"tokens_per_batch": 32, "loss_chunk_tokens": 32, "device": "cpu", "autocast_dtype": None},
        "perplexity": rows, "sliding_window": None, "passkey": key,
        "wall_time_s": 1.0, "created_at": "2026-01-01T00:00:00Z", "git_sha": "0" * 40, "package_versions": {},
    }  # fmt: skip


def test_model_card(tmp_path, tokenizer_dir):
    """README.md: PE and options, training length, data (name, dir, fingerprint), step and tokens, the eval table, how to
    load it and the lm_eval command with max_length, for a run's checkpoint with evaluations."""
    from fope_lm.evaluation.report import validate_results

    data = tmp_path / "data" / "passkey-py3"
    passkey_tokenizer().save_pretrained(data / "tokenizer")
    (data / "metadata.json").write_text(json.dumps({"name": "passkey"}))
    run = RunDir(tmp_path / "run")
    step = run.checkpoint(20)
    checkpoint(step, "fope", {"scale": 2.0}, train_seq_len=L, data_dir=str(data), data_fingerprint="abc123" * 4, step=20,
               tokens_seen=20480)  # fmt: skip
    (step / COMPLETE_MARKER).write_text("20\n")
    run.run_info.write_text(json.dumps({"data_dir": str(data), "data_fingerprint": "abc123" * 4}))
    evaluations = {
        "fope": results("fope", {32: 7.25, 64: 9.5}, {64: (0.5, 0.75)}),
        "fope+yarn(dynamic)": results("fope+yarn(dynamic)", {32: 7.25, 64: 8.125}),
    }
    for label, payload in evaluations.items():
        validate_results(payload)
        (run.eval_dir(step) / label).mkdir(parents=True)
        (run.eval_dir(step) / label / "results.json").write_text(json.dumps(payload))
    (run.eval_dir(step) / "torn").mkdir()
    (run.eval_dir(step) / "torn" / "results.json").write_text('{"label": ')

    out = export_hf(run.path, tmp_path / "hf")
    card = (out / "README.md").read_text()
    for fragment in (
        "library_name: transformers",
        "| position encoding | `fope` |",
        '| options | `{"scale": 2.0}` |',
        f"| training length | {L} |",
        f"| max_position_embeddings | {2 * L} |",
        f"`passkey` (`{data}`, as model_config.json records it)",
        f"| data fingerprint | `{'abc123' * 4}` |",
        "| step | 20 |",
        "| tokens seen | 20,480 |",
        "| length | fope | fope+yarn(dynamic) |",
        "| 64 | 9.5 | 8.125 |",
        "| 64 | 0.50 / 0.75 | - |",
        "torn/results.json",  # named as skipped
        f'AutoModelForCausalLM.from_pretrained("{out}", trust_remote_code=True)',
        f"lm_eval --model hf --model_args pretrained={out},trust_remote_code=True,dtype=float32,max_length={2 * L}",
    ):
        assert fragment in card, (fragment, card)

    native = export_hf(checkpoint(tmp_path / "rope", "yarn", {"scale": 4.0}), tmp_path / "native", tokenizer=tokenizer_dir)
    card = (native / "README.md").read_text()
    assert f'AutoModelForCausalLM.from_pretrained("{native}")' in card and "trust_remote_code" not in card
    assert f"--model_args pretrained={native},dtype=float32,max_length={4 * L}" in card
    assert "| data | not recorded |" in card and "No evaluation results" in card


# --- no tokenizer ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["native", "remote"])
def test_a_checkpoint_without_a_tokenizer_exports_with_a_warning(format, tmp_path, caplog):
    source = checkpoint(tmp_path / "ckpt", vocab_size=383)  # no data recorded; 383 rows padded to 384
    with caplog.at_level("WARNING", logger="fope_lm.hf.export"):
        out = export_hf(source, tmp_path / "hf", format=format)
    assert "records no training data and no --tokenizer was passed" in caplog.text
    assert "generation_config.json holds only suppress_tokens" in caplog.text
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors").is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    assert {key: value for key, value in generation.items() if key != "transformers_version"} == {"suppress_tokens": [383]}
    written = config_json(out)
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (None, None, None)
    assert "**No tokenizer**" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  # weights and config load
    assert model.config.eos_token_id is None


def test_the_script_exports_without_a_tokenizer_and_refuses_in_one_line(tmp_path):
    """What a user sees: a warning and exit 0 without a tokenizer; one line and exit 1 for a length a native
    dynamic-NTK export cannot declare."""
    plain = checkpoint(tmp_path / "plain")
    dynamic = checkpoint(tmp_path / "dynamic", "rope", {"scaling": "dynamic_ntk", "scale": 2.0})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    commands = {
        "plain": [EXPORT, str(plain), str(tmp_path / "hf-plain")],
        "dynamic": [EXPORT, str(dynamic), str(tmp_path / "hf-dynamic"), "--format", "native", "--max-position-embeddings", "4096"],
    }
    processes = {
        name: subprocess.Popen([sys.executable, *command], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, command in commands.items()
    }
    outputs = {name: (process.communicate(timeout=300), process.returncode) for name, process in processes.items()}
    (stdout, stderr), code = outputs["plain"]
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "records no training data and no --tokenizer was passed" in stderr and f"exported {plain}" in stdout
    assert (tmp_path / "hf-plain" / "config.json").is_file()
    (stdout, stderr), code = outputs["dynamic"]
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith("error: --max-position-embeddings 4096: a native export of pe 'rope'")
    assert "max_length=4096" in lines[0] and not (tmp_path / "hf-dynamic").exists()


# --- transformers 4.x ----------------------------------------------------------------------------------------------
TRANSFORMERS4 = os.environ.get("FOPE_TRANSFORMERS4_PYTHON")
TEXT = "The pass key is 4821. Remember it."
V4_SCRIPT = """
import json, sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
assert transformers.__version__.startswith("4."), transformers.__version__
report = {"version": transformers.__version__}
for name, directory in json.loads(sys.argv[1]).items():
    expected = torch.load(f"{directory}/expected.pt")
    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(directory)
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    report[name] = {"diff": float((logits - expected["logits"]).abs().max()), "class": type(model).__name__,
                    "ids": [config.bos_token_id, config.eos_token_id, config.pad_token_id],
                    "max_position_embeddings": config.max_position_embeddings, "rope_scaling": config.rope_scaling,
                    "tokens": AutoTokenizer.from_pretrained(directory)(expected["text"]).input_ids}
print(json.dumps(report))
"""


@pytest.mark.slow
@pytest.mark.skipif(TRANSFORMERS4 is None, reason="set FOPE_TRANSFORMERS4_PYTHON to a Python with transformers<5, torch, safetensors")
def test_native_exports_load_in_transformers4(tmp_path, tokenizer_dir):
    """A native export (unscaled, YaRN, linear, dynamic NTK) loads in transformers 4.x, which reads rope_scaling and
    rope_theta, with fope_lm's logits past the training length (100 > L = 32), and the tokenizer's ids."""
    cases = {
        "rope": ("rope", {}),
        "yarn": ("yarn", {"scale": 4.0}),
        "linear": ("rope", {"scaling": "linear", "scale": 4.0}),
        "dynamic": ("rope", {"scaling": "dynamic_ntk", "scale": 2.0}),
    }
    directories = {}
    for name, (pe, options) in cases.items():
        source = checkpoint(tmp_path / f"ckpt-{name}", pe, options, vocab_size=383)
        out = export_hf(source, tmp_path / name, tokenizer=tokenizer_dir, format="native")
        model = load_model(source).eval()
        ids = torch.randint(0, 383, (2, 100))
        with torch.no_grad():
            torch.save({"ids": ids, "logits": model(ids).logits, "text": TEXT}, out / "expected.pt")
        directories[name] = str(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([TRANSFORMERS4, "-c", V4_SCRIPT, json.dumps(directories)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    tokens = passkey_tokenizer()(TEXT).input_ids
    for name in cases:
        assert report[name]["class"] == "LlamaForCausalLM" and report[name]["diff"] < 1e-4, (name, report)
        assert report[name]["ids"] == [None, 0, 0] and report[name]["tokens"] == tokens, (name, report)  # its tokenizer loads there
    assert "rope_scaling" not in result.stderr and "factor" not in result.stderr, result.stderr[-3000:]  # no key or factor warnings
