"""FoPE (Hua et al. 2025), exactly as the paper's official code computes it, plus its ablation switches.

Each key/value head (each attention head, when there are as many: the official code) treats every kept RoPE
frequency as a Fourier series over all kept frequencies, shared by the query heads of its group:
  c_{h,j}(t) = sum_k cos(w_k t) C_cos[h,k,j],   s_{h,j}(t) = sum_k sin(w_k t) C_sin[h,k,j]
for the first d_out = min(K, head_dim/4) pairs; the remaining pairs get c = s = pad_value (1 in the
official code: position-free channels with a 2x logit weight). Frequencies with a period longer than the
training length (w < 2*pi/L) are clipped to zero and dropped. The coefficients are random (Xavier +
identity/step-identity E) and frozen by default; the (H, T, head_dim/2) tables are computed per forward from
the positions (two small einsums), which the compiler fuses. Length scaling (FoPE+YaRN, the official behaviour
with scale > 1, and the other methods of fope_lm.position.scaling) applies to the K kept frequencies.

Ablations (defaults = the official method; configs/pe/fope_*.yaml):
  clip=False      keep and mix every RoPE frequency, K = head_dim/2 (no floor at 2*pi/L);
  mix=False       C_cos = C_sin = E exactly (no random mixing); padding and slot cap unchanged;
  slot_cap=False  d_out = K Fourier slots instead of min(K, head_dim/4);
  learnable=True  train the coefficients (Parameters);
  pad_value=0     zero the pairs beyond the slots instead of c = s = 1.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from fope_lm.position.base import RotaryEncoding, rope_inv_freq
from fope_lm.position.registry import register


def kept_frequencies(head_dim: int, theta: float, max_seq_len: int) -> torch.Tensor:
    """RoPE's frequencies with every w < 2*pi/L (strictly) removed; the kept ones stay highest first."""
    inv_freq = rope_inv_freq(head_dim, theta)
    return inv_freq[inv_freq >= 2 * math.pi / max_seq_len]


def step_eye(n_freqs: int, n_slots: int) -> torch.Tensor:
    """Identity if square, else E[j*s, j] = 1 with step s = ceil(K / d_out), for every j*s < K."""
    if n_freqs == n_slots:
        return torch.eye(n_freqs, device="cpu")
    eye = torch.zeros(n_freqs, n_slots, device="cpu")
    step = math.ceil(n_freqs / n_slots)
    for j in range(n_slots):
        if j * step < n_freqs:
            eye[j * step, j] = 1.0
    return eye


@register("fope")
class FourierPositionEncoding(RotaryEncoding):
    cos_coef: torch.Tensor  # (H_kv, K, d_out): a buffer, or a Parameter when learnable
    sin_coef: torch.Tensor

    def __init__(
        self,
        *,
        sigma: float = 0.3,
        pad_value: float = 1.0,
        learnable: bool = False,
        clip: bool = True,
        mix: bool = True,
        slot_cap: bool = True,
        **options,
    ):
        super().__init__(**options)
        self.sigma = float(sigma)
        self.pad_value = float(pad_value)
        self.learnable = bool(learnable)
        self.clip, self.mix, self.slot_cap = bool(clip), bool(mix), bool(slot_cap)
        full = self.head_dim // 2
        self.n_freqs = kept_frequencies(self.head_dim, self.theta, self.max_seq_len).numel() if self.clip else full  # K
        self.n_slots = min(self.n_freqs, self.head_dim // 4) if self.slot_cap else self.n_freqs  # d_out
        shape = (self.n_kv_heads, self.n_freqs, self.n_slots)  # per key/value head, shared by its query group
        for coef_name in ("cos_coef", "sin_coef"):
            coef = torch.empty(shape)
            if self.learnable:
                self.register_parameter(coef_name, nn.Parameter(coef))
            else:  # buffers, not frozen Parameters: ZeRO-3 would partition Parameters
                self.register_buffer(coef_name, coef, persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        eye = step_eye(self.n_freqs, self.n_slots)
        with torch.no_grad():
            for coef in (self.cos_coef, self.sin_coef):  # independent draws per tensor and per layer
                if self.mix:
                    nn.init.xavier_normal_(coef, gain=self.sigma)
                    coef.add_(eye.to(coef.device))
                else:
                    coef.copy_(eye.to(coef.device))

    def unscaled_frequencies(self, theta, device="cpu"):
        """The K frequencies w_k the Fourier series run over: RoPE's above the floor 2*pi/L (the first K, K fixed
        at the training length and base), or all of them."""
        return super().unscaled_frequencies(theta, device)[..., : self.n_freqs]

    def rotary_frequencies(self, dynamic_len=None):
        return self.inv_freq(dynamic_len)

    def tables(self, positions, dynamic_len):
        freqs, factor = self.frequencies(dynamic_len, positions.device)
        angles = positions[..., None] * freqs  # (..., T, K), float32
        cos = torch.einsum("...tk,hkj->...htj", angles.cos(), self.cos_coef.float())  # (..., H, T, d_out)
        sin = torch.einsum("...tk,hkj->...htj", angles.sin(), self.sin_coef.float())
        pad = cos.new_full((*cos.shape[:-1], self.head_dim // 2 - self.n_slots), self.pad_value)
        if isinstance(factor, torch.Tensor):  # per token (..., T, 1): broadcast over the heads axis
            factor = factor.unsqueeze(-3)
        return torch.cat((cos, pad), -1) * factor, torch.cat((sin, pad), -1) * factor

    def transfer_state(self, state, *, expand=False):
        """Copy coefficients saved at another length into the top-left corner of this module's tensors.

        New entries are zero, or keep this module's fresh initialisation with `expand`. Zero output columns
        turn pairs that were trained as pad-value channels into c = s = 0, so that case warns.
        """
        notes = []
        for coef_name in ("cos_coef", "sin_coef"):
            source = state[coef_name]
            target = getattr(self, coef_name)
            if source.shape == target.shape:
                with torch.no_grad():
                    target.copy_(source)
                continue
            n_freqs, n_slots = min(source.shape[1], target.shape[1]), min(source.shape[2], target.shape[2])
            with torch.no_grad():
                if not expand:
                    target.zero_()
                target[:, :n_freqs, :n_slots] = source[:, :n_freqs, :n_slots].to(target)
            notes.append(f"{coef_name}: copied {tuple(source.shape)} into the corner of {tuple(target.shape)}")
            if not expand and target.shape[2] > source.shape[2]:
                notes.append(
                    f"{coef_name}: output slots {source.shape[2]}..{target.shape[2] - 1} are zero-filled, so those "
                    f"pairs (trained with pad value {self.pad_value:g}) now get c = s = 0; use expand to initialise them"
                )
        for note in notes:
            if "zero-filled" in note:
                warnings.warn(note, stacklevel=2)
        return notes

    def extra_repr(self) -> str:
        parts = [f"K={self.n_freqs}", f"d_out={self.n_slots}", f"sigma={self.sigma:g}", f"pad={self.pad_value:g}"]
        parts += ["learnable" if self.learnable else "frozen"]
        switches = {"clip": self.clip, "mix": self.mix, "slot-cap": self.slot_cap}
        parts += [f"no-{name}" for name, on in switches.items() if not on]  # ablations
        if self.scaling.active:
            parts.append(self.scaling.describe())
        return ", ".join(parts)
