"""Every registered architecture and every ablation value: shapes, causality, determinism and
clear errors for invalid options."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import (
    assert_causal_at_every_position,
    assert_causal_in_training_mode,
    assert_deterministic,
    assert_loss_causal_in_training_mode,
)
from torch.utils._python_dispatch import TorchDispatchMode

from archbench.errors import ConfigError
from archbench.models import ARCHITECTURES, build_model, list_options
from archbench.models.blocks import IGNORE_INDEX, next_token_loss
from archbench.options import Option, options_of
from archbench.train import TrainConfig, make_train_config

VOCAB, BLOCK = 37, 24
SHAPE = {"n_layer": 2, "n_head": 4, "d_model": 32}
# Values tried for non-categorical options, besides the default (chosen to fit SHAPE).
ALTERNATES = {
    "n_kv_heads": (1, 2),
    "n_layer": (1, 3),
    "n_head": (2, 8),
    "d_model": (16, 48),
    "mlp_ratio": (1.5,),
    "rope_base": (500.0,),
    "dropout": (0.1,),
    "init_std": (0.05,),
    "n_future": (1, 4),
    "head_layers": (2,),
    "future_loss_weight": (0.0, 0.5),
    "future_dim": (1, 5),
    "future_layers": ("last", "0"),
    "future_levels": (1, 3),
    "future_mult": (3, 4),
    "memory_topk": (1, 3),
    "pool_slots_n": (1.0, 3.0),
    "group_len": (6, 12),
    "latents": ("4", "6,3,1"),
    "widths": ("16,24", "64,48"),
    "compress_layers": (2,),
    "level_layers": (0, 2),
    "multichannel_every": (0, 2),
    "channels": (1, 4),
    "shared_channels": (0, 2),
    "channel_mlp_multiple": (0.5, 2.0),
}
# Per architecture: values replacing ALTERNATES where the shared ones do not fit its shape.
ARCH_ALTERNATES = {
    "fractalformer": {
        "n_head": (2,),
        "d_model": (64, 96),
        "levels": (1, 2),
        "mlp_hidden": (48, 64),
    },
}
# Options that are only valid together with others, tried as a set.
COMBINED = {
    "fractalformer": (
        {"split": 4, "levels": 2},
        {"split": 3, "levels": 2, "d_model": 24, "mlp_hidden": 48},
        {"loss_reduction": "weighted", "level_weights": "1,0.5,0.25"},
    ),
}


def ablation_cases() -> list[tuple[str, dict]]:
    """(arch, overrides) for every architecture x option x value worth testing."""
    cases = []
    for arch in sorted(ARCHITECTURES):
        cases.append((arch, {}))
        combined = COMBINED.get(arch, ())
        cases += [(arch, dict(overrides)) for overrides in combined]
        in_combined = {key for overrides in combined for key in overrides}
        for name, opt in list_options(arch).items():
            if opt.choices is not None:
                values = opt.choices
            elif opt.type == "bool":
                values = (True, False)
            else:
                values = ARCH_ALTERNATES.get(arch, {}).get(name) or ALTERNATES.get(name, ())
                assert values or name in in_combined, (
                    f"add test values for option '{name}' of '{arch}' to ALTERNATES"
                )
            cases += [(arch, {name: v}) for v in values if v != opt.default]
    return cases


CASES = ablation_cases()
IDS = [f"{arch}-" + ("-".join(f"{k}={v}" for k, v in o.items()) or "default") for arch, o in CASES]


def build(arch: str, overrides: dict, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A small eval-mode model in `dtype`, seeded."""
    torch.manual_seed(0)
    model = build_model(arch, VOCAB, BLOCK, **{**SHAPE, **overrides})
    return model.to(dtype).eval()


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_forward_shape_and_loss(arch: str, overrides: dict) -> None:
    model = build(arch, overrides, torch.float32).train()
    idx = torch.randint(0, VOCAB, (3, BLOCK))
    assert model(idx).shape == (3, BLOCK, VOCAB)
    assert model(idx[:, :5]).shape == (3, 5, VOCAB)
    loss, parts = model.loss(idx, torch.roll(idx, -1, 1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.isfinite(v) for v in parts.values())


MASKED_CASES = [(arch, {}) for arch in sorted(ARCHITECTURES)] + [("mtp", {"n_future": 4})]


@pytest.mark.parametrize(("arch", "overrides"), MASKED_CASES)
@pytest.mark.parametrize("answers", [0, 2])
def test_loss_stays_finite_when_targets_are_masked_out(
    arch: str, overrides: dict, answers: int
) -> None:
    """A synthetic task's loss mask can leave a window (or a future head's slice of it) with no
    target at all; that is no divergence: the loss and its gradients stay finite."""
    model = build(arch, overrides, torch.float32).train()
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    targets = torch.full_like(idx, IGNORE_INDEX)
    targets[:, :answers] = idx[:, 1 : answers + 1]
    loss, parts = model.loss(idx, targets)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_loss_parts_are_float32_under_bf16_autocast(arch: str) -> None:
    """bf16 autocast (the gpu suite; also on the CPU) must not round the logged loss parts."""
    model = build(arch, {}, torch.float32).train()
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = model.loss(idx, torch.roll(idx, -1, 1))
    assert {str(v.dtype) for v in (loss, *parts.values())} == {"torch.float32"}


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_causality(arch: str, overrides: dict) -> None:
    """Changing tokens after position t leaves logits at positions <= t unchanged, for every t."""
    assert_causal_at_every_position(build(arch, overrides), VOCAB, BLOCK)


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_causality_in_training_mode_with_dropout(arch: str, overrides: dict) -> None:
    """With dropout active (training mode, as the gpu suite trains), changing tokens after
    position t still leaves the logits at positions <= t unchanged."""
    model = build(arch, {"dropout": 0.1, **overrides}).train()
    assert_causal_in_training_mode(model, VOCAB, BLOCK)


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_training_loss_is_causal_with_dropout(arch: str, overrides: dict) -> None:
    """The loss that training minimises, on its own code path (future_attention trains through
    `forward_with_future`, not `forward`), does not read tokens after the positions it scores."""
    model = build(arch, {"dropout": 0.1, **overrides}).train()
    assert_loss_causal_in_training_mode(model, arch, VOCAB, BLOCK)


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_prefix_consistency(arch: str, overrides: dict) -> None:
    """Logits of a full sequence equal those of each prefix run alone, and each row of a batch
    gets the logits it gets alone (no mixing between the sequences of a batch)."""
    model = build(arch, overrides)
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        for t in (1, 9, BLOCK - 1):
            torch.testing.assert_close(model(idx[:, :t]), full[:, :t], rtol=1e-10, atol=1e-10)
        for row in range(2):
            torch.testing.assert_close(model(idx[row : row + 1]), full[row : row + 1])


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_determinism(arch: str, overrides: dict) -> None:
    """Same seed: same init, same loss and loss parts, same gradients, including dropout in
    training mode."""
    assert_deterministic(lambda: build(arch, overrides, torch.float32), VOCAB, BLOCK)


class OpCounter(TorchDispatchMode):
    """Counts the aten operations run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=IDS)
def test_no_per_token_python_loops(arch: str, overrides: dict) -> None:
    """The forward pass and the training loss run as many tensor operations for 24 tokens as for
    12, give or take a few shape-dependent autograd steps: a Python loop over positions would add
    at least one operation per extra position."""
    model = build(arch, overrides, torch.float32).train()
    counts = []
    for length in (BLOCK // 2, BLOCK, BLOCK // 2, BLOCK):  # first round: fill lazy caches
        idx = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(6))
        with OpCounter() as forward:
            model(idx)
        with OpCounter() as training:
            model.loss(idx, torch.roll(idx, -1, 1))[0].backward()
        counts.append((forward.ops, training.ops))
    (short_forward, short_training), (long_forward, long_training) = counts[2:]
    message = f"(forward, loss + backward) ops at 12 and 24 tokens: {counts[2:]}"
    assert long_forward == short_forward, message
    assert abs(long_training - short_training) < BLOCK // 2, message


# Parameters set to a fixed, non-constant value by design (futureformer: each span's prior
# log-odds), which the seed must not change.
SEED_FREE_PARAMETERS = {("futureformer", "bag_bias")}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_seed_changes_init(arch: str) -> None:
    """Every randomly initialised parameter (one not filled with a single value such as a norm's
    ones) differs between seeds, so that seeds sample the variance of initialisation."""
    torch.manual_seed(0)
    a = build_model(arch, VOCAB, BLOCK, **SHAPE)
    torch.manual_seed(1)
    b = dict(build_model(arch, VOCAB, BLOCK, **SHAPE).named_parameters())
    random = {n: p for n, p in a.named_parameters() if p.unique().numel() > 1}
    assert random
    unchanged = {n for n, p in random.items() if torch.equal(p, b[n])}
    assert unchanged == {n for a_, n in SEED_FREE_PARAMETERS if a_ == arch}


def test_tied_embeddings_share_storage_and_count_once() -> None:
    tied = build_model("gpt", VOCAB, BLOCK, **SHAPE)
    untied = build_model("gpt", VOCAB, BLOCK, tie_embeddings=False, **SHAPE)
    assert tied.unembed.weight is tied.embed.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == VOCAB * SHAPE["d_model"]


def test_gqa_has_fewer_parameters_than_mha() -> None:
    mha = build_model("gpt", VOCAB, BLOCK, **SHAPE)
    mqa = build_model("gpt", VOCAB, BLOCK, n_kv_heads=1, **SHAPE)
    per_layer = 2 * (SHAPE["d_model"] - SHAPE["d_model"] // SHAPE["n_head"]) * SHAPE["d_model"]
    diff = sum(p.numel() for p in mha.parameters()) - sum(p.numel() for p in mqa.parameters())
    assert diff == SHAPE["n_layer"] * per_layer


def test_swiglu_and_gelu_have_about_equal_parameters() -> None:
    swiglu = build_model("gpt", VOCAB, BLOCK, **SHAPE)
    gelu = build_model("gpt", VOCAB, BLOCK, mlp="gelu", **SHAPE)
    n_swiglu = sum(p.numel() for p in swiglu.parameters())
    n_gelu = sum(p.numel() for p in gelu.parameters())
    assert abs(n_swiglu - n_gelu) / n_gelu < 0.02


def test_too_long_sequence_is_refused() -> None:
    model = build("gpt", {})
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_kv_head": 1}, r"unknown option 'n_kv_head'.*did you mean 'n_kv_heads'"),
        ({"n_layer": "two"}, r"'n_layer': 'two' is not a valid int"),
        ({"n_layer": 2.5}, r"'n_layer': expected int, got float"),
        ({"n_layer": True}, r"'n_layer': expected int, got bool"),
        ({"n_layer": 0}, r"'n_layer': 0 is out of range \(int \(>= 1\)\)"),
        ({"dropout": 1.5}, r"'dropout': 1.5 is out of range"),
        ({"mlp_ratio": 0}, r"'mlp_ratio': 0.0 is out of range"),
        ({"mlp": "relu"}, r"'mlp': 'relu' is not one of swiglu \| gelu"),
        ({"norm": "batchnorm"}, r"'norm': 'batchnorm' is not one of"),
        ({"tie_embeddings": "maybe"}, r"'tie_embeddings': 'maybe' is not a valid bool"),
        ({"n_head": 3}, r"d_model=128 is not divisible by n_head=3"),
        ({"n_head": 4, "n_kv_heads": 3}, r"n_head=4 is not divisible by n_kv_heads=3"),
        ({"d_model": 12, "n_head": 4}, r"head width .* must be even"),
    ],
)
def test_invalid_options_give_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model("gpt", VOCAB, BLOCK, **overrides)


def invalid_values(opt: Option) -> list[tuple[object, str]]:
    """(value, the error it must give) for values of `opt` that no model may accept: outside its
    choices, not of its type, below its minimum or above its maximum, or (a free-form text)
    malformed."""
    if opt.choices is not None:
        return [("bogus", "is not one of")]
    if opt.type == "bool":
        return [("maybe", "is not a valid bool")]
    if opt.type == "str":
        return [("x;y", "")]
    step = 1 if opt.type == "int" else 0.5
    cases = [("abc", f"is not a valid {opt.type}")]
    if opt.min is not None:
        cases.append((opt.min if opt.min_exclusive else opt.min - step, "is out of range"))
    if opt.max is not None:
        cases.append((opt.max + step, "is out of range"))
    return cases


INVALID_CASES = [
    (arch, name, value, message)
    for arch in sorted(ARCHITECTURES)
    for name, opt in list_options(arch).items()
    for value, message in invalid_values(opt)
]


@pytest.mark.parametrize(
    ("arch", "name", "value", "message"),
    INVALID_CASES,
    ids=[f"{arch}-{name}={value}" for arch, name, value, _ in INVALID_CASES],
)
def test_every_option_refuses_invalid_values(
    arch: str, name: str, value: object, message: str
) -> None:
    """Every option of every architecture refuses a bad value with a ConfigError that names the
    option (as 'name' or name=...) and, for typed options, says what is wrong."""
    with pytest.raises(ConfigError, match=rf"('{name}'|{name}=).*{message}"):
        build_model(arch, VOCAB, BLOCK, **{**SHAPE, name: value})


TRAIN_INVALID_CASES = [
    (name, value, message)
    for name, opt in options_of(TrainConfig).items()
    for value, message in invalid_values(opt)
]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    TRAIN_INVALID_CASES,
    ids=[f"{name}={value}" for name, value, _ in TRAIN_INVALID_CASES],
)
def test_every_training_option_refuses_invalid_values(
    name: str, value: object, message: str
) -> None:
    """The training options (a row may set them too: block_size, batch_size, init_freeze, ...)
    refuse bad values as the model options do."""
    with pytest.raises(ConfigError, match=rf"('{name}'|{name}=).*{message}"):
        make_train_config({name: value})


@pytest.mark.parametrize(
    "values", [{"block_size": "1"}, {"batch_size": "0"}, {"init_freeze": "maybe"}], ids=str
)
def test_training_options_of_the_table_are_range_checked(values: dict[str, str]) -> None:
    """The training options that rows of configs/experiments.tsv set, named one by one: the test
    above derives its cases from the options' declared limits, so it would lose a case with them."""
    with pytest.raises(ConfigError, match=rf"option '{next(iter(values))}'"):
        make_train_config(values)


FLOAT_OPTIONS = [
    (arch, name)
    for arch in sorted(ARCHITECTURES)
    for name, opt in list_options(arch).items()
    if opt.type == "float"
]


@pytest.mark.parametrize(("arch", "name"), FLOAT_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_non_finite_float_options_are_refused(arch: str, name: str, value: object) -> None:
    """NaN passes every `<`/`>` range check; it must still be refused before any model runs."""
    with pytest.raises(ConfigError, match=rf"option '{name}': .* is not a finite number"):
        build_model(arch, VOCAB, BLOCK, **{name: value})


def test_non_finite_train_options_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"option 'lr': 'nan' is not a finite number"):
        make_train_config({"lr": "nan"})


def test_unknown_architecture_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown architecture 'gptt' \(did you mean 'gpt'\?\)"):
        build_model("gptt", VOCAB, BLOCK)
    # a transposition: 'mtp' is as close to 'gtp' by difflib's measure, but has other letters
    with pytest.raises(ConfigError, match=r"unknown architecture 'gtp' \(did you mean 'gpt'\?\)"):
        build_model("gtp", VOCAB, BLOCK)


def test_string_values_from_a_table_are_parsed() -> None:
    model = build_model(
        "gpt",
        VOCAB,
        BLOCK,
        n_layer="1",
        mlp_ratio="2",
        tie_embeddings="false",
        d_model="16",
        n_head="2",
    )
    assert model.config.n_layer == 1 and model.config.mlp_ratio == 2.0
    assert model.config.tie_embeddings is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotates_alike_eagerly_and_under_compile(dtype: torch.dtype) -> None:
    """RoPE's complex multiply (eager) and its real arithmetic (traced by torch.compile) give
    the same values and gradients, at positions 0..T-1 and at given positions."""
    from archbench.models.blocks import RotaryEmbedding

    rope = RotaryEmbedding(8, BLOCK)
    traced = torch.compile(rope, backend="aot_eager", fullgraph=True)
    positions = torch.tensor([3, 0, 7, 7, 20])
    for rows in (None, positions):
        length = BLOCK if rows is None else len(positions)
        x = torch.randn(2, 3, length, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
        eager_x, traced_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager, compiled = rope(eager_x, rows), traced(traced_x, rows)
        weights = torch.randn_like(eager)
        (eager * weights).sum().backward()
        (compiled * weights).sum().backward()
        assert compiled.dtype == dtype
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(traced_x.grad, eager_x.grad)
    rotated = rope(torch.ones(1, 1, BLOCK, 8))
    assert not torch.allclose(rotated[0, 0, 1], rotated[0, 0, 0])  # it does rotate


def run_attention(
    attention: Callable[..., torch.Tensor], inputs: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor], set[str]]:
    """One forward and backward of `attention` on copies of `inputs`: the output, the inputs'
    gradients, and the attention aten ops that ran (the CPU flash kernel, bmm)."""
    from torch.profiler import ProfilerActivity, profile

    leaves = [x.clone().requires_grad_() for x in inputs]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = attention(*leaves)
        out.backward(torch.ones_like(out))
    ops = {e.key for e in prof.key_averages() if "flash_attention" in e.key or "bmm" in e.key}
    return out.detach(), [x.grad for x in leaves], ops


@pytest.mark.parametrize(("t", "kv_heads"), [(64, 4), (64, 2), (129, 4)])
def test_compiled_cpu_attention_uses_the_math_backend_on_short_windows(
    t: int, kv_heads: int
) -> None:
    """Compiled on the CPU, causal attention over at most CPU_MATH_ATTENTION_MAX_LEN positions
    runs as batched matrix products (the math backend); longer windows and eager runs keep the
    flash kernel. All give the same values and gradients."""
    from archbench.models.blocks import CPU_MATH_ATTENTION_MAX_LEN, causal_attention

    generator = torch.Generator().manual_seed(t)
    shapes = ((2, 4, t, 8), (2, kv_heads, t, 8), (2, kv_heads, t, 8))
    inputs = [torch.randn(*shape, generator=generator) for shape in shapes]

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return causal_attention(q, k, v, enable_gqa=kv_heads != 4)

    traced = torch.compile(attention, backend="aot_eager", fullgraph=True, dynamic=False)
    run_attention(traced, inputs)  # compiles
    eager_out, eager_grads, eager_ops = run_attention(attention, inputs)
    traced_out, traced_grads, traced_ops = run_attention(traced, inputs)
    math_backend = t <= CPU_MATH_ATTENTION_MAX_LEN
    assert any("flash_attention" in op for op in eager_ops)
    assert any("flash_attention" in op for op in traced_ops) is not math_backend
    assert ("aten::bmm" in traced_ops) is math_backend
    torch.testing.assert_close(traced_out, eager_out)
    for got, want in zip(traced_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("dtype", "loss_dtype"), [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)]
)
def test_next_token_loss_is_float32_at_least(dtype: torch.dtype, loss_dtype: torch.dtype) -> None:
    """bf16 logits are scored in float32; float64 ones (the float64 checks) keep their precision."""
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5))
    loss = next_token_loss(logits.to(dtype), targets)
    assert loss.dtype == loss_dtype
    if dtype == torch.float64:
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        assert loss.item() == pytest.approx(want.item(), rel=1e-15)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_next_token_part_scores_the_logits_against_the_targets(arch: str, mode: str) -> None:
    """The loss's next_token part is the mean cross-entropy of `forward`'s logits at position t
    against targets[t] (not against idx[t], the token already read). In training mode too
    (dropout 0), where a model may take another path to its logits (explicit attention
    matrices, all sub-models at once): there they must equal the eval-mode logits, whose
    causality the tests above check position by position."""
    model = build(arch, {})
    generator = torch.Generator().manual_seed(6)
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=generator)
    targets = torch.randint(0, VOCAB, (2, BLOCK), generator=generator)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
        _, parts = model.train(mode == "train").loss(idx, targets)
    torch.testing.assert_close(parts["next_token"], expected, rtol=1e-10, atol=1e-12)
