"""Automatic future-leak check of a trained checkpoint.

Two tests, run on real validation windows in float64 so that any dependence shows up exactly:
- perturbation: replacing every token after position t must leave the logits at positions <= t
  unchanged (every window at a few t, the first window at every t);
- prefix consistency: the logits of a full window must equal those of several of its prefixes run
  alone (lengths 1, 2, L/4 + 1, L/2 + 1 and L - 1), which also catches a model that computes
  something else at inference than in training.
A checkpoint that fails is marked in the report and left out of comparisons.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from archbench.errors import DataError

TOLERANCE = 1e-9  # float64: an honest model differs by rounding noise (~1e-14) at most
PASS_LOGITS = 1 << 22  # logits per forward pass of perturbed windows (32 MiB in float64)


def deviation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| element by element: 0 where they are equal (equal infinities too), inf where
    either is NaN, so that logits that are not numbers can never pass."""
    return torch.where(a == b, 0.0, (a - b).abs()).nan_to_num(nan=math.inf)


@torch.no_grad()
def leak_check(
    model: nn.Module,
    tokens: np.ndarray,
    block_size: int,
    vocab_size: int,
    n_windows: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Run the perturbation and prefix-consistency tests; return their largest deviations.

    `leak_check_passed` is 1.0 when both stay within TOLERANCE, else 0.0.
    """
    if len(tokens) < 2:
        raise DataError(f"{len(tokens)} validation tokens: the leak check needs at least 2")
    model = copy.deepcopy(model)
    if next(model.parameters()).device.type == "mps":  # MPS has no float64: check on the CPU
        model = model.cpu()
    model = model.double().eval()
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    length = min(block_size, len(tokens))
    starts = np.linspace(0, len(tokens) - length, n_windows).astype(np.int64)
    windows = torch.from_numpy(
        np.asarray(tokens[starts[:, None] + np.arange(length)], dtype=np.int64)
    ).to(device)
    reference = model(windows)
    positions = sorted({0, 1, length // 4, length // 2, length - 2} - {-1})
    # (window, t): every window at a few cuts t, and the first window at every cut, so that a
    # leak from token t + 1 into position t shows up wherever t is.
    cases = [(w, t) for w in range(len(windows)) for t in positions if t < length - 1]
    cases += [(0, t) for t in range(length - 1) if t not in positions]
    perturb, per_pass = 0.0, max(1, PASS_LOGITS // (length * vocab_size))
    for first in range(0, len(cases), per_pass):
        chunk = torch.tensor(cases[first : first + per_pass], device=device)
        rows, cuts = chunk[:, 0], chunk[:, 1:]
        later = torch.arange(length, device=device) > cuts  # (n, length): the tokens after t
        shift = torch.from_numpy(rng.integers(1, vocab_size, size=later.shape)).to(device)
        changed = torch.where(later, (windows[rows] + shift) % vocab_size, windows[rows])
        diff = deviation(model(changed), reference[rows]).amax(-1)  # (n, length)
        perturb = max(perturb, diff.masked_fill(later, 0.0).max().item())
    prefix = 0.0
    for t in (p + 1 for p in positions):
        prefix = max(prefix, deviation(model(windows[:, :t]), reference[:, :t]).max().item())
    passed = perturb <= TOLERANCE and prefix <= TOLERANCE
    return {
        "leak_check_passed": float(passed),
        "leak_perturbation_max_diff": perturb,
        "leak_prefix_max_diff": prefix,
    }
