"""The paper's grid (fope_lm.training.sweep, scripts/sweep.py): the generated configs, every overlay composing into the
run it names (and into the controls with `pe=...`), run names derived from the command line, the dry run's bash script
(shellcheck, and run under a stand-in sbatch), and a real multirun of train.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import OmegaConf

from fope_lm.nn.model import Transformer
from fope_lm.run_dir import RunDir, checkpoint_step
from fope_lm.schema import validated
from fope_lm.training import sweep
from fope_lm.training.config import TrainConfig, build_model_config, derive_run_name

from conftest import REPO
from helpers.training import LAUNCH_TIMEOUT, TINY, launch_command

GRID = sweep.grid()
RUNS = {run.name: run for run in GRID}


def composed(overrides: list[str], *, hydra: bool = True) -> dict:
    """configs/train.yaml with `overrides`, resolved. hydra=True: with Hydra's node, as train.py composes it (run_name is
    derived from its pe choice and command-line overrides); False: without it (the config files' own names)."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=hydra)
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key] for key in cfg if key != "hydra"
    }


def train_config(overrides: list[str] | dict) -> TrainConfig:
    config = composed(overrides) if isinstance(overrides, list) else overrides
    return validated(TrainConfig, config | {"data": {}})  # the data group is checked when prepared


def pe_behaviour(overrides: list[str]) -> tuple:
    """What a run's PE computes: its class, its trainable tensors and its cos/sin tables over 2 L positions, built
    from the same seed (FoPE's coefficients are random)."""
    config = train_config(overrides)
    model_config = build_model_config(config.model, config.pe, max_seq_len=config.train.seq_len, default_vocab_size=50280)
    torch.manual_seed(0)
    pe = model_config.pe_spec.build(head_dim=model_config.head_dim, n_heads=model_config.n_heads, max_seq_len=config.train.seq_len)
    tables = pe.cos_sin(torch.arange(2 * config.train.seq_len), device=torch.device("cpu"), dtype=torch.float32)
    return type(pe).__name__, sorted(n for n, p in pe.named_parameters() if p.requires_grad), tables


def same_behaviour(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))


# --- the generated configs ------------------------------------------------------------------------------------
def test_generated_configs_are_in_sync_with_the_grid():
    files = sweep.generated_configs(GRID)
    for path, text in files.items():
        assert path.is_file() and path.read_text() == text, f"{path}: run `python scripts/sweep.py --write-configs`"
    assert not sweep.stale_configs(files), "run `python scripts/sweep.py --write-configs`"


def test_write_configs_writes_the_committed_files_and_removes_stale_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "EXPERIMENT_DIR", tmp_path / "experiment")
    monkeypatch.setattr(sweep, "PAPER_PE_DIR", tmp_path / "paper" / "pe")
    (tmp_path / "experiment").mkdir()
    stale = tmp_path / "experiment" / "c4_60m_L512_gone.yaml"
    stale.write_text(sweep.GENERATED + "\n")
    handwritten = tmp_path / "experiment" / "mine.yaml"
    handwritten.write_text("# @package _global_\n")
    assert sweep.main(["--write-configs"]) == 0
    assert not stale.exists() and handwritten.exists()
    written = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.yaml") if p != handwritten}
    configs = REPO / "configs"
    committed = [*(configs / "experiment").glob("*.yaml"), *(configs / "paper" / "pe").glob("*.yaml")]
    assert written == {p.relative_to(configs): p.read_text() for p in committed if sweep.GENERATED in p.read_text()}
    assert "wrote 83 overlays" in capsys.readouterr().out


def test_grid_has_the_paper_runs_the_controls_and_the_continuations():
    paper = {f"{d}_{s}_L{n}_{pe}" for d in sweep.DATASETS for s in sweep.SIZES for n in sweep.LENGTHS for pe in sweep.PRETRAIN_PES}
    controls = {f"{d}_60m_L{n}_{pe}" for d in sweep.DATASETS for n in sweep.LENGTHS for pe in sweep.CONTROL_PES}
    controls -= {"c4_60m_L512_fope_nocap", "books_60m_L512_fope_nocap"}  # the same model as fope there (test below)
    continuations = {f"c4_{s}_L1024_{c}" for s in sweep.SIZES for c in ("rope_to_yarn", "fope_to_fope_yarn", "fope_to_fope")}
    assert set(RUNS) == paper | controls | continuations and len(GRID) == 48 + 26 + 9
    # every FoPE ablation config is a control, and the RoPE-side controls of the README's table
    assert set(sweep.CONTROL_PES) == {"rope_clip", "p_rope"} | set(sweep.fope_family()) - {"fope"}


@pytest.mark.parametrize("name", list(RUNS))
def test_experiment_composes_and_builds_on_meta(name):
    run = RUNS[name]
    cfg = composed([f"+experiment={name}", "run_root=/shared/runs"])
    config = train_config(cfg)
    assert config.run_name == name
    assert config.pe["name"] == OmegaConf.load(REPO / "configs" / "pe" / f"{run.pe}.yaml").name and config.model.preset == run.model
    assert config.train.seq_len == run.seq_len and config.train.tokens_per_step == 524288
    assert config.optim.lr == 6e-4 and config.optim.betas == [0.9, 0.95] and config.optim.weight_decay == 0.1
    assert cfg["data"]["name"] == ("c4" if run.base in ("c4", "continuation") else "books")
    if run.base == "c4":
        assert config.train.max_steps == 19074 and config.optim.warmup_steps == 10000
    elif run.base == "books":
        assert config.train.max_steps == 10109 and config.optim.warmup_steps == 10000
    else:
        assert config.init_from == f"/shared/runs/{run.after}" and config.train.max_steps == 2000
    if run.pe in sweep.fope_family():  # the paper's per-size init, for FoPE and every FoPE ablation
        assert config.pe["sigma"] == sweep.FOPE_SIGMA[run.model]
    else:
        assert "sigma" not in config.pe
    model_config = build_model_config(config.model, config.pe, max_seq_len=config.train.seq_len, default_vocab_size=50280)
    with torch.device("meta"):
        model = Transformer(model_config)
    assert model.config.padded_vocab_size == 50304
    if "yarn" in name:
        pe = model.blocks[0].attn.pe
        assert (pe.scaling.method, pe.scaling.scale, pe.scaling.original_max_seq_len, pe.scaling.attention_factor) == (
            "yarn",
            16.0,
            512,
            1.0,
        )


@pytest.mark.parametrize("size", sweep.CONTROL_SIZES)
@pytest.mark.parametrize("length", sweep.LENGTHS)
def test_each_control_computes_something_else_than_rope_and_fope(size, length):
    """A control that would build its FoPE baseline's exact PE is left out of the grid (SAME_AS_BASELINE), and only such."""
    baselines = {pe: pe_behaviour([f"+experiment=c4_{size}_L{length}_{pe}"]) for pe in ("rope", "fope")}
    for pe in sweep.CONTROL_PES:
        control = pe_behaviour([f"+experiment=c4_{size}_L{length}_fope", f"pe={pe}"])
        if (pe, size, length) in sweep.SAME_AS_BASELINE:
            assert same_behaviour(control, baselines["fope"]), pe
        else:
            assert not any(same_behaviour(control, baseline) for baseline in baselines.values()), pe


# --- another PE on an overlay (issue finding 2) ------------------------------------------------------------------
@pytest.mark.parametrize("pe", ["rope_clip", "rope", "nope", "alibi", "p_rope"])
def test_a_pe_override_drops_the_overlays_fope_options(pe):
    config = train_config(["+experiment=c4_60m_L512_fope", f"pe={pe}"])  # was: "rope_clip has no option(s) sigma"
    assert "sigma" not in config.pe and config.run_name == f"c4_60m_L512_{pe}"
    build_model_config(config.model, config.pe, max_seq_len=512, default_vocab_size=50280)


@pytest.mark.parametrize(
    "base, pe",
    [("c4_60m_L512_fope", pe) for pe in sweep.CONTROL_PES if (pe, "60m", 512) not in sweep.SAME_AS_BASELINE]
    + [("books_60m_L1024_fope", pe) for pe in sweep.CONTROL_PES]
    + [("c4_1b_L1024_rope", "fope"), ("books_180m_L512_alibi", "fope"), ("c4_180m_L1024_nope", "rope")],
)
def test_a_pe_override_on_an_overlay_is_the_run_of_that_pe(base, pe):
    """`+experiment=<data>_<size>_L<n>_X pe=Y` is the <data>_<size>_L<n>_Y run: the same config, run dir included."""
    prefix = base.rsplit("_", 1)[0]  # <data>_<size>_L<n>
    assert composed([f"+experiment={base}", f"pe={pe}"]) == composed([f"+experiment={prefix}_{pe}"])


def test_a_fope_ablation_keeps_the_sizes_sigma():
    """The per-size sigma follows the PE chosen (configs/paper/pe/<pe>_<size>.yaml): FoPE ablations at 180m and 1b
    keep 0.4 and 0.6, as the FoPE run they ablate."""
    for size, sigma in sweep.FOPE_SIGMA.items():
        for pe in sweep.fope_family():
            config = train_config([f"+experiment=c4_{size}_L512_rope", f"pe={pe}"])
            assert config.pe["sigma"] == sigma and config.run_name == f"c4_{size}_L512_{pe}"
    assert train_config(["+experiment=c4_180m_L512_fope", "pe.sigma=0.1"]).pe["sigma"] == 0.1  # the command line wins


# --- run names ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, name",
    [
        (["+experiment=c4_60m_L512_fope"], "c4_60m_L512_fope"),  # the baseline keeps its run dir
        (["+experiment=c4_60m_L512_fope", "pe=fope"], "c4_60m_L512_fope"),
        (["+experiment=c4_60m_L512_fope", "pe=fope_nomix"], "c4_60m_L512_fope_nomix"),  # was: c4_60m_L512_fope
        (["+experiment=c4_60m_L512_fope", "seed=1"], "c4_60m_L512_fope_s1"),
        (["+experiment=c4_60m_L512_fope", "seed=0"], "c4_60m_L512_fope"),
        (["+experiment=c4_60m_L512_fope", "pe.sigma=0.1"], "c4_60m_L512_fope_pe.sigma-0.1"),
        (["+experiment=c4_60m_L512_fope", "pe=p_rope", "pe.p=0.5", "seed=2"], "c4_60m_L512_p_rope_pe.p-0.5_s2"),
        (["+experiment=c4_60m_L512_fope", "seed=1", "train.max_steps=10", "optim.lr=1e-3"], "c4_60m_L512_fope_s1"),
        (["+experiment=c4_60m_L512_fope", "seed=1", "run_name=mine"], "mine"),  # explicit: as given
        (["+experiment=c4_60m_L1024_rope_to_yarn", "pe=fope"], "c4_60m_L1024_rope_to_yarn_pe-fope"),
        (["+experiment=c4_60m_L1024_rope_to_yarn", "pe=yarn", "seed=1"], "c4_60m_L1024_rope_to_yarn_s1"),
        (["+experiment=smollm_135m_yarn_L4096", "pe.scale=4"], "smollm_135m_yarn_L4096_pe.scale-4"),
        ([], "rope-60m-L512-s0"),  # without an overlay: <pe>-<preset>-L<length>-s<seed>, as before
        (["+pe=fope", "model=tiny", "train.seq_len=128", "seed=3"], "fope-tiny-L128-s3"),
        (["+pe=fope_nomix"], "fope_nomix-60m-L512-s0"),  # was: fope-60m-L512-s0, the fope run's
        (["pe.name=alibi"], "alibi-60m-L512-s0"),
        (["+pe=fope", "pe.sigma=0.1", "pe.pad_value=0"], "fope-60m-L512-s0_pe.pad_value-0_pe.sigma-0.1"),
    ],
)
def test_run_name_is_derived_from_the_pe_its_options_and_the_seed(overrides, name):
    assert composed(overrides)["run_name"] == name


def test_run_name_without_hydras_node_is_the_config_files():
    """Composed without Hydra's node (tests, --cost) the name is the config files' (the pe choice and the command line are
    Hydra's), with the seed's suffix: train.py always has the node."""
    assert composed(["+experiment=c4_60m_L512_fope", "pe=rope_clip"], hydra=False)["run_name"] == "c4_60m_L512_fope"
    assert composed(["+experiment=c4_60m_L512_fope", "pe.sigma=0.1", "seed=4"], hydra=False)["run_name"] == "c4_60m_L512_fope_s4"
    assert composed(["+pe=fope", "seed=4"], hydra=False)["run_name"] == "fope-60m-L512-s4"


def test_a_multirun_job_is_named_after_the_keys_its_command_line_sweeps():
    argv = [
        "-m",
        "--config-name",
        "train",
        "+pe=fope",
        "pe.sigma=0.1,0.3",
        "optim.lr=1e-3,3e-3",
        "seed=range(2)",
        "model=tiny",
        "train.max_steps=2",
    ]
    job = ["+pe=fope", "pe.sigma=0.1", "optim.lr=0.003", "seed=1", "model=tiny", "train.max_steps=2"]

    def hydra(mode):
        return OmegaConf.create({"runtime": {"choices": {"pe": "fope"}}, "overrides": {"task": job}, "mode": mode})

    template = "{pe}-tiny-L32-s{seed}"
    assert (
        derive_run_name(template, "fope", seed=1, hydra=hydra(RunMode.MULTIRUN), argv=argv)
        == "fope-tiny-L32-s1_optim.lr-0.003_pe.sigma-0.1"
    )
    assert derive_run_name(template, "fope", seed=1, hydra=hydra(RunMode.RUN), argv=argv) == "fope-tiny-L32-s1_pe.sigma-0.1"
    assert derive_run_name("c4_60m_L512_{pe}", "fope", seed=1, hydra=hydra(RunMode.MULTIRUN), argv=argv) == (
        "c4_60m_L512_fope_optim.lr-0.003_pe.sigma-0.1_s1"
    )


@pytest.mark.parametrize("name", ["c4_60m_L512_fope", "books_60m_L1024_rope_clip", "c4_180m_L1024_fope_to_fope"])
def test_the_sweeps_seeded_names_are_the_trainers(name):
    jobs = dict(sweep.commands(RUNS[name], "/r", [], [], seed=2))
    train = jobs[f"{name}_s2"]
    overrides = [arg for arg in train[train.index("slurm/train.sbatch") + 1 :]]
    assert composed(overrides)["run_name"] == sweep.seeded(name, 2) == f"{name}_s2"
    assert f"checkpoint=/r/{name}_s2" in jobs[f"eval_{name}_s2"]
    if RUNS[name].after:  # a continuation of seed 2 starts from its parent's seed 2, after it
        assert f"init_from=/r/{RUNS[name].after}_s2" in train and f"--dependency=afterok:{{{RUNS[name].after}_s2}}" in train


# --- the dry run: a bash script (issue finding 4) -----------------------------------------------------------------
def dry_run(capsys, *args: str) -> str:
    assert sweep.main(["--run-root", "/shared/runs", *args]) == 0
    return capsys.readouterr().out


def test_dry_run_is_a_script_that_captures_every_id_it_depends_on(capsys):
    script = dry_run(capsys)
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    assigned: set[str] = set()
    train, evals = [], []
    for line in lines:
        for used in re.findall(r"\$\{(\w+)%%;\*\}", line):
            assert used in assigned, f"{used} is used before it is assigned: {line}"
        if match := re.fullmatch(r"(\w+)=\$\(sbatch --parsable (.*)\)", line):
            assigned.add(match[1])
            (train if "slurm/train.sbatch" in line else evals).append(line)
    assert len(train) == 83 and len(evals) == 83 + 12  # one eval per run, plus dynamic YaRN at eval for the 12 RoPE runs
    for name in RUNS:
        assert any(f"+experiment={name} run_root=/shared/runs)" in line for line in train), name
        data = "c4" if name.startswith("c4") else "books"
        variable = name.upper()
        assert any(
            f'"--dependency=afterok:${{{variable}%%;*}}"' in line and f"checkpoint=/shared/runs/{name} data={data}" in line
            for line in evals
        )
    continuation = next(line for line in train if "+experiment=c4_180m_L1024_rope_to_yarn" in line)
    assert '"--dependency=afterok:${C4_180M_L512_ROPE%%;*}"' in continuation
    assert "scaling.method=yarn scaling.dynamic=true" in next(line for line in evals if "eval_c4_1b_L512_rope_yarn" in line)
    assert "32768" in next(line for line in evals if "checkpoint=/shared/runs/c4_60m_L1024_fope_to_fope " in line)


def test_dry_run_of_a_slice_drops_and_notes_dependencies_outside_it(capsys):
    script = dry_run(capsys, "--only", "c4_60m_L1024_rope_to_yarn")
    assert "# c4_60m_L1024_rope_to_yarn starts from c4_60m_L512_rope, which is not in this selection" in script
    assert "C4_60M_L512_ROPE" not in script and script.count("=$(sbatch") == 2


def test_cost_counts_every_seed(capsys):
    assert sweep.main(["--cost", "--only", "c4_60m_L512_rope_clip,books_60m_L1024_p_rope", "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"\| (\w+) \| ([\d.]+)B \| ([\d.]+) \|", out)
    assert [row[0] for row in rows] == ["c4_60m_L512_rope_clip", "books_60m_L1024_p_rope"]
    total = float(re.search(r"\| total \(2 runs x 3 seeds\) \| \| ([\d.]+) \|", out)[1])
    assert abs(total - 3 * sum(float(row[2]) for row in rows)) < 1


FAKE_SBATCH = r"""#!/usr/bin/env bash
# stand-in sbatch: the next job id (from 1000), its argv recorded tab-separated; FAKE_SBATCH_FAIL_AT=N fails the Nth call
n=$(( $(cat "$FAKE_SBATCH_DIR/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$FAKE_SBATCH_DIR/count"
if [[ "$n" == "${FAKE_SBATCH_FAIL_AT:-0}" ]]; then echo "sbatch: error: stand-in failure" >&2; exit 1; fi
{ printf '%s' "$((999 + n))"; printf '\t%s' "$@"; printf '\n'; } >> "$FAKE_SBATCH_DIR/calls"
echo "$((999 + n))"
"""


@pytest.mark.slow
def test_dry_run_script_passes_shellcheck_and_submits_under_a_stand_in_sbatch(tmp_path):
    script = tmp_path / "submit.sh"
    result = subprocess.run(
        [sys.executable, "scripts/sweep.py", "--run-root", "/shared/runs", "--seeds", "2"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    script.write_text(result.stdout)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    checked = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SBATCH_DIR": str(tmp_path)}

    submitted = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    calls = [line.split("\t") for line in (tmp_path / "calls").read_text().splitlines()]
    assert len(calls) == 2 * (83 + 83 + 12)
    ids = {}  # job name -> id, in submission order
    for job_id, *argv in calls:
        name = next(arg.split("=", 1)[1] for arg in argv if arg.startswith("--job-name="))
        for arg in argv:
            if arg.startswith("--dependency="):
                parent = arg.removeprefix("--dependency=afterok:")
                assert parent in ids.values(), f"{name} depends on {parent}, which the script has not captured"
                parent_name = next(n for n, i in ids.items() if i == parent)
                if name.startswith("eval_"):  # an eval (eval_<run>, eval_<run>_yarn) waits for its run
                    assert name.removeprefix("eval_") in (parent_name, f"{parent_name}_yarn")
                else:  # a continuation waits for its parent run, of the same seed
                    run, seed = re.fullmatch(r"(\w+?)(?:_s(\d+))?", name).groups()
                    assert parent_name == sweep.seeded(RUNS[run].after, int(seed or 0))
        ids[name] = job_id
    assert submitted.stdout.splitlines() == [f"{job_id}\t{name}" for name, job_id in ids.items()]  # id and job, as --submit

    (tmp_path / "count").unlink()
    (tmp_path / "calls").unlink()
    failed = subprocess.run(["bash", str(script)], env={**env, "FAKE_SBATCH_FAIL_AT": "3"}, capture_output=True, text=True)
    assert failed.returncode != 0 and len((tmp_path / "calls").read_text().splitlines()) == 2  # set -e: nothing after it


# --- train.py (issue findings 2 and 3) ----------------------------------------------------------------------------
@pytest.mark.slow
def test_train_py_names_the_run_after_the_pe_chosen_on_an_overlay(data_root, tmp_path):
    command, env = launch_command(
        ["+experiment=c4_60m_L512_fope", "pe=rope_clip", "--cfg", "job", "--resolve"], data_root=data_root, runs=tmp_path
    )
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    config = yaml.safe_load(result.stdout)
    assert config["run_name"] == "c4_60m_L512_rope_clip" and config["pe"] == {"name": "rope_clip"}


@pytest.mark.slow
def test_multirun_jobs_train_in_their_own_run_dirs(data_root, tmp_path):
    runs = tmp_path / "runs"
    args = [*TINY, "+pe=fope", "pe.sigma=0.1,0.3", "train.max_steps=2", "-m"]  # the flag last: argparse stops at it
    command, env = launch_command(args, data_root=data_root, runs=runs)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]  # was: "already has checkpoints", exit 1
    names = [f"fope-tiny-L32-s0_pe.sigma-{sigma}" for sigma in (0.1, 0.3)]
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == names  # no other dir (Hydra makes none)
    for sigma, name in zip((0.1, 0.3), names, strict=True):
        config = OmegaConf.load(runs / name / "config.yaml")
        assert config.run_name == name and config.pe.sigma == sigma
        assert checkpoint_step(RunDir(runs / name).latest_checkpoint()) == 2
