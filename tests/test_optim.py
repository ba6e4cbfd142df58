"""fope_lm.training.optim: the learning-rate schedule and OLMo's parameter groups."""

from __future__ import annotations

import pytest
import torch

from fope_lm.training.optim import learning_rate, parameter_groups


def test_schedule_warms_up_then_decays_to_the_floor():
    lr = lambda step: learning_rate(step, peak=1.0, warmup_steps=10, max_steps=110, alpha_f=0.1)  # noqa: E731
    assert [lr(s) for s in (1, 5, 10)] == [0.1, 0.5, 1.0]
    assert lr(60) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))


def test_parameter_groups_follow_olmo(plan_with):
    from fope_lm.nn.model import Transformer

    learnable_fope = plan_with("+pe=fope", "pe.learnable=true")
    model = Transformer(learnable_fope.model_config)
    optim = learnable_fope.config.optim
    decay, no_decay = parameter_groups(model, optim)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    optim.decay_norms = optim.decay_embeddings = True
    decay, no_decay = parameter_groups(model, optim)  # learnable FoPE coefficients are never decayed
    assert {id(p) for p in no_decay["params"]} == {id(p) for pe in model.position_encodings() for p in pe.parameters()}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
