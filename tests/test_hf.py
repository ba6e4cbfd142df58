"""The Hugging Face export (fope_lm.hf, scripts/export_hf.py): for every kind of position encoding the directory
loads with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` and gives fope_lm's logits and greedy
continuations; it loads where fope_lm cannot be imported; lm-evaluation-harness scores it through its `hf` model.

The tiny models are random, with a wide init (std 0.1) so that greedy choices are far from ties.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fope_lm.checkpoint import save_model
from fope_lm.hf import ExportError, export_hf
from fope_lm.nn.generate import continuation_logprobs, greedy_generate
from fope_lm.nn.model import build_model
from fope_lm.run_dir import COMPLETE_MARKER, RunDir

from conftest import REPO
from helpers.evaluation import passkey_tokenizer

TRAIN_LEN, EVAL_LEN, NEW_TOKENS = 32, 80, 24  # logits checked past the training length, where the encodings differ

CASES = {  # name: (pe, pe_options, other ModelConfig overrides)
    "nope": ("nope", {}, {}),
    "rope": ("rope", {}, {}),
    "rope-tied": ("rope", {}, {"tie_embeddings": True}),
    "alibi": ("alibi", {}, {}),
    "yarn-static": ("yarn", {"scale": 4.0}, {}),
    "yarn-dynamic": ("yarn", {"dynamic": True}, {}),
    "fope": ("fope", {}, {}),
    "fope-yarn": ("fope", {"scale": 2.0}, {}),
    "fope-learnable": ("fope", {"learnable": True}, {}),
    "kerple_log": ("kerple_log", {}, {}),
    "p_rope": ("p_rope", {}, {}),
    "partial_rope": ("partial_rope", {}, {}),
    "rope_clip": ("rope_clip", {}, {}),
    "fire": ("fire", {}, {}),
    "cope": ("cope", {}, {}),
    "fox": ("fox", {}, {}),
    "fox_rope": ("fox_rope", {}, {}),
    "resonance_rope": ("resonance_rope", {}, {}),
    "resonance-yarn": ("resonance_rope", {"scaling": "yarn", "scale": 4.0}, {}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    passkey_tokenizer().save_pretrained(path)
    return path


def tiny_checkpoint(directory: Path, pe: str, pe_options: dict, **overrides):
    model = build_model(
        "tiny", pe=pe, pe_options=pe_options, vocab_size=len(passkey_tokenizer()), max_seq_len=TRAIN_LEN, init_std=0.1, **overrides
    ).eval()
    save_model(directory, model)
    return model


@pytest.fixture(scope="module")
def fope_export(tmp_path_factory, tokenizer_dir):
    """A FoPE checkpoint and its export, for the tests that need only one."""
    root = tmp_path_factory.mktemp("fope")
    model = tiny_checkpoint(root / "checkpoint", "fope", {})
    return model, export_hf(root / "checkpoint", root / "hf", tokenizer=tokenizer_dir)


@pytest.mark.parametrize("case", CASES)
def test_export_matches_fope_lm(case, tmp_path, tokenizer_dir):
    pe, pe_options, overrides = CASES[case]
    torch.manual_seed(0)
    model = tiny_checkpoint(tmp_path / "checkpoint", pe, pe_options, **overrides)
    out = export_hf(tmp_path / "checkpoint", tmp_path / "hf", tokenizer=tokenizer_dir, format="remote")  # every PE (native: test_llama)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__module__.startswith("transformers_modules.")  # the shipped code, not fope_lm.hf's

    config = json.loads((out / "config.json").read_text())
    assert (config["pe"], config["pe_options"], config["tie_embeddings"]) == (pe, pe_options, overrides.get("tie_embeddings", False))
    assert hf.model.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():  # FoPE's coefficients, KERPLE's kernel, every weight
        assert torch.equal(hf.model.state_dict()[name], tensor), name

    ids = torch.randint(0, model.config.vocab_size, (2, EVAL_LEN))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids)
    assert theirs.logits.shape == ours.logits.shape
    assert (theirs.logits - ours.logits).abs().max() < 1e-5

    prompt = ids[:1, :20]
    expected = greedy_generate(model, prompt, NEW_TOKENS)  # dynamic YaRN scales for prompt + new tokens throughout
    dynamic = {"dynamic_len": prompt.shape[1] + NEW_TOKENS} if pe_options.get("dynamic") else {}
    for use_cache in (True, False):
        generated = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache, **dynamic)[:, prompt.shape[1] :]
        n = generated.shape[1]  # generate() stops at EOS
        assert torch.equal(generated, expected[:, :n]), (use_cache, generated, expected)
        assert n == NEW_TOKENS or generated[0, -1] == hf.generation_config.eos_token_id


def test_export_contents(fope_export, tokenizer_dir):
    model, out = fope_export
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "configuration_fope.py",
        "modeling_fope.py",
        "fope_core.py",
        "README.md",
    } <= {path.name for path in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_fope.FopeConfig", "AutoModelForCausalLM": "modeling_fope.FopeForCausalLM"}
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(model.config.vocab_size, model.config.padded_vocab_size))
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tokenizer.get_vocab() == passkey_tokenizer().get_vocab()


@pytest.mark.slow
def test_export_runs_without_fope_lm(fope_export, tmp_path):
    """The directory is self-contained: a process in which `import fope_lm` fails loads it and gets the same logits."""
    model, out = fope_export
    ids = torch.randint(0, model.config.vocab_size, (1, EVAL_LEN))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["fope_lm"] = None  # import fope_lm now raises ImportError
import torch
from transformers import AutoModelForCausalLM

expected = torch.load({str(tmp_path / "expected.pt")!r})
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    print(float((model(expected["ids"]).logits - expected["logits"]).abs().max()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) < 1e-5


def test_forward_contract(fope_export):
    model, out = fope_export
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        output = hf(ids, labels=ids)  # transformers' convention: labels = inputs, shifted inside
        expected = model(ids[:, :-1], ids[:, 1:]).loss
        assert abs(output.loss.item() - expected.item()) < 1e-5
        last = hf(ids, logits_to_keep=1).logits
        assert last.shape == (2, 1, model.config.padded_vocab_size)
        assert (last[:, 0] - output.logits[:, -1]).abs().max() < 1e-5
        with pytest.raises(ValueError, match="padding mask"):
            hf(ids, attention_mask=torch.tensor([[1] * 40, [0] * 4 + [1] * 36]))
    bf16 = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16)
    assert bf16.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert bf16.model.blocks[0].attn.pe.cos_coef.dtype == torch.float32  # position-encoding state stays as trained


def test_tokenizer_from_run_dir(tmp_path, tokenizer_dir, caplog):
    """A run's checkpoint exports with the tokenizer of the data it was trained on (run_info.json), via the CLI; one
    that records no data exports without a tokenizer, with a warning (tests/test_export_serving.py: what it holds)."""
    cli = importlib.util.spec_from_file_location("export_hf_cli", REPO / "scripts" / "export_hf.py")
    export_cli = importlib.util.module_from_spec(cli)
    cli.loader.exec_module(export_cli)

    run_dir, data_dir = tmp_path / "run", tmp_path / "data"
    passkey_tokenizer().save_pretrained(data_dir / "tokenizer")
    checkpoint = RunDir(run_dir).checkpoint(3)
    tiny_checkpoint(checkpoint, "rope", {})
    (checkpoint / COMPLETE_MARKER).write_text("3\n")
    (run_dir / "run_info.json").write_text(json.dumps({"data_dir": str(data_dir)}))

    assert export_cli.main([str(run_dir), str(tmp_path / "hf")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True).get_vocab() == passkey_tokenizer().get_vocab()

    (run_dir / "run_info.json").unlink()
    with caplog.at_level("WARNING", logger="fope_lm.hf.export"):
        assert export_cli.main([str(run_dir), str(tmp_path / "hf2")]) == 0
    assert "records no training data and no --tokenizer was passed" in caplog.text and "Pass --tokenizer DIR" in caplog.text
    assert (tmp_path / "hf2" / "model.safetensors").is_file() and not (tmp_path / "hf2" / "tokenizer.json").exists()
    with pytest.raises(ExportError, match="cannot load a tokenizer"):
        export_hf(run_dir, tmp_path / "hf3", tokenizer=tmp_path)


@pytest.mark.slow
def test_lm_eval_harness(fope_export):
    """lm-evaluation-harness's `hf` model (HFLM) on local requests: fope_lm's log-likelihoods and greedy text."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[lm_eval]')")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, out = fope_export
    lm = HFLM(pretrained=str(out), trust_remote_code=True, device="cpu", batch_size=2)
    requests = [
        ("The pass key is 4821. Remember it. What is the pass key? The pass key is", " 4821."),
        ("The grass is green. The sky is blue.", " The sun is yellow."),
        ("Here we go.", " There and back again. Here we go."),
    ]
    scores = lm.loglikelihood([Instance("loglikelihood", {}, request, i) for i, request in enumerate(requests)])
    tokenizer = passkey_tokenizer()
    for (context, continuation), (logprob, _) in zip(requests, scores, strict=True):
        context_ids = tokenizer(context)["input_ids"]
        continuation_ids = tokenizer(context + continuation)["input_ids"][len(context_ids) :]
        expected = continuation_logprobs(model, torch.tensor([context_ids]), [[continuation_ids]])
        assert abs(logprob - expected.item()) < 1e-4

    context = requests[0][0]
    (text,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": ["\n\n\n"], "max_gen_toks": 8}), 0)])
    expected = greedy_generate(model, torch.tensor([tokenizer(context)["input_ids"]]), 8)[0].tolist()
    if tokenizer.eos_token_id in expected:  # lm_eval stops there
        expected = expected[: expected.index(tokenizer.eos_token_id)]
    assert text == tokenizer.decode(expected)
