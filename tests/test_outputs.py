"""What the scripts write, and what they refuse to write or to run ("a shared cluster cannot hurt a run"): export and
import never write into a checkpoint or a run and replace a non-empty dir only with --overwrite, whole or not at all;
the import reads no pickle and runs no code from the model dir; weights follow the umask; an eval label is a plain
name; compare_results names a torn or wrong results.json in one line. What a user sees is checked on the real
scripts, in subprocesses: one line on stderr, exit code 1, no traceback."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fope_lm.checkpoint import load_state_dict, save_model
from fope_lm.errors import ConfigError
from fope_lm.evaluation.config import EvalConfig
from fope_lm.evaluation.report import ResultsError, load_valid_results
from fope_lm.hf import export_hf
from fope_lm.hf.llama import LlamaConversionError, import_llama, remote_code
from fope_lm.hf.outputs import OutputDirError
from fope_lm.nn.model import build_model
from fope_lm.run_dir import COMPLETE_MARKER, RunDir

from conftest import REPO
from helpers.evaluation import passkey_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = len(passkey_tokenizer())


# --- helpers: a run with one checkpoint, a Llama dir, the scripts ------------------------------------------------
def make_run(root: Path) -> tuple[Path, Path]:
    """A run dir with one complete checkpoint (step 20) and run_info.json naming a data dir with a tokenizer."""
    run, data = RunDir(root / "run"), root / "data"
    passkey_tokenizer().save_pretrained(data / "tokenizer")
    checkpoint = run.checkpoint(20)
    save_model(checkpoint, build_model("tiny", pe="fope", vocab_size=VOCAB, max_seq_len=32))
    (checkpoint / COMPLETE_MARKER).write_text("20\n")
    run.run_info.write_text(json.dumps({"data_dir": str(data)}))
    return run.path, checkpoint


def make_llama(directory: Path) -> Path:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    passkey_tokenizer().save_pretrained(directory)
    return directory


def digest(directory: Path) -> dict[str, str]:
    """Every file under `directory` (names relative to it) and its sha256."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def siblings(out: Path) -> list[str]:
    """The hidden staging dirs (`.<name>.partial-*`, `.<name>.replaced-*`) left beside `out`."""
    return sorted(path.name for path in out.parent.glob(f".{out.name}.*"))


def script_env(tmp_path: Path) -> dict[str, str]:
    # transformers copies remote code into HF_MODULES_CACHE before importing it: keep that in tmp_path
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}


def run_scripts(commands: dict[str, list[str]], tmp_path: Path, stdin: str = "") -> dict[str, subprocess.CompletedProcess]:
    """Run each script command (in parallel: each pays Python + torch start-up) with `stdin` piped in."""
    processes = {
        name: subprocess.Popen(
            [sys.executable, *command],
            cwd=tmp_path,
            env=script_env(tmp_path),
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for name, command in commands.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(stdin, timeout=300)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 1 and exactly one line on stderr, `error: ...`, holding each fragment; returns that line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


EXPORT, IMPORT = str(REPO / "scripts" / "export_hf.py"), str(REPO / "scripts" / "import_hf.py")


def load_script(name: str):
    """scripts/<name>.py as a module, to run its main() in this process (the matrix of cases; one subprocess per kind
    of message shows what a user sees)."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_error(capsys, script, *argv: str) -> str:
    """The one `error: ...` line of a script's main() that returns 1."""
    capsys.readouterr()
    assert script.main(list(argv)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


# --- 1. output dirs -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_over_its_checkpoint_is_refused_in_one_line(tmp_path):
    """`export_hf.py RUN RUN/checkpoints/step_000020` (a typo for the output dir) used to exit 0 with the checkpoint's
    model.safetensors replaced by Llama-named tensors, so resume and eval failed and the weights were gone."""
    run, checkpoint = make_run(tmp_path)
    llama = make_llama(tmp_path / "llama")
    before = digest(tmp_path)
    results = run_scripts(
        {"export": [EXPORT, str(run), str(checkpoint)], "import": [IMPORT, str(llama), str(checkpoint), "--overwrite"]}, tmp_path
    )
    for script, example in (("export", "hf/NAME"), ("import", "runs/NAME")):
        assert_one_line_error(
            results[script], f"error: output dir {checkpoint} is checkpoint {checkpoint} (it holds model_config.json), which would "
            f"lose its files: pass a new directory outside every checkpoint and run, e.g. {example}",
        )  # fmt: skip
    assert digest(tmp_path) == before and load_state_dict(checkpoint)  # the checkpoint as it was


def test_no_output_dir_is_a_checkpoint_or_a_run_or_inside_one(tmp_path, capsys):
    """Both scripts, every protected kind of dir, with --overwrite too: one line, nothing written or replaced."""
    run, checkpoint = make_run(tmp_path)
    llama = make_llama(tmp_path / "llama")
    standalone = tmp_path / "saved"
    save_model(standalone, build_model("tiny", vocab_size=VOCAB, max_seq_len=32))  # a checkpoint outside a run
    staging = run / "checkpoints" / "step_000030.tmp"  # the trainer's half-written checkpoint
    staging.mkdir()
    before = digest(tmp_path)
    targets = {
        checkpoint: f"is checkpoint {checkpoint} (it holds model_config.json)",
        checkpoint / "hf": f"lies inside checkpoint {checkpoint}",
        run / "checkpoints": f"is the checkpoints/ of run {run}",
        run / "checkpoints" / "step_000040": f"lies inside the checkpoints/ of run {run}",
        staging: f"lies inside the checkpoints/ of run {run}",
        run: f"is run dir {run}",
        standalone: f"is checkpoint {standalone}",
        standalone / "sub" / "hf": f"lies inside checkpoint {standalone}",
    }
    export, import_ = load_script("export_hf"), load_script("import_hf")
    for out, words in targets.items():
        for script, source, example in ((export, run, "hf/NAME"), (import_, llama, "runs/NAME")):
            for flags in ([], ["--overwrite"]):
                line = main_error(capsys, script, str(source), str(out), *flags)
                assert line.startswith(f"error: output dir {out} {words}") and "which would lose its files" in line, line
                assert line.endswith(f"pass a new directory outside every checkpoint and run, e.g. {example}"), line
    link = tmp_path / "link"
    link.symlink_to(checkpoint)  # a symlink or `..` does not hide a checkpoint
    for out in (link, run / "checkpoints" / ".." / "checkpoints" / "step_000020"):
        assert f"is checkpoint {checkpoint}" in main_error(capsys, export, str(run), str(out), "--overwrite")
    assert "is or holds the source" in main_error(capsys, import_, str(llama), str(tmp_path / "llama"), "--overwrite")
    assert "is or holds the source" in main_error(capsys, import_, str(llama), str(tmp_path), "--overwrite")
    (tmp_path / "notes.txt").write_text("x")
    assert "is a file: pass a directory" in main_error(capsys, export, str(run), str(tmp_path / "notes.txt"))
    (tmp_path / "notes.txt").unlink()
    link.unlink()
    assert digest(tmp_path) == before
    # a dir beside the checkpoints is fine
    assert export.main([str(run), str(run / "hf")]) == 0 and (run / "hf" / "model.safetensors").is_file()


def test_a_non_empty_dir_is_replaced_only_with_overwrite_and_only_when_complete(tmp_path, monkeypatch):
    run, checkpoint = make_run(tmp_path)
    out = tmp_path / "hf"
    out.mkdir()
    export_hf(run, out)  # an existing empty dir is fine
    first = digest(out)
    with pytest.raises(OutputDirError, match=r"^output dir .*hf is not empty: pass --overwrite to replace it"):
        export_hf(run, out)

    def broken(*args, **kwargs):  # the export fails half-way: weights and config written, the code not
        raise OSError("No space left on device")

    monkeypatch.setattr("fope_lm.hf.export.write_code", broken)
    with pytest.raises(OSError, match="No space left"):
        export_hf(run, out, overwrite=True, format="remote")
    assert digest(out) == first and siblings(out) == []  # the old export as it was, nothing half-written beside it
    with pytest.raises(OSError, match="No space left"):
        export_hf(run, tmp_path / "new", format="remote")
    assert not (tmp_path / "new").exists() and siblings(tmp_path / "new") == []
    monkeypatch.undo()

    (out / "stale.txt").write_text("from an earlier export")
    export_hf(run, out, overwrite=True)
    assert not (out / "stale.txt").exists() and digest(out).keys() == first.keys() and siblings(out) == []
    monkeypatch.chdir(out)
    with pytest.raises(OutputDirError, match="is or holds the current or home directory, which --overwrite would delete"):
        export_hf(run, ".", overwrite=True)
    monkeypatch.chdir(tmp_path)
    save_model(out / "kept", build_model("tiny", vocab_size=VOCAB, max_seq_len=32))  # a checkpoint anywhere inside
    with pytest.raises(OutputDirError, match=r"holds checkpoint .*kept \(it holds model_config.json\), which --overwrite would delete"):
        export_hf(run, out, overwrite=True)
    assert (out / "kept" / "model.safetensors").is_file()


def test_import_overwrite_and_failure_leave_no_half_written_checkpoint(tmp_path, monkeypatch):
    llama = make_llama(tmp_path / "llama")
    cli = load_script("import_hf")
    out = tmp_path / "imported"
    out.mkdir()
    (out / "notes.txt").write_text("not a checkpoint")
    assert cli.main([str(llama), str(out)]) == 1
    assert (out / "notes.txt").is_file()

    real_save_model = import_llama.__globals__["save_model"]

    def save_then_fail(directory, model, metadata=None):  # weights on disk, then the import dies
        real_save_model(directory, model, metadata)
        raise OSError("No space left on device")

    monkeypatch.setattr("fope_lm.hf.llama.save_model", save_then_fail)
    with pytest.raises(OSError):
        import_llama(llama, out, overwrite=True)
    assert digest(out) == {"notes.txt": hashlib.sha256(b"not a checkpoint").hexdigest()} and siblings(out) == []
    monkeypatch.undo()

    assert cli.main([str(llama), str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and load_state_dict(out) and siblings(out) == []
    with pytest.raises(OutputDirError, match="is checkpoint"):  # now a checkpoint: never replaced, even with overwrite
        import_llama(llama, out, overwrite=True)


# --- 2 and 3. no pickles, no remote code ---------------------------------------------------------------------------
EVIL_TOKENIZER = """from pathlib import Path
Path({marker!r}).write_text("the model dir's code ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def add_remote_tokenizer(directory: Path, marker: Path) -> None:
    """A tokenizer whose tokenizer_config.json auto_map points at a .py in the dir, which writes `marker` at import."""
    (directory / "evil_tokenizer.py").write_text(EVIL_TOKENIZER.format(marker=str(marker)))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config |= {"auto_map": {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}, "tokenizer_class": "EvilTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.slow
def test_import_reads_no_pickle_and_runs_no_code_from_the_model_dir(tmp_path):
    """A pickle-only model dir (refused before with a 27-line traceback) and a tokenizer that asks for remote code
    (whose .py ran when the user answered transformers' prompt "y") are refused in one line; the .py never runs."""
    pickled = make_llama(tmp_path / "pickled")
    torch.save(safetensors.torch.load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")  # the old format
    (pickled / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    remote = make_llama(tmp_path / "remote")
    add_remote_tokenizer(remote, marker)
    results = run_scripts(
        {"pickle": [IMPORT, str(pickled), str(tmp_path / "out-pickle")], "remote": [IMPORT, str(remote), str(tmp_path / "out-remote")]},
        tmp_path,
        stdin="y\ny\n",  # what a user answers to transformers' "Do you wish to run the custom code? [y/N]"
    )
    assert_one_line_error(
        results["pickle"], f"error: {pickled} has only pickle weights (pytorch_model.bin): only safetensors weights are loaded, "
        "since unpickling a file can run any code; convert them where you trust the file: "
        f"LlamaForCausalLM.from_pretrained({str(pickled)!r}).save_pretrained({str(pickled)!r}, safe_serialization=True)",
    )  # fmt: skip
    assert_one_line_error(
        results["remote"], f"error: the tokenizer of {remote} asks to run its own code (tokenizer_config.json auto_map -> "
        "evil_tokenizer.EvilTokenizer), which fope_lm never does", 'without "auto_map"',
    )  # fmt: skip
    assert not marker.exists() and not list((tmp_path / "hf_modules").rglob("evil_tokenizer.py"))
    assert not (tmp_path / "out-pickle").exists() and not (tmp_path / "out-remote").exists()


def test_the_exports_tokenizer_runs_no_code_either(tmp_path, capsys):
    """The export's tokenizer comes from the data dir the checkpoint's run records: one asking for its own code is
    refused, and --tokenizer too."""
    run, _ = make_run(tmp_path)
    marker = tmp_path / "MARKER"
    tokenizer = tmp_path / "data" / "tokenizer"
    add_remote_tokenizer(tokenizer, marker)
    export = load_script("export_hf")
    for argv in ([str(run), str(tmp_path / "hf")], [str(run), str(tmp_path / "hf"), "--tokenizer", str(tokenizer)]):
        line = main_error(capsys, export, *argv)
        assert line == (
            f"error: tokenizer {tokenizer} asks to run its own code (tokenizer_config.json auto_map -> evil_tokenizer.EvilTokenizer), "
            "which fope_lm never does: pass --tokenizer DIR with a standard tokenizer (tokenizer.json)"
        )
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_remote_code_is_found_in_either_config_and_never_loaded(tmp_path):
    """The tokenizer loader passes trust_remote_code=False: past the check, transformers raises instead of asking."""
    from fope_lm.hf.llama import load_tokenizer

    directory = tmp_path / "tok"
    passkey_tokenizer().save_pretrained(directory)
    assert remote_code(directory) == []
    (directory / "config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["a.Slow", "a.Fast"], "AutoModel": "m.M"}}))
    assert remote_code(directory) == ["config.json auto_map -> a.Slow", "config.json auto_map -> a.Fast"]
    (directory / "config.json").unlink()
    marker = tmp_path / "MARKER"
    add_remote_tokenizer(directory, marker)
    assert remote_code(directory) == ["tokenizer_config.json auto_map -> evil_tokenizer.EvilTokenizer"]
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_tokenizer(directory)
    assert not marker.exists()


def test_safetensors_are_preferred_to_a_pickle_beside_them(tmp_path):
    """use_safetensors=True: a pickle next to the safetensors (here one that would write a file when unpickled) is
    never opened."""
    marker = tmp_path / "MARKER"
    source = make_llama(tmp_path / "llama")

    class Payload:
        def __reduce__(self):
            return (Path(marker).write_text, ("unpickled",))

    torch.save({"model.embed_tokens.weight": Payload()}, source / "pytorch_model.bin")
    import_llama(source, tmp_path / "out")
    assert load_state_dict(tmp_path / "out") and not marker.exists()
    with pytest.raises(LlamaConversionError, match="only pickle weights"):
        (source / "model.safetensors").unlink()
        import_llama(source, tmp_path / "out2")


# --- 4. file modes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_weights_follow_the_umask(mask, tmp_path):
    """safetensors creates its file mode 600 under any umask: checkpoints, exports and imports give their weights
    the umask's mode, as every other file."""
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    model = build_model("tiny", pe="rope", vocab_size=VOCAB, max_seq_len=32)
    passkey_tokenizer().save_pretrained(tmp_path / "tok")
    llama = make_llama(tmp_path / "llama")
    with umask(mask):
        save_model(tmp_path / "ckpt", model)
        export_hf(tmp_path / "ckpt", tmp_path / "native", tokenizer=tmp_path / "tok", format="native")
        export_hf(tmp_path / "ckpt", tmp_path / "remote", tokenizer=tmp_path / "tok", format="remote")
        import_llama(llama, tmp_path / "imported")
    for directory in ("ckpt", "native", "remote", "imported"):
        root = tmp_path / directory
        assert (root / "model.safetensors").is_file()
        modes = {str(path.relative_to(tmp_path)): path.stat().st_mode & 0o777 for path in [root, *root.rglob("*")]}
        expected = {name: dir_mode if (tmp_path / name).is_dir() else file_mode for name in modes}
        assert modes == expected, {name: oct(mode) for name, mode in modes.items()}


# --- 5. eval labels -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["", ".", "..", "a/b", "../elsewhere", f"x{os.sep}y"])
def test_an_eval_label_is_a_plain_name(label):
    with pytest.raises(ConfigError) as info:
        EvalConfig(checkpoint="x", data={"name": "embedded"}, label=label)
    assert str(info.value).startswith(f"label={label!r} is not a name: results go to eval/step_N/<label>") and "\n" not in str(info.value)


def test_ordinary_labels_pass():
    for label in ("rope", "rope+yarn(dynamic)", "fope L=512 s0", "..x", "a.b"):
        assert EvalConfig(checkpoint="x", data={"name": "embedded"}, label=label).label == label


@pytest.mark.slow
def test_eval_cli_refuses_a_path_label_in_one_line(tmp_path):
    """`eval.py label=..` used to write results into eval/ instead of eval/step_N/<label>."""
    run, _ = make_run(tmp_path)
    result = run_scripts({"eval": [str(REPO / "eval.py"), f"checkpoint={run}", "label=.."]}, tmp_path)["eval"]
    assert_one_line_error(result, "error: label='..' is not a name: results go to eval/step_N/<label>")
    assert not (run / "eval").exists()


# --- 6. compare_results on broken results.json ----------------------------------------------------------------------
def valid_results(label: str) -> dict:
    bucket = {"start": 0, "end": 32, "scored_tokens": 31, "loss": 2.0}
    row = {
        "length": 32,
        "batch_size": 1,
        "n_chunks": 1,
        "scored_tokens": 31,
        "loss": 2.0,
        "ppl": 7.39,
        "buckets": [bucket],
        "wall_time_s": 0.1,
    }
    return {
        "format_version": 2, "label": label, "checkpoint": "/ckpt", "pe": "rope", "pe_options": {}, "eval_pe": "rope",
        "eval_pe_options": {}, "eval_scaling": None, "train_seq_len": 32, "step": 20, "model": {"config": {}, "n_parameters": 1},
        "data": {"dir": "/data", "name": "embedded", "fingerprint": "f" * 16, "training_fingerprint": None, "split": "validation",
                 "tokens_available": 100, "tokens_evaluated": 32},
        "settings": {"tokens_per_batch": 32, "loss_chunk_tokens": 32, "device": "cpu", "autocast_dtype": None},
        "perplexity": [row, {**row, "length": 64, "scored_tokens": 63, "ppl": 9.0}], "sliding_window": None, "passkey": None,
        "wall_time_s": 1.0, "created_at": "2026-01-01T00:00:00Z", "git_sha": "0" * 40, "package_versions": {},
    }  # fmt: skip


def write_results_file(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(text)
    return directory / "results.json"


def torn_copy(directory: Path) -> tuple[Path, int]:
    """A results.json cut short (a copy interrupted, a full disk) and the line the JSON error names."""
    full = json.dumps(valid_results("fope"), indent=2)
    return write_results_file(directory, full[: len(full) // 2]), full[: len(full) // 2].count("\n") + 1


@pytest.mark.slow
def test_compare_results_names_a_torn_file_in_one_line(tmp_path):
    good = write_results_file(tmp_path / "good", json.dumps(valid_results("rope")))
    torn, line = torn_copy(tmp_path / "torn")
    compare = str(REPO / "scripts" / "compare_results.py")
    result = run_scripts({"torn": [compare, str(good), str(torn), "--output-dir", str(tmp_path / "out")]}, tmp_path)["torn"]
    assert_one_line_error(
        result, f"error: {torn} is not valid JSON (", f": line {line} column ", "evaluate the checkpoint again with eval.py"
    )
    assert not (tmp_path / "out").exists()


def test_compare_results_checks_every_file_against_the_schema(tmp_path, capsys):
    good = write_results_file(tmp_path / "good", json.dumps(valid_results("rope")))
    torn, line = torn_copy(tmp_path / "torn")
    keyless = write_results_file(tmp_path / "keyless", "{}")
    wrong = valid_results("alibi")
    wrong["perplexity"][1]["ppl"] = "high"
    wrong_type = write_results_file(tmp_path / "wrong", json.dumps(wrong))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{")
    (tmp_path / "empty").mkdir()
    no_rows = valid_results("passkey only")
    no_rows["perplexity"] = []
    compare = load_script("compare_results")
    expected = {
        torn: f"error: {torn} is not valid JSON (",
        keyless: f"error: {keyless} does not match fope_lm/schemas/results.schema.json at $: 'format_version' is a required property; "
        "evaluate the checkpoint again with eval.py",
        wrong_type: f"error: {wrong_type} does not match fope_lm/schemas/results.schema.json at $.perplexity[1].ppl: "
        "'high' is not of type 'number'",
        binary: f"error: {binary} is not text (invalid start byte at byte 0)",
        tmp_path / "empty": f"error: {tmp_path / 'empty'} holds no results.json: pass results.json files or the eval output dirs",
        tmp_path / "nope": f"error: {tmp_path / 'nope'} does not exist",
    }
    for path, words in expected.items():
        line_printed = main_error(capsys, compare, str(good), str(path), "--output-dir", str(tmp_path / "out"))
        assert line_printed.startswith(words), line_printed
    assert f": line {line} column " in main_error(capsys, compare, str(torn), "--output-dir", str(tmp_path / "out"))
    no_rows_file = write_results_file(tmp_path / "no-rows", json.dumps(no_rows))  # fine beside others, alone nothing to plot
    assert main_error(capsys, compare, str(no_rows_file), "--output-dir", str(tmp_path / "out")).startswith(
        "error: none of the results has perplexity rows"
    )
    assert not (tmp_path / "out").exists()
    assert compare.main([str(good), str(good.parent), "--output-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "comparison.csv").read_text().splitlines() == ["length,rope,rope", "32,7.39,7.39", "64,9.0,9.0"]


def test_load_valid_results(tmp_path):
    path = write_results_file(tmp_path / "a", json.dumps(valid_results("rope")))
    assert load_valid_results(path) == load_valid_results(path.parent) == valid_results("rope")
    (path).write_text(json.dumps([1, 2]))
    with pytest.raises(ResultsError, match=r"at \$: \[1, 2\] is not of type 'object'"):
        load_valid_results(path)
