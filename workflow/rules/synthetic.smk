# Synthetic capability tasks (MQAR, path-star; archbench.data.synthetic): every trained
# checkpoint of a row on a synthetic data set is scored on the task's validation instances
# (teacher-forced answer accuracy, greedy answers and exact match) into task.json, which the
# aggregate step reads instead of the perplexity and lm-eval files (common.smk: result_files).

from archbench.train import make_train_config


def check_instances_fit():
    """Stop before any job when a synthetic row's block_size cannot hold one instance."""
    for (name, seed), spec in SPECS.items():
        dataset = DATASETS[spec["dataset"]]
        if not isinstance(dataset, SyntheticSpec):
            continue
        needed = dataset.task().instance_length() - 1
        block_size = make_train_config(spec["train"]).block_size
        if block_size < needed:
            raise WorkflowError(
                f"archbench: experiment '{name}' in suite '{SUITE.name}': data set "
                f"'{dataset.name}' feeds the model {needed} tokens per instance, but block_size="
                f"{block_size}; override block_size in the row or shrink the task"
            )


check_instances_fit()


rule evaluate_task:
    input:
        data_inputs,
        weights=f"{RUN}/model.safetensors",
        model_config=f"{RUN}/model_config.json",
    output:
        f"{RUN}/{TASK_FILE}",
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
