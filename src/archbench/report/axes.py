"""Ablation axes, derived from the experiments table itself.

Rows that share an architecture and a data set and differ in exactly one option form an ablation
axis along that option: for example `future_attention` (no overrides), `future_attention_f32`
(`future_dim=32`) and `future_attention_f64` (`future_dim=64`) form the `future_dim` axis. A row
without the key counts as having the default value: the suite's value for the row's data set when
`defaults` gives one, else the option's registry default (model options of the architecture, then
training options). Values are compared after conversion to the option's type, so `future_dim=0` and
an absent key whose default is 0 are the same point; a 0 that stands for a value derived from other
options (`Option.unset_means`: `n_kv_heads=0` is n_head) is placed at that value and labelled
"0 = 4"; an empty text that stands for one (hourglass `widths=""`: d_model at every level) reads
"(empty) = 64,64".
Rows warm-started differently (`init_from`) are never on one axis. A new row with a new value
joins its axis with no code change.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from archbench.errors import ArchbenchError, ConfigError
from archbench.models import ARCHITECTURES, list_options
from archbench.options import Option, options_of
from archbench.train import TrainConfig

UNKNOWN_DEFAULT = "(default)"  # the value of an absent key whose default is not known


@dataclass(frozen=True)
class AxisPoint:
    """One row on an axis: its value of the axis key (typed), and whether that is the default;
    `stands_for`: the row's own setting where `value` is what it resolves to (a stand-in 0 or
    empty text), else None."""

    experiment: str
    value: Any
    is_default: bool
    stands_for: str | None = None

    @property
    def label(self) -> str:
        """The value as shown in tables and on the x axis ("32", "mse", "4 (default)", "0 = 4")."""
        shown = [self.value] if self.stands_for is None else [self.stands_for, self.value]
        text = " = ".join(str(part) or "(empty)" for part in shown)
        return f"{text} (default)" if self.is_default and text != UNKNOWN_DEFAULT else text


@dataclass(frozen=True)
class Axis:
    """Rows of one (arch, dataset) that agree on every option except `key`.

    `fixed` lists the other overrides the rows share (key=value, sorted); `points` are in
    increasing value order when every value is a number, else in table order.
    """

    arch: str
    dataset: str
    key: str
    fixed: tuple[str, ...]
    points: tuple[AxisPoint, ...]

    @property
    def numeric(self) -> bool:
        """Whether every value is an int or float (then the axis is drawn on a number line)."""
        return all(_is_number(p.value) for p in self.points)

    @property
    def title(self) -> str:
        """A heading such as "future_attention on shakespeare_char: future_dim"."""
        context = f" (with {' '.join(self.fixed)})" if self.fixed else ""
        return f"{self.arch} on {self.dataset}: {self.key}{context}"

    @property
    def slug(self) -> str:
        """A file-name-safe identifier, unique within a report."""
        parts = [self.arch, self.dataset, self.key, *self.fixed]
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(parts)).strip("-")


def _is_number(value: Any) -> bool:
    """True for int and float values (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _option(arch: str, key: str) -> Option | None:
    """The declared option `key` of `arch` (model first, then training), or None if unknown."""
    model = list_options(arch) if arch in ARCHITECTURES else {}
    return model.get(key) or options_of(TrainConfig).get(key)


def _value(arch: str, key: str, raw: Any, defaults: Mapping[str, Any]) -> tuple[Any, bool]:
    """(typed value, is_default) of `key` for a row whose override is `raw` (None if absent)."""
    option = _option(arch, key)
    is_default = raw is None
    if raw is None:
        if key in defaults:
            raw = defaults[key]
        elif option is not None:
            return option.default, True
        else:
            return UNKNOWN_DEFAULT, True
    if option is None:
        return str(raw), is_default
    try:
        return option.coerce(raw), is_default
    except ConfigError:
        return str(raw), is_default


def _row_value(
    arch: str, own: Mapping[str, tuple[Any, bool]], defaults: Mapping[str, Any], key: str
) -> Any:
    """A row's typed value of `key`: its override (in `own`), else the default."""
    return (own.get(key) or _value(arch, key, None, defaults))[0]


def _point(
    arch: str, key: str, name: str, typed: tuple[Any, bool], lookup: Callable[[str], Any]
) -> AxisPoint:
    """Row `name`'s point on the `key` axis from its (typed value, is_default), a stand-in value
    resolved through the option's `unset_means` and `lookup` (the row's value of another option)."""
    value, is_default = typed
    option = _option(arch, key)
    if option is None or option.unset_means is None or value != option.unset:
        return AxisPoint(name, value, is_default)
    try:
        return AxisPoint(name, option.unset_means(lookup), is_default, stands_for=str(value))
    except (TypeError, ValueError):  # another option's value is unknown or not a number
        return AxisPoint(name, value, is_default)


def ablation_axes(
    experiments: list[dict], defaults: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Axis]:
    """Every ablation axis of `experiments` (dicts with name, arch, dataset, overrides).

    `defaults` are, by data set, the option values its rows start from before their overrides
    ({dataset: {option: value}}: a suite's model and train sections with its train_by_dataset
    applied). Axes come in the table order of their first row, then key order.
    """
    by_dataset = dict(defaults or {})
    flat = sorted(key for key, values in by_dataset.items() if not isinstance(values, Mapping))
    if flat:
        raise ArchbenchError(
            f"defaults are by data set, {{dataset: {{option: value}}}}; {flat} hold no mapping"
        )
    groups: dict[tuple[str, str], list[dict]] = {}
    for experiment in experiments:
        if not {"name", "arch", "dataset"} <= experiment.keys():
            raise ArchbenchError(f"experiment entry lacks name/arch/dataset: {experiment}")
        groups.setdefault((experiment["arch"], experiment["dataset"]), []).append(experiment)
    axes = []
    for (arch, dataset), rows in groups.items():
        defaults = by_dataset.get(dataset, {})
        keys = list(dict.fromkeys(k for row in rows for k in (row.get("overrides") or {})))
        values = {
            row["name"]: {
                key: _value(arch, key, (row.get("overrides") or {}).get(key), defaults)
                for key in keys
            }
            for row in rows
        }
        for key in keys:
            buckets: dict[tuple, list[AxisPoint]] = {}
            for row in rows:
                own = values[row["name"]]
                rest = (
                    *((k, repr(own[k][0])) for k in keys if k != key),
                    ("init_from", repr(row.get("init_from") or "")),
                )
                lookup = functools.partial(_row_value, arch, own, defaults)
                point = _point(arch, key, row["name"], own[key], lookup)
                buckets.setdefault(rest, []).append(point)
            for rest, points in buckets.items():
                if len({repr(p.value) for p in points}) < 2:
                    continue
                shared = values[points[0].experiment]
                fixed = tuple(
                    f"{k}={shared[k][0]}"
                    for k in sorted(k for k, _ in rest if k in shared)
                    if shared[k][0] != _value(arch, k, None, defaults)[0]
                )
                axes.append(Axis(arch, dataset, key, fixed, _ordered(points)))
    return axes


def _ordered(points: list[AxisPoint]) -> tuple[AxisPoint, ...]:
    """Points by increasing value when all are numbers (stable), else as given."""
    if all(_is_number(p.value) for p in points):
        return tuple(sorted(points, key=lambda p: p.value))
    return tuple(points)
