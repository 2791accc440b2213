"""resp.structures: the prunable units of a decoder and their parameter counts, by hand on the tiny models
(hidden 24, intermediate 40, 4 layers, 4 query heads of head_dim 8 in 2 KV groups)."""

import pytest
from conftest import make_llama, make_qwen3

from resp.structures import StructureError, default_protected, structures_for


def test_the_papers_protected_layers():
    # the first floor(0.1 * L) layers and the last
    assert default_protected(4) == (3,)
    assert default_protected(20) == (0, 1, 19)
    assert default_protected(36) == (0, 1, 2, 35)


def test_unit_sizes_of_the_tiny_qwen3():
    s = structures_for(make_qwen3(), "query_head")
    assert (s.num_layers, s.protected, s.prunable_layers, s.n_rep, s.attention_units) == (4, (3,), [0, 1, 2], 2, 4)
    assert s.head_params == 2 * 8 * 24 == 384             # q rows + o columns of one head
    assert s.kv_params == 2 * 8 * 24 == 384               # k and v rows of one KV head
    assert s.channel_params == 3 * 24 == 72               # gate row, up row, down column
    # per layer: q 768 + k 384 + v 384 + o 768 + q/k norms 16 + MLP 3 * 960 + two layer norms 48 = 5248
    assert s.decoder_params == 4 * 5248
    assert s.normalizer("paper") == (4 * 8 * 24, 3 * 40)
    assert s.normalizer("params") == (384, 72) and s.normalizer("none") == (1, 1)


def test_kv_groups_carry_their_query_heads_and_biases_count():
    s = structures_for(make_qwen3(attention_bias=True), "kv_group")
    assert (s.qkv_bias, s.o_bias, s.mlp_bias) == (True, True, False)
    assert s.head_params == 384 + 8                       # + the head's 8 q-bias entries
    assert s.kv_params == 2 * (192 + 8) == 400
    assert (s.attention_units, s.attention_unit_params) == (2, 2 * 392 + 400)
    llama = structures_for(make_llama(mlp_bias=True), "query_head", protected=[0])
    assert (llama.protected, llama.prunable_layers, llama.channel_params) == ((0,), [1, 2, 3], 72 + 2)
    # Llama has no q/k norms: 5232 per layer, plus gate 40 + up 40 + down 24 bias entries
    assert llama.decoder_params == 4 * (5232 + 104)


@pytest.mark.parametrize("unit, protected, message", [
    ("query_head", [5], "protected layers [5] do not exist: the model has layers 0..3"),
    ("query_head", [0, 1, 2, 3], "protected layers [0, 1, 2, 3] cover all 4 layers: nothing is left to prune"),
    ("head", None, "attention_unit 'head' must be one of ['kv_group', 'query_head']"),
])
def test_structures_that_cannot_be_pruned_are_one_line(unit, protected, message):
    with pytest.raises(StructureError) as info:
        structures_for(make_qwen3(), unit, protected)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
