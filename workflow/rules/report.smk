# A text sample per experiment (first seed), then aggregate every run of the suite with polars
# and render tables and figures.

SAMPLE_SEED = SEEDS[0]


def run_refs():
    """The runs of this suite as JSON for `archbench aggregate`."""
    return json.dumps([
        {"experiment": name, "arch": EXPERIMENTS[name].arch,
         "dataset": EXPERIMENTS[name].dataset, "seed": seed,
         "run_dir": RUN.format(experiment=name, seed=seed),
         "result_files": result_files(name)}
        for name, seed in all_runs()
    ], indent=1)


# The run list and the rows go to `aggregate` and `report` as files: inline, a large suite's
# list exceeds Linux's 128 KiB limit on one argument (the ablations suite at 7 seeds). They are
# written here, while Snakemake reads the workflow, and only when their content changes: their
# modification time then re-runs exactly the jobs that read them, under any --rerun-triggers.
# (As rules with the lists as params they were not re-run under `--rerun-triggers mtime input
# code`, the README's way to keep old results, and a new row never reached the report.)
RUNS_JSON = run_refs()
ROWS_JSON = json.dumps([e.describe() for e in EXPERIMENTS.values()], indent=1)
# The values each data set's rows start from: the suite's model and train sections, with its
# train_by_dataset applied (the report places rows without an override on ablation axes by them).
DEFAULTS_JSON = json.dumps(
    {
        dataset: {**SUITE.model, **SUITE.train_for(dataset)}
        for dataset in sorted({e.dataset for e in EXPERIMENTS.values()})
    },
    indent=1,
)
for name, text in (("runs", RUNS_JSON), ("rows", ROWS_JSON), ("defaults", DEFAULTS_JSON)):
    write_text_if_changed(f"{RESULTS}/{name}.json", text + "\n")


rule sample:
    input:
        weights=f"{RUN}/model.safetensors",
        model_config=f"{RUN}/model_config.json",
        tokenizer=lambda w: f"{data_dir(w)}/tokenizer.json",
    output:
        f"{RUN}/samples.json",
    params:
        data=data_dir,
        run=RUN,
    threads: 1
    log:
        f"{RUN}/sample.log",
    shell:
        "{ARCHBENCH} sample --run {params.run} --data {params.data} --out {output} "
        "--threads {threads} 2> {log}"


rule aggregate:
    input:
        results=[f"{RUN}/{name}".format(experiment=e, seed=s)
                 for e, s in all_runs() for name in result_files(e)],
        metrics=[f"{RUN}/metrics.csv".format(experiment=e, seed=s) for e, s in all_runs()],
        samples=[f"{RUN}/samples.json".format(experiment=e, seed=SAMPLE_SEED)
                 for e in EXPERIMENTS if not synthetic(e)],  # text samples of text rows
        runs=f"{RESULTS}/runs.json",
    output:
        summary=report(f"{RESULTS}/summary.csv", caption="../report/summary.rst",
                       category="Data"),
        curves=report(f"{RESULTS}/curves.csv", caption="../report/curves.rst", category="Data"),
        samples=f"{RESULTS}/samples.json",
    log:
        f"{RESULTS}/logs/aggregate.log",
    shell:
        "{ARCHBENCH} aggregate --runs @{input.runs} --summary {output.summary} "
        "--curves {output.curves} --samples {output.samples} 2> {log}"


rule report:
    input:
        summary=f"{RESULTS}/summary.csv",
        curves=f"{RESULTS}/curves.csv",
        samples=f"{RESULTS}/samples.json",
        rows=f"{RESULTS}/rows.json",
        defaults=f"{RESULTS}/defaults.json",
    output:
        md=f"{REPORT}/index.md",
        html=report(f"{REPORT}/index.html", caption="../report/tables.rst", category="Report"),
        figures=report(directory(f"{REPORT}/figures"), patterns=["{name}.png"],
                       caption="../report/figures.rst", category="Figures"),
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "{ARCHBENCH} report --summary {input.summary} --curves {input.curves} "
        "--samples {input.samples} --out-dir {REPORT} --suite {SUITE.name} "
        "--experiments @{input.rows} --defaults @{input.defaults} 2> {log}"
