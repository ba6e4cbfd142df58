"""Document masking (fope_lm.nn.documents, the model's `doc_ids`): a packed row scores each of its documents exactly as
if it were run alone, for every registered position encoding; the target after an EOS stays scored; flash-attn's
varlen path gets the documents' offsets (checked here with a reference kernel standing in for flash-attn)."""

import pytest
import torch
import torch.nn.functional as F

from fope_lm.nn.attention import _flash_attention, _flash_fits, causal_attention
from fope_lm.nn.documents import Documents, cumulative_lengths, document_ids, document_positions
from fope_lm.position import EncodingSpec, available, build_position_encoding

from helpers.models import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = 0
# two packed rows of 40 tokens: [A (17, EOS-terminated) | B (23, cut by the row's end)] and [C (5) | D (30) | E (5)]
LENGTHS = [[17, 23], [5, 30, 5]]


def packed_rows(generator: torch.Generator) -> torch.Tensor:
    rows = []
    for lengths in LENGTHS:
        documents = [torch.randint(1, 256, (n,), generator=generator) for n in lengths]
        for document in documents[:-1]:
            document[-1] = EOS  # a document ends with its EOS; the row's last one may be cut short
        rows.append(torch.cat(documents))
    return torch.stack(rows)


def test_ids_positions_and_offsets_of_a_packed_row():
    tokens = torch.tensor([[5, 0, 7, 8, 0, 0, 3], [0, 1, 2, 3, 4, 5, 6]])
    ids = document_ids(tokens, EOS)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]  # an EOS shares the id of the document it ends
    assert document_positions(ids).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]]
    assert cumulative_lengths(ids).tolist() == [0, 2, 5, 6, 7, 8, 14]  # each row starts a document of its own
    documents = Documents.of_tokens(tokens, EOS)
    assert torch.equal(documents.ids, ids) and documents.cu_seqlens.dtype == torch.int32


def assert_each_document_as_if_alone(model, rows: torch.Tensor, packed: torch.Tensor) -> None:
    """The packed rows' logits of each document equal the logits of that document run alone."""
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            alone = model(rows[row : row + 1, start : start + n]).logits[0]
            torch.testing.assert_close(packed[row, start : start + n], alone, rtol=0, atol=1e-4)
            start += n


@pytest.mark.parametrize("pe", available())
def test_each_document_of_a_packed_row_scores_as_if_alone(pe):
    """The defaults (document_mask, restart_positions): every token's logits are those of its document run alone,
    beyond the training length (32) too; and the loss keeps the target after each EOS (OLMo's choice)."""
    torch.manual_seed(0)
    model = tiny(pe, n_kv_heads=2).eval()
    if pe == "cope":  # position embeddings start at zero: give them values, so that masking the gates matters
        for encoding in model.position_encodings():
            torch.nn.init.normal_(encoding.pos_emb)
    rows = packed_rows(torch.Generator().manual_seed(1))
    documents = Documents.of_tokens(rows, EOS)
    with torch.no_grad():
        packed = model(rows, doc_ids=documents).logits
        assert_each_document_as_if_alone(model, rows, packed)
        # without the mask the documents see each other: the same rows, other logits
        assert (model(rows).logits - packed).abs().amax() > 1e-3
        labels = torch.roll(rows, -1, dims=1)
        labels[:, -1] = -100
        out = model(rows, labels, doc_ids=documents.ids, reduction="sum")
        expected = F.cross_entropy(packed.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        assert int(out.n_targets) == 2 * 39  # the targets after an EOS (a next document's first token) stay scored
        torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-4)


ROTARY = [pe for pe in available() if EncodingSpec.of(pe).is_rotary]
DYNAMIC = {"yarn": {"scaling": "yarn", "dynamic": True}, "dynamic_ntk": {"scaling": "dynamic_ntk", "scale": 2.0}}


@pytest.mark.parametrize("scaling", DYNAMIC)
@pytest.mark.parametrize("pe", ROTARY)
def test_dynamic_scaling_scales_each_document_for_its_own_length(pe, scaling):
    """Dynamic length scaling (its factor follows the length run) in a packed row with restarting positions: each
    document is scaled for its own length, exactly as when it is run alone, not for the row's (L0 = 8 < every
    document but the 5-token ones, so the scale differs per document)."""
    torch.manual_seed(0)
    model = tiny(pe, max_seq_len=8, pe_options=DYNAMIC[scaling]).eval()
    rows = packed_rows(torch.Generator().manual_seed(3))
    with torch.no_grad():
        packed = model(rows, doc_ids=Documents.of_tokens(rows, EOS)).logits
        assert_each_document_as_if_alone(model, rows, packed)


def test_masking_and_restarting_are_separate_switches():
    """Mask without restarting: relative encodings (RoPE) give the same logits, FIRE (normalised by the absolute
    query position) others; restart without the mask: positions per document, attention across them."""
    torch.manual_seed(0)
    rows = packed_rows(torch.Generator().manual_seed(2))
    documents = Documents.of_tokens(rows, EOS)
    with torch.no_grad():
        rope = tiny("rope").eval()
        torch.testing.assert_close(
            rope(rows, doc_ids=documents, restart_positions=False).logits, rope(rows, doc_ids=documents).logits, rtol=0, atol=1e-4
        )
        fire = tiny("fire", pe_options={"init_length": 8.0}).eval()  # a threshold below the rows' positions (default 512)
        assert (fire(rows, doc_ids=documents, restart_positions=False).logits - fire(rows, doc_ids=documents).logits).abs().amax() > 1e-4
        restarted = rope(rows, doc_ids=documents, document_mask=False).logits
        positions = document_positions(documents.ids)
        x = rope.embed(rows)
        for block in rope.blocks:  # the blocks at per-token positions, attending causally over the whole row
            x = block(x, positions)
        torch.testing.assert_close(restarted, rope.lm_head(rope.norm(x)).float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache continues one sequence"):
        from fope_lm.nn.kv_cache import KVCache

        rope(rows, doc_ids=documents, kv_cache=KVCache(2))


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, causal, alibi_slopes):
    """flash_attn_varlen_func's contract on the CPU: (total, heads, D) tokens, sequence i at cu[i]:cu[i+1], keys of
    fewer heads shared by groups of query heads, causal within each sequence."""
    assert cu_q is cu_k and causal and cu_q.dtype == torch.int32 and max_q == max_k
    outputs = []
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        assert end - start <= max_q
        seq = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (heads, n, D)
        groups = q.shape[1] // k.shape[1]
        keys, values = (t.repeat_interleave(groups, dim=0) for t in seq[1:])
        outputs.append(F.scaled_dot_product_attention(seq[0], keys, values, is_causal=True).transpose(0, 1))
    return torch.cat(outputs)


def test_flash_varlen_path_gets_every_document_as_a_sequence():
    torch.manual_seed(0)
    rows = packed_rows(torch.Generator().manual_seed(3))
    documents = Documents.of_tokens(rows, EOS)
    q = torch.randn(2, 4, 40, 16)
    k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    rope = build_position_encoding("rope", head_dim=16, n_heads=4, n_kv_heads=2, max_seq_len=32)
    index = torch.arange(40)
    sdpa = causal_attention(q, k, v, rope, q_index=index, k_index=index, documents=documents)
    flash = _flash_attention(q, k, v, rope, documents, (None, reference_varlen))
    torch.testing.assert_close(flash, sdpa, rtol=1e-5, atol=1e-5)
    # which inputs go to flash-attn (on CUDA, 16-bit): no bias or ALiBi's, and documents only with their offsets
    alibi = build_position_encoding("alibi", head_dim=16, n_heads=4, max_seq_len=32)
    fire = build_position_encoding("fire", head_dim=16, n_heads=4, max_seq_len=32)
    fits = lambda pe, docs, per_token=False: _flash_fits(FakeCuda(), pe, docs, per_token_positions=per_token)  # noqa: E731
    assert fits(rope, documents) and fits(alibi, documents, per_token=True) and fits(rope, None)
    assert not fits(rope, Documents(documents.ids)) and not fits(fire, None) and not fits(alibi, None, per_token=True)
    assert not _flash_fits(q, rope, None, per_token_positions=False)  # float32 on the CPU: SDPA


class FakeCuda:
    is_cuda = True
    dtype = torch.bfloat16
