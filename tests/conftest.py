"""Shared fixtures: tiny random Qwen3 and Llama models (head_dim * heads != hidden on purpose)
and a tiny tokenizer with the Qwen3-style chat template. Nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from resp.world.tokenizer import build_tokenizer

torch.set_num_threads(1)

TINY = dict(vocab_size=300, hidden_size=24, intermediate_size=40, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=128, tie_word_embeddings=False)


def make_qwen3(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**{**TINY, **overrides})).eval()


def make_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


MAKERS = {"qwen3": make_qwen3, "llama": make_llama}


@pytest.fixture(params=sorted(MAKERS))
def tiny_model(request):
    """A tiny random model of each supported family in turn (4 layers, 4 q heads, 2 kv heads)."""
    return MAKERS[request.param]()


@pytest.fixture
def tiny_qwen3():
    return make_qwen3()


@pytest.fixture
def tiny_llama():
    return make_llama()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE (vocab <= 300) with <|im_start|>/<|im_end|>/<think> and the chat template."""
    corpus = ["Tom has 12 apples. He buys 3 more. How many apples does Tom have now?",
              "<think>\n12+3=15\n</think>\n\nThe answer is 15.", "The river rests near the hills."] * 20
    return build_tokenizer(corpus, vocab_size=300)
