"""A decoder whose layers have their own head counts and MLP widths: the compact export (method step 10).

This file is copied into every compact checkpoint and loaded from there with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`; it imports only torch and
transformers, never `resp`. It covers the Llama-family layout of Qwen3 (per-head q/k RMSNorm),
Qwen2 (q/k/v biases), Llama and Mistral: the family's differences are config flags.

Layer i has one KV head per entry of `layer_kv_group_sizes[i]`; KV head j serves the next
`layer_kv_group_sizes[i][j]` query heads in stored order. Groups may be uneven ([2, 1]: a pruned
query head leaves no padding behind). The MLP has `layer_intermediate_sizes[i]` channels.
head_dim and hidden_size are global. A layer with
no attention heads (or no MLP channels) contributes only its output bias, exactly as a model whose
pruned weights were zeroed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class RespCompactConfig(PreTrainedConfig):
    """Global sizes plus per-layer lists (one entry per decoder layer)."""

    model_type = "resp_compact"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    head_dim: int = 128
    layer_kv_group_sizes: list[list[int]] | None = None  # per layer: query heads served by each KV head
    layer_intermediate_sizes: list[int] | None = None    # MLP channels per layer
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False          # Qwen3: RMSNorm over head_dim on queries and keys
    qkv_bias: bool = False         # Qwen2: biases on q/k/v projections
    o_bias: bool = False
    mlp_bias: bool = False
    down_bias: bool = False        # a down_proj bias without gate/up biases (FLAP's bias compensation)
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    layer_types: list[str] | None = None   # "full_attention" | "sliding_attention" per layer
    sliding_window: int | None = None
    attention_dropout: float | int = 0.0
    base_model_type: str | None = None     # the family the weights came from (qwen3, qwen2, llama, mistral)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        n = self.num_hidden_layers
        if self.layer_kv_group_sizes is None:
            self.layer_kv_group_sizes = [[1] * (self.hidden_size // self.head_dim)] * n
        if self.layer_intermediate_sizes is None:
            self.layer_intermediate_sizes = [4 * self.hidden_size] * n
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if self.sliding_window else "full_attention"] * n
        for name in ("layer_kv_group_sizes", "layer_intermediate_sizes", "layer_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but num_hidden_layers is {n}")
        for i, sizes in enumerate(self.layer_kv_group_sizes):
            if any(size < 1 for size in sizes):
                raise ValueError(f"layer {i}: KV group sizes {sizes} must be positive (a KV head serves a query head)")
        if not any(self.layer_kv_group_sizes):
            raise ValueError("every layer has zero attention heads: at least one layer must keep attention")
        super().__post_init__(**kwargs)


class RespCompactRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RespCompactMLP(nn.Module):
    def __init__(self, config: RespCompactConfig, layer_idx: int):
        super().__init__()
        width = config.layer_intermediate_sizes[layer_idx]
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)  # [width, hidden]
        self.up_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)    # [width, hidden]
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias or config.down_bias)  # [hidden, width]
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # width 0: gate/up give [B, T, 0] and down_proj gives its bias (or zeros)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RespCompactRotaryEmbedding(nn.Module):
    def __init__(self, config: RespCompactConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: RespCompactConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, head_dim]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos = cos.unsqueeze(1)  # [B, 1, T, head_dim], broadcast over heads
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, KV, T, D] -> [B, KV * n_rep, T, D]: KV head j serves query heads j*n_rep ... (j+1)*n_rep - 1."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    # uneven layers arrive with key/value already expanded to one head per query head (groups = 1)
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class RespCompactAttention(nn.Module):
    def __init__(self, config: RespCompactConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        group_sizes = config.layer_kv_group_sizes[layer_idx]
        self.num_heads = sum(group_sizes)
        self.num_key_value_heads = len(group_sizes)
        if len(set(group_sizes)) <= 1:  # even groups: the attention functions repeat each KV head
            self.num_key_value_groups, self.kv_index = (group_sizes or [1])[0], None
        else:  # uneven groups: query head h reads KV head kv_index[h]
            self.num_key_value_groups = 1
            self.kv_index = nn.Buffer(self.kv_index_values(), persistent=False)
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None

        hidden, q_width, kv_width = config.hidden_size, self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=config.qkv_bias)   # [heads*head_dim, hidden]
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias)  # [kv_heads*head_dim, hidden]
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias)  # [kv_heads*head_dim, hidden]
        self.o_proj = nn.Linear(q_width, hidden, bias=config.o_bias)     # [hidden, heads*head_dim]
        if config.qk_norm:  # shared by all heads, so untouched by head pruning
            self.q_norm = RespCompactRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RespCompactRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def kv_index_values(self) -> torch.Tensor:
        sizes = self.config.layer_kv_group_sizes[self.layer_idx]
        return torch.tensor([j for j, size in enumerate(sizes) for _ in range(size)], dtype=torch.long)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache: Cache | None = None, **kwargs):
        batch, seq_len, _ = hidden_states.shape
        if self.num_heads == 0:
            if cache is not None:
                # generate() reads the sequence length from the cache (layer 0 by default), and an
                # empty cache entry reads as length 0: keep one number per token so lengths stay right
                placeholder = hidden_states.new_zeros(batch, 1, seq_len, 1)
                cache.update(placeholder, placeholder, self.layer_idx)
            return self.o_proj(hidden_states.new_zeros(batch, seq_len, 0)), None

        query_states = self.q_proj(hidden_states).view(batch, seq_len, self.num_heads, self.head_dim)
        key_states = self.k_proj(hidden_states).view(batch, seq_len, self.num_key_value_heads, self.head_dim)
        value_states = self.v_proj(hidden_states).view(batch, seq_len, self.num_key_value_heads, self.head_dim)
        if self.config.qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)  # [B, heads, T, head_dim]
        key_states = key_states.transpose(1, 2)      # [B, kv_heads, T, head_dim]
        value_states = value_states.transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        if self.kv_index is not None:  # the cache holds each KV head once; expand for this step only
            key_states = key_states.index_select(1, self.kv_index)
            value_states = value_states.index_select(1, self.kv_index)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, seq_len, self.num_heads * self.head_dim).contiguous()
        return self.o_proj(attn_output), attn_weights


class RespCompactDecoderLayer(nn.Module):
    def __init__(self, config: RespCompactConfig, layer_idx: int):
        super().__init__()
        self.self_attn = RespCompactAttention(config, layer_idx)
        self.mlp = RespCompactMLP(config, layer_idx)
        self.input_layernorm = RespCompactRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RespCompactRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask, position_embeddings, cache=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class RespCompactPreTrainedModel(PreTrainedModel):
    config_class = RespCompactConfig
    config: RespCompactConfig
    base_model_prefix = "model"
    _no_split_modules = ["RespCompactDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # from_pretrained builds the model on the meta device; non-persistent buffers are refilled here
        if isinstance(module, RespCompactAttention) and module.kv_index is not None:
            module.kv_index.copy_(module.kv_index_values())


class RespCompactModel(RespCompactPreTrainedModel):
    def __init__(self, config: RespCompactConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([RespCompactDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RespCompactRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RespCompactRotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, T, hidden]
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # generate() may pass masks already prepared per layer type
        if not isinstance(causal_mask_mapping := attention_mask, dict):
            mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                           "cache": cache, "position_ids": position_ids}
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in self.config.layer_types:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer_type, decoder_layer in zip(self.config.layer_types, self.layers):
            hidden_states = decoder_layer(hidden_states, causal_mask_mapping[layer_type], position_embeddings,
                                          cache=cache, position_ids=position_ids, **kwargs)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class RespCompactForCausalLM(RespCompactPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RespCompactConfig):
        super().__init__(config)
        self.model = RespCompactModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # [vocab, hidden]
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden_states = outputs.last_hidden_state
        # generate() asks for the last position only; slicing first saves the [T, vocab] projection
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
