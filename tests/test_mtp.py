"""The multi-token-prediction model: causality and determinism for every option value, the
per-head losses against a hand computation, equivalence with `gpt` for one head, the parameter
count and the memory-saving loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import assert_deterministic

from archbench.errors import ConfigError
from archbench.models import mtp as mtp_module
from archbench.models.blocks import mlp_hidden
from archbench.models.gpt import GPT, GPTConfig
from archbench.models.mtp import MTP, MTPConfig
from archbench.options import coerce_all, options_of

VOCAB, BLOCK = 37, 24
SHAPE = {"n_layer": 2, "n_head": 4, "d_model": 32}
# Every value of every option `mtp` adds (or redefines), plus a few baseline options that change
# what the heads are made of.
OPTION_VALUES = {
    "n_layer": (1, 3),
    "n_future": (1, 2, 4),
    "head_layers": (1, 2),
    "future_loss_weight": (0.0, 0.5, 1.0),
    "tie_embeddings": (False,),
    "dropout": (0.1,),
    "n_kv_heads": (1,),
}
CASES = [{name: value} for name, values in OPTION_VALUES.items() for value in values]
IDS = [next(f"{k}={v}" for k, v in case.items()) for case in CASES]


def make_config(**overrides: Any) -> MTPConfig:
    """A validated config, checked the way the registry checks table values."""
    typed = coerce_all(MTPConfig, {**SHAPE, **overrides}, "architecture 'mtp'")
    config = MTPConfig(vocab_size=VOCAB, block_size=BLOCK, **typed)
    config.validate()
    return config


def build(overrides: dict, dtype: torch.dtype = torch.float64, seed: int = 0) -> MTP:
    """A small eval-mode model in `dtype`, seeded."""
    torch.manual_seed(seed)
    return MTP(make_config(**overrides)).to(dtype).eval()


def head_logits(model: MTP, idx: torch.Tensor) -> list[torch.Tensor]:
    """Every head's logits (B, T, V) over the whole window, computed the obvious way."""
    trunk = model.trunk_states(idx)
    return [model.unembed(model.norm_out(head(trunk))) for head in model.heads]


def tokens(seed: int, length: int = BLOCK) -> torch.Tensor:
    """Two random token sequences of `length`, a function of `seed`."""
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_shapes_parts_and_gradients(overrides: dict) -> None:
    model = build(overrides, torch.float32).train()
    idx = tokens(0)
    assert model(idx).shape == (2, BLOCK, VOCAB)
    assert model(idx[:, :5]).shape == (2, 5, VOCAB)
    loss, parts = model.loss(idx, torch.roll(idx, -1, 1))
    n = model.config.n_future
    assert list(parts) == ["next_token"] + [f"future_{k}" for k in range(2, n + 1)]
    assert loss.ndim == 0 and all(torch.isfinite(v) and v.ndim == 0 for v in parts.values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_causality(overrides: dict) -> None:
    """Changing tokens after t leaves every head's logits at positions <= t exactly unchanged."""
    model = build(overrides)
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=generator)
    with torch.no_grad():
        reference = model(idx)
        reference_heads = head_logits(model, idx)
        for t in range(BLOCK - 1):
            changed = idx.clone()
            changed[:, t + 1 :] = torch.randint(0, VOCAB, (2, BLOCK - t - 1), generator=generator)
            logits = model(changed)
            assert torch.equal(logits[:, : t + 1], reference[:, : t + 1]), f"leak at t={t}"
            assert not torch.allclose(logits[:, t + 1 :], reference[:, t + 1 :])
            changed_heads = head_logits(model, changed)
            for k, (new, old) in enumerate(zip(changed_heads, reference_heads, strict=True), 1):
                assert torch.equal(new[:, : t + 1], old[:, : t + 1]), f"head {k} leaks at t={t}"


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_prefix_consistency(overrides: dict) -> None:
    """Logits of a full sequence equal those of each prefix run alone."""
    model = build(overrides)
    idx = tokens(2)
    with torch.no_grad():
        full = model(idx)
        for t in (1, 9, BLOCK - 1):
            torch.testing.assert_close(model(idx[:, :t]), full[:, :t], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_head_losses_match_a_hand_computation(weight: float) -> None:
    """Head k at position t is scored against token t+k, over the positions t <= T-k only; the
    loss in training mode (dropout 0), the reference logits from the inference path."""
    model = build({"n_future": 4, "future_loss_weight": weight})
    assert model.config.dropout == 0
    sequence = tokens(4, BLOCK + 1)
    idx, targets = sequence[:, :-1], sequence[:, 1:]
    total, parts = model.train().loss(idx, targets)
    with torch.no_grad():
        per_head = head_logits(model.eval(), idx)
    expected = {}
    for k, logits in enumerate(per_head, start=1):
        log_probs = logits.log_softmax(-1)
        terms = [
            -log_probs[b, t, sequence[b, t + k]] for b in range(2) for t in range(BLOCK - k + 1)
        ]
        expected["next_token" if k == 1 else f"future_{k}"] = torch.stack(terms).mean()
    assert list(parts) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(parts[name].double(), value, rtol=1e-5, atol=1e-6)
    future = sum(parts[f"future_{k}"] for k in range(2, 5))
    torch.testing.assert_close(total.detach(), parts["next_token"] + weight * future)


def test_one_head_is_the_gpt_baseline() -> None:
    """n_future=1 is gpt with n_layer + head_layers blocks: same init, logits, loss, gradients."""
    mtp = build({"n_future": 1, "head_layers": 2, "dropout": 0.1})
    torch.manual_seed(0)
    config = GPTConfig(VOCAB, BLOCK, **{**SHAPE, "n_layer": 4, "dropout": 0.1})
    gpt = GPT(config).double().eval()
    gpt_prefixes = {"trunk.": "blocks.", "heads.0.0.": "blocks.2.", "heads.0.1.": "blocks.3."}

    def gpt_name(name: str) -> str:
        prefix = next((p for p in gpt_prefixes if name.startswith(p)), "")
        return gpt_prefixes.get(prefix, "") + name.removeprefix(prefix)

    gpt_state = gpt.state_dict()
    renamed = {gpt_name(name): value for name, value in mtp.state_dict().items()}
    assert renamed.keys() == gpt_state.keys()
    assert all(torch.equal(renamed[k], gpt_state[k]) for k in renamed)

    idx = tokens(5)
    targets = torch.roll(idx, -1, 1)
    with torch.no_grad():
        assert torch.equal(mtp(idx), gpt(idx))
    results = []
    for model in (mtp, gpt):
        model.train()
        torch.manual_seed(7)  # the same dropout masks, drawn in the same order
        loss, parts = model.loss(idx, targets)
        loss.backward()
        results.append((loss.detach(), parts))
    (mtp_loss, mtp_parts), (gpt_loss, gpt_parts) = results
    assert torch.equal(mtp_loss, gpt_loss)
    assert mtp_parts.keys() == gpt_parts.keys() == {"next_token"}
    gpt_params = dict(gpt.named_parameters())
    for name, param in mtp.named_parameters():
        assert torch.equal(param.grad, gpt_params[gpt_name(name)].grad), name


def test_zero_weight_trains_like_the_next_token_head_alone() -> None:
    """With future_loss_weight=0 the extra heads get zero gradient and the rest is unchanged."""
    several = build({"n_future": 3, "future_loss_weight": 0.0})
    single = build({"n_future": 1})
    skipped = single.load_state_dict(several.state_dict(), strict=False)
    assert not skipped.missing_keys and skipped.unexpected_keys
    idx = tokens(6)
    for model in (several, single):
        model.loss(idx, torch.roll(idx, -1, 1))[0].backward()
    single_grads = dict(single.named_parameters())
    for name, param in several.named_parameters():
        if name.startswith(("heads.1.", "heads.2.")):
            assert torch.count_nonzero(param.grad) == 0, name
        else:
            assert torch.equal(param.grad, single_grads[name].grad), name


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_future": 4, "head_layers": 2},
        {"n_future": 3, "tie_embeddings": False, "n_kv_heads": 2, "mlp": "gelu"},
    ],
)
def test_parameter_count_formula(overrides: dict) -> None:
    """embedding (+ unembedding if untied) + (n_layer + n_future * head_layers) blocks + norm."""
    config = make_config(**overrides)
    d, kv_width = config.d_model, config.kv_heads * (config.d_model // config.n_head)
    hidden = mlp_hidden(config.mlp, config.d_model, config.mlp_ratio)
    mlp = (3 if config.mlp == "swiglu" else 2) * d * hidden
    block = d * (d + 2 * kv_width) + d * d + mlp + 2 * d
    blocks = config.n_layer + config.n_future * config.head_layers
    expected = VOCAB * d * (1 if config.tie_embeddings else 2) + blocks * block + d
    assert sum(p.numel() for p in MTP(config).parameters()) == expected


@pytest.mark.parametrize("keep", [0, 10**9], ids=["large", "small"])
def test_large_logits_are_recomputed_for_backward(
    monkeypatch: pytest.MonkeyPatch, keep: int
) -> None:
    """Above KEEP_LOGITS_ELEMENTS the logits of every head are recomputed in the backward pass,
    not stored; below it they are kept (faster), with the same loss and gradients."""
    monkeypatch.setattr(mtp_module, "KEEP_LOGITS_ELEMENTS", keep)
    model = build({"n_future": 4}, torch.float32).train()
    idx = tokens(7)
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = model.loss(idx, torch.roll(idx, -1, 1))
    kept = [shape for shape in saved if shape and shape[-1] == VOCAB]
    assert saved and (kept if keep else not kept)
    loss.backward()
    assert model.embed.weight.grad is not None


def test_kept_and_recomputed_logits_give_the_same_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    idx = tokens(7)
    results = []
    for keep in (0, 10**9):
        monkeypatch.setattr(mtp_module, "KEEP_LOGITS_ELEMENTS", keep)
        model = build({"n_future": 3})
        loss, parts = model.loss(idx, torch.roll(idx, -1, 1))
        loss.backward()
        results.append((parts, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


def test_options_are_declared_with_help() -> None:
    options = options_of(MTPConfig)
    assert list(options)[-3:] == ["n_future", "head_layers", "future_loss_weight"]
    assert "trunk" in options["n_layer"].help
    assert set(options_of(GPTConfig)) < set(options)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_future": 0}, r"'n_future': 0 is out of range \(int \(>= 1\)\)"),
        ({"n_future": "two"}, r"'n_future': 'two' is not a valid int"),
        ({"n_future": BLOCK + 1}, rf"n_future={BLOCK + 1} exceeds block_size={BLOCK}"),
        ({"head_layers": 0}, r"'head_layers': 0 is out of range"),
        ({"head_layers": 1.5}, r"'head_layers': expected int, got float"),
        ({"future_loss_weight": -0.5}, r"'future_loss_weight': -0.5 is out of range"),
        ({"future_loss_weight": "heavy"}, r"'future_loss_weight': 'heavy' is not a valid float"),
        ({"n_layer": 0}, r"'n_layer': 0 is out of range"),
        ({"n_head": 3}, r"d_model=32 is not divisible by n_head=3"),
    ],
)
def test_invalid_options_give_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(**overrides)


def test_too_long_and_too_short_sequences_are_refused() -> None:
    model = build({"n_future": 4})
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))
    short = torch.zeros(1, 3, dtype=torch.long)
    assert model(short).shape == (1, 3, VOCAB)
    with pytest.raises(ValueError, match="shorter than n_future=4"):
        model.loss(short, short)


def test_string_values_from_a_table_are_parsed() -> None:
    config = make_config(n_future="4", head_layers="2", future_loss_weight="0.25")
    assert (config.n_future, config.head_layers, config.future_loss_weight) == (4, 2, 0.25)


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_determinism(overrides: dict) -> None:
    """Same seed: same loss, loss parts and gradients in training mode."""
    assert_deterministic(lambda: build(overrides, torch.float32), VOCAB, BLOCK)
