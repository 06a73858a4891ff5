"""The hourglass model: causality of the logits and of every level's items (perturbation after
every position, every option value), the perceiver mask at every latent index, prefix consistency
for every length, shapes at every level, the multi-channel layer against separately computed
channels, the repeat upsampling layout, the skip=post weakness, and option errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from archbench.errors import ConfigError
from archbench.models.blocks import GELUMLP, Block, CausalSelfAttention, SwiGLU
from archbench.models.hourglass import (
    Hourglass,
    HourglassConfig,
    MultiChannelBlock,
    perceiver_mask,
    softmax_merge,
)
from archbench.options import coerce_all, options_of

VOCAB, BLOCK = 37, 24
SHAPE = {"n_layer": 2, "n_head": 4, "d_model": 32}
# Every value of every option hourglass adds (group_len 8, latents "4,2" by default), the baseline
# options that change what the blocks are made of, and a few combinations of the ablation axes.
OPTION_VALUES: dict[str, tuple[Any, ...]] = {
    "group_len": (6, 7, 12),
    "latents": ("4", "6,3,1", "7,1"),
    "widths": ("16,24", "64,48"),
    "compression": ("keep_last", "perceiver"),
    "compress_layers": (2,),
    "level_layers": (0, 2),
    "local_global": ("alternate", "sequential"),
    "upsampling": ("repeat", "attention"),
    "skip": ("pre", "post"),
    "multichannel_every": (0, 2),
    "channels": (1, 4, 11),
    "shared_channels": (0, 2),
    "channel_mlp_multiple": (0.5, 2.0),
    "merge": ("softmax", "mean", "max"),
    "n_layer": (1, 3),
    "mlp": ("gelu",),
    "norm": ("layernorm",),
    "tie_embeddings": (False,),
    "dropout": (0.1,),
}
COMBINATIONS = [
    {"compression": "perceiver", "compress_layers": 0},
    {"compression": "perceiver", "widths": "16,24", "upsampling": "attention"},
    {"upsampling": "attention", "skip": "post", "local_global": "sequential", "level_layers": 2},
    {"local_global": "sequential", "level_layers": 3},
    {"latents": "6,3,1", "widths": "16,24,8", "compression": "perceiver", "merge": "max"},
    {"group_len": 5, "latents": "3,1", "upsampling": "attention", "channels": 3},
]
CASES = [{}] + [{k: v} for k, vs in OPTION_VALUES.items() for v in vs] + COMBINATIONS
IDS = ["-".join(f"{k}={v}" for k, v in case.items()) or "default" for case in CASES]


def make_config(**overrides: Any) -> HourglassConfig:
    """A validated config, checked the way the registry checks table values."""
    typed = coerce_all(HourglassConfig, {**SHAPE, **overrides}, "architecture 'hourglass'")
    config = HourglassConfig(vocab_size=VOCAB, block_size=BLOCK, **typed)
    config.validate()
    return config


def build(overrides: dict, dtype: torch.dtype = torch.float64, seed: int = 0) -> Hourglass:
    """A small eval-mode model in `dtype`, seeded."""
    torch.manual_seed(seed)
    return Hourglass(make_config(**overrides)).to(dtype).eval()


def tokens(seed: int, length: int = BLOCK, batch: int = 2) -> torch.Tensor:
    """Random token ids (batch, length), a function of `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def level_outputs(model: Hourglass, idx: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Logits and every level module's output with its level, as (name, level, tensor); an
    encoder level gives two: the skip it passes to the decoder (level l-1) and level l."""
    n = len(model.encoder)
    named = [(f"encoder{i}", model.encoder[i], i + 1) for i in range(n)]
    named += [(f"latent{i}", block, n) for i, block in enumerate(model.latent)]
    named += [(f"decoder{i}", model.decoder[i], n - 1 - i) for i in range(n)]
    captured = []

    def record(name: str, level: int, out: torch.Tensor | tuple) -> None:
        if isinstance(out, tuple):  # an encoder level: (skip at level - 1, level)
            captured.append((f"{name}.skip", level - 1, out[0]))
            out = out[1]
        captured.append((name, level, out))

    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name, level=level: record(name, level, out)
        )
        for name, module, level in named
    ]
    try:
        logits = model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, captured


def test_every_option_is_covered() -> None:
    """The cases above try every option hourglass adds (a new option must be added to them)."""
    options = options_of(HourglassConfig)
    assert all(opt.type in ("int", "float", "bool", "str") for opt in options.values())
    own = set(options) - {"n_head", "d_model", "mlp_ratio", "rope_base", "init_std"}
    assert own <= set(OPTION_VALUES)
    for name, opt in options.items():
        if opt.choices is not None and name in OPTION_VALUES:
            assert set(OPTION_VALUES[name]) >= set(opt.choices) - {opt.default}


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_shapes_and_gradients(overrides: dict) -> None:
    model = build(overrides, torch.float32).train()
    idx = tokens(0)
    assert model(idx).shape == (2, BLOCK, VOCAB)
    assert model(idx[:, :5]).shape == (2, 5, VOCAB)
    loss, parts = model.loss(idx, torch.roll(idx, -1, 1))
    assert list(parts) == ["next_token"] and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_block_order_matters_from_two_pairs_on() -> None:
    """With one local + global pair per level both orders are the same model; from two on,
    `sequential` (local, local, global, global) is another model than `alternate`."""
    idx = tokens(3)
    for pairs, same in ((1, True), (2, False)):
        a, b = (
            build({"level_layers": pairs, "local_global": o}) for o in ("alternate", "sequential")
        )
        assert torch.equal(a(idx), b(idx)) is same


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_causality_of_logits_and_every_level(overrides: dict) -> None:
    """Changing the tokens after t, for every t, leaves the logits at <= t exactly unchanged, and
    also every item of every encoder, latent and decoder level whose anchor is <= t."""
    model = build(overrides)
    config = model.config
    generator = torch.Generator().manual_seed(1)
    idx = tokens(1)
    groups = -(-BLOCK // config.group_len)
    with torch.no_grad():
        reference, reference_levels = level_outputs(model, idx)
        for t in range(BLOCK - 1):
            changed = idx.clone()
            changed[:, t + 1 :] = torch.randint(0, VOCAB, (2, BLOCK - t - 1), generator=generator)
            logits, levels = level_outputs(model, changed)
            assert torch.equal(logits[:, : t + 1], reference[:, : t + 1]), f"leak at t={t}"
            assert not torch.allclose(logits[:, t + 1 :], reference[:, t + 1 :])
            for (name, level, new), (_, _, old) in zip(levels, reference_levels, strict=True):
                anchors = config.anchors(level, groups)
                new, old = new.reshape(2, len(anchors), -1), old.reshape(2, len(anchors), -1)
                past = anchors <= t
                assert torch.equal(new[:, past], old[:, past]), f"{name} leaks at t={t}"


@pytest.mark.parametrize("overrides", CASES, ids=IDS)
def test_prefix_consistency_for_every_length(overrides: dict) -> None:
    """Logits of the full sequence equal those of every prefix run alone: a prefix whose length
    is not a multiple of group_len is right-padded, and the padding reaches no earlier position."""
    model = build(overrides)
    idx = tokens(2)
    with torch.no_grad():
        full = model(idx)
        for t in range(1, BLOCK):
            torch.testing.assert_close(model(idx[:, :t]), full[:, :t], rtol=1e-10, atol=1e-10)


def test_anchors_by_hand() -> None:
    """Item i of group g at level l sits on position g * L + L - K_l + i."""
    config = make_config(group_len=8, latents="4,2")
    assert config.anchors(0, 2).tolist() == list(range(16))
    assert config.anchors(1, 2).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert config.anchors(2, 3).tolist() == [6, 7, 14, 15, 22, 23]


@pytest.mark.parametrize(("k_in", "k_out"), [(k, j) for k in range(2, 10) for j in range(1, k)])
def test_perceiver_mask_at_every_latent_index(k_in: int, k_out: int) -> None:
    """Latent i (anchored on group slot k_in - k_out + i) sees exactly the items up to its
    anchor: none after it (causal) and all before it (not SDPA's top-left `is_causal`)."""
    mask = perceiver_mask(k_in, k_out)
    assert mask.shape == (k_out, k_in)
    for i in range(k_out):
        assert mask[i].tolist() == [j <= k_in - k_out + i for j in range(k_in)]
    top_left = torch.ones(k_out, k_in, dtype=torch.bool).tril()
    assert not torch.equal(mask, top_left)  # the original's mask, which starves the latents


@pytest.mark.parametrize("latents", ["4,2", "7,1", "1"])
def test_perceiver_latents_read_exactly_their_past(latents: str) -> None:
    """Perturbing group item j changes latent i of the first encoder level iff j <= K_0 - K_1 + i
    (compress_layers=0 and no level blocks, so the cross-attention is the only mixing)."""
    model = build(
        {"compression": "perceiver", "compress_layers": 0, "level_layers": 0, "latents": latents}
    )
    level = model.encoder[0]
    k_in, k_out = model.config.sizes[:2]
    x = torch.randn(2, 3, k_in, SHAPE["d_model"], dtype=torch.float64)
    with torch.no_grad():
        reference = level(x)[1]
        for j in range(k_in):
            changed = x.clone()
            changed[:, :, j] += 1.0
            out = level(changed)[1]
            for i in range(k_out):
                moved = not torch.equal(out[:, :, i], reference[:, :, i])
                assert moved == (j <= k_in - k_out + i), f"latent {i}, item {j}"


@pytest.mark.parametrize(
    "overrides",
    [{}, {"latents": "6,3,1", "widths": "16,24,8"}, {"group_len": 7, "widths": "64,48"}],
    ids=["default", "three-levels", "group7"],
)
@pytest.mark.parametrize("length", [BLOCK, 13, 5, 1])
def test_shapes_at_every_level(overrides: dict, length: int) -> None:
    """Encoder level l gives (B, G, K_l, w_l) and its skip (B, G, K_{l-1}, w_{l-1}), latent
    layers (B, G * K_n, d_model), decoder level l (B, G, K_{l-1}, w_{l-1}), G = ceil(T / L)."""
    model = build(overrides, torch.float32)
    config = model.config
    groups = -(-length // config.group_len)
    with torch.no_grad():
        logits, levels = level_outputs(model, tokens(4, length, batch=3))
    assert logits.shape == (3, length, VOCAB)
    n = len(config.sizes) - 1
    assert [name for name, _, _ in levels] == (
        [name for i in range(n) for name in (f"encoder{i}.skip", f"encoder{i}")]
        + [f"latent{i}" for i in range(config.n_layer)]
        + [f"decoder{i}" for i in range(n)]
    )
    for name, level, out in levels:
        k, width = config.sizes[level], config.level_widths[level]
        if name.startswith("latent"):
            assert out.shape == (3, groups * k, config.d_model), name
        else:
            assert out.shape == (3, groups, k, width), name


def test_repeat_upsampling_layout() -> None:
    """Group g's slots: group g-1's latents tiled (the latest just before the anchors), then the
    group's own latents at the anchors; group 0 gets the learned filler."""
    model = build({"group_len": 8, "latents": "6,4"})
    level = model.decoder[0]  # level 2 (K=4) -> level 1 (K=6): 2 filler slots
    x = torch.arange(3 * 4, dtype=torch.float64).view(1, 3, 4, 1).expand(1, 3, 4, 32)
    up = level.upsample(x)
    assert up.shape == (1, 3, 6, 32)
    assert torch.equal(up[0, 0, :2], level.first_group)
    assert up[0, 1:, :, 0].tolist() == [[2, 3, 4, 5, 6, 7], [6, 7, 8, 9, 10, 11]]
    model = build({"group_len": 8, "latents": "2"})
    x = torch.arange(2 * 2, dtype=torch.float64).view(1, 2, 2, 1).expand(1, 2, 2, 32)
    up = model.decoder[0].upsample(x)
    assert up[0, 1, :, 0].tolist() == [0, 1, 0, 1, 0, 1, 2, 3]


def test_skip_post_hides_a_group_from_its_own_early_positions() -> None:
    """skip=post (the original): inside the token-level decoder blocks, a filler position of
    group g sees nothing of the earlier tokens of group g (only the skip added afterwards does);
    skip=pre lets the decoder blocks see them."""
    idx = tokens(5)
    changed = idx.clone()
    changed[:, 8] = (idx[:, 8] + 1) % VOCAB  # first token of group 1 (group_len 8)
    for skip, blind in (("post", True), ("pre", False)):
        model = build({"skip": skip})
        outputs = []
        hook = model.decoder[-1].stack.register_forward_hook(
            lambda _m, _i, out, outputs=outputs: outputs.append(out.reshape(2, -1, out.shape[-1]))
        )
        with torch.no_grad():
            before, after = model(idx), model(changed)
        hook.remove()
        # Positions 9 … 11 are filler slots of group 1 (anchors of level 1 are 12 … 15).
        assert torch.equal(outputs[0][:, 9:12], outputs[1][:, 9:12]) == blind, skip
        assert not torch.equal(before[:, 9:12], after[:, 9:12])  # the skip carries them


def channel_as_block(layer: MultiChannelBlock, c: int, config: HourglassConfig) -> Block:
    """Channel c of a multi-channel layer as a baseline Block: its q/k/v rows, the shared output
    projection, and an MLP whose hidden units are channel c's followed by the shared ones."""
    d, heads = config.d_model, config.n_head
    attention = CausalSelfAttention(d, heads, heads, layer.rope)
    attention.qkv.weight = nn.Parameter(layer.qkv.weight[3 * d * c : 3 * d * (c + 1)])
    attention.proj.weight = layer.proj.weight
    own_in, own_out = layer.mlps.gate_up[c].T, layer.mlps.down[c].T
    hidden = config.channel_hidden * (1 + config.shared_channels)
    if config.mlp == "swiglu":
        mlp = SwiGLU(d, hidden)
        gate, up = own_in.chunk(2, dim=0)
        if layer.shared is not None:
            shared_gate, shared_up = layer.shared.gate_up.weight.chunk(2, dim=0)
            gate, up = torch.cat((gate, shared_gate)), torch.cat((up, shared_up))
        mlp.gate_up.weight = nn.Parameter(torch.cat((gate, up)))
    else:
        mlp = GELUMLP(d, hidden)
        shared_in = [layer.shared.up.weight] if layer.shared is not None else []
        mlp.up.weight = nn.Parameter(torch.cat([own_in, *shared_in]))
    shared_out = [layer.shared.down.weight] if layer.shared is not None else []
    mlp.down.weight = nn.Parameter(torch.cat([own_out, *shared_out], dim=1))
    block = Block(d, attention, mlp, config.norm)
    block.norm_attn.load_state_dict(layer.norm_attn.state_dict())
    block.norm_mlp.load_state_dict(layer.norm_mlp.state_dict())
    return block.to(torch.float64)


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize(("channels", "shared"), [(1, 0), (4, 0), (4, 2), (11, 1)])
def test_merge_mean_is_the_average_of_separate_channels(
    channels: int, shared: int, mlp: str
) -> None:
    model = build({"channels": channels, "shared_channels": shared, "merge": "mean", "mlp": mlp})
    layer = model.latent[0]
    assert isinstance(layer, MultiChannelBlock)
    x = torch.randn(2, 10, SHAPE["d_model"], dtype=torch.float64)
    with torch.no_grad():
        separate = [channel_as_block(layer, c, model.config)(x) for c in range(channels)]
        torch.testing.assert_close(layer(x), sum(separate) / channels, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("merge", ["softmax", "max"])
def test_other_merges_combine_separate_channels_per_element(merge: str) -> None:
    model = build({"channels": 4, "merge": merge})
    layer = model.latent[0]
    x = torch.randn(2, 10, SHAPE["d_model"], dtype=torch.float64)
    with torch.no_grad():
        separate = torch.stack([channel_as_block(layer, c, model.config)(x) for c in range(4)])
        expected = (
            (separate * separate.exp()).sum(0) / separate.exp().sum(0)
            if merge == "softmax"
            else separate.max(dim=0).values
        )
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_merge_softmax_is_a_convex_combination() -> None:
    x = torch.randn(5, 2, 3, 4, dtype=torch.float64)
    merged = softmax_merge(x)
    assert torch.all(merged <= x.amax(0) + 1e-12) and torch.all(merged >= x.amin(0) - 1e-12)
    same = x[:1].expand(5, -1, -1, -1)
    torch.testing.assert_close(softmax_merge(same), x[0])


def test_channel_mlps_share_one_vanilla_budget() -> None:
    """With channel_mlp_multiple=1, the channel and shared MLPs of a multi-channel layer hold
    the parameters of one vanilla MLP (exactly, when 4 MLPs divide the vanilla hidden 88)."""
    model = build({"channels": 3, "shared_channels": 1})
    layer, vanilla = model.latent[0], build({"multichannel_every": 0}).latent[0]
    n_mlp = sum(p.numel() for p in (*layer.mlps.parameters(), *layer.shared.parameters()))
    n_vanilla = sum(p.numel() for p in vanilla.mlp.parameters())
    assert model.config.channel_hidden == 22 and n_mlp == n_vanilla


def test_multichannel_every_picks_the_layers() -> None:
    model = build({"n_layer": 4, "multichannel_every": 2})
    kinds = [isinstance(layer, MultiChannelBlock) for layer in model.latent]
    assert kinds == [False, True, False, True]
    assert not any(
        isinstance(x, MultiChannelBlock) for x in build({"multichannel_every": 0}).latent
    )


def test_too_long_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds block_size"):
        build({})(torch.zeros(1, BLOCK + 1, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"group_len": 25}, r"group_len=25 exceeds block_size=24"),
        ({"group_len": 1}, r"'group_len': 1 is out of range"),
        ({"latents": ""}, r"latents='' must name at least one level"),
        ({"latents": "4,x"}, r"latents='4,x' must be comma-separated positive integers"),
        ({"latents": "4,0"}, r"latents='4,0' must be comma-separated positive integers"),
        ({"latents": "2,4"}, r"latents='2,4' must decrease strictly"),
        ({"latents": "8,2"}, r"latents='8,2' must decrease strictly and stay below group_len=8"),
        ({"widths": "32"}, r"widths='32' names 1 widths, but latents='4,2' needs 2"),
        ({"widths": "32,30"}, r"widths: width 30 is not divisible by n_head=4"),
        ({"widths": "32,12"}, r"widths: head width 12/4=3 must be even"),
        ({"widths": "32;16"}, r"widths='32;16' must be comma-separated positive integers"),
        ({"d_model": 36, "n_head": 8}, r"d_model: width 36 is not divisible by n_head=8"),
        ({"d_model": 12, "n_head": 4}, r"d_model: head width 12/4=3 must be even"),
        ({"compress_layers": 0}, r"compress_layers=0 with compression=keep_last"),
        ({"multichannel_every": 3}, r"multichannel_every=3 exceeds n_layer=2"),
        ({"channels": 0}, r"'channels': 0 is out of range"),
        ({"shared_channels": -1}, r"'shared_channels': -1 is out of range"),
        ({"channel_mlp_multiple": 0}, r"'channel_mlp_multiple': 0.0 is out of range"),
        ({"merge": "sum"}, r"'merge': 'sum' is not one of softmax \| mean \| max"),
        ({"compression": "pool"}, r"'compression': 'pool' is not one of keep_last \| perceiver"),
        ({"upsampling": "linear"}, r"'upsampling': 'linear' is not one of repeat \| attention"),
        ({"skip": "both"}, r"'skip': 'both' is not one of pre \| post"),
        ({"local_global": "mixed"}, r"'local_global': 'mixed' is not one of"),
        ({"level_layers": -1}, r"'level_layers': -1 is out of range"),
    ],
)
def test_invalid_options_give_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(**overrides)
