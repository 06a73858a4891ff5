"""`future_attention`: the Future Attention Transformer (Yifei Yan, 2024; yiphei/yif-AI,
`future_attention/`) — attention heads that also predict what the causal mask hides.

Shapes: B sequences of T <= C tokens (C = block_size), H query heads of width h (d = H * h),
F = `future_dim`, the band width (1 <= F <= C - 1).

Parameters. Each future-attention layer has, per head, learned slot keys K_f (C - 1, h) and slot
values V_f (C - 1, h): one "future slot" for every absolute key position p = 1 … C - 1 (position 0
is in no query's future). They add 2 * H * h * (C - 1) = 2 * d * (C - 1) parameters per layer.
(The original stores K_f as h x (C - 1); this is its transpose.)

One softmax over real keys and slots. For query i (q_i rotated by RoPE, as in the baseline):

    real key p:  score q_i . k_p    / sqrt(h)   allowed iff p <= i            (causal)
    slot p:      score q_i . K_f[p] / sqrt(h)   allowed iff i < p <= i + F    (the band)
    P_i = softmax over the allowed scores of row i, both kinds together
    out_i = sum_{p <= i} P_ip v_p  +  sum_{i < p <= i+F} P_ip V_f[p]  =  causal part + prediction

then the heads are merged and projected as in the baseline. F is a band width, not a slot count:
query i may use at most F slots, those of the F positions after it. The slot scores share the
softmax normaliser, so the causal part is scaled down by the mass the slots take. Slots are never
rotated: each is tied to its absolute position by its index.

Causality. The slots are parameters, not functions of the tokens, and row i reads k_p, v_p only for
p <= i, so the logits at i depend on tokens 0 … i alone. Row i's band is clipped at the last slot,
C - 1, never at the sequence end T - 1: out_i does not depend on T, so the logits of a prefix equal
those of the full sequence (evaluation and generation with any T <= C).

Two code paths, the same softmax. `forward` (evaluation, generation) runs `attend`: one
`scaled_dot_product_attention` call over the keys [k_0 … k_{T-1}; K_f[1 … S]] and values
[v_0 … v_{T-1}; V_f[1 … S]] with a boolean (T, T + S) mask (`joint_mask`: a causal block beside
the band block), S = min(T - 1 + F, C - 1) being the last slot any row can use. No row is fully
masked: every row sees its own real key. Training (`forward_with_future`, used by `loss`) runs
`attend_with_future`: it needs the slot part of the output on its own and the raw real scores
for the target, which the fused kernel does not return, so it computes the same masked softmax
with explicit matrices. Tests check both paths against a float64 brute-force reference.

Cost. The explicit path materialises (B, H, T, W) score and probability matrices and computes the
target's extra softmax, where the baseline runs one fused causal kernel: at the default CPU suite
shape (4 layers, d = 128, C = 128, batch 16, one thread) a training step takes about 1.5x the
baseline's and +90 MiB of memory; with `future_layers=last`, about 1.1x. `forward` costs about
1.3x (the fused kernel cannot skip the masked half of its (T, T + S) matrix, as it does for a
purely causal one).

Target (training only). P*_i = softmax of the REAL scores q_i . k_p / sqrt(h) over p <= i + F —
no causal mask, it looks at the future — and

    target_i = sum_{p = i+1}^{min(i+F, T-1)} P*_ip v_p      (B, H, T, h)

detached by default (`detach_target`). It only enters the loss, never the logits: future tokens
reach the model only through this training signal. Computed from the (T, T) real scores, it works
for any T <= C (the original's target required T = C).

Loss. Per layer, the prediction (the slot part of out) is compared with the target head by head,
on the rows i = 0 … T - 2:
    mse:    mean over (B, H, rows, h) of (prediction - target)^2
    cosine: mean over (B, H, rows) of (1 - cos(prediction_i, target_i)) / 2
The future loss is the mean over future layers, and

    total = next_token + future_loss_weight * future,    parts = {"next_token", "future"}.

Rows with an empty band. The last row, i = T - 1, has no real future token in the window: its
target is the zero vector (and at T = C so is its prediction: there is no slot after C - 1). The
original averaged it in; under the cosine loss, cos(0, 0) = 0 added a constant (1 - 0) / 2 = 0.5
with zero gradient to every layer's loss, and under MSE it added 1 to the count and 0 to the sum.
Here that row is left out of both losses explicitly (with F >= 1 every other row has at least one
real future token), so each loss is an average over the rows that have something to predict: at
T = C the MSE is the original's times T / (T - 1), and the cosine loss is the original's minus
0.5 / T, times T / (T - 1). A one-token window has no such row; its future loss is 0.

Loss mask. Targets equal to IGNORE_INDEX (-100, tokens outside a synthetic task's answers) count
nowhere, as in every architecture's loss: row i counts only if its band of real future positions
i+1 … min(i+F, T-1) holds a scored token (one of targets[i … min(i+F, T-1) - 1] is not ignored),
and the loss is the mean over the rows that count (0 when none does). Language-model windows mask
nothing, so there every row 0 … T-2 counts.

T < C. The target's band ends at the last real token, T - 1, while the slot part of the output
runs to the last slot, C - 1 (it is part of the logits, which must not depend on T). So the loss
compares the in-window prediction: the slot part summed over the slots p <= T - 1 only, with the
joint softmax's probabilities (the slots past the window keep their share of the normaliser, as
in the logits). At T = C that is the whole slot part; on shorter windows (the synthetic-task rows
train on instances of 24 or 25 tokens at C = 32) no row is trained to predict, through the slots
of positions past the window, what its target cannot see. Those slots still shape the output and
are trained through the next-token loss.

Differences from the original. The rest of the network is this suite's baseline (RMSNorm, RoPE,
SwiGLU, tied embeddings) instead of LayerNorm, learned absolute positions and a GELU MLP; the
queries that score the slots are the RoPE-rotated ones, the slots themselves are not rotated. The
target works for T < C, the empty last row is left out of the loss (above), and the weight may
be 0 (the original asserted a positive weight and had a separate switch for the loss). The
default loss is cosine, that of the seed's best run (the original code defaults to MSE).

`future_loss_weight = 0` keeps the slots (they still shape every future layer's output) but drops
the loss: a control separating "more parameters" from "the auxiliary signal". The future loss is
still reported in `parts`. `future_layers` picks the layers with future attention (the original's
start_layer … end_layer); the others are baseline blocks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archbench.errors import ConfigError
from archbench.models.blocks import (
    IGNORE_INDEX,
    Block,
    LanguageModel,
    RotaryEmbedding,
    init_weights,
    make_norm,
    next_token_loss,
)
from archbench.models.gpt import GPTConfig
from archbench.options import option


@dataclass(frozen=True)
class FutureAttentionConfig(GPTConfig):
    """The baseline's options plus the future-attention ones."""

    future_dim: int = option(
        0,
        "band width F: query i may use the slots of positions i+1 … i+F (0 = block_size - 1)",
        min=0,
        unset_means=lambda get: get("block_size") - 1,
    )
    future_loss: str = option(
        "cosine", "loss between predicted and true future output", choices=("cosine", "mse")
    )
    future_loss_weight: float = option(
        1.0, "weight of the future loss (0 = keep the slots, drop the loss: a control)", min=0.0
    )
    future_layers: str = option(
        "all", "layers with future attention: all, last, or 0-based indices such as 0,2"
    )
    detach_target: bool = option(True, "stop gradients through the future-attention target")

    @property
    def band(self) -> int:
        """The band width F after resolving 0 to block_size - 1."""
        return self.future_dim or self.block_size - 1

    @property
    def future_layer_ids(self) -> frozenset[int]:
        """Indices of the layers with future attention."""
        return parse_future_layers(self.future_layers, self.n_layer)

    def validate(self) -> None:
        """Check constraints between options; raise ConfigError naming the options."""
        super().validate()
        if self.block_size < 2:
            raise ConfigError(
                f"future_attention needs block_size >= 2 (a future to attend to), "
                f"got {self.block_size}"
            )
        if self.future_dim > self.block_size - 1:
            raise ConfigError(
                f"future_dim={self.future_dim} must be <= block_size - 1 = {self.block_size - 1}"
            )
        parse_future_layers(self.future_layers, self.n_layer)


def parse_future_layers(spec: str, n_layer: int) -> frozenset[int]:
    """Layer indices named by `future_layers` ('all', 'last' or '0,2'); ConfigError if bad."""
    spec = spec.strip()
    if spec == "all":
        return frozenset(range(n_layer))
    if spec == "last":
        return frozenset({n_layer - 1})
    items = [item.strip() for item in spec.split(",")]
    if not all(item.isdecimal() for item in items):
        raise ConfigError(
            f"future_layers={spec!r} must be 'all', 'last' or comma-separated 0-based layer "
            "indices such as '0,2'"
        )
    ids = [int(item) for item in items]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"future_layers={spec!r} names a layer twice")
    if max(ids) >= n_layer:
        raise ConfigError(
            f"future_layers={spec!r} names layer {max(ids)}, but n_layer={n_layer} "
            f"(indices 0 … {n_layer - 1})"
        )
    return frozenset(ids)


def joint_mask(t: int, n_slots: int, band: int, device: torch.device) -> torch.Tensor:
    """Boolean (t, t + n_slots) mask over [real keys 0 … t-1; slots of positions 1 … n_slots]:
    query i sees real key p iff p <= i, and slot p iff i < p <= i + band."""
    i = torch.arange(t, device=device)[:, None]
    real = torch.arange(t, device=device)[None, :]
    slot = torch.arange(1, n_slots + 1, device=device)[None, :]
    return torch.cat([real <= i, (slot > i) & (slot <= i + band)], dim=1)


def future_target(real_scores: torch.Tensor, v: torch.Tensor, band: int) -> torch.Tensor:
    """The true future output (B, H, T, h): target_i = sum_{i < p <= i+band} P*_ip v_p, where P*_i
    is the softmax of the real scores (B, H, T, T) over p <= i + band (and p < T)."""
    t = real_scores.shape[-1]
    i = torch.arange(t, device=v.device)[:, None]
    p = torch.arange(t, device=v.device)[None, :]
    probs = torch.where(p > i + band, float("-inf"), real_scores).softmax(dim=-1)
    return (probs * (p > i).to(v.dtype)) @ v


def scored_rows(targets: torch.Tensor, band: int) -> torch.Tensor:
    """Which rows 0 … T-2 of each sequence the future loss counts, (B, T-1) bool: row i counts
    iff a token of its band, positions i+1 … min(i+band, T-1), is scored, i.e. one of
    targets[:, i : min(i+band, T-1)] is not IGNORE_INDEX (a synthetic task's loss mask)."""
    t = targets.shape[1]
    # scored[:, j] = scored targets among targets[:, :j], j = 0 … T-1
    scored = F.pad((targets[:, :-1] != IGNORE_INDEX).cumsum(dim=1), (1, 0))
    start = torch.arange(t - 1, device=targets.device)
    return scored[:, (start + band).clamp(max=t - 1)] > scored[:, start]


def future_loss(
    prediction: torch.Tensor, target: torch.Tensor, kind: str, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """`mse` or `cosine` loss between slot outputs and targets (B, H, T, h), averaged over heads
    and rows 0 … T-2 (the last row has no future token in the window; see the module docstring),
    only over the rows that `rows` (B, T-1) marks if given (`scored_rows`); 0 when none is."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)  # not bf16 (CPU autocast)
    prediction, target = prediction[:, :, :-1].to(dtype), target[:, :, :-1].to(dtype)
    if kind == "mse":
        per_row = (prediction - target).square().mean(dim=-1)
    else:
        per_row = (1.0 - F.cosine_similarity(prediction, target, dim=-1)) / 2.0
    if rows is None:
        rows = per_row.new_ones(per_row.shape[0], per_row.shape[2], dtype=torch.bool)
    weight = rows[:, None, :].to(dtype).expand_as(per_row)
    return (per_row * weight).sum() / weight.sum().clamp(min=1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_keys: torch.Tensor,
    slot_values: torch.Tensor,
    band: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Head outputs (B, H, T, h) of the joint softmax over real keys and slots, in one fused
    kernel call. q, k, v: (B, H, T, h); slot_keys, slot_values: (H, S, h) for positions 1 … S."""
    b, _, t, _ = q.shape
    keys = torch.cat([k, slot_keys.expand(b, -1, -1, -1)], dim=2)
    values = torch.cat([v, slot_values.expand(b, -1, -1, -1)], dim=2)
    mask = joint_mask(t, slot_keys.shape[1], band, q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p)


def attend_with_future(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_keys: torch.Tensor,
    slot_values: torch.Tensor,
    band: int,
    dropout_p: float = 0.0,
    detach_target: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attend` with explicit score matrices, returning the head outputs, the prediction (the
    slot part of them over the slots of positions p <= T - 1, the ones its target can see: module
    docstring, "T < C") and its target, all (B, H, T, h).

    Real and slot scores never compete for a key position (real where p <= i, slot where p > i),
    so both fit in one (B, H, T, W) matrix over the positions p = 0 … W - 1 = S: the concatenated
    matrix of `attend` without its always-masked half. To index all four (W, h) operands by p,
    real keys and values get zero rows for the positions T … S (those columns only ever hold
    slots) and the slots a zero row for position 0 (never in a query's future).
    """
    t, width = q.shape[2], slot_keys.shape[1] + 1
    keys, values = F.pad(k, (0, 0, 0, width - t)), F.pad(v, (0, 0, 0, width - t))
    slot_keys, slot_values = F.pad(slot_keys, (0, 0, 1, 0)), F.pad(slot_values, (0, 0, 1, 0))
    i = torch.arange(t, device=q.device)[:, None]  # query position
    p = torch.arange(width, device=q.device)[None, :]  # key position
    causal = p <= i
    q = q * q.shape[-1] ** -0.5
    real_scores = q @ keys.transpose(-2, -1)  # (B, H, T, W); columns >= T are never used
    scores = torch.where(causal, real_scores, q @ slot_keys.transpose(-2, -1))
    scores.masked_fill_(p > i + band, float("-inf"))  # beyond the band
    probs = F.dropout(scores.softmax(dim=-1), dropout_p)
    real_probs, slot_probs = probs * causal.to(q.dtype), probs * (~causal).to(q.dtype)
    # The slots of positions p < T make the prediction; those past the window (none at T = C:
    # an empty product, so that every window length runs the same operations) only the output.
    prediction = slot_probs[..., :t] @ slot_values[:, :t]
    beyond = slot_probs[..., t:] @ slot_values[:, t:]
    with torch.no_grad() if detach_target else contextlib.nullcontext():
        target = future_target(real_scores[..., :t], v, band)
    return real_probs @ values + prediction + beyond, prediction, target


class FutureAttention(nn.Module):
    """Causal self-attention whose rows may also attend to learned future slots (module doc)."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_heads: int,
        rope: RotaryEmbedding,
        block_size: int,
        band: int,
        dropout: float,
        init_std: float,
    ):
        super().__init__()
        self.n_head, self.n_kv_heads = n_head, n_kv_heads
        self.head_dim = d_model // n_head
        self.block_size, self.band = block_size, band
        kv_width = n_kv_heads * self.head_dim
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_width, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        # Row p - 1 is the slot of absolute key position p = 1 … block_size - 1.
        self.slot_keys = nn.Parameter(torch.randn(n_head, block_size - 1, self.head_dim) * init_std)
        self.slot_values = nn.Parameter(
            torch.randn(n_head, block_size - 1, self.head_dim) * init_std
        )
        self.rope = rope
        self.dropout = dropout

    def _heads(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, T, h) — RoPE applied, key/value heads repeated to H — and the slot
        keys and values (H, S, h) that these T queries can reach."""
        b, t, c = x.shape
        kv_width = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split((c, kv_width, kv_width), dim=-1)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q), self.rope(k)
        group = self.n_head // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        n_slots = min(t - 1 + self.band, self.block_size - 1)
        return q, k, v, self.slot_keys[:, :n_slots], self.slot_values[:, :n_slots]

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, h) head outputs → projected (B, T, d)."""
        b, _, t, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over real keys and future slots for x (B, T, d) → (B, T, d)."""
        y = attend(*self._heads(x), self.band, self.dropout if self.training else 0.0)
        return self._merge(y)

    def forward_with_future(
        self, x: torch.Tensor, detach_target: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The output of `forward` plus the prediction and its target (B, H, T, h)."""
        y, prediction, target = attend_with_future(
            *self._heads(x), self.band, self.dropout if self.training else 0.0, detach_target
        )
        return self._merge(y), prediction, target


class FutureBlock(Block):
    """A pre-norm block with FutureAttention that can also return its prediction and target."""

    def forward_with_future(
        self, x: torch.Tensor, detach_target: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block output (as `forward`) plus the attention's (prediction, target)."""
        y, prediction, target = self.attn.forward_with_future(self.norm_attn(x), detach_target)
        x = x + self.dropout(y)
        return x + self.dropout(self.mlp(self.norm_mlp(x))), prediction, target


class FutureAttentionTransformer(LanguageModel):
    """The baseline decoder with future attention in the layers named by `future_layers`."""

    def __init__(self, config: FutureAttentionConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        rope = c.make_rope()
        future_ids = c.future_layer_ids
        blocks = []
        for index in range(c.n_layer):
            if index in future_ids:
                attn = FutureAttention(
                    c.d_model,
                    c.n_head,
                    c.kv_heads,
                    rope,
                    c.block_size,
                    c.band,
                    c.dropout,
                    c.init_std,
                )
                blocks.append(FutureBlock(c.d_model, attn, c.make_mlp(), c.norm, c.dropout))
            else:
                blocks.append(c.make_block(rope))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = make_norm(c.norm, c.d_model)
        self.unembed = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_weights(self, c.init_std, c.n_layer)
        if c.tie_embeddings:
            self.unembed.weight = self.embed.weight

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, d), refusing T > block_size."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}"
            )
        return self.embed(idx)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size) for token ids idx (B, T), T <= block_size."""
        x = self._embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.norm_out(x))

    def forward_with_future(
        self, idx: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The training path: the logits of `forward` and, per future layer, (prediction,
        target) of shape (B, H, T, h)."""
        x = self._embed(idx)
        pairs = []
        for block in self.blocks:
            if isinstance(block, FutureBlock):
                x, prediction, target = block.forward_with_future(x, self.config.detach_target)
                pairs.append((prediction, target))
            else:
                x = block(x)
        return self.unembed(self.norm_out(x)), pairs

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """next_token + future_loss_weight * future (mean future loss over future layers)."""
        logits, pairs = self.forward_with_future(idx)
        ce = next_token_loss(logits, targets)
        rows = scored_rows(targets, self.config.band)
        kind = self.config.future_loss
        future = torch.stack([future_loss(p, t, kind, rows) for p, t in pairs]).mean()
        total = ce + self.config.future_loss_weight * future
        return total, {"next_token": ce.detach(), "future": future.detach()}
