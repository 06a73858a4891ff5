# One training job per (experiment, seed). The run spec (all resolved options) is a param, so
# editing a row or the suite re-runs exactly the jobs it changes. A killed job resumes from
# checkpoint.safetensors in its run directory when run again.


rule train:
    input:
        data_inputs,
    output:
        weights=f"{RUN}/model.safetensors",
        model_config=f"{RUN}/model_config.json",
        train_config=f"{RUN}/train_config.json",
        metrics=f"{RUN}/metrics.csv",
        summary=f"{RUN}/train_summary.json",
    params:
        spec=lambda w: json.dumps(SPECS[(w.experiment, int(w.seed))], sort_keys=True),
        data=data_dir,
        out=RUN,
    threads: SUITE.threads
    resources:
        runtime=240,
        gpu=int(SUITE.gpu),
    log:
        f"{RUN}/train.log",
    shell:
        "{ARCHBENCH} train --spec {params.spec:q} --data {params.data} --out {params.out} "
        "--threads {threads} 2> {log}"
