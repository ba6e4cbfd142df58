"""No host tensor in any forward, for every registered position encoding: a model built on the meta device runs a
training forward and backward (full and chunked loss), a forward over packed documents and a KV-cached decode step.

On the meta device a tensor created on the host inside a forward and combined with the model's tensors raises
("Tensor on device meta is not on the expected device cpu"), so each forward passing is the check. It is the same
failure a model built or moved onto a GPU would meet (`with torch.device("cuda"): build_model(...)`), found on a CPU.
"""

import pytest
import torch

from fope_lm.nn.documents import Documents
from fope_lm.nn.kv_cache import KVCache
from fope_lm.nn.model import Transformer, build_model
from fope_lm.position import available

pytestmark = pytest.mark.usefixtures("one_thread")


def meta_model(pe: str) -> Transformer:
    """The tiny model with grouped-query attention (the general case) built on the meta device."""
    with torch.device("meta"):
        model = build_model("tiny", pe=pe, vocab_size=256, max_seq_len=32, n_kv_heads=2)
    return model


def packed_rows() -> torch.Tensor:
    """Two rows of 33 tokens on the host holding five documents (EOS = 0)."""
    ids = torch.randint(1, 256, (2, 33))
    ids[0, [9, 20]] = 0
    ids[1, [4, 30]] = 0
    return ids


@pytest.mark.parametrize("pe", available())
def test_forwards_create_no_host_tensor(pe):
    model = meta_model(pe)
    on_host = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.device.type != "meta"]
    assert not on_host, f"built under torch.device('meta') but on the host: {on_host}"
    host = packed_rows()
    ids = host.to("meta")
    inputs, labels = ids[:, :-1], ids[:, 1:]

    # (a) training: the loss as the trainer asks for it, whole and in chunks, and its backward
    for chunk in (None, 8):
        loss = model(inputs, labels, reduction="sum", loss_chunk_size=chunk).loss
        assert loss.device.type == "meta" and loss.shape == ()
        loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())

    # (b) packed documents: found on the host (as the trainer does), then moved (cu_seqlens too)
    documents = Documents.of_tokens(host[:, :-1], eos_id=0).to("meta")
    assert model(inputs, labels, doc_ids=documents).loss.device.type == "meta"

    # (c) a KV-cached decode step after a prefill
    cache = KVCache(model.config.n_layers)
    with torch.no_grad():
        model(inputs[:, :20], kv_cache=cache)
        logits = model(inputs[:, 20:21], start_pos=20, kv_cache=cache).logits
    assert logits.device.type == "meta" and logits.shape == (2, 1, model.config.padded_vocab_size) and cache.length == 21
