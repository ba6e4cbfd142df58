"""The README's first command (`make demo`): length generalization of NoPE, RoPE, ALiBi and FoPE, and the controls
that separate FoPE's two ingredients, in minutes on a CPU.

    python scripts/demo.py --steps 600          (or DEMO_STEPS=2000 make demo)

1. prepares the embedded offline corpus (Python stdlib docstrings, its own 8192-token BPE) on first use;
2. trains the same tiny model (fope_lm.nn.model.PRESETS["tiny"]) with nope, rope, alibi and fope, and the controls
   rope_clip (clipping alone), fope_nomix (FoPE without mixing: clipping plus FoPE's padding and slot cap) and
   p_rope (the newer way of dropping low frequencies), all under one budget: same seed, data order and tokens,
   training length 128 (`python train.py +pe=<name> ...`);
3. evaluates each from 0.5x to 16x the training length (64 ... 2048), plus rope with dynamic YaRN applied at
   evaluation time (`python eval.py ...`);
4. prints the perplexity table and saves the overlay plot (`scripts/compare_results.py`).
`--document-mask` trains with attention kept within each document and positions restarting at each one
(train.document_mask=true); evaluation is the same protocol, and the labels gain " (doc mask)".
Runs go to --out (default runs/demo, or runs/demo_document_mask with --document-mask; relative to the repo root).
Jobs run --jobs at a time with one thread each: on a small, shared CPU two single-threaded runs finish sooner than
the same runs one after the other with two threads each.
"""

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from fope_lm.data import ensure_prepared  # noqa: E402
from fope_lm.training.metrics import read_metrics  # noqa: E402

import compare_results  # noqa: E402  (scripts/, next to this file)

TRAIN_LEN = 128
EVAL_LENGTHS = [64, 128, 256, 512, 1024, 2048]  # 0.5x ... 16x the training length
# configs/pe/<name>.yaml: the four methods, then the controls for "which of FoPE's ingredients does it?"
PES = ["nope", "rope", "alibi", "fope", "rope_clip", "fope_nomix", "p_rope"]
# evaluated besides each run as trained, when rope is run: (label, output dir name, trained run, eval overrides)
YARN_EVAL = ("rope+yarn(dynamic)", "rope+yarn", "rope", ["scaling.method=yarn", "scaling.dynamic=true"])


@dataclass
class Job:
    name: str
    command: list[str]
    log: Path
    total: int  # progress units: training steps, or evaluated lengths
    progress: Callable[[], int]  # units done so far, read from the job's files

    def start(self, env: dict) -> subprocess.Popen:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:  # the child keeps its own copy of the file descriptor
            log.write(" ".join(self.command) + "\n")
            log.flush()
            return subprocess.Popen(self.command, env=env, stdout=log, stderr=subprocess.STDOUT)


def last_logged_step(metrics_file: Path) -> int:
    """The newest step in a run's metrics.jsonl (the trainer appends one line per log interval)."""
    records = read_metrics(metrics_file) if metrics_file.is_file() else []
    return records[-1]["step"] if records else 0


def evaluated_lengths(log: Path) -> int:
    """Lengths finished so far: eval.py logs one `T=<length>: loss ...` line per length."""
    return sum(line.startswith("T=") for line in log.read_text().splitlines()) if log.is_file() else 0


def run_jobs(title: str, jobs: list[Job], n_parallel: int) -> None:
    """Run jobs n_parallel at a time with a progress bar each; on a failure, show its log's tail and exit."""
    print(f"\n{title}")
    for job in jobs:
        print(f"  {job.name}: {' '.join(job.command[1:])}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    bar_format = "{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}]"
    bars = {  # disable=None: bars on a terminal; in a log, only the lines below
        job.name: tqdm(total=job.total, desc=f"{job.name:>25}", position=i, bar_format=bar_format, disable=None)
        for i, job in enumerate(jobs)
    }
    waiting, running, started = list(jobs), {}, {}
    while waiting or running:
        while waiting and len(running) < n_parallel:
            job = waiting.pop(0)
            running[job.name] = (job, job.start(env))
            started[job.name] = time.perf_counter()
        time.sleep(1)
        for name, (job, process) in list(running.items()):
            bars[name].update(min(job.progress(), job.total) - bars[name].n)
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode != 0:
                for bar in bars.values():
                    bar.close()
                tail = "\n".join(job.log.read_text().splitlines()[-15:])
                sys.exit(f"\n{job.name} failed (exit {process.returncode}); the end of {job.log}:\n{tail}")
            bars[name].update(job.total - bars[name].n)
            tqdm.write(f"  done: {name} in {(time.perf_counter() - started[name]) / 60:.1f} min (log {job.log})")
    for bar in bars.values():
        bar.close()


def training_budget(args: argparse.Namespace, out: Path) -> list[str]:
    """train.py overrides, the same for every PE: seed (so data order), steps, batch, schedule, document masking."""
    return [
        "model=tiny", f"train.seq_len={TRAIN_LEN}", f"train.max_steps={args.steps}",
        f"train.global_batch_size={args.batch_size}", f"train.micro_batch_size={args.batch_size}",
        f"train.eval_interval={args.steps}", f"train.save_interval={args.steps}", "train.log_interval=10",
        f"optim.lr={args.lr}", f"optim.warmup_steps={max(1, args.steps // 10)}", f"seed={args.seed}", f"run_root={out}", "overwrite=true",
        *(["train.document_mask=true"] if args.document_mask else []),
    ]  # fmt: skip


def eval_runs(pes: list[str], document_mask: bool) -> list[tuple[str, str, str, list[str]]]:
    """(label, output dir name, trained run, eval overrides) per evaluation: each run as trained, and YaRN on rope."""
    suffix = " (doc mask)" if document_mask else ""
    evals = [(pe + suffix, pe, pe, []) for pe in pes]
    if "rope" in pes:
        label, name, run, overrides = YARN_EVAL
        evals.append((label + suffix, name, run, overrides))
    return evals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 600: ~20 min on 2 CPU cores, the same ordering as 800 (`DEMO_STEPS=N make demo` passes --steps N)
    parser.add_argument("--steps", type=int, default=600, help="training steps per PE")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences of 128 tokens per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (a tiny model trains well at a high one)")
    parser.add_argument("--pes", default=",".join(PES), help="comma-separated subset of the runs (configs/pe/<name>.yaml)")
    parser.add_argument("--seed", type=int, default=0, help="init and data order of every run; another seed measures the spread")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: one per CPU, at most one per run)")
    parser.add_argument(
        "--document-mask", action="store_true", help="attend within documents, positions restarting at each (train.document_mask=true)"
    )
    parser.add_argument("--out", type=Path, help="default runs/demo, or runs/demo_document_mask with --document-mask")
    args = parser.parse_args(argv)
    args.out = args.out or Path("runs/demo_document_mask" if args.document_mask else "runs/demo")
    pes = args.pes.split(",")
    if unknown := [pe for pe in pes if not (REPO_ROOT / "configs" / "pe" / f"{pe}.yaml").exists()]:
        parser.error(f"--pes: no configs/pe/{unknown[0]}.yaml; the demo's are {', '.join(PES)}")
    if len(set(pes)) < len(pes):
        parser.error(f"--pes {args.pes}: each run once (a run's name is its PE's)")
    evals = eval_runs(pes, args.document_mask)
    jobs = args.jobs or min(len(pes), os.cpu_count() or 1)
    started = time.perf_counter()
    os.chdir(REPO_ROOT)  # train.py, eval.py, configs/ and the default data root (data/) are relative to it
    out = args.out.resolve()
    python = sys.executable

    print("preparing the embedded corpus (first use only) ...")
    from omegaconf import OmegaConf

    data_dir = ensure_prepared(OmegaConf.load(REPO_ROOT / "configs" / "data" / "embedded.yaml"))
    print(f"data: {data_dir}")

    budget = training_budget(args, out)
    train_jobs = []
    for pe in pes:
        command = [python, "train.py", f"+pe={pe}", *budget, f"run_name={pe}"]
        metrics = out / pe / "metrics.jsonl"
        log = out / "logs" / f"train_{pe}.log"
        train_jobs.append(Job(f"train {pe}", command, log, args.steps, lambda metrics=metrics: last_logged_step(metrics)))
    masking = ", attention within documents" if args.document_mask else ""
    run_jobs(f"training {len(pes)} PEs for {args.steps} steps of {args.batch_size} x {TRAIN_LEN} tokens{masking}", train_jobs, jobs)

    eval_jobs = []
    for label, name, run, overrides in evals:
        log = out / "logs" / f"eval_{name}.log"
        command = [
            python, "eval.py", f"checkpoint={out / run}", f"label='{label}'", f"output_dir={out / 'eval' / name}",
            f"perplexity.lengths=[{','.join(map(str, EVAL_LENGTHS))}]", "passkey.enabled=false", "device=cpu",
            "progress=false", *overrides,
        ]  # fmt: skip
        eval_jobs.append(Job(f"eval {label}", command, log, len(EVAL_LENGTHS), lambda log=log: evaluated_lengths(log)))
    run_jobs(f"evaluating at lengths {EVAL_LENGTHS} (training length {TRAIN_LEN})", eval_jobs, jobs)

    print()
    compare_results.main(
        [*(str(out / "eval" / name / "results.json") for _, name, _, _ in evals), "--output-dir", str(out),
         "--title", f"tiny model, {args.steps} steps at length {TRAIN_LEN}{masking}, seed {args.seed}: perplexity vs length"]
    )  # fmt: skip
    minutes = (time.perf_counter() - started) / 60
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"demo finished in {minutes:.1f} min on {machine}; the table and plot are in {out}")


if __name__ == "__main__":
    main()
