"""Which frequencies do a trained model's attention logits contain, as a function of relative distance?

For layer l and head h, on sequences of N = 4L tokens (L = the checkpoint's training length `max_seq_len`):
  a_h(d) = mean over sequences and query positions i >= d of  q_i.k_{i-d} / sqrt(d_h) + b_h(i, i-d),
the mean pre-softmax logit at relative distance d = 0 .. N-1, with q, k after the position encoding and b its
attention bias (zero for rotary methods; each sequence's own for the content-dependent CoPE and FoX). Its
spectrum is the one-sided rfft over d of the mean-removed curve, at angular frequencies w_m = 2*pi*m/N (radians
per token). Bin m's energy E_m is its share of the curve's variance over d (Parseval: sum_m E_m = var_d a_h(d));
the mean is dropped because a constant logit offset does not change the softmax.

One number per layer: the fraction of the layer's energy (summed over heads) at 0 < w < 2*pi/L, the
components with a period longer than L that training never shows a full cycle of, which the FoPE paper
calls under-trained and FoPE clips. With N = 4L these are the bins m = 1, 2, 3.

`analyze_checkpoint` runs the whole analysis on a checkpoint and writes spectrum.json (summary),
spectrum.npz (curves and energies) and spectrum.png (per layer: heads x frequency heat map).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast

import numpy as np
import torch

from fope_lm.checkpoint import checkpoint_metadata, load_model, read_model_config
from fope_lm.errors import DataError
from fope_lm.nn.attention import BIAS_CHUNK_ELEMENTS, expand_kv
from fope_lm.nn.generate import inference
from fope_lm.position import BiasInputs, PositionEncoding
from fope_lm.provenance import git_sha
from fope_lm.run_dir import recorded_data_dir, resolve_checkpoint

SPAN = 4  # analysed sequences are SPAN * L tokens: resolves the SPAN - 1 bins below 2*pi/L


# --- logits by relative distance --------------------------------------------------------------------------------
def logit_sums_by_distance(
    q: torch.Tensor,
    k: torch.Tensor,
    pe: PositionEncoding,
    *,
    k_state: torch.Tensor | None = None,
    chunk_elements: int = BIAS_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """S_h(d) = sum over the batch and over queries i >= d of the logit (i, i - d): float64 (H, T).

    q, k: (B, H, T, Dh) at positions 0..T-1; k_state: the encoding's token state of the layer input (FoX). Queries go
    a chunk at a time, so at most `chunk_elements` logits (and bias entries) exist at once.
    """
    batch, n_heads, T, head_dim = q.shape
    q, k = q.float(), k.float()
    positions = torch.arange(T, device=q.device)
    sums = torch.zeros(n_heads, T, dtype=torch.float64, device=q.device)
    rows = max(1, chunk_elements // (batch * n_heads * T * pe.bias_memory))
    for start in range(0, T, rows):
        block = slice(start, start + rows)
        q_pos = positions[block]
        logits = q[:, :, block] @ k.transpose(-1, -2) / math.sqrt(head_dim)  # (B, H, chunk, T)
        distance = q_pos[:, None] - positions[None, :]  # i - j, (chunk, T)
        causal = distance >= 0
        if pe.has_attention_bias:
            inputs = BiasInputs(q_pos, positions, q[:, :, block], k, causal, block, k_state)
            logits = logits + cast(torch.Tensor, pe.logit_bias(inputs)).float()  # (H or B x H, chunk, T): broadcasts
        sums.index_add_(1, distance[causal], logits.sum(0)[:, causal].double())
    return sums


def mean_logit_by_distance(
    model, sequences: torch.Tensor, *, batch_size: int = 1, chunk_elements: int = BIAS_CHUNK_ELEMENTS
) -> tuple[np.ndarray, float]:
    """a_h(d) for every layer: float64 (n_layers, H, T), and the mean next-token loss on `sequences` (n, T).

    Forward pre-hooks on each attention layer re-run its q/k projection and position encoding on the layer's
    input; the model's own forward supplies those inputs (its LM-head loss is computed in chunks, so no
    (B, T, vocab) logits are held).
    """
    device = next(model.parameters()).device
    n_sequences, T = sequences.shape
    sums: list[torch.Tensor | None] = [None] * len(model.blocks)

    def capture(layer):
        def hook(attn, args):
            x, positions = args[0], args[1]
            q, k, _ = attn.rotated_qkv(x, positions)
            k = expand_kv(k, q.shape[1])
            total = logit_sums_by_distance(q, k, attn.pe, k_state=attn.pe.token_state(x), chunk_elements=chunk_elements)
            sums[layer] = total if sums[layer] is None else sums[layer] + total

        return hook

    handles = [block.attn.register_forward_pre_hook(capture(i)) for i, block in enumerate(model.blocks)]
    loss_sum, n_targets = 0.0, 0
    try:
        with inference(model):
            for batch in sequences.split(batch_size):
                batch = batch.to(device)
                labels = torch.full_like(batch, -100)
                labels[:, :-1] = batch[:, 1:]
                out = model(batch, labels, loss_chunk_size=256, reduction="sum")
                loss_sum, n_targets = loss_sum + out.loss.item(), n_targets + int(out.n_targets)
    finally:
        for handle in handles:
            handle.remove()
    counts = n_sequences * (T - torch.arange(T, dtype=torch.float64))  # pairs (i, i - d) per distance
    curves = torch.stack([curve for curve in sums if curve is not None]).cpu() / counts
    return curves.numpy(), loss_sum / max(n_targets, 1)


# --- spectra ------------------------------------------------------------------------------------------------------
def logit_spectrum(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w, E): the angular frequency 2*pi*m/N of each rfft bin m, and each bin's share of the variance of
    the curves over their last axis (N samples). E[..., 0] is 0: the mean is removed first."""
    n = curves.shape[-1]
    coeffs = np.fft.rfft(curves - curves.mean(axis=-1, keepdims=True), axis=-1)
    weight = np.full(coeffs.shape[-1], 2.0)  # one-sided: bins 0 < m < N/2 stand for m and N - m
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0  # the Nyquist bin has no mirror
    energy = weight * np.abs(coeffs) ** 2 / n**2
    return 2 * np.pi * np.fft.rfftfreq(n), energy


def below_floor(n: int, max_seq_len: int) -> np.ndarray:
    """Boolean mask over the rfft bins of an N-sample curve: 0 < 2*pi*m/N < 2*pi/L, i.e. 0 < m*L < N."""
    m = np.arange(n // 2 + 1)
    return (m > 0) & (m * max_seq_len < n)


def low_frequency_fraction(energy: np.ndarray, n: int, max_seq_len: int) -> np.ndarray:
    """The share of energy (over the last axis; DC excluded) below 2*pi/L; NaN where the curve is flat."""
    low = energy[..., below_floor(n, max_seq_len)].sum(axis=-1)
    total = energy[..., 1:].sum(axis=-1)
    return np.divide(low, total, out=np.full_like(low, np.nan), where=total > 0)


# --- a checkpoint, end to end ----------------------------------------------------------------------------------
def checkpoint_data(checkpoint: str | Path) -> dict:
    """What a checkpoint records about its training data: {"dir": ..., "fingerprint": ...}, None if unknown."""
    checkpoint = Path(checkpoint)
    recorded = recorded_data_dir(checkpoint)
    return {"dir": recorded and recorded[0], "fingerprint": checkpoint_metadata(checkpoint).get("data_fingerprint")}


def validation_sequences(
    data_dir: str | Path, length: int, n_sequences: int, *, vocab_size: int, expected_fingerprint: str | None = None
) -> tuple[torch.Tensor, dict]:
    """The first n_sequences chunks of `length` tokens of a prepared dataset's validation split (fewer if short)."""
    from fope_lm.data import TokenData, ValidationTokens  # here: the data package imports datasets/transformers

    data = TokenData(data_dir)
    data.check_vocab(vocab_size)
    if expected_fingerprint is not None:
        data.check_fingerprint(expected_fingerprint)
    chunks = ValidationTokens(data, n_sequences * length, length).chunks(length)
    source = {"source": "validation split", "dir": str(data.dir.resolve()), "fingerprint": data.fingerprint}
    return chunks, source


def token_file_sequences(path: str | Path, length: int, n_sequences: int, *, vocab_size: int) -> tuple[torch.Tensor, dict]:
    """Chunks of `length` tokens from a 1-D .npy array of token ids."""
    tokens = np.load(path).reshape(-1)
    n = min(n_sequences, tokens.size // length)
    if n == 0:
        raise DataError(f"{path} has {tokens.size} tokens, fewer than one sequence of {length} (4 x the training length)")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise DataError(f"{path} has token ids outside [0, {vocab_size}), the model's vocab_size")
    chunks = torch.from_numpy(tokens[: n * length].astype(np.int64)).view(n, length)
    return chunks, {"source": "token file", "file": str(Path(path).resolve())}


def plot_spectra(path, omega, energy, *, max_seq_len, pe_frequencies, fractions, title) -> None:
    """One panel per layer: heads x frequency, colour = the share of that head's energy in each bin (log)."""
    import matplotlib.pyplot as plt

    fig = spectra_figure(omega, energy, max_seq_len=max_seq_len, pe_frequencies=pe_frequencies, fractions=fractions, title=title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def spectra_figure(omega, energy, *, max_seq_len, pe_frequencies, fractions, title):
    """plot_spectra's figure (open: the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    n_layers, n_heads, _ = energy.shape
    step = omega[1]  # bins m = 1 .. are drawn (DC is zero), each from (m - 1/2) to (m + 1/2) times 2*pi/N
    edges = np.append(omega[1:] - step / 2, omega[-1] + step / 2)
    total = energy[..., 1:].sum(axis=-1, keepdims=True)
    share = np.divide(energy[..., 1:], total, out=np.zeros_like(energy[..., 1:]), where=total > 0)
    floor = 2 * np.pi / max_seq_len
    marks = pe_frequencies[(pe_frequencies >= edges[0]) & (pe_frequencies <= edges[-1])]

    height = max(3.0, 0.8 + n_layers * (0.45 + 0.06 * n_heads))
    fig, axes = plt.subplots(n_layers, 1, figsize=(9, height), sharex=True, squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        cells = np.clip(share[layer], 1e-6, 1)
        mesh = ax.pcolormesh(edges, np.arange(n_heads + 1), cells, norm=LogNorm(1e-6, 1), cmap="magma")
        for w in marks:
            ax.axvline(w, color="cyan", lw=0.8, alpha=0.8)
        ax.axvline(floor, color="red", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yticks([0.5, n_heads - 0.5], [0, n_heads - 1], fontsize=6)
        ax.set_ylabel(f"L{layer} head", fontsize=7)
        ax.set_title(f"layer {layer}: {fractions[layer]:.1%} of the energy below 2π/L", fontsize=7, loc="left", pad=2)
    axes[-1, 0].set_xlabel(f"ω (rad/token).  red: 2π/L, L={max_seq_len}.  cyan: the PE's own ω ({marks.size} in range)")
    fig.colorbar(mesh, ax=axes[:, 0].tolist(), label="share of the head's spectral energy", fraction=0.03)
    fit_suptitle(fig, title, fontsize=9)
    return fig


def fit_suptitle(fig, text: str, *, fontsize: float, min_fontsize: float = 5.0) -> None:
    """fig.suptitle(text) within the figure's width: wrapped at spaces (measured by the figure's renderer, so as
    drawn), and, where one word is wider than the figure, in a smaller font down to `min_fontsize`. Its lines grow
    upwards from just above the panels (and their titles), so that they never overlap them (savefig's
    bbox_inches="tight" takes in any height above the figure)."""
    renderer = fig.canvas.get_renderer()
    limit = 0.96 * fig.bbox.width
    panels_top = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes) if fig.axes else fig.bbox.height
    title = fig.suptitle("", fontsize=fontsize, y=(panels_top + 6) / fig.bbox.height, va="bottom")
    if not text.split():
        return

    def width(line: str) -> float:
        title.set_text(line)
        return title.get_window_extent(renderer).width

    widest = max(width(word) for word in text.split())
    if widest > limit:
        title.set_fontsize(max(min_fontsize, fontsize * limit / widest))
    lines: list[str] = []
    for word in text.split():
        if lines and width(f"{lines[-1]} {word}") <= limit:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    title.set_text("\n".join(lines))


def analyze_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    tokens: str | Path | None = None,
    n_sequences: int = 8,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
) -> dict:
    """Analyse a checkpoint on N = 4L-token sequences and write spectrum.{json,npz,png} into out_dir.

    `checkpoint` is a checkpoint dir, or a run dir (its newest complete checkpoint). Text: a 1-D .npy of token
    ids (`tokens`), or a prepared dataset's validation split (`data_dir`, default the data dir the run
    records, whose recorded fingerprint must then match).
    """
    checkpoint = resolve_checkpoint(checkpoint)
    config = read_model_config(checkpoint)
    L, n = config.max_seq_len, SPAN * config.max_seq_len
    if tokens is not None:
        sequences, source = token_file_sequences(tokens, n, n_sequences, vocab_size=config.vocab_size)
    else:
        recorded = checkpoint_data(checkpoint)
        if data_dir is None and recorded["dir"] is None:
            raise DataError(f"{checkpoint} records no data dir: pass --data-dir (a prepared dataset) or --tokens (a .npy)")
        expected = recorded["fingerprint"] if data_dir is None else None  # an explicit dir may be other text
        sequences, source = validation_sequences(
            data_dir or recorded["dir"], n, n_sequences, vocab_size=config.vocab_size, expected_fingerprint=expected
        )
        if recorded["fingerprint"]:
            source["matches_checkpoint"] = source["fingerprint"] == recorded["fingerprint"]
    model = load_model(checkpoint, device=device)
    curves, loss = mean_logit_by_distance(model, sequences, batch_size=batch_size)
    omega, energy = logit_spectrum(curves)
    head_fractions = low_frequency_fraction(energy, n, L)  # (n_layers, H)
    layer_fractions = low_frequency_fraction(energy.sum(axis=1), n, L)  # (n_layers,)
    pe_frequencies = model.position_encodings()[0].rotary_frequencies().double().cpu().numpy()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = "".join(f" {key}={value}" for key, value in config.pe_options.items())
    title = f"{Path(checkpoint).name}: {config.pe}{options}, L={L}, mean logit over {len(sequences)} x {n} tokens"
    plot_spectra(
        out_dir / "spectrum.png",
        omega,
        energy,
        max_seq_len=L,
        pe_frequencies=pe_frequencies,
        fractions=layer_fractions,
        title=title,
    )
    np.savez_compressed(out_dir / "spectrum.npz", mean_logit=curves, omega=omega, energy=energy)

    def finite(values):
        return [None if not np.isfinite(v) else float(v) for v in np.atleast_1d(values)]

    summary = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "pe": config.pe,
        "pe_options": config.pe_options,
        "train_seq_len": L,
        "n_distances": n,
        "n_sequences": len(sequences),
        "data": source,
        "loss": loss,
        "floor_frequency": 2 * math.pi / L,
        "pe_frequencies": pe_frequencies.tolist(),
        "low_frequency_bins": np.flatnonzero(below_floor(n, L)).tolist(),
        "low_frequency_fraction": finite(layer_fractions),
        "head_low_frequency_fraction": [finite(row) for row in head_fractions],
        "files": {"png": "spectrum.png", "npz": "spectrum.npz"},
        "git_sha": git_sha(),
    }
    (out_dir / "spectrum.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary
