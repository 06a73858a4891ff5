"""`gpt`: the baseline decoder — pre-norm, RMSNorm, RoPE, SwiGLU, grouped-query attention.

A strong, plain reference in the spirit of nanoGPT's `model.py` with the modern defaults of
Llama-style models. Every option below is an ablation axis usable from the experiments table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from archbench.errors import ConfigError
from archbench.models.blocks import (
    MLPS,
    NORMS,
    Block,
    CausalSelfAttention,
    LanguageModel,
    RotaryEmbedding,
    init_weights,
    make_norm,
    mlp_hidden,
)
from archbench.options import option


@dataclass(frozen=True)
class LayerOptions:
    """The vocabulary, block size and shape, and the options of the shared building blocks (MLP,
    norm, RoPE, embeddings, dropout, init) that every architecture made from `blocks.py` accepts.
    A subclass may declare a shape option again to explain what it means there."""

    vocab_size: int
    block_size: int
    n_layer: int = option(4, "number of decoder blocks", min=1)
    n_head: int = option(4, "number of query heads", min=1)
    d_model: int = option(128, "width of the residual stream", min=2)
    mlp: str = option("swiglu", "MLP type", choices=tuple(MLPS))
    mlp_ratio: float = option(
        4.0, "MLP hidden width / model width (SwiGLU uses 2/3 of it)", min=0.0, min_exclusive=True
    )
    norm: str = option("rmsnorm", "normalisation layer", choices=tuple(NORMS))
    rope_base: float = option(10000.0, "RoPE base frequency", min=1.0)
    tie_embeddings: bool = option(True, "share the input embedding and output projection")
    dropout: float = option(0.0, "dropout probability", min=0.0, max=0.9)
    init_std: float = option(0.02, "std of the normal weight init", min=0.0, min_exclusive=True)

    def extra_blocks(self) -> int:
        """Decoder blocks the model has besides the `n_layer` its option counts (0 where n_layer
        is the whole depth). With n_layer = L - extra_blocks() it has L blocks in all, like a
        `gpt` of n_layer = L: what the benchmark builds at a shape of L layers."""
        return 0

    def check_window(self, length: int) -> None:
        """Raise ConfigError if training windows of `length` tokens (shorter than block_size on a
        synthetic task's instances) would leave an auxiliary loss without any target; the
        next-token loss alone trains on any length."""


@dataclass(frozen=True)
class GPTConfig(LayerOptions):
    """Shape and options of the baseline decoder."""

    n_kv_heads: int = option(
        0, "key/value heads (0 = n_head: MHA; 1: MQA)", min=0, unset_means=lambda get: get("n_head")
    )

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads after resolving 0 to n_head."""
        return self.n_kv_heads or self.n_head

    def validate(self) -> None:
        """Check constraints between options; raise ConfigError naming the options."""
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ConfigError(
                f"head width d_model/n_head={self.d_model // self.n_head} must be even for RoPE"
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"n_head={self.n_head} is not divisible by n_kv_heads={self.kv_heads}"
            )

    def make_rope(self) -> RotaryEmbedding:
        """The rotary tables for this shape (one instance is shared by all layers)."""
        return RotaryEmbedding(self.d_model // self.n_head, self.block_size, self.rope_base)

    def make_attention(self, rope: RotaryEmbedding) -> CausalSelfAttention:
        """A causal self-attention layer of this shape."""
        return CausalSelfAttention(self.d_model, self.n_head, self.kv_heads, rope, self.dropout)

    def make_mlp(self) -> nn.Module:
        """An MLP of the configured kind and width."""
        return MLPS[self.mlp](self.d_model, mlp_hidden(self.mlp, self.d_model, self.mlp_ratio))

    def make_block(self, rope: RotaryEmbedding, attention: nn.Module | None = None) -> Block:
        """A pre-norm decoder block (causal self-attention unless `attention` is given)."""
        attention = attention if attention is not None else self.make_attention(rope)
        return Block(self.d_model, attention, self.make_mlp(), self.norm, self.dropout)


class GPT(LanguageModel):
    """Token embedding → n_layer pre-norm blocks → final norm → (tied) unembedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        rope = c.make_rope()
        self.blocks = nn.ModuleList(c.make_block(rope) for _ in range(c.n_layer))
        self.norm_out = make_norm(c.norm, c.d_model)
        self.unembed = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_weights(self, c.init_std, c.n_layer)
        if c.tie_embeddings:
            self.unembed.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size) for token ids idx (B, T), T <= block_size."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}"
            )
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.norm_out(x))
