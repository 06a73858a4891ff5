# archbench: experiments table -> prepare data -> train (experiment x seed) -> evaluate ->
# aggregate -> report.  Run `snakemake --cores all` (suite from configs/config.yaml) or
# `snakemake --cores all --config suite=smoke`.  See README.md.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "configs/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")

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
