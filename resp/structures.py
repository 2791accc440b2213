"""Prunable units of a decoder (method step 4) and their parameter counts.

Units per layer:
- `query_head` h: q_proj rows [h*hd, (h+1)*hd) (+ q bias) and o_proj columns of the same range.
  k/v are not scored; a KV group whose query heads are all pruned is dead and counts as pruned.
- `kv_group` j: its n_rep query heads (as above) plus k_proj/v_proj rows [j*hd, (j+1)*hd) (+ biases).
- MLP `channel` c: gate_proj and up_proj row c, down_proj column c.
head_dim is read from the config; hidden_size and head_dim are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

from resp.adapters import adapter_for, head_dim


@dataclass(frozen=True)
class Structures:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    attention_unit: str          # "query_head" | "kv_group"
    protected: tuple[int, ...]   # layer indices never pruned
    qkv_bias: bool               # Qwen2-style q/k/v biases
    o_bias: bool
    mlp_bias: bool
    decoder_params: int          # paper's sparsity denominator: all decoder-layer parameters

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attention_units(self) -> int:
        return self.num_heads if self.attention_unit == "query_head" else self.num_kv_heads

    @property
    def prunable_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.protected]

    @property
    def head_params(self) -> int:
        """q rows (+ q bias) + o columns of one query head."""
        return 2 * self.head_dim * self.hidden_size + self.head_dim * self.qkv_bias

    @property
    def kv_params(self) -> int:
        """k and v rows (+ biases) of one KV head."""
        return 2 * (self.head_dim * self.hidden_size + self.head_dim * self.qkv_bias)

    @property
    def attention_unit_params(self) -> int:
        if self.attention_unit == "query_head":
            return self.head_params
        return self.n_rep * self.head_params + self.kv_params

    @property
    def channel_params(self) -> int:
        return 3 * self.hidden_size + 2 * self.mlp_bias

    def normalizer(self, mode: str) -> tuple[float, float]:
        """Divisors for (attention, channel) group scores (method step 5)."""
        if mode == "none":
            return 1.0, 1.0
        if mode == "params":
            return float(self.attention_unit_params), float(self.channel_params)
        # The paper's constants: heads / (4*head_dim*hidden), channels / (3*intermediate).
        return float(4 * self.head_dim * self.hidden_size), float(3 * self.intermediate_size)


def default_protected(num_layers: int) -> tuple[int, ...]:
    """The paper's choice: the first floor(0.1*L) layers and the last."""
    return tuple(sorted(set(range(num_layers // 10)) | {num_layers - 1}))


class StructureError(ValueError):
    pass


def structures_for(model, attention_unit: str, protected: list[int] | None = None) -> Structures:
    config = model.config
    adapter = adapter_for(config)
    L = config.num_hidden_layers
    prot = tuple(sorted(set(protected))) if protected is not None else default_protected(L)
    bad = [i for i in prot if not 0 <= i < L]
    if bad:
        raise StructureError(f"protected layers {bad} do not exist: the model has layers 0..{L - 1}")
    if len(prot) >= L:
        raise StructureError(f"protected layers {list(prot)} cover all {L} layers: nothing is left to prune; protect fewer layers")
    if attention_unit not in ("query_head", "kv_group"):
        raise StructureError(f"attention_unit {attention_unit!r} must be one of ['kv_group', 'query_head']")
    layer0 = adapter.layers(model)[0]
    decoder_params = sum(p.numel() for p in adapter.layers(model).parameters())
    return Structures(
        num_layers=L,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim(config),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        attention_unit=attention_unit,
        protected=prot,
        qkv_bias=adapter.q_proj(layer0).bias is not None,
        o_bias=adapter.o_proj(layer0).bias is not None,
        mlp_bias=adapter.gate_proj(layer0).bias is not None,
        decoder_params=decoder_params,
    )
