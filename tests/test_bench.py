"""The benchmark scripts run, so that they cannot rot: the GPU suite's --dry-run (every configuration, on CPU, toy
sizes) and the CPU scripts at tiny sizes. Benchmarks report numbers; nothing here asserts on speed."""

import json
from pathlib import Path

import pytest
import torch

from fope_lm.bench import compile_step, eval_memory, gpu_suite, pe_overhead, prepare_throughput, step_vs_hf
from fope_lm.nn.model import build_model
from fope_lm.position import available

pytestmark = pytest.mark.usefixtures("one_thread")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gpu_suite_dry_run(tmp_path, capsys):
    gpu_suite.main(["--dry-run", "--out", str(tmp_path / "gpu.json")])
    records = read_lines(tmp_path / "gpu.json")
    env, *configs = records
    assert env["group"] == "env" and env["result"]["dry_run"] and env["result"]["flash_attn"] is False
    by_group = {}
    for record in configs:
        by_group.setdefault(record["group"], []).append(record)
    assert {group: len(rs) for group, rs in by_group.items()} == {
        "graphs": len(available()) + len(gpu_suite.DRY.mfu_presets),  # every PE on tiny, and the mfu presets
        "step_vs_hf": 1,
        "pe_overhead": 1,
        "eval_memory": 2,
        "mfu": 6,  # 2 presets x {sdpa, flash}, and packed documents with each kernel
        "mfu_compile": 6,
    }
    for record in configs:
        if str(record["config"].get("attention")).startswith("flash"):  # not installed here: recorded, not run
            assert record["status"] == "skipped" and "not installed" in record["reason"]
        else:
            assert record["status"] == "ok", record
    assert all((r["result"]["graphs"], r["result"]["breaks"]) == (1, 0) for r in by_group["graphs"]), by_group["graphs"]
    assert by_group["step_vs_hf"][0]["result"]["ratio"] > 0
    assert by_group["pe_overhead"][0]["result"]["ratio_vs_rope"]["rope"] == 1.0
    assert set(by_group["eval_memory"][0]["result"]) == {"rope", "nope", "alibi", "fope"}
    for record in by_group["mfu"] + by_group["mfu_compile"]:
        if record["status"] == "ok":
            result, config = record["result"], record["config"]
            expected = build_model("tiny", pe="rope", vocab_size=512, max_seq_len=config["seq_len"]).flops_per_token(config["seq_len"])
            assert result["flops_per_token"] == expected and result["tokens_per_s"] > 0 and result["mfu"] is None  # no peak on CPU
            assert result["kernels"].startswith("SDPA")  # what the trainer would log

    capsys.readouterr()
    gpu_suite.main(["--report", str(tmp_path / "gpu.json")])
    tables = capsys.readouterr().out
    graph_rows = len(available()) + gpu_suite.DRY.mfu_presets.count("tiny")  # the graphs table's tiny rows
    assert tables.count("| tiny ") == graph_rows + 1 + 1 + 12 and "| 128 " in tables and "flash-attn is not installed" in tables


def test_gpu_suite_time_box(tmp_path):
    """With its budget spent, the suite starts nothing and says so for every configuration."""
    gpu_suite.main(["--dry-run", "--budget", "0", "--only", "step_vs_hf,mfu", "--out", str(tmp_path / "gpu.json")])
    env, *configs = read_lines(tmp_path / "gpu.json")
    assert len(configs) == 1 + 12
    assert all(r["status"] == "skipped" for r in configs)
    assert all("budget is spent" in r["reason"] for r in configs if not str(r["config"].get("attention")).startswith("flash"))


def test_step_vs_hf():
    (result,) = step_vs_hf.main(["--presets", "tiny", "--batch", "1", "--seq-len", "32", "--vocab", "512", "--warmup", "0", "--steps", "1"])
    assert result["ratio"] > 0
    # the same matmuls; ours has RMSNorm weights (2 per block + the final one), OLMo's LayerNorm has none
    assert result["ours_params"] - result["hf_params"] == (2 * 2 + 1) * 128


def test_pe_overhead_times_every_pe_against_rope():
    result = pe_overhead.main(["--preset", "tiny", "--batch", "1", "--seq-len", "32", "--vocab", "512", "--warmup", "0", "--repeats", "1"])
    ratios = result["ratio_vs_rope"]
    assert list(ratios) == pe_overhead.all_pes() and sorted(ratios) == available() and ratios["rope"] == 1.0
    assert all(ratio > 0 for ratio in ratios.values())
    assert pe_overhead.pe_options("fope")["sigma"] == 0.3 and pe_overhead.pe_options("rope") == {}  # configs/pe's
    with pytest.raises(SystemExit, match="--pes: fop is not a registered position encoding"):
        pe_overhead.main(["--pes", "rope,fop"])


def test_eval_memory_is_linear_in_length():
    """Peak eval memory doubles (not quadruples) with T, and stays far below one (T, T) float32 matrix per head."""
    rows = eval_memory.main(["--preset", "tiny", "--pes", "rope,fope", "--min-len", "2048", "--max-len", "4096", "--vocab", "512"])
    peaks = {(r["pe"], r["seq_len"]): r["peak_mib"] for r in rows}
    for pe in ("rope", "fope"):
        # counted tensor by tensor, so exact on any machine: linear growth doubles, a (T, T) term would quadruple
        assert 1.95 < peaks[pe, 4096] / peaks[pe, 2048] < 2.05, peaks
        assert peaks[pe, 4096] < 4 * 4096**2 * 4 / 2**20 / 4, peaks  # a quarter of 4 heads' (T, T) float32 scores


def test_live_tensor_bytes_counts_new_storage_not_views():
    q, k = torch.randn(256, 16), torch.randn(256, 16)
    with eval_memory.LiveTensorBytes() as tracker:
        scores = q @ k.T  # k.T is a view: nothing new
        del scores
        kept = q * 2
    assert tracker.peak == 256 * 256 * 4  # the scores, freed before `kept` was made
    assert tracker.current == kept.numel() * 4


def test_compile_step_reports_graphs_and_activation_memory(tmp_path):
    """The graph table covers the registry with one graph each, and checkpointing lowers the counted peak (an exact
    count of tensor storage, the same on every machine: full < every_2 < none)."""
    results = compile_step.main(
        ["--preset", "tiny", "--only", "graphs,memory", "--memory-seq-len", "128", "--json", str(tmp_path / "r.json")]
    )
    assert all((row["graphs"], row["breaks"]) == (1, 0) for row in results["graphs"].values())
    ratios = results["memory"]["ratio_to_none"]
    assert ratios["none"] == 1.0 and ratios["full"] < ratios["every_2"] < 1.0


def test_prepare_throughput_counts_the_same_tokens_each_way(capsys):
    result = prepare_throughput.main(["--mb", "0.3", "--files", "2", "--unit-documents", "100"])
    assert set(result["tokens_per_s"]) == {"tokenizer batch encode (ceiling)", "prepare_data.py, num_proc 1", "prepare_data.py, num_proc 2"}
    assert result["ratio_vs_ceiling"]["tokenizer batch encode (ceiling)"] == 1.0 and result["hours_for_10b_tokens"]["hours"] > 0
    assert "10B tokens at the num_proc 2 rate per process on 32 cores" in capsys.readouterr().out
