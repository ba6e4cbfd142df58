"""The KV cache of incremental decoding: what each layer keeps of the tokens already run."""

from __future__ import annotations

import torch


class KVCache:
    """Rotated keys and values of every layer, (B, H_kv, T_cached, Dh) each, and the position encoding's token state
    (B, S, T_cached) where it has one (FoX's forget gates). Updates concatenate, never write in place, so `branch`
    can hand several continuations the same prefix."""

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.states: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached_k, cached_v = self.keys[layer], self.values[layer]
        if cached_k is not None and cached_v is not None:
            k = torch.cat((cached_k, k), dim=2)
            v = torch.cat((cached_v, v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def update_state(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        cached = self.states[layer]
        state = state if cached is None else torch.cat((cached, state), dim=-1)
        self.states[layer] = state
        return state

    def branch(self) -> KVCache:
        """A cache that continues this one's prefix on its own: it shares the prefix tensors (never written in place)
        but not the per-layer lists, so extending it leaves this one as it is."""
        branch = KVCache(0)
        branch.keys, branch.values, branch.states = list(self.keys), list(self.values), list(self.states)
        return branch
