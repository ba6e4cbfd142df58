"""AdamW with OLMo's parameter groups, and the learning-rate schedule as a pure function of the step.

The schedule has no state: a resumed run gets the same learning rate from the step counter alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fope_lm.training.config import OptimSection


def parameter_groups(model: nn.Module, settings: OptimSection) -> list[dict]:
    """Weight decay on Linear weights (not biases); norms and embeddings decay only when asked (OLMo's default: neither).

    Everything else that trains (e.g. learnable FoPE coefficients) is not decayed, like OLMo's norms.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()  # tied weights appear under two modules
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, nn.Linear):
                wants_decay = param.ndim >= 2  # weights; biases (FoX's gate, FIRE's MLP) do not decay
            elif isinstance(module, nn.Embedding):
                wants_decay = settings.decay_embeddings
            else:
                wants_decay = settings.decay_norms and param.ndim == 1
            (decay if wants_decay else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, settings: OptimSection) -> torch.optim.AdamW:
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        parameter_groups(model, settings),
        lr=settings.lr,
        betas=(settings.betas[0], settings.betas[1]),
        eps=settings.eps,
        fused=on_cuda,  # one kernel per step on GPU; the foreach default elsewhere
    )


def learning_rate(step: int, *, peak: float, warmup_steps: int, max_steps: int, alpha_f: float) -> float:
    """The LR of optimizer step `step` (1-based): linear warmup to `peak` over `warmup_steps`, then cosine decay
    to `alpha_f * peak` at `max_steps` (held there if training goes on)."""
    if step <= warmup_steps:
        return peak * step / warmup_steps
    floor = alpha_f * peak
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
