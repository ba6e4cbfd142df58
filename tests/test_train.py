"""The trainer end to end on CPU: real `train.py` launches (1 and 2 processes, DDP and DeepSpeed ZeRO-2/3, and
train.compile=true) on the embedded corpus with the tiny model, checked through what a run leaves behind
(metrics.jsonl, checkpoints, digests). Faults are injected deterministically (FOPE_FAULT), so no test waits on wall time.

Launches are few and each checks several things; config errors are test_config.py's, through `plan` in-process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fope_lm.checkpoint import load_state_dict, transfer_weights
from fope_lm.errors import CheckpointError
from fope_lm.faults import tensor_digest
from fope_lm.run_dir import RunDir
from fope_lm.training.metrics import read_metrics
from fope_lm.training.trainer import plan

from helpers.training import TINY, assert_same_weights, compose_config, digests, launch, start, trajectory, wait_for

COMPILE_STEPS = 24
pytestmark = pytest.mark.slow  # every test here launches train.py


# FoPE with document masking (attention within documents, positions restarting): the resume tests below hold for it
REF = [*TINY, "+pe=fope", "train.max_steps=12", "train.save_interval=4", "train.document_mask=true"]


@pytest.fixture(scope="module")
def reference(data_root, runs) -> Path:
    """12 straight steps of FoPE with document masking; checkpoints every 4 steps."""
    launch([*REF, "run_name=ref"], data_root=data_root, runs=runs)
    return runs / "ref"


def test_interrupted_run_resumes_bitwise(reference, data_root, runs):
    """SIGTERM, a stop file, a SIGKILL inside a checkpoint write and one between steps: every resume continues at
    the right step and data position, so the per-step losses equal the straight run's bit for bit."""
    args = [*REF, "run_name=chain"]
    run_dir = runs / "chain"
    go = lambda fault=None, resume="resume=auto", expect_rc=0: launch(  # noqa: E731
        [*args, resume], data_root=data_root, runs=runs, fault=fault, expect_rc=expect_rc
    )

    result = go("sigterm_at_step:3", resume="resume=null")
    assert "stopped at step 3 (SIGTERM)" in result.output
    assert RunDir(run_dir).latest_checkpoint().name == "step_000003"

    result = go("stop_file_at_step:5")
    assert "resumed" in result.output and "at step 3" in result.output
    assert "stopped at step 5 (stop file" in result.output
    assert RunDir(run_dir).latest_checkpoint().name == "step_000005"
    assert not (run_dir / "STOP").exists()  # consumed, so that the next resume does not stop at once

    go("kill_during_save:8", expect_rc=-9)
    half_written = run_dir / "checkpoints" / "step_000008.tmp"
    assert (half_written / "model.safetensors").is_file() and not (half_written / "COMPLETE").exists()
    assert RunDir(run_dir).latest_checkpoint().name == "step_000005"  # never the half-written one

    result = go("kill_after_step:10", expect_rc=-9)
    assert "at step 5" in result.output and not half_written.exists()
    assert RunDir(run_dir).latest_checkpoint().name == "step_000008"
    with open(run_dir / "metrics.jsonl", "a") as metrics:  # what a kill in the middle of a record's write leaves
        metrics.write('{"step": 10, "train/lo')

    result = go()
    assert "at step 8" in result.output and "dropped a torn last line" in result.output
    assert [path.name for path in RunDir(run_dir).list_checkpoints()] == ["step_000005", "step_000008", "step_000012"]  # keep_last=3
    assert len(trajectory(reference)) == 12
    assert trajectory(run_dir) == trajectory(reference)
    assert_same_weights(run_dir / "checkpoints/step_000012", reference / "checkpoints/step_000012")
    state = json.loads((run_dir / "checkpoints/step_000012/trainer_state.json").read_text())
    assert state["step"] == 12 and state["tokens_seen"] == 12 * 8 * 32 and state["data"]["samples_consumed"] == 12 * 8

    # a finished run is not started over by accident
    with pytest.raises(CheckpointError, match="already has checkpoints"):
        plan(compose_config([f"run_root={runs}", f"data.root={data_root}", *args]))


def test_activation_checkpointing_trains_the_same_run(reference, data_root, runs):
    """train.activation_checkpointing=full recomputes every block in backward: the same 12 steps, bit for bit."""
    args = [*REF, "run_name=ref-ac", "train.activation_checkpointing=full"]
    launch(args, data_root=data_root, runs=runs)
    assert trajectory(runs / "ref-ac") == trajectory(reference)
    assert_same_weights(runs / "ref-ac/checkpoints/step_000012", reference / "checkpoints/step_000012")


def test_resume_refuses_a_different_model_or_data(reference, plan_with, tmp_path):
    checkpoint = reference / "checkpoints" / "step_000012"
    with pytest.raises(CheckpointError, match=r"pe 'fope' -> 'rope'.*init_from="):
        plan_with("run_name=other", f"resume={checkpoint}")
    with pytest.raises(CheckpointError, match=r"d_model 128 -> 64"):
        plan_with("+pe=fope", "model.d_model=64", "run_name=other", f"resume={checkpoint}")
    with pytest.raises(CheckpointError, match=r"max_seq_len 32 -> 64"):
        plan_with("+pe=fope", "train.seq_len=64", "run_name=other", f"resume={checkpoint}")
    tampered = tmp_path / "step_000012"
    shutil.copytree(checkpoint, tampered)
    state = json.loads((tampered / "trainer_state.json").read_text())
    state["data"]["data_fingerprint"] = "0" * 64
    (tampered / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="fingerprint"):
        plan_with("+pe=fope", "run_name=other", f"resume={tampered}")
    assert plan_with("+pe=fope", "run_name=ref", "resume=auto").start_step == 12


def test_resume_never_discards_another_trajectory_without_overwrite(reference, plan_with, runs):
    older = reference / "checkpoints" / "step_000008"
    with pytest.raises(CheckpointError) as info:
        plan_with("+pe=fope", "run_name=ref", f"resume={older}")
    message = str(info.value)
    assert "\n" not in message and "newer checkpoints (step_000012)" in message
    assert all(way in message for way in ("resume=auto", "overwrite=true", "another run_name"))
    other = runs / "ref-copy"
    shutil.copytree(reference, other)
    with pytest.raises(CheckpointError, match=r"checkpoints of its own \(step_000004, step_000008, step_000012\)"):
        plan_with("+pe=fope", "run_name=ref", f"resume={other / 'checkpoints' / 'step_000004'}")
    assert plan_with("+pe=fope", "run_name=ref", f"resume={older}", "overwrite=true").resume_from == older
    assert [path.name for path in RunDir(reference).list_checkpoints()] == [
        "step_000004",
        "step_000008",
        "step_000012",
    ]  # planning deletes nothing


def test_continue_another_runs_checkpoint_then_extend_it(reference, data_root, runs):
    """resume=<another run's checkpoint> into a new run dir reproduces the original's steps bitwise (a stop file
    left from before it started is removed, not obeyed); resuming it with a longer run, another lr and batch is
    allowed, warned about and recorded."""
    args = [*REF, "run_name=branch"]
    start = reference / "checkpoints" / "step_000008"
    stale = runs / "branch" / "STOP"
    stale.parent.mkdir()
    stale.touch()
    os.utime(stale, (stale.stat().st_mtime - 3600,) * 2)
    result = launch([*args, f"resume={start}"], data_root=data_root, runs=runs)
    assert "removed the stop file" in result.output and "before this run started" in result.output
    assert trajectory(runs / "branch") == trajectory(reference)[8:]
    assert_same_weights(runs / "branch" / "checkpoints/step_000012", reference / "checkpoints/step_000012")
    info = json.loads((runs / "branch" / "run_info.json").read_text())
    assert info["resumed_from"] == str(start) and info["changed_on_resume"] == {}

    extended = [*args, "resume=auto", "train.max_steps=14", "optim.lr=2e-3", "train.global_batch_size=16"]
    result = launch(extended, data_root=data_root, runs=runs)
    for key, saved, new in (("train.max_steps", 12, 14), ("optim.lr", 0.003, 0.002), ("train.global_batch_size", 8, 16)):
        assert f"with {key}={new} (it was saved with {saved})" in result.output
    info = json.loads((runs / "branch" / "run_info.json").read_text())
    assert info["changed_on_resume"] == {"train.max_steps": [12, 14], "optim.lr": [0.003, 0.002], "train.global_batch_size": [8, 16]}
    assert [record["step"] for record in read_metrics(runs / "branch" / "metrics.jsonl")] == list(range(9, 15))


def test_resume_auto_sets_aside_checkpoints_that_do_not_load(reference, plan_with, data_root, runs, caplog):
    run_dir = runs / "damaged"
    shutil.copytree(reference, run_dir)
    truncate = lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # noqa: E731
    truncate(run_dir / "checkpoints/step_000012/optimizer.pt")
    truncate(run_dir / "checkpoints/step_000008/rng_rank0.pt")
    with pytest.raises(CheckpointError) as info:  # an explicit resume= is never second-guessed: one line
        plan_with("+pe=fope", "run_name=other", f"resume={run_dir / 'checkpoints/step_000012'}")
    assert "\n" not in str(info.value) and "step_000012/optimizer.pt" in str(info.value) and "cut short" in str(info.value)

    chosen = plan_with("+pe=fope", "run_name=damaged", "resume=auto").resume_from
    assert chosen == run_dir / "checkpoints/step_000004"
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == [
        "step_000004", "step_000008.corrupt", "step_000012.corrupt"
    ]  # fmt: skip
    assert sum("does not load" in record.message and "moved aside" in record.message for record in caplog.records) == 2
    launch(
        [*REF, "run_name=damaged", "resume=auto"],
        data_root=data_root,
        runs=runs,
    )
    assert trajectory(run_dir) == trajectory(reference)  # steps 5..12 retrained, bit for bit
    assert_same_weights(run_dir / "checkpoints/step_000012", reference / "checkpoints/step_000012")
    assert (run_dir / "checkpoints/step_000012.corrupt").is_dir()  # kept for a post-mortem


def test_resume_auto_sets_aside_checkpoints_whose_files_were_replaced(reference, plan_with, runs, caplog):
    """Whole files that do not load: an optimizer.pt that unpickles only by running code, and weights overwritten by
    another model's (export_hf into a checkpoint dir, before it refused): both set aside, the run continues from
    the newest checkpoint that loads."""
    import datetime

    run_dir = runs / "replaced"
    shutil.copytree(reference, run_dir)
    torch.save({"state": {}, "saved": datetime.datetime(2026, 1, 1)}, run_dir / "checkpoints/step_000012/optimizer.pt")
    safetensors.torch.save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, run_dir / "checkpoints/step_000008/model.safetensors")
    chosen = plan_with("+pe=fope", "run_name=replaced", "resume=auto").resume_from
    assert chosen == run_dir / "checkpoints/step_000004"
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == [
        "step_000004", "step_000008.corrupt", "step_000012.corrupt"
    ]  # fmt: skip
    assert "does not load with weights_only=True" in caplog.text and "do not fit the model its config describes" in caplog.text


def test_a_second_launch_into_a_running_run_dir_is_refused(data_root, runs):
    """A double sbatch, or a requeue while the old job still runs: the second launch stops in one line naming the
    holder, and the first goes on undisturbed (one trajectory in metrics.jsonl, its checkpoints kept)."""
    args = [*TINY, "+pe=rope", "run_name=busy", "train.max_steps=6", "train.save_interval=2"]
    first = start(args, data_root=data_root, runs=runs, fault="hold_at_step:3")
    metrics = runs / "busy" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and [r["step"] for r in read_metrics(metrics)][-1:] == [2], "step 2 in metrics.jsonl", first)
    second = launch([*args, "resume=auto"], data_root=data_root, runs=runs, expect_rc=1)
    assert "Traceback" not in second.output
    assert second.stderr.strip().splitlines()[-1].startswith(f"error: {runs / 'busy'} is in use by pid {first.pid} on ")
    (runs / "busy" / "STOP").touch()
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-4000:]
    assert [r["step"] for r in read_metrics(metrics) if "train/loss" in r] == [1, 2, 3]
    assert [path.name for path in RunDir(runs / "busy").list_checkpoints()] == ["step_000002", "step_000003"]
    launch([*args, "resume=auto"], data_root=data_root, runs=runs)  # the lock went with its holder
    assert [r["step"] for r in read_metrics(metrics) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_during_a_save_is_one_line_on_every_rank_and_resume_continues(data_root, runs):
    args = [*TINY, "+pe=rope", "run_name=full", "train.max_steps=6", "train.save_interval=2"]
    result = launch(args, data_root=data_root, runs=runs, fault="disk_full_during_save:4", expect_rc=1)
    assert "Traceback" not in result.output
    (line,) = [line for line in result.stderr.splitlines() if "No space left" in line]
    assert line.startswith("error: cannot save step_000004: No space left on device") and "GiB free" in line
    assert line.endswith(
        f"newest intact checkpoint: {runs / 'full' / 'checkpoints' / 'step_000002'}; free space, then continue with resume=auto"
    )
    assert sorted(path.name for path in (runs / "full" / "checkpoints").iterdir()) == ["step_000002"]  # no step_000004.tmp

    two = launch(
        [*args, "resume=auto"], data_root=data_root, runs=runs, processes=2, fault="disk_full_during_save:4:1", expect_rc="nonzero"
    )
    lines = [line for line in two.output.splitlines() if "error: cannot save step_000004" in line]
    assert sorted(line.split("]")[0] for line in lines) == ["[rank 0", "[rank 1"]  # the ranks agree, one line each
    assert all("No space left on device" in line and "on rank 1" in line for line in lines)
    assert sorted(path.name for path in (runs / "full" / "checkpoints").iterdir()) == ["step_000002"]
    launch([*args, "resume=auto"], data_root=data_root, runs=runs)  # space is back: it continues from step 2
    assert RunDir(runs / "full").latest_checkpoint().name == "step_000006"


def test_nonfinite_loss_and_eval_hooks(data_root, runs):
    """stop: exit 1 with one line and no checkpoint of the bad step; skip: the step is dropped, training goes on."""
    args = [*TINY, "train.max_steps=4", "train.save_interval=1"]
    result = launch([*args, "run_name=nan-stop"], data_root=data_root, runs=runs, fault="nan_loss_at_step:2", expect_rc=1)
    assert result.stderr.strip().splitlines()[-1].startswith("error: non-finite loss nan")
    assert [path.name for path in RunDir(runs / "nan-stop").list_checkpoints()] == ["step_000001"]

    hook = ["+train.eval_hooks.probe._target_=helpers.training.probe_hook", "+train.eval_hooks.probe.scale=10"]
    launch([*args, *hook, "run_name=nan-skip", "train.on_nonfinite=skip"], data_root=data_root, runs=runs, fault="nan_loss_at_step:2")
    records = read_metrics(runs / "nan-skip" / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in records] == [0, 1, 1, 1]
    assert records[-1]["train/loss"] < records[0]["train/loss"]  # measured drop 0.17 .. 0.20 over seeds 0-2
    assert all(torch.isfinite(t).all() for t in load_state_dict(runs / "nan-skip/checkpoints/step_000004").values())
    assert records[-1]["eval/probe/scaled_step"] == 40 and records[-1]["eval/probe/parameters"] > 2_000_000

    one = [*TINY, "train.max_steps=1", "run_name=nan-all", "train.on_nonfinite=skip"]  # every step skipped: not a success
    result = launch(one, data_root=data_root, runs=runs, fault="nan_loss_at_step:1", expect_rc=1)
    assert result.stderr.strip().splitlines()[-1].startswith("error: all 1 steps of this run had a non-finite loss or gradient")


def test_init_from_carries_weights_into_new_pe_and_length(reference, data_root, runs):
    source_fope = reference / "checkpoints" / "step_000012"
    launch([*TINY, "run_name=rope-src", "train.max_steps=2"], data_root=data_root, runs=runs)
    source_rope = RunDir(runs / "rope-src").latest_checkpoint()
    at_2x = ["train.seq_len=64", "train.max_steps=2", "train.eval_interval=2"]

    # RoPE-32 -> YaRN at 64 (scale 2)
    result = launch(
        [*TINY, *at_2x, "+pe=yarn", "pe.scale=2", f"init_from={runs / 'rope-src'}", "run_name=yarn-2x"],
        data_root=data_root,
        runs=runs,
        digests=True,
    )
    assert "init_from" in result.output
    start = digests(runs / "yarn-2x", 0)["start"]
    for name, tensor in load_state_dict(source_rope).items():
        assert start[name] == tensor_digest(tensor), name
    assert read_metrics(runs / "yarn-2x" / "metrics.jsonl")[-1]["step"] == 2

    # FoPE-32 -> FoPE at 64: the kept frequencies K and the output slots d_out grow from 3 to 5
    result = launch(
        [*TINY, *at_2x, "+pe=fope", f"init_from={source_fope}", "run_name=fope-2x"], data_root=data_root, runs=runs, digests=True
    )
    assert "zero-filled" in result.output
    source = load_state_dict(source_fope)
    start = digests(runs / "fope-2x", 0)["start"]
    assert start["blocks.1.mlp.up.weight"] == tensor_digest(source["blocks.1.mlp.up.weight"])
    assert start["embed.weight"] == tensor_digest(source["embed.weight"])
    trained = load_state_dict(RunDir(runs / "fope-2x").latest_checkpoint())  # frozen coefficients: as initialised
    for layer in range(2):
        for coef in ("cos_coef", "sin_coef"):
            old, new = source[f"blocks.{layer}.attn.pe.{coef}"], trained[f"blocks.{layer}.attn.pe.{coef}"]
            assert old.shape == (4, 3, 3) and new.shape == (4, 5, 5)
            assert torch.equal(new[:, :3, :3], old)
            assert not new[:, 3:].any() and not new[:, :, 3:].any()
    model_config = json.loads((RunDir(runs / "fope-2x").latest_checkpoint() / "model_config.json").read_text())
    assert model_config["train_seq_len"] == 64 and model_config["pe"] == "fope" and model_config["step"] == 2


def test_init_from_refuses_other_shapes(reference):
    from fope_lm.nn.model import build_model

    with pytest.raises(CheckpointError, match=r"do not fit the model \(shape mismatch embed\.weight \(8192, 128\) vs \(8192, 64\)"):
        transfer_weights(build_model("tiny", pe="yarn", vocab_size=8192, d_model=64), reference / "checkpoints/step_000012")


DIST = [*TINY, "+pe=fope", "train.micro_batch_size=2", "train.max_steps=24", "train.save_interval=5"]


def assert_healthy_distributed_run(run_dir: Path, steps: int) -> list[dict]:
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    losses = [r["train/loss"] for r in records]
    # the loss falls: these 24 steps on one process drop it by 1.77 .. 2.12 (seeds 0-2 x 1 and 2 threads), and with
    # train.document_mask=true by 1.77 .. 2.13
    assert sum(losses[-4:]) / 4 < losses[0] - 1.0, losses
    rank0, rank1 = digests(run_dir, 0), digests(run_dir, 1)
    assert rank0["end"] == rank1["end"]  # both ranks hold the same weights (FoPE buffers included)
    assert rank0["start"] == rank1["start"]
    assert list((run_dir / "wandb").glob("offline-run-*")), "no wandb offline run dir"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["git_sha"] and "torch" in info["packages"]
    assert "name: fope" in (run_dir / "config.yaml").read_text()
    return records


def test_ddp_two_processes_train_and_resume_bitwise(data_root, runs):
    launch([*DIST, "run_name=ddp", "wandb.mode=offline"], data_root=data_root, runs=runs, processes=2, digests=True)
    records = assert_healthy_distributed_run(runs / "ddp", 24)
    print(f"DDP loss {records[0]['train/loss']:.4f} -> {records[-1]['train/loss']:.4f}")

    # a SIGTERM to rank 1 alone: all ranks agree to stop and save the same step
    args = [*DIST, "run_name=ddp-chain"]
    result = launch(args, data_root=data_root, runs=runs, processes=2, fault="sigterm_at_step:6:1")
    assert "stopped at step 6" in result.output
    checkpoint = RunDir(runs / "ddp-chain").latest_checkpoint()
    assert checkpoint.name == "step_000006" and {p.name for p in checkpoint.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    launch([*args, "resume=auto"], data_root=data_root, runs=runs, processes=2, fault="kill_after_step:13", expect_rc="nonzero")
    assert RunDir(runs / "ddp-chain").latest_checkpoint().name == "step_000010"
    launch([*args, "resume=auto"], data_root=data_root, runs=runs, processes=2)
    assert trajectory(runs / "ddp-chain") == trajectory(runs / "ddp")
    assert_same_weights(runs / "ddp-chain/checkpoints/step_000024", runs / "ddp/checkpoints/step_000024")

    # activation checkpointing (every other block) under DDP: the same losses
    launch([*DIST, "run_name=ddp-ac", "train.activation_checkpointing=every_2"], data_root=data_root, runs=runs, processes=2)
    assert trajectory(runs / "ddp-ac") == trajectory(runs / "ddp")

    # document masking under DDP: both ranks agree and it trains; rows holding an EOS see less, so other losses
    masked = [*DIST, "run_name=ddp-docs", "train.document_mask=true", "wandb.mode=offline"]
    launch(masked, data_root=data_root, runs=runs, processes=2, digests=True)
    assert_healthy_distributed_run(runs / "ddp-docs", 24)
    assert "document_positions: restart" in (runs / "ddp-docs" / "config.yaml").read_text()
    assert trajectory(runs / "ddp-docs") != trajectory(runs / "ddp")


def test_deepspeed_zero2_and_zero3_two_processes(data_root, runs):
    # deterministic=false: torch's deterministic mode makes DeepSpeed's CPU all-reduce ~20x slower; CPU steps are
    # reproducible at a fixed thread count without it
    args = [*DIST, "train.max_steps=16", "train.save_interval=8", "train.deterministic=false"]
    launch([*args, "run_name=zero2", "wandb.mode=offline"], data_root=data_root, runs=runs, processes=2, deepspeed="zero2", digests=True)
    run_dir = runs / "zero2"
    assert_healthy_distributed_run(run_dir, 16)
    checkpoint = run_dir / "checkpoints" / "step_000008"
    assert (checkpoint / "deepspeed").is_dir() and not (checkpoint / "optimizer.pt").exists()
    with safetensors.safe_open(checkpoint / "model.safetensors", "pt") as weights:  # fp32 master weights, whole
        assert weights.get_tensor("lm_head.weight").dtype == torch.float32

    # continue the step-8 checkpoint in a new run dir: DeepSpeed reloads its sharded optimizer state exactly
    launch([*args, "run_name=zero2-resumed", f"resume={checkpoint}"], data_root=data_root, runs=runs, processes=2, deepspeed="zero2")
    resumed = trajectory(runs / "zero2-resumed")
    assert [step for step, *_ in resumed] == list(range(9, 17))
    assert resumed == trajectory(run_dir)[8:]
    assert_same_weights(runs / "zero2-resumed/checkpoints/step_000016", run_dir / "checkpoints/step_000016")

    # activation checkpointing under ZeRO-2: the losses of the run without it
    ac = [*args, "run_name=zero2-ac", "train.activation_checkpointing=full"]
    launch(ac, data_root=data_root, runs=runs, processes=2, deepspeed="zero2")
    for (step, loss, *_), (_, loss_ac, *_) in zip(trajectory(run_dir), trajectory(runs / "zero2-ac"), strict=True):
        assert loss_ac == pytest.approx(loss, rel=1e-6), step

    # ZeRO-3 partitions the parameters too (FoPE's coefficients are buffers, replicated): the same run gives the same
    # numbers up to the order of reductions, and the saved weights are gathered whole
    launch([*args, "run_name=zero3", "wandb.mode=offline"], data_root=data_root, runs=runs, processes=2, deepspeed="zero3", digests=True)
    assert_healthy_distributed_run(runs / "zero3", 16)
    assert "DeepSpeed ZeRO-3" in (runs / "zero3" / "train.log").read_text()
    for (step, loss, grad_norm, _), (_, loss3, grad_norm3, _) in zip(trajectory(run_dir), trajectory(runs / "zero3"), strict=True):
        assert loss3 == pytest.approx(loss, rel=1e-4) and grad_norm3 == pytest.approx(grad_norm, rel=1e-3), step
    zero2_weights, zero3_weights = (load_state_dict(r / "checkpoints" / "step_000016") for r in (run_dir, runs / "zero3"))
    assert zero3_weights.keys() == zero2_weights.keys()
    for name, tensor in zero2_weights.items():  # per tensor, not per entry: Adam turns a near-zero gradient's
        # rounding into a whole step (measured: one embedding entry 1.0e-4 apart; the largest relative norm 7.3e-6)
        assert (zero3_weights[name] - tensor).norm() <= 1e-4 * tensor.norm(), name


def test_compiled_training_follows_eager(data_root, runs, tmp_path, monkeypatch):
    """train.compile=true: the model compiles whole (inductor, C++ kernels on this CPU) and follows the eager run."""
    kernels = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(kernels))  # launch() passes the environment on
    trajectories = {}
    for compile in (False, True):
        name = f"compile-{str(compile).lower()}"
        args = [*TINY, "+pe=fope", f"train.max_steps={COMPILE_STEPS}", "train.eval_interval=12", f"train.compile={str(compile).lower()}"]
        launch([*args, f"run_name={name}"], data_root=data_root, runs=runs)
        trajectories[compile] = trajectory(runs / name)
        assert any(kernels.rglob("*.so")) == compile  # C++ kernels built by inductor

    eager, compiled = trajectories[False], trajectories[True]
    assert [step for step, *_ in compiled] == [step for step, *_ in eager] == list(range(1, COMPILE_STEPS + 1))
    train_losses = [(e[1], c[1]) for e, c in zip(eager, compiled, strict=True)]
    assert max(abs(e - c) for e, c in train_losses) < 1e-4, train_losses
    val_losses = [(e[3], c[3]) for e, c in zip(eager, compiled, strict=True) if e[3] is not None]
    assert len(val_losses) == 2 and max(abs(e - c) for e, c in val_losses) < 1e-4, val_losses
    # it trains: from ~ln(8192) = 9.0 down by more than a nat (measured eager: 1.74 .. 2.36 over seeds 0-2)
    assert compiled[-1][1] < compiled[0][1] - 1.0
    # a second process compiles from the warm caches (inductor's and AOTAutograd's): the same run, bit for bit
    args = [*TINY, "+pe=fope", f"train.max_steps={COMPILE_STEPS}", "train.eval_interval=12", "train.compile=true"]
    launch([*args, "run_name=compile-warm"], data_root=data_root, runs=runs)
    assert trajectory(runs / "compile-warm") == compiled
