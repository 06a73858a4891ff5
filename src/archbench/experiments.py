"""The experiments table and suites: parsing, validation, and the run spec of each job.

A row of `configs/experiments.tsv` names an architecture, a data set and `key=value` overrides;
a suite (`configs/suites/<name>.yaml`) sets the scale. `run_spec` merges the two into the fully
validated options of one (experiment, seed) job. Every problem is reported before any job starts,
naming the file, the line and the column.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from snakemake.utils import validate
from snakemake_interface_common.exceptions import WorkflowError

from archbench.data import DatasetSpec, SyntheticSpec, check_seed
from archbench.errors import ConfigError
from archbench.init_from import InitSource, format_init_from, initializer_for, parse_init_from
from archbench.models import (
    ARCHITECTURES,
    BASELINE_ARCH,
    get_architecture,
    list_options,
    make_config,
)
from archbench.options import coerce_all, options_of, suggest, unknown_key_error
from archbench.train import TrainConfig, check_instances_fit, make_train_config

NO_BASELINE = "none"  # the baseline cell of a row compared with nothing
PLACEHOLDER_VOCAB = 256  # options are validated before the data (and its vocabulary) exist


@dataclass(frozen=True)
class Experiment:
    """One validated row of the experiments table."""

    name: str
    arch: str
    dataset: str
    overrides: dict[str, str]
    suites: tuple[str, ...]
    description: str
    line: int
    baseline: str | None = None
    init_from: tuple[InitSource, ...] = ()
    submodel_baselines: dict[str, str] = field(default_factory=dict)
    # the rows named in init_from, resolved (with their own sources), for run_spec
    init_rows: dict[str, Experiment] = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        """What the report needs to know about this row (JSON-serialisable)."""
        return {
            "name": self.name,
            "arch": self.arch,
            "dataset": self.dataset,
            "overrides": self.overrides,
            "baseline": self.baseline,
            "description": self.description,
            "init_from": format_init_from(self.init_from),
            "submodel_baselines": self.submodel_baselines,
        }

    def runs_in(self, suite: str) -> bool:
        """Whether this row belongs to `suite` (an empty `suites` cell means every suite)."""
        return not self.suites or suite in self.suites


@dataclass(frozen=True)
class Suite:
    """A validated suite: seeds, threads and the default model / train / eval options."""

    name: str
    seeds: tuple[int, ...]
    threads: int
    gpu: bool
    model: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]
    description: str
    lm_eval: dict[str, Any] = field(default_factory=dict)
    # training options for the rows of one data set, over `train` (rows override them)
    train_by_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)
    # {baseline row named in the table: the row that replaces it in this suite}, for baselines
    # parameter-matched only at another suite's shape
    baselines: dict[str, str] = field(default_factory=dict)

    def train_for(self, dataset: str) -> dict[str, Any]:
        """The suite's training options for a row on `dataset`."""
        return {**self.train, **self.train_by_dataset.get(dataset, {})}


def parse_overrides(text: str) -> dict[str, str]:
    """Split 'a=1 b=x' into {'a': '1', 'b': 'x'}; malformed or repeated keys raise ConfigError."""
    result: dict[str, str] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or not value:
            raise ConfigError(f"'{item}' is not of the form key=value")
        if re.search(r",[A-Za-z_][A-Za-z0-9_]*=", value):  # n_layer=3,mlp=gelu
            raise ConfigError(f"'{item}': options are separated by spaces (a=1 b=2), not commas")
        if key in result:
            raise ConfigError(f"option '{key}' is given twice")
        result[key] = value
    return result


def split_overrides(arch: str, overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Sort overrides into model options of `arch` and training options."""
    model_keys, train_keys = list_options(arch), options_of(TrainConfig)
    model, train = {}, {}
    for key, value in overrides.items():
        if key in model_keys:
            model[key] = value
        elif key in train_keys:
            train[key] = value
        else:
            owners = [other for other in sorted(ARCHITECTURES) if key in list_options(other)]
            error = unknown_key_error(
                key, f"architecture '{arch}' or training", [*model_keys, *train_keys]
            )
            if owners:
                error = ConfigError(f"{error} ('{key}' is an option of {', '.join(owners)})")
            raise error
    return model, train


def _schema_error(err: WorkflowError) -> tuple[str, str]:
    """(column, message) from a snakemake validation error."""
    text = str(err)
    match = re.search(r"ValidationError: (.*)", text)
    message = match.group(1) if match else text.strip().splitlines()[-1]
    path = re.search(r"On instance((?:\[[^\]]+\])+)", text)
    if path:  # the whole path, so that a nested key is named: eval.batch_size
        return ".".join(re.findall(r"\['?([^'\]]+)'?\]", path.group(1))), message
    column = re.search(r"'([^']+)' is a required property", text) or re.search(
        r"\('([^']+)' was unexpected", text
    )
    return (column.group(1) if column else "?"), message


def load_experiments(path: Path, schema: Path, datasets: Iterable[str]) -> list[Experiment]:
    """Read and validate the whole table: schema, unique names, data sets, architectures, options.

    Each option value is checked alone here; `run_spec` checks how they combine with a suite's
    (head widths, a token budget of at least one batch, sub-model names). Errors name the file,
    line, experiment and column.
    """
    datasets = sorted(datasets)
    if not Path(path).is_file():
        raise ConfigError(f"no experiments table {path} (config key 'experiments')")
    lines = _table_lines(Path(path))
    header = next((i for i, text in enumerate(lines) if text), None)
    if header is None:
        raise ConfigError(f"{path}: the table has no header line")
    # `"` is an ordinary character: as a CSV quote, one unbalanced `"` swallowed all later rows
    reader = csv.DictReader(lines[header:], delimiter="\t", quoting=csv.QUOTE_NONE)
    table_schema = yaml.safe_load(Path(schema).read_text(encoding="utf-8"))
    columns = list(table_schema["properties"])
    for column in reader.fieldnames or []:
        if column not in columns:
            raise ConfigError(
                f"{path}, line {header + 1}: unknown column '{column}'"
                f"{suggest(column, columns)}; the columns are {', '.join(columns)}, separated by "
                "tabs"
            )
    absent = [c for c in table_schema.get("required", []) if c not in (reader.fieldnames or [])]
    if absent:
        raise ConfigError(
            f"{path}, line {header + 1}: the header has no column {', '.join(map(repr, absent))} "
            f"(required: {', '.join(table_schema['required'])}; columns separated by tabs)"
        )
    experiments, seen = [], {}
    for raw in reader:
        line = header + reader.line_num
        row = {k: (v or "").strip() for k, v in raw.items() if k is not None}
        if None in raw:
            raise ConfigError(
                f"{path}, line {line} (experiment '{row.get('name', '?')}'): "
                f"{len(row) + len(raw[None])} cells, but the header has {len(row)} columns"
            )
        where = f"{path}, line {line} (experiment '{row.get('name', '?')}')"
        if sum(bool(v) for v in row.values()) == 1 and len(row.get("name", "").split()) > 1:
            raise ConfigError(f"{where}: one cell only; the table's columns are separated by tabs")
        row["suites"] = re.sub(r"\s*,\s*", ",", row.get("suites", ""))  # "smoke, default"
        for column in table_schema["required"]:
            if not row.get(column):
                known = {"arch": sorted(ARCHITECTURES), "dataset": datasets}.get(column)
                choices = f": one of {', '.join(known)}" if known else ""
                raise ConfigError(
                    f"{where}, column '{column}': empty, but every row needs one{choices}"
                )
        try:
            validate(row, str(schema))
        except WorkflowError as err:
            column, message = _schema_error(err)
            raise ConfigError(f"{where}, column '{column}': {message}") from None
        if row["name"] == NO_BASELINE:
            raise ConfigError(
                f"{where}, column 'name': '{NO_BASELINE}' is reserved (baseline={NO_BASELINE} "
                "means no comparison)"
            )
        folded = row["name"].casefold()  # run directories: one on a case-insensitive disk
        if folded in seen:
            first_line, first_name = seen[folded]
            same = "" if first_name == row["name"] else f" ('{first_name}', which differs in case)"
            raise ConfigError(f"{where}, column 'name': duplicate of line {first_line}{same}")
        seen[folded] = (line, row["name"])
        if row["dataset"] not in datasets:
            raise ConfigError(
                f"{where}, column 'dataset': unknown data set '{row['dataset']}'"
                f"{suggest(row['dataset'], datasets)}; configured: {', '.join(datasets)}"
            )
        try:
            overrides = parse_overrides(row["overrides"])
            model, train = split_overrides(row["arch"], overrides)
            # each value alone; how they combine depends on the suite (run_spec checks that)
            coerce_all(
                get_architecture(row["arch"]).config_cls, model, f"architecture '{row['arch']}'"
            )
            coerce_all(TrainConfig, train, "training")
        except ConfigError as err:
            column = "arch" if str(err).startswith("unknown architecture") else "overrides"
            raise ConfigError(f"{where}, column '{column}': {err}") from None
        try:
            init_from = parse_init_from(row["init_from"])
        except ConfigError as err:
            raise ConfigError(f"{where}, column 'init_from': {err}") from None
        try:
            submodel_baselines = parse_submodel_baselines(row["submodel_baselines"])
        except ConfigError as err:
            raise ConfigError(f"{where}, column 'submodel_baselines': {err}") from None
        experiments.append(
            Experiment(
                name=row["name"],
                arch=row["arch"],
                dataset=row["dataset"],
                overrides=overrides,
                suites=tuple(s for s in row["suites"].split(",") if s),
                description=row["description"],
                line=line,
                baseline=row["baseline"] or None,
                init_from=init_from,
                submodel_baselines=submodel_baselines,
            )
        )
    if not experiments:
        raise ConfigError(f"{path}: the table has no experiment rows")
    return _resolve_init_from(path, _resolve_baselines(path, experiments))


def _table_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 table (a spreadsheet's BOM dropped), with comment lines (`#` first)
    and lines of only whitespace made empty, so that line numbers still count them; ConfigError
    naming the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}, line {line}: byte 0x{data[err.start]:02x} is not UTF-8; save the table as "
            f"UTF-8 text (spreadsheets on Windows save 'Text (Tab delimited)' as cp1252)"
        ) from None
    return ["" if not text.strip() or text.lstrip().startswith("#") else text for text in lines]


def _resolve_baselines(path: Path, experiments: list[Experiment]) -> list[Experiment]:
    """Check each `baseline` cell; fill empty ones with the data set's first BASELINE_ARCH (`gpt`)
    row; `none` compares the row with nothing (it then does not count in the report's Holm
    family)."""
    by_name = {e.name: e for e in experiments}
    default: dict[str, str] = {}
    for e in experiments:
        if e.arch == BASELINE_ARCH:
            default.setdefault(e.dataset, e.name)
    resolved = []
    for e in experiments:
        where = f"{path}, line {e.line} (experiment '{e.name}'), column 'baseline'"
        if e.baseline is None:
            baseline = default.get(e.dataset)
            if baseline is None:
                raise ConfigError(
                    f"{where}: empty, which means the first {BASELINE_ARCH} row on data set "
                    f"'{e.dataset}', but there is none; name the row to compare with, or write "
                    f"'{NO_BASELINE}' for no comparison"
                )
            resolved.append(replace(e, baseline=None if baseline == e.name else baseline))
            continue
        if e.baseline == NO_BASELINE:
            resolved.append(replace(e, baseline=None))
            continue
        if e.baseline not in by_name:
            raise ConfigError(f"{where}: no row named '{e.baseline}'{suggest(e.baseline, by_name)}")
        if e.baseline == e.name:
            raise ConfigError(f"{where}: a row cannot be its own baseline")
        if by_name[e.baseline].dataset != e.dataset:
            raise ConfigError(
                f"{where}: baseline '{e.baseline}' uses data set "
                f"'{by_name[e.baseline].dataset}', not '{e.dataset}'"
            )
        resolved.append(e)
    return resolved


def parse_submodel_baselines(text: str) -> dict[str, str]:
    """Parse 'L1=solo64,L2.3=solo32': the row each nested sub-model entry is compared against,
    by level (`L<level>`) or by sub-model (`L<level>.<index>`, which wins over its level).
    `check_submodel_baselines` checks the names against a row's model."""
    result: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        key, sep, row = (part.strip() for part in item.partition("="))
        if (
            not sep
            or not re.fullmatch(r"L\d+(\.\d+)?", key)
            or not re.fullmatch(r"[A-Za-z0-9_-]+", row)
        ):
            raise ConfigError(f"'{item}' is not of the form L<level>[.<index>]=row")
        if key == "L0" or key.startswith("L0."):
            raise ConfigError(f"{key} is the whole model: name its baseline in column 'baseline'")
        if key in result:
            raise ConfigError(f"'{key}' is given twice")
        result[key] = row
    return result


def check_submodel_baselines(entries: dict[str, str], config: Any) -> None:
    """ConfigError unless every key of `entries` names a nested sub-model or level of `config`
    that a model of its size trained alone can be compared with: only architectures whose config
    lists `submodels()` (fractalformer) have them (the whole model, L0, is the row itself: see
    `baseline`), and not with residual=downstream (`check_standalone_submodels`)."""
    if not entries:
        return
    if not hasattr(config, "submodels"):
        raise ConfigError("this architecture has no nested sub-models")
    config.check_standalone_submodels()
    submodels = [(level, index) for level, index in config.submodels() if level > 0]
    valid = [f"L{level}" for level in dict.fromkeys(lv for lv, _ in submodels)]
    valid += [f"L{level}.{index}" for level, index in submodels]
    for key in entries:
        if key not in valid:
            raise ConfigError(
                f"no sub-model or level '{key}'{suggest(key, valid)}; this row has: "
                f"{', '.join(valid) or 'none (levels=1)'}"
            )


def _resolve_init_from(path: Path, experiments: list[Experiment]) -> list[Experiment]:
    """Check the rows named in `init_from` and `submodel_baselines` (they exist, use the same
    data set, are not the row itself; init_from has no cycle) and attach each row's sources."""
    by_name = {e.name: e for e in experiments}
    for e in experiments:
        for column, rows in (
            ("init_from", [s.row for s in e.init_from]),
            ("submodel_baselines", list(e.submodel_baselines.values())),
        ):
            where = f"{path}, line {e.line} (experiment '{e.name}'), column '{column}'"
            for name in rows:
                if name not in by_name:
                    raise ConfigError(f"{where}: no row named '{name}'{suggest(name, by_name)}")
                if name == e.name:
                    raise ConfigError(f"{where}: a row cannot name itself")
                if by_name[name].dataset != e.dataset:
                    raise ConfigError(
                        f"{where}: row '{name}' uses data set '{by_name[name].dataset}', not "
                        f"'{e.dataset}'"
                    )
    resolved: dict[str, Experiment] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> Experiment:
        if name in chain:
            e = by_name[chain[0]]
            raise ConfigError(
                f"{path}, line {e.line} (experiment '{e.name}'), column 'init_from': rows "
                f"initialise from each other in a cycle: {' -> '.join((*chain, name))}"
            )
        if name not in resolved:
            e = by_name[name]
            rows = {s.row: resolve(s.row, (*chain, name)) for s in e.init_from}
            resolved[name] = replace(e, init_rows=rows)
        return resolved[name]

    return [resolve(e.name, ()) for e in experiments]


SECTIONS = ("model", "train", "eval", "train_by_dataset", "baselines", "lm_eval")


def load_config(path: Path, schema: Path) -> dict[str, Any]:
    """Read the workflow's config file and check it against its schema, as the Snakefile does."""
    if not path.is_file():
        raise ConfigError(f"no config file {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    check_config(data, schema, str(path))
    return data


def check_config(config: dict[str, Any], schema: Path, source: str) -> None:
    """Check a config mapping (the workflow config, a suite file) against its schema
    (snakemake's `validate`), as one line that names the key (its path, when nested) and
    suggests the closest known key for a misspelled top-level one, or says what the key takes
    (snakemake's own message prints the whole schema)."""
    known = yaml.safe_load(Path(schema).read_text(encoding="utf-8"))["properties"]
    for key in config:  # before the schema: a misspelled key also leaves a required one missing
        if key not in known:
            raise ConfigError(
                f"{source}, key '{key}': Additional properties are not allowed ('{key}' was "
                f"unexpected){suggest(str(key), known)}; known keys: {', '.join(known)}"
            )
    try:
        validate(config, str(schema))
    except WorkflowError as err:
        column, message = _schema_error(err)
        described = "description" in known.get(column, {})
        hint = f" ({column}: {known[column]['description']})" if described else ""
        raise ConfigError(f"{source}, key '{column}': {message}{hint}") from None


def suite_names(directory: Path) -> list[str]:
    """The suites defined in `directory` (configs/suites): the names of its .yaml files, sorted."""
    return sorted(path.stem for path in directory.glob("*.yaml"))


def _suite_data(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a suite file, with `extends: <suite>` resolved: the named suite's
    settings first, this file's on top (the SECTIONS merged key by key, and each data set's
    options in `train_by_dataset` too)."""
    if not path.exists():
        names = suite_names(path.parent)
        raise ConfigError(
            f"no suite file {path}{suggest(path.stem, names)}; available suites: "
            + ", ".join(names)
        )
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a suite file must be a mapping")
    parent_name = data.pop("extends", None)
    if parent_name is None:
        return data
    parent = _suite_data(path.with_name(f"{parent_name}.yaml"), (*seen, path))
    parent.pop("description", None)
    merged = {**parent, **data}
    for section in SECTIONS:
        if section in parent and section in data:
            merged[section] = {**parent[section], **data[section]}
    if "train_by_dataset" in parent and "train_by_dataset" in data:
        merged["train_by_dataset"] = {
            dataset: {**parent["train_by_dataset"].get(dataset, {}), **options}
            for dataset, options in merged["train_by_dataset"].items()
        }
    return merged


def check_suite_model(model: dict[str, Any], block_size: int) -> None:
    """ConfigError unless every key of a suite's `model` section is an option of some
    architecture and the options that every architecture shares (the baseline's) fit together
    (each row's architecture checks the rest: `run_spec`)."""
    known = {name for spec in ARCHITECTURES.values() for name in options_of(spec.config_cls)}
    for key in model:
        if key not in known:
            raise unknown_key_error(str(key), "any architecture", known)
    baseline_cls = get_architecture(BASELINE_ARCH).config_cls
    shared = {key: value for key, value in model.items() if key in options_of(baseline_cls)}
    make_config(BASELINE_ARCH, PLACEHOLDER_VOCAB, block_size, **shared)


def load_suite(path: Path, schema: Path) -> Suite:
    """Read and validate a suite file (following `extends`)."""
    data = _suite_data(path)
    if isinstance(data.get("seeds"), int):  # `seeds: 0`, as `--config seeds=0` allows
        data["seeds"] = [data["seeds"]]
    check_config(data, schema, str(path))
    sections = {"train": data["train"]}
    for dataset, options in data.get("train_by_dataset", {}).items():
        sections[f"train_by_dataset.{dataset}"] = {**data["train"], **options}
    configs = {}
    for name, options in sections.items():
        try:
            configs[name] = make_train_config(options)
        except ConfigError as err:
            raise ConfigError(f"{path}, section '{name}': {err}") from None
    try:
        check_suite_model(data["model"], configs["train"].block_size)
    except ConfigError as err:
        raise ConfigError(f"{path}, section 'model': {err}") from None
    return Suite(
        name=path.stem,
        seeds=tuple(data["seeds"]),
        threads=data.get("threads", 1),
        gpu=data.get("gpu", False),
        model=dict(data["model"]),
        train=dict(data["train"]),
        eval=dict(data.get("eval", {})),
        description=data.get("description", ""),
        lm_eval=dict(data.get("lm_eval", {})),
        train_by_dataset={k: dict(v) for k, v in data.get("train_by_dataset", {}).items()},
        baselines=dict(data.get("baselines", {})),
    )


def run_seeds(seeds: list[int | str] | int | str | None, suite: Suite) -> list[int]:
    """The seeds to train: the config's `seeds` or, when null (the string "null" from `--config
    seeds=null`), the suite's. From the command line `seeds=0` gives one integer, `seeds=0,1`
    one string and `'seeds=[0,1]'` a list of strings of digits. A seed listed twice is a
    ConfigError."""
    if seeds in (None, "null"):
        seeds = suite.seeds
    elif isinstance(seeds, int):
        seeds = [seeds]
    elif isinstance(seeds, str):
        seeds = seeds.split(",")
    chosen = [check_seed(int(seed), "seeds") for seed in seeds]
    if len(set(chosen)) < len(chosen):
        raise ConfigError(f"seeds {chosen}: a seed is listed twice")
    return chosen


def suite_rows(experiments: list[Experiment], suite: Suite) -> list[Experiment]:
    """The rows of the table that run in `suite`, each with its baseline (and sub-model baselines)
    replaced where the suite's `baselines` names a replacement. ConfigError if no row runs in
    the suite, a key is not a row of the table, or a replacement is not a row that runs in the
    suite on the key's data set."""
    by_name = {e.name: e for e in experiments}
    rows = [e for e in experiments if e.runs_in(suite.name)]
    if not rows:
        raise ConfigError(
            f"no row of the table runs in suite '{suite.name}' (check the `suites` column)"
        )
    where = f"suite '{suite.name}', baselines"
    for named, replacement in suite.baselines.items():
        if named not in by_name:
            raise ConfigError(f"{where}: no row named '{named}'{suggest(named, by_name)}")
        if replacement not in by_name or not by_name[replacement].runs_in(suite.name):
            runs = [e.name for e in rows]
            raise ConfigError(
                f"{where}: '{named}: {replacement}' names no row that runs in this suite"
                f"{suggest(replacement, runs)}"
            )
        if by_name[replacement].dataset != by_name[named].dataset:
            raise ConfigError(
                f"{where}: '{named}' uses data set '{by_name[named].dataset}', its replacement "
                f"'{replacement}' uses '{by_name[replacement].dataset}'"
            )

    def replaced(e: Experiment, named: str | None) -> str | None:
        """The suite's replacement for `named`, unless that is the row itself (a replacement
        keeps the baseline it had, e.g. the data set's first gpt row)."""
        replacement = suite.baselines.get(named or "", named)
        return named if replacement == e.name else replacement

    return [
        replace(
            e,
            baseline=replaced(e, e.baseline),
            submodel_baselines={k: replaced(e, v) for k, v in e.submodel_baselines.items()},
        )
        for e in rows
    ]


def check_suite_names(path: Path, experiments: list[Experiment], suites_dir: Path) -> None:
    """Every name in the table's `suites` column is a suite of `suites_dir` (configs/suites): a
    misspelled name would silently leave the row out of the suite it meant."""
    known = suite_names(suites_dir)
    for e in experiments:
        for name in e.suites:
            if name not in known:
                raise ConfigError(
                    f"{path}, line {e.line} (experiment '{e.name}'), column 'suites': unknown "
                    f"suite '{name}'{suggest(name, known)}; suites: {', '.join(known)}"
                )


def check_suite_datasets(suite: Suite, datasets: dict[str, DatasetSpec | SyntheticSpec]) -> None:
    """A suite's `train_by_dataset` names only configured data sets (a typo would silently
    leave that data set at the suite's defaults)."""
    unknown = sorted(set(suite.train_by_dataset) - set(datasets))
    if unknown:
        raise ConfigError(
            f"suite '{suite.name}', train_by_dataset: unknown data set(s) {', '.join(unknown)}; "
            f"configured: {', '.join(sorted(datasets))}"
        )


def canonical_options(config: Any) -> dict[str, Any]:
    """{option: value} of a model config, with a value that equals what its option's unset value
    stands for written as the unset value (`n_kv_heads=4` at `n_head=4` as 0), so that the two
    spellings of one model are one run spec."""
    values = {}
    for name, opt in options_of(type(config)).items():
        value = getattr(config, name)
        if opt.unset_means is not None and value == opt.unset_means(
            lambda other: getattr(config, other)
        ):
            value = opt.unset
        values[name] = value
    return values


def row_in_suite(experiment: Experiment, suite: str) -> str:
    """How an error about a row combined with a suite names them: the row's table line and name,
    its column 'overrides' when it has overrides (the suite's sections were checked alone, so
    they are what combines badly), and the suite."""
    column = ", column 'overrides'" if experiment.overrides else ""
    line = f"table line {experiment.line}{column}"
    return f"experiment '{experiment.name}' ({line}) in suite '{suite}'"


def run_spec(experiment: Experiment, suite: Suite, seed: int) -> dict[str, Any]:
    """The fully resolved, validated options of one training job (JSON-serialisable)."""
    model_rows, train_rows = split_overrides(experiment.arch, experiment.overrides)
    where = row_in_suite(experiment, suite.name)
    suite_train = suite.train_for(experiment.dataset)
    try:
        train = make_train_config({**suite_train, **train_rows})
        model = {**suite.model, **model_rows}
        config = make_config(experiment.arch, PLACEHOLDER_VOCAB, train.block_size, **model)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    try:
        check_submodel_baselines(experiment.submodel_baselines, config)
    except ConfigError as err:
        raise ConfigError(f"{where}, column 'submodel_baselines': {err}") from None
    # every option, defaults included: a default set explicitly is the same job, and a changed
    # default in the code changes the spec (and re-runs the jobs it applies to)
    spec = {
        "experiment": experiment.name,
        "arch": experiment.arch,
        "dataset": experiment.dataset,
        "seed": seed,
        "model": canonical_options(config),
        "train": {k: getattr(train, k) for k in options_of(TrainConfig)},
    }
    if experiment.init_from or train.init_freeze:
        spec["init_from"] = _init_from_spec(experiment, suite, seed, config, train.init_freeze)
    return spec


def _init_from_spec(
    experiment: Experiment, suite: Suite, seed: int, config: Any, freeze: bool
) -> list[dict[str, Any]]:
    """The spec's `init_from` entries (target, experiment, seed and the source's own run spec,
    so that a change to a source re-runs this row), checked to fit the row's model."""
    where = (
        f"experiment '{experiment.name}' (table line {experiment.line}) in suite "
        f"'{suite.name}', column 'init_from'"
    )
    if not experiment.init_from:
        raise ConfigError(f"{where}: init_freeze=true needs rows to initialise from")
    entries, sources = [], []
    for item in experiment.init_from:
        row = experiment.init_rows.get(item.row)
        if row is None:
            raise ConfigError(f"{where}: row '{item.row}' was not resolved by load_experiments")
        if not row.runs_in(suite.name):
            raise ConfigError(
                f"{where}: source row '{item.row}' does not run in suite '{suite.name}' (its "
                f"suites: {', '.join(row.suites)})"
            )
        source = run_spec(row, suite, seed + item.seed_offset)
        entries.append(
            {"target": item.target, "experiment": row.name, "seed": source["seed"], "spec": source}
        )
        block_size = make_train_config(source["train"]).block_size
        source_config = make_config(row.arch, PLACEHOLDER_VOCAB, block_size, **source["model"])
        sources.append((item.target, row.arch, source_config))
    try:
        initializer_for(experiment.arch).check(experiment.arch, config, sources, freeze)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return entries


def check_run_fits_data(
    experiment: Experiment,
    spec: dict[str, Any],
    suite: str,
    datasets: dict[str, DatasetSpec | SyntheticSpec],
) -> None:
    """Before any job: a run on a synthetic data set needs a block_size that holds one instance,
    and a model whose auxiliary losses have targets in it (the training job checks both again
    on the prepared data); ConfigError naming the row."""
    dataset = datasets[spec["dataset"]]
    if not isinstance(dataset, SyntheticSpec):
        return
    block_size = make_train_config(spec["train"]).block_size
    model_config = make_config(spec["arch"], PLACEHOLDER_VOCAB, block_size, **spec["model"])
    try:
        check_instances_fit(
            dataset.name, dataset.task().instance_length(), block_size, model_config
        )
    except ConfigError as err:
        raise ConfigError(
            f"{row_in_suite(experiment, suite)}: {err}; change the row's block_size or options, "
            "or the task's size"
        ) from None
