"""`futureformer`: sketch the farther future first, then predict the next token — causally.

A re-implementation of the idea of FutureFormer (evintunador/FutureFormer, seed 000): predict
coarse "bags" of tokens further and further ahead, and let each later layer attend to the model's
*own* sketch of the future before it predicts the nearer future and, last, the next token.

Shapes: B sequences of T tokens, width d, vocabulary V, P = `future_levels`, m = `future_mult`.
`targets[:, t]` is the token after `idx[:, t]` (the usual shifted window), so token t+o is
`targets[:, t + o - 1]`.

Spans. At position t, span k (k = 1 … P; 1 = nearest) is a set of future tokens:

    disjoint (default, the README's idea): lengths m, m², …, m^P, back to back from offset +2,
        e.g. m = 2, P = 3:  span 1 = t+2…t+3,  span 2 = t+4…t+7,  span 3 = t+8…t+15
    nested (what the original code did): span k = t+2 … t+1+m^k (all start at +2)

Token t+1 is not in any span: it is the next-token target. Span k's target at position t is the
multi-hot bag of its L_k tokens (order and multiplicity dropped). Positions whose span runs past
the end of the window have no target: they are left out of that span's loss (not padded).

Layers. `n_layer` ordinary decoder blocks (the body), then P future-sight levels, each a decoder
block with one extra sub-layer, cross-attention to a memory. One output head, head(h) =
unembed(norm_out(h)) (tied to the embedding unless tie_embeddings=false), makes every prediction:

    idx (B, T) ─embed─► x ─► n_layer body blocks ─► h_0                       (B, T, d)
    for j = 1 … P, with k = P - j + 1 (the span level j reads; farthest first):
        z_k   = head(h_{j-1})                  (B, T, V)  span k's prediction (built in chunks)
        mem_j = pool_j(top tokens of z_k)      (B, T, K_k, d)  K_k slots per position
        h_j   = level_j(h_{j-1}, mem_j)        x + attn(norm x); x + cross(norm x, mem); x + mlp
    next-token logits = head(h_P)              (B, T, V)  the only thing `forward` returns

So the body's output predicts the farthest span, each level's output predicts the next nearer
span, and the last level, which reads the nearest span, predicts the next token. Each level reads
the one span it predicted, as the seed's README and the original's inference path do (the
original's training path let level j cross-attend to the spans of all levels before it joined
along the slot axis: one more way its training and inference differed).

Memory. From z_k[b, t] take the N_k = min(memory_topk, L_k, V) highest-scoring tokens (sorted,
best first), embed them with the shared embedding and normalise them (`norm_memory`): items
(B, T, N_k, d). With `memory=soft` each item is multiplied by its predicted probability
(sigmoid of the bag logit for `future_loss=bce`, softmax over the vocabulary for `softmax_ce`), so
gradient reaches the predicting head through the memory; with `memory=topk` (what the original's
inference did) items are unweighted and each prediction is trained by its own loss only. The
memory is never normalised after pooling, because a norm would cancel the probability weights.
The same code runs in `forward` (inference) and in `loss` (training): ground truth enters only
the losses.

Pooling turns the N_k items of a position into K_k slots (`pooling`):

    sum | mean | max    the items, in rank order, split into K contiguous groups of near-equal size
                        (torch.tensor_split); each group is summed / averaged / max-ed (no weights)
    linear              flatten the N·d item values, one Linear(N·d → K·d)
    parametric_sum      slot k = W_k · Σ_i item_i            (one Linear(d → K·d) on the sum)
    parametric_max      slot k = max_i W_k · item_i          (elementwise max over the items)
    attention           slot k = Σ_i softmax_i(w_k · item_i) item_i    (learned w_k ∈ R^d)
    self_attention      slot k = Σ_i softmax_i(q_k·Wk item_i / √d) Wv item_i, learned queries q_k
    self_attention_dynamic   the same with q_k = (Wq norm(h_{j-1}[t]))_k: queries from the
                        current position's state (the open TODO of the original)

The slot count K_k follows `pool_slots` with n = `pool_slots_n` as a function of the span's
distance x = k - 1 (0 = nearest): constant ⌊n⌋, linear 1 + ⌊n·x⌋, root ⌊(x+1)^(1/n)⌋, log
1 + ⌊log_n(x+1)⌋ (n > 1), poly ⌊(x+1)^n⌋ (the original's five schedules), capped at N_k (N tokens
never become more than N slots). The default is 2 slots per span (constant, n = 2). Where
N_k = K_k (span 1 at the defaults: 2 tokens, 2 slots) each slot is one item, and sum, mean and max
pool that span identically. With one slot (the original's default) the cross-attention below
degenerates: a softmax over one slot is 1, so the level reads a linear map of that slot, and its
query weights and norm get no gradient (but count in the parameters); the configuration warns
when a span gets one slot.

Cross-attention is per position: the query of h[t] attends over the K_k slots of position t only
(multi-head, grouped key/value heads as in self-attention, no RoPE, no mask).

Causality. The body is causal, so h_0[t] depends on idx[:, :t+1] only. z_k[t], the top tokens and
weights, the pooled slots and the dynamic queries of position t are functions of h[t] alone, and
cross-attention at t reads only position t's slots, so h_1[t] depends on idx[:, :t+1] only; by
induction so do all levels and the logits. (The original built the memory at t from the
*ground-truth* tokens t+2…, so the next layer's self-attention let position t+1 read its own
answer, and its inference path computed something else.)

Loss. total = next_token + Σ_k λ^k · span_k with λ = `future_loss_weight` (span 1 is at distance
1: farther spans are down-weighted geometrically; λ = 0 trains the next token only).
`future_loss=bce`: Σ over the V vocabulary entries of binary cross-entropy against the multi-hot
bag (the negative log-likelihood of the bag in nats per position); each span has a learned scalar
logit offset initialised to the prior log-odds of a token being in a bag of L_k, so that the loss
does not start at V·ln 2. (The original averaged over the V entries too, which divides the span
gradients by V and all but switches future sight off.) `softmax_ce`: cross-entropy of softmax(z)
against the bag's empirical token distribution (counts / L_k). Each span loss is a mean over its
unmasked positions. Targets equal to IGNORE_INDEX (-100, tokens outside a synthetic task's
answers) count nowhere: the next-token loss is a mean over the other targets, a bag holds only
the other tokens of its span, and a position whose span has none is masked out of that span's
loss. `parts` holds next_token and span_1 … span_P; evaluation scores `forward`'s next-token
logits only.

Memory (RAM). P + 1 full (B, T, V) logit tensors, each with the intermediates of its loss,
multiply the baseline's largest activation by P + 1. Where that is small (B·T·V at most
`KEEP_LOGITS_ELEMENTS`, e.g. a character vocabulary) they are kept. Larger head passes (a BPE
vocabulary) run over chunks of `HEAD_CHUNK_ROWS` positions under activation checkpointing: only
h (B, T, d), the top tokens and their weights are kept, each chunk's logits are recomputed in the
backward pass, and `loss` never holds more than one chunk of logits. `forward` also computes
each span's (B, T, V) logits, for the top-k memory (chunked the same way when large), but keeps
only the returned next-token logits.

Size. `n_layer` counts the body blocks: the model has n_layer + P blocks, P of them with a
cross-attention (4·d² weights with n_kv_heads = n_head), plus the poolers' weights (none for sum,
mean and max). A parameter-matched `gpt` has n_layer + P blocks and a wider MLP: at d = 128,
n_layer = 2, P = 2 with sum pooling (0.964M) matches gpt with 4 blocks and mlp_ratio = 5 (0.968M).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archbench.errors import ConfigError
from archbench.models.blocks import (
    IGNORE_INDEX,
    KEEP_LOGITS_ELEMENTS,
    LanguageModel,
    init_weights,
    make_norm,
    recompute_in_backward,
)
from archbench.models.gpt import GPTConfig
from archbench.options import option

# Slots per span (before flooring and the cap at N_k) as a function of the span's distance x
# (0 = nearest) and the schedule's parameter n (option `pool_slots_n`): the original's five.
SLOT_SCHEDULES: dict[str, Callable[[int, float], float]] = {
    "constant": lambda x, n: n,
    "linear": lambda x, n: 1 + n * x,
    "root": lambda x, n: (x + 1) ** (1 / n),
    "log": lambda x, n: 1 + math.log(x + 1, n),
    "poly": lambda x, n: (x + 1) ** n,
}
# Positions per head pass above KEEP_LOGITS_ELEMENTS: bounds the logits alive (see "Memory").
HEAD_CHUNK_ROWS = 1024


class GroupPool(nn.Module):
    """sum / mean / max: the N items (in rank order) split into K groups, each reduced to a slot."""

    def __init__(self, kind: str, slots: int):
        super().__init__()
        self.reduce = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax}[kind]
        self.slots = slots

    def forward(self, items: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Pool items (B, T, N, d) into (B, T, K, d); `state` is unused."""
        groups = items.tensor_split(self.slots, dim=2)
        return torch.stack([self.reduce(group, dim=2) for group in groups], dim=2)


class LinearPool(nn.Module):
    """Flatten the N items of a position and project them to K slots with one linear map."""

    def __init__(self, d_model: int, n_items: int, slots: int):
        super().__init__()
        self.proj_items = nn.Linear(n_items * d_model, slots * d_model, bias=False)
        self.slots = slots

    def forward(self, items: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Pool items (B, T, N, d) into (B, T, K, d); `state` is unused."""
        b, t, _, d = items.shape
        return self.proj_items(items.flatten(2)).view(b, t, self.slots, d)


class ParametricPool(nn.Module):
    """K learned maps W_k: slot k = W_k Σ_i item_i (sum) or max_i W_k item_i (max, elementwise)."""

    def __init__(self, kind: str, d_model: int, slots: int):
        super().__init__()
        self.maps = nn.Linear(d_model, slots * d_model, bias=False)
        self.kind, self.slots = kind, slots

    def forward(self, items: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Pool items (B, T, N, d) into (B, T, K, d); `state` is unused."""
        b, t, _, d = items.shape
        pooled = self.maps(items.sum(2)) if self.kind == "sum" else self.maps(items).amax(2)
        return pooled.view(b, t, self.slots, d)


class AttentionPool(nn.Module):
    """Slot k = Σ_i a_ki item_i, a_k = softmax over the items of learned scores w_k · item_i."""

    def __init__(self, d_model: int, slots: int):
        super().__init__()
        self.score = nn.Linear(d_model, slots, bias=False)

    def forward(self, items: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Pool items (B, T, N, d) into (B, T, K, d); `state` is unused."""
        weights = self.score(items).softmax(dim=2)  # (B, T, N, K)
        return torch.einsum("btnk,btnd->btkd", weights, items)


class SelfAttentionPool(nn.Module):
    """K queries attend over the items (keys Wk item, values Wv item, scale 1/√d). The queries are
    learned vectors, or, if `dynamic`, Wq norm(state) from the current position's state."""

    def __init__(self, d_model: int, slots: int, dynamic: bool, norm: str):
        super().__init__()
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.slots, self.dynamic = slots, dynamic
        if dynamic:
            self.norm_state = make_norm(norm, d_model)
            self.query = nn.Linear(d_model, slots * d_model, bias=False)
        else:
            self.queries = nn.Parameter(torch.empty(slots, d_model))

    def forward(self, items: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Pool items (B, T, N, d) into (B, T, K, d), with state (B, T, d) for dynamic queries."""
        b, t, _, d = items.shape
        if self.dynamic:
            queries = self.query(self.norm_state(state)).view(b, t, self.slots, d)
        else:
            queries = self.queries.expand(b, t, self.slots, d)
        scores = torch.einsum("btkd,btnd->btkn", queries, self.key(items)) / math.sqrt(d)
        return torch.einsum("btkn,btnd->btkd", scores.softmax(dim=-1), self.value(items))


# The poolings (option `pooling`), by name: each builds its module from (d_model, N items,
# K slots, norm kind).
POOLS: dict[str, Callable[[int, int, int, str], nn.Module]] = {
    "sum": lambda d, n, k, norm: GroupPool("sum", k),
    "mean": lambda d, n, k, norm: GroupPool("mean", k),
    "max": lambda d, n, k, norm: GroupPool("max", k),
    "linear": lambda d, n, k, norm: LinearPool(d, n, k),
    "parametric_sum": lambda d, n, k, norm: ParametricPool("sum", d, k),
    "parametric_max": lambda d, n, k, norm: ParametricPool("max", d, k),
    "attention": lambda d, n, k, norm: AttentionPool(d, k),
    "self_attention": lambda d, n, k, norm: SelfAttentionPool(d, k, False, norm),
    "self_attention_dynamic": lambda d, n, k, norm: SelfAttentionPool(d, k, True, norm),
}
POOLINGS = tuple(POOLS)


def make_pool(kind: str, d_model: int, n_items: int, slots: int, norm: str) -> nn.Module:
    """The pooling module `kind` (a key of POOLS) for N = n_items items of width d_model and
    K = slots slots."""
    return POOLS[kind](d_model, n_items, slots, norm)


@dataclass(frozen=True)
class FutureFormerConfig(GPTConfig):
    """The baseline's options, with `n_layer` counting body blocks only, plus future sight."""

    n_layer: int = option(
        2,
        "body decoder blocks before the future-sight levels (total n_layer + future_levels)",
        min=1,
    )
    future_levels: int = option(
        2, "future-sight levels P = spans predicted before the next token", min=1
    )
    future_mult: int = option(
        2, "span length multiplier m: spans of m, m^2, ..., m^P tokens", min=2
    )
    spans: str = option(
        "disjoint",
        "span layout: disjoint chunks from t+2, or nested t+2..t+1+m^k (the original code)",
        choices=("disjoint", "nested"),
    )
    memory: str = option(
        "topk",
        "memory items: top predicted tokens (topk) or weighted by their probabilities (soft)",
        choices=("topk", "soft"),
    )
    memory_topk: int = option(
        8, "predicted tokens per span kept as memory (capped at the span length)", min=1
    )
    pooling: str = option("sum", "how a span's memory items become slots", choices=POOLINGS)
    pool_slots: str = option(
        "constant", "slots per span as a function of its distance", choices=tuple(SLOT_SCHEDULES)
    )
    pool_slots_n: float = option(
        2.0, "the parameter n of the pool_slots schedule", min=1.0, max=16.0
    )
    future_loss: str = option(
        "bce",
        "span loss: multi-hot binary cross-entropy, or cross-entropy to the bag's distribution",
        choices=("bce", "softmax_ce"),
    )
    future_loss_weight: float = option(
        0.1, "lambda: span k's loss is weighted lambda^k (0 = next-token loss only)", min=0.0
    )

    def extra_blocks(self) -> int:
        """The future-sight levels, one block each, after the n_layer body blocks."""
        return self.future_levels

    def span_layout(self) -> list[tuple[int, int]]:
        """(offset, length) of spans 1 … P: span k covers tokens t+offset … t+offset+length-1."""
        lengths = [self.future_mult**k for k in range(1, self.future_levels + 1)]
        if self.spans == "nested":
            return [(2, length) for length in lengths]
        offsets = [2 + sum(lengths[:i]) for i in range(len(lengths))]
        return list(zip(offsets, lengths, strict=True))

    def reach(self) -> int:
        """The farthest offset any span looks at (t + reach)."""
        return max(offset + length - 1 for offset, length in self.span_layout())

    def memory_items(self, k: int) -> int:
        """N_k: predicted tokens of span k (1 = nearest) kept as memory items."""
        _, length = self.span_layout()[k - 1]
        return min(self.memory_topk, length, self.vocab_size)

    def memory_slots(self, k: int) -> int:
        """K_k: pooled slots of span k, from the pool_slots schedule, capped at N_k."""
        eps = 1e-9  # so that e.g. 64 ** (1/3) = 3.99…96 still floors to 4
        slots = SLOT_SCHEDULES[self.pool_slots](k - 1, self.pool_slots_n)
        return max(1, min(math.floor(slots + eps), self.memory_items(k)))

    def validate(self) -> None:
        """Check constraints between options; raise ConfigError naming the options."""
        super().validate()
        if self.pool_slots == "log" and self.pool_slots_n <= 1:
            raise ConfigError(
                f"pool_slots=log needs pool_slots_n > 1 (the base of its logarithm), got "
                f"{self.pool_slots_n}"
            )
        if self.reach() > self.block_size:
            raise ConfigError(
                f"future_levels={self.future_levels}, future_mult={self.future_mult} with "
                f"spans={self.spans} look {self.reach()} tokens ahead, but block_size="
                f"{self.block_size} allows at most {self.block_size} (the targets of a window "
                "of T tokens reach t+T from its first position)"
            )
        single = [k for k in range(1, self.future_levels + 1) if self.memory_slots(k) == 1]
        if single:
            warnings.warn(
                f"futureformer span(s) {', '.join(map(str, single))} get one memory slot "
                f"(pool_slots={self.pool_slots}, pool_slots_n={self.pool_slots_n}, memory_topk="
                f"{self.memory_topk}): a softmax over one slot is 1, so the cross-attention "
                "reading it trains no query weights (they still count in the parameters)",
                stacklevel=2,
            )

    def check_window(self, length: int) -> None:
        """The farthest span must fit in a training window at least once (its targets reach
        `length` tokens ahead of the window's first position), or its loss is 0 at every step."""
        if self.reach() > length:
            raise ConfigError(
                f"future_levels={self.future_levels}, future_mult={self.future_mult} with "
                f"spans={self.spans} look {self.reach()} tokens ahead, but a training window of "
                f"{length} tokens allows at most {length}: the farthest span would never "
                "have a target"
            )


def span_targets(
    targets: torch.Tensor, offset: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of one span at every position, and which positions have the whole span.

    `targets` (B, T) holds token t+1 at index t. Returns ids (B, T, length) with ids[:, t] =
    tokens t+offset … t+offset+length-1 (zeros where the window ends) and valid (T,) bool.
    """
    t = targets.shape[1]
    first = offset - 1  # index into targets of token t+offset
    padded = F.pad(targets, (0, first + length - 1))
    ids = padded[:, first:].unfold(1, length, 1)[:, :t]
    valid = torch.arange(t, device=targets.device) + first + length <= t
    return ids, valid


def bag_loss(
    logits: torch.Tensor, ids: torch.Tensor, kind: str, offset: torch.Tensor | None
) -> torch.Tensor:
    """Per-row loss (R,) of span logits (R, V) against span token ids (R, L).

    bce: summed binary cross-entropy of logits + offset against the multi-hot bag; softmax_ce:
    cross-entropy of softmax(logits) against the token counts / their number. Ids equal to
    IGNORE_INDEX are left out of the bag (a row with none left gets an empty bag).
    """
    keep = ids != IGNORE_INDEX
    index = ids.masked_fill(~keep, 0)
    if kind == "bce":
        hits = torch.zeros_like(logits).scatter_add_(1, index, keep.to(logits.dtype))
        bag = hits.clamp_(max=1.0)
        return F.binary_cross_entropy_with_logits(logits + offset, bag, reduction="none").sum(-1)
    share = keep.to(logits.dtype) / keep.sum(1, keepdim=True).clamp_min(1)
    distribution = torch.zeros_like(logits).scatter_add_(1, index, share)
    return -(distribution * F.log_softmax(logits, dim=-1)).sum(-1)


def over_row_chunks(
    fn: Callable[..., tuple], vocab: int, *rows: torch.Tensor
) -> list[torch.Tensor]:
    """Run the head pass `fn` on `rows`: in one piece when its logits (rows × `vocab`) are
    at most KEEP_LOGITS_ELEMENTS, else on aligned chunks of HEAD_CHUNK_ROWS rows under activation
    checkpointing (logits recomputed in the backward pass, not stored), each of its outputs
    concatenated over the chunks."""
    if rows[0].shape[0] * vocab <= KEEP_LOGITS_ELEMENTS:
        return list(fn(*rows))
    chunks = zip(*(r.split(HEAD_CHUNK_ROWS) for r in rows), strict=True)
    outputs = [recompute_in_backward(fn, *chunk) for chunk in chunks]
    return [torch.cat(parts) for parts in zip(*outputs, strict=True)]


class MemoryCrossAttention(nn.Module):
    """Each position's query attends over that position's own K memory slots only."""

    def __init__(self, d_model: int, n_head: int, n_kv_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.n_kv_heads = n_head, n_kv_heads
        self.head_dim = d_model // n_head
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * n_kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) attends to memory (B, T, K, d): one length-1 query per (b, t).

        With a handful of slots the scores and the weighted sum are element-wise products
        summed over the head dimension and over the slots, which inductor fuses; run as
        scaled_dot_product_attention over B·T one-query problems, the same step took 5-10%
        longer on the CPU (docs/performance.md)."""
        b, t, c = x.shape
        slots, group = memory.shape[2], self.n_head // self.n_kv_heads
        q = self.query(x).view(b, t, self.n_kv_heads, group, 1, self.head_dim)
        kv = self.kv(memory).view(b, t, slots, 2, self.n_kv_heads, 1, self.head_dim)
        k, v = kv.permute(3, 0, 1, 4, 5, 2, 6)  # each (b, t, kv heads, 1, K, head_dim)
        scores = (q * k).sum(-1) / math.sqrt(self.head_dim)  # (b, t, kv heads, group, K)
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        y = (weights.unsqueeze(-1) * v).sum(-2)  # (b, t, kv heads, group, head_dim)
        return self.proj(y.reshape(b, t, c))


class FutureSightBlock(nn.Module):
    """Pre-norm block with memory: x + attn(norm x), x + cross(norm x, memory), x + mlp(norm x)."""

    def __init__(
        self,
        d_model: int,
        attn: nn.Module,
        cross: nn.Module,
        mlp: nn.Module,
        norm: str,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm_attn, self.attn = make_norm(norm, d_model), attn
        self.norm_cross, self.cross = make_norm(norm, d_model), cross
        self.norm_mlp, self.mlp = make_norm(norm, d_model), mlp
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Apply the block to x (B, T, d) with memory slots (B, T, K, d)."""
        x = x + self.dropout(self.attn(self.norm_attn(x)))
        x = x + self.dropout(self.cross(self.norm_cross(x), memory))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


class FutureFormer(LanguageModel):
    """Body blocks → P future-sight levels reading the model's own span predictions → the head."""

    def __init__(self, config: FutureFormerConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        rope = c.make_rope()
        self.body = nn.ModuleList(c.make_block(rope) for _ in range(c.n_layer))
        self.levels = nn.ModuleList(
            FutureSightBlock(
                c.d_model,
                c.make_attention(rope),
                MemoryCrossAttention(c.d_model, c.n_head, c.kv_heads, c.dropout),
                c.make_mlp(),
                c.norm,
                c.dropout,
            )
            for _ in range(c.future_levels)
        )
        # Level j (0-based) reads span k = P - j; pools[j] pools that span's memory.
        read_spans = range(c.future_levels, 0, -1)
        self.pools = nn.ModuleList(
            make_pool(c.pooling, c.d_model, c.memory_items(k), c.memory_slots(k), c.norm)
            for k in read_spans
        )
        self.norm_memory = make_norm(c.norm, c.d_model)
        self.norm_out = make_norm(c.norm, c.d_model)
        self.unembed = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_weights(self, c.init_std, c.n_layer + c.future_levels)
        for pool in self.pools:
            if isinstance(pool, SelfAttentionPool) and not pool.dynamic:
                nn.init.normal_(pool.queries, 0.0, c.init_std)
        if c.future_loss == "bce":
            # Prior log-odds that a given token is among a span's L tokens (at most L / V).
            prior = [min(length / c.vocab_size, 0.5) for _, length in c.span_layout()]
            self.bag_bias = nn.Parameter(torch.tensor([math.log(p / (1 - p)) for p in prior]))
        if c.tie_embeddings:
            self.unembed.weight = self.embed.weight

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The shared output head: logits (..., V) of states h (..., d)."""
        return self.unembed(self.norm_out(h))

    def states(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run body and levels on idx (B, T): the last state h_P (B, T, d) and, when `targets`
        (B, T) is given, the mean loss of each span {k: loss} (k = 1 nearest)."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}"
            )
        h = self.embed(idx)
        for block in self.body:
            h = block(h)
        losses = {}
        # norm_memory acts on each embedding row alone: normalising the V rows of the table once
        # and gathering from it equals normalising the B·T·N gathered items, at V rows' cost.
        memory_table = self.norm_memory(self.embed.weight)
        for level, pool, k in zip(
            self.levels, self.pools, range(self.config.future_levels, 0, -1), strict=True
        ):
            top, weights, loss = self.read_span(h, k, targets)
            if loss is not None:
                losses[k] = loss
            items = F.embedding(top, memory_table) * weights.unsqueeze(-1)
            h = level(h, pool(items, h))
        return h, losses

    def read_span(
        self, h: torch.Tensor, k: int, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Predict span k from states h (B, T, d) with the head, chunk by chunk.

        Returns the top N_k token ids (B, T, N_k), their memory weights (B, T, N_k) (the
        predicted probabilities for memory=soft, ones for topk) and, if `targets` is given, the
        mean span loss over the positions that have the whole span with at least one token not
        IGNORE_INDEX (else None).
        """
        c = self.config
        b, t, d = h.shape
        offset, length = c.span_layout()[k - 1]
        rows = [h.reshape(b * t, d)]
        if targets is not None:
            ids, valid = span_targets(targets, offset, length)
            valid = valid & (ids != IGNORE_INDEX).any(-1)  # (B, T)
            rows.append(ids.reshape(b * t, length))

        def chunk(states: torch.Tensor, span_ids: torch.Tensor | None = None) -> tuple:
            logits = self.head(states)
            top = logits.topk(c.memory_items(k), dim=-1).indices
            bias = self.bag_bias[k - 1] if c.future_loss == "bce" else None
            if c.memory == "topk":
                weights = torch.ones(top.shape, dtype=logits.dtype, device=logits.device)
            elif c.future_loss == "bce":
                weights = torch.sigmoid(logits.gather(1, top) + bias)
            else:
                weights = logits.softmax(dim=-1).gather(1, top)
            if span_ids is None:
                return top, weights
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            return top, weights, bag_loss(wide, span_ids, c.future_loss, bias)

        out = over_row_chunks(chunk, c.vocab_size, *rows)
        top, weights = out[0].view(b, t, -1), out[1].view(b, t, -1)
        if targets is None:
            return top, weights, None
        row_loss = out[2].view(b, t) * valid
        return top, weights, row_loss.sum() / valid.sum().clamp(min=1)  # no .item(): compiles whole

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size) for token ids idx (B, T), T <= block_size."""
        h, _ = self.states(idx)
        return self.head(h)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """next_token + Σ_k future_loss_weight^k · span_k, and the parts (see module docstring)."""
        h, spans = self.states(idx, targets)
        b, t, d = h.shape

        def chunk(rows: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor]:
            logits = self.head(rows)
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            return (F.cross_entropy(wide, labels, reduction="none"),)

        (row_loss,) = over_row_chunks(
            chunk, self.config.vocab_size, h.reshape(b * t, d), targets.reshape(b * t)
        )
        next_token = row_loss.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)
        weight = self.config.future_loss_weight
        total = next_token + sum(weight**k * loss for k, loss in spans.items())
        parts = {"next_token": next_token.detach()}
        parts.update({f"span_{k}": spans[k].detach() for k in sorted(spans)})
        return total, parts
