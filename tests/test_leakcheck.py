"""The automatic future-leak check catches leaks and passes honest models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from archbench.errors import DataError
from archbench.evaluate.leakcheck import leak_check
from archbench.models import build_model

VOCAB, BLOCK = 30, 16
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=400)


class PeeksAhead(nn.Module):
    """A causal model that also adds the embedding of token t+2 at position t — the original
    FutureFormer's bug in miniature."""

    def __init__(self):
        super().__init__()
        self.inner = build_model("gpt", VOCAB, BLOCK, n_layer=1, n_head=2, d_model=16)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        ahead = torch.roll(idx, -2, dims=1)
        return self.inner(idx) + 0.1 * self.inner.embed(ahead) @ self.inner.embed.weight.T


class PeeksAheadOnce(PeeksAhead):
    """Leaks token p + 1 into position p for one p only, away from the few cuts that every
    window is checked at."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.inner(idx).clone()
        if idx.shape[1] > self.at + 1:
            logits[:, self.at] += (
                0.1 * self.inner.embed(idx[:, self.at + 1]) @ self.inner.embed.weight.T
            )
        return logits


class LengthDependent(nn.Module):
    """Causal in the perturbation sense, but its logits depend on the sequence length, so it
    computes something else on a prefix than on the full window."""

    def __init__(self):
        super().__init__()
        self.inner = build_model("gpt", VOCAB, BLOCK, n_layer=1, n_head=2, d_model=16)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.inner(idx) * (1.0 + 0.01 * idx.shape[1])


def test_honest_baseline_passes() -> None:
    torch.manual_seed(0)
    model = build_model("gpt", VOCAB, BLOCK, n_layer=2, n_head=2, d_model=16)
    result = leak_check(model, TOKENS, BLOCK, VOCAB)
    assert result["leak_check_passed"] == 1.0
    assert result["leak_perturbation_max_diff"] == 0.0
    assert result["leak_prefix_max_diff"] < 1e-12


def test_peeking_model_fails_the_perturbation_test() -> None:
    torch.manual_seed(0)
    result = leak_check(PeeksAhead(), TOKENS, BLOCK, VOCAB)
    assert result["leak_check_passed"] == 0.0
    assert result["leak_perturbation_max_diff"] > 1e-3


@pytest.mark.parametrize("at", [3, BLOCK // 2 + 3, BLOCK - 3])
def test_a_leak_at_a_single_position_is_found_wherever_it_is(at: int) -> None:
    torch.manual_seed(0)
    result = leak_check(PeeksAheadOnce(at), TOKENS, BLOCK, VOCAB)
    assert result["leak_check_passed"] == 0.0 and result["leak_perturbation_max_diff"] > 1e-6


def test_length_dependent_model_fails_the_prefix_test() -> None:
    torch.manual_seed(0)
    result = leak_check(LengthDependent(), TOKENS, BLOCK, VOCAB)
    assert result["leak_perturbation_max_diff"] == 0.0
    assert result["leak_prefix_max_diff"] > 1e-3
    assert result["leak_check_passed"] == 0.0


class PeeksAheadWithNaN(PeeksAhead):
    """Leaks, and writes NaN into the logits at position 0."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = super().forward(idx).clone()
        logits[:, 0] = math.nan
        return logits


def test_logits_that_are_not_numbers_fail_the_check() -> None:
    """NaN compares false with everything: the largest deviation must not drop it."""
    torch.manual_seed(0)
    result = leak_check(PeeksAheadWithNaN(), TOKENS, BLOCK, VOCAB)
    assert result["leak_check_passed"] == 0.0
    assert result["leak_perturbation_max_diff"] == result["leak_prefix_max_diff"] == math.inf


def test_check_leaves_the_model_untouched() -> None:
    model = build_model("gpt", VOCAB, BLOCK, n_layer=1, n_head=2, d_model=16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    leak_check(model, TOKENS, BLOCK, VOCAB)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


def test_too_few_tokens_is_a_data_error() -> None:
    """With 1 token there is no later token to perturb: passing would claim a check never run."""
    model = build_model("gpt", 8, 8, n_layer=1, n_head=2, d_model=16)
    with pytest.raises(DataError, match="needs at least 2"):
        leak_check(model, np.arange(1), block_size=8, vocab_size=8)
    assert leak_check(model, np.arange(2), block_size=8, vocab_size=8)["leak_check_passed"] == 1
