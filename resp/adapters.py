"""Architecture adapters: which modules of a decoder layer pruning touches, per model family.

One small entry per family, looked up by `config.model_type`. Adapters only *name* modules;
shapes are always read from the config (head_dim explicitly, never hidden/heads).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Adapter:
    family: str
    has_qk_norm: bool          # Qwen3: per-head_dim q_norm/k_norm shared by all heads

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def backbone(self, model: nn.Module) -> nn.Module:
        """The decoder stack up to the final norm: its last_hidden_state times lm_head is the logits."""
        return model.model

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def q_proj(self, layer):
        return layer.self_attn.q_proj

    def k_proj(self, layer):
        return layer.self_attn.k_proj

    def v_proj(self, layer):
        return layer.self_attn.v_proj

    def o_proj(self, layer):
        return layer.self_attn.o_proj

    def gate_proj(self, layer):
        return layer.mlp.gate_proj

    def up_proj(self, layer):
        return layer.mlp.up_proj

    def down_proj(self, layer):
        return layer.mlp.down_proj


ADAPTERS = {
    "qwen3": Adapter("qwen3", has_qk_norm=True),
    "qwen2": Adapter("qwen2", has_qk_norm=False),
    "llama": Adapter("llama", has_qk_norm=False),
    "mistral": Adapter("mistral", has_qk_norm=False),
}


class UnsupportedArchitecture(ValueError):
    pass


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} has no pruning adapter; supported families: "
            f"{', '.join(sorted(ADAPTERS))} (Qwen3, Qwen2, Llama, Mistral)"
        )
    return ADAPTERS[model_type]


def head_dim(config) -> int:
    """head_dim from the config; families that omit it use hidden/heads (Llama-2 style)."""
    value = getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // config.num_attention_heads
