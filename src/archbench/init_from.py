"""Initialising a row from other rows' trained checkpoints: the `init_from` column.

A cell `target=row[+k], ...` says, for each part (`target`) of this row's model, which row of the
experiments table fills it with its trained weights. `+k` takes that row's run of seed s + k for
this row's seed s (default: the same seed); every row sees the same batches at one seed, so two
copies of one row at one seed would be identical, while `+100` gives an independent twin.

What a target may be is a property of the architecture (`INITIALIZERS`, default `WholeModel`):
- every architecture: `model`, a warm start from a row of the same architecture and shapes;
- fractalformer: sub-models `L<level>.<index>`, each filled from a plain decoder of exactly its
  shape (`merge_init`, the seed's ModelMerging); with the training option `init_freeze=true`
  they stay frozen while the rest of the model trains (`FrozenBlocks`).

The workflow gives a row's training job its sources' weights as inputs (so Snakemake trains them
first) and puts the sources' run specs into the row's spec (so editing a source re-runs the rows
built from it); `archbench.experiments` validates everything before any job starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from archbench.errors import ConfigError
from archbench.io import read_json
from archbench.models import build_model
from archbench.models.fractalformer import (
    FrozenBlocks,
    check_merge_source,
    merge_init,
    parse_merge_targets,
    parse_submodel,
)

WHOLE_MODEL = "model"
_ITEM = re.compile(r"([A-Za-z0-9_.]+)=([A-Za-z0-9_-]+)(?:\+(\d+))?")

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class InitSource:
    """One item of an `init_from` cell: `target` takes the weights of `row` at seed s + offset."""

    target: str
    row: str
    seed_offset: int = 0

    def __str__(self) -> str:
        return f"{self.target}={self.row}" + (f"+{self.seed_offset}" if self.seed_offset else "")


def parse_init_from(text: str) -> tuple[InitSource, ...]:
    """Parse 'target=row[+k], ...' (empty: no sources); malformed or repeated targets raise."""
    sources: list[InitSource] = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        match = _ITEM.fullmatch(item)
        if not match:
            raise ConfigError(
                f"'{item}' is not of the form target=row[+k] (e.g. model=gpt or L1.0=solo64+100)"
            )
        if any(s.target == match[1] for s in sources):
            raise ConfigError(f"target '{match[1]}' is initialised twice")
        sources.append(InitSource(match[1], match[2], int(match[3] or 0)))
    return tuple(sources)


def format_init_from(sources: Sequence[InitSource]) -> str:
    """The cell text of `sources` (inverse of `parse_init_from`)."""
    return ",".join(str(s) for s in sources)


class Initializer(Protocol):
    """How one architecture's model is filled from other rows' checkpoints."""

    def check(
        self, arch: str, config: Any, sources: Sequence[tuple[str, str, Any]], freeze: bool
    ) -> None:
        """Raise ConfigError unless every (target, source arch, source config) fits `config`."""

    def apply(self, model: nn.Module, states: Mapping[str, State], freeze: bool) -> Any:
        """Copy each target's state dict into `model`; return what to attach to the optimizer
        (an object with `attach(optimizer)`) when `freeze`, else None."""


def _shapes(arch: str, config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of `arch` built from `config`, without allocating memory."""
    options = {k: v for k, v in vars(config).items() if k not in ("vocab_size", "block_size")}
    with torch.device("meta"):
        model = build_model(arch, config.vocab_size, config.block_size, **options)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _shape_difference(
    name: str, source: tuple[int, ...] | None, target: tuple[int, ...] | None
) -> str:
    """How tensor `name` differs between a source and the row it initialises, for an error."""
    if source is None:
        return f"this row has '{name}' {target}, the source has no such tensor"
    if target is None:
        return f"the source has '{name}' {source}, this row has no such tensor"
    return f"'{name}' is {source}, needs {target}"


class WholeModel:
    """Target `model`: a warm start from a row of the same architecture and shapes."""

    def check(
        self, arch: str, config: Any, sources: Sequence[tuple[str, str, Any]], freeze: bool
    ) -> None:
        """One source, target `model`, same architecture and identical tensor shapes."""
        targets = [target for target, _, _ in sources]
        if targets != [WHOLE_MODEL]:
            raise ConfigError(
                f"architecture '{arch}' can only be initialised as a whole: target "
                f"'{WHOLE_MODEL}' alone, not {', '.join(targets)}"
            )
        _, source_arch, source_config = sources[0]
        if source_arch != arch:
            raise ConfigError(f"source architecture '{source_arch}' is not '{arch}'")
        if freeze:
            raise ConfigError(f"init_freeze=true would freeze the whole model ('{WHOLE_MODEL}')")
        mine, theirs = _shapes(arch, config), _shapes(source_arch, source_config)
        differ = sorted(n for n in mine.keys() | theirs.keys() if mine.get(n) != theirs.get(n))
        if differ:
            name = differ[0]
            raise ConfigError(
                f"source shapes differ ({len(differ)} tensors), e.g. "
                f"{_shape_difference(name, theirs.get(name), mine.get(name))}"
            )

    def apply(self, model: nn.Module, states: Mapping[str, State], freeze: bool) -> None:
        """Load the whole state dict."""
        model.load_state_dict(states[WHOLE_MODEL], strict=True)


class SubModels:
    """fractalformer: targets are sub-models L<level>.<index> (merge_init); `model` as above."""

    def check(
        self, arch: str, config: Any, sources: Sequence[tuple[str, str, Any]], freeze: bool
    ) -> None:
        """Non-overlapping sub-models, each from a plain decoder of exactly its shape."""
        if any(target == WHOLE_MODEL for target, _, _ in sources):
            WholeModel().check(arch, config, sources, freeze)
            return
        targets = parse_merge_targets([target for target, _, _ in sources], config)
        for (level, _), (target, source_arch, source_config) in zip(targets, sources, strict=True):
            try:
                check_merge_source(config, level, source_arch, source_config)
            except ConfigError as err:
                raise ConfigError(f"target {target}: {err}") from None

    def apply(self, model: nn.Module, states: Mapping[str, State], freeze: bool) -> Any:
        """merge_init into the named sub-models (frozen when `freeze`)."""
        if WHOLE_MODEL in states:
            return WholeModel().apply(model, states, freeze)
        submodels = {parse_submodel(name, model.config): state for name, state in states.items()}
        return merge_init(model, submodels, freeze=freeze)


INITIALIZERS: dict[str, Initializer] = {"fractalformer": SubModels()}


def initializer_for(arch: str) -> Initializer:
    """The initializer of `arch` (WholeModel unless the architecture registers its own)."""
    return INITIALIZERS.get(arch, WholeModel())


def load_sources(
    entries: Sequence[Mapping[str, Any]], run_dirs: Mapping[str, Path]
) -> dict[str, State]:
    """The trained weights of each `init_from` entry of a run spec (target, experiment, seed),
    read from `run_dirs[target]`, checked to be that experiment's run of that seed."""
    wanted = {entry["target"] for entry in entries}
    if wanted != set(run_dirs):
        raise ConfigError(
            f"init_from: the spec initialises {sorted(wanted)}, but run directories were given "
            f"for {sorted(run_dirs)}"
        )
    from archbench.runs import load_run

    states = {}
    for entry in entries:
        run_dir = Path(run_dirs[entry["target"]])
        made = read_json(run_dir / "train_config.json")
        if (made["experiment"], made["seed"]) != (entry["experiment"], entry["seed"]):
            raise ConfigError(
                f"init_from target {entry['target']}: {run_dir} holds experiment "
                f"'{made['experiment']}' seed {made['seed']}, not '{entry['experiment']}' "
                f"seed {entry['seed']}"
            )
        states[entry["target"]] = load_run(run_dir).state_dict()
    return states


def initialise(
    model: nn.Module,
    arch: str,
    entries: Sequence[Mapping[str, Any]],
    run_dirs: Mapping[str, Path],
    freeze: bool,
) -> FrozenBlocks | None:
    """Fill `model` from the runs of a spec's `init_from` entries; return the FrozenBlocks to
    attach to the optimizer when `freeze` (None otherwise, or when there is nothing to load)."""
    if not entries and not run_dirs:
        return None
    return initializer_for(arch).apply(model, load_sources(entries, run_dirs), freeze)
