"""`mtp`: multi-token prediction (Gloeckle et al. 2024, "Better & Faster Large Language Models via
Multi-token Prediction") — a shared trunk with n independent heads predicting tokens t+1 … t+n.

Shapes: B sequences of T tokens, width d, vocabulary V, n = `n_future` heads.

    idx (B, T) ──embed──► x (B, T, d) ──trunk: n_layer blocks──► h (B, T, d)
    head k (k = 1 … n): z_k = head_k(h)     head_layers blocks each, run in parallel on the same h
    logits_k = unembed(norm_out(z_k))      (B, T, V); ONE final norm and unembedding for all heads

`logits_k[:, t]` predicts token x[t + k]. Every block, in the trunk and in the heads, is an ordinary
causal decoder block (self-attention with a lower-triangular mask), and a head reads nothing but
the trunk output h, so `logits_k[:, t]` depends on idx[:, :t+1] alone: future tokens reach the
model only as loss targets, never as inputs. `forward` returns `logits_1`, the next-token head;
the trunk plus head 1 is exactly the `gpt` baseline with n_layer + head_layers blocks, and heads
2 … n only shape the trunk during training (the paper uses them for self-speculative decoding; this
benchmark scores next-token predictions only).

Loss. `targets[:, t]` is x[t + 1] (the usual shifted window), so head k's target at position t is
`targets[:, t + k - 1]`, which exists inside the window for t = 0 … T - k only. The last k - 1
positions have no target and are left out: head k's loss is the mean cross-entropy over its
B * (T - k + 1) positions — no padding (targets equal to IGNORE_INDEX, outside a synthetic
task's answers, are left out of the mean). Because attention is causal, head k's
outputs at those positions equal the head run on h[:, :T - k + 1], so the tail is never computed.

    total = next_token + future_loss_weight * (future_2 + … + future_n)

with `parts` = {"next_token": L_1, "future_2": L_2, …}; the paper sums the n losses (weight 1).

Memory. n full (B, T, V) logit tensors (and the log-softmax that cross-entropy keeps for the
backward pass) would multiply the baseline's largest activation by n. The paper runs forward and
backward head by head, accumulating the gradient at h; that is not possible here because `loss`
must return a tensor for the training loop to back-propagate. Instead each head's final norm,
unembedding and cross-entropy run under activation checkpointing: only z_k (B, T, d) is kept, and
the logits are recomputed one head at a time during the backward pass, so at most one head's
(B, T, V) tensors are alive at once, as in the baseline. The cost is one extra unembedding per head;
where a head's logits are small (at most `KEEP_LOGITS_ELEMENTS`, e.g. a character vocabulary)
they are kept instead.

Size. The model has n_layer + n_future * head_layers blocks. The paper compares at equal size:
an L-block baseline against a trunk of L - n blocks plus n one-block heads (n_layer = L - n,
head_layers = 1). With n_future = 1 the model *is* `gpt` with n_layer + head_layers blocks, down
to the initial weights drawn from the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from archbench.errors import ConfigError
from archbench.models.blocks import (
    KEEP_LOGITS_ELEMENTS,
    LanguageModel,
    init_weights,
    make_norm,
    next_token_loss,
    recompute_in_backward,
)
from archbench.models.gpt import GPTConfig
from archbench.options import option


@dataclass(frozen=True)
class MTPConfig(GPTConfig):
    """The baseline's options, with `n_layer` counting trunk blocks only, plus the heads."""

    n_layer: int = option(4, "shared trunk blocks (each head adds head_layers more)", min=1)
    n_future: int = option(
        2, "output heads; head k predicts token t+k (1 = next-token training only)", min=1
    )
    head_layers: int = option(1, "decoder blocks in each head", min=1)
    future_loss_weight: float = option(
        1.0, "weight of the losses of heads 2..n_future (0 = next-token loss only)", min=0.0
    )

    def extra_blocks(self) -> int:
        """The heads' blocks, after the n_layer trunk blocks."""
        return self.n_future * self.head_layers

    def validate(self) -> None:
        """Check constraints between options; raise ConfigError naming the options."""
        super().validate()
        if self.n_future > self.block_size:
            raise ConfigError(
                f"n_future={self.n_future} exceeds block_size={self.block_size}: head "
                f"{self.n_future} would have no target inside a window"
            )

    def check_window(self, length: int) -> None:
        """Head n_future needs a target n_future tokens ahead inside the training window."""
        if self.n_future > length:
            raise ConfigError(
                f"n_future={self.n_future} exceeds the training window of {length} tokens: head "
                f"{self.n_future} would have no target inside it"
            )


class MTP(LanguageModel):
    """Embedding → trunk → n_future parallel heads → shared final norm and (tied) unembedding."""

    def __init__(self, config: MTPConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        rope = c.make_rope()

        def blocks(count: int) -> nn.Sequential:
            return nn.Sequential(*(c.make_block(rope) for _ in range(count)))

        self.trunk = blocks(c.n_layer)
        self.heads = nn.ModuleList(blocks(c.head_layers) for _ in range(c.n_future))
        self.norm_out = make_norm(c.norm, c.d_model)
        self.unembed = nn.Linear(c.d_model, c.vocab_size, bias=False)
        # Every path from the embedding to an output crosses n_layer + head_layers blocks.
        init_weights(self, c.init_std, c.n_layer + c.head_layers)
        if c.tie_embeddings:
            self.unembed.weight = self.embed.weight

    def trunk_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Trunk output h (B, T, d_model) shared by all heads, for token ids idx (B, T)."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}"
            )
        return self.trunk(self.embed(idx))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size) from head 1, for idx (B, T), T <= block_size."""
        return self.unembed(self.norm_out(self.heads[0](self.trunk_states(idx))))

    def _head_loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the shared output layer on states (B, T', d) vs targets (B, T')."""
        return next_token_loss(self.unembed(self.norm_out(states)), targets)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Next-token loss + future_loss_weight * the losses of heads 2..n (see module docstring).

        `targets[:, t]` is the token after idx[:, t]; parts are next_token, future_2, …, future_n.
        """
        length = idx.shape[1]
        if length < self.config.n_future:
            raise ValueError(
                f"sequence length {length} is shorter than n_future={self.config.n_future}"
            )
        trunk = self.trunk_states(idx)
        losses = []
        for k, head in enumerate(self.heads, start=1):
            kept = length - k + 1  # positions whose target x[t + k] lies inside the window
            states = head(trunk[:, :kept])
            if states.shape[0] * kept * self.config.vocab_size <= KEEP_LOGITS_ELEMENTS:
                losses.append(self._head_loss(states, targets[:, k - 1 :]))
                continue
            # Recompute this head's (B, T, V) logits in the backward pass instead of storing them.
            losses.append(recompute_in_backward(self._head_loss, states, targets[:, k - 1 :]))
        total = losses[0] + self.config.future_loss_weight * sum(losses[1:])
        parts = {"next_token": losses[0].detach()}
        parts.update({f"future_{k}": part.detach() for k, part in enumerate(losses[1:], start=2)})
        return total, parts
