"""`future_attention`: a float64 brute-force reference for the attention, target and losses,
causality / prefix consistency / determinism for every option value, and option errors."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_deterministic

from archbench.errors import ConfigError
from archbench.models.blocks import IGNORE_INDEX
from archbench.models.future_attention import (
    FutureAttentionConfig,
    FutureAttentionTransformer,
    attend,
    attend_with_future,
    future_loss,
    scored_rows,
)
from archbench.models.gpt import GPT, GPTConfig
from archbench.options import coerce_all, options_of

VOCAB, BLOCK = 37, 24
SHAPE = {"n_layer": 2, "n_head": 4, "d_model": 32}
# Every value of every future-attention option (the default first), plus GQA and dropout.
OPTION_CASES = [
    {},
    {"future_dim": 1},
    {"future_dim": 5},
    {"future_dim": BLOCK - 1},
    {"future_loss": "mse"},
    {"future_loss_weight": 0.0},
    {"future_loss_weight": 0.5},
    {"future_layers": "last"},
    {"future_layers": "0"},
    {"future_layers": "0,1"},
    {"detach_target": False},
    {"n_kv_heads": 2},
    {"dropout": 0.1},
]
FUTURE_OPTIONS = (
    "future_dim",
    "future_loss",
    "future_loss_weight",
    "future_layers",
    "detach_target",
)
IDS = ["-".join(f"{k}={v}" for k, v in case.items()) or "default" for case in OPTION_CASES]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread avoids thread hand-offs that dominate on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(overrides: dict, dtype: torch.dtype = torch.float64) -> FutureAttentionTransformer:
    """A small seeded eval-mode model in `dtype`."""
    config = FutureAttentionConfig(vocab_size=VOCAB, block_size=BLOCK, **{**SHAPE, **overrides})
    config.validate()
    torch.manual_seed(0)
    return FutureAttentionTransformer(config).to(dtype).eval()


def random_heads(
    b: int, n_head: int, t: int, h: int, block_size: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """Random float64 q, k, v (B, H, T, h) and all slot keys and values (H, C - 1, h)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return (
        draw(b, n_head, t, h),
        draw(b, n_head, t, h),
        draw(b, n_head, t, h),
        draw(n_head, block_size - 1, h),
        draw(n_head, block_size - 1, h),
    )


def brute_force(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_keys: torch.Tensor,
    slot_values: torch.Tensor,
    band: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition, one (batch, head, row, key) at a time: output, prediction and target."""
    b, n_head, t, h = q.shape
    last_slot = slot_keys.shape[1]  # slot p lives at index p - 1, p = 1 … C - 1
    out, prediction, target = (torch.zeros_like(q) for _ in range(3))
    for bi, hi, i in itertools.product(range(b), range(n_head), range(t)):
        query = q[bi, hi, i]
        real = list(range(i + 1))
        slots = list(range(i + 1, min(i + band, last_slot) + 1))
        scores = [query @ k[bi, hi, p] / math.sqrt(h) for p in real]
        scores += [query @ slot_keys[hi, p - 1] / math.sqrt(h) for p in slots]
        weights = [math.exp(s) for s in scores]
        total = sum(weights)
        for n, p in enumerate(real):
            out[bi, hi, i] += weights[n] / total * v[bi, hi, p]
        for n, p in enumerate(slots, start=len(real)):
            part = weights[n] / total * slot_values[hi, p - 1]
            out[bi, hi, i] += part
            if p < t:  # the prediction: the slots its target can see (module docstring, T < C)
                prediction[bi, hi, i] += part
        seen = range(min(i + band, t - 1) + 1)  # the target's softmax: real keys p <= i + F
        star = [math.exp(query @ k[bi, hi, p] / math.sqrt(h)) for p in seen]
        for p in range(i + 1, min(i + band, t - 1) + 1):
            target[bi, hi, i] += star[p] / sum(star) * v[bi, hi, p]
    return out, prediction, target


def brute_force_losses(prediction: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """MSE and cosine dissimilarity averaged over (batch, head, rows 0 … T-2)."""
    b, n_head, t, _ = prediction.shape
    squares, dissimilarities = [], []
    for bi, hi, i in itertools.product(range(b), range(n_head), range(t - 1)):
        a, c = prediction[bi, hi, i], target[bi, hi, i]
        squares.append(float(((a - c) ** 2).mean()))
        dissimilarities.append(float((1 - a @ c / (a.norm() * c.norm())) / 2))
    return sum(squares) / len(squares), sum(dissimilarities) / len(dissimilarities)


@pytest.mark.parametrize(("t", "band"), [(6, 2), (6, 5), (4, 2), (4, 5), (1, 3)])
def test_both_paths_match_brute_force(t: int, band: int) -> None:
    """Output, prediction, target and both losses equal the definition (C = 6, T <= C)."""
    q, k, v, slot_keys, slot_values = random_heads(2, 2, t, 4, 6, seed=t * 10 + band)
    out, prediction, target = brute_force(q, k, v, slot_keys, slot_values, band)
    fused = attend(q, k, v, slot_keys, slot_values, band)
    explicit = attend_with_future(q, k, v, slot_keys, slot_values, band)
    torch.testing.assert_close(fused, out, rtol=1e-12, atol=1e-12)
    for got, want in zip(explicit, (out, prediction, target), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if t > 1:
        mse, cosine = brute_force_losses(prediction, target)
        assert future_loss(explicit[1], explicit[2], "mse").item() == pytest.approx(mse, rel=1e-12)
        assert future_loss(explicit[1], explicit[2], "cosine").item() == pytest.approx(
            cosine, rel=1e-12
        )


def test_layer_matches_brute_force() -> None:
    """The module (projections, RoPE, slot slicing, both paths) equals the reference on T < C."""
    model = make({"future_dim": 5})
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, SHAPE["d_model"], dtype=torch.float64)
    with torch.no_grad():
        q, k, v, _, _ = attn._heads(x)
        out, prediction, target = brute_force(q, k, v, attn.slot_keys, attn.slot_values, 5)
        merged = attn.proj(out.transpose(1, 2).reshape(2, 9, SHAPE["d_model"]))
        torch.testing.assert_close(attn(x), merged, rtol=1e-12, atol=1e-12)
        y, got_prediction, got_target = attn.forward_with_future(x, detach_target=True)
    torch.testing.assert_close(y, merged, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_prediction, prediction, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_target, target, rtol=1e-12, atol=1e-12)


def test_slots_at_minus_infinity_give_causal_attention() -> None:
    """Slot scores of -inf (positive queries, slot keys -inf) leave ordinary causal attention."""
    q, k, v, slot_keys, slot_values = random_heads(2, 3, 7, 4, 7, seed=1)
    q = q.abs() + 0.1
    slot_keys = torch.full_like(slot_keys, float("-inf"))
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attend(q, k, v, slot_keys, slot_values, 6), causal)
    out, prediction, _ = attend_with_future(q, k, v, slot_keys, slot_values, 6)
    torch.testing.assert_close(out, causal)
    assert torch.equal(prediction, torch.zeros_like(prediction))


@pytest.mark.parametrize("t", [7, 4])
def test_target_is_the_masked_part_of_full_attention(t: int) -> None:
    """With F = C - 1 the target is the strictly-upper part of unmasked attention times v."""
    q, k, v, slot_keys, slot_values = random_heads(2, 2, t, 4, 7, seed=2)
    full = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)  # sqrt(h) = 2, no mask at all
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    _, _, target = attend_with_future(q, k, v, slot_keys, slot_values, 6)
    torch.testing.assert_close(target, (full * future) @ v, rtol=1e-12, atol=1e-12)


def test_future_loss_leaves_out_the_last_row() -> None:
    """The last row has no real future token: whatever it holds, it does not count."""
    target = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    prediction = target.clone()
    prediction[:, :, -1] = torch.randn(2, 3, 4, dtype=torch.float64)
    for kind in ("mse", "cosine"):
        assert future_loss(prediction, target, kind).item() == pytest.approx(0.0, abs=1e-12)
        assert future_loss(prediction[:, :, :1], target[:, :, :1], kind).item() == 0.0
    # The original averaged a zero last row in: under cosine it added (1 - cos(0, 0)) / 2 = 0.5.
    rows = torch.cat([target[:1, :1, :4], torch.zeros(1, 1, 1, 4, dtype=torch.float64)], dim=2)
    assert future_loss(rows, rows, "cosine").item() == pytest.approx(0.0, abs=1e-12)
    original = ((1 - F.cosine_similarity(rows, rows, dim=-1)) / 2).mean()
    assert original.item() == pytest.approx(0.5 / 5)


@pytest.mark.parametrize("overrides", OPTION_CASES, ids=IDS)
def test_causality(overrides: dict) -> None:
    """Changing tokens after t leaves logits and predictions at <= t exactly unchanged, in both
    paths; only the target (a training signal) looks ahead."""
    model = make(overrides)
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=generator)
    target_looked_ahead = False
    with torch.no_grad():
        reference = model(idx)
        train_reference, pairs = model.forward_with_future(idx)
        for t in range(BLOCK - 1):
            changed = idx.clone()
            changed[:, t + 1 :] = torch.randint(0, VOCAB, (2, BLOCK - t - 1), generator=generator)
            logits = model(changed)
            assert torch.equal(logits[:, : t + 1], reference[:, : t + 1]), f"leak at t={t}"
            assert not torch.allclose(logits[:, t + 1 :], reference[:, t + 1 :])
            train_logits, changed_pairs = model.forward_with_future(changed)
            assert torch.equal(train_logits[:, : t + 1], train_reference[:, : t + 1])
            for (prediction, target), (new_prediction, new_target) in zip(
                pairs, changed_pairs, strict=True
            ):
                assert torch.equal(new_prediction[:, :, : t + 1], prediction[:, :, : t + 1])
                target_looked_ahead |= not torch.equal(new_target[:, :, t], target[:, :, t])
    assert target_looked_ahead


@pytest.mark.parametrize("overrides", OPTION_CASES, ids=IDS)
def test_prefix_consistency(overrides: dict) -> None:
    """Logits (both paths) of a full sequence equal those of each prefix run alone."""
    model = make(overrides)
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        for t in (1, 9, BLOCK - 1):
            torch.testing.assert_close(model(idx[:, :t]), full[:, :t], rtol=1e-10, atol=1e-10)
            prefix_logits, _ = model.forward_with_future(idx[:, :t])
            torch.testing.assert_close(prefix_logits, full[:, :t], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("band", [1, 3, BLOCK - 1])
def test_scored_rows_follow_the_loss_mask(band: int) -> None:
    """Row i counts iff one of its band's real future tokens i+1 … min(i+F, T-1) is scored."""
    generator = torch.Generator().manual_seed(band)
    targets = torch.randint(0, VOCAB, (4, 10), generator=generator)
    targets[torch.rand(4, 10, generator=generator) < 0.7] = IGNORE_INDEX
    targets[0] = IGNORE_INDEX  # a sequence with no scored token at all
    want = torch.tensor(
        [
            [bool((row[i : min(i + band, 9)] != IGNORE_INDEX).any()) for i in range(9)]
            for row in targets
        ]
    )
    got = scored_rows(targets, band)
    assert torch.equal(got, want) and not got[0].any() and got.any()
    assert scored_rows(torch.roll(torch.arange(10), -1).expand(2, 10), band).all()


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_future_loss_averages_over_the_scored_rows(kind: str) -> None:
    """With a row mask, the loss is the brute-force mean over the kept (batch, head, row)s."""
    q, k, v, slot_keys, slot_values = random_heads(2, 2, 6, 4, 6, seed=9)
    _, prediction, target = attend_with_future(q, k, v, slot_keys, slot_values, 2)
    rows = torch.tensor([[True, False, False, True, True], [False, False, True, False, False]])
    values = []
    for bi, hi, i in itertools.product(range(2), range(2), range(5)):
        if rows[bi, i]:
            keep = (slice(bi, bi + 1), slice(hi, hi + 1), slice(i, i + 2))  # + a dropped last row
            mse, cosine = brute_force_losses(prediction[keep], target[keep])
            values.append(mse if kind == "mse" else cosine)
    got = future_loss(prediction, target, kind, rows).item()
    assert got == pytest.approx(sum(values) / len(values), rel=1e-12)
    assert got != pytest.approx(future_loss(prediction, target, kind).item(), rel=1e-3)
    assert future_loss(prediction, target, kind, torch.zeros_like(rows)).item() == 0.0


def test_model_loss_skips_unscored_targets() -> None:
    """A synthetic task's loss mask reaches the future loss: with no target scored it is 0 (no
    gradient reaches the slots), and with some scored it is the mean over their rows."""
    model = make({"future_dim": 3}, torch.float32).train()
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(8))
    ignored = torch.full_like(idx, IGNORE_INDEX)
    total, parts = model.loss(idx, ignored)
    assert total.item() == 0.0 and parts["future"].item() == 0.0
    total.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    answers = ignored.clone()
    answers[:, 10:12] = idx[:, 11:13]
    rows = scored_rows(answers, 3)
    assert rows.sum(dim=1).tolist() == [4, 4]  # rows 8 … 11: their bands reach targets 10, 11
    with torch.no_grad():
        _, pairs = model.forward_with_future(idx)
        _, parts = model.loss(idx, answers)
    want = torch.stack([future_loss(p, t, "cosine", rows) for p, t in pairs]).mean()
    assert parts["future"].item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("overrides", OPTION_CASES, ids=IDS)
def test_training_path_equals_forward(overrides: dict) -> None:
    """The explicit training path gives the logits of `forward`; `next_token` is their CE and
    the total adds future_loss_weight * future."""
    model = make(overrides)
    idx = torch.randint(0, VOCAB, (3, BLOCK), generator=torch.Generator().manual_seed(4))
    targets = torch.roll(idx, -1, 1)
    with torch.no_grad():
        logits = model(idx)
        train_logits, pairs = model.forward_with_future(idx)
        total, parts = model.loss(idx, targets)
    torch.testing.assert_close(train_logits, logits, rtol=1e-12, atol=1e-12)
    assert len(pairs) == len(model.config.future_layer_ids)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert parts["next_token"].item() == pytest.approx(ce.item(), rel=1e-6)  # CE in float32
    weight = model.config.future_loss_weight
    assert total.item() == pytest.approx((parts["next_token"] + weight * parts["future"]).item())


@pytest.mark.parametrize("t", [1, 2, 5, BLOCK])
def test_short_windows_work(t: int) -> None:
    """Any T <= block_size: logits, a finite loss and gradients (T = 1 has no future loss)."""
    model = make({}, torch.float32).train()
    idx = torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(5))
    assert model(idx).shape == (2, t, VOCAB)
    total, parts = model.loss(idx, idx)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    total.backward()
    if t == 1:
        assert parts["future"].item() == 0.0


def test_on_a_short_window_the_future_loss_trains_only_the_slots_inside_it() -> None:
    """At T < C the slots of positions T … C - 1 are in the output (so in the next-token loss)
    but not in the prediction: a layer's own future loss sends them no gradient (the last
    layer's: an earlier layer's slots also reach later layers through its output)."""
    t = 5
    model = make({}, torch.float64).train()
    idx = torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(7))
    _, pairs = model.forward_with_future(idx)
    future_loss(*pairs[-1], "cosine").backward()
    grad = model.blocks[-1].attn.slot_values.grad  # row p - 1 holds the slot of position p
    assert grad[:, : t - 1].abs().sum() > 0 and grad[:, t - 1 :].abs().sum() == 0
    model.zero_grad()
    logits, _ = model.forward_with_future(idx)
    logits.sum().backward()
    assert all(block.attn.slot_values.grad[:, t - 1 :].abs().sum() > 0 for block in model.blocks)


@pytest.mark.parametrize(
    ("overrides", "n_future"),
    [({}, 2), ({"future_layers": "last"}, 1), ({"n_kv_heads": 1, "future_layers": "0"}, 1)],
)
def test_slots_add_two_d_per_slot_position_per_future_layer(overrides: dict, n_future: int) -> None:
    """2 * H * h * (C - 1) extra parameters per future layer, nothing else."""
    baseline_options = {k: v for k, v in overrides.items() if k != "future_layers"}
    baseline = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, **SHAPE, **baseline_options))
    model = make(overrides)
    extra = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in baseline.parameters()
    )
    assert extra == n_future * 2 * SHAPE["d_model"] * (BLOCK - 1)


def test_weight_zero_keeps_slots_but_drops_the_loss() -> None:
    """future_loss_weight = 0: total = next_token, the slots still learn through the logits."""
    model = make({"future_loss_weight": 0.0}, torch.float32).train()
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(6))
    total, parts = model.loss(idx, torch.roll(idx, -1, 1))
    assert torch.equal(total.detach(), parts["next_token"]) and parts["future"] > 0
    total.backward()
    slot_grads = [p.grad for name, p in model.named_parameters() if "slot_" in name]
    assert len(slot_grads) == 4 and all(g.abs().sum() > 0 for g in slot_grads)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_target(detach: bool) -> None:
    """detach_target decides whether gradients flow into the target."""
    model = make({"detach_target": detach}, torch.float32).train()
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(7))
    _, pairs = model.forward_with_future(idx)
    assert all(target.requires_grad is not detach for _, target in pairs)
    assert all(prediction.requires_grad for prediction, _ in pairs)


def test_detach_target_changes_gradients_not_the_loss() -> None:
    """Same weights, same loss; only the gradients differ, by the target's part of them."""
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(7))
    runs = []
    for detach in (True, False):
        model = make({"detach_target": detach}).train()
        total, _ = model.loss(idx, torch.roll(idx, -1, 1))
        total.backward()
        runs.append((total, {name: p.grad for name, p in model.named_parameters()}))
    (detached, detached_grads), (attached, attached_grads) = runs
    assert torch.equal(detached, attached)
    differ = {n for n, g in detached_grads.items() if not torch.allclose(g, attached_grads[n])}
    assert any(".attn." in name for name in differ)


def test_options_are_declared() -> None:
    """The baseline's options plus the five future-attention ones, with types and defaults."""
    options = options_of(FutureAttentionConfig)
    assert set(options_of(GPTConfig)) < set(options)
    assert {name: (options[name].type, options[name].default) for name in FUTURE_OPTIONS} == {
        "future_dim": ("int", 0),
        "future_loss": ("str", "cosine"),
        "future_loss_weight": ("float", 1.0),
        "future_layers": ("str", "all"),
        "detach_target": ("bool", True),
    }
    assert make({}).config.band == BLOCK - 1 and make({"future_dim": 3}).config.band == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"future_dim": -1}, r"'future_dim': -1 is out of range"),
        ({"future_loss": "l1"}, r"'future_loss': 'l1' is not one of cosine \| mse"),
        ({"future_loss_weight": -0.5}, r"'future_loss_weight': -0.5 is out of range"),
        ({"detach_target": "maybe"}, r"'detach_target': 'maybe' is not a valid bool"),
    ],
)
def test_invalid_option_values(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        coerce_all(FutureAttentionConfig, overrides, "architecture 'future_attention'")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"future_dim": BLOCK}, r"future_dim=24 must be <= block_size - 1 = 23"),
        ({"future_layers": "first"}, r"future_layers='first' must be 'all', 'last' or comma"),
        ({"future_layers": ""}, r"future_layers='' must be"),
        ({"future_layers": "0,,1"}, r"future_layers='0,,1' must be"),
        ({"future_layers": "-1"}, r"future_layers='-1' must be"),
        ({"future_layers": "1,1"}, r"future_layers='1,1' names a layer twice"),
        ({"future_layers": "2"}, r"future_layers='2' names layer 2, but n_layer=2"),
        ({"n_head": 3}, r"d_model=32 is not divisible by n_head=3"),
    ],
)
def test_invalid_option_combinations(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make(overrides)


def test_block_size_one_is_refused() -> None:
    config = FutureAttentionConfig(vocab_size=VOCAB, block_size=1, **SHAPE)
    with pytest.raises(ConfigError, match=r"future_attention needs block_size >= 2"):
        config.validate()


def test_too_long_sequence_is_refused() -> None:
    model = make({})
    idx = torch.zeros(1, BLOCK + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(idx)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.loss(idx, idx)


@pytest.mark.parametrize("overrides", OPTION_CASES, ids=IDS)
def test_determinism(overrides: dict) -> None:
    """Same seed: same loss, loss parts and gradients in training mode."""
    assert_deterministic(lambda: make(overrides, torch.float32), VOCAB, BLOCK)
