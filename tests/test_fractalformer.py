"""fractalformer: sub-models as slices (checked against hand-sliced weights in a `gpt`-style
decoder built from blocks.py), every sub-model trained by its own loss, causality of every
sub-model under every option and residual variant, merge initialisation and freezing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from archbench.checkpoint import load_weights, save_weights
from archbench.errors import ConfigError
from archbench.evaluate.leakcheck import leak_check
from archbench.generate import generate
from archbench.models.fractalformer import (
    MLP_MODULES,
    FractalFormer,
    FractalFormerConfig,
    Siblings,
    SubModelView,
    check_merge_source,
    merge_init,
    parse_merge_targets,
)
from archbench.models.gpt import GPT, GPTConfig
from archbench.models.mtp import MTPConfig
from archbench.options import coerce_all

VOCAB, BLOCK = 37, 16
SHAPE = {"n_layer": 2, "n_head": 4, "d_model": 32}
SPLIT3 = {"split": 3, "levels": 2, "d_model": 24, "mlp_hidden": 48}  # head width 6 -> 2
# Every value of every option besides the defaults (split 2, levels 3, residual none, sum, SwiGLU).
OPTION_CASES = [
    {},
    SPLIT3,
    {"split": 4, "levels": 2},
    {"levels": 1},
    {"levels": 2},
    {"residual": "upstream"},
    {"residual": "downstream"},
    {**SPLIT3, "residual": "upstream"},
    {**SPLIT3, "residual": "downstream"},
    {"loss_reduction": "mean"},
    {"loss_reduction": "weighted"},
    {"loss_reduction": "weighted", "level_weights": "1,0.5,0"},
    {"mlp": "gelu"},
    {"mlp": "geglu"},
    {"mlp_hidden": 48},
    {"mlp_ratio": 2.0},
    {"n_kv_heads": 1},
    {"n_kv_heads": 2, "residual": "upstream"},
    {"norm": "layernorm"},
    {"tie_embeddings": False},
    {"dropout": 0.1},
    {"init_std": 0.05},
    {"rope_base": 500.0},
    {"n_layer": 1},
    {"n_layer": 3},
    {"n_head": 2},
]
IDS = ["-".join(f"{k}={v}" for k, v in case.items()) or "default" for case in OPTION_CASES]
RESIDUALS = [{}, {"residual": "upstream"}, {"residual": "downstream"}]
RESIDUALS_AND_SPLITS = RESIDUALS + [{**SPLIT3, **r} for r in RESIDUALS]


def configure(**overrides) -> FractalFormerConfig:
    """A validated config; overrides may be strings, as in the experiments table."""
    typed = coerce_all(FractalFormerConfig, {**SHAPE, **overrides}, "fractalformer")
    config = FractalFormerConfig(vocab_size=VOCAB, block_size=BLOCK, **typed)
    config.validate()
    return config


def build(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> FractalFormer:
    """A small eval-mode model in `dtype`."""
    torch.manual_seed(seed)
    return FractalFormer(configure(**overrides)).to(dtype).eval()


def tokens(seed: int, batch: int = 2, length: int = BLOCK) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hand_sliced(model: FractalFormer, level: int, index: int) -> dict[str, torch.Tensor]:
    """Sub-model (level, index)'s weights, sliced by hand from the issue's definition."""
    c = model.config
    n, j = c.split**level, index
    head, d_l, f_l = c.d_model // c.n_head, c.d_model // n, c.hidden // n
    h_l = head // n
    residual = list(range(j * d_l, (j + 1) * d_l))
    hidden = list(range(j * f_l, (j + 1) * f_l))

    def heads(count: int) -> list[int]:  # inside head i: [i h + j h_l, i h + (j + 1) h_l)
        return [i * head + j * h_l + e for i in range(count) for e in range(h_l)]

    weights = {}
    for name, p in model.state_dict().items():
        if name.endswith("qkv.weight"):
            w = p[heads(c.n_head + 2 * c.kv_heads)][:, residual]
        elif name.endswith("proj.weight"):
            w = p[residual][:, heads(c.n_head)]
        elif name.endswith("gate_up.weight"):
            w = p[hidden + [c.hidden + u for u in hidden]][:, residual]
        elif name.endswith(".up.weight"):
            w = p[hidden][:, residual]
        elif name.endswith("down.weight"):
            w = p[residual][:, hidden]
        elif name.endswith("embed.weight"):  # embed and unembed: the sub-model's columns
            w = p[:, residual]
        else:  # norm scales
            w = p[residual]
        weights[name] = w
    return weights


def reference_decoder(model: FractalFormer, level: int, index: int) -> GPT:
    """A `gpt` decoder (blocks.py modules) of the sub-model's shape holding hand-sliced weights."""
    c = model.config.submodel_config(level)
    ref = GPT(
        GPTConfig(
            vocab_size=VOCAB,
            block_size=BLOCK,
            n_layer=c.n_layer,
            n_head=c.n_head,
            d_model=c.d_model,
            n_kv_heads=c.n_kv_heads,
            norm=c.norm,
            rope_base=c.rope_base,
            tie_embeddings=c.tie_embeddings,
        )
    )
    for block in ref.blocks:  # the sub-model's hidden width, which gpt's mlp_ratio cannot express
        block.mlp = MLP_MODULES[c.mlp](c.d_model, c.hidden)
    ref = ref.to(torch.float64).eval()
    ref.load_state_dict(hand_sliced(model, level, index), strict=True)
    return ref


def ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---- the mechanism ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_kv_heads": 1}, {"mlp": "gelu"}, {"norm": "layernorm"}, {"tie_embeddings": False}],
)
def test_full_model_is_gpt(overrides: dict) -> None:
    """Level 0 is `gpt`: same names, shapes, initial weights (same seed) and logits."""
    model = build(torch.float32, **overrides)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, **SHAPE, **overrides)).eval()
    ours, theirs = model.state_dict(), gpt.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    idx = tokens(0)
    torch.testing.assert_close(model(idx), gpt(idx), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"mlp": "gelu", "n_kv_heads": 1}, {"mlp": "geglu", "norm": "layernorm"}, SPLIT3],
    ids=["swiglu", "gelu-mqa", "geglu-layernorm", "split3"],
)
def test_submodel_equals_standalone_decoder_with_sliced_weights(overrides: dict) -> None:
    """forward_submodel == a blocks.py decoder holding the hand-sliced weights, for every
    sub-model; extract_submodel holds exactly those weights."""
    model = build(**overrides)
    idx = tokens(1)
    for level, index in model.config.submodels():
        expected = reference_decoder(model, level, index)(idx)
        logits = model.forward_submodel(idx, level, index)
        torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
        standalone = model.extract_submodel(level, index)
        sliced = hand_sliced(model, level, index)
        assert all(torch.equal(v, sliced[k]) for k, v in standalone.state_dict().items())
        assert standalone.config.levels == 1
        torch.testing.assert_close(standalone(idx), logits, rtol=1e-12, atol=1e-12)


def test_siblings_share_nothing_and_children_tile_the_parent() -> None:
    model = build(tie_embeddings=False)
    for name, param in model.named_parameters():
        owners = torch.zeros_like(param, dtype=torch.long)
        for index in range(4):
            owners[model.submodel_index(name, 2, index)] += 1
        assert owners.max() == 1, name  # level-2 blocks are disjoint
        for parent in range(2):
            inside = torch.zeros_like(param, dtype=torch.bool)
            inside[model.submodel_index(name, 1, parent)] = True
            for child in (2 * parent, 2 * parent + 1):
                assert inside[model.submodel_index(name, 2, child)].all(), name


def test_strided_blocks_equal_the_indexed_blocks() -> None:
    """`Siblings.take` (strided views, used by the computation) reads exactly the blocks that
    `Siblings.index` (the definition, used by extraction and merging) names."""
    model = build(tie_embeddings=False, n_kv_heads=2)
    for name, param in model.named_parameters():
        groups = model.parameter_groups(name)
        for level in range(1, model.config.levels):
            n = model.config.count(level)
            for start, stop in ((0, n), (1, n), (n - 1, n), (0, 1)):
                siblings = Siblings(n, start, stop)
                expected = param[siblings.index(param.shape, groups, param.device)]
                assert torch.equal(siblings.take(param, groups), expected), (name, level, start)


def test_submodel_costs_its_own_size() -> None:
    """A level-2 sub-model does the FLOPs of its standalone model, about 1/16 of the matmuls."""
    model, idx = build(torch.float32, n_layer=2), tokens(2)

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    small = flops(lambda: model.forward_submodel(idx, 2, 3))
    assert small == flops(lambda: model.extract_submodel(2, 3)(idx))
    assert small * 8 < flops(lambda: model(idx))


@pytest.mark.parametrize("residual", ["none", "upstream"])
def test_parameter_counts(residual: str) -> None:
    """A sub-model's count is that of its standalone form (with upstream, its subtree, which
    lies inside its own blocks)."""
    model = build(residual=residual)
    full = sum(p.numel() for p in model.parameters())
    assert model.submodel_parameter_count(0) == full
    for level in (1, 2):
        standalone = model.extract_submodel(level, 1)
        assert model.submodel_parameter_count(level) == sum(
            p.numel() for p in standalone.parameters()
        )


def test_a_downstream_sub_model_counts_every_parameter_it_reads() -> None:
    """With residual=downstream a sub-model runs its ancestors up to the whole model: its logits
    change with weights outside its own blocks, so its size is the whole model's."""
    model, idx = build(torch.float64, residual="downstream"), tokens(2)
    full = sum(p.numel() for p in model.parameters())
    assert [model.submodel_parameter_count(level) for level in (0, 1, 2)] == [full] * 3
    before = model.forward_submodel(idx, 2, 0)
    weight = model.blocks[0].attn.qkv.weight
    own = torch.zeros_like(weight, dtype=torch.bool)
    own[model.submodel_index("blocks.0.attn.qkv.weight", 2, 0)] = True
    with torch.no_grad():
        weight[~own] += 0.5  # every weight of this matrix outside L2.0's block
    assert not torch.allclose(model.forward_submodel(idx, 2, 0), before)


@pytest.mark.parametrize("overrides", RESIDUALS_AND_SPLITS)
def test_every_submodel_is_trained_by_its_own_loss(overrides: dict) -> None:
    """The training loss has one part per sub-model, equal to that sub-model's own CE, and its
    gradient is the weighted sum of every sub-model's own gradient; each sub-model's loss
    reaches every one of its own blocks (and, without exchange, nothing else)."""
    model, idx = build(**overrides), tokens(3)
    targets = torch.roll(idx, -1, 1)
    c = model.config
    total, parts = model.loss(idx, targets)
    assert list(parts) == ["next_token"] + [f"L{lv}.{j}" for lv, j in c.submodels()]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(total, list(params.values()))
    expected = [torch.zeros_like(p) for p in params.values()]
    for (level, index), weight in zip(c.submodels(), c.submodel_loss_weights(), strict=True):
        own = ce(model.forward_submodel(idx, level, index), targets)
        torch.testing.assert_close(parts[f"L{level}.{index}"], own, rtol=1e-12, atol=1e-12)
        own_grads = torch.autograd.grad(own, list(params.values()))
        for name, grad, acc in zip(params, own_grads, expected, strict=True):
            acc += weight * grad
            block = model.submodel_index(name, level, index)
            assert grad[block].abs().sum() > 0, f"L{level}.{index} gets no gradient on {name}"
            if c.residual != "downstream":  # reads only its own blocks (its subtree's included)
                outside = grad.clone()
                outside[block] = 0
                assert not outside.any(), f"L{level}.{index} reaches outside its blocks: {name}"
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    assert torch.equal(parts["next_token"], parts["L0.0"])


@pytest.mark.parametrize(
    ("overrides", "weights"),
    [
        ({}, [1.0] * 7),
        ({"loss_reduction": "mean"}, [1 / 7] * 7),
        ({"loss_reduction": "weighted"}, [1.0] * 7),
        ({"loss_reduction": "weighted", "level_weights": "2, 0.5 ,0"}, [2, 0.5, 0.5, 0, 0, 0, 0]),
    ],
)
def test_loss_reduction(overrides: dict, weights: list[float]) -> None:
    model, idx = build(**overrides), tokens(4)
    total, parts = model.loss(idx, idx)
    values = [v for k, v in parts.items() if k != "next_token"]
    expected = sum(w * v for w, v in zip(weights, values, strict=True))
    torch.testing.assert_close(total.detach(), expected, rtol=1e-12, atol=1e-12)


def test_upstream_subtree_and_downstream_ancestors() -> None:
    """Upstream: a sub-model is its subtree (extractable, independent of the rest); downstream:
    it depends on its parent, so it has no standalone form."""
    idx = tokens(5)
    up = build(residual="upstream")
    for level, index in up.config.submodels():
        standalone = up.extract_submodel(level, index)
        assert standalone.config.levels == up.config.levels - level
        torch.testing.assert_close(
            standalone(idx), up.forward_submodel(idx, level, index), rtol=1e-12, atol=1e-12
        )
    # an upstream parent reads its children: it is not the plain decoder of its own blocks
    plain = reference_decoder(up, 1, 0)(idx)
    assert not torch.allclose(up.forward_submodel(idx, 1, 0), plain)
    torch.testing.assert_close(up.forward_submodel(idx, 2, 1), reference_decoder(up, 2, 1)(idx))

    down = build(residual="downstream")
    torch.testing.assert_close(down(idx), reference_decoder(down, 0, 0)(idx))
    assert not torch.allclose(down.forward_submodel(idx, 2, 1), reference_decoder(down, 2, 1)(idx))
    with pytest.raises(ValueError, match="no standalone form"):
        down.extract_submodel(1, 0)


def test_residual_exchange_follows_the_definition() -> None:
    """One layer, two levels: upstream adds the children's outputs to the parent's; downstream
    adds the parent's slices to the children's (checked with a hand-written layer stack)."""
    idx = tokens(6)
    for mode in ("upstream", "downstream"):
        model = build(n_layer=1, levels=2, residual=mode)
        plain = build(n_layer=1, levels=2)
        with torch.no_grad():
            x0 = plain.embed(idx)
            parent = _one_layer(plain, x0, 1, [0])
            children = _one_layer(plain, x0, 2, [0, 1])
        if mode == "upstream":
            parent = parent + children
        else:
            children = children + parent
        for level, index, state in ((0, 0, parent), (1, 0, children[..., :16])):
            n = 2**level
            w = model.norm_out.weight.view(n, -1)[index]
            h = F.rms_norm(state, (state.shape[-1],), eps=1e-6) * w
            logits = h @ model.embed.weight.view(VOCAB, n, -1)[:, index].T
            torch.testing.assert_close(model.forward_submodel(idx, level, index), logits)


def _one_layer(model: FractalFormer, x0: torch.Tensor, n: int, indices: list[int]) -> torch.Tensor:
    """The first block of each listed sub-model (n per level), concatenated on the last axis."""
    outs = []
    for index in indices:
        level = n.bit_length() - 1
        ref = reference_decoder(model, level, index)
        x = x0.view(*x0.shape[:2], n, -1)[:, :, index]
        outs.append(ref.blocks[0](x))
    return torch.cat(outs, dim=-1)


# ---- causality, prefix consistency: every option value, every sub-model (determinism: test_models)


@pytest.mark.parametrize("overrides", OPTION_CASES, ids=IDS)
def test_causality_of_every_submodel(overrides: dict) -> None:
    """Changing tokens after t leaves every sub-model's logits at positions <= t unchanged."""
    model = build(**overrides)
    generator = torch.Generator().manual_seed(7)
    idx = tokens(7)
    with torch.no_grad():
        for level, index in model.config.submodels():
            reference = model.forward_submodel(idx, level, index)
            for t in range(BLOCK - 1):
                changed = idx.clone()
                changed[:, t + 1 :] = torch.randint(
                    0, VOCAB, (2, BLOCK - t - 1), generator=generator
                )
                logits = model.forward_submodel(changed, level, index)
                assert torch.equal(logits[:, : t + 1], reference[:, : t + 1]), (level, index, t)
                assert not torch.allclose(logits[:, t + 1 :], reference[:, t + 1 :])


@pytest.mark.parametrize("overrides", OPTION_CASES, ids=IDS)
def test_prefix_consistency_of_every_submodel(overrides: dict) -> None:
    model, idx = build(**overrides), tokens(8)
    with torch.no_grad():
        for level, index in model.config.submodels():
            full = model.forward_submodel(idx, level, index)
            for t in (1, 9):
                prefix = model.forward_submodel(idx[:, :t], level, index)
                torch.testing.assert_close(prefix, full[:, :t], rtol=1e-10, atol=1e-10)


def test_checkpoint_round_trip(tmp_path) -> None:
    """The suite's safetensors weights file rebuilds the same model (tied weights stored once)."""
    model = build(torch.float32, residual="upstream")
    save_weights(model, tmp_path / "model.safetensors")
    rebuilt = build(torch.float32, seed=1, residual="upstream")
    load_weights(rebuilt, tmp_path / "model.safetensors")
    idx = tokens(14)
    assert torch.equal(rebuilt.forward_submodel(idx, 1, 1), model.forward_submodel(idx, 1, 1))


def test_trains_after_an_inference_mode_evaluation() -> None:
    """Evaluation runs under `torch.inference_mode`; nothing it builds may leak into training."""
    model = build(torch.float32)
    idx = tokens(15)
    with torch.inference_mode():
        model(idx)
        model.forward_submodel(idx, 1, 0)
    model.train()
    loss, _ = model.loss(idx, tokens(16))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_too_long_sequence_and_unknown_submodel_are_refused() -> None:
    model = build()
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="no sub-model L1.2"):
        model.forward_submodel(tokens(0), 1, 2)
    with pytest.raises(ValueError, match="no sub-model L3.0"):
        model.forward_submodel(tokens(0), 3, 0)


# ---- inference -----------------------------------------------------------------------------


def test_generate_with_a_submodel_alone() -> None:
    """A sub-model generates as its standalone copy does, in eval mode even with dropout on."""
    model = build(torch.float32, dropout=0.5).train()
    prompt = tokens(10, batch=2, length=5)
    view = SubModelView(model, 2, 3)
    out = generate(view, prompt, 20, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 25) and torch.equal(out[:, :5], prompt) and model.training
    alone = model.extract_submodel(2, 3)
    again = generate(alone, prompt, 20, top_k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_submodel_view_is_evaluated_like_any_model() -> None:
    model = build(torch.float32, residual="downstream")
    view = SubModelView(model, 2, 1)
    idx = tokens(11)
    assert torch.equal(view(idx), model.forward_submodel(idx, 2, 1))
    result = leak_check(view, idx.flatten().numpy(), BLOCK, VOCAB, n_windows=2)
    assert result["leak_check_passed"] == 1.0


# ---- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"split": 1}, r"'split': 1 is out of range"),
        ({"levels": 0}, r"'levels': 0 is out of range"),
        ({"residual": "sideways"}, r"'residual': 'sideways' is not one of none \| upstream"),
        ({"loss_reduction": "max"}, r"'loss_reduction': 'max' is not one of sum \| mean"),
        ({"mlp": "relu"}, r"'mlp': 'relu' is not one of swiglu \| gelu \| geglu"),
        ({"mlp_hidden": -1}, r"'mlp_hidden': -1 is out of range"),
        ({"split": 3}, r"head width d_model/n_head=8 is not divisible by split\*\*\(levels-1\)"),
        ({"levels": 4}, r"deepest sub-models.* = 1, must be even for RoPE"),
        ({"mlp_hidden": 50}, r"MLP hidden width 50 \(from mlp_hidden.* not divisible"),
        (
            {"mlp": "gelu", "mlp_ratio": 1.3},
            r"MLP hidden width 42 .*split\*\*\(levels-1\) = 2\*\*2",
        ),
        ({"n_head": 3}, r"d_model=32 is not divisible by n_head=3"),
        ({"loss_reduction": "weighted", "level_weights": "1,2"}, r"2 weights given for levels=3"),
        ({"loss_reduction": "weighted", "level_weights": "1,x,2"}, r"not a comma-separated list"),
        ({"loss_reduction": "weighted", "level_weights": "0,0,0"}, r"not all zero"),
        ({"loss_reduction": "weighted", "level_weights": "1,-1,1"}, r"must be finite, >= 0"),
        ({"loss_reduction": "weighted", "level_weights": "1,nan,1"}, r"must be finite"),
        ({"level_weights": "1,1,1"}, r"'level_weights' is used only with loss_reduction=weighted"),
    ],
)
def test_invalid_options_give_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        configure(**overrides)


def test_string_values_from_a_table_are_parsed() -> None:
    config = configure(split="3", levels="2", d_model="24", mlp_hidden="48", residual="upstream")
    assert (config.split, config.levels, config.residual) == (3, 2, "upstream")
    assert config.submodels() == [(0, 0), (1, 0), (1, 1), (1, 2)]


def test_submodel_config_is_the_standalone_shape() -> None:
    config = configure()
    sub = config.submodel_config(2)
    assert (sub.d_model, sub.hidden, sub.levels, sub.n_head) == (8, config.hidden // 4, 1, 4)
    sub.validate()


# ---- merging -------------------------------------------------------------------------------


def _source(config: FractalFormerConfig, level: int, seed: int) -> FractalFormer:
    torch.manual_seed(seed)
    return FractalFormer(config.submodel_config(level)).to(torch.float64).eval()


def _blocks(model: FractalFormer, level: int, index: int) -> dict[str, torch.Tensor]:
    return {
        name: p[model.submodel_index(name, level, index)][0].detach().clone()
        for name, p in model.named_parameters()
    }


def _train(model: FractalFormer, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    model.train()
    for step in range(steps):
        idx = tokens(20 + step, batch=4)
        loss, _ = model.loss(idx, torch.roll(idx, -1, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_merge_copies_exactly_and_frozen_blocks_survive_adamw_weight_decay() -> None:
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sources = {(1, 0): _source(model.config, 1, 1), (1, 1): _source(model.config, 1, 2)}
    frozen = merge_init(model, {k: m.state_dict() for k, m in sources.items()}, freeze=True)
    assert frozen is not None
    idx = tokens(12)
    for (level, index), source in sources.items():
        assert all(
            torch.equal(v, source.state_dict()[k])
            for k, v in model.extract_submodel(level, index).state_dict().items()
        )
        torch.testing.assert_close(model.forward_submodel(idx, level, index), source(idx))
    # an off-diagonal block of the full model (rows of L1.0, hidden units of L1.1) is untouched
    corner = model.blocks[0].mlp.down.weight[:16, 44:].clone()
    assert torch.equal(corner, before["blocks.0.mlp.down.weight"][:16, 44:])

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    frozen.attach(optimizer)
    _train(model, optimizer)
    for (level, index), source in sources.items():
        blocks = _blocks(model, level, index)
        assert all(torch.equal(blocks[k], source.state_dict()[k]) for k in blocks)
    assert not torch.equal(model.blocks[0].mlp.down.weight[:16, 44:], corner)
    grad = model.blocks[0].attn.qkv.weight.grad
    assert grad[model.submodel_index("blocks.0.attn.qkv.weight", 1, 1)].abs().sum() == 0
    assert grad.abs().sum() > 0


def test_without_attach_weight_decay_moves_frozen_blocks() -> None:
    """Why `attach` exists: masked gradients alone do not stop AdamW's weight decay."""
    model = build()
    source = _source(model.config, 2, 1)
    frozen = merge_init(model, {(2, 1): source.state_dict()}, freeze=True)
    assert frozen is not None
    _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), steps=1)
    name = "blocks.0.mlp.down.weight"
    assert not torch.equal(_blocks(model, 2, 1)[name], source.state_dict()[name])
    frozen.restore()
    assert torch.equal(_blocks(model, 2, 1)[name], source.state_dict()[name])


def test_merge_without_freeze_trains_the_blocks() -> None:
    model = build()
    source = _source(model.config, 1, 1)
    assert merge_init(model, {(1, 0): source.state_dict()}, freeze=False) is None
    _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), steps=1)
    block = _blocks(model, 1, 0)["blocks.0.attn.qkv.weight"]
    assert not torch.equal(block, source.state_dict()["blocks.0.attn.qkv.weight"])


def test_merge_accepts_a_gpt_checkpoint() -> None:
    """A `gpt` row of the sub-model's width is a valid source when its hidden width matches."""
    model = build(mlp="gelu")
    torch.manual_seed(3)
    config = GPTConfig(VOCAB, BLOCK, n_layer=2, n_head=4, d_model=16, mlp="gelu")
    gpt = GPT(config).to(torch.float64).eval()
    check_merge_source(model.config, 1, "gpt", gpt.config)
    merge_init(model, {(1, 1): gpt.state_dict()}, freeze=False)
    idx = tokens(13)
    torch.testing.assert_close(model.forward_submodel(idx, 1, 1), gpt(idx))


def test_merge_errors() -> None:
    model = build()
    small, medium = (
        _source(model.config, 2, 1).state_dict(),
        _source(model.config, 1, 1).state_dict(),
    )
    with pytest.raises(ConfigError, match="L1.0 contains L2.1"):
        merge_init(model, {(1, 0): medium, (2, 1): small}, freeze=False)
    with pytest.raises(ConfigError, match=r"'embed.weight' has shape \(37, 8\), .* \(37, 16\)"):
        merge_init(model, {(1, 0): small}, freeze=False)
    with pytest.raises(ConfigError, match=r"missing keys \['norm_out.weight'\]"):
        incomplete = {k: v for k, v in medium.items() if k != "norm_out.weight"}
        merge_init(model, {(1, 0): incomplete}, freeze=False)
    untied = FractalFormer(replace(model.config.submodel_config(1), tie_embeddings=False))
    with pytest.raises(ConfigError, match="untied embeddings cannot fill a tied model"):
        merge_init(model, {(1, 0): untied.state_dict()}, freeze=False)
    with pytest.raises(ValueError, match="no sub-model L1.2"):
        merge_init(model, {(1, 2): medium}, freeze=False)


def test_parse_merge_targets() -> None:
    config = configure()
    assert parse_merge_targets(["L1.0", " L1.1"], config) == [(1, 0), (1, 1)]
    assert parse_merge_targets(["L2.3", "L1.0", "L2.2"], config) == [(2, 3), (1, 0), (2, 2)]
    for names, message in [
        (["M1.0"], "not a sub-model name"),
        (["L1.2"], "no sub-model L1.2"),
        (["L3.0"], "no sub-model L3.0"),
        (["L1.0", "L2.1"], "L2.1 and L1.0 overlap"),
        (["L2.2", "L1.1"], "L1.1 and L2.2 overlap"),
        (["L0.0", "L2.3"], "L2.3 and L0.0 overlap"),
        (["L1.0", "L1.0"], "overlap"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_merge_targets(names, config)


def test_check_merge_source() -> None:
    config = configure()
    check_merge_source(config, 1, "fractalformer", config.submodel_config(1))
    wide = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, **SHAPE)
    with pytest.raises(ConfigError, match="d_model is 32, needs 16"):
        check_merge_source(config, 1, "gpt", wide)
    with pytest.raises(ConfigError, match="MLP hidden width is 48, needs 44"):
        check_merge_source(config, 1, "gpt", replace(wide, d_model=16))
    with pytest.raises(ConfigError, match="norm is layernorm, needs rmsnorm"):
        check_merge_source(
            config, 1, "fractalformer", replace(config.submodel_config(1), norm="layernorm")
        )
    with pytest.raises(ConfigError, match="architecture 'mtp' is not gpt or fractalformer"):
        check_merge_source(config, 1, "mtp", MTPConfig(vocab_size=VOCAB, block_size=BLOCK))
    with pytest.raises(ConfigError, match="residual=upstream and levels > 1"):
        check_merge_source(config, 0, "fractalformer", replace(config, residual="upstream"))


@pytest.mark.parametrize(
    ("residual", "level", "accepted"),
    [
        ("none", 1, True),
        ("upstream", 2, True),  # the last level has no children to read
        ("upstream", 1, False),
        ("downstream", 0, True),  # the whole model has no ancestor to read
        ("downstream", 1, False),
    ],
)
def test_a_merge_target_must_compute_what_its_source_computes(
    residual: str, level: int, accepted: bool
) -> None:
    """A sub-model that reads other sub-models' residuals is no standalone decoder: filling it
    with one would give frozen blocks that do not compute the frozen source."""
    config = replace(configure(), residual=residual)
    source = config.submodel_config(level)
    if accepted:
        check_merge_source(config, level, "fractalformer", source)
        return
    with pytest.raises(ConfigError, match=f"with residual={residual}, a level-{level} sub-model"):
        check_merge_source(config, level, "fractalformer", source)


def test_merge_init_refuses_a_target_that_reads_other_sub_models() -> None:
    model = build(residual="downstream")
    source = FractalFormer(model.config.submodel_config(1))
    with pytest.raises(ConfigError, match="with residual=downstream, a level-1 sub-model"):
        merge_init(model, {(1, 0): source.state_dict()}, freeze=False)
