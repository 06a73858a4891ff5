"""The `archbench` command: one subcommand per workflow step, plus listings and validation.

The Snakemake rules call these subcommands; they are also usable by hand. Errors in user input
print one line (`archbench: error: ...`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import archbench
from archbench.errors import ArchbenchError, ConfigError
from archbench.generate import DEFAULT_LENGTH, DEFAULT_TEMPERATURE, DEFAULT_TOP_K
from archbench.runtime import pick_device

PREEMPTED_EXIT = 128 + 15  # the conventional status of a process ended by SIGTERM
SPEC_KEYS = ("experiment", "arch", "dataset", "seed", "model", "train")


class HelpFormat(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows an option's default where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        given = action.required or "(default:" in (action.help or "")
        if given or action.default in (None, "", []) or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Subcommand(argparse.ArgumentParser):
    """A subcommand's parser: its `--help` shows the defaults (HelpFormat)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(formatter_class=HelpFormat, **kwargs)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    """`text` as an integer >= `least`; argparse.ArgumentTypeError otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is not >= {least}")
    return value


def json_value(text: str) -> object:
    """argparse type: a JSON document, inline or, as `@path`, in a file (a long list would
    exceed the operating system's limit on one command-line argument, 128 KiB on Linux)."""
    source = "JSON"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as err:
            raise argparse.ArgumentTypeError(f"cannot read {source}: {err.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid {source} ({err})") from None


def _cmd_prepare(args: argparse.Namespace) -> None:
    from archbench.data import parse_datasets, prepare_dataset, resolve_mirror

    name = args.dataset
    specs = parse_datasets({name: args.dataset_spec}, source="--dataset-spec")
    meta = prepare_dataset(specs[name], Path(args.out), mirror=resolve_mirror(args.mirror))
    print(
        f"prepared {name}: vocab {meta['vocab_size']}, {meta['n_train_tokens']:,} train / "
        f"{meta['n_val_tokens']:,} val tokens",
        file=sys.stderr,
    )


def _cmd_train(args: argparse.Namespace) -> None:
    from archbench.train import train_run

    missing = (
        [k for k in SPEC_KEYS if k not in args.spec] if isinstance(args.spec, dict) else SPEC_KEYS
    )
    if missing:
        raise ArchbenchError(
            f"--spec lacks {', '.join(missing)}: a spec is a JSON object with the keys "
            f"{', '.join(SPEC_KEYS)} (model and train may be {{}}: the defaults)"
        )
    torch.set_num_threads(args.threads)
    init_dirs = {}
    for item in args.init:
        target, sep, run_dir = item.partition("=")
        if not sep or not target or not run_dir:
            raise ArchbenchError(f"--init {item!r} is not of the form TARGET=RUN_DIR")
        init_dirs[target] = Path(run_dir)
    summary = train_run(
        args.spec,
        Path(args.data),
        Path(args.out),
        show_progress=not args.no_progress,
        init_dirs=init_dirs,
    )
    print(json.dumps(summary, indent=2), file=sys.stderr)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from archbench.data import load_meta, load_token_bytes, load_tokens
    from archbench.evaluate.perplexity import evaluate_perplexity
    from archbench.evaluate.submodels import with_submodels
    from archbench.io import write_json
    from archbench.runs import load_run

    torch.set_num_threads(args.threads)
    run_dir, data_dir = Path(args.run), Path(args.data)
    device = pick_device(args.device)
    model = load_run(run_dir, device)  # first: a wrong --run is the error to name, not the data
    if "instance_length" in load_meta(data_dir):
        raise ConfigError(
            f"{data_dir} holds a synthetic task: its loss counts the answer tokens only, and "
            "perplexity over every token (the random prompts included) would not compare with "
            "it; score the run with `archbench evaluate-task`"
        )
    tokens, token_bytes = load_tokens(data_dir, "val"), load_token_bytes(data_dir)
    metrics = with_submodels(  # nested sub-models (fractalformer) are scored on the same windows
        model,
        lambda scored: evaluate_perplexity(
            scored,
            tokens,
            token_bytes,
            block_size=model.config.block_size,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            device=device,
        ),
        sizes=True,
    )
    write_json(args.out, metrics)
    print(json.dumps(metrics, indent=2), file=sys.stderr)


def _cmd_leakcheck(args: argparse.Namespace) -> None:
    from archbench.data import load_meta, load_tokens
    from archbench.evaluate.leakcheck import leak_check
    from archbench.evaluate.submodels import SUBMODELS, with_submodels
    from archbench.io import write_json
    from archbench.runs import load_run

    torch.set_num_threads(args.threads)
    model = load_run(Path(args.run), pick_device(args.device))
    data_dir = Path(args.data)
    tokens, vocab_size = load_tokens(data_dir, "val"), load_meta(data_dir)["vocab_size"]
    result = with_submodels(  # every nested sub-model (fractalformer) is checked as well
        model, lambda checked: leak_check(checked, tokens, model.config.block_size, vocab_size)
    )
    write_json(args.out, result)
    failed = [name for name, r in result.get(SUBMODELS, {}).items() if not r["leak_check_passed"]]
    verdict = "passed" if result["leak_check_passed"] else "FAILED: the model sees the future"
    if failed:
        verdict += f"; sub-models {', '.join(failed)} FAILED: they see the future"
    print(f"leak check {verdict}: {json.dumps(result)}", file=sys.stderr)


def _cmd_lm_eval(args: argparse.Namespace) -> None:
    from archbench.evaluate.lm_eval_adapter import run_lm_eval

    torch.set_num_threads(args.threads)
    result = run_lm_eval(
        Path(args.run),
        Path(args.data),
        args.tasks,
        Path(args.out),
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        stride=args.stride,
        max_tokens=args.max_tokens,
        data_mirror=args.mirror,
    )
    print(json.dumps(result, indent=2), file=sys.stderr)


def _cmd_evaluate_task(args: argparse.Namespace) -> None:
    from archbench.evaluate.synthetic import evaluate_task

    torch.set_num_threads(args.threads)
    metrics = evaluate_task(
        Path(args.run),
        Path(args.data),
        Path(args.out),
        limit=args.limit,
        batch_size=args.batch_size,
        device=pick_device(args.device),
    )
    print(json.dumps(metrics, indent=2), file=sys.stderr)


def _cmd_sample(args: argparse.Namespace) -> None:
    from archbench.generate import write_samples

    torch.set_num_threads(args.threads)
    sample = write_samples(Path(args.run), Path(args.data), Path(args.out))
    print(f"greedy: {sample['greedy']!r}", file=sys.stderr)


def _cmd_generate(args: argparse.Namespace) -> None:
    from archbench.generate import generate_from_run, locate_run, workflow_data_dir

    torch.set_num_threads(args.threads)
    if args.run and args.experiment:
        raise ArchbenchError("name a run either by --experiment (with --suite, --seed) or by --run")
    if args.run:
        run_dir = Path(args.run)
        data_dir = Path(args.data) if args.data else workflow_data_dir(run_dir)
    else:
        if not args.experiment:
            raise ArchbenchError("name a run: --experiment NAME [--suite --seed], or --run/--data")
        run_dir, data_dir = locate_run(Path(args.results), args.suite, args.experiment, args.seed)
    text = generate_from_run(
        run_dir,
        data_dir,
        args.prompt,
        length=args.length,
        temperature=args.temperature,
        top_k=args.top_k or None,
        seed=args.sample_seed,
        submodel=args.submodel,
    )
    print(args.prompt + text)


def _cmd_aggregate(args: argparse.Namespace) -> None:
    from archbench.report.aggregate import aggregate, run_refs

    runs = run_refs(args.runs)
    aggregate(
        runs,
        Path(args.summary),
        Path(args.curves),
        samples_json=Path(args.samples) if args.samples else None,
    )


def _cmd_report(args: argparse.Namespace) -> None:
    from archbench.report.render import render_report

    paths = render_report(
        Path(args.summary),
        Path(args.curves),
        Path(args.out_dir),
        args.suite,
        experiments=args.experiments,
        samples_json=Path(args.samples) if args.samples else None,
        defaults=args.defaults,
    )
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)


def _cmd_options(args: argparse.Namespace) -> None:
    from archbench.models import ARCHITECTURES, get_architecture, list_options
    from archbench.options import options_of
    from archbench.train import TrainConfig

    tables = {
        f"architecture `{a}`: {get_architecture(a).summary}": list_options(a)
        for a in ([args.arch] if args.arch else sorted(ARCHITECTURES))
    }
    if not args.arch:
        tables["training options (every architecture)"] = options_of(TrainConfig)
    for title, options in tables.items():
        print(f"\n### {title}\n\n| option | default | allowed | meaning |\n|---|---|---|---|")
        for opt in options.values():
            allowed = opt.describe().replace("|", "\\|")
            print(f"| `{opt.name}` | `{opt.default}` | {allowed} | {opt.help} |")


def _cmd_validate(args: argparse.Namespace) -> None:
    from archbench.experiments import load_config, suite_names
    from archbench.options import suggest
    from archbench.plan import SUITES_DIR, plan_suite

    root = Path(args.root)
    schemas = root / "workflow/schemas"
    if not schemas.is_dir():
        raise ConfigError(
            f"{root.resolve()} is not an archbench project (no workflow/schemas): run "
            "`archbench validate` from the repository root, or pass --root"
        )
    config = load_config(root / args.config, schemas / "config.schema.yaml")
    suites, chosen = suite_names(root / SUITES_DIR), config["suite"]
    if chosen not in suites:
        raise ConfigError(
            f"{args.config}: suite '{chosen}'{suggest(chosen, suites)} has no file in "
            f"{root / SUITES_DIR}; available suites: {', '.join(suites)}"
        )
    for name in suites:
        plan = plan_suite(root, config, schemas, suite=name, config_source=args.config)
        print(f"suite {name}: {len(plan.experiments)} experiments x {len(plan.seeds)} seeds: ok")
        absent = plan.absent_baselines()
        if absent:
            pairs = ", ".join(f"{row} -> {baseline}" for row, baseline in absent)
            print(
                f"  note: {len(absent)} baseline(s) do not run in suite {name}, so the report "
                f"leaves those comparisons out: {pairs} (add the baseline rows to the suite, or "
                "map them to rows that run under the suite's `baselines:`)"
            )


def _run_command(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    out: str,
    data: str = "prepared data directory",
    device: str | None = "auto",
) -> argparse.ArgumentParser:
    """A subcommand that reads one run directory and its data and writes one file: the --run,
    --data, --out, --threads (and, unless `device` is None, --device) arguments. `main` checks
    that the data is the run's data set before the command runs."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(reads_run_and_data=True)
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--data", required=True, help=data)
    p.add_argument("--out", required=True, help=out)
    if device is not None:
        p.add_argument("--device", default=device, help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `archbench` command."""
    parser = argparse.ArgumentParser(prog="archbench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version",
        action="version",
        version=f"archbench {archbench.__version__} (torch {torch.__version__})",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Subcommand)

    p = sub.add_parser("prepare", help="fetch, verify and tokenize one data set")
    p.add_argument("--dataset", required=True, help="data-set name")
    p.add_argument(
        "--dataset-spec", required=True, type=json_value, help="its registry entry as JSON"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mirror", default=None, help="data mirror directory")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train one (experiment, seed)")
    p.add_argument(
        "--spec",
        required=True,
        type=json_value,
        help="run spec as JSON, or @file (written by the workflow)",
    )
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--init",
        action="append",
        default=[],
        metavar="TARGET=RUN_DIR",
        help="run directory of the spec's init_from target TARGET (repeat for each)",
    )
    p.set_defaults(func=_cmd_train)

    p = _run_command(
        sub, "evaluate", "perplexity / bits-per-byte / top-k of one run", "eval.json to write"
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="windows per forward pass")
    p.add_argument(
        "--max-tokens", type=positive_int, default=None, help="score only this many tokens"
    )
    p.set_defaults(func=_cmd_evaluate)

    p = _run_command(
        sub, "leakcheck", "future-leak check of one trained run", "leak_check.json to write"
    )
    p.set_defaults(func=_cmd_leakcheck)

    p = _run_command(
        sub,
        "evaluate-task",
        "synthetic-task accuracy and exact match of one run (the workflow's eval.json of a "
        "synthetic row)",
        "JSON file to write (the workflow writes the run's eval.json)",
        data="prepared synthetic data directory",
    )
    p.add_argument(
        "--limit", type=positive_int, default=None, help="score the first N val instances"
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="instances per forward pass")
    p.set_defaults(func=_cmd_evaluate_task)

    p = _run_command(
        sub,
        "lm-eval",
        "lm-evaluation-harness tasks (offline) on one run",
        "results JSON to write",
    )
    p.add_argument(
        "--tasks",
        required=True,
        choices=("blimp", "rolling_ppl"),
        help="one task group per call (the workflow runs one job per group)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="requests per forward pass")
    p.add_argument("--limit", type=positive_int, default=None, help="BLiMP pairs per paradigm")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="rolling: held-out prefix")
    p.add_argument("--stride", type=positive_int, default=None, help="rolling: window stride")
    p.add_argument(
        "--mirror",
        "--data-mirror",
        dest="mirror",
        default=None,
        help="data mirror directory with blimp/ (default: $ARCHBENCH_DATA_MIRROR, else the "
        "embedded BLiMP)",
    )
    p.set_defaults(func=_cmd_lm_eval)

    p = _run_command(
        sub,
        "sample",
        "greedy and sampled text of one run, for the report",
        "samples.json to write",
        device=None,
    )
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("generate", help="generate text from a trained run")
    p.add_argument("--experiment", help="experiment row name (with --suite and --seed)")
    p.add_argument("--suite", default="default", help="suite of the run (with --experiment)")
    p.add_argument("--seed", type=int, default=0, help="which training seed's run")
    p.add_argument("--results", default="results", help="results directory")
    p.add_argument("--run", help="a run directory instead of --experiment")
    p.add_argument(
        "--data",
        help="its prepared-data directory (with --run; default: the workflow's "
        "results/data/<dataset> beside the run)",
    )
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--length", type=positive_int, default=DEFAULT_LENGTH, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy")
    p.add_argument(
        "--top-k",
        type=non_negative_int,
        default=DEFAULT_TOP_K,
        help="sample from the k likeliest (0 = all)",
    )
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--submodel", default=None, help="a nested sub-model, e.g. L1.0")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("aggregate", help="collect run results into summary.csv / curves.csv")
    p.add_argument(
        "--runs",
        required=True,
        type=json_value,
        help="JSON list of runs, or @file (the workflow writes results/<suite>/runs.json)",
    )
    p.add_argument("--summary", required=True, help="summary.csv to write")
    p.add_argument("--curves", required=True, help="curves.csv to write")
    p.add_argument("--samples", default="", help="samples.json to collect the runs' samples into")
    p.set_defaults(func=_cmd_aggregate)

    p = sub.add_parser("report", help="render the Markdown / HTML report")
    p.add_argument("--summary", required=True, help="summary.csv from aggregate")
    p.add_argument("--curves", required=True, help="curves.csv from aggregate")
    p.add_argument("--out-dir", required=True, help="directory for index.md, index.html, figures")
    p.add_argument("--suite", required=True, help="suite name, for the title")
    p.add_argument(
        "--experiments",
        type=json_value,
        default=None,
        help="JSON list of the suite's rows (name, arch, dataset, overrides, baseline, "
        "description), in table order, or @file (the workflow writes results/<suite>/rows.json)",
    )
    p.add_argument("--samples", default="", help="collected samples.json")
    p.add_argument(
        "--defaults",
        type=json_value,
        default=None,
        help="JSON {dataset: {option: value}} of the values each data set's rows start from "
        "(the suite's model and train sections, train_by_dataset applied), or @file "
        "(results/<suite>/defaults.json)",
    )
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("options", help="list architectures and their options (Markdown)")
    p.add_argument("arch", nargs="?", default=None, help="one architecture (default: all)")
    p.set_defaults(func=_cmd_options)

    p = sub.add_parser("validate", help="check the config, the experiments table and suites")
    p.add_argument("--root", default=".", help="project directory")
    p.add_argument("--config", default="configs/config.yaml", help="config file, under --root")
    p.set_defaults(func=_cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `archbench` command."""
    from archbench.train import Preempted

    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "reads_run_and_data", False):
            from archbench.runs import check_run_data

            check_run_data(Path(args.run), Path(args.data))
        args.func(args)
    except Preempted as err:
        print(f"archbench: {err}", file=sys.stderr)
        return PREEMPTED_EXIT
    except ArchbenchError as err:
        print(f"archbench: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `archbench options | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
