"""The experiments table, suites and run specs: every bad input stops with a precise error."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from archbench.errors import ConfigError
from archbench.experiments import (
    NO_BASELINE,
    Suite,
    check_suite_datasets,
    check_suite_names,
    load_experiments,
    load_suite,
    parse_overrides,
    run_seeds,
    run_spec,
    split_overrides,
    suite_rows,
)
from archbench.models.gpt import GPTConfig
from archbench.options import options_of
from archbench.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ROW_SCHEMA = ROOT / "workflow/schemas/experiments.schema.yaml"
SUITE_SCHEMA = ROOT / "workflow/schemas/suite.schema.yaml"
HEADER = "name\tarch\tdataset\toverrides\tsuites\tdescription\n"
GOOD = "gpt\tgpt\tchars\t\t\tbaseline\n"


def table(tmp_path: Path, *rows: str, header: str = HEADER) -> Path:
    """Write an experiments table with `rows` below `header`."""
    path = tmp_path / "experiments.tsv"
    path.write_text(header + "".join(rows), encoding="utf-8")
    return path


def load(path: Path):
    return load_experiments(path, ROW_SCHEMA, ["chars", "bpe512"])


def test_the_repository_table_and_suites_are_valid() -> None:
    experiments = repository_rows()
    assert experiments[0].name == "gpt"
    for path in sorted((ROOT / "configs/suites").glob("*.yaml")):
        suite = load_suite(path, SUITE_SCHEMA)
        for experiment in (e for e in experiments if e.runs_in(suite.name)):
            spec = run_spec(experiment, suite, suite.seeds[0])
            assert spec["train"]["token_budget"] >= spec["train"]["batch_size"]


def test_matched_baselines_are_compared_with_nothing() -> None:
    """A row that exists only to be another row's size-matched baseline answers no question of
    its own: comparing it with `gpt` would only widen the report's Holm family."""
    import csv

    with open(ROOT / "configs/experiments.tsv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    matched = [
        row
        for row in rows
        if "-matched to" in row["description"] or row["description"].endswith("trained alone")
    ]
    assert len(matched) >= 20
    assert [row["name"] for row in matched if row["baseline"] != NO_BASELINE] == []


# Tiny Shakespeare's character vocabulary with byte fallback; the parameter ratios of two rows
# on the same text barely depend on it.
TEXT_VOCAB = 321
# The hourglass channel-count sweep changes the MLP parameters by design (0.9x to 1.8x); it is
# compared with the headline hourglass row's baseline, and the report flags its size.
CHANNEL_SWEEP = {f"hourglass_{sweep}" for sweep in ("s1", "s4", "s4_sh1", "s11", "s11_sh1")}


_PARAMETER_COUNTS: dict[tuple[str, str], list[int]] = {}


def row_parameters(experiment, suite) -> list[int]:
    """Parameters of a row's whole model in `suite`, then of one sub-model per nesting level."""
    import torch

    from archbench.data import SyntheticSpec
    from archbench.models import build_model

    key = (experiment.name, suite.name)
    if key not in _PARAMETER_COUNTS:
        spec = run_spec(experiment, suite, suite.seeds[0])
        data = repository_datasets()[experiment.dataset]
        vocab = len(data.task().symbols()) if isinstance(data, SyntheticSpec) else TEXT_VOCAB
        with torch.device("meta"):  # counts only: no memory, no initialisation
            model = build_model(spec["arch"], vocab, spec["train"]["block_size"], **spec["model"])
        levels = getattr(model.config, "levels", 1)
        _PARAMETER_COUNTS[key] = [
            sum(p.numel() for p in model.parameters()),
            *(model.submodel_parameter_count(level) for level in range(1, levels)),
        ]
    return _PARAMETER_COUNTS[key]


@functools.cache
def repository_config() -> dict:
    """configs/config.yaml as loaded (once; read it, don't change it)."""
    import yaml

    return yaml.safe_load((ROOT / "configs/config.yaml").read_text())


@functools.cache
def repository_rows() -> tuple:
    """The repository's experiments table, validated, as load_experiments returns it."""
    config = repository_config()
    return tuple(load_experiments(ROOT / config["experiments"], ROW_SCHEMA, config["datasets"]))


@functools.cache
def repository_datasets() -> dict:
    """The repository's data sets, parsed."""
    from archbench.data import parse_datasets

    return parse_datasets(repository_config()["datasets"])


def test_rows_that_name_a_baseline_match_its_parameter_count() -> None:
    """The report compares a row with the baseline it names, and each nested sub-model with the
    row named for it: in every suite that runs both (after the suite's own `baselines`
    replacements), their parameter counts differ by less than the report's size tolerance."""
    import csv

    from archbench.report.tables import SIZE_TOLERANCE

    table_rows = repository_rows()
    with open(ROOT / repository_config()["experiments"], encoding="utf-8", newline="") as handle:
        cells = {row["name"]: row["baseline"] for row in csv.DictReader(handle, delimiter="\t")}
    named = {name for name, cell in cells.items() if cell not in ("", NO_BASELINE)}
    assert {"mtp2_path_star", "futureformer_path_star", "hourglass_mqar"} <= named

    checked = 0
    for path in sorted((ROOT / "configs/suites").glob("*.yaml")):
        suite = load_suite(path, SUITE_SCHEMA)
        rows = {e.name: e for e in suite_rows(table_rows, suite)}
        pairs = [(e, 0, e.baseline) for e in rows.values() if e.name in named]
        pairs += [
            (e, int(key[1:].split(".")[0]), baseline)
            for e in rows.values()
            for key, baseline in e.submodel_baselines.items()
        ]
        for row, level, baseline in pairs:
            if baseline not in rows:  # the report says so; only the CI-sized suite leaves them out
                assert suite.name == "smoke", (suite.name, row.name, baseline)
                continue
            ratio = row_parameters(row, suite)[level] / row_parameters(rows[baseline], suite)[0]
            if row.name not in CHANNEL_SWEEP:
                assert abs(ratio - 1) <= SIZE_TOLERANCE, (suite.name, row.name, level, ratio)
            checked += 1
    assert checked >= 88


def test_the_parameter_gaps_that_descriptions_give_are_the_measured_ones() -> None:
    """A description that gives a row's parameter gap to another row ("parameter-matched to X
    (+0.5%)", "(+3.7% parameters against X)") states it to the tenth of a percent, at the gpu
    suite's shape where it says so and at the CPU suites' shape otherwise."""
    import re

    table_rows = repository_rows()
    by_name = {row.name: row for row in table_rows}
    suites = {
        name: load_suite(ROOT / f"configs/suites/{name}.yaml", SUITE_SCHEMA)
        for name in ("ablations", "gpu")
    }
    stated = 0
    for row in table_rows:
        match = re.search(
            r"parameter-matched to (?P<other>\w+)[^(]*\((?P<gap>[+-]\d+\.\d)%", row.description
        )
        match = match or re.search(
            r"\((?P<gap>[+-]\d+\.\d)% parameters against (?P<other>\w+)", row.description
        )
        # "(... : -0.5% at the default shape)": the gap to the row's own baseline
        match = match or re.search(r"(?P<gap>[+-]\d+\.\d)% at the default shape", row.description)
        if match is None:
            continue
        other = by_name[match.groupdict().get("other") or row.baseline]
        suite = suites["gpu" if "gpu suite's shape" in row.description else "ablations"]
        ratio = row_parameters(row, suite)[0] / row_parameters(other, suite)[0]
        assert f"{100 * (ratio - 1):+.1f}" == match["gap"], (row.name, suite.name, ratio)
        stated += 1
    assert stated >= 16


def test_the_flop_gaps_that_descriptions_give_are_the_measured_ones() -> None:
    """ "FLOP-matched to X (+2.9% training FLOPs)": the step's FLOPs (as training counts them)
    times the steps, at the suite's shape, to the tenth of a percent."""
    import re

    import torch

    from archbench.models import build_model
    from archbench.train import make_train_config, measure_step_flops

    table_rows = repository_rows()
    by_name = {row.name: row for row in table_rows}
    suite = load_suite(ROOT / "configs/suites/ablations.yaml", SUITE_SCHEMA)

    def training_flops(row) -> int:
        spec = run_spec(row, suite, suite.seeds[0])
        train = make_train_config(spec["train"])
        model = build_model(spec["arch"], TEXT_VOCAB, train.block_size, **spec["model"])
        x = torch.randint(0, TEXT_VOCAB, (train.batch_size, train.block_size))
        step = measure_step_flops(lambda a, b: model.loss(a, b)[0], model, x, x.roll(-1, 1))
        return step * train.steps

    pattern = r"FLOP-matched to (?P<other>\w+) \((?P<gap>[+-]\d+\.\d)% training FLOPs\)"
    stated = [(row, re.search(pattern, row.description)) for row in table_rows]
    stated = [(row, match) for row, match in stated if match]
    assert [row.name for row, _ in stated] == ["gpt_l7"]
    for row, match in stated:
        ratio = training_flops(row) / training_flops(by_name[match["other"]])
        assert f"{100 * (ratio - 1):+.1f}" == match["gap"], (row.name, ratio)


def test_good_row_parses(tmp_path: Path) -> None:
    rows = load(table(tmp_path, GOOD, "mqa\tgpt\tbpe512\tn_kv_heads=1 lr=3e-3\tsmoke,default\t\n"))
    assert [e.name for e in rows] == ["gpt", "mqa"]
    assert rows[1].overrides == {"n_kv_heads": "1", "lr": "3e-3"}
    assert rows[1].runs_in("smoke") and not rows[1].runs_in("gpu") and rows[0].runs_in("gpu")


def test_a_table_saved_with_a_byte_order_mark_reads_alike(tmp_path: Path) -> None:
    """Spreadsheets save UTF-8 with a BOM; the first column must still be 'name'."""
    rows = load(table(tmp_path, "gpt\tgpt\tchars\n", header="\ufeffname\tarch\tdataset\n"))
    assert rows[0].name == "gpt"


def test_optional_columns_may_be_absent(tmp_path: Path) -> None:
    rows = load(table(tmp_path, "gpt\tgpt\tchars\n", header="name\tarch\tdataset\n"))
    assert rows[0].overrides == {} and rows[0].suites == ()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("bad name\tgpt\tchars\t\t\t\n", r"line 3 \(experiment 'bad name'\), column 'name': .*"),
        (
            "x\tgptt\tchars\t\t\t\n",
            r"line 3 .*column 'arch': unknown architecture 'gptt' "
            r"\(did you mean 'gpt'\?\)",
        ),
        (
            "x\tgpt\tchar\t\t\t\n",
            r"line 3 .*column 'dataset': unknown data set 'char' "
            r"\(did you mean 'chars'\?\)",
        ),
        (
            "x\tgpt\tchars\tn_kv_head=1\t\t\n",
            r"line 3 .*column 'overrides': unknown option "
            r"'n_kv_head'.*did you mean 'n_kv_heads'",
        ),
        (
            "x\tgpt\tchars\tn_layer=two\t\t\n",
            r"column 'overrides': option 'n_layer': 'two' is "
            r"not a valid int",
        ),
        ("x\tgpt\tchars\tdropout=2\t\t\n", r"column 'overrides': option 'dropout': 2.0 is out"),
        ("x\tgpt\tchars\tlr\t\t\n", r"column 'overrides': 'lr' is not of the form key=value"),
        ("x\tgpt\tchars\tlr=1 lr=2\t\t\n", r"column 'overrides': option 'lr' is given twice"),
        ("x\tgpt\tchars\t\tsmoke;gpu\t\n", r"line 3 .*column 'suites'"),
        (
            "gpt\tgpt\tchars\t\t\t\n",
            r"line 3 \(experiment 'gpt'\), column 'name': duplicate "
            r"of line 2$",
        ),
        (
            "GPT\tgpt\tchars\t\t\t\n",
            r"line 3 \(experiment 'GPT'\), column 'name': duplicate of line 2 \('gpt', which "
            r"differs in case\)",
        ),
        (
            "x\tgpt\t\t\t\t\n",
            r"line 3 .*column 'dataset': empty, but every row needs one: one of bpe512, chars",
        ),
        (
            "x\tgpt\tchars\t\t\t\textra\n",
            r"line 3 \(experiment 'x'\): 7 cells, but the header has 6 columns",
        ),
    ],
)
def test_bad_rows_name_line_and_column(tmp_path: Path, row: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(table(tmp_path, GOOD, row))


def test_a_misspelled_suite_name_is_refused(tmp_path: Path) -> None:
    suites = tmp_path / "suites"
    suites.mkdir()
    for name in ("smoke", "ablations"):
        (suites / f"{name}.yaml").write_text("seeds: [0]\n", encoding="utf-8")
    good = table(tmp_path, GOOD, "mtp\tmtp\tchars\t\tsmoke,ablations\tx\n")
    check_suite_names(good, load(good), suites)
    path = table(tmp_path, GOOD, "mtp\tmtp\tchars\t\tsmoke,ablation\tx\n")
    with pytest.raises(
        ConfigError,
        match=r"line 3 \(experiment 'mtp'\), column 'suites': unknown suite 'ablation' "
        r"\(did you mean 'ablations'\?\); suites: ablations, smoke",
    ):
        check_suite_names(path, load(path), suites)


def test_unknown_column_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 1: unknown column 'seed'; the columns are name"):
        load(table(tmp_path, "gpt\tgpt\tchars\t0\n", header="name\tarch\tdataset\tseed\n"))
    with pytest.raises(ConfigError, match=r"unknown column 'overides' \(did you mean 'overrides'"):
        load(table(tmp_path, GOOD, header=HEADER.replace("overrides", "overides")))


def test_a_header_without_a_required_column_is_blamed_on_the_header(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"line 1: the header has no column 'dataset' \(required: name, arch, dataset;",
    ):
        load(table(tmp_path, "gpt\tgpt\n", header="name\tarch\n"))


def test_empty_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no experiment rows"):
        load(table(tmp_path))


def test_parse_overrides() -> None:
    assert parse_overrides("  a=1   b=x=y ") == {"a": "1", "b": "x=y"}
    assert parse_overrides("") == {}
    for bad in ("=1", "a=", "1a=2", "a b"):
        with pytest.raises(ConfigError):
            parse_overrides(bad)
    with pytest.raises(ConfigError, match="separated by spaces"):
        parse_overrides("n_layer=3,mlp=gelu")
    assert parse_overrides("widths=64,96") == {"widths": "64,96"}


def test_common_typing_mistakes_get_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 3 .*one cell only; .*separated by tabs"):
        load(table(tmp_path, GOOD, "x gpt chars n_layer=3\n"))
    rows = load(table(tmp_path, GOOD, "x\tgpt\tchars\t\tsmoke, default\t\n"))
    assert rows[1].suites == ("smoke", "default")


def test_overrides_split_between_model_and_training() -> None:
    model, train = split_overrides("gpt", {"n_layer": "2", "lr": "1e-3"})
    assert model == {"n_layer": "2"} and train == {"lr": "1e-3"}
    with pytest.raises(ConfigError, match=r"'future_dim' is an option of future_attention\)$"):
        split_overrides("gpt", {"future_dim": "4"})
    with pytest.raises(ConfigError, match=r"known options: .*[^)]$"):  # nobody's option: no hint
        split_overrides("gpt", {"no_such_option": "4"})


def suite_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suites" / "tiny.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def child_suite(tmp_path: Path, parent: str, child: str) -> Suite:
    """Suite 'child' (`child` after `extends: tiny`) loaded over suite 'tiny' (`parent`)."""
    suite_file(tmp_path, parent)
    path = tmp_path / "suites" / "child.yaml"
    path.write_text(f"extends: tiny\n{child}", encoding="utf-8")
    return load_suite(path, SUITE_SCHEMA)


def test_run_spec_merges_suite_and_row(tmp_path: Path) -> None:
    suite = load_suite(
        suite_file(
            tmp_path,
            (
                "seeds: [3]\nmodel: {n_layer: 2, d_model: 64}\n"
                "train: {block_size: 32, batch_size: 2, token_budget: 640, lr: 0.01}\n"
            ),
        ),
        SUITE_SCHEMA,
    )
    row = load(table(tmp_path, "x\tgpt\tchars\tn_layer=3 lr=0.002\t\t\n"))[0]
    spec = run_spec(row, suite, 3)
    assert spec["model"] == {**defaults(GPTConfig), "n_layer": 3, "d_model": 64}
    assert spec["train"] == {
        **defaults(TrainConfig),
        **{"block_size": 32, "batch_size": 2, "token_budget": 640, "lr": 0.002},
    }
    assert spec["seed"] == 3 and spec["arch"] == "gpt" and spec["dataset"] == "chars"


def defaults(config_cls: type) -> dict[str, object]:
    """{option: default} of a config class."""
    return {name: opt.default for name, opt in options_of(config_cls).items()}


def small_suite_specs(tmp_path: Path, *rows: str) -> list[dict]:
    """The run specs (seed 0) of the table GOOD + `rows` in a suite of n_head 2, block 32."""
    text = "seeds: [0]\nmodel: {n_head: 2}\ntrain: {block_size: 32, batch_size: 2}\n"
    suite = load_suite(suite_file(tmp_path, text), SUITE_SCHEMA)
    return [run_spec(row, suite, 0) for row in load(table(tmp_path, GOOD, *rows))]


def test_a_default_set_explicitly_is_the_same_run(tmp_path: Path) -> None:
    """The spec holds every option resolved, so a row that spells out defaults (in the table
    or the suite) is the same job and is not trained again, while a changed default in the
    code changes the spec of every row it applies to."""
    gpt, a, b = small_suite_specs(
        tmp_path,
        "a\tgpt\tchars\tmlp_ratio=3\t\t\n",
        "b\tgpt\tchars\tmlp_ratio=3.0 mlp=swiglu n_head=2 lr=1e-3\t\t\n",
    )
    assert {**a, "experiment": "b"} == b
    assert gpt["model"]["mlp_ratio"] == 4.0


def test_a_value_equal_to_what_unset_stands_for_is_the_same_run(tmp_path: Path) -> None:
    """`n_kv_heads=2` at n_head=2 is the model that n_kv_heads=0 (= n_head) builds, and
    future_dim=31 at block 32 is future_dim=0 (= block_size - 1): one run spec each, while a
    different value stays a different run."""
    specs = small_suite_specs(
        tmp_path,
        "kv\tgpt\tchars\tn_kv_heads=2\t\t\n",
        "mqa\tgpt\tchars\tn_kv_heads=1\t\t\n",
        "fa0\tfuture_attention\tchars\t\t\t\n",
        "fa31\tfuture_attention\tchars\tfuture_dim=31\t\t\n",
        "fa8\tfuture_attention\tchars\tfuture_dim=8\t\t\n",
    )
    gpt, kv, mqa, fa0, fa31, fa8 = (spec["model"] for spec in specs)
    assert kv == gpt and kv["n_kv_heads"] == 0
    assert mqa["n_kv_heads"] == 1
    assert fa31 == fa0 and fa31["future_dim"] == 0
    assert fa8["future_dim"] == 8


def test_a_row_that_fails_in_its_suite_names_its_table_line(tmp_path: Path) -> None:
    text = "seeds: [0]\nmodel: {n_head: 2}\ntrain: {block_size: 32, batch_size: 2}\n"
    suite = load_suite(suite_file(tmp_path, text), SUITE_SCHEMA)
    rows = load(table(tmp_path, GOOD, "\n", "kv\tgpt\tchars\tn_kv_heads=4\t\t\n"))
    with pytest.raises(
        ConfigError,
        match=r"experiment 'kv' \(table line 4, column 'overrides'\) in suite 'tiny'.*n_kv_heads=4",
    ):
        run_spec(rows[1], suite, 0)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{n_layr: 2}", r"section 'model': unknown option 'n_layr' for any architecture.*n_layer"),
        ("{n_head: 3, d_model: 32}", r"section 'model': d_model=32 is not divisible by n_head=3"),
    ],
)
def test_a_bad_suite_model_section_names_the_suite_file(
    tmp_path: Path, model: str, message: str
) -> None:
    """Not the first table row: the suite's own section is checked when the suite loads."""
    text = f"seeds: [0]\nmodel: {model}\ntrain: {{block_size: 32, batch_size: 2}}\n"
    path = suite_file(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ", " + message):
        load_suite(path, SUITE_SCHEMA)


def test_options_combine_with_the_suite_they_run_in(tmp_path: Path) -> None:
    """A row is checked against the suite it runs in: d_model=36 has an odd head width at the
    default n_head=4 but not at this suite's n_head=2, and a token budget below one default
    batch is enough for this suite's small batches."""
    text = "seeds: [0]\nmodel: {n_head: 2}\ntrain: {block_size: 32, batch_size: 2}\n"
    suite = load_suite(suite_file(tmp_path, text), SUITE_SCHEMA)
    rows = load(table(tmp_path, GOOD, "a\tgpt\tchars\td_model=36 token_budget=640\t\t\n"))
    model = run_spec(rows[1], suite, 0)["model"]
    assert (model["n_head"], model["d_model"]) == (2, 36)
    bad = load(table(tmp_path, GOOD, "b\tgpt\tchars\tn_head=3\t\t\n"))[1]
    with pytest.raises(
        ConfigError, match=r"experiment 'b' \(table line 3, column 'overrides'\).*not"
    ):
        run_spec(bad, suite, 0)


def test_quotes_are_text_and_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    """An unbalanced `"` (a CSV quote) used to swallow every later row into one cell."""
    rows = load(table(tmp_path, 'gpt\tgpt\tchars\t\t\t"MQA\n', "\n", "b\tgpt\tchars\t\t\tx\n"))
    assert [(r.name, r.description, r.line) for r in rows] == [
        ("gpt", '"MQA', 2),
        ("b", "x", 4),
    ]
    with pytest.raises(ConfigError, match=r"line 5 \(experiment 'c'\), column 'overrides'"):
        load(table(tmp_path, GOOD, "\n", "\n", "c\tgpt\tchars\tn_layer=0\t\t\n"))


def test_comment_lines_and_whitespace_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    """`#` lines (also above the header: a licence or a note) and rows of only tabs or spaces are
    not rows; the lines after them keep their numbers in errors."""
    header = "# rows of the study\n\n" + HEADER
    rows = load(table(tmp_path, GOOD, "# b\tgpt\tchars\t\t\tparked\n", "\t\t \n", header=header))
    assert [(r.name, r.line) for r in rows] == [("gpt", 4)]
    with pytest.raises(ConfigError, match=r"line 6 \(experiment 'c'\), column 'overrides'"):
        load(table(tmp_path, GOOD, "  # x\n", "c\tgpt\tchars\tn_layer=0\t\t\n", header=header))
    with pytest.raises(ConfigError, match=r"line 2: unknown column 'nam'"):
        load(table(tmp_path, header="# note\n" + HEADER.replace("name", "nam", 1)))
    with pytest.raises(ConfigError, match="the table has no header line"):
        load(table(tmp_path, header="# only a note\n\n"))


def test_a_table_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = table(tmp_path, GOOD)
    path.write_bytes(path.read_bytes() + b"b\tgpt\tchars\t\t\tcaf\xe9\n")
    with pytest.raises(ConfigError, match=r"line 3: byte 0xe9 is not UTF-8; save the table as"):
        load(path)


def test_train_by_dataset_applies_to_that_data_set_only(tmp_path: Path) -> None:
    suite = load_suite(
        suite_file(
            tmp_path,
            (
                "seeds: [0]\nmodel: {}\n"
                "train: {block_size: 32, batch_size: 2, token_budget: 640}\n"
                "train_by_dataset: {bpe512: {token_budget: 128}}\n"
            ),
        ),
        SUITE_SCHEMA,
    )
    rows = load(table(tmp_path, GOOD, "b\tgpt\tbpe512\t\t\t\n", "c\tgpt\tbpe512\tlr=0.1\t\t\n"))
    budgets = [run_spec(row, suite, 0)["train"]["token_budget"] for row in rows]
    assert budgets == [640, 128, 128]
    check_suite_datasets(suite, {"chars": None, "bpe512": None})
    with pytest.raises(ConfigError, match=r"train_by_dataset: unknown data set\(s\) bpe512"):
        check_suite_datasets(suite, {"chars": None})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seeds: [0]\nmodel: {}\n", r"key 'train'.*required"),
        (
            "seeds: [0]\nmodel: {}\ntrain: {block_size: 64, batch_size: 4}\n"
            "train_by_dataset: {chars: {token_budget: 100}}\n",
            r"section 'train_by_dataset.chars': token_budget=100 is smaller than one batch",
        ),
        ("seeds: [0]\nmodel: {}\ntrain: {}\ntrain_by_dataset: {chars: 5}\n", r"train_by_dataset"),
        ("seeds: []\nmodel: {}\ntrain: {}\n", r"key 'seeds'"),
        ("seeds: [0, 1, 0]\nmodel: {}\ntrain: {}\n", r"key 'seeds'.*non-unique"),
        (
            "seeds: [0]\nmodel: {}\ntrain: {}\nbogus: 1\n",
            r"key 'bogus': .*'bogus' was unexpected\); known keys: ",
        ),
        (
            "seeds: [0]\nmodell: {}\ntrain: {}\n",
            r"key 'modell': .*was unexpected\) \(did you mean 'model'\?\); known keys: ",
        ),
        ("seeds: [0]\nmodel: {}\ntrain: {}\neval: {batch_size: 0}\n", r"key 'eval.batch_size'"),
        (
            "seeds: [0]\nmodel: {}\ntrain: {block_size: 64, batch_size: 4, token_budget: 100}\n",
            r"section 'train': token_budget=100 is smaller than one batch",
        ),
        ("seeds: [0]\nmodel: {}\ntrain: {lr: fast}\n", r"option 'lr': 'fast' is not a valid"),
    ],
)
def test_bad_suites_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_suite(suite_file(tmp_path, text), SUITE_SCHEMA)


def test_missing_suite_lists_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"no suite file .*available suites: ablations, default, gpu"
    ):
        load_suite(ROOT / "configs/suites/nope.yaml", SUITE_SCHEMA)
    with pytest.raises(ConfigError, match=r"smok.yaml \(did you mean 'smoke'\?\); available"):
        load_suite(ROOT / "configs/suites/smok.yaml", SUITE_SCHEMA)


def test_one_seed_may_be_written_without_a_list(tmp_path: Path) -> None:
    """`seeds: 0` in a suite file, as `--config seeds=0` on the command line."""
    assert load_suite(
        suite_file(tmp_path, "seeds: 3\nmodel: {}\ntrain: {}\n"), SUITE_SCHEMA
    ).seeds == (3,)


def test_a_suite_can_extend_another(tmp_path: Path) -> None:
    suite = child_suite(
        tmp_path,
        "seeds: [0, 1]\nmodel: {n_layer: 2, d_model: 64}\ntrain: {lr: 0.01}\n",
        "seeds: [5]\nmodel: {n_layer: 3}\n",
    )
    assert suite.name == "child" and suite.seeds == (5,)
    assert suite.model == {"n_layer": 3, "d_model": 64} and suite.train == {"lr": 0.01}


def test_a_suite_that_runs_no_row_is_an_error(tmp_path: Path) -> None:
    rows = load(table(tmp_path, "gpt\tgpt\tchars\t\tother\t\n"))
    suite = load_suite(suite_file(tmp_path, "seeds: [0]\nmodel: {}\ntrain: {}\n"), SUITE_SCHEMA)
    with pytest.raises(ConfigError, match="no row of the table runs in suite 'tiny'"):
        suite_rows(rows, suite)


def test_seeds_from_the_command_line_are_integers_and_unique(tmp_path: Path) -> None:
    suite = load_suite(suite_file(tmp_path, "seeds: [4, 5]\nmodel: {}\ntrain: {}\n"), SUITE_SCHEMA)
    assert run_seeds(None, suite) == [4, 5] and run_seeds(["0", 1], suite) == [0, 1]
    assert run_seeds("null", suite) == [4, 5]  # `--config seeds=null`
    assert run_seeds(3, suite) == [3]  # `--config seeds=3`
    assert run_seeds("0,2", suite) == [0, 2]  # `--config seeds=0,2`
    with pytest.raises(ConfigError, match=r"seeds \[0, 0\]: a seed is listed twice"):
        run_seeds([0, "0"], suite)
    with pytest.raises(ConfigError, match=r"seeds: must be an integer from 0 to 4294967295"):
        run_seeds(f"0,{2**32}", suite)  # one 32-bit word: batch streams (seed, step) stay apart


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        (["0", "0"], r"seeds \[0, 0\]: a seed is listed twice"),
        ("1,1", r"seeds \[1, 1\]: a seed is listed twice"),
        ("null", None),
        (0, [0]),
        ("0,1,2", [0, 1, 2]),
        (["x"], "key 'seeds'.*seeds to train: one .0., a comma-separated list"),
        ("0,x", "key 'seeds'.*a comma-separated list .0,1,2."),
        (-1, "seeds"),
        (2**32, "seeds"),
        (f"0,{2**32}", "seeds: must be an integer from 0 to 4294967295"),
    ],
)
def test_seeds_as_the_command_line_gives_them_pass_the_schema_to_a_clear_message(
    seeds: object, message: str | list[int] | None
) -> None:
    """The schema lets `--config seeds=null`, one seed (`seeds=0`), a comma-separated list
    (`seeds=0,1,2`) and a repeated seed through, so that the suite's list is restored, the seeds
    given are trained, and the repeat is named by run_seeds rather than by a schema dump."""
    from archbench.experiments import check_config, load_config
    from archbench.plan import plan_suite

    schemas = ROOT / "workflow/schemas"
    config = {**load_config(ROOT / "configs/config.yaml", schemas / "config.schema.yaml")}
    config.update(suite="smoke", seeds=seeds)
    if not isinstance(message, str):
        check_config(config, schemas / "config.schema.yaml", "--config")
        assert plan_suite(ROOT, config, schemas).seeds == (message or [0, 1])
        return
    with pytest.raises(ConfigError, match=message):
        check_config(config, schemas / "config.schema.yaml", "--config")
        plan_suite(ROOT, config, schemas)


def test_a_suite_extending_another_keeps_its_lm_eval_tasks(tmp_path: Path) -> None:
    """Setting one lm_eval knob in a child suite must not drop the parent's task list."""
    lm_eval = child_suite(
        tmp_path,
        "seeds: [0]\nmodel: {}\ntrain: {}\n"
        "lm_eval: {tasks: [blimp, rolling_ppl], blimp_limit: 2}\n",
        "lm_eval: {blimp_limit: 1000}\n",
    ).lm_eval
    assert lm_eval["tasks"] == ["blimp", "rolling_ppl"] and lm_eval["blimp_limit"] == 1000


def test_a_suite_extending_another_merges_each_data_sets_options(tmp_path: Path) -> None:
    """Changing one option of one data set keeps the parent's other options for it."""
    suite = child_suite(
        tmp_path,
        "seeds: [0]\nmodel: {}\ntrain: {lr: 0.01}\n"
        "train_by_dataset: {mqar: {token_budget: 1000, batch_size: 4}, path_star: {lr: 0.1}}\n",
        "train_by_dataset: {mqar: {lr: 0.5}, chars: {lr: 0.2}}\n",
    )
    assert suite.train_for("mqar") == {"lr": 0.5, "token_budget": 1000, "batch_size": 4}
    assert suite.train_for("path_star") == {"lr": 0.1}
    assert suite.train_for("chars") == {"lr": 0.2}


def test_an_extends_cycle_is_refused(tmp_path: Path) -> None:
    path = suite_file(tmp_path, "extends: tiny\nseeds: [0]\nmodel: {}\ntrain: {}\n")
    with pytest.raises(ConfigError, match="'extends' forms a cycle"):
        load_suite(path, SUITE_SCHEMA)


def test_baselines_default_to_the_first_gpt_row_of_the_data_set(tmp_path: Path) -> None:
    header = "name\tarch\tdataset\tbaseline\n"
    rows = load(
        table(
            tmp_path,
            "a\tmtp\tchars\t\n",
            "b\tgpt\tchars\t\n",
            "c\tgpt\tchars\tb\n",
            "d\tmtp\tbpe512\tnone\n",
            "e\tmtp\tchars\tc\n",
            "f\tgpt\tchars\tnone\n",
            header=header,
        )
    )
    assert [r.baseline for r in rows] == ["b", None, "b", None, "c", None]  # d, f: none


def test_an_empty_baseline_needs_a_gpt_row_on_the_data_set(tmp_path: Path) -> None:
    """The README's "empty = the data set's first gpt row" cannot hold without one: an error
    naming the data set, not a row silently compared with nothing."""
    header = "name\tarch\tdataset\tbaseline\n"
    path = table(tmp_path, "a\tgpt\tchars\t\n", "d\tmtp\tbpe512\t\n", header=header)
    with pytest.raises(
        ConfigError,
        match=r"line 3 \(experiment 'd'\), column 'baseline': empty, which means the first gpt "
        r"row on data set 'bpe512', but there is none; .* or write 'none'",
    ):
        load(path)


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("nope", r"column 'baseline': no row named 'nope'"),
        ("x", r"column 'baseline': a row cannot be its own baseline"),
        ("other", r"column 'baseline': baseline 'other' uses data set 'bpe512', not 'chars'"),
    ],
)
def test_bad_baselines_are_refused(tmp_path: Path, cell: str, message: str) -> None:
    header = "name\tarch\tdataset\tbaseline\n"
    with pytest.raises(ConfigError, match=message):
        load(table(tmp_path, "other\tgpt\tbpe512\t\n", f"x\tgpt\tchars\t{cell}\n", header=header))


def test_the_name_none_is_reserved_for_no_baseline(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"column 'name': 'none' is reserved"):
        load(table(tmp_path, "none\tgpt\tchars\t\n", header="name\tarch\tdataset\tbaseline\n"))


SUBSTITUTION_TABLE = (
    "gpt\tgpt\tchars\t\t\t\n",
    "wide\tgpt\tchars\td_model=64\tother\t\n",
    "wide_tiny\tgpt\tchars\td_model=48\ttiny\t\n",
    "row\tmtp\tchars\t\t\twide\n",
    "plain\tmtp\tchars\t\t\t\n",
    "bytes\tgpt\tbpe512\t\t\t\n",
)
SUBSTITUTION_HEADER = "name\tarch\tdataset\toverrides\tsuites\tbaseline\n"


def resolve(tmp_path: Path, rows: list, baselines: str) -> dict:
    """{name: row} of `rows` in a suite 'tiny' whose `baselines` mapping is `baselines`."""
    path = suite_file(tmp_path, f"seeds: [0]\nmodel: {{}}\ntrain: {{}}\nbaselines: {baselines}\n")
    return {e.name: e for e in suite_rows(rows, load_suite(path, SUITE_SCHEMA))}


def test_a_suite_replaces_a_baseline_it_does_not_run(tmp_path: Path) -> None:
    rows = load(table(tmp_path, *SUBSTITUTION_TABLE, header=SUBSTITUTION_HEADER))
    resolved = resolve(tmp_path, rows, "{wide: wide_tiny}")
    assert set(resolved) == {"gpt", "wide_tiny", "row", "plain", "bytes"}
    assert resolved["row"].baseline == "wide_tiny"
    assert resolved["plain"].baseline == "gpt"  # rows naming another baseline are untouched
    assert resolved["row"].describe()["baseline"] == "wide_tiny"  # what the report receives


def test_a_replacement_keeps_its_own_baseline(tmp_path: Path) -> None:
    """Replacing the data set's default baseline does not make the replacement its own."""
    rows = load(table(tmp_path, *SUBSTITUTION_TABLE, header=SUBSTITUTION_HEADER))
    resolved = resolve(tmp_path, rows, "{gpt: wide_tiny}")
    assert resolved["plain"].baseline == "wide_tiny" and resolved["wide_tiny"].baseline == "gpt"


def test_a_suite_extending_another_merges_its_baselines(tmp_path: Path) -> None:
    suite = child_suite(
        tmp_path, "seeds: [0]\nmodel: {}\ntrain: {}\nbaselines: {a: b}\n", "baselines: {c: d}\n"
    )
    assert suite.baselines == {"a": "b", "c": "d"}


def test_a_suite_replaces_sub_model_baselines_too(tmp_path: Path) -> None:
    header = "name\tarch\tdataset\toverrides\tsuites\tsubmodel_baselines\n"
    rows = load(
        table(
            tmp_path,
            "gpt\tgpt\tchars\t\t\t\n",
            "solo\tfractalformer\tchars\tlevels=1 d_model=64 mlp_hidden=172\tother\t\n",
            "solo_t\tfractalformer\tchars\tlevels=1 d_model=32 mlp_hidden=86\ttiny\t\n",
            "frac\tfractalformer\tchars\tlevels=2\t\tL1=solo\n",
            header=header,
        )
    )
    resolved = resolve(tmp_path, rows, "{solo: solo_t}")
    assert resolved["frac"].submodel_baselines == {"L1": "solo_t"}


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ("{wdie: wide_tiny}", r"suite 'tiny', baselines: no row named 'wdie' \(did you mean"),
        ("{wide: wide}", r"'wide: wide' names no row that runs in this suite"),
        ("{wide: nope}", r"'wide: nope' names no row that runs in this suite"),
        ("{wide: bytes}", r"'wide' uses data set 'chars', its replacement 'bytes' uses 'bpe512'"),
        ("{wide: [gpt]}", r"baselines"),
    ],
)
def test_bad_suite_baselines_are_refused(tmp_path: Path, mapping: str, message: str) -> None:
    rows = load(table(tmp_path, *SUBSTITUTION_TABLE, header=SUBSTITUTION_HEADER))
    with pytest.raises(ConfigError, match=message):
        resolve(tmp_path, rows, mapping)


def test_plan_suite_applies_the_configs_seeds_to_its_own_suite_only() -> None:
    from archbench.experiments import load_config
    from archbench.plan import plan_suite

    schemas = ROOT / "workflow/schemas"
    config = {**load_config(ROOT / "configs/config.yaml", schemas / "config.schema.yaml")}
    config.update(suite="smoke", seeds=["7", "3"])
    smoke = plan_suite(ROOT, config, schemas)
    assert smoke.suite.name == "smoke" and smoke.seeds == [7, 3]
    assert set(smoke.specs) == {(row, seed) for row in smoke.experiments for seed in (7, 3)}
    assert all(smoke.specs[row, 7]["seed"] == 7 for row in smoke.experiments)
    default = plan_suite(ROOT, config, schemas, suite="default")
    assert default.seeds == list(default.suite.seeds) != [7, 3]
    assert list(default.experiments) == [
        e.name
        for e in load_experiments(ROOT / config["experiments"], ROW_SCHEMA, config["datasets"])
        if e.runs_in("default")
    ]
