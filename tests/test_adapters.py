"""One contract test over every adapter: the named modules exist with the shapes pruning assumes."""

import pytest
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from conftest import TINY
from resp.adapters import ADAPTERS, adapter_for, head_dim

FAMILIES = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}


def test_every_adapter_has_a_family_under_test():
    assert sorted(ADAPTERS) == sorted(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_contract(family):
    config_cls, model_cls = FAMILIES[family]
    model = model_cls(config_cls(**TINY))
    adapter = adapter_for(model.config)
    hd, H, KV, D, I = head_dim(model.config), 4, 2, 24, 40
    assert hd == 8 and hd * H != D     # head_dim is read from the config, never hidden/heads
    assert adapter.has_qk_norm == (family == "qwen3")
    assert len(adapter.layers(model)) == 4
    for layer in adapter.layers(model):
        assert adapter.q_proj(layer).weight.shape == (H * hd, D)
        assert adapter.k_proj(layer).weight.shape == (KV * hd, D)
        assert adapter.v_proj(layer).weight.shape == (KV * hd, D)
        assert adapter.o_proj(layer).weight.shape == (D, H * hd)
        assert adapter.gate_proj(layer).weight.shape == (I, D)
        assert adapter.up_proj(layer).weight.shape == (I, D)
        assert adapter.down_proj(layer).weight.shape == (D, I)
        assert adapter.attention(layer) is layer.self_attn and adapter.mlp(layer) is layer.mlp


def test_head_dim_falls_back_to_hidden_over_heads():
    config = LlamaConfig(hidden_size=32, num_attention_heads=4)
    config.head_dim = None
    assert head_dim(config) == 8
