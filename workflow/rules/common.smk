# Loading and validating the configuration, the suite and the experiments table. Everything here
# runs before any job starts, so a bad row or option stops the workflow with a clear message.

import json
import re
import shlex
import sys
from pathlib import Path

import torch
from snakemake.exceptions import WorkflowError

from archbench.data import MASK_FILES, SyntheticSpec, check_local_copy, resolve_mirror
from archbench.data.blimp import check_blimp_mirror
from archbench.errors import ArchbenchError
from archbench.experiments import run_spec
from archbench.io import write_text_if_changed
from archbench.plan import plan_suite
from archbench.runs import RESULT_FILES, lm_eval_result
from archbench.runtime import pick_device

SCHEMAS = Path(workflow.basedir) / "workflow" / "schemas"
# The rules call the CLI with the Python that runs Snakemake, so an un-activated venv works too.
ARCHBENCH = f"{shlex.quote(sys.executable)} -m archbench"

try:
    PLAN = plan_suite(Path(), config, SCHEMAS)
    DATASETS, SUITE, EXPERIMENTS, SEEDS, SPECS = (
        PLAN.datasets, PLAN.suite, PLAN.experiments, PLAN.seeds, PLAN.specs
    )
    MIRROR_DIR = resolve_mirror(config.get("data_mirror"))
    for name in sorted({e.dataset for e in EXPERIMENTS.values()}):
        check_local_copy(DATASETS[name], MIRROR_DIR)  # a bad data file stops us before any job
    scores_text = any(not isinstance(DATASETS[e.dataset], SyntheticSpec)
                      for e in EXPERIMENTS.values())  # lm_eval runs on text rows only
    if MIRROR_DIR and scores_text and "blimp" in SUITE.lm_eval.get("tasks", ()):
        check_blimp_mirror(MIRROR_DIR)  # lm_eval reads BLiMP from the mirror too
except ArchbenchError as err:
    raise WorkflowError(f"archbench: {err}") from None

MIRROR = str(MIRROR_DIR or "")
# Not a param of any rule: every data file is sha256-checked wherever it comes from, so switching
# the mirror re-runs nothing.
MIRROR_ARG = f"--mirror {shlex.quote(MIRROR)}" if MIRROR else ""
RESULTS = f"results/{SUITE.name}"
REPORT = f"report/{SUITE.name}"
RUN = RESULTS + "/{experiment}/seed{seed}"
DATA = "results/data/{dataset}"
DATA_FILES = ("train.bin", "val.bin", "tokenizer.json", "token_bytes.npy", "meta.json")
# A synthetic data set (archbench.data.synthetic) is generated, with answer masks besides.
SYNTHETIC_DATA_FILES = (*DATA_FILES, *MASK_FILES.values())
TEXT_DATASETS = sorted(n for n, s in DATASETS.items() if not isinstance(s, SyntheticSpec))
SYNTHETIC_DATASETS = sorted(n for n, s in DATASETS.items() if isinstance(s, SyntheticSpec))


LM_EVAL = SUITE.lm_eval
LM_EVAL_TASKS = tuple(LM_EVAL.get("tasks", ()))


wildcard_constraints:
    experiment="|".join(sorted(EXPERIMENTS)),
    lm_eval_task="|".join(LM_EVAL_TASKS) or "(?!)",
    seed=r"\d+",
    dataset=r"[A-Za-z0-9_.-]+",


def data_dir(wildcards):
    """Prepared-data directory of the experiment in `wildcards`."""
    return DATA.format(dataset=EXPERIMENTS[wildcards.experiment].dataset)


def synthetic(experiment):
    """Whether `experiment` trains on a synthetic task rather than text."""
    return EXPERIMENTS[experiment].dataset in SYNTHETIC_DATASETS


def one_of(names):
    """A wildcard pattern matching exactly `names` (nothing if there are none)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


# eval.json of a run comes from one of two rules: the perplexity script on text, the task's
# scores (archbench evaluate-task) on a synthetic task.
TEXT_EXPERIMENTS = one_of(name for name in EXPERIMENTS if not synthetic(name))
TASK_EXPERIMENTS = one_of(name for name in EXPERIMENTS if synthetic(name))


def data_inputs(wildcards):
    """The prepared-data files a run of this experiment reads."""
    names = SYNTHETIC_DATA_FILES if synthetic(wildcards.experiment) else DATA_FILES
    return [f"{data_dir(wildcards)}/{name}" for name in names]


def result_files(experiment):
    """Names of the flat JSON result files in each run directory of `experiment` that the
    aggregate step reads: training, evaluation (eval.json), leak check and every lm-eval task
    group; on a synthetic task no lm-eval group, and eval.json holds the task's scores instead of
    perplexity (which over random keys and node labels measures nothing; lm-eval's tasks are
    English text)."""
    if synthetic(experiment):
        return list(RESULT_FILES)
    return [*RESULT_FILES, *(lm_eval_result(task) for task in LM_EVAL_TASKS)]


def all_runs():
    """(experiment, seed) of every job in this suite, in table order."""
    return [(name, seed) for name in EXPERIMENTS for seed in SEEDS]


onstart:
    # A GPU suite run by this machine itself (not through a cluster executor, whose nodes have
    # their own GPUs) on a machine without one would train on the CPU for hours, unasked.
    if SUITE.gpu and workflow.local_exec and pick_device("auto").type == "cpu":
        print(
            f"archbench: warning: suite '{SUITE.name}' is meant for a GPU, but torch "
            f"{torch.__version__} finds none here: its jobs (device: auto) train on the CPU, "
            "which takes hours. Install a CUDA build of torch (README: 'Installing on a GPU "
            "machine'), run the suite through a cluster profile, or pick a CPU suite "
            "(--config suite=default).",
            file=sys.stderr,
        )
