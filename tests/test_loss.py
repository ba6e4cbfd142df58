"""The training loss over the LM head in chunks of token rows (`Transformer.forward`'s `loss_chunk_size`, by default
LOSS_CHUNK_ELEMENTS // V rows), with each chunk's gradients computed in forward (`ChunkedLinearCrossEntropy`) or, for a
head weight that is not all here, recomputed in backward: the same loss and gradients as the whole (B*T, V) float32
logits; and the choice of liger-kernel's fused kernel, which needs CUDA (only the choice is tested here)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fope_lm.bench import loss_memory
from fope_lm.nn import model as model_module
from fope_lm.nn.model import default_loss_chunk_size, fused_linear_cross_entropy

from helpers.models import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(rows: int = 3, length: int = 50, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels with ignored targets: a row's first positions, and a whole row."""
    ids = torch.randint(0, vocab, (rows, length))
    labels = ids.roll(-1, 1)
    labels[0, :5] = -100
    labels[1] = -100
    return ids, labels


def whole_logits_loss(model, ids, labels, reduction):
    """The reference: every (B*T, V) float32 logit at once, then the cross-entropy."""
    logits = model(ids).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction=reduction)


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("path", ["grads_in_forward", "recomputed"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [16, 37, None], ids=["chunk16", "chunk37", "default"])
def test_chunked_loss_equals_whole_logits(path, tied, reduction, chunk, monkeypatch):
    """Loss and every parameter's gradient (the tied embedding's, fed by the head and the input, included) within
    1e-6 of the whole-logits computation, fp32; chunks of rows that cross rows of the batch and do not divide it.

    Both are float32 sums in different orders: the loss within 1e-6 relative (measured: at most 1 ulp, 1.2e-7), the
    gradients within 1e-6 per target token (the mean's as they are, the sum's divided by the 95 targets; measured: at
    most 6e-8, i.e. a few ulps of the largest gradient, ~10 for the sum)."""
    if chunk is None:  # the default chunk, shrunk so that 150 rows of V = 256 take several: 4096 // 256 = 16 rows
        monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 4096)
    model = tiny("rope", tie_embeddings=tied)
    if path == "recomputed":  # as for a weight sharded outside lm_head's call: each chunk through lm_head, checkpointed
        monkeypatch.setattr(model, "_head_weight_is_here", lambda: False)
    ids, labels = batch()
    expected, expected_grads = loss_and_grads(model, lambda: whole_logits_loss(model, ids, labels, reduction))
    out = model(ids, labels, loss_chunk_size=chunk, reduction=reduction)
    assert out.logits is None and int(out.n_targets) == 3 * 50 - 5 - 50
    loss, grads = loss_and_grads(model, lambda: model(ids, labels, loss_chunk_size=chunk, reduction=reduction).loss)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert grads.keys() == expected_grads.keys() and ("lm_head.weight" in grads) != tied
    per_token = int(out.n_targets) if reduction == "sum" else 1
    for name, grad in grads.items():
        torch.testing.assert_close(grad / per_token, expected_grads[name] / per_token, rtol=0, atol=1e-6, msg=name)


def test_default_chunk_is_sized_by_the_vocabulary():
    assert default_loss_chunk_size(50304) == 2**26 // 50304 == 1334  # 256 MiB of float32 logits per chunk
    assert default_loss_chunk_size(256) == 2**18 and default_loss_chunk_size(2**30) == 1
    model = tiny("rope")
    ids, labels = batch()
    with torch.no_grad():  # 150 rows fit one default chunk of V = 256: the whole logits, returned
        out = model(ids, labels)
    assert out.logits is not None and out.logits.shape == (3, 50, 256)


def test_no_grad_chunks_and_all_ignored_targets():
    model = tiny("rope")
    ids, labels = batch()
    with torch.no_grad():
        chunked = model(ids, labels, loss_chunk_size=7, reduction="sum").loss
        torch.testing.assert_close(chunked, whole_logits_loss(model, ids, labels, "sum"), rtol=1e-6, atol=1e-6)
        nothing = model(ids, torch.full_like(labels, -100), loss_chunk_size=7)
    assert float(nothing.loss) == 0.0 and int(nothing.n_targets) == 0


# --- liger-kernel's fused linear cross-entropy: chosen only where it can run ---------------------------------------


def fake_liger(monkeypatch) -> object:
    """A stand-in for liger_kernel.transformers.functional in sys.modules: what the lookup imports."""
    fused = object()
    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = fused  # type: ignore[attr-defined]
    for name, module in (
        ("liger_kernel", types.ModuleType("liger_kernel")),
        ("liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")),
        ("liger_kernel.transformers.functional", functional),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return fused


def test_fused_loss_is_looked_up_only_with_cuda(monkeypatch):
    fused = fake_liger(monkeypatch)
    assert not torch.cuda.is_available() and fused_linear_cross_entropy() is None  # installed, but no CUDA
    assert tiny("rope").fused_loss is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fused_linear_cross_entropy() is fused and tiny("rope").fused_loss is fused
    model = tiny("rope")
    model.use_fused_loss(False)
    assert model.fused_loss is None
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)  # CUDA, but not installed
    assert fused_linear_cross_entropy() is None


def test_fused_loss_applies_to_cuda_training_rows_with_the_whole_weight():
    model = tiny("rope")
    with FakeTensorMode():  # CUDA tensors' metadata, no CUDA needed
        cuda_rows = torch.empty(6, model.config.d_model, device="cuda")
    cpu_rows = torch.empty(6, model.config.d_model)
    assert not model._fuses_loss(cuda_rows)  # nothing installed
    model.fused_loss = lambda *args, **kwargs: None
    assert model._fuses_loss(cuda_rows) and not model._fuses_loss(cpu_rows)
    with torch.no_grad():  # no gradient: plain chunks cost no more
        assert not model._fuses_loss(cuda_rows)
    model.lm_head.weight = torch.nn.Parameter(torch.empty(0))  # as a sharded parameter looks outside its module's call
    assert not model._fuses_loss(cuda_rows) and not model._head_weight_is_here()


def test_fused_loss_gets_rows_weight_and_targets_as_liger_takes_them(monkeypatch):
    """The call the forward makes, with a CPU stand-in for the kernel: liger's (input, weight, target, ignore_index=,
    reduction=) signature, the summed loss, then the forward's own reduction."""
    model = tiny("rope", tie_embeddings=True)
    ids, labels = batch()
    calls = []

    def fused(rows, weight, targets, *, ignore_index, reduction):
        calls.append((rows.shape, weight is model.embed.weight, targets.shape, ignore_index, reduction))
        return F.cross_entropy(rows @ weight.T, targets, ignore_index=ignore_index, reduction=reduction)

    model.fused_loss = fused
    monkeypatch.setattr(model, "_fuses_loss", lambda rows: True)
    out = model(ids, labels)
    assert calls == [((150, 128), True, (150,), -100, "sum")] and out.logits is None
    expected, expected_grads = loss_and_grads(model, lambda: whole_logits_loss(model, ids, labels, "mean"))
    loss, grads = loss_and_grads(model, lambda: model(ids, labels).loss)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_loss_memory_bench_counts_less_with_chunks():
    """The benchmark at toy sizes (tests/test_bench.py's rule: every script runs, so that it cannot rot). The counted
    peak is exact, so the chunked loss's smaller peak holds on any machine."""
    rows = loss_memory.main(["--preset", "tiny", "--shapes", "2x128,2x256", "--vocab", "4096", "--chunk", "32", "--repeats", "0"])
    assert [(r["batch"], r["seq_len"]) for r in rows] == [(2, 128), (2, 256)]
    for row in rows:
        assert row["peak_mib"]["chunked"] < row["peak_mib"]["whole"] and row["ratio"] < 1
        assert row["loss_difference"] < 1e-5
