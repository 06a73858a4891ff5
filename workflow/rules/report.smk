# Aggregate every run of the suite with polars, then render tables and figures.


def run_refs():
    """The runs of this suite as JSON for `archbench aggregate`."""
    return json.dumps([
        {"experiment": name, "arch": EXPERIMENTS[name].arch,
         "dataset": EXPERIMENTS[name].dataset, "seed": seed,
         "run_dir": RUN.format(experiment=name, seed=seed)}
        for name, seed in all_runs()
    ])


rule aggregate:
    input:
        results=[f"{RUN}/{name}".format(experiment=e, seed=s)
                 for e, s in all_runs() for name in RESULT_FILES],
        metrics=[f"{RUN}/metrics.csv".format(experiment=e, seed=s) for e, s in all_runs()],
    output:
        summary=f"{RESULTS}/summary.csv",
        curves=f"{RESULTS}/curves.csv",
    params:
        runs=run_refs(),
    log:
        f"{RESULTS}/logs/aggregate.log",
    shell:
        "{ARCHBENCH} aggregate --runs {params.runs:q} --summary {output.summary} "
        "--curves {output.curves} 2> {log}"


rule report:
    input:
        summary=f"{RESULTS}/summary.csv",
        curves=f"{RESULTS}/curves.csv",
    output:
        md=f"{REPORT}/index.md",
        html=f"{REPORT}/index.html",
        val_loss=report(f"{REPORT}/figures/val_loss.png", caption="../report/val_loss.rst",
                        category="Curves"),
        train_loss=report(f"{REPORT}/figures/train_loss.png",
                          caption="../report/train_loss.rst", category="Curves"),
    params:
        experiments=json.dumps([e.describe() for e in EXPERIMENTS.values()]),
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "{ARCHBENCH} report --summary {input.summary} --curves {input.curves} "
        "--out-dir {REPORT} --suite {SUITE.name} --experiments {params.experiments:q} 2> {log}"
