"""Every model configuration of the repository's experiments table, built exactly as its row
sets it (at the smoke suite's shape), passes the causality and determinism checks that
test_models runs on each option value alone: combinations of values are checked too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    assert_causal_at_every_position,
    assert_deterministic,
    assert_loss_causal_in_training_mode,
)

from archbench.errors import ConfigError
from archbench.experiments import load_experiments, load_suite, split_overrides
from archbench.models import ARCHITECTURES, build_model

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "workflow/schemas"
VOCAB = 37
SMOKE_BLOCK, DEFAULT_BLOCK = 32, 128  # the suites' block sizes


def table_models() -> dict[str, tuple[str, dict[str, str]]]:
    """{first row's name: (arch, model options)} for each distinct model of the table, the
    smoke suite's model section under the row's own model overrides."""
    config = yaml.safe_load((ROOT / "configs/config.yaml").read_text())
    rows = load_experiments(
        ROOT / config["experiments"], SCHEMAS / "experiments.schema.yaml", config["datasets"]
    )
    smoke = load_suite(ROOT / "configs/suites/smoke.yaml", SCHEMAS / "suite.schema.yaml")
    models: dict[str, tuple[str, dict[str, str]]] = {}
    for row in rows:
        own, _ = split_overrides(row.arch, row.overrides)
        model = {**smoke.model, **own}
        if (row.arch, model) not in models.values():
            models[row.name] = (row.arch, model)
    return models


MODELS = table_models()


def build(name: str, dtype: torch.dtype, **extra: object) -> tuple[torch.nn.Module, int]:
    """Row `name`'s model (seeded, eval mode; `extra` model options on top of the row's) and the
    block it was built for: the smoke suite's, or the default suite's for a row that needs a
    longer window (future_dim=96)."""
    arch, options = MODELS[name]
    options = {**options, **extra}
    torch.manual_seed(0)
    try:
        return build_model(arch, VOCAB, SMOKE_BLOCK, **options).to(dtype).eval(), SMOKE_BLOCK
    except ConfigError as error:
        if f"block_size - 1 = {SMOKE_BLOCK - 1}" not in str(error):
            raise  # only a row that needs a longer window is built at the default block
        torch.manual_seed(0)
        model = build_model(arch, VOCAB, DEFAULT_BLOCK, **options)
        return model.to(dtype).eval(), DEFAULT_BLOCK


def test_the_table_has_a_model_per_architecture() -> None:
    assert {arch for arch, _ in MODELS.values()} == set(ARCHITECTURES)
    assert len(MODELS) > 20


@pytest.mark.parametrize("name", list(MODELS))
def test_table_row_is_causal(name: str) -> None:
    model, block = build(name, torch.float64)
    assert_causal_at_every_position(model, VOCAB, block)


@pytest.mark.parametrize("name", list(MODELS))
def test_table_row_trains_causally_with_dropout(name: str) -> None:
    """The row's training loss, with dropout as the gpu suite trains, reads no future token."""
    model, block = build(name, torch.float64, dropout=0.2)
    assert_loss_causal_in_training_mode(model.train(), MODELS[name][0], VOCAB, block)


@pytest.mark.parametrize("name", list(MODELS))
def test_table_row_is_deterministic(name: str) -> None:
    _, block = build(name, torch.float32)
    assert_deterministic(lambda: build(name, torch.float32)[0], VOCAB, block)
