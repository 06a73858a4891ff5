# Synthetic capability tasks (MQAR, path-star; archbench.data.synthetic): every trained
# checkpoint of a row on a synthetic data set is scored on the task's validation instances
# (teacher-forced answer accuracy, greedy answers and exact match) into the run's eval.json,
# where a text row has its perplexity; it has no lm-eval files (common.smk: result_files).


rule evaluate_task:
    input:
        data_inputs,
        weights=f"{RUN}/model.safetensors",
        model_config=f"{RUN}/model_config.json",
    output:
        f"{RUN}/eval.json",
    wildcard_constraints:
        experiment=TASK_EXPERIMENTS,
    params:
        data=data_dir,
        run=RUN,
        batch_size=SUITE.eval.get("batch_size", 32),
    threads: SUITE.threads
    resources:
        gpu=int(SUITE.gpu),
    log:
        f"{RUN}/evaluate_task.log",
    shell:
        "{ARCHBENCH} evaluate-task --run {params.run} --data {params.data} --out {output} "
        "--batch-size {params.batch_size} --device auto --threads {threads} 2> {log}"
