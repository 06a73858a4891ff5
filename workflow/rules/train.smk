# One training job per (experiment, seed). The run spec (all resolved options) is a param, so
# editing a row or the suite re-runs exactly the jobs it changes. A killed job resumes from
# checkpoint.safetensors in its run directory when run again.
# A row with an `init_from` cell starts from other rows' trained weights: those runs are inputs of
# its training job (so they train first; a source seed s + k outside the suite's seeds is trained
# for that purpose alone), and their specs are part of its spec (a changed source re-runs it).


def train_spec(wildcards):
    """The run spec of (experiment, seed), also for a source seed outside the suite's seeds."""
    key = (wildcards.experiment, int(wildcards.seed))
    return SPECS.get(key) or run_spec(EXPERIMENTS[key[0]], SUITE, key[1])


def init_runs(wildcards):
    """{target: run directory} of the runs this run is initialised from (init_from)."""
    return {e["target"]: RUN.format(experiment=e["experiment"], seed=e["seed"])
            for e in train_spec(wildcards).get("init_from", [])}


rule train:
    input:
        data_inputs,
        init=lambda w: [f"{run}/model.safetensors" for run in init_runs(w).values()],
    output:
        weights=f"{RUN}/model.safetensors",
        model_config=f"{RUN}/model_config.json",
        train_config=f"{RUN}/train_config.json",
        metrics=f"{RUN}/metrics.csv",
        summary=f"{RUN}/train_summary.json",
    params:
        spec=lambda w: json.dumps(train_spec(w), sort_keys=True),
        data=data_dir,
        out=RUN,
        init=lambda w: " ".join(f"--init {shlex.quote(f'{target}={run}')}"
                                for target, run in init_runs(w).items()),
    threads: SUITE.threads
    resources:
        runtime=240,
        gpu=int(SUITE.gpu),
    log:
        f"{RUN}/train.log",
    # exec: training replaces the shell. A SIGTERM (SLURM's preemption or time limit) reaches
    # every process of the job step; the inner snakemake waits for its running job, and training
    # saves its checkpoint and exits. A shell in between would die at once, the inner snakemake
    # would end, and SLURM would kill training while it saves.
    shell:
        "exec {ARCHBENCH} train --spec {params.spec:q} --data {params.data} --out {params.out} "
        "{params.init} --threads {threads} 2> {log}"
