"""train.compile=true: the tiny FoPE model, torch.compile'd (inductor, C++ kernels on this CPU), follows the eager run.

Two real train.py launches with the same seed and batches: every logged train loss and both validation losses
(an in-loop eval, no_grad: another compiled graph) agree to float noise, and the loss really falls. A fresh
inductor cache shows that the compiled run, and only it, built kernels (cold, as on CI: about a minute here).
"""

import pytest
from test_train import TINY, data_root, launch, runs, trajectory  # noqa: F401 (data_root, runs: fixtures)

STEPS = 24


@pytest.mark.slow
def test_compiled_training_follows_eager(data_root, runs, tmp_path, monkeypatch):  # noqa: F811
    kernels = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(kernels))  # launch() passes the environment on
    trajectories = {}
    for compile in (False, True):
        name = f"compile-{str(compile).lower()}"
        args = [*TINY, "+pe=fope", f"train.max_steps={STEPS}", "train.eval_interval=12", f"train.compile={str(compile).lower()}"]
        launch([*args, f"run_name={name}"], data_root=data_root, runs=runs)
        trajectories[compile] = trajectory(runs / name)
        assert any(kernels.rglob("*.so")) == compile  # C++ kernels built by inductor

    eager, compiled = trajectories[False], trajectories[True]
    assert [step for step, *_ in compiled] == [step for step, *_ in eager] == list(range(1, STEPS + 1))
    train_losses = [(e[1], c[1]) for e, c in zip(eager, compiled)]
    assert max(abs(e - c) for e, c in train_losses) < 1e-4, train_losses
    val_losses = [(e[3], c[3]) for e, c in zip(eager, compiled) if e[3] is not None]
    assert len(val_losses) == 2 and max(abs(e - c) for e, c in val_losses) < 1e-4, val_losses
    # it trains: from ~ln(8192) = 9.0 down by more than a nat (measured eager: 1.74 .. 2.36 over seeds 0-2)
    assert compiled[-1][1] < compiled[0][1] - 1.0
