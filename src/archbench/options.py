"""Options as data: dataclass fields that carry their help text, type and allowed values.

Model and training configs are frozen dataclasses whose user-settable fields are declared with
`option(...)`. From that one declaration come the `--help` listings, the docs table, the parsing of
`key=value` strings from the experiments table and every "bad value" error message.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from archbench.errors import ConfigError

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclasses.dataclass(frozen=True)
class Option:
    """One user-settable option: name, type, default, help and allowed values.

    `unset_means`, for an option whose unset value (0, or "" for a text option) stands for a
    value derived from other options (n_kv_heads 0 = n_head), computes that value from a function
    that looks the other options up; the report places such a value where it belongs on an
    ablation axis.
    """

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    unset_means: Callable[[Callable[[str], Any]], Any] | None = None

    @property
    def unset(self) -> Any:
        """The value that `unset_means` resolves: "" for a text option, else 0."""
        return "" if self.type == "str" else 0

    def describe(self) -> str:
        """A one-line human description of the allowed values."""
        if self.choices is not None:
            return " | ".join(str(c) for c in self.choices)
        low = "" if self.min is None else f"{'>' if self.min_exclusive else '>='} {self.min}"
        high = "" if self.max is None else f"<= {self.max}"
        bounds = ", ".join(b for b in (low, high) if b)
        return f"{self.type}" + (f" ({bounds})" if bounds else "")

    def coerce(self, value: Any) -> Any:
        """Convert a string (from a table) or a Python value to this option's type and check it."""
        typed = _convert(self, value)
        if isinstance(typed, float) and not math.isfinite(typed):
            raise ConfigError(f"option '{self.name}': {value!r} is not a finite number")
        if self.choices is not None and typed not in self.choices:
            raise ConfigError(f"option '{self.name}': {value!r} is not one of {self.describe()}")
        too_low = self.min is not None and (
            typed <= self.min if self.min_exclusive else typed < self.min
        )
        too_high = self.max is not None and typed > self.max
        if too_low or too_high:
            raise ConfigError(
                f"option '{self.name}': {typed!r} is out of range ({self.describe()})"
            )
        return typed


def number_from_text(value: Any, kind: type[int] | type[float]) -> Any:
    """`value` parsed as `kind` when it is the text of one (`snakemake --config` passes a data
    set's nested values as strings); anything else unchanged, for the caller's own check."""
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            return value
    return value


def _convert(opt: Option, value: Any) -> Any:
    kind = _TYPES[opt.type]
    if isinstance(value, str):
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() in _TRUE | _FALSE:
                    return text.lower() in _TRUE
                raise ValueError
            return kind(text)
        except ValueError:
            raise ConfigError(
                f"option '{opt.name}': {value!r} is not a valid {opt.type} ({opt.describe()})"
            ) from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    raise ConfigError(
        f"option '{opt.name}': expected {opt.type}, got {type(value).__name__} {value!r}"
    )


def option(default: Any, help: str, **limits: Any) -> Any:
    """Declare a dataclass field as a user option (`choices=`, `min=`, `max=`, `min_exclusive=`,
    `unset_means=`: see Option)."""
    return dataclasses.field(default=default, metadata={"help": help, **limits})


def options_of(config_cls: type) -> dict[str, Option]:
    """The options declared with `option()` on a config dataclass, in declaration order."""
    found = {}
    for field in dataclasses.fields(config_cls):
        if "help" not in field.metadata:
            continue
        type_name = field.type if isinstance(field.type, str) else field.type.__name__
        meta = dict(field.metadata)
        choices = meta.pop("choices", None)
        found[field.name] = Option(
            name=field.name,
            type=type_name,
            default=field.default,
            help=meta.pop("help"),
            choices=tuple(choices) if choices is not None else None,
            **meta,
        )
    return found


def suggest(name: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean ...?)' hint for a misspelled name, or ''. A candidate with the same
    letters in another order (a transposition: 'gtp' for 'gpt') comes first."""
    candidates = list(candidates)
    anagrams = [c for c in candidates if c != name and sorted(c) == sorted(name)]
    close = anagrams or difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_key_error(key: str, owner: str, known: Iterable[str]) -> ConfigError:
    """The error for an option name that `owner` does not have."""
    known = sorted(known)
    return ConfigError(
        f"unknown option '{key}' for {owner}{suggest(key, known)}; known options: "
        + ", ".join(known)
    )


def coerce_all(config_cls: type, values: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Check names and values of `values` against `config_cls`'s options; return typed values."""
    known = options_of(config_cls)
    typed = {}
    for key, value in values.items():
        if key not in known:
            raise unknown_key_error(key, owner, known)
        typed[key] = known[key].coerce(value)
    return typed
