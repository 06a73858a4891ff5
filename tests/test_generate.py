"""Tests for archbench.generate: greedy and sampled generation through `forward`, context
cropping, seeding, argument checks, and samples written from a finished run directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from archbench.checkpoint import save_weights
from archbench.data import decode, encode, load_meta, load_tokenizer
from archbench.errors import ArchbenchError, ConfigError
from archbench.generate import (
    generate,
    generate_from_run,
    generate_text,
    locate_run,
    next_token,
    workflow_data_dir,
    write_samples,
)
from archbench.io import read_json, write_json
from archbench.models import ARCHITECTURES, build_model
from archbench.runs import load_run

SHAPE = {"n_layer": 2, "n_head": 4, "d_model": 32}
VOCAB, BLOCK = 37, 24


def tiny_model(arch: str = "gpt", **options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(arch, VOCAB, BLOCK, **{**SHAPE, **options}).eval()


def manual_greedy(model: torch.nn.Module, prompt: torch.Tensor, length: int) -> torch.Tensor:
    """The reference: one full forward per token on the cropped context, argmax of the last."""
    idx = prompt
    for _ in range(length):
        logits = model(idx[:, -BLOCK:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_greedy_is_the_argmax_of_forward_with_the_context_cropped() -> None:
    model = tiny_model()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, length=40, temperature=0.0)
    assert out.shape == (2, 45) and torch.equal(out[:, :5], prompt)
    assert max(seen) == BLOCK and seen[:3] == [5, 6, 7]  # grows, then stays cropped
    assert torch.equal(out, manual_greedy(model, prompt, 40))


def test_top_k_one_is_greedy_and_sampling_is_seeded() -> None:
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3]])
    greedy = generate(model, prompt, 30, temperature=0.0)
    assert torch.equal(generate(model, prompt, 30, temperature=1.5, top_k=1), greedy)

    def sample(seed: int) -> torch.Tensor:
        return generate(model, prompt, 30, 1.0, None, torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_next_token_samples_only_from_the_top_k() -> None:
    logits = torch.arange(10.0).repeat(500, 1)  # token 9 most likely, then 8, 7
    picks = next_token(logits, 2.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert picks.shape == (500, 1)
    assert set(picks.flatten().tolist()) == {7, 8, 9}
    assert next_token(logits[:2], 0.0).flatten().tolist() == [9, 9]
    assert next_token(logits[:1], 1.0, top_k=50).shape == (1, 1)  # k above the vocabulary


def test_generation_leaves_the_training_mode_and_ignores_dropout() -> None:
    model = tiny_model(dropout=0.5).train()
    prompt = torch.tensor([[4, 5]])
    first = generate(model, prompt, 10, temperature=0.0)
    assert model.training
    assert torch.equal(first, generate(model, prompt, 10, temperature=0.0))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_generates_through_forward(arch: str) -> None:
    model = tiny_model(arch)
    prompt = torch.tensor([[0, 1, 2, 3]])
    out = generate(model, prompt, BLOCK + 6, temperature=0.0)
    assert out.shape == (1, 4 + BLOCK + 6)
    assert torch.equal(out, manual_greedy(model, prompt, BLOCK + 6))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"length": -1}, "length must be"),
        ({"length": 2.5}, "length must be"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite"),
        ({"top_k": 0}, "top_k must be"),
    ],
)
def test_bad_settings_name_the_argument(kwargs: dict, pattern: str) -> None:
    settings = {"length": 3, "temperature": 1.0, "top_k": None} | kwargs
    with pytest.raises(ConfigError, match=pattern):
        generate(tiny_model(), torch.tensor([[1]]), **settings)


def test_prompt_must_not_be_empty() -> None:
    with pytest.raises(ConfigError, match="prompt"):
        generate(tiny_model(), torch.zeros((1, 0), dtype=torch.long), 3)


@pytest.fixture
def run_dir(tiny_data: Path, tmp_path: Path) -> Path:
    """A finished run directory of a tiny gpt on the tiny data set (untrained weights)."""
    vocab = load_meta(tiny_data)["vocab_size"]
    torch.manual_seed(0)
    model = build_model("gpt", vocab, 16, **SHAPE)
    run = tmp_path / "results" / "smoke" / "gpt" / "seed0"
    save_weights(model, run / "model.safetensors")
    write_json(
        run / "model_config.json",
        {"arch": "gpt", "vocab_size": vocab, "block_size": 16, "options": SHAPE},
    )
    write_json(run / "train_config.json", {"experiment": "gpt", "dataset": "tiny", "seed": 0})
    shutil.copytree(tiny_data, tmp_path / "results" / "data" / "tiny")  # the workflow's layout
    return run


def test_write_samples_is_deterministic(run_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples.json"
    sample = write_samples(run_dir, tiny_data, out, prompt="First Citizen:\né", length=20, seed=3)
    assert read_json(out) == sample
    assert set(sample) == {"prompt", "length", "temperature", "top_k", "sample_seed", "greedy",
                           "sampled"}  # fmt: skip
    assert sample["prompt"] == "First Citizen:\né" and sample["sample_seed"] == 3
    assert isinstance(sample["greedy"], str) and isinstance(sample["sampled"], str)
    assert sample["greedy"] and sample["sampled"]
    again = write_samples(run_dir, tiny_data, tmp_path / "again.json", "First Citizen:\né", 20, 3)
    assert again == sample


def test_generate_text_checks_the_tokenizer(run_dir: Path, tiny_data: Path) -> None:
    tokenizer = load_tokenizer(tiny_data)
    small = tiny_model()  # 37 tokens: fewer than the tokenizer's
    with pytest.raises(ArchbenchError, match="does not belong"):
        generate_text(small, tokenizer, "\xff\xfe", 5)
    with pytest.raises(ConfigError, match="must not be empty"):
        generate_text(small, tokenizer, "", 5)


def test_locate_run_finds_the_data_set(run_dir: Path) -> None:
    results = run_dir.parents[2]
    assert locate_run(results, "smoke", "gpt", 0) == (run_dir, results / "data" / "tiny")
    assert workflow_data_dir(run_dir) == results / "data" / "tiny"
    shutil.rmtree(results / "data")
    with pytest.raises(ArchbenchError, match=r"no prepared data at .*/data/tiny .*: pass --data"):
        workflow_data_dir(run_dir)
    with pytest.raises(ArchbenchError, match=r"no finished run.*seed 1 of suite 'smoke' first$"):
        locate_run(results, "smoke", "gpt", 1)
    with pytest.raises(
        ArchbenchError, match=r"first \(trained in suite smoke: pass --suite smoke\)"
    ):
        locate_run(results, "default", "gpt", 0)
    with pytest.raises(ArchbenchError, match=r"'gtp' \(did you mean 'gpt'\?\).*there: gpt"):
        locate_run(results, "smoke", "gtp", 0)


@pytest.fixture
def fractal_run(tiny_data: Path, tmp_path: Path) -> Path:
    """A finished run directory of a tiny three-level fractalformer."""
    vocab = load_meta(tiny_data)["vocab_size"]
    options = {"n_layer": 1, "n_head": 2, "d_model": 32, "levels": 3}
    torch.manual_seed(0)
    model = build_model("fractalformer", vocab, 16, **options)
    run = tmp_path / "fractal"
    save_weights(model, run / "model.safetensors")
    write_json(
        run / "model_config.json",
        {"arch": "fractalformer", "vocab_size": vocab, "block_size": 16, "options": options},
    )
    return run


def test_fractal_submodels_generate_through_their_own_forward(
    fractal_run: Path, tiny_data: Path, tmp_path: Path
) -> None:
    sample = write_samples(fractal_run, tiny_data, tmp_path / "s.json", "First", 12, seed=1)
    assert sorted(sample["submodels"]) == ["L1.0", "L2.0"]
    model = load_run(fractal_run)
    tokenizer = load_tokenizer(tiny_data)
    prompt = torch.from_numpy(encode(tokenizer, "First")).unsqueeze(0)
    idx = prompt
    for _ in range(12):  # the reference: the sub-model's own forward, argmax of the last logits
        logits = model.forward_submodel(idx[:, -16:], 1, 0)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = decode(tokenizer, idx[0, prompt.shape[1] :].numpy())
    assert sample["submodels"]["L1.0"]["greedy"] == expected
    assert generate_from_run(fractal_run, tiny_data, "First", 12, 0.0, None, 0, "L1.0") == expected
    assert sample["greedy"] == generate_from_run(fractal_run, tiny_data, "First", 12, 0.0)
    with pytest.raises(ConfigError, match="L3.0"):
        generate_from_run(fractal_run, tiny_data, "First", 2, submodel="L3.0")


def test_models_without_submodels_reject_a_submodel(run_dir: Path, tiny_data: Path) -> None:
    with pytest.raises(ConfigError, match="no nested sub-models"):
        generate_from_run(run_dir, tiny_data, "First", 2, submodel="L1.0")
    sample = write_samples(run_dir, tiny_data, run_dir / "samples.json", "First", 4)
    assert "submodels" not in sample
