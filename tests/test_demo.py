"""The README's first command, `make demo` (scripts/demo.py), end to end on one PE and a few steps."""

import csv
import importlib.util
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO

DEMO = [sys.executable, str(REPO / "scripts" / "demo.py")]


@pytest.mark.slow
def test_demo_trains_evaluates_and_tabulates(tmp_path, embedded_data_root):
    env = os.environ | {"FOPE_DATA_ROOT": str(embedded_data_root)}
    result = subprocess.run(
        [*DEMO, "--pes", "rope", "--steps", "4", "--seed", "3", "--out", str(tmp_path / "demo")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "demo" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["length"]) for r in rows] == [64, 128, 256, 512, 1024, 2048]
    assert set(rows[0]) == {"length", "rope", "rope+yarn(dynamic)"}  # the rope run, and YaRN applied to it at eval
    for row in rows:
        for label in ("rope", "rope+yarn(dynamic)"):
            assert math.isfinite(float(row[label])) and float(row[label]) > 1
    # better than uniform over the vocab at the training length after 4 steps: measured 5006 .. 5156 (seeds 0-2)
    assert float(rows[1]["rope"]) < 8192
    assert rows[1]["rope"] == rows[1]["rope+yarn(dynamic)"]  # dynamic YaRN is RoPE up to the training length (128)
    assert (tmp_path / "demo" / "comparison.png").stat().st_size > 0
    assert "seed=3" in (tmp_path / "demo" / "logs" / "train_rope.log").read_text().splitlines()[0]


@pytest.mark.slow
def test_demo_rejects_an_unknown_pe_before_any_work(tmp_path):
    result = subprocess.run([*DEMO, "--pes", "rope,fop", "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--pes: no configs/pe/fop.yaml" in result.stderr
    assert not any(tmp_path.iterdir())


def test_demo_document_mask_trains_within_documents_and_labels_the_runs(tmp_path):
    """--document-mask: the same budget plus train.document_mask=true (which test_train.py trains with), labelled."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
        demo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(demo)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    args = SimpleNamespace(steps=600, batch_size=16, lr=2e-3, seed=0, document_mask=False)
    plain = demo.training_budget(args, tmp_path)
    masked = demo.training_budget(SimpleNamespace(**{**vars(args), "document_mask": True}), tmp_path)
    assert masked == [*plain, "train.document_mask=true"] and not any(o.startswith("train.document") for o in plain)
    labels = [label for label, *_ in demo.eval_runs(["rope", "alibi"], True)]
    assert labels == ["rope (doc mask)", "alibi (doc mask)", "rope+yarn(dynamic) (doc mask)"]
    assert [label for label, *_ in demo.eval_runs(["alibi"], False)] == ["alibi"]
