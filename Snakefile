# archbench: experiments table -> prepare data -> train (experiment x seed) -> evaluate ->
# aggregate -> report.  Run `snakemake --cores all` (suite from configs/config.yaml) or
# `snakemake --cores all --config suite=smoke`.  See README.md.

from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from archbench.errors import ArchbenchError
from archbench.experiments import check_config

min_version("9.0")


configfile: "configs/config.yaml"


try:  # snakemake's schema validation, with a one-line error for a misspelled key
    check_config(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml",
                 "config (configs/config.yaml and --config)")
except ArchbenchError as err:
    raise WorkflowError(f"archbench: {err}") from None

report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/leakcheck.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/synthetic.smk"


rule all:
    input:
        f"{REPORT}/index.md",
        f"{REPORT}/index.html",
