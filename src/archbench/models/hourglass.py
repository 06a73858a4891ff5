"""`hourglass`: grouped compression to latents, multi-channel latent attention, upsampling
(seed 003, kendrickplumard/efficient_transformer `efficient_transformer_v1/model.py`; related:
Hourglass Transformers, Nawrot et al. 2021; Hierarchical Perceiver; SoftMoE; DeepSeekMoE).

A U-shaped decoder: the token sequence is compressed level by level into a short latent sequence,
most layers run there, and the result is upsampled back to one vector per token.

Levels and groups. Position p belongs to group p // L (L = `group_len`). Level 0 holds the T
tokens; level l = 1 … n holds K_l latents per group (`latents` = "K_1,…,K_n", L > K_1 > … > K_n),
of width w_l (`widths` = "w_0,…,w_{n-1}" for the token level and the outer levels; w_n =
`d_model`; "" = d_model everywhere). A level is stored as (B, G, K_l, w_l), G groups, K_0 = L.
Every item of every level has an *anchor*, the last token it may depend on: item i of group g at
level l is anchored at a = g * L + L - K_l + i, i.e. the K_l latents of a group sit on the group's
last K_l positions (at level 0 the anchor of a token is its own position). Within a level, anchors
increase with the flattened index g * K_l + i, so a causal mask over that order is causal in
anchors.

Blocks. Every block is the baseline's pre-norm block (RoPE attention with a lower-triangular mask
+ MLP). A *local* block runs on each group alone, (B * G, K_l, w_l); a *global* one on the whole
level, (B, G * K_l, w_l). `level_layers` pairs run after each compression and each upsampling,
`local_global=alternate` (local, global, local, global, …) or `sequential` (all local, then all
global). RoPE positions are indices within the group (local) or within the level (global).

Encoder level l (l = 1 … n), (B, G, K_{l-1}, w_{l-1}) → (B, G, K_l, w_l):
  1. `compress_layers` local blocks on each group, at width w_{l-1}. Their output is the skip
     S_{l-1} that the decoder joins at level l-1 (for l = 1: the tokens after these blocks, as
     Hourglass Transformers take the residual from the layers before shortening).
  2. Compress each group to its last K_l items, projected to w_l (a bias-free linear map when
     the widths differ). `compression=keep_last` stops there (Mirasol's "keep the last K tokens
     after a local encoder"). `compression=perceiver` adds a cross-attention in which these K_l
     vectors are the latent queries and the whole group is the keys/values, with the mask
         latent i sees group item j  iff  j <= K_{l-1} - K_l + i            (K_l, K_{l-1})
     i.e. exactly the items anchored at or before the latent's own anchor. The original passed
     `is_causal=True` to SDPA on this non-square matrix; SDPA aligns that mask top-left, so latent
     i saw only items j <= i (a legal but crippled mask: the last latent missed most of its group).
     RoPE in the cross-attention uses the positions within the group (relative anchors).
  3. Add the level's learned slot embedding (K_l, w_l) (position within the group, shared with the
     decoder level that upsamples to l), then the `level_layers` local/global blocks.

Latent block: `n_layer` global blocks over (B, G * K_n, d_model). Every `multichannel_every`-th
one (layers k-1, 2k-1, …; 0 = none) is multi-channel, with s = `channels`:
    h = norm(x);  for channel c = 1 … s:  y_c = attention_c(h)     (own q, k, v; shared out-proj)
    x_c = x + proj(y_c);   x_c = x_c + MLP_c(norm(x_c)) + Σ_j shared_j(norm(x_c))
    out = merge(x_1, …, x_s)
Each channel is its own causal multi-head attention (all s * n_head heads run in one SDPA call)
and its own residual stream. The MLPs (channel ones and `shared_channels` shared ones, à la
DeepSeekMoE: applied to every channel) have hidden width
    channel_mlp_multiple * vanilla_hidden / (channels + shared_channels),
so with a multiple of 1 the MLP parameters of the layer equal one vanilla MLP's, up to the
rounding of that width (at d 128 with 3 MLPs: 3 × 115 hidden units against 344) (the original's
count of "soft experts" includes the shared ones). m shared MLPs of hidden h equal one MLP of
hidden m * h, and are stored that way. `merge=mean` averages the channels, `max` takes the
per-element maximum, `softmax` the per-element convex combination Σ_c softmax_c(x_c) * x_c (the
weights are a softmax over the channel axis of the values themselves, as in the original and
SoftMoE's combine step). Channels mix only across the channel axis, never across positions.

Decoder level l (l = n … 1), (B, G, K_l, w_l) → (B, G, K_{l-1}, w_{l-1}), with the skip S_{l-1}:
  1. Upsample (`upsampling=repeat`): group g's K_{l-1} slots are [filler; the group's own K_l
     latents], the latents at their anchor positions (the last K_l slots). The first
     F = K_{l-1} - K_l slots are filled with group g-1's latents, tiled so that the slot just
     before the anchors gets the latest one (slot s takes latent (s - F) mod K_l); group 0 has no
     previous group and gets F learned vectors. Normalise (`norm`, RMSNorm by default), project to
     w_{l-1}, add the slot embedding. The skip is normalised too. Without these two norms the model
     did not learn: the upsampled stream is the sum of every residual branch on the deep path (rms
     about 8 after 80 training steps) while the token-level skip stays near the embedding scale (rms
     about 0.03), so the decoder blocks could not see the current token and the loss sat at the
     unigram entropy; normalised, each joins at unit scale with its own learned gains.
  2. `skip=pre`: add S_{l-1} now (Hourglass Transformers' residual), so the blocks below see the
     group's own earlier tokens.
  3. `upsampling=attention` (Hourglass Transformers' attention upsampling): the slots from 1-2 then
     attend, as queries, to every level-l latent anchored at or before their own anchor (keys:
     the whole level, (G * K_l)), plus one learned "null" key/value visible to all (a slot of group
     0 before the first anchor has no latent to see); residual add.
  4. The `level_layers` local/global blocks at width w_{l-1}.
  5. `skip=post` (the original): add S_{l-1} only now. Then inside the blocks a filler slot s of
     group g has seen nothing of tokens g*L … g*L+s: at the token level, its own group reaches
     its logits only through the skip added after the last block (in the original, the bare
     token embedding; here the output of the encoder's local blocks, which at least summarise
     the group up to s). Kept for the ablation; `pre` is the default.
Finally norm, (tied) unembedding → logits (B, T, vocab_size).

Causality (why logits at t depend on tokens <= t only). By induction over the layers, every item
depends only on tokens at or before its anchor: token embeddings trivially; a causal local or
global block mixes an item only with items of smaller anchors; a group's last K_l items (keep_last)
keep their anchors; the perceiver mask admits exactly the items anchored at or before the latent;
the multi-channel layer is causal per channel and merges per element; a filler slot of group g
(anchor >= g*L) carries latents of group g-1 (anchors < g*L) or parameters, a latent slot
carries the latent with the same anchor; the attention upsampling mask admits anchors <= the
slot's; skips join items of equal anchors; slot embeddings, learned fillers and the null key are
parameters. Tests perturb every position and check every level's outputs and the logits, for every
option value, and check the perceiver mask latent by latent.

Lengths. Any 1 <= T <= block_size works: the input is right-padded (with token 0) to G = ceil(T/L)
whole groups, and the logits are cropped back to T. The padding occupies positions > T - 1 only,
and by the argument above nothing at a position < T depends on it; groups are fixed in absolute
positions (p // L), not spread over T as in the original (which split T into `n_groups` equal
groups, so a prompt's grouping changed as it grew, and T < n_groups failed). Hence the logits of a
prefix equal those of the full sequence, the property generation relies on (tested for every T).

Cost per token, relative to a token-level block of width w_0: a block at level l costs about
(K_l / L) * (w_l / w_0)^2 of one; the token level runs `compress_layers` (encoder of level 1)
+ 2 * `level_layers` (decoder) full blocks, plus the unembedding. Global attention at level l is
quadratic in G * K_l = T * K_l / L. Measured (one CPU thread, forward + backward, widths=64,96,
other options default, d_model 128): 2.15M parameters and 5.6 MFLOP/token at block 128, the
FLOPs of the 0.83M-parameter 4-layer `gpt` but 1.25-1.3x its step time (many small kernels:
14 blocks, narrow matrices, the channel merge); against `gpt` of equal parameters (d_model 208)
it is 1.5x faster at block 128 and about 1.8x at block 1024 (7.9 vs 24.9 MFLOP/token).

Differences from the original. Groups have a fixed length (`group_len`) instead of a fixed count
(`n_groups`), so any T <= block_size works and prefixes are consistent; the perceiver mask is
aligned to the latents' anchors (above); `skip=pre` is offered and is the default, the skip is
taken after the encoder's local blocks, and the two streams are normalised where they meet (the
original mixed them with a learned scalar after the blocks; only its attention upsampling also
added the skip before them); RoPE is used in all
attentions besides the slot embeddings (the original offered either); every channel has its own
q, k and v (the original's default shared k, v between channels), and its own whole MLP (the
original shared one gated up-projection and a shared output projection between its soft experts,
only the down-projection per expert; the seed describes per-channel MLPs); queries and keys are
not normalised (the original's `ln_qk`); attention upsampling attends to the group's latents plus
a null key, as in Hourglass Transformers (issue 9), instead of the original's causal
self-attention within a group (queries from skip + x, keys and values from the upsampled x); the
perceiver's latents keep a residual of the items they compress (the original output only the
projected cross-attention). Memory tokens, DenseFormer weights, the latent reconstruction loss,
noisy embeddings and muP are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archbench.errors import ConfigError
from archbench.models.blocks import (
    MLPS,
    Block,
    CausalSelfAttention,
    LanguageModel,
    RotaryEmbedding,
    causal_attention,
    init_weights,
    make_norm,
    mlp_hidden,
)
from archbench.models.gpt import LayerOptions
from archbench.options import option


def softmax_merge(x: torch.Tensor) -> torch.Tensor:
    """Per-element convex combination of channel streams x (s, B, T, d), weighted by a softmax of
    their own values over the s channels → (B, T, d)."""
    return (x.softmax(dim=0) * x).sum(dim=0)


def mean_merge(x: torch.Tensor) -> torch.Tensor:
    """Per-element mean of channel streams x (s, B, T, d) → (B, T, d)."""
    return x.mean(dim=0)


def max_merge(x: torch.Tensor) -> torch.Tensor:
    """Per-element maximum of channel streams x (s, B, T, d) → (B, T, d)."""
    return x.amax(dim=0)


# The channel merges of multi-channel layers (option `merge`), by name.
MERGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": softmax_merge,
    "mean": mean_merge,
    "max": max_merge,
}


def parse_sizes(spec: str, name: str) -> tuple[int, ...]:
    """The comma-separated positive integers of option `name` ("" gives ()); ConfigError if bad."""
    if not spec.strip():
        return ()
    items = [item.strip() for item in spec.split(",")]
    if not all(item.isdecimal() and int(item) > 0 for item in items):
        raise ConfigError(f"{name}={spec!r} must be comma-separated positive integers, e.g. '4,2'")
    return tuple(int(item) for item in items)


def uniform_widths(d_model: int, latents: str) -> tuple[int, ...]:
    """The widths of the levels outside the innermost when `widths` is unset: d_model each."""
    return (d_model,) * len(parse_sizes(latents, "latents"))


@dataclass(frozen=True)
class HourglassConfig(LayerOptions):
    """Shape and options of the hourglass (see the module docstring for the mechanism)."""

    n_layer: int = option(4, "global layers in the latent (innermost) block", min=1)
    n_head: int = option(4, "attention heads at every level", min=1)
    d_model: int = option(128, "width of the innermost (latent) level", min=2)
    group_len: int = option(8, "tokens per group L: position p is in group p // L", min=2)
    latents: str = option(
        "4,2", "latents per group at each level, outermost first: L > K_1 > K_2 > ... >= 1"
    )
    widths: str = option(
        "",
        "widths of the token level and each outer level, comma-separated ('' = d_model)",
        unset_means=lambda get: ",".join(map(str, uniform_widths(get("d_model"), get("latents")))),
    )
    compression: str = option(
        "keep_last",
        "keep_last: last K items after local blocks; perceiver: + K queries cross-attend",
        choices=("keep_last", "perceiver"),
    )
    compress_layers: int = option(1, "local blocks on each group before compressing it", min=0)
    level_layers: int = option(
        1, "local + global block pairs after each compression and each upsampling", min=0
    )
    local_global: str = option(
        "alternate",
        "order of a level's blocks: local, global, local, ... or all local then all global "
        "(the same with level_layers=1)",
        choices=("alternate", "sequential"),
    )
    upsampling: str = option(
        "repeat",
        "repeat: previous group's latents fill a group; attention: + attend to past latents",
        choices=("repeat", "attention"),
    )
    skip: str = option(
        "pre",
        "add the encoder's skip before (Hourglass Transformers) or after (original) the blocks",
        choices=("pre", "post"),
    )
    multichannel_every: int = option(
        1, "every k-th latent layer is multi-channel (0 = none)", min=0
    )
    channels: int = option(
        2, "attention channels (own q/k/v, MLP) of a multi-channel layer (unused if none)", min=1
    )
    shared_channels: int = option(
        1,
        "MLPs shared by all channels of a multi-channel layer (DeepSeekMoE; unused if none)",
        min=0,
    )
    channel_mlp_multiple: float = option(
        1.0,
        "MLP hidden of each channel = multiple * vanilla / (channels + shared_channels) "
        "(unused if no multi-channel layer)",
        min=0.0,
        min_exclusive=True,
    )
    merge: str = option(
        "softmax",
        "channel merge: per-element softmax convex combination, mean, or max (unused if no "
        "multi-channel layer)",
        choices=tuple(MERGES),
    )

    @property
    def sizes(self) -> tuple[int, ...]:
        """Items per group at each level: (L, K_1, …, K_n)."""
        return (self.group_len, *parse_sizes(self.latents, "latents"))

    @property
    def level_widths(self) -> tuple[int, ...]:
        """Width of each level: (w_0, …, w_{n-1}, d_model)."""
        outer = parse_sizes(self.widths, "widths") or uniform_widths(self.d_model, self.latents)
        return (*outer, self.d_model)

    @property
    def max_groups(self) -> int:
        """Groups in a full block: ceil(block_size / group_len)."""
        return -(-self.block_size // self.group_len)

    @property
    def channel_hidden(self) -> int:
        """Hidden width of each channel MLP and each shared MLP of a multi-channel layer."""
        vanilla = mlp_hidden(self.mlp, self.d_model, self.mlp_ratio)
        n_mlps = self.channels + self.shared_channels
        return max(1, round(self.channel_mlp_multiple * vanilla / n_mlps))

    def is_multichannel(self, layer: int) -> bool:
        """Whether latent layer `layer` (0-based) is multi-channel."""
        return self.multichannel_every > 0 and (layer + 1) % self.multichannel_every == 0

    def anchors(
        self, level: int, n_groups: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """Anchor (last token it may depend on) of every item of `level`, (n_groups * K_level,)."""
        k = self.sizes[level]
        offsets = torch.arange(self.group_len - k, self.group_len, device=device)
        starts = torch.arange(n_groups, device=device) * self.group_len
        return (starts[:, None] + offsets[None, :]).flatten()

    def validate(self) -> None:
        """Check constraints between options; raise ConfigError naming the options."""
        if self.group_len > self.block_size:
            raise ConfigError(
                f"group_len={self.group_len} exceeds block_size={self.block_size}: "
                "a block would not fill one group"
            )
        sizes = self.sizes
        if len(sizes) < 2:
            raise ConfigError("latents='' must name at least one level, e.g. '4' or '4,2'")
        if any(inner >= outer for outer, inner in zip(sizes[:-1], sizes[1:], strict=True)):
            raise ConfigError(
                f"latents={self.latents!r} must decrease strictly and stay below "
                f"group_len={self.group_len} (each level compresses its group)"
            )
        n_outer = len(parse_sizes(self.widths, "widths"))
        if n_outer and n_outer != len(sizes) - 1:
            raise ConfigError(
                f"widths={self.widths!r} names {n_outer} widths, but latents={self.latents!r} "
                f"needs {len(sizes) - 1} (token level and each outer level; the innermost is "
                f"d_model)"
            )
        named = [("d_model", self.d_model)] + [
            ("widths", w) for w in parse_sizes(self.widths, "widths")
        ]
        for name, width in named:
            if width % self.n_head:
                raise ConfigError(f"{name}: width {width} is not divisible by n_head={self.n_head}")
            if (width // self.n_head) % 2:
                raise ConfigError(
                    f"{name}: head width {width}/{self.n_head}={width // self.n_head} must be "
                    "even for RoPE"
                )
        if self.compression == "keep_last" and self.compress_layers == 0:
            raise ConfigError(
                "compress_layers=0 with compression=keep_last would drop all but the last items "
                "of every group; use compress_layers >= 1 or compression=perceiver"
            )
        if self.multichannel_every > self.n_layer:
            raise ConfigError(
                f"multichannel_every={self.multichannel_every} exceeds n_layer={self.n_layer}: "
                "no latent layer would be multi-channel (use 0 for none)"
            )


def perceiver_mask(k_in: int, k_out: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (k_out, k_in) mask: latent i may read group item j iff j <= k_in - k_out + i."""
    rows = torch.arange(k_out, device=device)[:, None]
    cols = torch.arange(k_in, device=device)[None, :]
    return cols <= k_in - k_out + rows


class CrossAttention(nn.Module):
    """Multi-head attention from queries (width d_q) to a key/value source (width d_kv) under an
    explicit boolean mask, RoPE at given positions; output width d_q, with residual dropout."""

    def __init__(self, d_q: int, d_kv: int, n_head: int, rope: RotaryEmbedding, dropout: float):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_q // n_head
        self.q = nn.Linear(d_q, d_q, bias=False)
        self.kv = nn.Linear(d_kv, 2 * d_q, bias=False)
        self.proj = nn.Linear(d_q, d_q, bias=False)
        self.rope = rope
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        source: torch.Tensor,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        """queries (N, Tq, d_q) attend to source (N, Tk, d_kv) where allowed (Tq, Tk) is True."""
        n, tq, d = queries.shape
        tk = source.shape[1]
        q = self.q(queries).view(n, tq, self.n_head, self.head_dim).transpose(1, 2)
        k, v = self.kv(source).view(n, tk, 2, self.n_head, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.rope(q, q_pos), self.rope(k, k_pos)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(n, tq, d)))


class LevelStack(nn.Module):
    """Blocks at one level on (B, G, K, w): "local" ones run on each group alone, "global" ones
    on the level's whole sequence (B, G * K, w)."""

    def __init__(self, kinds: tuple[str, ...], make_block: Callable[[], nn.Module]):
        super().__init__()
        self.kinds = kinds
        self.blocks = nn.ModuleList(make_block() for _ in kinds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the blocks in order; shape (B, G, K, w) is kept."""
        b, g, k, w = x.shape
        for kind, block in zip(self.kinds, self.blocks, strict=True):
            if kind == "local":
                x = block(x.reshape(b * g, k, w)).view(b, g, k, w)
            else:
                x = block(x.reshape(b, g * k, w)).view(b, g, k, w)
        return x


class EncoderLevel(nn.Module):
    """Compress level l-1 (B, G, K_{l-1}, w_{l-1}) to level l (B, G, K_l, w_l); also return the
    level-(l-1) stream after the local blocks, the decoder's skip."""

    def __init__(self, config: HourglassConfig, level: int, parts: _Parts, slot: nn.Embedding):
        super().__init__()
        c = config
        self.k_in, self.k_out = c.sizes[level - 1], c.sizes[level]
        w_in, w_out = c.level_widths[level - 1], c.level_widths[level]
        self.encode = LevelStack(("local",) * c.compress_layers, lambda: parts.block(w_in))
        self.to_width = nn.Linear(w_in, w_out, bias=False) if w_in != w_out else nn.Identity()
        self.cross = None
        if c.compression == "perceiver":
            self.norm_q = make_norm(c.norm, w_out)
            self.norm_kv = make_norm(c.norm, w_in)
            self.cross = CrossAttention(w_out, w_in, c.n_head, parts.rope(w_out), c.dropout)
            self.register_buffer("mask", perceiver_mask(self.k_in, self.k_out), persistent=False)
        self.slot = slot
        self.stack = LevelStack(parts.kinds, lambda: parts.block(w_out))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local blocks (→ skip), keep the last K_l items (+ perceiver cross-attention), slot
        embedding, local/global blocks (→ level l)."""
        b, g = x.shape[:2]
        x = self.encode(x)
        latents = self.to_width(x[:, :, -self.k_out :])
        if self.cross is not None:
            # Positions within the group: queries sit on the last K_l slots (their anchors).
            k_pos = torch.arange(self.k_in, device=x.device)
            q_pos = k_pos[-self.k_out :]
            queries = self.norm_q(latents).flatten(0, 1)
            source = self.norm_kv(x).flatten(0, 1)
            update = self.cross(queries, source, q_pos, k_pos, self.mask)
            latents = latents + update.view(b, g, self.k_out, -1)
        return x, self.stack(latents + self.slot.weight)


class DecoderLevel(nn.Module):
    """Upsample level l (B, G, K_l, w_l) to level l-1 (B, G, K_{l-1}, w_{l-1}), joined with the
    encoder's level-(l-1) skip."""

    def __init__(self, config: HourglassConfig, level: int, parts: _Parts, slot: nn.Embedding):
        super().__init__()
        c = config
        self.config, self.level = c, level
        k_in, k_out = c.sizes[level], c.sizes[level - 1]
        w_in, w_out = c.level_widths[level], c.level_widths[level - 1]
        fill = k_out - k_in
        # Slot s < fill of group g takes latent (s - fill) mod K_l of group g - 1.
        self.register_buffer("tile", (torch.arange(fill) - fill) % k_in, persistent=False)
        self.first_group = nn.Parameter(torch.zeros(fill, w_in))
        self.norm_up = make_norm(c.norm, w_in)
        self.norm_skip = make_norm(c.norm, w_out)
        self.to_width = nn.Linear(w_in, w_out, bias=False) if w_in != w_out else nn.Identity()
        self.slot = slot
        self.cross = None
        if c.upsampling == "attention":
            self.norm_q = make_norm(c.norm, w_out)
            self.norm_kv = make_norm(c.norm, w_in)
            self.null = nn.Parameter(torch.zeros(1, w_in))
            self.cross = CrossAttention(w_out, w_in, c.n_head, parts.rope(w_out), c.dropout)
        self.stack = LevelStack(parts.kinds, lambda: parts.block(w_out))

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat upsampling (B, G, K_l, w_l) → (B, G, K_{l-1}, w_l): [previous group's latents
        tiled (learned vectors for group 0); the group's own latents]."""
        b = x.shape[0]
        previous = x[:, :-1, self.tile]
        filler = torch.cat((self.first_group.expand(b, 1, -1, -1), previous), dim=1)
        return torch.cat((filler, x), dim=2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample, slot embedding, skip (pre), attention upsampling, blocks, skip (post)."""
        b, g, k_in, w_in = x.shape
        # Both streams are normalised before they meet, so neither drowns the other.
        up = self.to_width(self.norm_up(self.upsample(x))) + self.slot.weight
        skip = self.norm_skip(skip)
        if self.config.skip == "pre":
            up = up + skip
        if self.cross is not None:
            k_out, w_out = up.shape[2:]
            # Anchors shifted by one so that the null key sits at position 0, before everything.
            q_pos = self.config.anchors(self.level - 1, g, x.device) + 1
            latent_pos = self.config.anchors(self.level, g, x.device) + 1
            k_pos = torch.cat((latent_pos.new_zeros(1), latent_pos))
            allowed = k_pos[None, :] <= q_pos[:, None]
            source = torch.cat((self.null.expand(b, 1, w_in), x.reshape(b, g * k_in, w_in)), 1)
            queries = self.norm_q(up).reshape(b, g * k_out, w_out)
            update = self.cross(queries, self.norm_kv(source), q_pos, k_pos, allowed)
            up = up + update.view(b, g, k_out, w_out)
        up = self.stack(up)
        if self.config.skip == "post":
            up = up + skip
        return up


class ChannelMLPs(nn.Module):
    """`n` independent MLPs of one kind, batched over the first axis: (n, N, d) → (n, N, d).

    Weights are stored input-major: `gate_up` (n, d, 2h for SwiGLU [gate | up], h for GELU) and
    `down` (n, h, d), so MLP c equals MLPS[kind] with weights gate_up[c].T and down[c].T.
    """

    def __init__(self, kind: str, n: int, d_model: int, hidden: int):
        super().__init__()
        self.kind = kind
        width_in = 2 * hidden if kind == "swiglu" else hidden
        self.gate_up = nn.Parameter(torch.zeros(n, d_model, width_in))
        self.down = nn.Parameter(torch.zeros(n, hidden, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply MLP c to x[c] for every c."""
        h = torch.bmm(x, self.gate_up)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return torch.bmm(h, self.down)


class MultiChannelBlock(nn.Module):
    """A latent block with `channels` parallel causal attentions (own q/k/v, shared output
    projection), one residual stream and MLP per channel, shared MLPs, and a per-element merge."""

    def __init__(self, config: HourglassConfig, rope: RotaryEmbedding):
        super().__init__()
        c = config
        d = c.d_model
        self.channels, self.n_head, self.merge = c.channels, c.n_head, c.merge
        self.norm_attn = make_norm(c.norm, d)
        # Rows [3d*c, 3d*(c+1)) are channel c's [q; k; v], the layout of CausalSelfAttention.qkv.
        self.qkv = nn.Linear(d, 3 * d * c.channels, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.rope = rope
        self.norm_mlp = make_norm(c.norm, d)
        self.mlps = ChannelMLPs(c.mlp, c.channels, d, c.channel_hidden)
        shared = c.shared_channels * c.channel_hidden
        self.shared = MLPS[c.mlp](d, shared) if c.shared_channels else None
        self.attn_dropout = c.dropout
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) → merged channel streams (B, T, d)."""
        b, t, d = x.shape
        s, heads = self.channels, self.n_head
        qkv = self.qkv(self.norm_attn(x)).view(b, t, s, 3, heads, d // heads)
        # Each channel's heads are independent causal heads: run all s * n_head at once.
        q, k, v = (part.reshape(b, t, s * heads, -1).transpose(1, 2) for part in qkv.unbind(3))
        q, k = self.rope(q), self.rope(k)
        y = causal_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.view(b, s, heads, t, -1).permute(1, 0, 3, 2, 4).reshape(s, b, t, d)
        streams = x + self.dropout(self.proj(y))  # (s, B, T, d)
        h = self.norm_mlp(streams)
        update = self.mlps(h.view(s, b * t, d)).view(s, b, t, d)
        if self.shared is not None:
            update = update + self.shared(h)
        return MERGES[self.merge](streams + self.dropout(update))


@dataclass
class _Parts:
    """Factories shared by the levels: one RoPE table per head width, block order, blocks."""

    config: HourglassConfig
    ropes: nn.ModuleDict

    @property
    def kinds(self) -> tuple[str, ...]:
        """Local/global order of a level's `level_layers` pairs."""
        n = self.config.level_layers
        if self.config.local_global == "alternate":
            return ("local", "global") * n
        return ("local",) * n + ("global",) * n

    def rope(self, width: int) -> RotaryEmbedding:
        """The RoPE table for heads of `width / n_head` (built once, up to a padded block + 1)."""
        c = self.config
        key = str(width)
        if key not in self.ropes:
            length = c.max_groups * c.group_len + 1
            self.ropes[key] = RotaryEmbedding(width // c.n_head, length, c.rope_base)
        return self.ropes[key]

    def block(self, width: int) -> Block:
        """A baseline pre-norm block of `width` (causal attention over its input's time axis)."""
        c = self.config
        attention = CausalSelfAttention(width, c.n_head, c.n_head, self.rope(width), c.dropout)
        mlp = MLPS[c.mlp](width, mlp_hidden(c.mlp, width, c.mlp_ratio))
        return Block(width, attention, mlp, c.norm, c.dropout)


class Hourglass(LanguageModel):
    """Embedding → encoder levels 1…n → latent block → decoder levels n…1 → norm → unembedding."""

    def __init__(self, config: HourglassConfig):
        super().__init__()
        self.config = config
        c = config
        n_levels = len(c.sizes) - 1
        widths = c.level_widths
        parts = _Parts(c, nn.ModuleDict())
        self.embed = nn.Embedding(c.vocab_size, widths[0])
        # Slot (position-in-group) embeddings per level, shared by encoder and decoder.
        self.slots = nn.ModuleList(nn.Embedding(k, w) for k, w in zip(c.sizes, widths, strict=True))
        self.encoder = nn.ModuleList(
            EncoderLevel(c, level, parts, self.slots[level]) for level in range(1, n_levels + 1)
        )
        rope = parts.rope(c.d_model)
        self.latent = nn.ModuleList(
            MultiChannelBlock(c, rope) if c.is_multichannel(i) else parts.block(c.d_model)
            for i in range(c.n_layer)
        )
        self.decoder = nn.ModuleList(
            DecoderLevel(c, level, parts, self.slots[level - 1]) for level in range(n_levels, 0, -1)
        )
        self.norm_out = make_norm(c.norm, widths[0])
        self.unembed = nn.Linear(widths[0], c.vocab_size, bias=False)
        self._init_weights(n_levels)
        if c.tie_embeddings:
            self.unembed.weight = self.embed.weight

    def _init_weights(self, n_levels: int) -> None:
        """GPT-2 init scaled by the blocks on a token's path; batched MLPs and learned fillers."""
        c = self.config
        depth = n_levels * (c.compress_layers + 4 * c.level_layers) + c.n_layer
        init_weights(self, c.init_std, depth)
        residual_std = c.init_std / math.sqrt(2 * depth)
        for name, param in self.named_parameters():
            if name.endswith(("first_group", "null", "gate_up")):
                nn.init.normal_(param, 0.0, c.init_std)
            elif name.endswith("mlps.down"):
                nn.init.normal_(param, 0.0, residual_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size) for token ids idx (B, T), T <= block_size."""
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        length = self.config.group_len
        groups = -(-t // length)
        # Right padding to whole groups: only positions >= t, which nothing before t reads.
        idx = F.pad(idx, (0, groups * length - t))
        x = self.embed(idx).view(b, groups, length, -1)
        skips = []
        for level in self.encoder:
            skip, x = level(x)
            skips.append(skip)
        _, _, k, d = x.shape
        x = x.reshape(b, groups * k, d)
        for block in self.latent:
            x = block(x)
        x = x.view(b, groups, k, d)
        for level in self.decoder:
            x = level(x, skips.pop())
        x = x.reshape(b, groups * length, -1)[:, :t]
        return self.unembed(self.norm_out(x))
