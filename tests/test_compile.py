"""The model compiles whole, for every registered position encoding: one graph with no breaks (training forward,
full and chunked loss, packed documents), no host reads in forward and backward, and torch.compile(fullgraph=True) of forward +
backward, of an eval forward at 4x the training length and of KV-cached decoding, each equal to eager. The train
step reads the device once. A new PE cannot regress this: the tests run over the registry.

fullgraph is checked with the aot_eager backend (dynamo + AOTAutograd, the parts that break graphs), which traces in
seconds; inductor's code generation is exercised by test_train.py's compiled training run."""

import pytest
import torch

from fope_lm.bench.graphs import HostReads, graph_breaks
from fope_lm.nn.documents import Documents
from fope_lm.nn.kv_cache import KVCache
from fope_lm.position import available

from helpers.models import tiny

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # ~3 min over the registry


def packed_rows() -> tuple[torch.Tensor, Documents]:
    """Two rows of 32 tokens holding five documents (EOS = 0), with their documents as the trainer passes them."""
    ids = torch.randint(1, 256, (2, 33))
    ids[0, [9, 20]] = 0
    ids[1, [4, 30]] = 0
    return ids, Documents.of_tokens(ids[:, :-1], eos_id=0)


def training_forwards(documents: Documents) -> list[dict]:
    """The training forward's variants: full loss, chunked loss, packed documents (masked, positions restarting)."""
    return [{}, {"loss_chunk_size": 8}, {"doc_ids": documents}]


@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("pe", available())
def test_training_forward_is_one_graph_without_host_reads(pe, n_kv_heads):
    model = tiny(pe, n_kv_heads=n_kv_heads)
    ids, documents = packed_rows()
    inputs, labels = ids[:, :-1], ids[:, 1:]
    for kwargs in training_forwards(documents):
        report = graph_breaks(model, inputs, labels, **kwargs)
        assert (report["graphs"], report["breaks"]) == (1, 0), report["reasons"]
        with HostReads() as reads:
            model(inputs, labels, **kwargs).loss.backward()
        assert reads.count == 0


# Each PE once, with grouped-query attention (the general case: MHA is H_kv = H), which the graph test above covers too.
@pytest.mark.parametrize("pe", available())
def test_fullgraph_compile_trains_evaluates_long_and_decodes(pe):
    torch._dynamo.reset()
    model = tiny(pe, n_kv_heads=2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, documents = packed_rows()
    for kwargs in ({}, {"doc_ids": documents}):  # the chunked loss does not depend on the PE: the graph test has it
        eager = model(ids[:, :-1], ids[:, 1:], **kwargs).loss
        loss = compiled(ids[:, :-1], ids[:, 1:], **kwargs).loss
        loss.backward()
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        long = torch.randint(0, 256, (1, 4 * model.config.max_seq_len))  # 4x the training length
        torch.testing.assert_close(compiled(long).logits, model(long).logits, rtol=1e-4, atol=1e-4)
        step = torch.compile(model.hidden_states, fullgraph=True, backend="aot_eager")
        prompt, new = ids[:, :20], ids[:, 20:24]
        caches = KVCache(model.config.n_layers), KVCache(model.config.n_layers)
        model.hidden_states(prompt, kv_cache=caches[0], dynamic_len=24)
        model.hidden_states(prompt, kv_cache=caches[1], dynamic_len=24)
        for i in range(new.shape[1]):  # KV-cached decode steps, compiled and eager
            token, start = new[:, i : i + 1], caches[0].length
            ours = step(token, start_pos=start, kv_cache=caches[0], dynamic_len=24)
            theirs = model.hidden_states(token, start_pos=start, kv_cache=caches[1], dynamic_len=24)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_the_train_step_reads_the_device_once(isolated_trainer, monkeypatch):
    trainer = isolated_trainer("+pe=fope")
    tolist_calls = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: tolist_calls.append(self.shape) or tolist(self))
    reads, optimizer_step = HostReads(), trainer.optimizer.step

    def step_paused():  # AdamW keeps its step counters on the host by design: not the model's reads
        with reads.paused():
            optimizer_step()

    monkeypatch.setattr(trainer.optimizer, "step", step_paused)
    with reads:
        result = trainer.train_step(1)
    assert reads.count == 0 and tolist_calls == [torch.Size([5])]  # loss, stop votes, filtered rows, target count, grad norm
    assert result.grad_norm is not None and result.grad_norm > 0 and not result.stop
