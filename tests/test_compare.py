"""Comparing evaluations (scripts/compare_results.py, fope_lm/evaluation/compare.py) on results dicts built here:
mixed data refused, columns named by run, seeds merged into mean ± sd, passkey tables, a readable figure."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fope_lm.evaluation import compare, report
from fope_lm.nn.model import PRESETS, ModelConfig

from conftest import REPO

TINY = ModelConfig(**PRESETS["tiny"], vocab_size=8192, max_seq_len=128).to_dict()
LENGTHS = (64, 128, 256, 512)


def make_results(
    root: Path,
    run: str,
    ppl: dict[int, float] | None = None,
    *,
    label: str | None = None,
    pe: str = "rope",
    step: int = 600,
    data: str = "embedded",
    fingerprint: str = "e" * 16,
    tokens_evaluated: int = 2048,
    settings: dict | None = None,
    passkey: dict[int, tuple[float, float]] | None = None,
) -> dict:
    """A results.json of checkpoint <root>/<run>/checkpoints/step_N, valid against the schema: `ppl` per length
    (default a rising curve; {}: none), `passkey` {length: (greedy, teacher-forced accuracy)}."""
    ppl = {length: 100.0 + length / 10 for length in LENGTHS} if ppl is None else ppl
    rows = []
    for length, value in ppl.items():
        bucket = {"start": 0, "end": length, "scored_tokens": length - 1, "loss": 4.6}
        n_chunks = tokens_evaluated // length
        rows.append(
            {
                "length": length, "batch_size": 1, "n_chunks": n_chunks, "scored_tokens": n_chunks * (length - 1), "loss": 4.6,
                "ppl": value, "buckets": [bucket], "wall_time_s": 0.1,
            }
        )  # fmt: skip
    passkey_block = None
    if passkey:
        by_depth = [{"start": 0.0, "end": 1.0, "trials": 10, "greedy_accuracy": None, "teacher_forced_accuracy": None}]
        passkey_block = {
            "trials": 10, "seed": 0, "distractors": 9, "chance": 0.1, "max_new_tokens": 10,
            "lengths": [
                {"length": length, "trials": 10, "greedy_accuracy": greedy, "teacher_forced_accuracy": forced,
                 "mean_key_logprob": -3.0, "by_depth": by_depth, "wall_time_s": 0.5}
                for length, (greedy, forced) in passkey.items()
            ],
        }  # fmt: skip
    results = {
        "format_version": 2, "label": label or pe, "checkpoint": str(root / run / "checkpoints" / f"step_{step:06d}"),
        "pe": pe, "pe_options": {}, "eval_pe": pe, "eval_pe_options": {}, "eval_scaling": None, "train_seq_len": 128,
        "step": step, "model": {"config": {**TINY, "pe": pe}, "n_parameters": 2_600_000},
        "data": {"dir": f"/data/{data}", "name": data, "fingerprint": fingerprint, "training_fingerprint": fingerprint,
                 "split": "validation", "tokens_available": 100_000, "tokens_evaluated": tokens_evaluated},
        "settings": {"tokens_per_batch": 512, "loss_chunk_tokens": 4096, "per_document": False, "device": "cpu",
                     "autocast_dtype": None, **(settings or {})},
        "perplexity": rows, "sliding_window": None, "passkey": passkey_block, "wall_time_s": 1.0,
        "created_at": "2026-01-01T00:00:00+00:00", "git_sha": "0" * 40, "package_versions": {},
    }  # fmt: skip
    report.validate_results(results)
    return results


def write(results: dict) -> Path:
    """Where eval.py puts it: <run_dir>/eval/step_N/<label>/results.json."""
    checkpoint = Path(results["checkpoint"])
    directory = checkpoint.parent.parent / "eval" / checkpoint.name / results["label"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(results))
    return directory / "results.json"


def run_main(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = compare.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path: Path) -> list[dict]:
    with open(path) as file:
        return list(csv.DictReader(file))


# --- one dataset and protocol per table ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, words",
    [
        ({"data": "c4", "fingerprint": "c" * 16}, ["data: embedded (fingerprint eeeeeeeeeeee", " vs c4 (fingerprint cccccccccccc"]),
        ({"tokens_evaluated": 4096}, ["evaluated token prefix: 2,048 tokens vs 4,096 tokens"]),
        ({"settings": {"per_document": True}}, ["scoring: joined documents vs per document"]),
    ],
)
def test_mixed_data_or_protocol_is_refused_in_one_line(tmp_path, capsys, change, words):
    a = write(make_results(tmp_path / "runs", "rope-tiny", ppl={128: 73.0}))
    b = write(make_results(tmp_path / "runs", "rope-c4", ppl={128: 1025.0}, **change))
    code, out, err = run_main(capsys, a, b, "--output-dir", tmp_path / "out")
    assert code == 1 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: {a} and {b} are not comparable (")
    assert all(word in line for word in words), line
    assert line.endswith("or pass --allow-mixed-data to tabulate them anyway (the table then says so)")
    assert not (tmp_path / "out").exists()


def test_passkey_settings_are_compared_where_both_ran_passkey(tmp_path, capsys):
    a = write(make_results(tmp_path / "runs", "rope-tiny", passkey={128: (0.5, 0.9)}))
    other = make_results(tmp_path / "runs", "fope-tiny", pe="fope", passkey={128: (0.5, 0.9)})
    other["passkey"]["trials"] = 50
    b = write(other)
    c = write(make_results(tmp_path / "runs", "alibi-tiny", pe="alibi"))  # no passkey: nothing to compare it on
    # perplexity.enabled=false: its (empty) token prefix is not compared
    d = write(make_results(tmp_path / "runs", "nope-tiny", {}, pe="nope", tokens_evaluated=0, passkey={128: (0.0, 0.1)}))
    code, _, err = run_main(capsys, a, c, d, "--output-dir", tmp_path / "ok")
    assert code == 0, err
    assert read_csv(tmp_path / "ok" / "comparison.csv")[0] == {"length": "64", "rope-tiny": "106.4", "alibi-tiny": "106.4", "nope-tiny": ""}
    code, _, err = run_main(capsys, a, c, b, "--output-dir", tmp_path / "out")
    assert code == 1
    assert err.strip() == (
        f"error: {a} and {b} are not comparable (passkey settings: 10 trials, seed 0, 9 distractors, 10 new tokens vs "
        "50 trials, seed 0, 9 distractors, 10 new tokens): compare evaluations of one dataset and protocol, or pass "
        "--allow-mixed-data to tabulate them anyway (the table then says so)"
    )


def test_allow_mixed_data_tabulates_and_says_so(tmp_path, capsys):
    a = write(make_results(tmp_path / "runs", "rope-tiny", ppl={128: 73.0}))
    b = write(make_results(tmp_path / "runs", "rope-c4", ppl={128: 1025.0}, data="c4", fingerprint="c" * 16))
    code, out, err = run_main(capsys, a, b, "--output-dir", tmp_path / "out", "--allow-mixed-data")
    assert code == 0, err
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert "**Warning: mixed data or evaluation settings (--allow-mixed-data), columns are not comparable**" in markdown
    assert "embedded (fingerprint eeeeeeeeeeee" in markdown and "c4 (fingerprint cccccccccccc" in markdown
    assert read_csv(tmp_path / "out" / "comparison.csv") == [
        {"length": "128", "rope-tiny [embedded eeeeeeee]": "73.0", "rope-c4 [c4 cccccccc]": "1025.0"}
    ]
    assert "| 128 | 73 | 1,025 |" in out


def test_settings_that_do_not_change_the_numbers_are_accepted_and_precision_is_noted(tmp_path, capsys):
    """tokens_per_batch, loss_chunk_tokens and the data dir leave the numbers as they are; bf16 moves them a little."""
    a = write(make_results(tmp_path / "runs", "rope-tiny"))
    other = make_results(tmp_path / "runs", "fope-tiny", pe="fope", settings={"tokens_per_batch": 8192, "loss_chunk_tokens": 64})
    other["data"]["dir"] = "/elsewhere/embedded"
    b = write(other)
    c = write(make_results(tmp_path / "runs", "alibi-tiny", pe="alibi", settings={"device": "cuda", "autocast_dtype": "bfloat16"}))
    code, _, err = run_main(capsys, a, b, c, "--output-dir", tmp_path / "out")
    assert code == 0, err
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert "Evaluated at different precisions (cpu fp32, cuda bfloat16)" in markdown and "Warning" not in markdown


# --- columns: runs, seeds --------------------------------------------------------------------------------------------
def test_runs_sharing_a_pe_get_their_run_names(tmp_path, capsys):
    runs = tmp_path / "runs"
    paths = [
        write(make_results(runs, "rope-tiny-L128", ppl={128: 80.0})),
        write(make_results(runs, "rope-tiny-L128_pe.rope_theta-500000", ppl={128: 81.0})),
        write(make_results(runs, "rope-tiny-L128", ppl={128: 79.0}, label="rope+yarn(dynamic)")),  # eval-time scaling
        write(make_results(runs, "rope-tiny-L128", ppl={128: 82.0}, label="mine")),  # a label of another form
        write(make_results(runs, "rope-tiny-L128", ppl={128: 85.0}, step=300)),  # the same run's earlier checkpoint
        write(make_results(tmp_path / "other", "rope-tiny-L128", ppl={128: 83.0}, step=300)),  # same name, another root
    ]
    code, out, err = run_main(capsys, *paths, "--output-dir", tmp_path / "out")
    assert code == 0, err
    header = list(read_csv(tmp_path / "out" / "comparison.csv")[0])
    assert header == [
        "length",
        "rope-tiny-L128@600",
        "rope-tiny-L128_pe.rope_theta-500000",
        "rope-tiny-L128+yarn(dynamic)",
        "rope-tiny-L128 (mine)",
        "runs/rope-tiny-L128@300",
        "other/rope-tiny-L128@300",
    ]
    assert len(set(header)) == len(header)
    assert "| length | rope-tiny-L128@600 | rope-tiny-L128_pe.rope_theta-500000 | rope-tiny-L128+yarn(dynamic) |" in out


def test_a_checkpoint_outside_a_run_is_named_by_its_label(tmp_path, capsys):
    results = make_results(tmp_path, "unused")
    results["checkpoint"] = str(tmp_path / "step_000600")
    path = tmp_path / "eval" / "rope" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(results))
    assert compare.Evaluation.load(path).name == "rope"


def test_seeds_are_one_column_with_mean_and_sd(tmp_path, capsys):
    runs = tmp_path / "runs"
    seeds = {0: (100.0, 150.0), 1: (110.0, 165.0), 2: (120.0, 171.0)}  # ppl at 128 and 1024
    paths = [
        write(make_results(runs, "fope-tiny-L128" + (f"_s{seed}" if seed else ""), ppl={128: a, 1024: b}, pe="fope"))
        for seed, (a, b) in seeds.items()
    ]  # derive_run_name's names: seed 0 bare, then _s1, _s2
    paths.append(write(make_results(runs, "rope-tiny-L128", ppl={128: 99.0, 1024: 300.0})))
    code, out, err = run_main(capsys, *paths, "--output-dir", tmp_path / "out")
    assert code == 0, err
    rows = read_csv(tmp_path / "out" / "comparison.csv")
    assert list(rows[0]) == ["length", "fope-tiny-L128", "fope-tiny-L128_sd", "fope-tiny-L128_n", "rope-tiny-L128"]
    for row, index in zip(rows, (0, 1), strict=True):
        values = [pair[index] for pair in seeds.values()]
        assert float(row["fope-tiny-L128"]) == pytest.approx(statistics.mean(values))
        assert float(row["fope-tiny-L128_sd"]) == pytest.approx(statistics.stdev(values))  # sample sd: 10.0 at 128
        assert row["fope-tiny-L128_n"] == "3"
    assert "| length | fope-tiny-L128 (n=3) | rope-tiny-L128 |" in out
    assert "| 128 | 110 ± 10 | 99 |" in out and "| 1024 | 162 ± 11 | 300 |" in out
    assert "Seed groups, mean ± sample sd (n - 1) over the seeds, n in the header: `fope-tiny-L128` seeds 0, 1, 2 (run name)." in out


def test_seed_cells():
    column = compare.Column("x", [None, None, None])  # type: ignore[list-item]
    assert compare.format_cell(column.cell([100.0, 104.0, None]), 3) == "102.0 ± 2.8 (n=2)"  # a seed without this length
    assert compare.format_cell(column.cell([7.0, None, None]), 3) == "7 ± - (n=1)"
    assert compare.format_cell(column.cell([None, None, None]), 3) == "-"
    assert compare.format_cell(column.cell([1234.5, 1234.5, 1234.5]), 3) == "1,234 ± 0"
    assert compare.format_cell(column.cell([1000.0, 1300.0]), 2) == "1,150 ± 212"


def test_seeds_from_the_run_config_and_what_is_not_a_seed_group(tmp_path, capsys):
    """The demo's layout (`--seed 1 --out runs/demo_s1`): one run name, the seed only in each run's config.yaml. Runs
    with the same seed, an unknown one, or another step stay apart."""
    paths = []
    for root, seed, value in (("demo", 0, 100.0), ("demo_s1", 1, 104.0)):
        paths.append(write(make_results(tmp_path / root, "rope", ppl={128: value})))
        (tmp_path / root / "rope" / "config.yaml").write_text(f"seed: {seed}\nrun_name: rope\n")
    evaluations = [compare.Evaluation.load(path) for path in paths]
    assert [(e.seed, e.seed_source) for e in evaluations] == [(0, "config.yaml"), (1, "config.yaml")]
    (column,) = compare.build_columns(evaluations)
    assert column.name == "rope" and column.seeds == [0, 1]
    assert column.ppl(128) == compare.Cell(102.0, pytest.approx(statistics.stdev([100.0, 104.0])), 2)

    # a checkpoint's trainer state wins over config.yaml
    state = Path(evaluations[1].results["checkpoint"]) / "trainer_state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"step": 600, "config": {"seed": 7}}))
    assert compare.Evaluation.load(paths[1]).seed == 7

    (tmp_path / "demo_s1" / "rope" / "config.yaml").write_text("seed: 0\n")  # the same seed twice: two runs, not a group
    state.unlink()
    columns = compare.build_columns([compare.Evaluation.load(path) for path in paths])
    assert [column.name for column in columns] == ["demo/rope", "demo_s1/rope"]

    later = write(make_results(tmp_path / "runs", "rope_s1", ppl={128: 90.0}, step=900))  # another step: not a seed of rope@600
    first = write(make_results(tmp_path / "runs", "rope", ppl={128: 95.0}))
    columns = compare.build_columns([compare.Evaluation.load(path) for path in (first, later)])
    assert [(column.name, len(column.members)) for column in columns] == [("rope", 1), ("rope_s1", 1)]


def test_passkey_columns(tmp_path, capsys):
    runs = tmp_path / "runs"
    paths = [
        write(make_results(runs, "rope-tiny", passkey={128: (0.5, 0.9), 256: (0.0, 0.3)})),
        write(make_results(runs, "rope-tiny_s1", passkey={128: (0.7, 1.0), 256: (0.1, 0.2)})),
        write(make_results(runs, "alibi-tiny", pe="alibi", passkey={128: (0.4, 0.8), 256: (None, 0.6)})),
        write(make_results(runs, "nope-tiny", pe="nope")),  # no passkey: left out of the passkey tables
    ]
    code, out, err = run_main(capsys, *paths, "--output-dir", tmp_path / "out")
    assert code == 0, err
    rows = read_csv(tmp_path / "out" / "comparison_passkey.csv")
    assert list(rows[0])[:5] == ["length", "score", "rope-tiny", "rope-tiny_sd", "rope-tiny_n"]
    by_key = {(row["length"], row["score"]): row for row in rows}
    assert float(by_key["128", "greedy"]["rope-tiny"]) == pytest.approx(0.6)
    assert float(by_key["128", "teacher_forced"]["rope-tiny"]) == pytest.approx(0.95)
    assert float(by_key["128", "teacher_forced"]["rope-tiny_sd"]) == pytest.approx(statistics.stdev([0.9, 1.0]))
    assert by_key["256", "greedy"]["alibi-tiny"] == "" and by_key["256", "teacher_forced"]["alibi-tiny"] == "0.6"
    assert "## Passkey retrieval: greedy accuracy" in out and "## Passkey retrieval: teacher-forced accuracy (chance 0.10)" in out
    assert "| length | rope-tiny (n=2) | alibi-tiny |\n|---:|---:|---:|\n| 128 | 0.60 ± 0.14 | 0.4 |\n| 256 | 0.050 ± 0.071 | - |" in out
    assert (tmp_path / "out" / "comparison_passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the figure ------------------------------------------------------------------------------------------------------
def visible_tick_labels(axes) -> list[str]:
    low, high = axes.get_ylim()
    return [label.get_text() for label, tick in zip(axes.get_yticklabels(), axes.get_yticks(), strict=True) if low <= tick <= high]


@pytest.mark.parametrize(
    "low, high",
    [(1000.0, 1030.0), (73.0, 75.0), (7.39, 7.41), (100.0, 180.0), (100.0, 400.0), (20.0, 30_000.0), (50.0, 50.0)],
)
def test_y_ticks_are_readable_at_any_range(low, high):
    """Curves within a few percent once got a single tick label ("1,000"): now at least 3 distinct ones, in view."""
    curves = [report.Curve("a", [128, 256, 512], [low, (low + high) / 2, high]), report.Curve("b", [128, 512], [low * 1.001, high])]
    figure = report.perplexity_figure(curves, train_lengths=[128], title="t")
    figure.draw_without_rendering()
    axes = figure.axes[0]
    labels = visible_tick_labels(axes)
    assert len(set(labels)) >= 3 and len(set(labels)) == len(labels) and all(labels), labels
    assert not [tick for tick in axes.yaxis.get_minor_ticks() if tick.label1.get_visible() and tick.label1.get_text()]
    assert axes.get_ylim()[0] < low and axes.get_ylim()[1] > high  # no curve on the frame


def test_readable_log_ticks():
    assert report.readable_log_ticks(995, 1032) == [1000, 1010, 1020, 1030]
    assert report.readable_log_ticks(7.3, 7.5) == pytest.approx([7.3, 7.35, 7.4, 7.45, 7.5])
    assert report.readable_log_ticks(20, 30_000) == [100, 1000, 10_000]
    assert report.readable_log_ticks(90, 600) == [100, 200, 500]
    assert report.tick_labels([7.5, 8.0, 8.5]) == ["7.5", "8.0", "8.5"] and report.tick_labels([1000, 1010]) == ["1,000", "1,010"]


def test_figure_title_styles_bands_and_legend(tmp_path):
    runs = tmp_path / "runs"
    paths = [
        write(make_results(runs, "fope-tiny" + (f"_s{seed}" if seed else ""), {n: 90.0 + n / 20 + 3 * seed for n in LENGTHS}, pe="fope"))
        for seed in range(3)
    ]
    paths += [write(make_results(runs, name, pe=name.split("-")[0])) for name in ("rope-tiny", "alibi-tiny", "nope-tiny")]
    evaluations = [compare.Evaluation.load(path) for path in paths]
    columns = compare.build_columns(evaluations)
    figure = compare.ppl_figure(columns, evaluations, "Perplexity vs evaluation length", {})
    figure.draw_without_rendering()
    axes = figure.axes[0]
    title = axes.get_title()
    assert title.startswith("Perplexity vs evaluation length\n")
    assert "tiny (d_model 128, 2 layers, 2.6M params)" in title and "data embedded" in title and "training length 128" in title
    lines = [line for line in axes.get_lines() if line.get_label() in {curve.name for curve in compare.ppl_curves(columns)}]
    assert len(lines) == 4
    assert len({line.get_color() for line in lines}) == 4 and len({line.get_marker() for line in lines}) == 4
    assert lines[0].get_label() == "fope-tiny (mean ± sd, n=3)"
    assert len(axes.collections) == 1  # the one seed group's +-sd band
    legend = axes.get_legend()
    assert legend.get_window_extent().x0 >= axes.get_window_extent().x1  # beside the axes, over no curve
    assert "training length 128" in [text.get_text() for text in legend.get_texts()]


# --- the script ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_results_script_end_to_end(tmp_path):
    runs = tmp_path / "runs"
    paths = [write(make_results(runs, f"rope-tiny_s{seed}", passkey={128: (0.5, 0.9)})) for seed in (1, 2)]
    paths.append(write(make_results(runs, "fope-tiny", pe="fope", ppl={64: 101.0, 128: 100.5, 256: 102.0, 512: 103.0})))
    out = tmp_path / "compare"
    script = [sys.executable, str(REPO / "scripts" / "compare_results.py")]
    result = subprocess.run(
        [*script, *map(str, paths), "--output-dir", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "| length | rope-tiny (n=2) | fope-tiny |" in result.stdout
    names = {"comparison.csv", "comparison.md", "comparison.png", "comparison_passkey.csv", "comparison_passkey.png"}
    assert {path.name for path in out.iterdir()} == names
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "comparison.png").stat().st_size > 20_000

    mixed = write(make_results(tmp_path / "c4", "rope-tiny", data="c4", fingerprint="c" * 16))
    result = subprocess.run([*script, str(paths[0]), str(mixed), "--output-dir", str(tmp_path / "no")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert "not comparable (data: embedded" in result.stderr and not (tmp_path / "no").exists()
