"""Train-step time of our presets against transformers' OlmoForCausalLM with the same matmul shapes.

Both models, per preset (default `60m` and the smaller `20m`): its hidden size, layers and heads, SwiGLU
intermediate 4 x hidden, untied LM head, no biases, RoPE, the same vocab. One step = forward + backward + AdamW
step on a (batch, seq_len) batch; both models on the device at once, their steps interleaved (common.py) so that
machine noise hits both alike; a few warmup rounds, then the median of --steps. CPU in fp32; also CUDA in bf16
autocast when a GPU is present.

    python scripts/bench/step_vs_hf.py [--presets 60m,20m] [--batch 2] [--seq-len 256] [--vocab 8192] [--steps 10] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
from transformers import OlmoConfig, OlmoForCausalLM

from fope_lm.bench.common import make_train_step, print_table, time_interleaved
from fope_lm.nn.model import build_model, preset_config


def ours(preset: str, vocab: int, seq_len: int) -> torch.nn.Module:
    return build_model(preset, pe="rope", vocab_size=vocab, max_seq_len=seq_len)


def olmo(preset: str, vocab: int, seq_len: int) -> torch.nn.Module:
    shape = preset_config(preset, vocab_size=vocab, max_seq_len=seq_len)
    config = OlmoConfig(  # type: ignore[call-arg]  # rope_theta goes through PreTrainedConfig's kwargs
        vocab_size=shape.padded_vocab_size,  # our embedding's rows, so both LM heads are the same matmul
        hidden_size=shape.d_model,
        intermediate_size=shape.mlp_ratio * shape.d_model // 2,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_heads,
        max_position_embeddings=seq_len,
        attention_bias=False,
        tie_word_embeddings=False,
        rope_theta=shape.rope_theta,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=0,
    )
    config._attn_implementation = "sdpa"
    return OlmoForCausalLM(config)


def loss_ours(model, tokens):
    return model(tokens[:, :-1], tokens[:, 1:]).loss


def loss_olmo(model, tokens):
    inputs = tokens[:, :-1]
    return model(input_ids=inputs, labels=inputs).loss  # shifts the labels itself


def compare(preset: str, *, device: torch.device, dtype: str, batch: int, seq_len: int, vocab: int, warmup: int, steps: int) -> dict:
    """Median seconds per train step of ours and of OLMo for one preset, interleaved, and their ratio."""
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), device=device)
    step_fns, n_params = {}, {}
    for name, build, loss_fn in (("ours", ours, loss_ours), ("hf", olmo, loss_olmo)):
        with device:  # initialised where it runs
            model = build(preset, vocab, seq_len).train()
        n_params[name] = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step_fns[name] = make_train_step(model, lambda m, fn=loss_fn: fn(m, tokens), optimizer, device, dtype)
    seconds = time_interleaved(step_fns, warmup, steps)
    return {
        "preset": preset,
        "device": str(device),
        "dtype": dtype,
        "batch": batch,
        "seq_len": seq_len,
        "vocab": vocab,
        "ours_params": n_params["ours"],
        "hf_params": n_params["hf"],
        "ours_s": seconds["ours"],
        "hf_s": seconds["hf"],
        "ratio": seconds["ours"] / seconds["hf"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="60m,20m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [(torch.device("cpu"), "fp32")] + ([(torch.device("cuda"), "bf16")] if torch.cuda.is_available() else [])
    print(
        f"# batch {args.batch} x {args.seq_len} tokens, vocab {args.vocab}, median of {args.steps} interleaved steps "
        f"after {args.warmup}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    results, rows = [], []
    for device, precision in devices:
        label = f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} {precision}"
        for preset in args.presets.split(","):
            r = compare(
                preset,
                device=device,
                dtype=precision,
                batch=args.batch,
                seq_len=args.seq_len,
                vocab=args.vocab,
                warmup=args.warmup,
                steps=args.steps,
            )
            results.append(r)
            params = f"{r['ours_params'] / 1e6:.1f} / {r['hf_params'] / 1e6:.1f}"
            rows.append([label, preset, params, f"{r['ours_s'] * 1e3:.1f}", f"{r['hf_s'] * 1e3:.1f}", f"{r['ratio']:.2f}"])
    print_table(["device", "preset", "params M (ours / hf)", "fope_lm ms/step", "hf Olmo ms/step", "ours / hf"], rows)
    return results
