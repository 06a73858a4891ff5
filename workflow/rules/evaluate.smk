# Every evaluation of a checkpoint is its own job, so adding an evaluation never retrains.


rule evaluate_perplexity:
    input:
        data_inputs,
        weights=f"{RUN}/model.safetensors",
        model_config=f"{RUN}/model_config.json",
    output:
        f"{RUN}/eval.json",
    wildcard_constraints:
        experiment=TEXT_EXPERIMENTS,
    params:
        data=data_dir,
        run=RUN,
        batch_size=SUITE.eval.get("batch_size", 32),
        max_tokens=(f"--max-tokens {SUITE.eval['max_tokens']}"
                    if SUITE.eval.get("max_tokens") else ""),
    threads: SUITE.threads
    resources:
        gpu=int(SUITE.gpu),
    log:
        f"{RUN}/evaluate_perplexity.log",
    shell:
        "{ARCHBENCH} evaluate --run {params.run} --data {params.data} --out {output} "
        "--batch-size {params.batch_size} {params.max_tokens} --threads {threads} 2> {log}"


rule lm_eval:
    input:
        data_inputs,
        weights=f"{RUN}/model.safetensors",
        model_config=f"{RUN}/model_config.json",
    output:
        RUN + "/lm_eval_{lm_eval_task}.json",
    params:
        data=data_dir,
        run=RUN,
        batch_size=LM_EVAL.get("batch_size", 64),
        # each size reaches only the task it sizes, so that changing it re-runs that task's jobs
        limit=lambda w: (f"--limit {LM_EVAL['blimp_limit']}"
                         if w.lm_eval_task == "blimp" and LM_EVAL.get("blimp_limit") else ""),
        max_tokens=lambda w: (f"--max-tokens {LM_EVAL['rolling_max_tokens']}"
                              if w.lm_eval_task == "rolling_ppl" and LM_EVAL.get("rolling_max_tokens")
                              else ""),
    threads: SUITE.threads
    resources:
        gpu=int(SUITE.gpu),
    log:
        RUN + "/lm_eval_{lm_eval_task}.log",
    shell:
        "{ARCHBENCH} lm-eval --run {params.run} --data {params.data} "
        "--tasks {wildcards.lm_eval_task} --out {output} --batch-size {params.batch_size} "
        "{params.limit} {params.max_tokens} {MIRROR_ARG} --device auto --threads {threads} "
        "2> {log}"
