"""What a run reports: the MFU peaks, peak memory and metrics.jsonl (the trainer's reporting callbacks,
fope_lm.training.callbacks, use them; the wandb run is fope_lm.tracking's).

MFU (model FLOPs utilisation) = achieved training FLOP/s per device / the device's peak dense bf16 FLOP/s,
with achieved FLOP/s = tokens/s per device * Transformer.flops_per_token(seq_len), i.e. 6N + 12 * n_layers *
d_model * T per token (PaLM's estimate: forward + backward, attention included, no recomputation counted).
fp32 runs are measured against the same bf16 peak, so their MFU reads low by design.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
from pathlib import Path

import torch

from fope_lm.errors import FopeError

log = logging.getLogger(__name__)

# Peak dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s from NVIDIA's datasheets, keyed by the words of
# torch.cuda.get_device_name() that identify the part; the first entry whose words all appear wins, so
# variants come before their base name. V100 and T4 have no bf16: their fp16 peak is listed.
PEAK_BF16_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "NVL"), 835.0),
    (("H100", "PCIE"), 756.0),
    (("H100",), 989.0),  # SXM
    (("H200", "NVL"), 836.0),
    (("H200",), 989.0),  # SXM
    (("GH200",), 989.0),
    (("B200",), 2250.0),
    (("A100",), 312.0),
    (("A800",), 312.0),
    (("A10G",), 125.0),
    (("A10",), 125.0),
    (("A30",), 165.0),
    (("A40",), 149.7),
    (("L40S",), 362.0),
    (("L40",), 181.0),
    (("L4",), 121.0),
    (("V100",), 125.0),
    (("T4",), 65.0),
    (("RTX", "A6000"), 154.8),
    (("RTX", "4090"), 165.2),  # fp32 accumulate (GeForce runs bf16 with fp16 accumulate at twice this)
    (("RTX", "3090"), 71.0),
]


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its name, or None when the table does not know it."""
    words = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    for key, tflops in PEAK_BF16_TFLOPS:
        if all(word in words for word in key):
            return tflops * 1e12
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory on a CUDA device; peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsFile:
    """`metrics.jsonl`: one JSON object per logged step, each appended whole by one write() as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def keep_until(self, step: int) -> None:
        """Drop records after `step`: a resumed run rewrites the steps it repeats, so the file is one trajectory.
        A torn last line (a kill during its write) is dropped with a warning."""
        if not self.path.exists():
            return
        kept = [record for record in read_metrics(self.path) if record["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        line = (json.dumps({"step": step, **metrics}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one system call per record: a kill leaves whole lines, at worst a torn last one
        finally:
            os.close(fd)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (what a kill during a write leaves) is skipped with a warning;
    a broken line before the last is an error, naming it."""
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise FopeError(f"{path} line {number} is not JSON ({line[:60]!r}): fix or delete that line") from None
            log.warning("%s: dropped a torn last line (%d characters, from an interrupted write)", path, len(line))
    return records
