"""fope_lm.hf.llama: a random LlamaForCausalLM (grouped-query attention, tied embeddings, a SwiGLU width that is not
4d, eps 1e-5) imports with its logits, swaps its rotary part, exports back natively (no remote code) for rope and
transformers' scaling types, round-trips to identical tensors, and refuses what it cannot represent, in one line; a
Mistral without a sliding window is a Llama and imports with its logits; Qwen2 and a sliding window are refused by
the feature fope_lm lacks, with what imports instead."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config

from fope_lm.checkpoint import load_model, load_state_dict, save_model
from fope_lm.errors import CheckpointError
from fope_lm.evaluation.config import EvalConfig, PasskeyConfig, PerplexityConfig
from fope_lm.evaluation.runner import run_evaluation
from fope_lm.hf import ExportError, export_hf
from fope_lm.hf.llama import LlamaConversionError, import_llama
from fope_lm.nn.generate import continuation_logprobs
from fope_lm.nn.model import build_model
from fope_lm.training.metrics import read_metrics

from conftest import REPO
from helpers.evaluation import passkey_tokenizer, prepare_passkey_data
from helpers.training import TINY, launch

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = len(passkey_tokenizer())  # 383: not a multiple of 128, so our embedding pads rows


def llama_config(**changes) -> LlamaConfig:
    values = dict(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=64, initializer_range=0.1,
    )  # fmt: skip
    return LlamaConfig(**(values | changes))


def save_llama(directory: Path, config: LlamaConfig | None = None, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config or llama_config()).eval()
    model.to(dtype).save_pretrained(directory)  # safetensors: the only weights an import reads (tests/test_outputs.py)
    passkey_tokenizer().save_pretrained(directory)
    return model.float()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    directory = tmp_path_factory.mktemp("llama") / "src"
    return directory, save_llama(directory)


def max_logit_diff(llama: torch.nn.Module, ours: torch.nn.Module, length: int = 100) -> float:
    ids = torch.randint(0, VOCAB, (2, length))
    with torch.no_grad():
        return float((llama(ids).logits[..., :VOCAB] - ours(ids).logits[..., :VOCAB]).abs().max())


def test_import_gives_the_sources_logits(source, tmp_path):
    src, llama = source
    out = import_llama(src, tmp_path / "imported")
    model = load_model(out)
    assert (model.config.n_heads, model.config.n_kv_heads, model.config.ffn_hidden_size) == (6, 2, 200)
    assert model.config.tie_embeddings and model.config.norm_eps == 1e-5 and model.config.pe == "rope"
    assert max_logit_diff(llama, model.eval()) < 1e-4  # past max_position_embeddings too (100 > 64)
    assert (out / "tokenizer" / "tokenizer.json").is_file() and json.loads((out / "source_config.json").read_text())[
        "model_type"
    ] == "llama"
    # bf16 weights import too (as float32 copies of the bf16 values)
    save_llama(tmp_path / "bf16", dtype=torch.bfloat16)
    bf16 = LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()  # its rotary buffers in fp32, as ours
    assert max_logit_diff(bf16, load_model(import_llama(tmp_path / "bf16", tmp_path / "imported-bf16")).eval()) < 1e-4


def test_rope_swap_keeps_everything_but_the_rotary_part(source, tmp_path):
    src, llama = source
    fope = load_model(import_llama(src, tmp_path / "fope", pe="fope", max_seq_len=32))
    pe = fope.blocks[0].attn.pe
    assert fope.config.max_seq_len == 32 and pe.cos_coef.shape[0] == 2  # coefficients per key/value head
    assert torch.allclose(pe.inv_freq(), pe.unscaled_frequencies(10000.0)) and pe.inv_freq().min() >= 2 * torch.pi / 32  # clipped
    # identity + noise: the official init (step identity plus Xavier noise of gain sigma)
    assert (pe.cos_coef - torch.eye(pe.n_freqs, pe.n_slots)).abs().mean() < 0.3
    imported = load_model(import_llama(src, tmp_path / "rope"))
    for name, tensor in imported.state_dict().items():
        if ".pe." not in name:
            assert torch.equal(fope.state_dict()[name], tensor), name
    yarn = load_model(import_llama(src, tmp_path / "yarn", pe="yarn", pe_options={"scale": 4.0, "original_max_seq_len": 64}))
    assert yarn.blocks[0].attn.pe.scaling.scale == 4.0


def test_native_export_loads_without_remote_code_and_round_trips(source, tmp_path):
    src, llama = source
    imported = import_llama(src, tmp_path / "imported")
    out = export_hf(imported, tmp_path / "native", format="native")
    assert not list(out.glob("*.py"))  # nothing to trust
    native = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(native).__name__ == "LlamaForCausalLM"
    assert max_logit_diff(native, load_model(imported).eval()) < 1e-4
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(VOCAB, -(-VOCAB // 128) * 128))  # padded rows never generated
    again = load_state_dict(import_llama(out, tmp_path / "again"))
    first = load_state_dict(imported)
    assert again.keys() == first.keys() and all(torch.equal(again[name], first[name]) for name in first)


@pytest.mark.parametrize(
    "pe,options,rope",
    [
        ("yarn", {"scale": 4.0}, "yarn"),
        ("rope", {"scaling": "linear", "scale": 4.0}, "linear"),
        ("rope", {"scaling": "dynamic_ntk", "scale": 2.0}, "dynamic"),
    ],
)
def test_scaled_rope_exports_as_transformers_rope_parameters(pe, options, rope, tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", pe=pe, pe_options=options, vocab_size=VOCAB, max_seq_len=32, n_kv_heads=2, init_std=0.1).eval()
    save_model(tmp_path / "ckpt", model)
    passkey_tokenizer().save_pretrained(tmp_path / "tok")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", tokenizer=tmp_path / "tok")  # auto: native
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == rope
    assert max_logit_diff(AutoModelForCausalLM.from_pretrained(out).eval(), model, length=100) < 1e-4  # 100 > 32: scaled


def test_what_has_no_exact_equivalent_is_refused_in_one_line(source, tmp_path):
    src, _ = source
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    cases = {
        "not a directory": (tmp_path / "missing", "is not a directory"),
        "no config.json": (tmp_path, "has no config.json"),
        "another architecture": (bad, "holds a 'gpt2' model (GPT2LMHeadModel): only Llama-architecture models import exactly"),
    }
    biased = tmp_path / "biased"
    save_llama(biased, llama_config(attention_bias=True))
    cases["biases"] = (biased, "attention_bias=true")
    llama3 = tmp_path / "llama3"
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # fmt: skip
    save_llama(llama3, llama_config(rope_parameters=rope))
    cases["a rope type"] = (llama3, "rope_type 'llama3' has no equivalent here")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((src / "config.json").read_text())
    cases["no weights"] = (no_weights, "has no weights (*.safetensors)")
    for what, (directory, words) in cases.items():
        with pytest.raises(LlamaConversionError) as info:
            import_llama(directory, tmp_path / "out")
        assert words in str(info.value) and "\n" not in str(info.value), what
    with pytest.raises(Exception, match="unknown position encoding 'fop'"):
        import_llama(src, tmp_path / "out", pe="fop")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "import_hf.py"), str(bad), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {bad} holds a 'gpt2' model (GPT2LMHeadModel): only Llama-architecture models import exactly (LlamaForCausalLM, "
        "model_type llama; MistralForCausalLM without a sliding window); a Llama-architecture model (SmolLM, TinyLlama, Llama 2/3) "
        "imports; --pe does not help (it replaces only the rotary part)"
    ]
    # a FoPE checkpoint has no native equivalent
    fope = import_llama(src, tmp_path / "fope", pe="fope")
    with pytest.raises(ExportError, match="no native equivalent of .*--format remote"):
        export_hf(fope, tmp_path / "hf", format="native")


def mistral_config(**changes) -> MistralConfig:
    values = dict(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=64, initializer_range=0.1, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )  # fmt: skip
    return MistralConfig(**(values | changes))


def test_a_mistral_without_a_sliding_window_is_a_llama(tmp_path):
    """MistralForCausalLM with sliding_window null computes a Llama's function with a Llama's weight names: it imports
    with its logits (theta 1e6, Mistral's), exports natively as a LlamaForCausalLM with the same logits."""
    torch.manual_seed(0)
    mistral = MistralForCausalLM(mistral_config()).eval()
    mistral.save_pretrained(tmp_path / "mistral")
    passkey_tokenizer().save_pretrained(tmp_path / "mistral")
    imported = import_llama(tmp_path / "mistral", tmp_path / "imported")
    model = load_model(imported).eval()
    assert (model.config.pe, model.config.rope_theta, model.config.n_kv_heads) == ("rope", 1e6, 2)
    assert max_logit_diff(mistral, model) < 1e-4  # past max_position_embeddings too (100 > 64)
    native = AutoModelForCausalLM.from_pretrained(export_hf(imported, tmp_path / "hf", format="native")).eval()
    assert type(native).__name__ == "LlamaForCausalLM" and max_logit_diff(mistral, native) < 1e-4


def test_qwen2_and_a_sliding_window_are_refused_naming_the_missing_feature(tmp_path):
    """Refused before any weight is read, in one line: what the model has that fope_lm's architecture lacks, and what
    imports instead (a config alone is enough: the refusal never looks for weights)."""
    configs = {
        "qwen2": Qwen2Config(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2),
        "qwen2-window": Qwen2Config(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, use_sliding_window=True, sliding_window=32),
        "mistral-window": mistral_config(sliding_window=32),
    }
    for name, config in configs.items():
        config.architectures = [{"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[config.model_type]]
        config.save_pretrained(tmp_path / name)
    nearest = "a Llama-architecture model (SmolLM, TinyLlama, Llama 2/3) imports; --pe does not help (it replaces only the rotary part)"
    expected = {
        "qwen2": f"{tmp_path / 'qwen2'} holds a 'qwen2' model (Qwen2ForCausalLM) with biases on its q/k/v projections (Qwen2 always "
        "has them), which fope_lm's architecture cannot represent: only Llama-architecture models import exactly (LlamaForCausalLM, "
        f"model_type llama; MistralForCausalLM without a sliding window); {nearest}",
        "qwen2-window": "with biases on its q/k/v projections (Qwen2 always has them) and a sliding window (use_sliding_window=true, "
        "sliding_window=32), which fope_lm's architecture cannot represent",
        "mistral-window": f"{tmp_path / 'mistral-window'}: this mistral model has a sliding window (sliding_window=32), which "
        "fope_lm's architecture cannot represent; only a Mistral trained without one (sliding_window null) is a Llama and imports; "
        + nearest,
    }
    for name, words in expected.items():
        with pytest.raises(LlamaConversionError) as info:
            import_llama(tmp_path / name, tmp_path / "out")
        assert words in str(info.value) and "\n" not in str(info.value), (name, str(info.value))
    assert not (tmp_path / "out").exists()
    script = str(REPO / "scripts" / "import_hf.py")
    commands = {
        name: subprocess.Popen([sys.executable, script, str(tmp_path / name), str(tmp_path / "out")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name in ("qwen2", "mistral-window")
    }  # fmt: skip
    for name, process in commands.items():  # what a user sees: one line, no traceback
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert stderr.strip().splitlines() == [f"error: {expected[name]}"], stderr


def test_an_imported_checkpoint_refuses_a_changed_source_config(source, tmp_path):
    src, _ = source
    out = import_llama(src, tmp_path / "imported")
    config = json.loads((out / "source_config.json").read_text())
    (out / "source_config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    with pytest.raises(CheckpointError, match="was imported from a config.json that source_config.json no longer matches"):
        load_model(out)


LOCAL_TASK = """task: fope_tiny_passkey
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_the_smollm_recipe_runs_offline_end_to_end(source, data_root, runs, tmp_path):
    """docs/smollm.md on a random tiny Llama: import with FoPE swapped in -> data prepared with the imported tokenizer ->
    continued pretraining (init_from=) -> perplexity and passkey -> export; and a RoPE import exported natively is
    scored by lm-evaluation-harness on a local task file, with fope_lm's log-likelihoods."""
    src, _ = source
    imported = runs / "llama-fope"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "import_hf.py"), str(src), str(imported), "--pe", "fope",
                             "--max-seq-len", "64"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "data").mkdir()
    data_cfg = prepare_passkey_data(tmp_path / "data", tokenizer_dir=imported / "tokenizer")
    shape = ["model.d_model=96", "model.n_heads=6", "model.n_kv_heads=2", "model.ffn_hidden_size=200", "model.tie_embeddings=true",
             "model.norm_eps=1e-5"]  # fmt: skip
    data = ["data=local", f"data.name={data_cfg['name']}", f"data.root={data_cfg['root']}", f"data.tokenizer={data_cfg['tokenizer']}",
            f"data.paths={{train:[{data_cfg['paths']['train'][0]}],validation:[{data_cfg['paths']['validation'][0]}]}}"]  # fmt: skip
    args = [*TINY, *shape, *data, "+pe=fope", f"init_from={imported}", "train.seq_len=64", "train.max_steps=4", "run_name=smollm-like"]
    result = launch(args, data_root=data_root, runs=runs)
    assert "init_from" in result.output
    run_dir = runs / "smollm-like"
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["step"] == 4
    config = EvalConfig(
        checkpoint=str(run_dir), data=data_cfg, progress=False,
        perplexity=PerplexityConfig(lengths=[32, 64, 128], tokens_total=2048), passkey=PasskeyConfig(lengths=[128], trials=4),
    )  # fmt: skip
    results, paths = run_evaluation(config)
    assert [row["length"] for row in results["perplexity"]] == [32, 64, 128] and results["passkey"]["lengths"][0]["length"] == 128
    assert paths["json"].is_relative_to(run_dir / "eval")
    remote = export_hf(run_dir, tmp_path / "hf-fope", tokenizer=imported / "tokenizer")  # FoPE: remote code (auto)
    assert (remote / "modeling_fope.py").is_file()

    native = export_hf(import_llama(src, tmp_path / "llama-rope"), tmp_path / "hf-rope")  # RoPE: native (auto)
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[lm_eval]')")
    from lm_eval.tasks import TaskManager

    requests = [{"context": "The pass key is 4821. Remember it. The pass key is", "continuation": " 4821."},
                {"context": "The grass is green. The sky is", "continuation": " blue."}]  # fmt: skip
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(request) + "\n" for request in requests))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "fope_tiny_passkey.yaml").write_text(LOCAL_TASK.format(data=tmp_path / "task.jsonl"))
    evaluated = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={native},dtype=float32", tasks=["fope_tiny_passkey"], device="cpu", batch_size=2,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True,
    )  # fmt: skip
    assert 0.0 <= evaluated["results"]["fope_tiny_passkey"]["acc,none"] <= 1.0
    model, tokenizer = load_model(tmp_path / "llama-rope").eval(), passkey_tokenizer()
    for sample in evaluated["samples"]["fope_tiny_passkey"]:
        doc = sample["doc"]
        context = tokenizer(doc["context"])["input_ids"]
        continuation = tokenizer(doc["context"] + doc["continuation"])["input_ids"][len(context) :]
        expected = continuation_logprobs(model, torch.tensor([context]), [[continuation]]).item()
        assert sample["resps"][0][0][0] == pytest.approx(expected, abs=1e-4)
