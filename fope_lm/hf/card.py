"""The model card (README.md) of an export: what the model is and how to run it, from what the checkpoint records.

position encoding   the PE, its options, its length scaling, rope_theta
lengths             the training length (and L0), max_position_embeddings and the length it serves
training            step, tokens seen, the data (name, dir, fingerprint as the checkpoint or its run records them),
                    or the model an imported checkpoint came from
evaluation          perplexity and passkey of every results.json under the checkpoint's eval dir (eval.py's
                    <run>/eval/step_N/<label>/), one column per label
use                 how to load it (native: plain AutoModelForCausalLM; remote: trust_remote_code=True) and the
                    lm_eval command, with max_length set to the length it serves
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fope_lm.checkpoint import checkpoint_metadata
from fope_lm.data.format import METADATA_FILE
from fope_lm.evaluation.report import ResultsError, comparison_table, load_valid_results, markdown_table
from fope_lm.nn.model import Transformer
from fope_lm.provenance import git_sha
from fope_lm.run_dir import RunDir, eval_dir, recorded_data_dir

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class ExportInfo:
    """What the exporter decided: the card states it."""

    checkpoint: Path
    out_dir: Path
    format: str  # native | remote
    tokenizer_dir: Path | None  # None: exported without a tokenizer
    max_position_embeddings: int  # what config.json holds
    serving_length: int  # the longest context it serves: lm_eval's max_length (differs only for native dynamic NTK)


def model_card(model: Transformer, info: ExportInfo) -> str:
    """The README.md of an export of `model` (its checkpoint's metadata, run and evaluations read here)."""
    config, spec = model.config, model.config.pe_spec
    metadata = _metadata(info.checkpoint)
    train_len = int(metadata.get("train_seq_len") or config.max_seq_len)
    scaling = spec.scaling(max_seq_len=config.max_seq_len)
    n_parameters = sum(parameter.numel() for parameter in model.parameters())
    remote = info.format == "remote"
    sections = [
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        f"tags:\n- fope-lm\n- {config.pe}\n" + ("- custom_code\n" if remote else "") + "---\n",
        f"# {info.out_dir.name}\n",
        f"A {n_parameters / 1e6:.1f}M-parameter decoder (d_model {config.d_model}, {config.n_layers} layers, {config.n_heads} heads"
        + (f", {config.kv_heads} key/value heads" if config.kv_heads != config.n_heads else "")
        + f", vocabulary {config.vocab_size}), a fope_lm model exported by `scripts/export_hf.py` "
        f"(git {git_sha()[:12]}) from `{info.checkpoint}` as "
        + (
            "a plain `LlamaForCausalLM` (no remote code).\n"
            if not remote
            else "remote code (`trust_remote_code=True`): fope_lm's own model.\n"
        ),
        "## Position encoding and lengths\n",
        _key_values(
            [
                ["position encoding", f"`{config.pe}`"],
                ["options", f"`{json.dumps(config.pe_options, sort_keys=True)}`" if config.pe_options else "defaults"],
                ["length scaling", f"`{scaling.describe()}`" if scaling.active else "none"],
                ["rope_theta", f"{config.rope_theta:g}" if spec.is_rotary else "-"],
                [
                    "training length",
                    f"{train_len}"
                    + (
                        f" (rotary weights first trained at L0 = {spec.original_max_seq_len(config.max_seq_len)})"
                        if spec.original_max_seq_len(config.max_seq_len) != config.max_seq_len
                        else ""
                    ),
                ],
                ["max_position_embeddings", str(info.max_position_embeddings)],
                ["serves (lm_eval max_length)", str(info.serving_length)],
            ]
        ),  # fmt: skip
        _lengths_note(info, train_len, scaling.depends_on_length),
        "## Training\n",
        _training(info.checkpoint, metadata),
        "## Evaluation\n",
        _evaluation(info.checkpoint, train_len),
        "## Use\n",
        _usage(info),
    ]
    return "\n".join(section.rstrip("\n") + "\n" for section in sections if section)


def _metadata(checkpoint: Path) -> dict:
    try:
        return checkpoint_metadata(checkpoint)
    except (OSError, ValueError):
        return {}


def _lengths_note(info: ExportInfo, train_len: int, dynamic: bool) -> str:
    notes = []
    if info.serving_length > train_len:
        notes.append(f"The model was trained at {train_len} tokens and runs past that as its position encoding does.")
    if info.max_position_embeddings != info.serving_length:
        notes.append(
            f"config.json's max_position_embeddings is {info.max_position_embeddings}: transformers' dynamic NTK reads it as "
            f"the original length it scales from, so it cannot declare the length served; pass max_length={info.serving_length} "
            "(or the length under test) to lm_eval, as below."
        )
    elif dynamic:
        notes.append(f"Dynamic scaling serves any length: {info.serving_length} is a default; pass the length under test as max_length.")
    return " ".join(notes) + "\n" if notes else ""


def _training(checkpoint: Path, metadata: dict) -> str:
    rows = []
    if metadata.get("imported_from"):
        rows.append(["imported from", f"`{metadata['imported_from']}` (scripts/import_hf.py)"])
    if metadata.get("step") is not None:
        rows.append(["step", f"{metadata['step']:,}"])
    if metadata.get("tokens_seen") is not None:
        rows.append(["tokens seen", f"{metadata['tokens_seen']:,}"])
    run = RunDir.of_checkpoint(checkpoint)
    run_info = _json(run.run_info) if run is not None else {}
    recorded = recorded_data_dir(checkpoint)
    if recorded is not None:
        data_dir, source = recorded
        name = _json(Path(data_dir) / METADATA_FILE).get("name") or Path(data_dir).name
        fingerprint = metadata.get("data_fingerprint") or run_info.get("data_fingerprint")
        rows.append(["data", f"`{name}` (`{data_dir}`, as {source.name} records it)"])
        rows.append(["data fingerprint", f"`{fingerprint}`" if fingerprint else "not recorded"])
    else:
        rows.append(["data", "not recorded"])
    if run is not None:
        rows.append(["run", f"`{run.path}`"])
    return _key_values(rows)


def _key_values(rows: list[list[str]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {key} | {value} |\n" for key, value in rows)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _evaluation(checkpoint: Path, train_len: int) -> str:
    directory = eval_dir(checkpoint)
    files = sorted(directory.glob(f"*/{RESULTS_FILE}")) if directory.is_dir() else []
    runs, skipped = [], []
    for file in files:
        try:
            runs.append(load_valid_results(file))
        except ResultsError as exc:
            log.warning("model card: %s", exc)
            skipped.append(file)
    if not runs:
        return f"No evaluation results (eval.py writes them to `{directory}/<label>/{RESULTS_FILE}`).\n"
    parts = [f"From `{directory}` (eval.py); training length {train_len}.\n"]
    if any(run["perplexity"] for run in runs):
        parts += ["Perplexity by evaluation length (one column per evaluation):\n", markdown_table(*comparison_table(runs, "ppl"))]
    if any(run["passkey"] for run in runs):
        parts += ["Passkey retrieval, greedy / teacher-forced accuracy:\n", markdown_table(*_passkey_table(runs))]
    if skipped:
        parts.append("Skipped (not a valid results.json): " + ", ".join(f"`{file}`" for file in skipped) + "\n")
    return "\n".join(parts)


def _passkey_table(runs: list[dict]) -> tuple[list[str], list[list]]:
    by_run = [{row["length"]: row for row in (run["passkey"] or {}).get("lengths", [])} for run in runs]
    lengths = sorted(set().union(*by_run))
    rows = [
        [length]
        + [
            f"{rows[length]['greedy_accuracy']:.2f} / {rows[length]['teacher_forced_accuracy']:.2f}" if length in rows else None
            for rows in by_run
        ]
        for length in lengths
    ]
    return ["length"] + [run["label"] for run in runs], rows


def _usage(info: ExportInfo) -> str:
    remote = info.format == "remote"
    path = str(info.out_dir)
    quoted = json.dumps(path)
    trust = ", trust_remote_code=True" if remote else ""
    lines = [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({quoted}{trust})",
    ]
    if info.tokenizer_dir is not None:
        lines += [
            f"tokenizer = AutoTokenizer.from_pretrained({quoted}{trust})",
            'ids = tokenizer("The pass key is", return_tensors="pt").input_ids',
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))",
        ]
    lines.append("```\n")
    if remote:
        lines.append(
            "Remote code: `trust_remote_code=True` runs this directory's `modeling_fope.py` and `fope_core.py` (fope_lm's model, "
            "bundled), which need torch and transformers 5, not fope_lm. No padding masks: batch prompts of one length.\n"
        )
    else:
        lines.append(
            "A plain Llama: transformers 4.51 to 4.57 (`rope_scaling`, `rope_theta`) and 5.x (`rope_parameters`) compute it exactly, "
            "and vLLM, SGLang and lm_eval load it as any Llama.\n"
        )
    if info.tokenizer_dir is not None:
        lines.append(f"Tokenizer: `{info.tokenizer_dir}`; config.json and generation_config.json hold its bos / eos / pad ids.\n")
    else:
        lines.append(
            "**No tokenizer**: the checkpoint records no training data and none was passed, so this directory holds no "
            "tokenizer, config.json's bos / eos / pad ids are null and generation_config.json holds only suppress_tokens "
            "(the padded vocabulary rows). Export again with `--tokenizer DIR` to generate text.\n"
        )
    model_args = f"pretrained={path}" + (",trust_remote_code=True" if remote else "") + f",dtype=float32,max_length={info.serving_length}"
    differs = ", which for this export is not the length served" if info.max_position_embeddings != info.serving_length else ""
    lines += [
        "lm-evaluation-harness (`max_length` is the longest context it feeds, truncating from the left; without it, it "
        f"takes max_position_embeddings{differs}):\n",
        "```bash",
        f"lm_eval --model hf --model_args {model_args} \\",
        "    --tasks lambada_openai --batch_size 1",
        "```",
    ]
    return "\n".join(lines) + "\n"
