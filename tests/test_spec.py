"""fope_lm.position.spec and .scaling: the one place that decides anything encoding-specific. Options are typed against
the encoding's constructor, eval-time scaling keeps the trained options, labels and transformers' rope_parameters come
from the spec, and only encodings that say so themselves export as Llama's rotary."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from fope_lm.errors import ConfigError
from fope_lm.nn.model import build_model
from fope_lm.position import EncodingSpec, LinearDistanceBias, ScalingOptions, available, build_position_encoding
from fope_lm.position.alibi import alibi_slopes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "name,options,words",
    [
        ("fope", {"sigma": "big"}, "sigma='big' must be float"),
        ("fope", {"learnable": 1}, "learnable=1 must be bool"),
        ("rope", {"scale": None}, "scale=None must be float"),
        ("alibi", {"scale": 2.0}, "has no option(s) scale"),
        ("rope", {"scaling": "linear", "dynamic": True}, "dynamic=true is YaRN's"),
        ("rope", {"scaling": "abf"}, "scaling=abf takes the new base"),
        ("rope", {"scaling": "cubic"}, "scaling='cubic' is not one of none, yarn, linear, ntk, dynamic_ntk, abf"),
        ("nosuch", {}, "unknown position encoding 'nosuch'"),
    ],
)
def test_a_spec_refuses_what_its_encoding_cannot_take(name, options, words):
    with pytest.raises(ConfigError) as error:
        EncodingSpec.of(name, options)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_ints_are_floats_and_nulls_are_defaults():
    assert EncodingSpec.of("fope", {"sigma": 0, "original_max_seq_len": None}).options == {"sigma": 0, "original_max_seq_len": None}
    assert EncodingSpec.of("yarn").scaling(max_seq_len=64).label() == "yarn(s=16)"  # the class's own defaults
    assert EncodingSpec.of("rope", {"scale": 4}).scaling(max_seq_len=64).method == "yarn"  # method null: yarn when scaled


def test_eval_time_scaling_keeps_the_trained_options_and_names_itself():
    trained = EncodingSpec.of("fope", {"sigma": 0.1, "original_max_seq_len": 256})
    dynamic = trained.with_eval_scaling(ScalingOptions(method="yarn", dynamic=True), max_seq_len=512)
    assert dynamic.label() == "fope+yarn(dynamic)" and dynamic.options["sigma"] == 0.1
    assert dynamic.options["original_max_seq_len"] == 256  # L0: where the rotary weights were first trained
    assert dynamic.eval_scaling.record() == {
        "method": "yarn", "scale": 1.0, "original_max_seq_len": 256, "dynamic": True, "attention_factor": None,
        "beta_fast": 32.0, "beta_slow": 1.0, "base": None,
    }  # fmt: skip
    assert (
        EncodingSpec.of("rope").with_eval_scaling(ScalingOptions(method="abf", base=5e5), max_seq_len=64).label() == "rope+abf(base=500000)"
    )
    assert EncodingSpec.of("rope_clip").with_eval_scaling(ScalingOptions(method="linear", scale=4), max_seq_len=64).label() == (
        "rope_clip+linear(s=4)"
    )
    assert EncodingSpec.of("alibi").with_eval_scaling(ScalingOptions(method="none"), max_seq_len=64).label() == "alibi"
    with pytest.raises(ConfigError, match="rescales rotary encodings; this checkpoint uses 'alibi'"):
        EncodingSpec.of("alibi").with_eval_scaling(ScalingOptions(method="yarn", scale=2), max_seq_len=64)


def llama_inv_freq(rope: dict, max_position_embeddings: int, head_dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """transformers' own frequencies and attention factor for rope_parameters."""
    config = LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=max_position_embeddings, rope_parameters=rope
    )
    if rope["rope_type"] == "default":  # Llama's own: theta^(-2i/d)
        return 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu", **({"seq_len": seq_len} if seq_len else {}))


@pytest.mark.parametrize(
    "name,options",
    [
        ("rope", {}),
        ("rope", {"scaling": "linear", "scale": 4.0}),
        ("rope", {"scaling": "dynamic_ntk", "scale": 2.0}),
        ("yarn", {"scale": 8.0, "original_max_seq_len": 64}),
        ("rope", {"scaling": "yarn", "scale": 4.0, "attention_factor": 1.0, "beta_fast": 16.0}),
    ],
)
def test_native_rope_parameters_compute_our_frequencies_in_transformers(name, options):
    head_dim, length = 32, 128
    spec = EncodingSpec.of(name, options)
    rope, max_position_embeddings = spec.llama_rope(theta=10000.0, max_seq_len=length)
    pe = spec.build(head_dim=head_dim, n_heads=2, max_seq_len=length)
    seq_len = 3 * length if rope["rope_type"] == "dynamic" else None  # dynamic NTK scales past L0
    theirs, their_factor = llama_inv_freq(rope, max_position_embeddings, head_dim, seq_len)
    ours, our_factor = pe.frequencies(seq_len)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=0)
    assert our_factor == pytest.approx(their_factor, rel=1e-6)
    back = EncodingSpec.of_rope_parameters(rope, max_position_embeddings=max_position_embeddings)
    assert back.scaling(max_seq_len=length).record() == spec.scaling(max_seq_len=length).record()  # the import reads it back


@pytest.mark.parametrize("name", sorted(set(available()) - {"rope", "yarn"}))
def test_only_encodings_that_say_so_export_as_llama_rotary(name):
    """A subclass of rope that changes anything (p_rope, rope_clip, resonance_rope, partial_rope, fox_rope) does not
    inherit rope's exactness; nor do scalings transformers has no rope_type for."""
    assert EncodingSpec.of(name).llama_rope(theta=10000.0, max_seq_len=64) is None
    for options in ({"scaling": "ntk", "scale": 2.0}, {"scaling": "yarn", "dynamic": True}, {"scaling": "abf", "base": 5e5}):
        assert EncodingSpec.of("rope", options).llama_rope(theta=10000.0, max_seq_len=64) is None


def test_a_kernel_computes_alibi_from_a_buffer_that_moves_with_the_model():
    with torch.device("meta"):
        model = build_model("tiny", pe="alibi", vocab_size=256, max_seq_len=32)
    model.to_empty(device="cpu")
    model.reset_parameters()  # a meta-built model gets its values here, the slopes too
    pe = model.position_encodings()[0]
    hint = pe.kernel_bias()
    assert isinstance(hint, LinearDistanceBias) and torch.equal(hint.slopes, alibi_slopes(4)) and hint.slopes.dtype == torch.float32
    assert "slopes" in dict(pe.named_buffers()) and not any("slopes" in key for key in model.state_dict())  # not state
    assert all(
        build_position_encoding(name, head_dim=16, n_heads=4, max_seq_len=32).kernel_bias() is None
        for name in available()
        if name != "alibi"
    )
