"""Perplexity / bits-per-byte / top-k on the held-out split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archbench.errors import ArchbenchError, DataError
from archbench.evaluate.perplexity import bits_per_byte, evaluate_perplexity
from archbench.models import ARCHITECTURES, build_model


class Uniform(nn.Module):
    """Equal logits for every token: loss is exactly ln(vocab)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab)


class Copy(nn.Module):
    """Predicts that the next token repeats the current one."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.one_hot(idx, self.vocab).float() * 50.0


class Ranked(nn.Module):
    """Ranks the next token by its step up from the current one (mod vocab): the current token
    first, then current + 1, ... — so top-k holds exactly the k steps 0..k-1."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        steps = (torch.arange(self.vocab) - idx[..., None]) % self.vocab
        return -steps.float()


def test_bits_per_byte_hand_computed() -> None:
    # 4 tokens of a 2-way coin flip over 8 bytes: 4 * ln 2 nats = 4 bits over 8 bytes = 0.5
    assert bits_per_byte(4 * math.log(2), 8) == pytest.approx(0.5)
    assert bits_per_byte(math.log(256) * 10, 10) == pytest.approx(8.0)


def test_uniform_model_scores_log_vocab_and_counts_bytes() -> None:
    vocab = 10
    tokens = np.arange(102) % vocab  # the first token (1 byte) and the last (2) differ in bytes
    token_bytes = np.arange(vocab) % 3 + 1  # tokens of 1, 2 or 3 bytes
    result = evaluate_perplexity(Uniform(vocab), tokens, token_bytes, block_size=16, batch_size=3)
    assert result["val_tokens"] == 101  # every token but the first, once
    assert result["val_bytes"] == int(token_bytes[tokens[1:]].sum())  # bytes of targets only
    assert result["val_bytes"] != int(token_bytes[tokens[:-1]].sum())
    assert result["val_loss"] == pytest.approx(math.log(vocab))
    assert result["val_ppl"] == pytest.approx(vocab)
    expected_bpb = 101 * math.log(vocab) / (math.log(2) * result["val_bytes"])
    assert result["val_bpb"] == pytest.approx(expected_bpb)


def test_non_finite_logits_are_an_error() -> None:
    class Broken(Uniform):
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return torch.full((*idx.shape, self.vocab), math.nan)

    with pytest.raises(ArchbenchError, match="validation loss is nan"):
        evaluate_perplexity(Broken(4), np.arange(10) % 4, np.ones(4, dtype=np.int64), 4)


def test_fewer_than_two_tokens_is_a_data_error() -> None:
    with pytest.raises(DataError, match="1 validation tokens: scoring needs at least 2"):
        evaluate_perplexity(Uniform(4), np.arange(1), np.ones(4, dtype=np.int64), 4)


def test_top_k_accuracy() -> None:
    tokens = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3])
    result = evaluate_perplexity(Copy(5), tokens, np.ones(5, dtype=np.int64), block_size=4)
    # targets 1..8: repeats at positions 1,2,4,6,7,8 -> 6 of 8 right
    assert result["val_top1"] == pytest.approx(6 / 8)
    # steps (target - input) mod 10 = 0, 3, 6, 2, 6, 0, 5: rank 0 twice, ranks < 5 four times
    tokens = np.array([0, 0, 3, 9, 1, 7, 7, 2])
    result = evaluate_perplexity(Ranked(10), tokens, np.ones(10, dtype=np.int64), block_size=4)
    assert result["val_top1"] == pytest.approx(2 / 7)
    assert result["val_top5"] == pytest.approx(4 / 7)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_matches_a_direct_forward_pass(arch: str) -> None:
    """Every architecture over several windows (the last one short), tokens of 1 to 4 bytes; the
    model comes in training mode with dropout, which the evaluation must switch off."""
    torch.manual_seed(0)
    model = build_model(arch, 20, 8, n_layer=2, n_head=2, d_model=16, dropout=0.5)
    tokens = np.random.default_rng(0).integers(0, 20, size=30)
    token_bytes = np.arange(20) % 4 + 1
    result = evaluate_perplexity(model, tokens, token_bytes, block_size=8, batch_size=2)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, 29, 8):  # windows of 8, 8, 8 and 5 targets
            window = torch.from_numpy(tokens[start : start + 9]).long()[None]
            logits = model(window[:, :-1])
            total += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    n_bytes = int(token_bytes[tokens[1:]].sum())
    assert result["val_loss"] == pytest.approx(total / 29, rel=1e-6)
    assert result["val_tokens"] == 29 and result["val_bytes"] == n_bytes
    assert result["val_bpb"] == pytest.approx(total / (math.log(2) * n_bytes), rel=1e-6)


def test_max_tokens_limits_the_scored_prefix() -> None:
    result = evaluate_perplexity(
        Uniform(4),
        np.zeros(1000, dtype=np.int64),
        np.ones(4, dtype=np.int64),
        block_size=16,
        max_tokens=100,
    )
    assert result["val_tokens"] == 100
