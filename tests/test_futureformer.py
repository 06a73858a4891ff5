"""FutureFormer: span targets against hand-worked examples, every pooling type against a hand
computation, the loss decomposition, lambda = 0, the chunked head passes, and causality, prefix
consistency and determinism for every option value."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_deterministic

from archbench.errors import ConfigError
from archbench.models import futureformer as ff
from archbench.models.futureformer import (
    POOLINGS,
    SLOT_SCHEDULES,
    FutureFormer,
    FutureFormerConfig,
    bag_loss,
    make_pool,
    span_targets,
)
from archbench.models.gpt import GPT, GPTConfig
from archbench.options import coerce_all

VOCAB, BLOCK = 37, 24
SHAPE = {"n_layer": 2, "n_head": 4, "d_model": 32}
# Multi-slot memories (K up to 3) so that slot schedules and poolers have something to pool.
MULTI_SLOT = {"future_levels": 3, "pool_slots": "linear"}
CASES: list[dict[str, Any]] = [
    {},
    *({"pooling": p, **MULTI_SLOT} for p in POOLINGS),
    *({"pool_slots": s, "pool_slots_n": 2.0, "pooling": "attention"} for s in SLOT_SCHEDULES),
    {"pool_slots_n": 1.5, "pool_slots": "poly", "future_levels": 3},
    {"pool_slots_n": 1.0},
    {"spans": "nested"},
    {"spans": "nested", "future_levels": 3, "pooling": "linear"},
    {"memory": "soft"},
    {"memory": "soft", "future_loss": "softmax_ce", "pooling": "self_attention_dynamic"},
    {"future_loss": "softmax_ce"},
    {"memory_topk": 1},
    {"memory_topk": 3, "pooling": "linear"},
    {"future_levels": 1},
    {"future_levels": 3},
    {"future_mult": 3},
    {"future_mult": 4},
    {"future_loss_weight": 0.0},
    {"future_loss_weight": 1.0},
    {"n_layer": 1},
    {"n_kv_heads": 1, "pool_slots": "linear"},
    {"tie_embeddings": False},
    {"dropout": 0.1, "memory": "soft"},
]
IDS = ["-".join(f"{k}={v}" for k, v in case.items()) or "default" for case in CASES]


def make_config(block_size: int = BLOCK, **overrides: Any) -> FutureFormerConfig:
    """A validated config, checked the way the registry checks table values."""
    typed = coerce_all(FutureFormerConfig, {**SHAPE, **overrides}, "architecture 'futureformer'")
    config = FutureFormerConfig(vocab_size=VOCAB, block_size=block_size, **typed)
    config.validate()
    return config


def build(overrides: dict, dtype: torch.dtype = torch.float64) -> FutureFormer:
    """A small eval-mode model in `dtype`, seeded."""
    torch.manual_seed(0)
    return FutureFormer(make_config(**overrides)).to(dtype).eval()


def tokens(seed: int, batch: int = 2, length: int = BLOCK) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- spans and targets -----------------------------------------------------------------------


def test_span_layout_disjoint_and_nested() -> None:
    disjoint = make_config(block_size=32, future_levels=3, future_mult=2)
    assert disjoint.span_layout() == [(2, 2), (4, 4), (8, 8)]  # t+2…3, t+4…7, t+8…15
    assert disjoint.reach() == 15
    nested = make_config(block_size=32, future_levels=3, future_mult=2, spans="nested")
    assert nested.span_layout() == [(2, 2), (2, 4), (2, 8)]  # t+2…3, t+2…5, t+2…9
    assert nested.reach() == 9
    assert make_config(future_mult=3).span_layout() == [(2, 3), (5, 9)]


def test_span_targets_hand_worked() -> None:
    """Token ids = positions: token t+1 sits at targets[t], so span ids are offsets from t."""
    targets = torch.arange(1, 9).unsqueeze(0)  # window of 8 positions: tokens 1 … 8
    ids, valid = span_targets(targets, offset=2, length=2)  # tokens t+2, t+3
    assert ids[0, :6].tolist() == [[2, 3], [3, 4], [4, 5], [5, 6], [6, 7], [7, 8]]
    assert valid.tolist() == [True] * 6 + [False] * 2  # t = 6 would need token 9
    ids, valid = span_targets(targets, offset=4, length=4)  # tokens t+4 … t+7
    assert ids[0, :2].tolist() == [[4, 5, 6, 7], [5, 6, 7, 8]]
    assert valid.tolist() == [True] * 2 + [False] * 6
    ids, valid = span_targets(targets, offset=2, length=7)  # reach t+8 = the window's length
    assert ids[0, 0].tolist() == [2, 3, 4, 5, 6, 7, 8] and valid.tolist() == [True] + [False] * 7
    ids, valid = span_targets(targets, offset=2, length=8)  # nested span 3: t+2 … t+9
    assert ids.shape == (1, 8, 8) and not valid.any()


def test_a_block_as_long_as_the_reach_is_allowed() -> None:
    """Spans reaching t+15 have a target at position 0 of a 15-token window, not of 14."""
    assert make_config(block_size=15, future_levels=3).reach() == 15
    with pytest.raises(ConfigError, match="look 15 tokens ahead, but block_size=14 allows at most"):
        make_config(block_size=14, future_levels=3)


def test_bag_loss_hand_worked() -> None:
    """bce: multi-hot bag (duplicates count once); softmax_ce: token counts / L."""
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([[2, 2, 0]])  # bag {0, 2}; counts 0: 1/3, 2: 2/3
    offset = torch.tensor(-0.5, dtype=torch.float64)
    z = logits[0] + offset
    softplus = torch.log1p(torch.exp(z))
    expected_bce = softplus.sum() - z[0] - z[2]
    torch.testing.assert_close(bag_loss(logits, ids, "bce", offset), expected_bce.reshape(1))
    log_p = torch.log_softmax(logits[0], dim=0)
    expected_ce = -(log_p[0] / 3 + 2 * log_p[2] / 3)
    torch.testing.assert_close(bag_loss(logits, ids, "softmax_ce", None), expected_ce.reshape(1))


@pytest.mark.parametrize("spans", ["disjoint", "nested"])
@pytest.mark.parametrize("future_loss", ["bce", "softmax_ce"])
def test_span_losses_are_means_over_positions_with_whole_spans(
    spans: str, future_loss: str
) -> None:
    """Each span loss, recomputed position by position from full logits: positions whose span
    runs past the window are masked out (not counted as pad hits)."""
    model = build({"spans": spans, "future_loss": future_loss, "future_levels": 3})
    idx, targets = tokens(0), tokens(1)
    with torch.no_grad():
        _, losses = model.states(idx, targets)
        h = model.embed(idx)
        for block in model.body:
            h = block(h)
        for level, pool, k in zip(model.levels, model.pools, (3, 2, 1), strict=True):
            logits = model.head(h)
            offset, length = model.config.span_layout()[k - 1]
            per_position = []
            for t in range(BLOCK - offset - length + 2):
                window = targets[:, t + offset - 1 : t + offset - 1 + length]
                bias = model.bag_bias[k - 1] if future_loss == "bce" else None
                per_position.append(bag_loss(logits[:, t], window, future_loss, bias))
            expected = torch.cat(per_position).mean()
            torch.testing.assert_close(losses[k], expected, rtol=1e-12, atol=1e-12)
            top, weights, _ = model.read_span(h, k, None)
            items = model.norm_memory(model.embed(top)) * weights.unsqueeze(-1)
            h = level(h, pool(items, h))


def test_no_whole_span_gives_zero_loss_not_nan() -> None:
    model = build({"future_levels": 3}).train()
    idx = tokens(0, length=10)  # span 3 needs 16 tokens after t
    loss, parts = model.loss(idx, tokens(1, length=10))
    assert parts["span_3"].item() == 0.0 and torch.isfinite(loss)


# --- memory, slots and pooling ---------------------------------------------------------------


def test_slot_schedules_hand_worked() -> None:
    """Slots per span at distance x = 0, 1, 2, 3 for n = 2, capped at the span's N items."""
    expected = {
        "constant": [2, 2, 2, 2],
        "linear": [1, 3, 5, 7],  # 1 + 2x
        "root": [1, 1, 1, 2],  # floor(sqrt(x + 1))
        "log": [1, 2, 2, 3],  # 1 + floor(log2(x + 1)), the original's formula
        "poly": [1, 4, 8, 16],  # (x + 1)^2 = 1, 4, 9, 16 capped at N = 2, 4, 8, 16
    }
    for schedule, slots in expected.items():
        config = make_config(
            block_size=64, future_levels=4, memory_topk=64, pool_slots=schedule, pool_slots_n=2.0
        )
        assert [config.memory_items(k) for k in range(1, 5)] == [2, 4, 8, 16]
        assert [config.memory_slots(k) for k in range(1, 5)] == slots, schedule


def test_memory_items_capped_by_memory_topk() -> None:
    config = make_config(future_levels=3, memory_topk=3)
    assert [config.memory_items(k) for k in (1, 2, 3)] == [2, 3, 3]


@pytest.mark.parametrize("kind", POOLINGS)
@pytest.mark.parametrize("slots", [1, 2, 3])
def test_pool_shapes(kind: str, slots: int) -> None:
    torch.manual_seed(0)
    pool = make_pool(kind, d_model=8, n_items=5, slots=slots, norm="rmsnorm")
    items, state = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 8)
    assert pool(items, state).shape == (2, 3, slots, 8)


# Three items of width 2 at one position, shape (1, 1, 3, 2).
ITEMS = torch.tensor([[[[1.0, 2.0], [0.0, 5.0], [2.0, -1.0]]]], dtype=torch.float64)
# Scores ln2 * (first coordinate) = ln2 * (1, 0, 2): softmax weights (2, 1, 4) / 7.
SOFTMAX_MEAN = [(2 * 1 + 0 + 4 * 2) / 7, (2 * 2 + 5 - 4) / 7]


def set_weight(linear: torch.nn.Linear, rows: list[list[float]]) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(rows, dtype=torch.float64))


def test_group_pools_hand_computed() -> None:
    """Two slots: items split in rank order into groups {0, 1} and {2}."""
    state = torch.zeros(1, 1, 2, dtype=torch.float64)
    expected = {
        "sum": [[1.0, 7.0], [2.0, -1.0]],
        "mean": [[0.5, 3.5], [2.0, -1.0]],
        "max": [[1.0, 5.0], [2.0, -1.0]],
    }
    for kind, slots in expected.items():
        pool = make_pool(kind, 2, 3, 2, "rmsnorm")
        assert pool(ITEMS, state)[0, 0].tolist() == slots, kind
    assert make_pool("sum", 2, 3, 1, "rmsnorm")(ITEMS, state)[0, 0].tolist() == [[3.0, 6.0]]


def test_learned_pools_hand_computed() -> None:
    state = torch.zeros(1, 1, 2, dtype=torch.float64)
    linear = make_pool("linear", 2, 3, 1, "rmsnorm").double()
    set_weight(linear.proj_items, [[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]])
    assert linear(ITEMS, state)[0, 0].tolist() == [[1.0, -1.0]]  # item0[0], item2[1]

    maps = [[1, 0], [0, 1], [2, 0], [0, -1]]  # W_1 = identity, W_2 = diag(2, -1)
    parametric_sum = make_pool("parametric_sum", 2, 3, 2, "rmsnorm").double()
    set_weight(parametric_sum.maps, maps)
    assert parametric_sum(ITEMS, state)[0, 0].tolist() == [[3.0, 6.0], [6.0, -6.0]]
    parametric_max = make_pool("parametric_max", 2, 3, 2, "rmsnorm").double()
    set_weight(parametric_max.maps, maps)
    # W_2 items: (2, -2), (0, -5), (4, 1) -> elementwise max (4, 1)
    assert parametric_max(ITEMS, state)[0, 0].tolist() == [[2.0, 5.0], [4.0, 1.0]]

    attention = make_pool("attention", 2, 3, 1, "rmsnorm").double()
    set_weight(attention.score, [[math.log(2), 0]])
    torch.testing.assert_close(attention(ITEMS, state)[0, 0, 0].tolist(), SOFTMAX_MEAN)

    attention = make_pool("self_attention", 2, 3, 1, "rmsnorm").double()
    set_weight(attention.key, [[1, 0], [0, 1]])
    set_weight(attention.value, [[1, 0], [0, 1]])
    with torch.no_grad():  # scores q · k / sqrt(2) = ln2 * (first coordinate)
        attention.queries.copy_(torch.tensor([[math.sqrt(2) * math.log(2), 0.0]]))
    torch.testing.assert_close(attention(ITEMS, state)[0, 0, 0].tolist(), SOFTMAX_MEAN)


def test_dynamic_self_attention_pool_takes_queries_from_the_state() -> None:
    pool = make_pool("self_attention_dynamic", 2, 3, 1, "layernorm").double()
    set_weight(pool.key, [[1, 0], [0, 1]])
    set_weight(pool.value, [[1, 0], [0, 1]])
    set_weight(pool.query, [[math.sqrt(2) * math.log(2) * (1 + 1e-5) ** 0.5, 0], [0, 0]])
    # LayerNorm of (1, -1) is (1, -1) / sqrt(1 + eps): query (sqrt(2) ln2, 0) as before.
    state = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    torch.testing.assert_close(pool(ITEMS, state)[0, 0, 0].tolist(), SOFTMAX_MEAN)
    other = pool(ITEMS, -state)[0, 0, 0]  # opposite query: weights (1/2, 1, 1/4) / (7/4)
    torch.testing.assert_close(other.tolist(), [(0.5 + 0.5) / 1.75, (1 + 5 - 0.25) / 1.75])


def test_soft_memory_sends_gradient_to_the_predicting_head() -> None:
    """With memory=soft the next-token loss alone reaches the span predictions; with topk not."""
    idx = tokens(0)
    grads = {}
    for memory in ("soft", "topk"):
        model = build({"memory": memory, "future_loss_weight": 0.0})
        model.loss(idx, tokens(1))[0].backward()
        grads[memory] = model.bag_bias.grad
    assert grads["soft"].abs().min() > 0 and grads["topk"].abs().max() == 0


# --- loss --------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("future_loss", ["bce", "softmax_ce"])
def test_loss_decomposition(weight: float, future_loss: str) -> None:
    """total = next_token + sum_k weight^k * span_k, and next_token is the plain cross-entropy of
    the logits that `forward` returns (training and inference compute the same thing)."""
    overrides = {"future_levels": 3, "future_loss_weight": weight, "future_loss": future_loss}
    model = build(overrides)
    idx, targets = tokens(0), tokens(1)
    with torch.no_grad():
        total, parts = model.loss(idx, targets)
        logits = model(idx)
    assert list(parts) == ["next_token", "span_1", "span_2", "span_3"]
    expected = parts["next_token"] + sum(weight**k * parts[f"span_{k}"] for k in (1, 2, 3))
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
    plain = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(parts["next_token"], plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory", ["topk", "soft"])
def test_zero_weight_equals_training_without_span_losses(memory: str) -> None:
    """lambda = 0 gives the gradients of the next-token cross-entropy of `forward` alone."""
    model = build({"future_loss_weight": 0.0, "memory": memory, "future_levels": 3})
    idx, targets = tokens(0), tokens(1)
    model.loss(idx, targets)[0].backward()
    with_zero_weight = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()).backward()
    for name, param in model.named_parameters():
        if param.grad is None:  # only reached through a span loss
            assert name == "bag_bias" and with_zero_weight[name].abs().max() == 0
        else:
            torch.testing.assert_close(with_zero_weight[name], param.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", ["topk", "soft"])
def test_ground_truth_enters_only_the_loss(memory: str) -> None:
    """The states of the training path (in training mode, dropout 0) equal those of inference,
    whatever the targets: the original code built the memory from the ground-truth span."""
    model = build({"memory": memory, "future_levels": 3})
    assert model.config.dropout == 0
    idx = tokens(0)
    with torch.no_grad():
        inference, _ = model.states(idx)
        model.train()
        for seed in (1, 2):
            training, _ = model.states(idx, tokens(seed))
            assert torch.equal(training, inference)


def test_chunked_head_passes_match_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Splitting the head passes into chunks changes neither losses nor gradients."""
    idx, targets = tokens(0, batch=3), tokens(1, batch=3)
    results = []
    for rows, keep in ((7, 0), (10_000, 0), (7, ff.KEEP_LOGITS_ELEMENTS)):
        monkeypatch.setattr(ff, "HEAD_CHUNK_ROWS", rows)
        monkeypatch.setattr(ff, "KEEP_LOGITS_ELEMENTS", keep)
        model = build({"memory": "soft", "future_levels": 3})
        total, parts = model.loss(idx, targets)
        total.backward()
        results.append((parts, [p.grad for p in model.parameters()]))
    (parts_a, grads_a), *others = results
    for parts_b, grads_b in others:
        torch.testing.assert_close(parts_a, parts_b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads_a, grads_b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("keep", [0, 10**9], ids=["large", "small"])
def test_large_head_passes_keep_no_logits_for_backward(
    monkeypatch: pytest.MonkeyPatch, keep: int
) -> None:
    """Above KEEP_LOGITS_ELEMENTS no vocabulary-wide tensor is kept for the backward pass (logits
    are recomputed there); below it they are kept, which is faster."""
    monkeypatch.setattr(ff, "KEEP_LOGITS_ELEMENTS", keep)
    model = build({"memory": "soft"}, torch.float32).train()
    idx = tokens(0, batch=4)
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        total, _ = model.loss(idx, tokens(1, batch=4))
    total.backward()
    kept = [shape for shape in saved if shape and shape[-1] == VOCAB]
    assert saved and (kept if keep else not kept)


# --- causality, consistency, determinism -----------------------------------------------------


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_causality_and_prefix_consistency(overrides: dict) -> None:
    """Changing tokens after position t leaves logits at positions <= t exactly unchanged, and
    the logits of a full sequence equal those of each prefix run alone."""
    model = build(overrides)
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=generator)
    with torch.no_grad():
        reference = model(idx)
        for t in range(BLOCK - 1):
            changed = idx.clone()
            changed[:, t + 1 :] = torch.randint(0, VOCAB, (2, BLOCK - t - 1), generator=generator)
            logits = model(changed)
            assert torch.equal(logits[:, : t + 1], reference[:, : t + 1]), f"leak at t={t}"
            assert not torch.allclose(logits[:, t + 1 :], reference[:, t + 1 :])
        for t in (1, 15):
            torch.testing.assert_close(model(idx[:, :t]), reference[:, :t], rtol=1e-10, atol=1e-10)


# --- configuration and size --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"future_levels": 0}, r"'future_levels': 0 is out of range"),
        ({"future_mult": 1}, r"'future_mult': 1 is out of range"),
        ({"memory_topk": 0}, r"'memory_topk': 0 is out of range"),
        ({"pool_slots_n": 0.5}, r"'pool_slots_n': 0.5 is out of range"),
        ({"pool_slots_n": 20}, r"'pool_slots_n': 20.0 is out of range"),
        ({"future_loss_weight": -1}, r"'future_loss_weight': -1.0 is out of range"),
        ({"pooling": "conv"}, r"'pooling': 'conv' is not one of sum \| mean"),
        ({"pool_slots": "exp"}, r"'pool_slots': 'exp' is not one of constant"),
        ({"spans": "overlap"}, r"'spans': 'overlap' is not one of disjoint \| nested"),
        ({"memory": "hard"}, r"'memory': 'hard' is not one of topk \| soft"),
        ({"future_loss": "mse"}, r"'future_loss': 'mse' is not one of bce \| softmax_ce"),
        (
            {"future_levels": 4},  # spans 2 + 4 + 8 + 16 from t+2: reach t+31
            r"future_levels=4, future_mult=2 with spans=disjoint look 31 tokens ahead, but "
            r"block_size=24 allows at most 24",
        ),
        ({"future_mult": 5}, r"future_mult=5 .* look 31 tokens ahead"),
        ({"n_head": 3}, r"d_model=32 is not divisible by n_head=3"),
        ({"pool_slots": "log", "pool_slots_n": 1}, r"pool_slots=log needs pool_slots_n > 1"),
    ],
)
def test_invalid_options_give_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(**overrides)


def test_one_slot_warns_that_the_cross_attention_degenerates() -> None:
    """root with n = 2 gives spans 1 and 2 one slot each: their levels' query weights get no
    gradient, which the configuration says; the default (2 slots per span) says nothing."""
    with pytest.warns(UserWarning, match=r"span\(s\) 1, 2 get one memory slot"):
        make_config(pool_slots="root")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_config()


def test_nested_spans_reach_less_far() -> None:
    assert make_config(future_levels=4, spans="nested").reach() == 17


def test_parameter_count_is_gpt_plus_cross_attention() -> None:
    """Sum pooling adds no weights: the model is a gpt of n_layer + P blocks plus, per level, a
    cross-attention (4 d^2) and its norm, the memory norm and one logit offset per span."""
    d, levels = SHAPE["d_model"], 2
    model = FutureFormer(make_config(future_levels=levels))
    gpt = GPT(GPTConfig(VOCAB, BLOCK, **{**SHAPE, "n_layer": SHAPE["n_layer"] + levels}))
    extra = levels * (4 * d * d + d) + d + levels
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in gpt.parameters()) + extra


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_determinism(overrides: dict) -> None:
    """Same seed: same loss, loss parts and gradients in training mode."""
    assert_deterministic(lambda: build(overrides, torch.float32), VOCAB, BLOCK)
